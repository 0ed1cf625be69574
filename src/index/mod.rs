//! The seekable layer index: what it holds, how it is built while a blob streams, and
//! how a byte range of a layer's tar stream is read back from checkpoints and chunks.

pub mod format;

pub use format::{
    Checkpoint, Compression, Entry, EntryKind, IndexDecodeError, LayerIndex, SparseExtent,
    INDEX_VERSION,
};
