//! The on-disk inflated layers ([`imgd_fuse::inflated`]) under `DIR/inflated`, as the
//! quota sees them: their disk usage counts against the cache quota with the chunks, and
//! they are evicted first (they are rebuilt from cached chunks without the network), a
//! whole layer at a time, least recently used first.
//!
//! A layer is never evicted while a mount uses it: every mount process holds a shared
//! lease (`flock`) on each of its layers for as long as it serves, which eviction cannot
//! take, and the agent also spares the layers it protects for its mounts
//! ([`ChunkCache::protect`]). The mount processes add spans on their own, so the agent
//! scans the directory again at each quota check and every few seconds
//! ([`ChunkCache::enforce_quota`], called by the agent's housekeeping loop).

use super::locks::lock;
use super::{CacheError, ChunkCache};
use imgd_core::Digest;
use imgd_fuse::inflated::{self, Eviction, LayerUsage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// What an eviction of inflated layers did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflatedEviction {
    /// Layers whose inflated files were removed.
    pub layers: u64,
    /// Disk bytes they took.
    pub freed_bytes: u64,
    /// Layers over the target that were spared because a mount holds them.
    pub in_use: u64,
}

impl ChunkCache {
    /// `DIR/inflated`, shared with the mount processes.
    pub fn inflated_root(&self) -> PathBuf {
        inflated::layout::root(&self.dir)
    }

    /// Disk bytes of inflated layers, as of the last scan.
    pub fn inflated_bytes(&self) -> u64 {
        self.inflated_bytes.load(Ordering::Relaxed)
    }

    /// Scans the inflated layers (and records their total size).
    pub(super) fn scan_inflated(&self) -> Result<Vec<LayerUsage>, CacheError> {
        let layers = inflated::usage(&self.inflated_root())
            .map_err(|e| CacheError::io("scanning inflated layers", e))?;
        let total = layers.iter().map(|l| l.bytes).sum();
        self.inflated_bytes.store(total, Ordering::Relaxed);
        Ok(layers)
    }

    /// Evicts inflated layers, least recently used first, until chunks and inflated data
    /// together are at most `target` bytes, sparing `protected` layers and leased ones.
    pub(super) fn evict_inflated(
        &self,
        target: u64,
        protected: &HashMap<Digest, usize>,
    ) -> Result<InflatedEviction, CacheError> {
        let mut report = InflatedEviction::default();
        let layers = self.scan_inflated()?;
        let mut total = self.used_bytes() + self.inflated_bytes();
        for layer in layers {
            if total <= target {
                break;
            }
            if protected.contains_key(&layer.layer) {
                report.in_use += 1;
                continue;
            }
            match inflated::evict(&layer.dir) {
                Ok(Eviction::Removed) => {
                    tracing::info!(layer = %layer.layer, bytes = layer.bytes, "evicted an inflated layer");
                    report.layers += 1;
                    report.freed_bytes += layer.bytes;
                    total = total.saturating_sub(layer.bytes);
                    self.inflated_bytes
                        .fetch_sub(layer.bytes.min(self.inflated_bytes()), Ordering::Relaxed);
                }
                Ok(Eviction::InUse) => report.in_use += 1,
                Err(e) => {
                    tracing::warn!(layer = %layer.layer, error = %e, "could not evict an inflated layer")
                }
            }
        }
        crate::metrics::evicted_inflated(report.layers, report.freed_bytes);
        Ok(report)
    }

    /// Brings chunks and inflated data under the quota if they are above it: inflated
    /// layers first, then chunks, down to the low-water mark. Returns whether anything
    /// had to be done.
    pub fn enforce_quota(&self) -> Result<bool, CacheError> {
        self.scan_inflated()?;
        if self.used_bytes() + self.inflated_bytes() <= self.quota {
            return Ok(false);
        }
        self.make_room(None)?;
        Ok(true)
    }
}

/// The eviction lock's protected set, for [`ChunkCache::evict_inflated`].
pub(super) fn protected(cache: &ChunkCache) -> std::sync::MutexGuard<'_, HashMap<Digest, usize>> {
    lock(&cache.eviction)
}
