//! The agent's Prometheus metrics page, served at `GET /metrics` on the mirror listener
//! (OpenMetrics text), with `/healthz` and `/readyz` (see [`crate::mirror`]).
//!
//! Events deep in the code (chunk fetch latency, verification failures, evictions, bytes
//! served to peers and through the mirror) are counted by [`crate::metrics`]
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
use crate::metrics::{is_swarm_listening, label, Labels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::atomic::Ordering;

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
    let mut registry = crate::metrics::registry();
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
