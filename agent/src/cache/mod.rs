//! The agent's verified chunk cache.
//!
//! # Layout
//!
//! Under the cache directory `DIR`:
//! - `DIR/chunks/<hex[0..2]>/<hex>`: chunk files in a [`ContentStore`] (kind `chunks`),
//!   staged in `DIR/tmp/chunks` and renamed into place after an fsync;
//! - `DIR/meta`: a RocksDB [`MetaDb`] with the tables of [`tables`]: `chunks`, `blobs`,
//!   `images`, `pins`;
//! - `DIR/inflated`: layers' inflated tar streams, written by the mount processes
//!   ([`imgd_fuse::inflated`]), counted against the quota by [`inflated`].
//!
//! # Policies
//!
//! - **Verification.** Only verified chunks are stored: [`ChunkCache::put_chunk`] takes
//!   a [`VerifiedChunk`], which only the code that hashed the bytes (the client that
//!   received them) can make, so a put does not hash again. Every read from disk is
//!   hashed again ([`ChunkCache::get_chunk`], which so gives a `VerifiedChunk` too). A
//!   chunk that fails on read, or whose file vanished, is removed (file and row) with a
//!   warning and reported absent: the cache heals.
//! - **Crash consistency.** A chunk's file is committed (fsync, rename, directory fsync)
//!   before its row is written; eviction deletes the row before the file. So after
//!   `kill -9` the only possible damage is a file without a row (an *orphan*) or leftover
//!   temp files. [`ChunkCache::open`] removes temp files (via [`ContentStore::open`]),
//!   deletes rows whose file is missing or has the wrong length, and **adopts** orphans
//!   that verify (they are whole: files only appear by rename) as least recently used, so
//!   an orphan left by an interrupted eviction is the next to go; orphans that do not
//!   verify are deleted. [`ChunkCache::gc`] does the same at run time.
//! - **Quota** (soft), for chunks and inflated layers together. After a put takes the
//!   cache above its quota (and at every [`ChunkCache::enforce_quota`], which the agent
//!   runs every few seconds because mount processes add inflated data on their own),
//!   inflated layers that no mount uses are evicted whole, least recently used first
//!   (they are rebuilt from chunks without the network), then chunks, least recently used
//!   first, down to the low-water mark of 90% of the quota. Chunks of
//!   blobs of pinned images and of protected (mounted) blobs are never evicted, nor is the
//!   chunk just stored. If only such chunks remain the cache stays above its quota: the
//!   put still succeeds and a warning is logged (an image being mounted must be able to
//!   finish). Nothing is evicted at open, before the agent has re-protected its mounts.
//!   Each put evicts before it returns, so the cache exceeds its quota by at most one
//!   chunk per concurrent put (plus what is unevictable); [`ChunkCache::peak_used_bytes`]
//!   keeps the high-water mark so that bound can be checked.
//! - **Access times** are ticks of a logical clock kept in memory and written to the
//!   `chunks` rows in batches (once 1024 chunks have unsaved ticks, at [`ChunkCache::gc`],
//!   on [`ChunkCache::flush_access`] and on drop). A crash loses only some recency.
//! - **Full disk.** ENOSPC while storing gives [`CacheError::DiskFull`]; the staged temp
//!   file is deleted and a committed file whose row could not be written is removed.
//!
//! The cache is `Send + Sync`; every method takes `&self` and blocks on disk I/O, so
//! async code should call it from `spawn_blocking`.

mod error;
mod eviction;
mod images;
mod index;
pub mod inflated;
mod locks;
mod repair;
pub mod tables;
#[cfg(test)]
mod tests;

pub use error::CacheError;
pub use eviction::EvictReport;
pub use repair::{GcReport, RepairReport, VerifyReport};
pub use tables::{ChunkMeta, ImageRecord, PinRecord};

use imgd_core::store::{ContentStore, MetaDb, StoreError};
use imgd_core::{Digest, VerifiedChunk, CHUNK_SIZE};
use index::Index;
use locks::{lock, Stripes};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use tables::{unix_now, Chunks, TABLES};

/// A verified, quota-bounded cache of 4 MiB chunks with blob, image and pin metadata.
pub struct ChunkCache {
    dir: PathBuf,
    store: ContentStore,
    meta: MetaDb,
    quota: u64,
    index: Mutex<Index>,
    stripes: Stripes,
    /// Held for a whole eviction run; guards the protected blobs (digest -> count).
    eviction: Mutex<HashMap<Digest, usize>>,
    /// Disk bytes of inflated layers as of the last scan ([`inflated`]).
    inflated_bytes: AtomicU64,
    open_report: RepairReport,
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir` with a quota of `quota_bytes` for chunk data,
    /// and repairs what a crash may have left (see the module docs).
    pub fn open(dir: &Path, quota_bytes: u64) -> Result<ChunkCache, CacheError> {
        let staged = ContentStore::staged_files(dir, "chunks");
        let store =
            ContentStore::open(dir, "chunks").map_err(|e| CacheError::store("opening", e))?;
        let meta =
            MetaDb::open(&dir.join("meta"), &TABLES).map_err(|e| CacheError::meta("opening", e))?;
        let rows = meta.scan::<Chunks>()?;
        let mut cache = ChunkCache {
            dir: dir.to_path_buf(),
            store,
            meta,
            quota: quota_bytes,
            index: Mutex::new(Index::from_rows(rows)),
            stripes: Stripes::new(),
            eviction: Mutex::new(HashMap::new()),
            inflated_bytes: AtomicU64::new(0),
            open_report: RepairReport::default(),
        };
        cache.scan_inflated()?;
        cache.open_report = RepairReport {
            staged_removed: staged,
            ..cache.reconcile()?
        };
        if !cache.open_report.is_clean() {
            tracing::warn!(dir = %dir.display(), report = ?cache.open_report, "chunk cache repaired at open");
        }
        Ok(cache)
    }

    /// The agent's metadata database, for tables of other components (the snapshotter's).
    pub fn meta(&self) -> &MetaDb {
        &self.meta
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What [`ChunkCache::open`] repaired.
    pub fn open_report(&self) -> &RepairReport {
        &self.open_report
    }

    /// The quota for chunk data, in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// The level eviction brings the cache down to: 90% of the quota.
    pub fn low_water(&self) -> u64 {
        self.quota - self.quota / 10
    }

    /// Bytes of chunk data stored (sum of chunk sizes, not of disk blocks).
    pub fn used_bytes(&self) -> u64 {
        self.index().used()
    }

    /// The most chunk data ever stored at once since open (a high-water mark of
    /// [`ChunkCache::used_bytes`], exact: taken at every insert).
    pub fn peak_used_bytes(&self) -> u64 {
        self.index().peak()
    }

    /// Number of chunks stored.
    pub fn chunk_count(&self) -> usize {
        self.index().len()
    }

    /// True if the chunk is recorded as stored. Not verified: [`ChunkCache::get_chunk`]
    /// may still find it damaged (and then remove it).
    pub fn has_chunk(&self, digest: &Digest) -> bool {
        self.index().contains(digest)
    }

    /// The chunk's record, if stored.
    pub fn chunk_meta(&self, digest: &Digest) -> Option<ChunkMeta> {
        self.index().get(digest)
    }

    /// Stores a chunk; idempotent. The chunk was verified by whoever received it (the
    /// type is the proof), so it is not hashed again here. Then, if the cache (chunks
    /// and inflated layers) is above its quota, evicts down to the low-water mark
    /// (never this chunk). A failure of that eviction is logged, not returned: the
    /// chunk is stored.
    pub fn put_chunk(&self, chunk: &VerifiedChunk) -> Result<(), CacheError> {
        let digest = chunk.digest();
        if chunk.len() > CHUNK_SIZE {
            return Err(CacheError::ChunkTooLarge {
                digest: *digest,
                size: chunk.len(),
            });
        }
        self.store_verified(digest, chunk.bytes())?;
        if self.used_bytes() + self.inflated_bytes() > self.quota {
            if let Err(e) = self.make_room(Some(digest)) {
                tracing::warn!(error = %e, "chunk cache eviction failed");
            }
        }
        Ok(())
    }

    /// Stores bytes already checked to hash to `digest`: file first, then row, then the
    /// index entry, all under the digest's stripe lock.
    fn store_verified(&self, digest: &Digest, bytes: &[u8]) -> Result<(), CacheError> {
        let _stripe = self.stripes.lock(digest);
        if self.index().contains(digest) {
            if self.store.size(digest) == Some(bytes.len() as u64) {
                self.touch(digest)?;
                return Ok(());
            }
            tracing::warn!(%digest, "cached chunk file missing or truncated; storing it again");
            self.forget(digest)?;
        }
        // A file without a row is an orphan of unknown state: replace it with these bytes.
        self.store
            .remove(digest)
            .map_err(|e| CacheError::store("removing an orphan chunk", e))?;
        self.store
            .put(*digest, bytes)
            .map_err(|e| CacheError::store("storing a chunk", e))?;
        let meta = ChunkMeta {
            // At most CHUNK_SIZE, checked by put_chunk.
            size: bytes.len() as u32,
            last_access: self.index().tick(),
            stored_at: unix_now(),
        };
        if let Err(e) = self.meta.put::<Chunks>(digest, &meta) {
            if let Err(rm) = self.store.remove(digest) {
                tracing::warn!(%digest, error = %rm, "could not remove a chunk file left without a row");
            }
            return Err(CacheError::meta("recording a chunk", e));
        }
        self.index().insert(*digest, meta);
        Ok(())
    }

    /// The chunk, read from disk and verified against `digest` (disks rot: every read
    /// is checked), or `None` if it is not cached. A chunk whose file is damaged or gone
    /// is removed and reported as `None`.
    pub fn get_chunk(&self, digest: &Digest) -> Result<Option<VerifiedChunk>, CacheError> {
        if !self.has_chunk(digest) {
            return Ok(None);
        }
        let read = match self.store.read(digest) {
            Ok(bytes) => VerifiedChunk::check(*digest, bytes).ok(),
            Err(StoreError::Missing(_)) => None,
            Err(e) => return Err(CacheError::store("reading a chunk", e)),
        };
        match read {
            Some(chunk) => {
                self.touch(digest)?;
                Ok(Some(chunk))
            }
            None => {
                self.heal(digest)?;
                Ok(None)
            }
        }
    }

    /// Removes a chunk found damaged, if it still is once its stripe is locked (a
    /// concurrent eviction or re-store may have settled it meanwhile). True if removed.
    fn heal(&self, digest: &Digest) -> Result<bool, CacheError> {
        let _stripe = self.stripes.lock(digest);
        if !self.index().contains(digest) {
            return Ok(false);
        }
        match self.store.read_verified(digest) {
            Ok(_) => Ok(false),
            Err(e @ (StoreError::Missing(_) | StoreError::Corrupt { .. })) => {
                if matches!(e, StoreError::Corrupt { .. }) {
                    crate::metrics::verification_failed("cache");
                }
                tracing::warn!(%digest, error = %e, "removing damaged chunk from the cache");
                self.forget(digest)?;
                Ok(true)
            }
            Err(e) => Err(CacheError::store("reading a chunk", e)),
        }
    }

    /// Removes a chunk: index entry, then row, then file. The caller holds its stripe.
    fn forget(&self, digest: &Digest) -> Result<(), CacheError> {
        self.index().remove(digest);
        self.meta
            .delete::<Chunks>(digest)
            .map_err(|e| CacheError::meta("removing a chunk row", e))?;
        self.store
            .remove(digest)
            .map_err(|e| CacheError::store("removing a chunk file", e))
    }

    /// Marks a chunk as just used, writing pending access ticks once there are many.
    fn touch(&self, digest: &Digest) -> Result<(), CacheError> {
        let mut index = self.index();
        if index.touch(digest) && index.dirty_len() >= index::FLUSH_EVERY {
            index
                .flush(&self.meta)
                .map_err(|e| CacheError::meta("saving access times", e))?;
        }
        Ok(())
    }

    /// Writes pending access ticks to the database now.
    pub fn flush_access(&self) -> Result<(), CacheError> {
        self.index()
            .flush(&self.meta)
            .map(drop)
            .map_err(|e| CacheError::meta("saving access times", e))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }
}

impl Drop for ChunkCache {
    fn drop(&mut self) {
        if let Err(e) = self.flush_access() {
            tracing::warn!(error = %e, "could not save chunk access times");
        }
    }
}
