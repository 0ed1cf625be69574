//! The registry mirror endpoint: the OCI pull API for containerd (`hosts.toml`) and podman
//! (`registries.conf`). Manifests come through the proxy (or, when it is unreachable, from
//! the cache for images pulled before); blobs are assembled from chunks fetched through
//! the swarm into the cache, verified, and byte-identical to upstream.

use crate::agent::Agent;
use crate::proxy_client::{ProxyClientError, Repo};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use imgd_core::range::{parse_byte_range, RangeError};
use imgd_core::registry_path::{parse_registry_path, RegistryPath};
use imgd_core::{ChunkList, Digest, CHUNK_SIZE};
use std::collections::HashMap;
use std::sync::Arc;

/// The mirror's routes: the OCI pull API, and the operations endpoints `/metrics`,
/// `/healthz` (the process answers) and `/readyz` (storage and swarm up).
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(
            "/v2/",
            get(|| async { ([("Docker-Distribution-API-Version", "registry/2.0")], "{}") }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(dispatch)
        .with_state(agent)
}

/// `GET /metrics`: every metric as OpenMetrics text.
async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let mounts = agent.mounts.status().await;
    match crate::metrics_page::render(&agent, &mounts) {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /readyz`: 200 with `ready` and a line per check, else 503 with `not ready`.
async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    match crate::metrics_page::readiness(&agent) {
        (true, body) => body.into_response(),
        (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body).into_response(),
    }
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn proxy_error(e: &ProxyClientError) -> Response {
    match e {
        ProxyClientError::Status { status, body, .. } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.clone(),
            )
                .into_response()
        }
        other => oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", &other.to_string()),
    }
}

async fn dispatch(
    State(agent): State<Arc<Agent>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let head = method == Method::HEAD;
    let Some(path) = parse_registry_path(uri.path()) else {
        return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", uri.path());
    };
    let (name, reference) = match path {
        RegistryPath::Manifest { name, reference } | RegistryPath::Blob { name, reference } => {
            (name, reference)
        }
    };
    let repo = Repo {
        name: name.to_string(),
        ns: q.get("ns").cloned(),
    };
    match path {
        RegistryPath::Manifest { .. } => manifest(&agent, &repo, reference, &headers, head).await,
        RegistryPath::Blob { .. } => match reference.parse::<Digest>() {
            Ok(d) => blob(&agent, &repo, d, &headers, head).await,
            Err(e) => oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &e.to_string()),
        },
    }
}

fn manifest_response(bytes: Vec<u8>, media_type: &str, digest: &Digest, head: bool) -> Response {
    let len = bytes.len().to_string();
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    (
        [
            (header::CONTENT_TYPE.as_str(), media_type.to_string()),
            (header::CONTENT_LENGTH.as_str(), len),
            ("docker-content-digest", digest.to_string()),
        ],
        body,
    )
        .into_response()
}

async fn manifest(
    agent: &Agent,
    repo: &Repo,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let accept = imgd_core::registry_path::accepted_media_types(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    match agent.fetcher.proxy.manifest(repo, reference, &accept).await {
        Ok(m) => manifest_response(m.bytes.to_vec(), &m.media_type, &m.digest, head),
        Err(e @ ProxyClientError::Unreachable { .. }) => {
            // Offline: serve what an earlier pull of this image recorded.
            let key = if reference.starts_with("sha256:") {
                format!("{}@{reference}", repo.name)
            } else {
                format!("{}:{reference}", repo.name)
            };
            let by_ref = agent.fetcher.cache.image(&key).ok().flatten();
            let by_digest = reference.parse::<Digest>().ok().and_then(|d| {
                let images = agent.fetcher.cache.images().ok()?;
                images
                    .into_iter()
                    .map(|(_, r)| r)
                    .find(|r| r.manifest_digest == d)
            });
            match by_ref.or(by_digest) {
                Some(r) => manifest_response(r.manifest, &r.media_type, &r.manifest_digest, head),
                None => proxy_error(&e),
            }
        }
        Err(e) => proxy_error(&e),
    }
}

async fn blob(
    agent: &Agent,
    repo: &Repo,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let list = match agent.fetcher.fetch_blob(repo, &digest, &tx).await {
        Ok(list) => list,
        Err(crate::fetch::FetchError::Proxy(e)) => return proxy_error(&e),
        Err(e) => return oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", &e.to_string()),
    };
    let size = list.size;
    let range = match parse_byte_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    ) {
        Ok(r) => r,
        Err(RangeError::Unsatisfiable(_)) => {
            let mut r = oci_error(StatusCode::RANGE_NOT_SATISFIABLE, "UNSUPPORTED", "range");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, "UNSUPPORTED", &e.to_string()),
    };
    let served = range.clone().unwrap_or(0..size);
    let mut resp = if head || served.is_empty() {
        Response::new(Body::empty())
    } else {
        Response::new(chunks_body(
            agent.fetcher.cache.clone(),
            list,
            served.clone(),
        ))
    };
    let h = resp.headers_mut();
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set("content-type", "application/octet-stream".into());
    set("content-length", (served.end - served.start).to_string());
    set("docker-content-digest", digest.to_string());
    set("accept-ranges", "bytes".into());
    if range.is_some() {
        set(
            "content-range",
            format!("bytes {}-{}/{size}", served.start, served.end - 1),
        );
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    resp
}

/// Streams `range` of a cached blob, one verified chunk at a time.
fn chunks_body(
    cache: Arc<crate::cache::ChunkCache>,
    list: ChunkList,
    range: std::ops::Range<u64>,
) -> Body {
    let indices = list.chunks_covering(range.clone());
    let stream = futures::stream::iter(indices).then(move |i| {
        let cache = cache.clone();
        let chunk = list.chunks[i];
        let start = i as u64 * CHUNK_SIZE as u64;
        let range = range.clone();
        async move {
            let bytes = tokio::task::spawn_blocking(move || cache.get_chunk(&chunk.digest))
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)?
                .ok_or_else(|| {
                    std::io::Error::other(format!("chunk {} left the cache", chunk.digest))
                })?
                .into_bytes();
            let from = range.start.saturating_sub(start) as usize;
            let to = (range.end - start).min(bytes.len() as u64) as usize;
            crate::metrics::served("mirror", (to - from.min(to)) as u64);
            Ok::<_, std::io::Error>(bytes.slice(from.min(to)..to))
        }
    });
    Body::from_stream(stream)
}
