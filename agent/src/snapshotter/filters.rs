//! containerd's filter expressions over snapshot infos, as `List` (containerd's `Walk`)
//! receives them: `labels."containerd.io/snapshot.ref"==sha256:...,parent=="p"`.
//!
//! A filter is selectors joined by `,` (all must match); a list of filters matches if any
//! does. A selector is a field path (`name`, `parent`, `kind`, `labels.KEY`, with quoted
//! parts), then `==`, `!=` or `~=` (a regular expression) and a value, quoted or bare; a
//! path alone tests presence.

/// A parsed filter: selectors that must all match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter(Vec<Selector>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Option<(Op, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Equal,
    NotEqual,
    Matches,
}

/// The fields of a snapshot a filter can see.
pub trait Fields {
    /// The value at `path` (e.g. `["labels", "a"]`), if present.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filter {
    /// Parses one filter expression.
    pub fn parse(s: &str) -> Result<Filter, String> {
        let mut p = Parser {
            chars: s.chars().collect(),
            pos: 0,
        };
        let mut selectors = vec![p.selector()?];
        while p.eat(',') {
            selectors.push(p.selector()?);
        }
        p.skip_space();
        if p.pos != p.chars.len() {
            return Err(format!("filter {s:?}: unexpected text at {}", p.pos));
        }
        Ok(Filter(selectors))
    }

    /// True if every selector matches.
    pub fn matches(&self, item: &dyn Fields) -> bool {
        self.0.iter().all(|s| {
            let value = item.field(&s.path);
            match (&s.op, value) {
                (None, v) => v.is_some(),
                (Some((Op::Equal, want)), Some(v)) => &v == want,
                (Some((Op::NotEqual, want)), v) => v.as_ref() != Some(want),
                (Some((Op::Matches, re)), Some(v)) => {
                    regex::Regex::new(re).is_ok_and(|r| r.is_match(&v))
                }
                (Some(_), None) => false,
            }
        })
    }
}

/// True if `filters` is empty or any of them matches.
pub fn any_matches(filters: &[Filter], item: &dyn Fields) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(item))
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.part()?];
        while self.eat('.') {
            path.push(self.part()?);
        }
        self.skip_space();
        let rest: String = self.chars[self.pos..].iter().take(2).collect();
        let op = match rest.as_str() {
            "==" => Some(Op::Equal),
            "!=" => Some(Op::NotEqual),
            "~=" => Some(Op::Matches),
            _ => None,
        };
        let op = match op {
            Some(op) => {
                self.pos += 2;
                Some((op, self.value()?))
            }
            None => None,
        };
        Ok(Selector { path, op })
    }

    /// A field name: bare (letters, digits, `_`, `-`) or quoted.
    fn part(&mut self) -> Result<String, String> {
        self.skip_space();
        if matches!(self.peek(), Some('"' | '\'' | '`')) {
            return self.quoted();
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(format!("expected a field name at {start}"));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    /// A value: quoted, or everything up to the next `,`.
    fn value(&mut self) -> Result<String, String> {
        self.skip_space();
        if matches!(self.peek(), Some('"' | '\'' | '`')) {
            return self.quoted();
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ',') {
            self.pos += 1;
        }
        Ok(self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .trim_end()
            .to_string())
    }

    /// A string in `"..."` (with `\` escapes), `'...'` or `` `...` ``.
    fn quoted(&mut self) -> Result<String, String> {
        let quote = self.chars[self.pos];
        self.pos += 1;
        let mut out = String::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            match c {
                c if c == quote => return Ok(out),
                '\\' if quote == '"' => match self.peek() {
                    Some(e) => {
                        self.pos += 1;
                        out.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err("unterminated quoted string in filter".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Item(HashMap<&'static str, &'static str>);
    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join("|").as_str()).map(|s| s.to_string())
        }
    }

    #[test]
    fn containerds_walk_filter_parses_and_matches() {
        let f = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/1/sha256:p""#,
        )
        .unwrap();
        let hit = Item(HashMap::from([
            ("labels|containerd.io/snapshot.ref", "sha256:abc"),
            ("parent", "ns/1/sha256:p"),
        ]));
        assert!(f.matches(&hit));
        let other_parent = Item(HashMap::from([
            ("labels|containerd.io/snapshot.ref", "sha256:abc"),
            ("parent", ""),
        ]));
        assert!(!f.matches(&other_parent));
        assert!(!f.matches(&Item(HashMap::new())));
    }

    #[test]
    fn operators_presence_and_any_of() {
        let item = Item(HashMap::from([("name", "extract-1"), ("kind", "active")]));
        for (expr, want) in [
            ("name", true),
            ("labels.x", false),
            ("name!=x", true),
            ("name~=^extract-", true),
            ("name~=^view-", false),
            ("kind==active,name==extract-1", true),
            ("kind==committed", false),
            ("labels.x!=y", true),
        ] {
            assert_eq!(Filter::parse(expr).unwrap().matches(&item), want, "{expr}");
        }
        let fs = [
            Filter::parse("kind==committed").unwrap(),
            Filter::parse("name==extract-1").unwrap(),
        ];
        assert!(any_matches(&fs, &item));
        assert!(any_matches(&[], &item));
        assert!(Filter::parse("labels.\"x").is_err());
        assert!(Filter::parse("==x").is_err());
    }
}
