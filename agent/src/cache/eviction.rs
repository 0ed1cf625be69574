//! Quota enforcement: LRU eviction that spares pinned and protected blobs' chunks.

use super::locks::lock;
use super::tables::{Blobs, Chunks, Images, Pins};
use super::{CacheError, ChunkCache};
use imgd_core::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Chunks removed per synced metadata batch.
const BATCH: usize = 64;

/// Outcome of an eviction run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictReport {
    /// Chunks removed.
    pub evicted_chunks: u64,
    /// Bytes of chunk data removed.
    pub freed_bytes: u64,
    /// Bytes of chunk data stored after the run.
    pub used_bytes: u64,
    /// The level the run aimed for.
    pub target_bytes: u64,
    /// Bytes still above the target because every chunk left is pinned, protected or was
    /// just stored (0 when the target was reached).
    pub unevictable_excess: u64,
    /// Inflated layers removed, and the disk bytes they took (see [`super::inflated`]).
    #[serde(default)]
    pub evicted_inflated_layers: u64,
    #[serde(default)]
    pub freed_inflated_bytes: u64,
}

impl ChunkCache {
    /// Evicts least recently used chunks until at most `target_bytes` of chunk data is
    /// stored, sparing chunks of pinned images' blobs and of protected blobs.
    pub fn evict_to(&self, target_bytes: u64) -> Result<EvictReport, CacheError> {
        self.evict_keeping(target_bytes, None)
    }

    /// Evicts inflated layers no mount uses, then chunks (sparing `keep`), until chunks
    /// and inflated data together are at most the low-water mark.
    pub(super) fn make_room(&self, keep: Option<&Digest>) -> Result<EvictReport, CacheError> {
        let low = self.low_water();
        let inflated = self.evict_inflated(low, &super::inflated::protected(self))?;
        let target = low.saturating_sub(self.inflated_bytes());
        let mut report = self.evict_keeping(target, keep)?;
        report.evicted_inflated_layers = inflated.layers;
        report.freed_inflated_bytes = inflated.freed_bytes;
        Ok(report)
    }

    /// [`ChunkCache::evict_to`], also sparing `keep`.
    pub(super) fn evict_keeping(
        &self,
        target: u64,
        keep: Option<&Digest>,
    ) -> Result<EvictReport, CacheError> {
        let protected = lock(&self.eviction);
        let mut report = EvictReport {
            target_bytes: target,
            ..EvictReport::default()
        };
        if self.used_bytes() > target {
            let spared = self.spared_chunks(&protected)?;
            let mut candidates = self
                .index()
                .lru_order()
                .into_iter()
                .filter(|(d, _)| !spared.contains(d) && Some(d) != keep);
            loop {
                let used = self.used_bytes();
                if used <= target {
                    break;
                }
                let mut need = used - target;
                let mut batch = Vec::new();
                while need > 0 && batch.len() < BATCH {
                    let Some((d, m)) = candidates.next() else {
                        break;
                    };
                    need = need.saturating_sub(u64::from(m.size));
                    batch.push(d);
                }
                if batch.is_empty() {
                    break;
                }
                let (chunks, bytes) = self.evict_batch(&batch)?;
                crate::metrics::evicted(chunks, bytes);
                report.evicted_chunks += chunks;
                report.freed_bytes += bytes;
            }
        }
        report.used_bytes = self.used_bytes();
        report.unevictable_excess = report.used_bytes.saturating_sub(target);
        if report.unevictable_excess > 0 {
            tracing::warn!(
                used = report.used_bytes,
                target,
                "chunk cache stays above its target: the rest is pinned or in use"
            );
        }
        Ok(report)
    }

    /// Removes the chunks of `batch` still recorded: index entries, then rows (one synced
    /// batch), then files. Returns the chunks and bytes removed. A file that cannot be
    /// removed is left as an orphan for the next gc or open.
    fn evict_batch(&self, batch: &[Digest]) -> Result<(u64, u64), CacheError> {
        let _stripes = self.stripes.lock_many(batch);
        let removed: Vec<(Digest, u64)> = {
            let mut index = self.index();
            batch
                .iter()
                .filter_map(|d| index.remove(d).map(|m| (*d, u64::from(m.size))))
                .collect()
        };
        let mut rows = self.meta.batch();
        for (d, _) in &removed {
            rows.delete::<Chunks>(d)?;
        }
        self.meta
            .write(rows)
            .map_err(|e| CacheError::meta("evicting chunks", e))?;
        for (d, _) in &removed {
            if let Err(e) = self.store.remove(d) {
                tracing::warn!(digest = %d, error = %e, "could not remove an evicted chunk file");
            }
        }
        let bytes = removed.iter().map(|(_, n)| n).sum();
        Ok((removed.len() as u64, bytes))
    }

    /// Chunks that must not be evicted: those of the blobs of pinned images and of
    /// protected blobs, as far as the `blobs` table knows their chunk lists.
    fn spared_chunks(
        &self,
        protected: &HashMap<Digest, usize>,
    ) -> Result<HashSet<Digest>, CacheError> {
        let mut blobs: HashSet<Digest> = protected.keys().copied().collect();
        for (reference, _) in self.meta.scan::<Pins>()? {
            if let Some(image) = self.meta.get::<Images>(&reference)? {
                blobs.extend(image.blobs());
            }
        }
        let mut chunks = HashSet::new();
        for blob in blobs {
            if let Some(list) = self.meta.get::<Blobs>(&blob)? {
                chunks.extend(list.chunks.iter().map(|c| c.digest));
            }
        }
        Ok(chunks)
    }

    /// Protects the chunks of `blobs` from eviction until a matching
    /// [`ChunkCache::unprotect`] (counted: protecting twice needs two unprotects). Not
    /// persisted: the agent protects the blobs of mounted images again after a restart.
    ///
    /// Protection goes through the blob's chunk list, so record it with
    /// [`ChunkCache::put_blob`] before fetching the chunks. Once this returns, no
    /// eviction (even one already running) removes a chunk of these blobs.
    pub fn protect(&self, blobs: &[Digest]) {
        let mut protected = lock(&self.eviction);
        for b in blobs {
            *protected.entry(*b).or_default() += 1;
        }
    }

    /// Undoes one [`ChunkCache::protect`] of each of `blobs` (unknown ones are ignored).
    pub fn unprotect(&self, blobs: &[Digest]) {
        let mut protected = lock(&self.eviction);
        for b in blobs {
            if let Some(n) = protected.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    protected.remove(b);
                }
            }
        }
    }

    /// The blobs currently protected, in digest order.
    pub fn protected_blobs(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = lock(&self.eviction).keys().copied().collect();
        v.sort_unstable();
        v
    }
}
