//! OCI images built on the spot, deterministically: the same specs always give the same
//! tar bytes, blobs and digests.
//!
//! Describe files with [`FileSpec`], layers with [`LayerSpec`], images with [`ImageSpec`],
//! then write an OCI image layout with [`build_layout`] (one manifest per image) or
//! [`build_index_layout`] (an OCI image index over several platform manifests).
//! [`presets`] has ready-made images.

mod content;
mod layer;
mod layout;
pub mod merge_cases;
pub mod presets;
mod zstd_chunked;
mod zstd_copy;

pub use content::{Content, SplitMix64};
pub use layer::{write_layer_tar, LayerInfo};
pub use layout::{
    build_index_layout, build_layout, BlobInfo, ImageInfo, IndexInfo, LayoutInfo, LayoutWriter,
};
pub use zstd_chunked::zstd_chunked_copy;
pub use zstd_copy::{zstd_copy, zstd_copy_with, OCI_LAYER_ZSTD};

/// The mtime of entries unless set otherwise (2023-11-14T22:13:20Z).
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// What a tar entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File(Content),
    /// A directory.
    Dir,
    /// A symbolic link to `target` (stored as is).
    Symlink(String),
    /// A hard link to `target`, a path of an earlier entry of the same layer.
    Hardlink(String),
    /// A named pipe.
    Fifo,
    /// A character device.
    CharDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A whiteout deleting `path` from lower layers: written as `dir/.wh.name`.
    Whiteout,
    /// An opaque whiteout hiding the lower layers' content of directory `path`: written as
    /// `path/.wh..wh..opq`.
    OpaqueWhiteout,
}

/// One tar entry: path (relative, no leading `/`), kind and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Path in the image, e.g. `usr/bin/tool`. For whiteouts, the path being deleted.
    pub path: String,
    /// The entry's kind (and content for regular files).
    pub kind: EntryKind,
    /// Permission bits (and setuid/setgid/sticky), e.g. `0o755`.
    pub mode: u32,
    /// Owner user id.
    pub uid: u64,
    /// Owner group id.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes (name such as `user.foo`, value), written as PAX
    /// `SCHILY.xattr.<name>` records before the entry.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl FileSpec {
    /// An entry of `kind` at `path` with the default mode for its kind, root ownership and
    /// [`DEFAULT_MTIME`].
    pub fn new(path: impl Into<String>, kind: EntryKind) -> Self {
        let mode = match kind {
            EntryKind::Dir => 0o755,
            EntryKind::Symlink(_) => 0o777,
            EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => 0o666,
            _ => 0o644,
        };
        FileSpec {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
        }
    }

    /// A regular file with exactly `bytes`.
    pub fn file(path: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        FileSpec::new(path, EntryKind::File(Content::Bytes(bytes.into())))
    }

    /// A regular file of `len` incompressible pseudo-random bytes from `seed`.
    pub fn random(path: impl Into<String>, seed: u64, len: u64) -> Self {
        FileSpec::new(path, EntryKind::File(Content::Random { seed, len }))
    }

    /// A regular file of `len` pseudo-random but compressible (~2-3x) bytes from `seed`.
    pub fn compressible(path: impl Into<String>, seed: u64, len: u64) -> Self {
        FileSpec::new(path, EntryKind::File(Content::Compressible { seed, len }))
    }

    /// A directory.
    pub fn dir(path: impl Into<String>) -> Self {
        FileSpec::new(path, EntryKind::Dir)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        FileSpec::new(path, EntryKind::Symlink(target.into()))
    }

    /// A hard link at `path` to the earlier entry `target` of the same layer.
    pub fn hardlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        FileSpec::new(path, EntryKind::Hardlink(target.into()))
    }

    /// A named pipe.
    pub fn fifo(path: impl Into<String>) -> Self {
        FileSpec::new(path, EntryKind::Fifo)
    }

    /// A character device `major:minor`.
    pub fn char_device(path: impl Into<String>, major: u32, minor: u32) -> Self {
        FileSpec::new(path, EntryKind::CharDevice { major, minor })
    }

    /// A block device `major:minor`.
    pub fn block_device(path: impl Into<String>, major: u32, minor: u32) -> Self {
        FileSpec::new(path, EntryKind::BlockDevice { major, minor })
    }

    /// A whiteout deleting `path` (written as `.wh.<name>` beside it).
    pub fn whiteout(path: impl Into<String>) -> Self {
        FileSpec::new(path, EntryKind::Whiteout)
    }

    /// An opaque whiteout for directory `dir` (written as `dir/.wh..wh..opq`).
    pub fn opaque_whiteout(dir: impl Into<String>) -> Self {
        FileSpec::new(dir, EntryKind::OpaqueWhiteout)
    }

    /// The same entry with permission bits `mode`.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// The same entry owned by `uid:gid`.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// The same entry with modification time `mtime` (seconds since the epoch).
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    /// The same entry with one more extended attribute.
    pub fn xattr(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.xattrs.push((name.into(), value.into()));
        self
    }

    /// The path the entry has inside the tar: `path`, except for whiteouts.
    pub fn tar_path(&self) -> String {
        let path = self.path.trim_matches('/');
        match self.kind {
            EntryKind::Whiteout => match path.rsplit_once('/') {
                Some((dir, name)) => format!("{dir}/.wh.{name}"),
                None => format!(".wh.{path}"),
            },
            EntryKind::OpaqueWhiteout if path.is_empty() => ".wh..wh..opq".to_owned(),
            EntryKind::OpaqueWhiteout => format!("{path}/.wh..wh..opq"),
            _ => path.to_owned(),
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
    /// None (`application/vnd.oci.image.layer.v1.tar`).
    Uncompressed,
}

/// A layer: its entries in order, and its compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// The tar entries, written in this order.
    pub files: Vec<FileSpec>,
    /// The blob's compression.
    pub compression: Compression,
}

impl LayerSpec {
    /// A gzip-compressed layer.
    pub fn gzip(files: Vec<FileSpec>) -> Self {
        LayerSpec {
            files,
            compression: Compression::Gzip,
        }
    }

    /// An uncompressed layer.
    pub fn uncompressed(files: Vec<FileSpec>) -> Self {
        LayerSpec {
            files,
            compression: Compression::Uncompressed,
        }
    }
}

/// An image's platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// GOARCH-style architecture: `amd64`, `arm64`, ...
    pub architecture: String,
    /// GOOS-style operating system: `linux`.
    pub os: String,
    /// Optional variant, e.g. `v8` for arm64.
    pub variant: Option<String>,
}

impl Platform {
    /// linux/amd64.
    pub fn linux_amd64() -> Self {
        Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        }
    }

    /// linux/arm64/v8.
    pub fn linux_arm64() -> Self {
        Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        }
    }
}

/// An image: the name it gets in the layout (`org.opencontainers.image.ref.name`, used as
/// `oci:DIR:NAME`), its layers bottom to top, platform and command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Reference name in the layout's `index.json`, e.g. `small` or `v1`.
    pub name: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerSpec>,
    /// Platform recorded in the config (and in an image index).
    pub platform: Platform,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
}

impl ImageSpec {
    /// A linux/amd64 image running `/bin/sh`.
    pub fn new(name: impl Into<String>, layers: Vec<LayerSpec>) -> Self {
        ImageSpec {
            name: name.into(),
            layers,
            platform: Platform::linux_amd64(),
            cmd: vec!["/bin/sh".into()],
        }
    }

    /// The same image under another name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The same image for another platform.
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }
}
