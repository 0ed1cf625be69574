//! The merged image view: an image's layers merged into one read-only tree.
//!
//! [`ImageView::build`] applies the layers bottom first, the way an OCI runtime's unpack
//! (containerd's applier, `umoci unpack`) lays them out on disk, and gives every file an
//! inode number (the root is [`ROOT_INO`], the rest are dense) that a FUSE filesystem
//! can use as is. File contents stay in the layers: [`ImageView::file_source`] names the
//! index entry to read with `imgd_core::index::read_file`.
//!
//! # Merge rules
//!
//! Each layer is applied in two steps: first its whiteouts, then its other entries in
//! archive order.
//!
//! - **Whiteouts** apply to what the lower layers left only (OCI image spec: "files that
//!   are present in the same layer as a whiteout file can only be hidden by whiteout files
//!   in subsequent layers"). `.wh.NAME` removes NAME, a whole subtree for a directory;
//!   a whiteout of something absent does nothing and creates nothing. `.wh..wh..opq`
//!   empties its directory of lower content (creating the directory if it is missing);
//!   the layer's own entries in it stay. Other `.wh..wh.*` names (aufs metadata) and
//!   anything under a `.wh.*` directory are ignored. No name starting with `.wh.` is ever
//!   in the view.
//! - **Replacement**: a later entry for a path replaces what is there, metadata
//!   included, and any subtree under it. The one merge: a directory entry over a
//!   directory keeps the children and takes the new metadata (mode, owner, mtime and the
//!   xattrs, which are replaced as a whole).
//! - **Parents**: the parent path of an entry is resolved in the tree as built so far.
//!   A symlink met on the way is followed, inside the view's root (`..` stops at the
//!   root, an absolute target starts from it), as the applier's `RootPath` does: with
//!   `bin -> usr/bin` from a base layer, a later `bin/sh` lands in `usr/bin`. Missing
//!   directories are created with mode 0755, owner 0:0 and mtime 0. A non-directory in
//!   the way (a file, device, fifo) is replaced by such a directory. An entry whose
//!   parent path crosses more than [`MAX_SYMLINKS`] symlinks is skipped.
//! - **Hard links** name an existing inode: the target path is resolved in the tree as
//!   built so far (the layer's earlier entries over the lower layers, with the layer's
//!   whiteouts already applied), its final
//!   component not followed, like `link(2)`. Both names share the inode; the link
//!   entry's mode, owner and mtime are applied to it and its xattrs added (as the applier
//!   does on the new name). A link whose target is missing or a directory is skipped with
//!   a warning. `nlink` counts the names a file has in the final view.
//! - **Root entries** (an archive's `./`) are ignored: the root stays 0755 and
//!   root-owned, as with containerd (a layer built from a 0700 temporary directory would
//!   otherwise lock non-root users out of `/`).
//! - **Kept verbatim**: symlink targets (absolute, relative, dangling: never resolved when
//!   serving), device numbers (as `rdev`, see [`makedev`]), permission bits with setuid,
//!   setgid and sticky, uid and gid (an id above `u32::MAX` becomes 65534, the kernel's
//!   overflow id), mtime with nanoseconds, xattrs (`security.capability` included).
//! - **Guards**: an entry path with an empty, `.` or `..` component or a NUL byte is
//!   skipped with a warning (the index builder already rejects `..`), so no such name
//!   can be in the view. [`ViewLimits`] bound the work and memory: the entry count, and the
//!   work of following symlinks (a target longer than `PATH_MAX` is not followed).
//!
//! Skipped entries are counted in [`ViewStats::skipped_entries`] and logged with
//! `tracing::warn!` (the first 100 of a build; later ones at debug level, with a
//! summary).

mod build;
mod names;
#[cfg(test)]
mod tests;

use imgd_core::index::{Entry, LayerIndex};
use std::collections::BTreeMap;
use std::sync::Arc;

/// An inode number of the view; FUSE inode numbers map to it 1:1.
pub type Ino = u64;

/// One entry of a directory: its name (raw bytes) and inode number.
pub type DirEntry = (Box<[u8]>, Ino);

/// The root directory's inode number.
pub const ROOT_INO: Ino = 1;

/// Most symlinks followed while resolving one entry's parent path (Linux's `MAXSYMLINKS`).
pub const MAX_SYMLINKS: u32 = 40;

/// Limits protecting the builder from hostile or absurd images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewLimits {
    /// Most tar entries over all layers, and most nodes (entries plus implicit
    /// directories, replaced ones included) the builder creates. Default 4 million.
    pub max_entries: u64,
    /// Most path components taken from symlink targets while resolving the parents of
    /// all entries (a symlink in a parent path costs its target's components). Bounds
    /// the work a hostile chain of long symlinks can cause. Default 16 Mi; a usual image
    /// needs a few per entry under a symlinked directory (`bin -> usr/bin`).
    pub max_symlink_steps: u64,
}

impl Default for ViewLimits {
    fn default() -> Self {
        ViewLimits {
            max_entries: 4_000_000,
            max_symlink_steps: 16 << 20,
        }
    }
}

/// Error building a view.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViewError {
    /// The image has more entries than [`ViewLimits::max_entries`].
    #[error(
        "image too large for a view: more than {limit} entries (tar entries of all layers, \
         or nodes including implicit directories); raise ViewLimits::max_entries to mount it"
    )]
    TooManyEntries {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// Resolving parent paths through symlinks took more than
    /// [`ViewLimits::max_symlink_steps`] steps.
    #[error(
        "image too costly for a view: resolving paths through symlinks took more than \
         {limit} steps; raise ViewLimits::max_symlink_steps to mount it"
    )]
    TooManySymlinkSteps {
        /// The limit that was exceeded.
        limit: u64,
    },
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory; `children` is sorted by name (bytewise) and has no duplicates.
    Dir {
        /// The entries, without `.` and `..`.
        children: Vec<DirEntry>,
    },
    /// A regular file whose content is entry `entry` of layer `layer` (an
    /// [`EntryKind::File`](imgd_core::index::EntryKind::File) entry, also for hard links).
    File {
        /// Index of the layer, bottom first.
        layer: usize,
        /// Index into that layer's `entries`.
        entry: usize,
        /// Logical size in bytes (holes of sparse files included).
        size: u64,
    },
    /// A symbolic link; `target` as written in the archive, never resolved.
    Symlink {
        /// The link target, raw bytes.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// Device number, see [`makedev`].
        rdev: u64,
    },
    /// A block device.
    BlockDevice {
        /// Device number, see [`makedev`].
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
}

/// One inode of the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Its inode number.
    pub ino: Ino,
    /// What it is.
    pub kind: NodeKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`); the file
    /// type is in `kind` (see [`Node::st_mode`]).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time (below 10^9).
    pub mtime_nsec: u32,
    /// Number of names: 2 plus the subdirectories for a directory, the number of hard
    /// links otherwise.
    pub nlink: u32,
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The directory holding it (one of them for a hard-linked file); the root's is
    /// itself.
    pub parent: Ino,
}

const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;
const S_IFDIR: u32 = 0o040000;
const S_IFBLK: u32 = 0o060000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Node {
    /// `st_mode`: the file type bits with the permission bits.
    pub fn st_mode(&self) -> u32 {
        let ty = match self.kind {
            NodeKind::Dir { .. } => S_IFDIR,
            NodeKind::File { .. } => S_IFREG,
            NodeKind::Symlink { .. } => S_IFLNK,
            NodeKind::CharDevice { .. } => S_IFCHR,
            NodeKind::BlockDevice { .. } => S_IFBLK,
            NodeKind::Fifo => S_IFIFO,
        };
        ty | (self.mode & 0o7777)
    }

    /// `st_size`: a file's logical size, a symlink's target length, 0 otherwise.
    pub fn size(&self) -> u64 {
        match &self.kind {
            NodeKind::File { size, .. } => *size,
            NodeKind::Symlink { target } => target.len() as u64,
            _ => 0,
        }
    }

    /// `st_rdev`: the device number of a device, 0 otherwise.
    pub fn rdev(&self) -> u64 {
        match self.kind {
            NodeKind::CharDevice { rdev } | NodeKind::BlockDevice { rdev } => rdev,
            _ => 0,
        }
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// A device number from major and minor, in glibc's `makedev` encoding (the same as
/// `libc::makedev` on Linux).
pub fn makedev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

/// Counts over the final view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Regular files (inodes, not names).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Character and block devices.
    pub devices: u64,
    /// Named pipes.
    pub fifos: u64,
    /// Names beyond the first of hard-linked inodes.
    pub extra_links: u64,
    /// Sum of the logical sizes of the regular files, each inode once.
    pub total_file_bytes: u64,
    /// Entries left out of the view (see the module docs), with a warning logged each.
    pub skipped_entries: u64,
}

/// The merged view of an image's layers. Immutable once built; share it with `Arc`.
#[derive(Debug)]
pub struct ImageView {
    layers: Arc<Vec<LayerIndex>>,
    /// `nodes[ino - 1]` is inode `ino`.
    nodes: Vec<Node>,
    stats: ViewStats,
}

impl ImageView {
    /// Merges `layers` (bottom first) into a view, following the rules of the module
    /// docs. Runs in O(entries × log(entries per directory)).
    pub fn build(layers: Arc<Vec<LayerIndex>>, limits: ViewLimits) -> Result<Self, ViewError> {
        let (nodes, stats) = build::build(&layers, limits)?;
        Ok(ImageView {
            layers,
            nodes,
            stats,
        })
    }

    /// The root directory's inode number, [`ROOT_INO`].
    pub fn root(&self) -> Ino {
        ROOT_INO
    }

    /// Number of inodes; they are numbered `1..=inode_count()`.
    pub fn inode_count(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// The node with inode number `ino`.
    pub fn node(&self, ino: Ino) -> Option<&Node> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.get(i)
    }

    /// The sorted entries of directory `dir`, or `None` if it is not a directory.
    /// Positions in this slice are stable, so they can serve as `readdir` offsets.
    pub fn dir_entries(&self, dir: Ino) -> Option<&[DirEntry]> {
        match &self.node(dir)?.kind {
            NodeKind::Dir { children } => Some(children),
            _ => None,
        }
    }

    /// The entry `name` of directory `parent` (binary search: O(log n)).
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let children = self.dir_entries(parent)?;
        let i = children.binary_search_by(|(n, _)| (**n).cmp(name)).ok()?;
        Some(children[i].1)
    }

    /// The entries of directory `dir` sorted by name (nothing if it is not one).
    pub fn children(&self, dir: Ino) -> impl Iterator<Item = (&[u8], Ino)> + '_ {
        self.dir_entries(dir)
            .unwrap_or_default()
            .iter()
            .map(|(n, i)| (&**n, *i))
    }

    /// The node at `path` (components separated by `/`; leading, repeated and trailing
    /// `/` and `.` components ignored; `..` goes up, stopping at the root). Symlinks are
    /// not followed.
    pub fn resolve_path(&self, path: &[u8]) -> Option<Ino> {
        let mut cur = ROOT_INO;
        for comp in path.split(|&b| b == b'/') {
            cur = match comp {
                b"" | b"." => cur,
                b".." => self.node(cur)?.parent,
                name => self.lookup(cur, name)?,
            };
        }
        Some(cur)
    }

    /// What to read for regular file `ino`: the layer number and its
    /// [`EntryKind::File`](imgd_core::index::EntryKind::File) entry (for a hard link, the
    /// entry that wrote the content). Pass them with [`layer`](Self::layer) to
    /// `imgd_core::index::read_file`. `None` if `ino` is not a regular file.
    pub fn file_source(&self, ino: Ino) -> Option<(usize, &Entry)> {
        match self.node(ino)?.kind {
            NodeKind::File { layer, entry, .. } => {
                Some((layer, self.layers.get(layer)?.entries.get(entry)?))
            }
            _ => None,
        }
    }

    /// Layer `layer`'s index (bottom first).
    pub fn layer(&self, layer: usize) -> Option<&LayerIndex> {
        self.layers.get(layer)
    }

    /// All layer indexes, bottom first (the same `Arc` the view was built from).
    pub fn layers(&self) -> &Arc<Vec<LayerIndex>> {
        &self.layers
    }

    /// Counts over the view.
    pub fn stats(&self) -> ViewStats {
        self.stats
    }
}
