//! Errors of the chunk cache.

use imgd_core::chunk::ChunkListError;
use imgd_core::store::{MetaError, StoreError};
use imgd_core::Digest;

/// Errors of [`ChunkCache`](super::ChunkCache) operations.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A chunk larger than [`CHUNK_SIZE`](imgd_core::CHUNK_SIZE) was offered.
    #[error("chunk {digest} rejected: {size} bytes is more than the 4 MiB chunk size")]
    ChunkTooLarge { digest: Digest, size: usize },
    /// The device holding the cache is full. Nothing partial was left behind.
    #[error("no space left on the cache device while {op}: {source}")]
    DiskFull {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A chunk list that does not describe a valid blob layout.
    #[error(transparent)]
    InvalidChunkList(#[from] ChunkListError),
    /// An image reference that cannot be a key (empty).
    #[error("invalid image reference {0:?}")]
    InvalidReference(String),
    /// Any other error of the chunk files.
    #[error("chunk store: {0}")]
    Store(#[source] StoreError),
    /// Any other error of the metadata database.
    #[error("cache metadata: {0}")]
    Meta(#[source] MetaError),
    /// An error of the inflated layers' files.
    #[error("inflated layers: {op}: {source}")]
    Inflated {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    /// True for [`CacheError::DiskFull`].
    pub fn is_disk_full(&self) -> bool {
        matches!(self, CacheError::DiskFull { .. })
    }

    /// An I/O error of the inflated layers met while doing `op`.
    pub(crate) fn io(op: &'static str, source: std::io::Error) -> CacheError {
        CacheError::Inflated { op, source }
    }

    /// Classifies a content-store error met while doing `op`.
    pub(crate) fn store(op: &'static str, e: StoreError) -> CacheError {
        if e.is_disk_full() {
            CacheError::DiskFull {
                op,
                source: Box::new(e),
            }
        } else {
            CacheError::Store(e)
        }
    }

    /// Classifies a metadata error met while doing `op`. RocksDB reports ENOSPC only in
    /// its message ("IO error: No space left on device").
    pub(crate) fn meta(op: &'static str, e: MetaError) -> CacheError {
        if e.to_string().contains("No space left on device") {
            CacheError::DiskFull {
                op,
                source: Box::new(e),
            }
        } else {
            CacheError::Meta(e)
        }
    }
}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        CacheError::store("accessing chunk files", e)
    }
}

impl From<MetaError> for CacheError {
    fn from(e: MetaError) -> Self {
        CacheError::meta("writing cache metadata", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::PathBuf;

    #[test]
    fn enospc_is_classified_as_disk_full() {
        let full = StoreError::Io {
            op: "write",
            path: PathBuf::from("/x"),
            source: io::Error::from_raw_os_error(28),
        };
        assert!(CacheError::from(full).is_disk_full());
        let other = StoreError::Io {
            op: "write",
            path: PathBuf::from("/x"),
            source: io::Error::from_raw_os_error(5),
        };
        assert!(matches!(CacheError::from(other), CacheError::Store(_)));
    }
}
