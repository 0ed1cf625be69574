//! Registry API paths and the choice of upstream for a repository name.

use crate::errors::ProxyError;
use crate::upstream::Upstream;
pub use imgd_core::registry_path::{parse_registry_path, RegistryPath};
use std::sync::Arc;

/// The configured upstreams and the rules for picking one.
pub struct Upstreams {
    entries: Vec<(String, Arc<Upstream>)>,
    default: Option<usize>,
}

/// An upstream chosen for a request, with the repository name as that upstream knows it.
pub struct Route {
    pub upstream_name: String,
    pub upstream: Arc<Upstream>,
    pub repo: String,
}

impl Upstreams {
    /// Upstreams by name; `default` is the index of the one used without prefix or ns.
    pub fn new(entries: Vec<(String, Arc<Upstream>)>, default: Option<usize>) -> Self {
        let default = default.or(if entries.len() == 1 { Some(0) } else { None });
        Upstreams { entries, default }
    }

    /// Picks the upstream for repository `name`: containerd's `ns` parameter first, then
    /// a first path component equal to an upstream's name, then the default upstream.
    pub fn route(&self, name: &str, ns: Option<&str>) -> Result<Route, ProxyError> {
        let make = |i: usize, repo: &str| Route {
            upstream_name: self.entries[i].0.clone(),
            upstream: self.entries[i].1.clone(),
            repo: repo.to_string(),
        };
        if let Some(ns) = ns {
            return match self.entries.iter().position(|(n, _)| n == ns) {
                Some(i) => Ok(make(i, name)),
                None => Err(ProxyError::NameUnknown(format!("{ns}/{name}"))),
            };
        }
        if let Some((first, rest)) = name.split_once('/') {
            if let Some(i) = self.entries.iter().position(|(n, _)| n == first) {
                return Ok(make(i, rest));
            }
        }
        match self.default {
            Some(i) => Ok(make(i, name)),
            None => Err(ProxyError::NameUnknown(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::LayoutUpstream;

    #[test]
    fn routes_by_ns_prefix_then_default() {
        let up = |p: &str| Arc::new(Upstream::Layout(LayoutUpstream::new(p.into())));
        let u = Upstreams::new(
            vec![("hub".into(), up("/a")), ("local".into(), up("/b"))],
            Some(0),
        );
        let r = u.route("local/app", None).unwrap();
        assert_eq!(
            (r.upstream_name.as_str(), r.repo.as_str()),
            ("local", "app")
        );
        let r = u.route("library/alpine", None).unwrap();
        assert_eq!(
            (r.upstream_name.as_str(), r.repo.as_str()),
            ("hub", "library/alpine")
        );
        let r = u.route("local/app", Some("hub")).unwrap();
        assert_eq!(
            (r.upstream_name.as_str(), r.repo.as_str()),
            ("hub", "local/app")
        );
        assert!(u.route("x", Some("nope")).is_err());
        let none = Upstreams::new(vec![("a".into(), up("/a")), ("b".into(), up("/b"))], None);
        assert!(none.route("x/y", None).is_err());
    }
}
