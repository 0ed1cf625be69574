//! The OCI Distribution pull API: `/v2/`, manifests and blobs, with HEAD and `Range`.

use crate::access::{self, Kind};
use crate::blob_body::{blob_body, parse_range};
use crate::errors::ProxyError;
use crate::flight::{flight_body, Flight, FlightState};
use crate::ingest::Opened;
use crate::routing::{parse_registry_path, RegistryPath, Route};
use crate::server::AppState;
use crate::storage::{Access, Manifests, StoredManifest, Tags};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use imgd_core::Digest;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument;

const DIGEST_HEADER: &str = "Docker-Content-Digest";

/// `GET /v2/`: the API version check.
pub async fn version_check() -> Response {
    (
        [("Docker-Distribution-API-Version", "registry/2.0")],
        axum::Json(serde_json::json!({})),
    )
        .into_response()
}

/// Every other `/v2/...` request.
pub async fn dispatch(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    if method != Method::GET && method != Method::HEAD {
        return Ok(StatusCode::METHOD_NOT_ALLOWED.into_response());
    }
    let head = method == Method::HEAD;
    let ns = query.get("ns").map(String::as_str);
    match parse_registry_path(uri.path()) {
        Some(RegistryPath::Manifest { name, reference }) => {
            let route = state.upstreams.route(name, ns)?;
            let span = tracing::info_span!("pull_manifest", repo = name, reference);
            manifest(&state, &route, reference, &headers, head)
                .instrument(span)
                .await
        }
        Some(RegistryPath::Blob { name, reference }) => {
            let digest: Digest = reference
                .parse()
                .map_err(|e| ProxyError::BadRequest(format!("blob reference: {e}")))?;
            let route = state.upstreams.route(name, ns)?;
            let span = tracing::info_span!("pull_blob", repo = name, %digest);
            blob(&state, &route, digest, &headers, head)
                .instrument(span)
                .await
        }
        None => Err(ProxyError::NameUnknown(uri.path().to_string())),
    }
}

async fn manifest(
    state: &AppState,
    route: &Route,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ProxyError> {
    let accept = imgd_core::registry_path::accepted_media_types(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let (digest, m, stale) = resolve_manifest(state, route, reference, &accept).await?;
    let mut resp = manifest_response(&m, &digest, head);
    if stale {
        resp.headers_mut().insert(
            header::WARNING,
            header::HeaderValue::from_static(
                "110 imgd-proxy \"upstream unavailable, response is stale\"",
            ),
        );
    }
    Ok(resp)
}

/// A manifest by tag or digest: stored (by digest), else fetched from upstream and
/// stored; a tag whose upstream is unavailable gets its last known manifest, marked
/// stale (the `bool`).
pub async fn resolve_manifest(
    state: &AppState,
    route: &Route,
    reference: &str,
    accept: &[String],
) -> Result<(Digest, StoredManifest, bool), ProxyError> {
    let by_digest = reference.parse::<Digest>().ok();
    if let Some(d) = by_digest {
        if let Some(m) = state
            .storage
            .meta
            .get::<Manifests>(&d)
            .map_err(crate::storage::StorageError::from)?
        {
            access::authorize(&state.storage, route, &d, Kind::Manifest).await?;
            return Ok((d, m, false));
        }
    }
    let tag_key = format!("{}/{}:{reference}", route.upstream_name, route.repo);
    let fetched = route
        .upstream
        .manifest(
            &route.repo,
            reference,
            accept,
            state.config.max_manifest_bytes,
        )
        .await
        .inspect_err(crate::metrics::upstream_error);
    match fetched {
        Ok(m) => {
            let stored = StoredManifest {
                media_type: m.media_type,
                bytes: m.bytes.to_vec(),
            };
            state.space.note_manifest(m.digest, &stored);
            let mut batch = state.storage.meta.batch();
            batch
                .put::<Manifests>(&m.digest, &stored)
                .map_err(crate::storage::StorageError::from)?;
            if by_digest.is_none() {
                batch
                    .put::<Tags>(&tag_key, &m.digest)
                    .map_err(crate::storage::StorageError::from)?;
            }
            batch
                .put::<Access>(&access::key(route, &m.digest), &true)
                .map_err(crate::storage::StorageError::from)?;
            state
                .storage
                .meta
                .write(batch)
                .map_err(crate::storage::StorageError::from)?;
            Ok((m.digest, stored, false))
        }
        Err(e) if e.is_unavailable() && by_digest.is_none() => {
            let cached = state.storage.meta.get::<Tags>(&tag_key).ok().flatten();
            let stored = cached.and_then(|d| {
                let m = state.storage.meta.get::<Manifests>(&d).ok().flatten()?;
                Some((d, m))
            });
            match stored {
                Some((d, m)) => {
                    tracing::warn!(tag = tag_key, error = %e, "upstream unavailable, serving last known manifest");
                    Ok((d, m, true))
                }
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn manifest_response(m: &StoredManifest, digest: &Digest, head: bool) -> Response {
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.bytes.clone())
    };
    (
        [
            (header::CONTENT_TYPE, m.media_type.clone()),
            (header::CONTENT_LENGTH, m.bytes.len().to_string()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                digest.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

/// The chunk list of `digest`, ingesting it if not stored, with a lease that keeps it
/// from eviction while it is served. A blob evicted between the two is fetched again.
pub async fn leased_blob(
    state: &AppState,
    route: &Route,
    digest: Digest,
) -> Result<(imgd_core::ChunkList, crate::space::Lease), ProxyError> {
    for _ in 0..3 {
        let list = match state.storage.blob(&digest)? {
            Some(list) => list,
            None => state.ingestor.ensure(route, digest).await?,
        };
        if let Some(lease) = state.space.lease(&digest) {
            return Ok((list, lease));
        }
        tracing::info!(%digest, "blob evicted as it was asked for; fetching it again");
    }
    Err(ProxyError::BlobUnknown(format!(
        "{digest} (evicted again each time it was fetched: the quota is too small)"
    )))
}

/// Where a blob response's bytes come from.
enum Source {
    /// The stored chunks, leased for the response.
    Stored(imgd_core::ChunkList, crate::space::Lease),
    /// The flight ingesting it, whose upstream announced this size.
    Flight(Arc<Flight>, u64),
}

/// The stored blob, or its flight once upstream answered with a size. A flight without
/// one, or of at most one chunk (it arrives in moments, and its client then gets an
/// honest error status if it fails), is waited for. Authorized for `route` either way.
async fn blob_source(
    state: &AppState,
    route: &Route,
    digest: Digest,
) -> Result<Source, ProxyError> {
    for _ in 0..3 {
        match state.ingestor.open(route, digest)? {
            Opened::Stored(list) => {
                let Some(lease) = state.space.lease(&digest) else {
                    continue; // evicted just now: fetch it again
                };
                access::authorize(&state.storage, route, &digest, Kind::Blob).await?;
                return Ok(Source::Stored(list, lease));
            }
            Opened::Flight(flight) => match flight.started().await {
                FlightState::Receiving {
                    size: Some(size), ..
                } if size > imgd_core::CHUNK_SIZE as u64 => {
                    if flight.access_key != access::key(route, &digest) {
                        access::authorize(&state.storage, route, &digest, Kind::Blob).await?;
                    }
                    return Ok(Source::Flight(flight, size));
                }
                FlightState::Failed(e) => return Err(e.into()),
                FlightState::Receiving { .. } | FlightState::Connecting => {
                    flight.finished().await?;
                }
                FlightState::Done(_) => {}
            },
        }
    }
    Err(ProxyError::BlobUnknown(format!(
        "{digest} (evicted again each time it was fetched: the quota is too small)"
    )))
}

async fn blob(
    state: &AppState,
    route: &Route,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ProxyError> {
    let source = blob_source(state, route, digest).await?;
    let size = match &source {
        Source::Stored(list, _) => list.size,
        Source::Flight(_, size) => *size,
    };
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = parse_range(range_header, size)?;
    let (status, served) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.clone()),
        None => (StatusCode::OK, 0..size),
    };
    let mut resp = if head || served.is_empty() {
        Response::new(Body::empty())
    } else {
        Response::new(match source {
            Source::Stored(list, lease) => blob_body(
                state.storage.clone(),
                state.stats.clone(),
                list,
                served.clone(),
                lease,
            ),
            Source::Flight(flight, _) => flight_body(
                flight,
                state.space.clone(),
                state.stats.clone(),
                served.clone(),
            ),
        })
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    let pairs = [
        (
            header::CONTENT_LENGTH.as_str(),
            (served.end - served.start).to_string(),
        ),
        (DIGEST_HEADER, digest.to_string()),
    ];
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::try_from(k),
            header::HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    }
    if range.is_some() {
        if let Ok(v) = header::HeaderValue::from_str(&format!(
            "bytes {}-{}/{size}",
            served.start,
            served.end - 1
        )) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}
