//! Tests of the merged view. Layers are built entry by entry with [`Layer`]; every view
//! built through [`view`] is checked against the invariants of [`check_invariants`].

use super::*;
use imgd_core::index::{Compression, EntryKind, SparseExtent};
use imgd_core::Digest;
use std::collections::HashMap;

mod links;
mod real_tar;
mod rules;
mod scale;

/// An entry with plain defaults (root-owned, 0644 / 0755 / 0777, mtime 1.6e9).
pub(super) fn entry(path: impl AsRef<[u8]>, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_ref().to_vec(),
        kind,
        mode: match kind {
            EntryKind::Dir => 0o755,
            EntryKind::Symlink => 0o777,
            _ => 0o644,
        },
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 1_600_000_000,
        mtime_nsec: 0,
        link_target: None,
        dev_major: 0,
        dev_minor: 0,
        xattrs: BTreeMap::new(),
        content_offset: 0,
        sparse: vec![],
    }
}

/// A layer under construction.
#[derive(Default)]
pub(super) struct Layer(Vec<Entry>);

impl Layer {
    pub(super) fn new() -> Self {
        Layer::default()
    }

    pub(super) fn add(mut self, e: Entry) -> Self {
        self.0.push(e);
        self
    }

    pub(super) fn dir(self, path: impl AsRef<[u8]>) -> Self {
        self.add(entry(path, EntryKind::Dir))
    }

    pub(super) fn file(self, path: impl AsRef<[u8]>, size: u64) -> Self {
        let mut e = entry(path, EntryKind::File);
        e.size = size;
        self.add(e)
    }

    /// A whiteout (or any empty file): `path` is written as given.
    pub(super) fn wh(self, path: impl AsRef<[u8]>) -> Self {
        self.file(path, 0)
    }

    pub(super) fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let mut e = entry(path, EntryKind::Symlink);
        e.link_target = Some(target.as_ref().to_vec());
        self.add(e)
    }

    pub(super) fn hardlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let mut e = entry(path, EntryKind::Hardlink);
        e.link_target = Some(target.as_ref().to_vec());
        self.add(e)
    }

    pub(super) fn index(self) -> LayerIndex {
        LayerIndex {
            layer: Digest::of(format!("{:?}", self.0.len()).as_bytes()),
            compression: Compression::None,
            compressed_size: 0,
            uncompressed_size: 0,
            random_access: true,
            entries: self.0,
            checkpoints: vec![],
            copy: None,
            toc: None,
            windows_size: 0,
            windows: None,
        }
    }
}

/// Builds a view of `layers` with the default limits and checks its invariants.
pub(super) fn view(layers: Vec<Layer>) -> ImageView {
    let layers = layers.into_iter().map(Layer::index).collect();
    let v = ImageView::build(Arc::new(layers), ViewLimits::default()).expect("view builds");
    check_invariants(&v);
    v
}

/// The node at `path` (panics if there is none).
pub(super) fn get(v: &ImageView, path: impl AsRef<[u8]>) -> &Node {
    let path = path.as_ref();
    v.resolve_path(path)
        .and_then(|i| v.node(i))
        .unwrap_or_else(|| panic!("no {:?} in the view", String::from_utf8_lossy(path)))
}

/// Whether `path` exists.
pub(super) fn exists(v: &ImageView, path: impl AsRef<[u8]>) -> bool {
    v.resolve_path(path.as_ref()).is_some()
}

/// The names in directory `path`, sorted, lossily as text.
pub(super) fn names(v: &ImageView, path: impl AsRef<[u8]>) -> Vec<String> {
    let dir = get(v, path).ino;
    v.children(dir)
        .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// `(layer, entry index)` a regular file's content comes from.
pub(super) fn source(v: &ImageView, path: impl AsRef<[u8]>) -> (usize, usize) {
    match get(v, path).kind {
        NodeKind::File { layer, entry, .. } => (layer, entry),
        ref k => panic!("not a file: {k:?}"),
    }
}

/// Checks what must hold of every view: dense inode numbers with the root at 1; sorted,
/// unique, valid child names (no `.wh.` names); directories with one name and a correct
/// parent; link counts equal to the names; every inode reachable.
pub(super) fn check_invariants(v: &ImageView) {
    let root = v.node(ROOT_INO).expect("root");
    assert!(root.is_dir() && root.parent == ROOT_INO && v.root() == ROOT_INO);
    assert!(v.node(0).is_none() && v.node(v.inode_count() + 1).is_none());
    let mut names_of: HashMap<Ino, u32> = HashMap::new();
    for ino in 1..=v.inode_count() {
        let node = v.node(ino).expect("dense inode numbers");
        assert_eq!(node.ino, ino);
        let NodeKind::Dir { children } = &node.kind else {
            continue;
        };
        let mut subdirs = 0;
        for (i, (name, child)) in children.iter().enumerate() {
            assert!(
                i == 0 || children[i - 1].0 < *name,
                "children sorted and unique"
            );
            assert!(names::valid_name(name), "bad name {name:?}");
            assert!(!name.starts_with(b".wh."), "whiteout {name:?} in the view");
            let c = v.node(*child).expect("child exists");
            *names_of.entry(*child).or_default() += 1;
            if c.is_dir() {
                subdirs += 1;
                assert_eq!(c.parent, ino, "parent of a directory");
            }
            assert_eq!(v.lookup(ino, name), Some(*child));
        }
        assert_eq!(node.nlink, 2 + subdirs, "directory nlink");
    }
    for ino in 2..=v.inode_count() {
        let node = v.node(ino).expect("node");
        let n = names_of.get(&ino).copied().unwrap_or(0);
        assert!(n > 0, "inode {ino} unreachable");
        if node.is_dir() {
            assert_eq!(n, 1, "directory with several names");
        } else {
            assert_eq!(node.nlink, n, "nlink of inode {ino}");
        }
    }
}

#[test]
fn the_view_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<ImageView>();
}
