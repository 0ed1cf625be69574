//! The seekable layer index: what it holds, how it is built while a blob streams, and
//! how a byte range of a layer's tar stream is read back from checkpoints and chunks.

pub mod builder;
pub mod format;
pub mod gzip;
pub mod options;
pub mod reader;
pub mod tar;
mod validate;
pub mod window_sink;
pub mod zstd;
pub mod zstd_chunked;
pub mod zstd_copy;
pub mod zstd_frames;
pub mod zstd_layer;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod windows_tests;
#[cfg(test)]
pub(crate) mod zstd_chunked_tests;

pub use builder::{
    index_blob, index_blob_with_copy, BuiltIndex, IndexBuilder, IndexError, IndexOptions,
};
pub use format::{
    Checkpoint, Compression, Entry, EntryKind, IndexDecodeError, LayerIndex, SparseExtent,
    WindowRef, INDEX_VERSION,
};
pub use gzip::{CheckpointingInflater, GzipError, RatioLimit};
pub use reader::{
    plan_read, read_file, read_file_via, read_range, read_stored, read_stored_with, span_of,
    ReadError, ReadPlan,
};
pub use tar::{TarError, TarOptions, TarScanner};
pub use window_sink::WindowSink;
pub use zstd::{ZstdError, ZstdInflater, ZstdLimits};
pub use zstd_chunked::{TocBinding, ZstdChunkedError};
pub use zstd_copy::{CopyChunk, CopyWriter, SeekableCopy};
