//! A small bounded cache of inflated spans of layers' tar streams.
//!
//! A span runs from one inflate checkpoint to the next (see
//! [`imgd_core::index::span_of`]); inflating one costs a pass from its checkpoint.
//! Keeping whole spans means sequential reads inflate each byte once, and concurrent
//! reads of the same span inflate it once (a per-span gate). Least recently used spans
//! are dropped beyond the byte budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Key = (usize, u64);

struct State {
    spans: HashMap<Key, (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    tick: u64,
}

/// Inflated spans by (layer, span start), within a byte budget.
pub struct SpanCache {
    state: Mutex<State>,
    gates: Mutex<HashMap<Key, Arc<Mutex<()>>>>,
    budget: usize,
}

impl SpanCache {
    /// A cache holding at most `budget` bytes of spans.
    pub fn new(budget: usize) -> Self {
        SpanCache {
            state: Mutex::new(State {
                spans: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
            gates: Mutex::new(HashMap::new()),
            budget,
        }
    }

    fn lookup(&self, key: Key) -> Option<Arc<Vec<u8>>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let tick = st.tick;
        st.spans.get_mut(&key).map(|(data, used)| {
            *used = tick;
            data.clone()
        })
    }

    fn insert(&self, key: Key, data: Arc<Vec<u8>>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let tick = st.tick;
        st.bytes += data.len();
        if let Some((old, _)) = st.spans.insert(key, (data, tick)) {
            st.bytes -= old.len();
        }
        while st.bytes > self.budget && st.spans.len() > 1 {
            let Some(victim) = st
                .spans
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((old, _)) = st.spans.remove(&victim) {
                st.bytes -= old.len();
            }
        }
    }

    /// The span of `layer` starting at `start`, inflating it with `load` if absent.
    /// Concurrent callers for one span wait for a single `load`.
    pub fn get_or_load<E>(
        &self,
        layer: usize,
        start: u64,
        load: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Arc<Vec<u8>>, E> {
        let key = (layer, start);
        if let Some(hit) = self.lookup(key) {
            return Ok(hit);
        }
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let result = {
            let _turn = gate.lock().unwrap_or_else(|p| p.into_inner());
            match self.lookup(key) {
                Some(hit) => Ok(hit),
                None => load().map(|data| {
                    let data = Arc::new(data);
                    self.insert(key, data.clone());
                    data
                }),
            }
        };
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&gate) <= 2 {
            gates.remove(&key);
        }
        result
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn loads_once_and_evicts_least_recently_used_within_budget() {
        let cache = SpanCache::new(10);
        let loads = Cell::new(0);
        let load = |n: usize| {
            loads.set(loads.get() + 1);
            Ok::<_, ()>(vec![0u8; n])
        };
        cache.get_or_load(0, 0, || load(4)).unwrap();
        cache.get_or_load(0, 0, || load(4)).unwrap();
        assert_eq!(loads.get(), 1);
        cache.get_or_load(0, 4, || load(4)).unwrap();
        cache.get_or_load(0, 0, || load(4)).unwrap(); // touch span 0
        cache.get_or_load(1, 0, || load(4)).unwrap(); // over budget: evicts (0, 4)
        assert!(cache.bytes() <= 10);
        assert_eq!(loads.get(), 3);
        cache.get_or_load(0, 0, || load(4)).unwrap();
        assert_eq!(loads.get(), 3, "the recently used span stayed");
        cache.get_or_load(0, 4, || load(4)).unwrap();
        assert_eq!(loads.get(), 4, "the least recently used span was evicted");
    }

    #[test]
    fn a_failed_load_caches_nothing() {
        let cache = SpanCache::new(100);
        assert!(cache
            .get_or_load(0, 0, || Err::<Vec<u8>, _>("down"))
            .is_err());
        assert_eq!(cache.bytes(), 0);
        assert_eq!(
            *cache.get_or_load(0, 0, || Ok::<_, ()>(vec![1])).unwrap(),
            vec![1]
        );
    }
}
