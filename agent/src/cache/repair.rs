//! Consistency between chunk files and chunk rows: repair at open and gc, full
//! verification.

use super::tables::{unix_now, ChunkMeta, Chunks};
use super::{CacheError, ChunkCache};
use imgd_core::store::StoreError;
use imgd_core::{Digest, CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// What a repair pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Rows deleted because their chunk file was missing.
    pub rows_without_file: u64,
    /// Chunks (row and file) removed because the file's length did not match the row, or
    /// (in [`ChunkCache::verify_and_repair`]) its content did not match its digest.
    pub damaged_removed: u64,
    /// Files without a row that verified and were recorded (as least recently used).
    pub orphans_adopted: u64,
    /// Files without a row that did not verify and were deleted.
    pub orphans_removed: u64,
    /// Staged (temp) chunk files deleted: only at open, where a crash may leave them.
    #[serde(default)]
    pub staged_removed: u64,
}

impl RepairReport {
    /// True when nothing needed repair.
    pub fn is_clean(&self) -> bool {
        *self == RepairReport::default()
    }
}

/// Outcome of [`ChunkCache::gc`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Chunks evicted.
    pub evicted_chunks: u64,
    /// Bytes of chunk data evicted.
    pub freed_bytes: u64,
    /// Bytes of chunk data stored afterwards.
    pub used_bytes: u64,
    /// Bytes above the low-water mark that could not be evicted (pinned or protected).
    pub unevictable_excess: u64,
    /// What the consistency repair changed.
    pub repair: RepairReport,
}

/// Outcome of [`ChunkCache::verify_all`]: every chunk file re-hashed and cross-checked
/// against the `chunks` rows. Exact only on a cache without concurrent writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Chunks with both a row and a file, re-hashed.
    pub checked: u64,
    /// Of those, chunks whose file does not hash to its digest or has the wrong length.
    pub bad: Vec<Digest>,
    /// Rows without a file.
    pub missing: Vec<Digest>,
    /// Files without a row.
    pub orphans: Vec<Digest>,
}

impl VerifyReport {
    /// True when every row has a whole, verified file and every file a row.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.missing.is_empty() && self.orphans.is_empty()
    }
}

/// What happened to a file without a row.
enum Adoption {
    Adopted,
    Removed,
    Gone,
}

impl ChunkCache {
    /// Runs the consistency repair (as at open), saves access times, then evicts down to
    /// the low-water mark.
    pub fn gc(&self) -> Result<GcReport, CacheError> {
        let repair = self.reconcile()?;
        self.flush_access()?;
        let evicted = self.evict_to(self.low_water())?;
        Ok(GcReport {
            evicted_chunks: evicted.evicted_chunks,
            freed_bytes: evicted.freed_bytes,
            used_bytes: evicted.used_bytes,
            unevictable_excess: evicted.unevictable_excess,
            repair,
        })
    }

    /// Re-hashes every chunk file and cross-checks files and rows. Changes nothing.
    pub fn verify_all(&self) -> Result<VerifyReport, CacheError> {
        let rows: HashMap<Digest, ChunkMeta> = self.meta.scan::<Chunks>()?.into_iter().collect();
        let files = self.store.list()?;
        let on_disk: HashSet<Digest> = files.iter().copied().collect();
        let mut report = VerifyReport::default();
        for d in files {
            let Some(row) = rows.get(&d) else {
                report.orphans.push(d);
                continue;
            };
            report.checked += 1;
            match self.store.read_verified(&d) {
                Ok(bytes) if bytes.len() as u64 == u64::from(row.size) => {}
                Ok(_) | Err(StoreError::Corrupt { .. }) => report.bad.push(d),
                Err(StoreError::Missing(_)) => report.missing.push(d),
                Err(e) => return Err(CacheError::store("verifying a chunk", e)),
            }
        }
        report
            .missing
            .extend(rows.keys().filter(|d| !on_disk.contains(d)).copied());
        for v in [&mut report.bad, &mut report.missing, &mut report.orphans] {
            v.sort_unstable();
        }
        Ok(report)
    }

    /// [`ChunkCache::verify_all`], then removes the bad chunks and repairs the rest as
    /// [`ChunkCache::gc`] does (without evicting). Returns what was found and what was
    /// done.
    pub fn verify_and_repair(&self) -> Result<(VerifyReport, RepairReport), CacheError> {
        let found = self.verify_all()?;
        let mut removed = 0;
        for d in &found.bad {
            if self.heal(d)? {
                removed += 1;
            }
        }
        let mut repair = self.reconcile()?;
        repair.damaged_removed += removed;
        Ok((found, repair))
    }

    /// Deletes rows whose file is missing or of the wrong length, and adopts or deletes
    /// files without a row. Each digest is settled under its stripe lock, so this is safe
    /// while chunks are being stored.
    pub(super) fn reconcile(&self) -> Result<RepairReport, CacheError> {
        let mut report = RepairReport::default();
        // Collect first: a guard in the `for` expression would live through the loop.
        let digests = self.index().digests();
        for d in digests {
            let _stripe = self.stripes.lock(&d);
            let Some(row) = self.index().get(&d) else {
                continue;
            };
            match self.store.size(&d) {
                Some(n) if n == u64::from(row.size) => {}
                None => {
                    tracing::warn!(digest = %d, "chunk row without a file; removing the row");
                    self.forget(&d)?;
                    report.rows_without_file += 1;
                }
                Some(n) => {
                    tracing::warn!(digest = %d, len = n, size = row.size, "chunk file of the wrong length; removing");
                    self.forget(&d)?;
                    report.damaged_removed += 1;
                }
            }
        }
        for d in self.store.list()? {
            let _stripe = self.stripes.lock(&d);
            if self.index().contains(&d) {
                continue;
            }
            match self.adopt(&d)? {
                Adoption::Adopted => report.orphans_adopted += 1,
                Adoption::Removed => report.orphans_removed += 1,
                Adoption::Gone => {}
            }
        }
        Ok(report)
    }

    /// Records a file without a row if it verifies (with the oldest access tick, so it
    /// is the first to be evicted unless used), or deletes it. The caller holds the
    /// digest's stripe.
    fn adopt(&self, d: &Digest) -> Result<Adoption, CacheError> {
        let Some(len) = self.store.size(d) else {
            return Ok(Adoption::Gone);
        };
        let verified = if len > CHUNK_SIZE as u64 {
            None
        } else {
            match self.store.read_verified(d) {
                Ok(bytes) => Some(bytes.len()),
                Err(StoreError::Missing(_)) => return Ok(Adoption::Gone),
                Err(StoreError::Corrupt { .. }) => None,
                Err(e) => return Err(CacheError::store("verifying an orphan chunk", e)),
            }
        };
        let Some(size) = verified else {
            tracing::warn!(digest = %d, "deleting an unrecorded chunk file that does not verify");
            self.store
                .remove(d)
                .map_err(|e| CacheError::store("removing an orphan chunk", e))?;
            return Ok(Adoption::Removed);
        };
        let meta = ChunkMeta {
            // At most CHUNK_SIZE, checked above.
            size: size as u32,
            last_access: 0,
            stored_at: unix_now(),
        };
        self.meta
            .put::<Chunks>(d, &meta)
            .map_err(|e| CacheError::meta("adopting an orphan chunk", e))?;
        self.index().insert(*d, meta);
        Ok(Adoption::Adopted)
    }
}
