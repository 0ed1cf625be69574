//! The agent's metric events: plain counters that code deep in the agent bumps through
//! one-line hooks (chunk fetch latency, verification failures, evictions, bytes served to
//! peers and through the mirror). This module knows nothing of the agent: the page that
//! adds scrape-time values and serves them is [`crate::metrics_page`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

/// Content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) type Labels = Vec<(&'static str, String)>;

pub(crate) fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_string())]
}

/// Counters of events hooked in other modules.
pub struct Events {
    chunk_fetch_seconds: Family<Labels, Histogram>,
    verification_failures: Family<Labels, Counter>,
    served_bytes: Family<Labels, Counter>,
    proxy_failovers: Family<Labels, Counter>,
    evictions: Counter,
    evicted_bytes: Counter,
    evicted_inflated_layers: Counter,
    swarm_listening: AtomicBool,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

static EVENTS: LazyLock<Events> = LazyLock::new(|| Events {
    chunk_fetch_seconds: Family::new_with_constructor(latency_histogram),
    verification_failures: Family::default(),
    served_bytes: Family::default(),
    proxy_failovers: Family::default(),
    evictions: Counter::default(),
    evicted_bytes: Counter::default(),
    evicted_inflated_layers: Counter::default(),
    swarm_listening: AtomicBool::new(false),
});

/// Hook: a chunk fetch (peers, then proxy) that started at `started` got it from `source`.
pub fn chunk_fetched(source: &str, started: Instant) {
    EVENTS
        .chunk_fetch_seconds
        .get_or_create(&label("source", source))
        .observe(started.elapsed().as_secs_f64());
}

/// Hook: bytes that did not match their digest came from `from` (`peer`, `proxy`, `cache`).
pub fn verification_failed(from: &str) {
    EVENTS
        .verification_failures
        .get_or_create(&label("where", from))
        .inc();
}

/// Hook: `bytes` of chunk data were served to `to` (`peer` or `mirror`).
pub fn served(to: &str, bytes: u64) {
    EVENTS
        .served_bytes
        .get_or_create(&label("to", to))
        .inc_by(bytes);
}

/// Hook: a request failed on the proxy replica at `replica` and went to another.
pub fn proxy_failover(replica: &str) {
    EVENTS
        .proxy_failovers
        .get_or_create(&label("replica", replica))
        .inc();
}

/// Hook: the cache evicted `chunks` chunks holding `bytes` bytes.
pub fn evicted(chunks: u64, bytes: u64) {
    EVENTS.evictions.inc_by(chunks);
    EVENTS.evicted_bytes.inc_by(bytes);
}

/// Hook: the cache evicted `layers` inflated layers taking `bytes` bytes of disk.
pub fn evicted_inflated(layers: u64, bytes: u64) {
    EVENTS.evicted_inflated_layers.inc_by(layers);
    EVENTS.evicted_bytes.inc_by(bytes);
}

/// Hook: the swarm's libp2p transport is listening.
pub fn swarm_listening() {
    EVENTS.swarm_listening.store(true, Ordering::Relaxed);
}

/// True once the swarm's libp2p transport listens on an address.
pub fn is_swarm_listening() -> bool {
    EVENTS.swarm_listening.load(Ordering::Relaxed)
}

/// A registry holding every event counter, for the page to add its scrape-time values to.
pub fn registry() -> Registry {
    let mut registry = Registry::with_prefix("imgd_agent");
    registry.register(
        "chunk_fetch_seconds",
        "Time to fetch one chunk that was not cached, by the source that delivered it",
        EVENTS.chunk_fetch_seconds.clone(),
    );
    registry.register(
        "verification_failures",
        "Chunks that did not match their digest, by where they came from",
        EVENTS.verification_failures.clone(),
    );
    registry.register(
        "served_bytes",
        "Chunk bytes served, to peers (data plane) or through the registry mirror",
        EVENTS.served_bytes.clone(),
    );
    registry.register(
        "proxy_failovers",
        "Requests that failed on a proxy replica and were sent to another, by that replica",
        EVENTS.proxy_failovers.clone(),
    );
    registry.register(
        "cache_evictions",
        "Chunks evicted from the cache",
        EVENTS.evictions.clone(),
    );
    registry.register(
        "cache_evicted_bytes",
        "Bytes evicted from the cache (chunks and inflated layers)",
        EVENTS.evicted_bytes.clone(),
    );
    registry.register(
        "cache_evicted_inflated_layers",
        "Inflated layers evicted from the cache",
        EVENTS.evicted_inflated_layers.clone(),
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ChunkCache;
    use imgd_core::{Digest, VerifiedChunk};

    #[test]
    fn evictions_and_cache_verification_failures_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        for c in &chunks {
            let c = VerifiedChunk::check(Digest::of(c), c.clone().into()).unwrap();
            cache.put_chunk(&c).unwrap();
        }
        let (evictions, bytes) = (EVENTS.evictions.get(), EVENTS.evicted_bytes.get());
        let report = cache.evict_to(0).unwrap();
        assert_eq!(report.evicted_chunks, 3);
        // Other tests of this process may evict at the same time: at least ours counted.
        assert!(EVENTS.evictions.get() >= evictions + 3);
        assert!(EVENTS.evicted_bytes.get() >= bytes + 3000);

        let failures = || {
            EVENTS
                .verification_failures
                .get_or_create(&label("where", "cache"))
                .get()
        };
        let before = failures();
        let c = vec![7u8; 1000];
        let d = Digest::of(&c);
        cache
            .put_chunk(&VerifiedChunk::check(d, c.into()).unwrap())
            .unwrap();
        let hex = d.hex();
        let file = dir.path().join("chunks").join(&hex[..2]).join(&hex);
        std::fs::write(&file, vec![8u8; 1000]).unwrap();
        assert!(cache.get_chunk(&d).unwrap().is_none(), "damaged: dropped");
        assert!(failures() > before);
    }
}
