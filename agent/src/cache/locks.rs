//! Locking helpers: poison-tolerant locking and per-digest lock stripes.
//!
//! Lock order, to stay free of deadlocks: the eviction lock (which also guards the
//! protected-blob set), then digest stripes (only the single evictor ever holds more than
//! one), then the in-memory index. Nothing waits for a lock earlier in this order while
//! holding a later one.

use imgd_core::Digest;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, going on with the data if another thread panicked while holding it: every
/// critical section of the cache leaves its data consistent at each step.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const STRIPES: usize = 64;

/// Mutexes serialising changes to one chunk digest (store, evict, heal, adopt), so the
/// file, the row and the index entry of a digest change together. Digests share a stripe
/// by their first byte.
pub(super) struct Stripes([Mutex<()>; STRIPES]);

impl Stripes {
    pub(super) fn new() -> Stripes {
        Stripes(std::array::from_fn(|_| Mutex::new(())))
    }

    fn slot(d: &Digest) -> usize {
        d.as_bytes()[0] as usize % STRIPES
    }

    /// Locks the stripe of `d`.
    pub(super) fn lock(&self, d: &Digest) -> MutexGuard<'_, ()> {
        lock(&self.0[Self::slot(d)])
    }

    /// Locks the stripes of all `ds`, each once, in ascending order.
    pub(super) fn lock_many<'a>(
        &self,
        ds: impl IntoIterator<Item = &'a Digest>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut slots: Vec<usize> = ds.into_iter().map(Self::slot).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.into_iter().map(|s| lock(&self.0[s])).collect()
    }
}
