//! The proxy's storage: chunk and index files plus their RocksDB tables.

use imgd_core::store::{ContentStore, MetaDb, MetaError, StoreError, Table};
use imgd_core::wire::IndexState;
use imgd_core::{ChunkList, Digest};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Chunk list of each stored blob, by blob digest. Present only when every chunk is.
pub struct Blobs;
impl Table for Blobs {
    const NAME: &'static str = "blobs";
    type Key = Digest;
    type Value = ChunkList;
}

/// Index state of each stored blob, by blob digest.
pub struct BlobIndexes;
impl Table for BlobIndexes {
    const NAME: &'static str = "indexes";
    type Key = Digest;
    type Value = IndexState;
}

/// The chunk list of the seekable copy of each stored zstd layer, by layer digest. The
/// copy's chunks belong to the layer: stored, counted, pinned and evicted with it.
pub struct SeekableCopies;
impl Table for SeekableCopies {
    const NAME: &'static str = "seekable_copies";
    type Key = Digest;
    type Value = ChunkList;
}

/// A verified manifest, by its digest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredManifest {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// Manifests by digest.
pub struct Manifests;
impl Table for Manifests {
    const NAME: &'static str = "manifests";
    type Key = Digest;
    type Value = StoredManifest;
}

/// Last digest seen for `UPSTREAM/REPO:TAG`, used only when upstream is unreachable.
pub struct Tags;
impl Table for Tags {
    const NAME: &'static str = "tags";
    type Key = String;
    type Value = Digest;
}

/// Learned startup traces, by image manifest digest.
pub struct Traces;
impl Table for Traces {
    const NAME: &'static str = "traces";
    type Key = Digest;
    type Value = imgd_core::wire::StartupTrace;
}

/// Which `UPSTREAM/REPO` each blob and manifest is known to belong to, keyed
/// `DIGEST@UPSTREAM/REPO` (see [`crate::access`]).
pub struct Access;
impl Table for Access {
    const NAME: &'static str = "access";
    type Key = String;
    type Value = bool;
}

/// Errors of the proxy's storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Everything the proxy keeps on disk.
pub struct Storage {
    /// The storage directory.
    pub dir: PathBuf,
    pub chunks: ContentStore,
    pub indexes: ContentStore,
    pub meta: MetaDb,
}

impl Storage {
    /// Opens (creating) the storage under `dir`.
    pub fn open(dir: &Path) -> Result<Storage, StorageError> {
        Ok(Storage {
            dir: dir.to_path_buf(),
            chunks: ContentStore::open(dir, "chunks")?,
            indexes: ContentStore::open(dir, "indexes")?,
            meta: MetaDb::open(
                &dir.join("meta"),
                &[
                    Blobs::NAME,
                    BlobIndexes::NAME,
                    SeekableCopies::NAME,
                    Manifests::NAME,
                    Tags::NAME,
                    Traces::NAME,
                    Access::NAME,
                    crate::refusals::Refused::NAME,
                    crate::space::LastUsed::NAME,
                    crate::pins::Pins::NAME,
                ],
            )?,
        })
    }

    /// The chunk list of a stored blob, if stored.
    pub fn blob(&self, digest: &Digest) -> Result<Option<ChunkList>, StorageError> {
        Ok(self.meta.get::<Blobs>(digest)?)
    }
}
