//! The agent's Prometheus metrics, served at `GET /metrics` on the mirror listener
//! (OpenMetrics text), with `/healthz` and `/readyz` (see [`crate::mirror`]).
//!
//! Events deep in the code (chunk fetch latency, verification failures, evictions, bytes
//! served to peers and through the mirror) are counted in a process-wide [`Events`]
//! through one-line hooks. Counters the agent already keeps (bytes by source in
//! [`crate::fetch::FetchStats`], each mount's FUSE counters) and the cache, peer and
//! mount state are read at scrape time, so nothing is counted twice.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `imgd_agent_received_bytes_total` | counter | `source` = `cache`, `peer`, `proxy` |
//! | `imgd_agent_served_bytes_total` | counter | `to` = `peer`, `mirror` |
//! | `imgd_agent_chunk_fetch_seconds` | histogram | `source` = `peer`, `proxy` |
//! | `imgd_agent_verification_failures_total` | counter | `where` = `peer`, `proxy`, `cache` |
//! | `imgd_agent_cache_size_bytes`, `imgd_agent_cache_quota_bytes`, `imgd_agent_cache_peak_bytes`, `imgd_agent_cache_inflated_bytes`, `imgd_agent_cache_chunks` | gauge | |
//! | `imgd_agent_cache_evictions_total`, `imgd_agent_cache_evicted_bytes_total`, `imgd_agent_cache_evicted_inflated_layers_total` | counter | |
//! | `imgd_agent_peers`, `imgd_agent_peers_usable` | gauge | |
//! | `imgd_agent_fuse_reads_total`, `imgd_agent_fuse_read_bytes_total`, `imgd_agent_fuse_eio_total`, `imgd_agent_mount_fetched_bytes_total` | counter | `mount`, `image` |
//! | `imgd_agent_swarm_listening`, `imgd_agent_routing_table_peers` | gauge | |
//! | `imgd_agent_control_requests_total` | counter | `kind` = `provider_lookup`, `provide`, `withdraw`, `subscribe`, `have`, `pushed` |

use crate::agent::Agent;
use crate::fetch::Source;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

/// Content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

fn label(key: &'static str, value: &str) -> Labels {
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

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Cache => "cache",
        Source::Peer => "peer",
        Source::Proxy => "proxy",
    }
}

/// Hook: a chunk fetch (peers, then proxy) that started at `started` got it from `source`.
pub fn chunk_fetched(source: Source, started: Instant) {
    EVENTS
        .chunk_fetch_seconds
        .get_or_create(&label("source", source_name(source)))
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

/// One metric read at scrape time: name, help, and a value per label set.
type Series = (&'static str, &'static str, Vec<(Labels, u64)>);

/// Values read from the agent at scrape time.
#[derive(Debug)]
struct Snapshot {
    counters: Vec<Series>,
    gauges: Vec<Series>,
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        for (name, help, values) in &self.counters {
            let kind = ConstCounter::new(0u64).metric_type();
            let mut m = enc.encode_descriptor(name, help, None, kind)?;
            if let [(labels, v)] = values.as_slice() {
                if labels.is_empty() {
                    ConstCounter::new(*v).encode(m)?;
                    continue;
                }
            }
            for (labels, v) in values {
                ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
            }
        }
        for (name, help, values) in &self.gauges {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut m = enc.encode_descriptor(name, help, None, kind)?;
            if let [(labels, v)] = values.as_slice() {
                if labels.is_empty() {
                    ConstGauge::new(gauge_value(*v)).encode(m)?;
                    continue;
                }
            }
            for (labels, v) in values {
                ConstGauge::new(gauge_value(*v)).encode(m.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

fn snapshot(agent: &Agent, mounts: &[crate::mounts::MountStatus]) -> Snapshot {
    let f = &agent.fetcher;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let per_mount = |value: &dyn Fn(&crate::mounts::MountStatus) -> u64| {
        mounts
            .iter()
            .map(|m| {
                let labels = vec![("mount", m.dir.clone()), ("image", m.image.clone())];
                (labels, value(m))
            })
            .collect::<Vec<_>>()
    };
    let counters = vec![
        (
            "received_bytes",
            "Chunk bytes the agent got, by source (cache: already held when asked for)",
            vec![
                (label("source", "cache"), get(&f.stats.from_cache)),
                (label("source", "peer"), get(&f.stats.from_peers)),
                (label("source", "proxy"), get(&f.stats.from_proxy)),
            ],
        ),
        (
            "control_requests",
            "Control requests sent (pushed: have-maps pushed to this host), by kind",
            f.control
                .totals()
                .into_iter()
                .map(|(k, n)| (label("kind", k), n))
                .collect(),
        ),
        (
            "fuse_reads",
            "Read requests served by a lazy mount",
            per_mount(&|m| m.reads),
        ),
        (
            "fuse_read_bytes",
            "Bytes returned to readers of a lazy mount",
            per_mount(&|m| m.bytes_read),
        ),
        (
            "fuse_eio",
            "Reads of a lazy mount that failed with EIO",
            per_mount(&|m| m.eio),
        ),
        (
            "mount_fetched_bytes",
            "Chunk bytes a lazy mount fetched into the cache",
            per_mount(&|m| m.fetched_bytes),
        ),
    ];
    let peers = agent.peers.all().len() as u64;
    let usable = agent.peers.usable().len() as u64;
    let gauges = vec![
        (
            "cache_size_bytes",
            "Bytes of chunk data in the cache",
            vec![(vec![], f.cache.used_bytes())],
        ),
        (
            "cache_quota_bytes",
            "The cache's quota",
            vec![(vec![], f.cache.quota())],
        ),
        (
            "cache_peak_bytes",
            "The most bytes of chunk data the cache held at once since start",
            vec![(vec![], f.cache.peak_used_bytes())],
        ),
        (
            "cache_inflated_bytes",
            "Disk bytes of inflated layers (counted against the quota with the chunks)",
            vec![(vec![], f.cache.inflated_bytes())],
        ),
        (
            "cache_chunks",
            "Chunks in the cache",
            vec![(vec![], f.cache.chunk_count() as u64)],
        ),
        ("peers", "Known peers", vec![(vec![], peers)]),
        (
            "peers_usable",
            "Known peers not banned for misbehaviour",
            vec![(vec![], usable)],
        ),
        (
            "routing_table_peers",
            "Peers in the swarm's Kademlia routing table",
            vec![(vec![], agent.peers.routing_table().len() as u64)],
        ),
        (
            "swarm_listening",
            "1 when the swarm's libp2p transport listens",
            vec![(vec![], u64::from(is_swarm_listening()))],
        ),
    ];
    Snapshot { counters, gauges }
}

/// Renders every metric of the agent as OpenMetrics text.
pub fn render(
    agent: &Agent,
    mounts: &[crate::mounts::MountStatus],
) -> Result<String, std::fmt::Error> {
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
    registry.register_collector(Box::new(snapshot(agent, mounts)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The readiness report: `(ready, body)`. Ready when the cache's database answers a read
/// and, with the swarm enabled, the swarm listens (the data plane is bound before start ends).
pub fn readiness(agent: &Agent) -> (bool, String) {
    let mut ready = true;
    let mut lines = Vec::new();
    match agent.fetcher.cache.pin_of("") {
        Ok(_) => lines.push("storage: ok".to_string()),
        Err(e) => {
            ready = false;
            lines.push(format!("storage: {e}"));
        }
    }
    if agent.config.swarm.enabled {
        if is_swarm_listening() {
            lines.push("swarm: listening".into());
        } else {
            ready = false;
            lines.push("swarm: not listening yet".into());
        }
        match agent.data_addr {
            Some(addr) => lines.push(format!("data_plane: bound {addr}")),
            None => {
                ready = false;
                lines.push("data_plane: not bound".into());
            }
        }
    } else {
        lines.push("swarm: disabled".into());
    }
    let head = if ready { "ready" } else { "not ready" };
    (ready, format!("{head}\n{}\n", lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ChunkCache;
    use imgd_core::Digest;

    #[test]
    fn evictions_and_cache_verification_failures_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        for c in &chunks {
            cache.put_chunk(&Digest::of(c), c).unwrap();
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
        cache.put_chunk(&d, &c).unwrap();
        let hex = d.hex();
        let file = dir.path().join("chunks").join(&hex[..2]).join(&hex);
        std::fs::write(&file, vec![8u8; 1000]).unwrap();
        assert!(cache.get_chunk(&d).unwrap().is_none(), "damaged: dropped");
        assert!(failures() > before);
    }
}
