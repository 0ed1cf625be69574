//! The proxy's Prometheus metrics, served at `GET /metrics` (OpenMetrics text).
//!
//! Events deep in the code (upstream errors, verification failures) are counted in a
//! process-wide [`Events`] through one-line hooks. Byte counters the proxy already keeps
//! ([`crate::Stats`]) and the storage size are read at scrape time, so nothing is counted
//! twice.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `imgd_proxy_served_bytes_total` | counter | `api` = `registry` (blobs on `/v2/`), `chunk`, `index` or `windows` (the index API) |
//! | `imgd_proxy_chunks_served_total` | counter | |
//! | `imgd_proxy_upstream_received_bytes_total` | counter | |
//! | `imgd_proxy_upstream_blob_fetches_total` | counter | |
//! | `imgd_proxy_peer_received_bytes_total`, `imgd_proxy_peer_blob_fetches_total` | counter | (blobs ingested from peer replicas) |
//! | `imgd_proxy_upstream_errors_total` | counter | `status` = HTTP code or `timeout`, `unreachable`, ... |
//! | `imgd_proxy_verification_failures_total` | counter | `where` = `upstream` |
//! | `imgd_proxy_refused_layers_total` | counter | `answer` = `judged` (downloaded and refused) or `remembered` (answered from the negative cache) |
//! | `imgd_proxy_storage_bytes` | gauge | `kind` = `chunks` or `indexes` (walked when a blob was stored or evicted since the last scrape) |
//! | `imgd_proxy_storage_files` | gauge | `kind` |
//! | `imgd_proxy_storage_quota_bytes` | gauge | (0: no quota) |
//! | `imgd_proxy_storage_use_bytes` | gauge | `state` = `committed` (chunk and index files, shared chunks once) or `staged` (reserved by ingests in flight) |
//! | `imgd_proxy_evictions_total` | counter | |
//! | `imgd_proxy_evicted_bytes_total` | counter | |
//! | `imgd_proxy_pinned_digests` | gauge | |

use crate::server::AppState;
use crate::upstream::UpstreamError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

/// Content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// Counters of events hooked in other modules.
pub struct Events {
    upstream_errors: Family<Labels, Counter>,
    verification_failures: Family<Labels, Counter>,
    refused_layers: Family<Labels, Counter>,
}

static EVENTS: LazyLock<Events> = LazyLock::new(|| Events {
    upstream_errors: Family::default(),
    verification_failures: Family::default(),
    refused_layers: Family::default(),
});

fn count_refusal(answer: &str) {
    EVENTS
        .refused_layers
        .get_or_create(&vec![("answer", answer.to_string())])
        .inc();
}

/// Hook: a layer was downloaded, refused, and the refusal recorded.
pub fn refusal_remembered() {
    count_refusal("judged");
}

/// Hook: a request for a refused layer was answered from the negative cache.
pub fn refusal_hit() {
    count_refusal("remembered");
}

/// The `status` label of an upstream error: its HTTP status, or the kind of failure.
fn error_status(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Status { status, .. } => status.to_string(),
        UpstreamError::Unreachable(_) => "unreachable".into(),
        UpstreamError::Timeout(_) => "timeout".into(),
        UpstreamError::Interrupted(_) => "interrupted".into(),
        UpstreamError::Truncated { .. } => "truncated".into(),
        UpstreamError::DigestMismatch { .. } => "digest_mismatch".into(),
        UpstreamError::MalformedManifest(_) => "malformed_manifest".into(),
        UpstreamError::Auth(_) => "auth".into(),
        UpstreamError::NotFound(_) => "404".into(),
    }
}

/// Hook: an upstream request (manifest or blob) failed.
pub fn upstream_error(e: &UpstreamError) {
    EVENTS
        .upstream_errors
        .get_or_create(&vec![("status", error_status(e))])
        .inc();
    if matches!(e, UpstreamError::DigestMismatch { .. }) {
        EVENTS
            .verification_failures
            .get_or_create(&vec![("where", "upstream".to_string())])
            .inc();
    }
}

/// Hook: an ingest failed; upstream faults are counted by [`upstream_error`].
pub fn ingest_failed(e: &crate::ingest::IngestError) {
    if let crate::ingest::IngestError::Upstream(e) = e {
        upstream_error(e);
    }
}

/// Size and number of files under `dir` (two levels of fan-out directories).
fn dir_usage(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(top) = std::fs::read_dir(dir) else {
        return total;
    };
    for sub in top.flatten() {
        let Ok(files) = std::fs::read_dir(sub.path()) else {
            continue;
        };
        for f in files.flatten() {
            if let Ok(m) = f.metadata() {
                if m.is_file() {
                    total.0 += m.len();
                    total.1 += 1;
                }
            }
        }
    }
    total
}

/// Values read from the proxy's state at scrape time.
#[derive(Debug)]
struct Snapshot {
    stats: imgd_core::wire::ProxyStats,
    storage: Usage,
    space: crate::ledger::SpaceUse,
}

fn encode_counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    match values {
        [(labels, v)] if labels.is_empty() => ConstCounter::new(*v).encode(m),
        _ => {
            for (labels, v) in values {
                ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
            }
            Ok(())
        }
    }
}

fn encode_gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    match values {
        [(labels, v)] if labels.is_empty() => ConstGauge::new(*v).encode(m),
        _ => {
            for (labels, v) in values {
                ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
            }
            Ok(())
        }
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        let api = |a: &str| vec![("api", a.to_string())];
        encode_counters(
            &mut enc,
            "served_bytes",
            "Bytes served to clients, by API (registry: blobs on /v2/; chunk: the chunk API; index and windows: the index API's main parts and checkpoint windows)",
            &[
                (api("registry"), s.blob_bytes_served),
                (api("chunk"), s.chunk_bytes_served),
                (api("index"), s.index_bytes_served),
                (api("windows"), s.window_bytes_served),
            ],
        )?;
        encode_counters(
            &mut enc,
            "chunks_served",
            "Chunks served by the chunk API",
            &[(vec![], s.chunks_served)],
        )?;
        encode_counters(
            &mut enc,
            "upstream_received_bytes",
            "Blob bytes received from upstreams",
            &[(vec![], s.upstream_blob_bytes)],
        )?;
        encode_counters(
            &mut enc,
            "upstream_blob_fetches",
            "Blobs fetched from upstreams and stored",
            &[(vec![], s.upstream_blob_fetches)],
        )?;
        encode_counters(
            &mut enc,
            "peer_received_bytes",
            "Blob bytes received from peer replicas instead of upstream",
            &[(vec![], s.peer_blob_bytes)],
        )?;
        encode_counters(
            &mut enc,
            "peer_blob_fetches",
            "Blobs fetched from peer replicas and stored",
            &[(vec![], s.peer_blob_fetches)],
        )?;
        let sp = &self.space;
        encode_gauges(
            &mut enc,
            "storage_quota_bytes",
            "The storage quota in bytes (0: none)",
            &[(vec![], gauge_value(sp.quota.unwrap_or(0)))],
        )?;
        let st = |k: &str| vec![("state", k.to_string())];
        encode_gauges(
            &mut enc,
            "storage_use_bytes",
            "Bytes counted against the quota: committed files, and staged by ingests",
            &[
                (st("committed"), gauge_value(sp.committed)),
                (st("staged"), gauge_value(sp.staged)),
            ],
        )?;
        encode_counters(
            &mut enc,
            "evictions",
            "Blobs evicted to stay under the quota",
            &[(vec![], sp.evictions)],
        )?;
        encode_counters(
            &mut enc,
            "evicted_bytes",
            "Bytes of files deleted by evictions",
            &[(vec![], sp.evicted_bytes)],
        )?;
        encode_gauges(
            &mut enc,
            "pinned_digests",
            "Manifests and blobs held by pins",
            &[(vec![], gauge_value(sp.pinned))],
        )?;
        let kind = |k: &str| vec![("kind", k.to_string())];
        let bytes: Vec<_> = self
            .storage
            .iter()
            .map(|(k, b, _)| (kind(k), gauge_value(*b)))
            .collect();
        encode_gauges(
            &mut enc,
            "storage_bytes",
            "Bytes of committed chunk and index files in storage",
            &bytes,
        )?;
        let files: Vec<_> = self
            .storage
            .iter()
            .map(|(k, _, n)| (kind(k), gauge_value(*n)))
            .collect();
        encode_gauges(
            &mut enc,
            "storage_files",
            "Committed chunk and index files in storage",
            &files,
        )
    }
}

/// `(kind, bytes, files)` of each content store.
type Usage = Vec<(&'static str, u64, u64)>;

/// The last storage walk: storage dir and blob count it was made at, and its result.
static LAST_WALK: Mutex<Option<(PathBuf, u64, Usage)>> = Mutex::new(None);

/// Storage use. Files are only added by ingests and removed by evictions, so the
/// directories are walked again only when a blob was stored or evicted since the last walk.
fn storage_usage(state: &AppState) -> Usage {
    let dir = &state.config.storage_dir;
    let snap = state.stats.snapshot();
    let stored =
        snap.upstream_blob_fetches + snap.peer_blob_fetches + state.space.usage().evictions;
    let mut last = LAST_WALK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((d, n, usage)) = last.as_ref() {
        if d == dir && *n == stored {
            return usage.clone();
        }
    }
    let usage: Usage = ["chunks", "indexes"]
        .into_iter()
        .map(|k| {
            let (bytes, files) = dir_usage(&dir.join(k));
            (k, bytes, files)
        })
        .collect();
    *last = Some((dir.clone(), stored, usage.clone()));
    usage
}

/// Renders every metric of the proxy as OpenMetrics text. May walk the storage
/// directories (blocking: call it off the async threads).
pub fn render(state: &AppState) -> Result<String, std::fmt::Error> {
    let storage = storage_usage(state);
    let mut registry = Registry::with_prefix("imgd_proxy");
    registry.register(
        "upstream_errors",
        "Failed upstream requests, by HTTP status or kind of failure",
        EVENTS.upstream_errors.clone(),
    );
    registry.register(
        "verification_failures",
        "Content that did not match its digest, by where it came from",
        EVENTS.verification_failures.clone(),
    );
    registry.register(
        "refused_layers",
        "Requests for layers refused by the index rules, by how they were answered",
        EVENTS.refused_layers.clone(),
    );
    registry.register_collector(Box::new(Snapshot {
        stats: state.stats.snapshot(),
        storage,
        space: state.space.usage(),
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Upstream errors counted so far with this `status` label.
pub fn upstream_errors(status: &str) -> u64 {
    EVENTS
        .upstream_errors
        .get_or_create(&vec![("status", status.to_string())])
        .get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_are_counted_by_status_and_mismatches_as_verification_failures() {
        let before = upstream_errors("digest_mismatch");
        let d = imgd_core::Digest::of(b"x");
        upstream_error(&UpstreamError::DigestMismatch {
            expected: d,
            actual: d,
        });
        assert_eq!(upstream_errors("digest_mismatch"), before + 1);
    }
}
