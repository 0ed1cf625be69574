//! The local API that `imgctl` talks to, on a unix socket.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/prefetch` `{"image": REF}` | NDJSON [`PrefetchEvent`]s: `start`, `progress`..., then `done` or `error` |
//! | `GET /v1/images` | [`ImageSummary`] list |
//! | `GET /v1/status` | [`Status`] |
//! | `POST /v1/gc` | the cache's GC report |
//! | `POST /v1/mount` `{"image": REF, "dir": PATH}` | the new mount's [`MountStatus`] |
//! | `POST /v1/umount` `{"dir": PATH}` | empty |
//! | `POST /v1/pin` `{"image": REF, "pinned": BOOL}` | empty; the image must be cached |
//! | `GET /v1/verify` | a full re-verification of every cached chunk (changes nothing) |
//! | `GET /v1/chunks/ID/LAYER/CHUNK` | a chunk of a layer of mount ID, for its mount process; header `x-imgd-fetched: 1` if it had to be fetched |
//! | `GET /v1/pieces/ID/LAYER/CHUNK/FIRST/COUNT` | pieces `FIRST..FIRST+COUNT` of that chunk, concatenated ([`crate::pieces`]); header `x-imgd-fetched-bytes: N` |
//! | `GET /v1/windows/ID/LAYER/OFFSET/LEN/SHA256` | the checkpoint window at `OFFSET`, `LEN` bytes, of the index of that layer, checked against `SHA256` ([`crate::layer_indexes`]) |

use crate::agent::{Agent, PrefetchSummary};
use crate::fetch::Source;
use crate::mounts::MountStatus;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Body of `POST /v1/prefetch`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PrefetchRequest {
    pub image: String,
    /// Only the files of the image's learned startup trace.
    #[serde(default)]
    pub startup: bool,
}

/// One line of the prefetch stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefetchEvent {
    Start {
        image: String,
        total_bytes: u64,
    },
    Progress {
        bytes: u64,
        source: Source,
    },
    Done(PrefetchSummary),
    /// A `--startup` prefetch finished, having fetched this much.
    StartupDone {
        image: String,
        fetched_bytes: u64,
    },
    Error {
        message: String,
    },
}

/// One cached image.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImageSummary {
    pub image: String,
    pub manifest_digest: imgd_core::Digest,
    pub total_bytes: u64,
    pub cached_bytes: u64,
    pub pinned: bool,
}

/// Agent status.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub node_id: String,
    pub cache_used_bytes: u64,
    pub cache_quota_bytes: u64,
    /// The most chunk data the cache held at once since the agent started.
    #[serde(default)]
    pub cache_peak_used_bytes: u64,
    /// Disk bytes of inflated layers (counted against the quota with the chunks).
    #[serde(default)]
    pub cache_inflated_bytes: u64,
    /// What opening the cache repaired (a crash's leftovers), at start.
    #[serde(default)]
    pub cache_open_repair: crate::cache::RepairReport,
    pub peers: Vec<PeerStatus>,
    /// Whether this agent is in a swarm: `on`, or `off: WHY`.
    #[serde(default)]
    pub swarm: String,
    /// Peer ids in the swarm's Kademlia routing table.
    #[serde(default)]
    pub routing_table: Vec<String>,
    /// Control requests sent (provider lookups, announcements, have-map subscriptions
    /// and requests) and have-maps pushed to this host, by kind.
    #[serde(default)]
    pub control_requests: std::collections::BTreeMap<String, u64>,
    /// The same per blob (digest), by kind.
    #[serde(default)]
    pub control_requests_by_blob:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Blobs being fetched now.
    pub blobs_in_flight: usize,
    /// Chunk transfers in flight now.
    pub chunks_in_flight: usize,
    pub mounts: Vec<MountStatus>,
    pub bytes_from_cache: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_proxy: u64,
    /// Bytes of verified 64 KiB pieces fetched from the proxy (lazy reads and the
    /// completion of partial chunks), apart from `bytes_from_proxy`'s whole chunks.
    #[serde(default)]
    pub bytes_from_proxy_pieces: u64,
    /// The first proxy replica.
    pub proxy_url: String,
    /// Every proxy replica and whether it is up (it did not fail a request in the last 5 s).
    #[serde(default)]
    pub proxies: Vec<ProxyReplicaStatus>,
}

/// One proxy replica.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxyReplicaStatus {
    pub url: String,
    pub up: bool,
}

/// One known peer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub data_addr: String,
    pub penalty: u32,
    /// Its zone label, if it has one.
    #[serde(default)]
    pub zone: Option<String>,
    /// Its smoothed data-plane round trip in microseconds, once measured.
    #[serde(default)]
    pub rtt_us: Option<u64>,
}

/// The API's routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/prefetch", post(prefetch))
        .route("/v1/images", get(images))
        .route("/v1/status", get(status))
        .route("/v1/gc", post(gc))
        .route("/v1/verify", get(verify))
        .route("/v1/mount", post(mount))
        .route("/v1/umount", post(umount))
        .route("/v1/pin", post(pin))
        .route("/v1/chunks/{id}/{layer}/{chunk}", get(chunk))
        .route(
            "/v1/pieces/{id}/{layer}/{chunk}/{first}/{count}",
            get(pieces),
        )
        .route(
            "/v1/windows/{id}/{layer}/{offset}/{len}/{sha256}",
            get(window),
        )
        .with_state(agent)
}

fn line(e: &PrefetchEvent) -> bytes::Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    v.into()
}

async fn prefetch(State(agent): State<Arc<Agent>>, Json(req): Json<PrefetchRequest>) -> Response {
    if req.startup {
        let last = match crate::mounts::startup_prefetch(agent.mounts.context(), &req.image).await {
            Ok(bytes) => PrefetchEvent::StartupDone {
                image: req.image.clone(),
                fetched_bytes: bytes,
            },
            Err(e) => PrefetchEvent::Error {
                message: e.to_string(),
            },
        };
        return (StatusCode::OK, line(&last)).into_response();
    }
    let (r, record) = match agent.resolve(&req.image).await {
        Ok(x) => x,
        Err(e) => {
            let body = line(&PrefetchEvent::Error {
                message: e.to_string(),
            });
            return (StatusCode::OK, body).into_response();
        }
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let _ = out_tx.send(line(&PrefetchEvent::Start {
        image: r.to_string(),
        total_bytes: record.total_size,
    }));
    tokio::spawn(async move {
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
        let relay_tx = out_tx.clone();
        let relay = tokio::spawn(async move {
            while let Some((bytes, source)) = prx.recv().await {
                let _ = relay_tx.send(line(&PrefetchEvent::Progress { bytes, source }));
            }
        });
        let result = agent.prefetch(&r, &record, &ptx).await;
        drop(ptx);
        let _ = relay.await;
        let last = match result {
            Ok(summary) => PrefetchEvent::Done(summary),
            Err(e) => PrefetchEvent::Error {
                message: e.to_string(),
            },
        };
        let _ = out_tx.send(line(&last));
    });
    let stream = futures::stream::unfold(out_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::new(Body::from_stream(stream))
}

async fn images(
    State(agent): State<Arc<Agent>>,
) -> Result<Json<Vec<ImageSummary>>, (StatusCode, String)> {
    let cache = agent.fetcher.cache.clone();
    let list = tokio::task::spawn_blocking(
        move || -> Result<Vec<ImageSummary>, crate::cache::CacheError> {
            let mut out = Vec::new();
            for (image, record) in cache.images()? {
                let mut cached = 0;
                for blob in record.blobs() {
                    if let Some(list) = cache.blob(&blob)? {
                        cached += cache.blob_cached_bytes(&list);
                    }
                }
                out.push(ImageSummary {
                    pinned: cache.pin_of(&image)?.is_some(),
                    image,
                    manifest_digest: record.manifest_digest,
                    total_bytes: record.total_size,
                    cached_bytes: cached,
                });
            }
            Ok(out)
        },
    )
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(list))
}

async fn status(State(agent): State<Arc<Agent>>) -> Json<Status> {
    let f = &agent.fetcher;
    let (blobs_in_flight, chunks_in_flight) = f.in_flight();
    Json(Status {
        blobs_in_flight,
        chunks_in_flight,
        mounts: agent.mounts.status().await,
        node_id: agent.node_id.clone(),
        cache_used_bytes: f.cache.used_bytes(),
        cache_quota_bytes: f.cache.quota(),
        cache_peak_used_bytes: f.cache.peak_used_bytes(),
        cache_inflated_bytes: f.cache.inflated_bytes(),
        cache_open_repair: f.cache.open_report().clone(),
        peers: agent
            .peers
            .all()
            .into_iter()
            .map(|p| PeerStatus {
                id: p.id,
                data_addr: p.data_addr.to_string(),
                penalty: p.penalty,
                zone: p.zone,
                rtt_us: p.rtt.map(|d| d.as_micros() as u64),
            })
            .collect(),
        control_requests: f
            .control
            .totals()
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect(),
        control_requests_by_blob: f
            .control
            .per_blob()
            .into_iter()
            .map(|(b, kinds)| {
                (
                    b,
                    kinds.into_iter().map(|(k, n)| (k.to_string(), n)).collect(),
                )
            })
            .collect(),
        swarm: match (&agent.config.swarm.enabled, &agent.config.swarm.key_file) {
            (true, _) => "on".into(),
            (false, None) => "off: no swarm.key_file".into(),
            (false, Some(_)) => "off: swarm.enabled = false".into(),
        },
        routing_table: agent.peers.routing_table(),
        bytes_from_cache: f.stats.from_cache.load(Ordering::Relaxed),
        bytes_from_peers: f.stats.from_peers.load(Ordering::Relaxed),
        bytes_from_proxy: f.stats.from_proxy.load(Ordering::Relaxed),
        bytes_from_proxy_pieces: agent.pieces.stats.read_bytes.load(Ordering::Relaxed)
            + agent.pieces.stats.completion_bytes.load(Ordering::Relaxed),
        proxy_url: f.proxy.base().to_string(),
        proxies: f
            .proxy
            .replicas()
            .health()
            .into_iter()
            .map(|(url, up)| ProxyReplicaStatus { url, up })
            .collect(),
    })
}

async fn gc(State(agent): State<Arc<Agent>>) -> Response {
    let cache = agent.fetcher.cache.clone();
    match tokio::task::spawn_blocking(move || cache.gc()).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn verify(State(agent): State<Arc<Agent>>) -> Response {
    let cache = agent.fetcher.cache.clone();
    match tokio::task::spawn_blocking(move || cache.verify_all()).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Body of `POST /v1/mount`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    pub image: String,
    pub dir: std::path::PathBuf,
}

/// Body of `POST /v1/umount`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UmountRequest {
    pub dir: std::path::PathBuf,
}

async fn mount(State(agent): State<Arc<Agent>>, Json(req): Json<MountRequest>) -> Response {
    match agent.mounts.mount(&req.image, &req.dir).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn umount(State(agent): State<Arc<Agent>>, Json(req): Json<UmountRequest>) -> Response {
    match agent.mounts.umount(&req.dir).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn chunk(
    State(agent): State<Arc<Agent>>,
    axum::extract::Path((id, layer, chunk)): axum::extract::Path<(String, usize, usize)>,
) -> Response {
    match agent.mounts.chunk(&id, layer, chunk).await {
        None => (
            StatusCode::NOT_FOUND,
            format!("mount {id} has no chunk {layer}/{chunk}"),
        )
            .into_response(),
        Some(Ok((bytes, fetched))) => (
            [(
                crate::mount_process::source::FETCHED_HEADER,
                if fetched { "1" } else { "0" },
            )],
            bytes,
        )
            .into_response(),
        Some(Err(e)) => {
            tracing::warn!(mount = %id, layer, chunk, error = %e, "a mount's chunk could not be had");
            (StatusCode::BAD_GATEWAY, e.to_string()).into_response()
        }
    }
}

async fn pieces(
    State(agent): State<Arc<Agent>>,
    axum::extract::Path((id, layer, chunk, first, count)): axum::extract::Path<(
        String,
        usize,
        usize,
        usize,
        usize,
    )>,
) -> Response {
    let wanted = first..first.saturating_add(count);
    match agent.mounts.pieces(&id, layer, chunk, wanted).await {
        None => (
            StatusCode::NOT_FOUND,
            format!("mount {id} has no pieces {first}+{count} of chunk {layer}/{chunk}"),
        )
            .into_response(),
        Some(Ok((bytes, fetched))) => (
            [(
                crate::mount_process::source::FETCHED_BYTES_HEADER,
                fetched.to_string(),
            )],
            bytes,
        )
            .into_response(),
        Some(Err(e)) => {
            tracing::warn!(mount = %id, layer, chunk, first, count, error = %e, "a mount's pieces could not be had");
            (StatusCode::BAD_GATEWAY, e.to_string()).into_response()
        }
    }
}

async fn window(
    State(agent): State<Arc<Agent>>,
    axum::extract::Path((id, layer, offset, len, sha)): axum::extract::Path<(
        String,
        usize,
        u64,
        u32,
        String,
    )>,
) -> Response {
    let Ok(sha256) = format!("sha256:{sha}").parse::<imgd_core::Digest>() else {
        return (StatusCode::BAD_REQUEST, "bad window digest").into_response();
    };
    let Some(record) = agent.mounts.live_record(&id) else {
        return (StatusCode::NOT_FOUND, format!("no mount {id}")).into_response();
    };
    let Some(digest) = record.layers.get(layer) else {
        return (
            StatusCode::NOT_FOUND,
            format!("mount {id} has no layer {layer}"),
        )
            .into_response();
    };
    let repo = crate::proxy_client::Repo {
        name: record.repo.clone(),
        ns: record.repo_ns.clone(),
    };
    let w = imgd_core::index::WindowRef {
        offset,
        len,
        sha256,
    };
    let bound = agent.config.mount.read_timeout();
    let fetch = agent.windows.window(&repo, digest, w);
    match tokio::time::timeout(bound, fetch).await {
        Ok(Ok(bytes)) => bytes.into_response(),
        Ok(Err(e)) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("no window {sha256} of layer {digest} within {bound:?}"),
        )
            .into_response(),
    }
}

/// Body of `POST /v1/pin`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PinRequest {
    pub image: String,
    /// True to pin (its chunks are never evicted), false to unpin.
    pub pinned: bool,
}

async fn pin(State(agent): State<Arc<Agent>>, Json(req): Json<PinRequest>) -> Response {
    let reference = match crate::image::ImageRef::parse(&req.image) {
        Ok(r) => r.to_string(),
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let cache = agent.fetcher.cache.clone();
    let result = tokio::task::spawn_blocking(move || {
        if cache.image(&reference)?.is_none() {
            return Ok(Err(format!("{reference} is not cached: prefetch it first")));
        }
        if req.pinned {
            cache.pin(&reference, "imgctl pin").map(Ok)
        } else {
            cache.unpin(&reference).map(|_| Ok(()))
        }
    })
    .await;
    match result {
        Ok(Ok(Ok(()))) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(Err(msg))) => (StatusCode::BAD_REQUEST, msg).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
