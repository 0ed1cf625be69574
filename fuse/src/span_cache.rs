//! A small bounded memory cache of inflated spans, for layers whose spans cannot be kept
//! on disk (see [`crate::spans`]). Least recently used spans are dropped beyond the byte
//! budget.

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
    budget: usize,
}

impl SpanCache {
    /// A cache holding at most `budget` bytes of spans (and always the latest one).
    pub fn new(budget: usize) -> Self {
        SpanCache {
            state: Mutex::new(State {
                spans: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
            budget,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The span of `layer` starting at `start`, if held.
    pub fn get(&self, layer: usize, start: u64) -> Option<Arc<Vec<u8>>> {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        st.spans.get_mut(&(layer, start)).map(|(data, used)| {
            *used = tick;
            data.clone()
        })
    }

    /// Keeps a span, dropping the least recently used ones beyond the budget.
    pub fn insert(&self, layer: usize, start: u64, data: Arc<Vec<u8>>) {
        let key = (layer, start);
        let mut st = self.state();
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

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let cache = SpanCache::new(10);
        let span = |n: usize| Arc::new(vec![0u8; n]);
        cache.insert(0, 0, span(4));
        cache.insert(0, 4, span(4));
        assert!(cache.get(0, 0).is_some()); // touch span 0
        cache.insert(1, 0, span(4)); // over budget: evicts (0, 4)
        assert!(cache.bytes() <= 10);
        assert!(cache.get(0, 0).is_some(), "the recently used span stayed");
        assert!(
            cache.get(0, 4).is_none(),
            "the least recently used span went"
        );
        cache.insert(2, 0, span(20));
        assert!(
            cache.get(2, 0).is_some(),
            "the latest span stays even over budget"
        );
    }
}
