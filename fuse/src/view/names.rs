//! What an entry's path means to the merge: an ordinary entry, a whiteout, an opaque
//! marker, the root itself, or something the view must not hold.

/// Prefix of every whiteout name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of aufs metadata names (`.wh..wh.plnk`, `.wh..wh.aufs`, ...), never content.
const META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";

/// The meaning of one entry path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PathClass<'a> {
    /// The root directory itself (an archive's `./`).
    Root,
    /// An ordinary entry `name` in the directory `parent` (components from the root).
    Entry {
        parent: Vec<&'a [u8]>,
        name: &'a [u8],
    },
    /// `.wh.NAME`: removes `name` of `parent` as the lower layers left it.
    Whiteout {
        parent: Vec<&'a [u8]>,
        name: &'a [u8],
    },
    /// `.wh..wh..opq`: the directory `dir` hides everything the lower layers put in it.
    Opaque { dir: Vec<&'a [u8]> },
    /// An entry the view leaves out, and why.
    Skip(&'static str),
}

/// Whether `name` can be a name in the view: not empty, not `.` or `..`, no `/` or NUL.
pub(super) fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// Splits a normalised entry path into components and classifies it.
///
/// The index builder already rejects `..` and strips `.` and empty components; this
/// checks again, so that a hand-made or hostile index cannot put such a name in the view.
pub(super) fn classify(path: &[u8]) -> PathClass<'_> {
    if path.is_empty() {
        return PathClass::Root;
    }
    let mut parent: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let Some(name) = parent.pop() else {
        return PathClass::Root;
    };
    if !parent.iter().all(|c| valid_name(c)) || !valid_name(name) {
        return PathClass::Skip("path has an empty, '.', '..' or NUL component");
    }
    if parent.iter().any(|c| c.starts_with(WHITEOUT_PREFIX)) {
        return PathClass::Skip("path lies inside a whiteout-named directory (aufs metadata)");
    }
    if name == OPAQUE {
        return PathClass::Opaque { dir: parent };
    }
    if name.starts_with(META_PREFIX) {
        return PathClass::Skip("aufs metadata entry");
    }
    if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
        if !valid_name(target) {
            return PathClass::Skip("whiteout of an empty, '.' or '..' name");
        }
        return PathClass::Whiteout {
            parent,
            name: target,
        };
    }
    PathClass::Entry { parent, name }
}

/// Splits a hard link target (a normalised path) into its parent components and name;
/// `None` if it names the root or has an invalid component.
pub(super) fn split_target(path: &[u8]) -> Option<(Vec<&[u8]>, &[u8])> {
    let mut comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let name = comps.pop()?;
    (valid_name(name) && comps.iter().all(|c| valid_name(c))).then_some((comps, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(b""), PathClass::Root);
        assert_eq!(
            classify(b"a/b"),
            PathClass::Entry {
                parent: vec![b"a".as_slice()],
                name: b"b"
            }
        );
        assert_eq!(
            classify(b"a/.wh.b"),
            PathClass::Whiteout {
                parent: vec![b"a".as_slice()],
                name: b"b"
            }
        );
        assert_eq!(
            classify(b"a/.wh..wh..opq"),
            PathClass::Opaque {
                dir: vec![b"a".as_slice()]
            }
        );
        assert_eq!(classify(b".wh..wh..opq"), PathClass::Opaque { dir: vec![] });
        for bad in [
            &b"a/../b"[..],
            b"../b",
            b"a/./b",
            b"a//b",
            b"/a",
            b"a/",
            b"a\0b",
            b".wh.",
            b".wh..",
            b".wh...",
            b".wh..wh.plnk",
            b".wh..wh.plnk/123.4",
            b".wh.x/y",
        ] {
            assert!(
                matches!(classify(bad), PathClass::Skip(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            split_target(b"x/y"),
            Some((vec![b"x".as_slice()], b"y".as_slice()))
        );
        assert_eq!(split_target(b""), None);
        assert_eq!(split_target(b"x/../y"), None);
    }
}
