//! Building a view: the layers are applied to a mutable tree (an arena of nodes, each
//! directory an ordered map from name to node), which is then walked from the root to
//! number the inodes that are still reachable and count their names.

use super::names::{classify, split_target, valid_name, PathClass};
use super::{makedev, Node, NodeKind, ViewError, ViewLimits, ViewStats, MAX_SYMLINKS};
use imgd_core::index::{Entry, EntryKind, LayerIndex};
use std::borrow::Cow;
use std::collections::BTreeMap;

mod number;

/// Arena index of the root.
const ROOT: usize = 0;
/// The id given to a uid or gid that does not fit in 32 bits (the kernel's overflow id).
const OVERFLOW_ID: u32 = 65534;

/// Metadata of a node while building.
#[derive(Clone, Debug, Default)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Meta {
    fn of(e: &Entry) -> Meta {
        let id = |v: u64| u32::try_from(v).unwrap_or(OVERFLOW_ID);
        Meta {
            mode: e.mode & 0o7777,
            uid: id(e.uid),
            gid: id(e.gid),
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec.min(999_999_999),
            xattrs: e.xattrs.clone(),
        }
    }

    /// A directory the archive implies but does not list (and the root).
    fn implicit_dir() -> Meta {
        Meta {
            mode: 0o755,
            ..Meta::default()
        }
    }
}

enum Kind {
    Dir(BTreeMap<Box<[u8]>, usize>),
    /// Anything but a directory (never `NodeKind::Dir`).
    Leaf(NodeKind),
}

struct BNode {
    kind: Kind,
    meta: Meta,
    /// Arena index of the directory it was created in (exact for directories, which
    /// never move and have one name).
    parent: usize,
}

/// Why an entry was not applied.
enum Fail {
    /// The entry is left out of the view, with a warning.
    Skip(&'static str),
    /// The whole build fails.
    Fatal(ViewError),
}

impl From<ViewError> for Fail {
    fn from(e: ViewError) -> Self {
        Fail::Fatal(e)
    }
}

struct Tree {
    nodes: Vec<BNode>,
    limits: ViewLimits,
    skipped: u64,
    /// Path components taken from symlink targets so far.
    symlink_steps: u64,
}

/// Skipped entries logged at `warn` level; later ones are logged at `debug` level, and
/// counted in a summary.
const MAX_WARNINGS: u64 = 100;
/// Longest symlink target followed (Linux's `PATH_MAX` - 1: no longer one can exist).
const MAX_TARGET_LEN: usize = 4095;

/// Builds the nodes of a view (index `ino - 1`) and its counts.
pub(super) fn build(
    layers: &[LayerIndex],
    limits: ViewLimits,
) -> Result<(Vec<Node>, ViewStats), ViewError> {
    let total: u64 = layers.iter().map(|l| l.entries.len() as u64).sum();
    if total > limits.max_entries {
        let limit = limits.max_entries;
        return Err(ViewError::TooManyEntries { limit });
    }
    let mut tree = Tree {
        nodes: Vec::new(),
        limits,
        skipped: 0,
        symlink_steps: 0,
    };
    tree.alloc(Kind::Dir(BTreeMap::new()), Meta::implicit_dir(), ROOT)?;
    for (li, layer) in layers.iter().enumerate() {
        tree.apply_layer(li, layer)?;
    }
    if tree.skipped > MAX_WARNINGS {
        let skipped = tree.skipped;
        tracing::warn!(
            skipped,
            "image view: entries skipped in all (see debug logs)"
        );
    }
    Ok(tree.finish())
}

impl Tree {
    /// Applies one layer: its whiteouts first (they only hide lower content), then its
    /// other entries in archive order.
    fn apply_layer(&mut self, li: usize, layer: &LayerIndex) -> Result<(), ViewError> {
        for e in &layer.entries {
            let r = match classify(&e.path) {
                PathClass::Whiteout { parent, name } => self.whiteout(&parent, name),
                PathClass::Opaque { dir } => self.opaque(&dir),
                _ => Ok(()),
            };
            self.settle(r, li, e)?;
        }
        for (ei, e) in layer.entries.iter().enumerate() {
            let r = match classify(&e.path) {
                PathClass::Entry { parent, name } => self.add(li, ei, e, &parent, name),
                PathClass::Skip(reason) => Err(Fail::Skip(reason)),
                PathClass::Root => {
                    tracing::debug!(layer = li, "image view: root entry ignored");
                    Ok(())
                }
                PathClass::Whiteout { .. } | PathClass::Opaque { .. } => Ok(()),
            };
            self.settle(r, li, e)?;
        }
        Ok(())
    }

    /// Logs and counts a skipped entry; passes a fatal error on.
    fn settle(&mut self, r: Result<(), Fail>, li: usize, e: &Entry) -> Result<(), ViewError> {
        match r {
            Ok(()) => Ok(()),
            Err(Fail::Fatal(err)) => Err(err),
            Err(Fail::Skip(reason)) => {
                self.skipped += 1;
                let path = e.path_lossy();
                if self.skipped <= MAX_WARNINGS {
                    tracing::warn!(layer = li, %path, reason, "image view: entry skipped");
                } else {
                    tracing::debug!(layer = li, %path, reason, "image view: entry skipped");
                }
                Ok(())
            }
        }
    }

    fn alloc(&mut self, kind: Kind, meta: Meta, parent: usize) -> Result<usize, ViewError> {
        if self.nodes.len() as u64 >= self.limits.max_entries {
            let limit = self.limits.max_entries;
            return Err(ViewError::TooManyEntries { limit });
        }
        self.nodes.push(BNode { kind, meta, parent });
        Ok(self.nodes.len() - 1)
    }

    /// The node `name` in directory `dir`.
    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.nodes[dir].kind {
            Kind::Dir(children) => children.get(name).copied(),
            Kind::Leaf(_) => None,
        }
    }

    fn is_dir(&self, node: usize) -> bool {
        matches!(self.nodes[node].kind, Kind::Dir(_))
    }

    /// Makes `name` in directory `dir` name `node`, replacing what it named.
    fn link(&mut self, dir: usize, name: &[u8], node: usize) {
        if let Kind::Dir(children) = &mut self.nodes[dir].kind {
            children.insert(name.into(), node);
        }
    }

    /// Creates a node as `name` in directory `dir`, replacing what it named.
    fn add_node(
        &mut self,
        dir: usize,
        name: &[u8],
        kind: Kind,
        meta: Meta,
    ) -> Result<usize, ViewError> {
        let node = self.alloc(kind, meta, dir)?;
        self.link(dir, name, node);
        Ok(node)
    }

    /// Resolves the directory path `comps` from the root, following symlinks inside the
    /// root. With `create`, missing directories are created and non-directories in the
    /// way replaced by directories; without, `None` if the path leads to no directory.
    fn walk(&mut self, comps: &[&[u8]], create: bool) -> Result<Option<usize>, Fail> {
        let mut todo: Vec<Cow<'_, [u8]>> = comps.iter().rev().map(|c| Cow::Borrowed(*c)).collect();
        let mut cur = ROOT;
        let mut links = 0;
        while let Some(comp) = todo.pop() {
            match &*comp {
                b"" | b"." => continue,
                b".." => {
                    cur = self.nodes[cur].parent;
                    continue;
                }
                _ => {}
            }
            let found = self.child(cur, &comp);
            match found.map(|c| (c, &self.nodes[c].kind)) {
                Some((c, Kind::Dir(_))) => cur = c,
                Some((_, Kind::Leaf(NodeKind::Symlink { target }))) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Fail::Skip("too many levels of symbolic links in the path"));
                    }
                    if target.len() > MAX_TARGET_LEN {
                        return Err(Fail::Skip("a symlink on the path is longer than PATH_MAX"));
                    }
                    if target.first() == Some(&b'/') {
                        cur = ROOT;
                    }
                    let before = todo.len();
                    let parts = target.split(|&b| b == b'/').rev();
                    todo.extend(parts.map(|c| Cow::Owned(c.to_vec())));
                    self.symlink_steps += (todo.len() - before) as u64;
                    if self.symlink_steps > self.limits.max_symlink_steps {
                        let limit = self.limits.max_symlink_steps;
                        return Err(Fail::Fatal(ViewError::TooManySymlinkSteps { limit }));
                    }
                }
                _ if create => {
                    if !valid_name(&comp) {
                        return Err(Fail::Skip("a symlink on the path leads to an invalid name"));
                    }
                    if found.is_some() {
                        tracing::debug!(
                            "image view: non-directory replaced by an implicit directory"
                        );
                    }
                    let dir = Kind::Dir(BTreeMap::new());
                    cur = self.add_node(cur, &comp, dir, Meta::implicit_dir())?;
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// `.wh.NAME`: removes `name` (and its subtree) from the directory `parent`.
    fn whiteout(&mut self, parent: &[&[u8]], name: &[u8]) -> Result<(), Fail> {
        if let Some(dir) = self.walk(parent, false)? {
            if let Kind::Dir(children) = &mut self.nodes[dir].kind {
                children.remove(name);
            }
        }
        Ok(())
    }

    /// `.wh..wh..opq`: empties the directory `dir`, creating it if needed.
    fn opaque(&mut self, dir: &[&[u8]]) -> Result<(), Fail> {
        if let Some(dir) = self.walk(dir, true)? {
            if let Kind::Dir(children) = &mut self.nodes[dir].kind {
                children.clear();
            }
        }
        Ok(())
    }

    /// Applies entry `ei` of layer `li`, named `name` in directory `parent`.
    fn add(
        &mut self,
        li: usize,
        ei: usize,
        e: &Entry,
        parent: &[&[u8]],
        name: &[u8],
    ) -> Result<(), Fail> {
        let dir = self
            .walk(parent, true)?
            .ok_or(Fail::Skip("parent path leads to no directory"))?;
        let meta = Meta::of(e);
        let leaf = match e.kind {
            EntryKind::Dir => {
                match self.child(dir, name) {
                    Some(old) if self.is_dir(old) => self.nodes[old].meta = meta,
                    _ => {
                        self.add_node(dir, name, Kind::Dir(BTreeMap::new()), meta)?;
                    }
                }
                return Ok(());
            }
            EntryKind::Hardlink => return self.hardlink(e, dir, name, meta),
            EntryKind::File => NodeKind::File {
                layer: li,
                entry: ei,
                size: e.size,
            },
            EntryKind::Symlink => match &e.link_target {
                Some(target) if !target.is_empty() => NodeKind::Symlink {
                    target: target.clone(),
                },
                _ => return Err(Fail::Skip("symlink without a target")),
            },
            EntryKind::CharDevice => NodeKind::CharDevice {
                rdev: makedev(e.dev_major, e.dev_minor),
            },
            EntryKind::BlockDevice => NodeKind::BlockDevice {
                rdev: makedev(e.dev_major, e.dev_minor),
            },
            EntryKind::Fifo => NodeKind::Fifo,
        };
        self.add_node(dir, name, Kind::Leaf(leaf), meta)?;
        Ok(())
    }

    /// A hard link `name` in `dir` to the node its target path names now.
    fn hardlink(&mut self, e: &Entry, dir: usize, name: &[u8], meta: Meta) -> Result<(), Fail> {
        let (tparent, tname) = e
            .link_target
            .as_deref()
            .and_then(split_target)
            .ok_or(Fail::Skip("hard link with an invalid target path"))?;
        let target = self
            .walk(&tparent, false)?
            .and_then(|d| self.child(d, tname))
            .ok_or(Fail::Skip("hard link target does not exist"))?;
        if self.is_dir(target) {
            return Err(Fail::Skip("hard link to a directory"));
        }
        let m = &mut self.nodes[target].meta;
        (m.mode, m.uid, m.gid) = (meta.mode, meta.uid, meta.gid);
        (m.mtime, m.mtime_nsec) = (meta.mtime, meta.mtime_nsec);
        m.xattrs.extend(meta.xattrs);
        self.link(dir, name, target);
        Ok(())
    }
}
