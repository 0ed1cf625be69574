//! [`IndexOptions`]: the limits that bound what a hostile layer can cost, and
//! [`IndexError`], which tells a hostile layer (refused) from a malformed one.

use crate::index::format::{Checkpoint, Entry};
use crate::index::gzip::{GzipError, RatioLimit, DEFAULT_COMPRESSED_SPAN, DEFAULT_SPAN};
use crate::index::tar::{
    TarError, TarOptions, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_META_SIZE, DEFAULT_MAX_PATH_LEN,
};
use crate::index::zstd::{ZstdError, ZstdLimits, DEFAULT_MAX_FRAMES, DEFAULT_MAX_WINDOW_LOG};
use crate::index::zstd_chunked::ZstdChunkedError;
use serde::Deserialize;

/// Options of an [`IndexBuilder`](crate::index::IndexBuilder): the checkpoint spacing and the limits that bound the
/// work and memory a hostile layer can cost. Deserialisable (every field optional) so
/// that daemons can expose them in their configuration files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexOptions {
    /// Largest uncompressed distance between gzip checkpoints (default 4 MiB).
    pub checkpoint_span: u64,
    /// Largest compressed distance between gzip checkpoints (default 256 KiB): what a read
    /// fetches at most before the bytes it wants. Each checkpoint costs its window (about
    /// 14 KB, fetched only by reads that restart there) and 45 bytes of the main part. A checkpoint is also placed after every
    /// crossing of a chunk boundary in the compressed blob.
    pub checkpoint_compressed_span: u64,
    /// Maximum number of tar entries in one layer (default 500 000).
    pub max_entries: usize,
    /// Maximum length of an entry path or link target in bytes (default 4096).
    pub max_path_len: usize,
    /// Maximum size of one PAX header, GNU long name or sparse map (default 1 MiB).
    pub max_meta_size: usize,
    /// Whether device nodes are accepted (default true).
    pub allow_devices: bool,
    /// Maximum size of the encoded index, both parts, in bytes (default 256 MiB).
    pub max_index_bytes: u64,
    /// Maximum uncompressed / compressed size ratio of a gzip or zstd layer (default 500;
    /// deflate cannot exceed about 1032), checked at every 256 KiB of output...
    pub max_inflate_ratio: u64,
    /// ...once more than this many bytes came out (default 4 GiB), so that layers with
    /// large runs of zeros pass (a 600 MiB file of zeros compresses about 1000 times).
    pub inflate_ratio_slack: u64,
    /// Largest window a zstd frame may need, as a power of two (default 27: 128 MiB).
    pub max_zstd_window_log: u32,
    /// Maximum number of frames in a zstd layer (default 2 000 000).
    pub max_zstd_frames: u64,
    /// Largest zstd:chunked TOC, compressed or not, in bytes (default 64 MiB); a layer
    /// with a larger one is not indexed.
    pub max_zstd_toc_bytes: u64,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            checkpoint_span: DEFAULT_SPAN,
            checkpoint_compressed_span: DEFAULT_COMPRESSED_SPAN,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_path_len: DEFAULT_MAX_PATH_LEN,
            max_meta_size: DEFAULT_MAX_META_SIZE,
            allow_devices: true,
            max_index_bytes: 256 << 20,
            max_inflate_ratio: 500,
            inflate_ratio_slack: 4 << 30,
            max_zstd_window_log: DEFAULT_MAX_WINDOW_LOG,
            max_zstd_frames: DEFAULT_MAX_FRAMES,
            max_zstd_toc_bytes: 64 << 20,
        }
    }
}

impl IndexOptions {
    /// The tar scanner's part of the options.
    pub fn tar(&self) -> TarOptions {
        TarOptions {
            max_entries: self.max_entries,
            max_meta_size: self.max_meta_size,
            max_path_len: self.max_path_len,
            allow_devices: self.allow_devices,
        }
    }

    /// The inflater's ratio limit.
    pub fn ratio_limit(&self) -> RatioLimit {
        RatioLimit {
            max_ratio: self.max_inflate_ratio,
            slack: self.inflate_ratio_slack,
        }
    }

    /// The zstd decoder's limits.
    pub fn zstd_limits(&self) -> ZstdLimits {
        ZstdLimits {
            max_window_log: self.max_zstd_window_log,
            max_frames: self.max_zstd_frames,
            ratio: Some(self.ratio_limit()),
        }
    }
}

/// Error building an index.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// The gzip stream is invalid.
    #[error("layer is not valid gzip: {0}")]
    Gzip(#[from] GzipError),
    /// The zstd stream is invalid, breaks a limit, or its copy could not be written.
    #[error("layer is not valid zstd: {0}")]
    Zstd(#[from] ZstdError),
    /// The layer's zstd:chunked TOC disagrees with its stream, or is too large or
    /// unreadable: the layer is not indexed (not hostile: the blob is still served).
    #[error("layer is not a valid zstd:chunked layer: {0}")]
    ZstdChunked(#[from] ZstdChunkedError),
    /// The tar stream is invalid.
    #[error("layer is not a valid tar archive: {0}")]
    Tar(#[from] TarError),
    /// The index would exceed [`IndexOptions::max_index_bytes`].
    #[error("layer index of {size} bytes (or more) exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
}

impl IndexError {
    /// Whether the layer broke a limit or a safety rule (a hostile layer, to be refused),
    /// rather than being no tar layer at all (a config blob, an unsupported format).
    pub fn is_hostile(&self) -> bool {
        match self {
            IndexError::Gzip(g) => matches!(g, GzipError::RatioExceeded { .. }),
            IndexError::Tar(t) => matches!(
                t,
                TarError::UnsafePath { .. }
                    | TarError::TooManyEntries { .. }
                    | TarError::MetaTooLarge { .. }
                    | TarError::PathTooLong { .. }
                    | TarError::BadHardlink { .. }
                    | TarError::DeviceNode { .. }
            ),
            IndexError::Zstd(z) => z.is_hostile(),
            IndexError::ZstdChunked(_) => false,
            IndexError::TooLarge { .. } => true,
        }
    }
}

/// A lower bound of the encoded size of what was indexed so far, kept as entries and
/// checkpoints arrive so that [`IndexOptions::max_index_bytes`] is enforced early.
#[derive(Default)]
pub(crate) struct SizeFloor {
    pub bytes: u64,
    entries: usize,
    checkpoints: usize,
    windows: u64,
}

impl SizeFloor {
    pub fn add(&mut self, entries: &[Entry], checkpoints: &[Checkpoint], windows: u64) {
        for e in entries.get(self.entries..).unwrap_or_default() {
            let link = e.link_target.as_ref().map_or(0, Vec::len);
            let xattrs: usize = e.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
            self.bytes += (e.path.len() + link + xattrs) as u64 + 13;
        }
        let new = checkpoints.len().saturating_sub(self.checkpoints);
        self.bytes += new as u64 * 4 + (windows - self.windows.min(windows));
        self.windows = windows;
        self.entries = entries.len();
        self.checkpoints = checkpoints.len();
    }
}
