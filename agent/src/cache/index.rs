//! The in-memory index of stored chunks: a copy of the `chunks` table kept for fast
//! presence checks, byte accounting and LRU ordering, plus read ticks not yet persisted.
//!
//! A cache of 100 GB holds ~25k chunks, so the whole index is a few megabytes at most.

use super::tables::{ChunkMeta, Chunks};
use imgd_core::store::{MetaDb, MetaError};
use imgd_core::Digest;
use std::collections::{HashMap, HashSet};

/// Read ticks are written to the database once this many chunks have unsaved ones.
pub(super) const FLUSH_EVERY: usize = 1024;

/// The index. Invariant: an entry is present only while the chunk's row is, so flushing
/// (which writes rows of entries) never brings back a removed row.
#[derive(Debug, Default)]
pub(super) struct Index {
    entries: HashMap<Digest, ChunkMeta>,
    used: u64,
    /// The largest `used` ever reached.
    peak: u64,
    clock: u64,
    dirty: HashSet<Digest>,
}

impl Index {
    /// The index of the rows read at open; the clock resumes after the largest tick.
    pub(super) fn from_rows(rows: Vec<(Digest, ChunkMeta)>) -> Index {
        let mut index = Index::default();
        for (d, m) in rows {
            index.clock = index.clock.max(m.last_access);
            index.insert(d, m);
        }
        index
    }

    /// True if the chunk is recorded.
    pub(super) fn contains(&self, d: &Digest) -> bool {
        self.entries.contains_key(d)
    }

    /// The chunk's record.
    pub(super) fn get(&self, d: &Digest) -> Option<ChunkMeta> {
        self.entries.get(d).copied()
    }

    /// Number of chunks recorded.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Sum of the sizes of the chunks recorded.
    pub(super) fn used(&self) -> u64 {
        self.used
    }

    /// The largest [`Index::used`] since the index was built.
    pub(super) fn peak(&self) -> u64 {
        self.peak
    }

    /// Advances the logical clock and returns the new tick.
    pub(super) fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Records a chunk whose row has been written.
    pub(super) fn insert(&mut self, d: Digest, meta: ChunkMeta) {
        if let Some(old) = self.entries.insert(d, meta) {
            self.used -= u64::from(old.size);
        }
        self.used += u64::from(meta.size);
        self.peak = self.peak.max(self.used);
    }

    /// Forgets a chunk, before its row is deleted.
    pub(super) fn remove(&mut self, d: &Digest) -> Option<ChunkMeta> {
        self.dirty.remove(d);
        let old = self.entries.remove(d)?;
        self.used -= u64::from(old.size);
        Some(old)
    }

    /// Marks a chunk as just used; false if it is not recorded.
    pub(super) fn touch(&mut self, d: &Digest) -> bool {
        let t = self.tick();
        match self.entries.get_mut(d) {
            Some(m) => {
                m.last_access = t;
                self.dirty.insert(*d);
                true
            }
            None => false,
        }
    }

    /// Number of chunks whose latest tick is not yet persisted.
    pub(super) fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Writes the rows of chunks whose tick changed, in one synced batch. On error the
    /// ticks stay pending.
    pub(super) fn flush(&mut self, meta: &MetaDb) -> Result<usize, MetaError> {
        if self.dirty.is_empty() {
            return Ok(0);
        }
        let mut batch = meta.batch();
        let mut n = 0;
        for d in &self.dirty {
            if let Some(m) = self.entries.get(d) {
                batch.put::<Chunks>(d, m)?;
                n += 1;
            }
        }
        meta.write(batch)?;
        self.dirty.clear();
        Ok(n)
    }

    /// Every recorded chunk, least recently used first (ties broken by digest).
    pub(super) fn lru_order(&self) -> Vec<(Digest, ChunkMeta)> {
        let mut v: Vec<(Digest, ChunkMeta)> = self.entries.iter().map(|(d, m)| (*d, *m)).collect();
        v.sort_unstable_by_key(|(d, m)| (m.last_access, *d));
        v
    }

    /// Every recorded digest.
    pub(super) fn digests(&self) -> Vec<Digest> {
        self.entries.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u32, last_access: u64) -> ChunkMeta {
        ChunkMeta {
            size,
            last_access,
            stored_at: 0,
        }
    }

    #[test]
    fn accounting_clock_and_lru_order() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut ix = Index::from_rows(vec![(a, meta(10, 7)), (b, meta(5, 3))]);
        assert_eq!(ix.used(), 15);
        assert_eq!(ix.tick(), 8, "clock resumes after the largest stored tick");
        assert_eq!(ix.lru_order()[0].0, b);
        assert!(ix.touch(&b));
        assert_eq!(ix.lru_order()[0].0, a);
        assert_eq!(ix.dirty_len(), 1);
        ix.insert(a, meta(4, 20));
        assert_eq!(ix.used(), 9, "re-inserting replaces the size");
        assert!(ix.remove(&b).is_some());
        assert_eq!((ix.used(), ix.dirty_len(), ix.len()), (4, 0, 1));
        assert_eq!(ix.peak(), 15, "the high-water mark stays");
        assert!(!ix.touch(&b));
    }
}
