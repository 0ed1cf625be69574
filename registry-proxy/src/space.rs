//! Storage space: the quota, LRU eviction and pins, kept in step with the files on disk.
//!
//! Every change to the committed chunk and index files goes through [`Space`], under one
//! lock over the [`Ledger`]: an ingest reserves each file's bytes before staging it
//! (evicting least recently used blobs to make room), and commits its files and records
//! together; an eviction deletes a blob's records first, in one synced batch, then the
//! files nothing else uses. A `kill -9` between the two leaves only unreferenced files,
//! which are deleted at the next start. So the files on disk never outgrow the quota,
//! and the records never name a missing file.
//!
//! Never evicted: blobs being ingested (not recorded yet; the stored files they reuse are
//! held by their claim), blobs being served (leased), and pinned blobs and manifests.
//! An image manifest goes with any blob it lists, an index with its last listed
//! manifest, and tags with the manifest they name.

use crate::ledger::{Claim, FileKind, Freed, Ledger, SpaceUse};
use crate::storage::{
    Access, BlobIndexes, Blobs, Manifests, SeekableCopies, Storage, StorageError, Tags,
};
use imgd_core::store::{Staging, StoreError, Table};
use imgd_core::wire::IndexState;
use imgd_core::{ChunkList, Digest};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When each blob was last asked for, in ms since the Unix epoch (LRU order across
/// restarts). Written at commit and then at most once a minute per blob.
pub struct LastUsed;
impl Table for LastUsed {
    const NAME: &'static str = "last_used";
    type Key = Digest;
    type Value = u64;
}

/// How stale a persisted last-use time may get before it is written again.
const LAST_USED_PERSIST_MS: u64 = 60_000;

/// Errors of space management.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("storage quota of {quota} bytes exceeded: {needed} more bytes needed, and everything stored is pinned or in use")]
    QuotaExceeded { quota: u64, needed: u64 },
}

impl From<StoreError> for SpaceError {
    fn from(e: StoreError) -> Self {
        SpaceError::Storage(e.into())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Inner {
    ledger: Ledger,
    /// What each stored manifest lists: blobs (image) or manifests (index).
    manifests: HashMap<Digest, Vec<Digest>>,
}

/// The space manager. Its methods block (file and database I/O): call them off the
/// async threads, except [`Space::lease`] and [`Space::usage`].
pub struct Space {
    storage: Arc<Storage>,
    inner: Mutex<Inner>,
    /// Test hook: a pause between an eviction's records and its files.
    eviction_pause: Option<Duration>,
}

fn refs_of(m: &crate::storage::StoredManifest) -> Vec<Digest> {
    let limits = imgd_core::manifest::ManifestLimits {
        max_bytes: usize::MAX,
        ..Default::default()
    };
    match imgd_core::manifest::parse(&m.bytes, Some(&m.media_type), &limits) {
        Ok(imgd_core::manifest::Manifest::Image(i)) => std::iter::once(i.config.digest)
            .chain(i.layers.iter().map(|l| l.digest))
            .collect(),
        Ok(imgd_core::manifest::Manifest::Index(i)) => {
            i.manifests.iter().map(|m| m.digest).collect()
        }
        Err(_) => Vec::new(),
    }
}

/// The chunk files a blob holds: its own, and those of its seekable copy if it has one.
fn chunk_refs(list: &ChunkList, copy: Option<&ChunkList>) -> Vec<(Digest, u64)> {
    list.chunks
        .iter()
        .chain(copy.into_iter().flat_map(|c| c.chunks.iter()))
        .map(|c| (c.digest, u64::from(c.size)))
        .collect()
}

fn index_ref(state: &IndexState) -> Option<(Digest, u64)> {
    match state {
        IndexState::Indexed { digest, size } => Some((*digest, *size)),
        IndexState::Unavailable { .. } => None,
    }
}

impl Space {
    /// Loads the ledger from storage and deletes content files no record refers to (left
    /// by a crash mid-ingest or mid-eviction). `quota`: `None` for unlimited.
    pub fn open(
        storage: Arc<Storage>,
        quota: Option<u64>,
        eviction_pause: Option<Duration>,
    ) -> Result<Space, StorageError> {
        let mut ledger = Ledger::new(quota);
        let indexes: HashMap<Digest, IndexState> =
            storage.meta.scan::<BlobIndexes>()?.into_iter().collect();
        let used: HashMap<Digest, u64> = storage.meta.scan::<LastUsed>()?.into_iter().collect();
        let copies: HashMap<Digest, ChunkList> =
            storage.meta.scan::<SeekableCopies>()?.into_iter().collect();
        for (digest, list) in storage.meta.scan::<Blobs>()? {
            let index = indexes.get(&digest).and_then(index_ref);
            let last = used.get(&digest).copied().unwrap_or(0);
            let refs = chunk_refs(&list, copies.get(&digest));
            ledger.add_blob(digest, &refs, index, last);
        }
        let mut manifests = HashMap::new();
        for (digest, m) in storage.meta.scan::<Manifests>()? {
            manifests.insert(digest, refs_of(&m));
        }
        let mut probe = Claim::default();
        let mut removed = 0u64;
        for (kind, store) in [
            (FileKind::Chunk, &storage.chunks),
            (FileKind::Index, &storage.indexes),
        ] {
            for d in store.list()? {
                if ledger.reuse(&mut probe, kind, d) {
                    continue;
                }
                store.remove(&d)?;
                removed += 1;
            }
        }
        // The probe took a reference on every file; give them back.
        let freed = ledger.abort(probe);
        debug_assert_eq!(freed, Freed::default());
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed content files no record refers to (left by a crash)"
            );
        }
        Ok(Space {
            storage,
            inner: Mutex::new(Inner { ledger, manifests }),
            eviction_pause,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The storage this space manages.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The storage this space manages, shared.
    pub fn storage_arc(&self) -> Arc<Storage> {
        self.storage.clone()
    }

    /// Current use, quota and evictions.
    pub fn usage(&self) -> SpaceUse {
        self.lock().ledger.usage()
    }

    /// Evicts least recently used blobs until `bytes` more fit.
    fn make_room(&self, inner: &mut Inner, bytes: u64) -> Result<(), SpaceError> {
        while !inner.ledger.fits(bytes) {
            let Some(victim) = inner.ledger.victim() else {
                let quota = inner.ledger.usage().quota.unwrap_or(u64::MAX);
                return Err(SpaceError::QuotaExceeded {
                    quota,
                    needed: bytes,
                });
            };
            self.evict(inner, victim)?;
        }
        Ok(())
    }

    /// Reserves `bytes` for a file the claim is about to write, evicting to make room.
    pub fn reserve(&self, guard: &mut ClaimGuard, bytes: u64) -> Result<(), SpaceError> {
        let Some(claim) = guard.claim.as_mut() else {
            return Ok(());
        };
        let mut inner = self.lock();
        self.make_room(&mut inner, bytes)?;
        inner.ledger.reserve_bytes(claim, bytes);
        Ok(())
    }

    /// Gives back `bytes` reserved with [`Space::reserve`] for a scratch file the claim
    /// has deleted.
    pub fn release(&self, guard: &mut ClaimGuard, bytes: u64) {
        if let Some(claim) = guard.claim.as_mut() {
            self.lock().ledger.unreserve_bytes(claim, bytes);
        }
    }

    /// Evicts one blob: records first (one synced batch), then files.
    fn evict(&self, inner: &mut Inner, victim: Digest) -> Result<(), SpaceError> {
        let ledger = &inner.ledger;
        let mut gone: HashSet<Digest> = inner
            .manifests
            .iter()
            .filter(|(m, refs)| refs.contains(&victim) && !ledger.is_pinned(m))
            .map(|(m, _)| *m)
            .collect();
        loop {
            let more: Vec<Digest> = inner
                .manifests
                .iter()
                .filter(|(m, refs)| {
                    !gone.contains(m)
                        && !ledger.is_pinned(m)
                        && !refs.is_empty()
                        && refs
                            .iter()
                            .all(|r| gone.contains(r) || !inner.manifests.contains_key(r))
                        && refs.iter().any(|r| gone.contains(r))
                })
                .map(|(m, _)| *m)
                .collect();
            if more.is_empty() {
                break;
            }
            gone.extend(more);
        }
        let meta = &self.storage.meta;
        let mut batch = meta.batch();
        batch.delete::<Blobs>(&victim).map_err(StorageError::from)?;
        batch
            .delete::<BlobIndexes>(&victim)
            .map_err(StorageError::from)?;
        batch
            .delete::<SeekableCopies>(&victim)
            .map_err(StorageError::from)?;
        batch
            .delete::<LastUsed>(&victim)
            .map_err(StorageError::from)?;
        for m in &gone {
            batch.delete::<Manifests>(m).map_err(StorageError::from)?;
        }
        if !gone.is_empty() {
            for (tag, d) in meta.scan::<Tags>().map_err(StorageError::from)? {
                if gone.contains(&d) {
                    batch.delete::<Tags>(&tag).map_err(StorageError::from)?;
                }
            }
        }
        meta.write(batch).map_err(StorageError::from)?;
        for m in &gone {
            inner.manifests.remove(m);
        }
        let freed = inner.ledger.remove_blob(&victim);
        if let Some(pause) = self.eviction_pause {
            tracing::warn!(%victim, ?pause, "eviction paused between records and files (test hook)");
            std::thread::sleep(pause);
        }
        self.delete_files(&freed)?;
        inner.ledger.count_eviction(freed.bytes);
        tracing::info!(blob = %victim, bytes = freed.bytes, manifests = gone.len(), "evicted");
        Ok(())
    }

    fn delete_files(&self, freed: &Freed) -> Result<(), SpaceError> {
        for c in &freed.chunks {
            self.storage.chunks.remove(c)?;
        }
        for i in &freed.indexes {
            self.storage.indexes.remove(i)?;
        }
        Ok(())
    }

    /// Starts the bookkeeping of one ingest.
    pub fn claim(self: &Arc<Self>) -> ClaimGuard {
        ClaimGuard {
            space: self.clone(),
            claim: Some(Claim::default()),
        }
    }

    /// Stages one content file for the claim: a stored copy is reused (and held), else
    /// room is made and the bytes are written to a synced temp file.
    pub fn stage(
        &self,
        guard: &mut ClaimGuard,
        staging: &mut Staging<'_>,
        kind: FileKind,
        digest: Digest,
        bytes: &[u8],
    ) -> Result<(), SpaceError> {
        self.stage_parts(guard, staging, kind, digest, &[bytes])
    }

    /// [`Space::stage`] of the concatenation of `parts` (an index's main part and its
    /// windows), written one after the other rather than joined in memory.
    pub fn stage_parts(
        &self,
        guard: &mut ClaimGuard,
        staging: &mut Staging<'_>,
        kind: FileKind,
        digest: Digest,
        parts: &[&[u8]],
    ) -> Result<(), SpaceError> {
        let Some(claim) = guard.claim.as_mut() else {
            return Ok(());
        };
        let size: u64 = parts.iter().map(|p| p.len() as u64).sum();
        // Bounded: each retry means the file was committed and evicted in between.
        for _ in 0..4 {
            {
                let mut inner = self.lock();
                if inner.ledger.reuse(claim, kind, digest) {
                    return Ok(());
                }
                self.make_room(&mut inner, size)?;
                inner.ledger.reserve(claim, digest, size);
            }
            let before = staging.len();
            staging.add_parts(digest, parts)?;
            if staging.len() > before {
                return Ok(());
            }
            // Already there: another ingest committed it meanwhile. Hold that copy.
            let mut inner = self.lock();
            inner.ledger.unreserve(claim, &digest, size);
            if inner.ledger.reuse(claim, kind, digest) {
                return Ok(());
            }
        }
        Err(SpaceError::Storage(StorageError::Store(
            StoreError::Missing(digest),
        )))
    }

    /// Stages a content file the claim has written already (a temp file of the store of
    /// `staging`, hashed to `digest`, its bytes reserved with [`Space::reserve`] before it
    /// was written): a stored copy is reused (and held) instead, and `file` deleted.
    pub fn stage_file(
        &self,
        guard: &mut ClaimGuard,
        staging: &mut Staging<'_>,
        kind: FileKind,
        digest: Digest,
        file: tempfile::NamedTempFile,
    ) -> Result<(), SpaceError> {
        let Some(claim) = guard.claim.as_mut() else {
            return Ok(());
        };
        if self.lock().ledger.reuse(claim, kind, digest) {
            return Ok(());
        }
        // Not recorded: if a copy is on disk all the same (committed and evicted around
        // now), the rename at commit replaces it with the same bytes.
        staging.add_file(digest, file)?;
        Ok(())
    }

    /// Commits an ingest: the staged files go into place and the blob's records are
    /// written in one batch (with the [`Access`] record `access_key`, and the chunk list
    /// of the layer's seekable copy `copy`, whose chunks the blob then holds), all under
    /// the lock.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        mut guard: ClaimGuard,
        chunk_files: Vec<(PathBuf, Digest)>,
        staged: Vec<Staging<'_>>,
        list: &ChunkList,
        index: &IndexState,
        copy: Option<&ChunkList>,
        access_key: &str,
    ) -> Result<(), SpaceError> {
        let Some(claim) = guard.claim.take() else {
            return Ok(());
        };
        let mut inner = self.lock();
        let written = (|| -> Result<(), SpaceError> {
            self.place_chunks(&inner, &chunk_files)?;
            for s in staged {
                s.commit()?;
            }
            let now = now_ms();
            let mut batch = self.storage.meta.batch();
            batch
                .put::<Blobs>(&list.blob, list)
                .map_err(StorageError::from)?;
            batch
                .put::<BlobIndexes>(&list.blob, index)
                .map_err(StorageError::from)?;
            if let Some(copy) = copy {
                batch
                    .put::<SeekableCopies>(&list.blob, copy)
                    .map_err(StorageError::from)?;
            }
            batch
                .put::<LastUsed>(&list.blob, &now)
                .map_err(StorageError::from)?;
            batch
                .put::<Access>(&access_key.to_string(), &true)
                .map_err(StorageError::from)?;
            self.storage.meta.write(batch).map_err(StorageError::from)?;
            Ok(())
        })();
        let freed = match written {
            Ok(()) => inner.ledger.commit(
                claim,
                list.blob,
                &chunk_refs(list, copy),
                index_ref(index),
                now_ms(),
            ),
            Err(e) => {
                // Files may have been renamed into place: they have no record, so they
                // are unreferenced and go at the next start.
                for (p, _) in &chunk_files {
                    let _ = std::fs::remove_file(p);
                }
                let freed = inner.ledger.abort(claim);
                let _ = self.delete_files(&freed);
                return Err(e);
            }
        };
        self.delete_files(&freed)
    }

    /// Renames spooled chunk files into the store (under the lock): a chunk the store
    /// has already (another blob's, or an earlier one of this blob) is dropped instead.
    fn place_chunks(&self, inner: &Inner, files: &[(PathBuf, Digest)]) -> Result<(), SpaceError> {
        let _ = inner;
        let mut dirs: Vec<PathBuf> = Vec::new();
        let io = |op: &'static str, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| SpaceError::from(StoreError::Io { op, path, source })
        };
        for (tmp, digest) in files {
            let dest = self.storage.chunks.path(digest);
            if dest.is_file() {
                std::fs::remove_file(tmp).map_err(io("remove", tmp))?;
                continue;
            }
            let Some(dir) = dest.parent().map(std::path::Path::to_path_buf) else {
                continue;
            };
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            std::fs::rename(tmp, &dest).map_err(io("rename into", &dest))?;
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for dir in dirs {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync", &dir))?;
        }
        Ok(())
    }

    /// Leases a stored blob for one response (never evicted while leased); `None` if it
    /// is not stored (e.g. just evicted). Records the use for LRU.
    pub fn lease(self: &Arc<Self>, digest: &Digest) -> Option<Lease> {
        let now = now_ms();
        let before = {
            let mut inner = self.lock();
            let before = inner.ledger.last_used(digest)?;
            inner.ledger.lease(digest, now);
            before
        };
        if now.saturating_sub(before) > LAST_USED_PERSIST_MS {
            if let Err(e) = self.storage.meta.put::<LastUsed>(digest, &now) {
                tracing::warn!(%digest, error = %e, "could not record the blob's last use");
            }
        }
        Some(Lease {
            space: self.clone(),
            digest: *digest,
        })
    }

    /// Records a stored manifest (so it goes when its content is evicted).
    pub fn note_manifest(&self, digest: Digest, m: &crate::storage::StoredManifest) {
        let refs = refs_of(m);
        self.lock().manifests.insert(digest, refs);
    }

    /// Replaces the pinned set.
    pub fn set_pinned(&self, pinned: HashSet<Digest>) {
        self.lock().ledger.set_pinned(pinned);
    }
}

/// One ingest's claim; dropped without [`Space::commit`], it gives everything back.
pub struct ClaimGuard {
    space: Arc<Space>,
    claim: Option<Claim>,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            let mut inner = self.space.lock();
            let freed = inner.ledger.abort(claim);
            if let Err(e) = self.space.delete_files(&freed) {
                tracing::warn!(error = %e, "could not delete files of an abandoned ingest");
            }
        }
    }
}

/// A response being served from a blob; the blob is not evicted until it is dropped.
pub struct Lease {
    space: Arc<Space>,
    digest: Digest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.space.lock().ledger.release(&self.digest);
    }
}
