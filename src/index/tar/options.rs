//! What the scanner accepts ([`TarOptions`]) and how it fails ([`TarError`]).

/// Limits that keep the scanner's memory bounded, and what it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TarOptions {
    /// Maximum number of entries in one archive (default 500 000).
    pub max_entries: usize,
    /// Maximum size of one PAX header, GNU long name/link or sparse map (default 1 MiB).
    pub max_meta_size: usize,
    /// Maximum length in bytes of an entry path or link target, after normalisation
    /// (default 4096, Linux's `PATH_MAX`).
    pub max_path_len: usize,
    /// Whether character and block device entries are accepted (default true: OCI
    /// layers may carry them and runtimes create them when unpacking as root).
    pub allow_devices: bool,
}

/// Default of [`TarOptions::max_entries`].
pub const DEFAULT_MAX_ENTRIES: usize = 500_000;
/// Default of [`TarOptions::max_meta_size`].
pub const DEFAULT_MAX_META_SIZE: usize = 1 << 20;
/// Default of [`TarOptions::max_path_len`].
pub const DEFAULT_MAX_PATH_LEN: usize = 4096;

impl Default for TarOptions {
    fn default() -> Self {
        TarOptions {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_meta_size: DEFAULT_MAX_META_SIZE,
            max_path_len: DEFAULT_MAX_PATH_LEN,
            allow_devices: true,
        }
    }
}

/// Errors of tar parsing; offsets are in the uncompressed tar stream.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    /// A header's checksum does not match.
    #[error("tar header checksum mismatch at offset {offset}")]
    BadChecksum { offset: u64 },
    /// A numeric field could not be parsed.
    #[error("invalid {field} field in tar header at offset {offset}")]
    BadNumber { offset: u64, field: &'static str },
    /// A path escapes the root with a `..` component.
    #[error(
        "unsafe path {path:?} in tar entry at offset {offset}: '..' components are not allowed"
    )]
    UnsafePath { offset: u64, path: String },
    /// Too many entries.
    #[error("tar archive has more than {limit} entries")]
    TooManyEntries { limit: usize },
    /// A path or link target longer than the limit.
    #[error(
        "{what} of {len} bytes in tar entry at offset {offset} exceeds the limit of {limit} bytes"
    )]
    PathTooLong {
        offset: u64,
        what: &'static str,
        len: usize,
        limit: usize,
    },
    /// A hard link to a directory, or to an entry that only comes later in the archive.
    #[error("hard link {path:?} at offset {offset} names {target:?}, {reason}")]
    BadHardlink {
        offset: u64,
        path: String,
        target: String,
        reason: &'static str,
    },
    /// A device node while [`TarOptions::allow_devices`] is off.
    #[error("device node {path:?} at offset {offset} is not allowed")]
    DeviceNode { offset: u64, path: String },
    /// An extended header, long name or sparse map exceeds the limit.
    #[error("tar metadata of {size} bytes at offset {offset} exceeds the limit of {limit} bytes")]
    MetaTooLarge {
        offset: u64,
        size: u64,
        limit: usize,
    },
    /// A malformed PAX extended header.
    #[error("malformed PAX header at offset {offset}: {reason}")]
    BadPax { offset: u64, reason: String },
    /// A malformed or inconsistent sparse map.
    #[error("malformed sparse map at offset {offset}: {reason}")]
    BadSparse { offset: u64, reason: String },
    /// An entry type this scanner does not handle.
    #[error("unsupported tar entry type {typeflag:?} at offset {offset}")]
    UnsupportedType { offset: u64, typeflag: char },
    /// Some other malformed header.
    #[error("malformed tar header at offset {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    /// The stream ended in the middle of something.
    #[error("tar stream truncated at offset {offset}: ended inside {what}")]
    Truncated { offset: u64, what: &'static str },
}
