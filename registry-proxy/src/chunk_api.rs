//! The chunk API for agents: chunk lists, chunks by digest, counters (layer indexes:
//! [`crate::index_api`]).
//! Routes and answers are listed in [`imgd_core::wire`].
//!
//! With `[chunk_api] token` set, every route but `stats` requires
//! `Authorization: Bearer TOKEN` ([`Authorized`]); the token is compared in constant time.

use crate::access::{self, Kind};
use crate::errors::ProxyError;
use crate::server::AppState;
use crate::storage::{BlobIndexes, StorageError, Traces};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgd_core::wire::{BlobInfo, IndexState, StartupTrace, MAX_TRACE_PATHS, MAX_TRACE_RANGES};
use imgd_core::{ChunkList, Digest};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Proof that a request carries the chunk API token (or that none is configured).
pub struct Authorized;

impl FromRequestParts<Arc<AppState>> for Authorized {
    type Rejection = ProxyError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        use subtle::ConstantTimeEq as _;
        let Some(want) = &state.chunk_api_token else {
            return Ok(Authorized);
        };
        let sent = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Comparing digests keeps the time independent of the token's length too.
        let sent = Digest::of(sent.trim().as_bytes());
        if bool::from(sent.as_bytes().ct_eq(want.as_bytes())) {
            Ok(Authorized)
        } else {
            Err(ProxyError::Unauthorized)
        }
    }
}

/// Query of the blob and index routes: the repository to fetch from if not stored.
#[derive(Deserialize)]
pub struct RepoQuery {
    pub(crate) repo: Option<String>,
    pub(crate) ns: Option<String>,
}

pub(crate) fn parse_digest(s: &str) -> Result<Digest, ProxyError> {
    s.parse()
        .map_err(|e| ProxyError::BadRequest(format!("{e}")))
}

/// The chunk list of `digest`. With `?repo=`, the blob is fetched if not stored and the
/// repository must be allowed to see it ([`crate::access`]); without, only a stored blob
/// is answered (the chunk API's clients are trusted with everything cached).
pub(crate) async fn ensure(
    state: &AppState,
    digest: Digest,
    q: &RepoQuery,
) -> Result<ChunkList, ProxyError> {
    let Some(repo) = q.repo.as_deref() else {
        // Asked for counts as a use (LRU).
        drop(state.space.lease(&digest));
        return state.storage.blob(&digest)?.ok_or_else(|| {
            ProxyError::BlobUnknown(format!("{digest} (not stored; pass ?repo= to fetch it)"))
        });
    };
    let route = state.upstreams.route(repo, q.ns.as_deref())?;
    let (list, _lease) = crate::registry_api::leased_blob(state, &route, digest).await?;
    access::authorize(&state.storage, &route, &digest, Kind::Blob).await?;
    Ok(list)
}

pub(crate) fn index_state(state: &AppState, digest: &Digest) -> Result<IndexState, ProxyError> {
    Ok(state
        .storage
        .meta
        .get::<BlobIndexes>(digest)
        .map_err(StorageError::from)?
        .unwrap_or(IndexState::Unavailable {
            reason: "no index recorded".into(),
        }))
}

/// `GET /imgd/v1/blobs/{digest}?repo=`: the blob's chunk list and index state.
pub async fn blob_info(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    Query(q): Query<RepoQuery>,
) -> Result<Json<BlobInfo>, ProxyError> {
    let digest = parse_digest(&digest)?;
    let chunks = ensure(&state, digest, &q).await?;
    let index = index_state(&state, &digest)?;
    Ok(Json(BlobInfo { chunks, index }))
}

/// `GET /imgd/v1/blobs/{digest}/data`: a stored blob's bytes, for peer replicas
/// ([`crate::peers`]). Never fetches: a blob that is not stored is 404.
pub async fn blob_data(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
) -> Result<Response, ProxyError> {
    let digest = parse_digest(&digest)?;
    let unknown = || ProxyError::BlobUnknown(format!("{digest} (not stored here)"));
    let list = state.storage.blob(&digest)?.ok_or_else(unknown)?;
    let lease = state.space.lease(&digest).ok_or_else(unknown)?;
    let size = list.size;
    let body = crate::blob_body::blob_body(
        state.storage.clone(),
        state.stats.clone(),
        list,
        0..size,
        lease,
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `GET /imgd/v1/chunks/{digest}`: a stored chunk's bytes; with `Range: bytes=A-B`,
/// just those (206), so that an agent fetches only the pieces a read needs.
pub async fn chunk(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ProxyError> {
    let digest = parse_digest(&digest)?;
    let read_stored = || async {
        let store = state.clone();
        tokio::task::spawn_blocking(move || store.storage.chunks.read(&digest))
            .await
            .map_err(|e| ProxyError::BadRequest(e.to_string()))
    };
    // Stored, or arrived whole in a running flight (then renamed into the store at its
    // commit: looked for there once more).
    let bytes = match read_stored().await? {
        Err(imgd_core::store::StoreError::Missing(_)) => {
            match crate::arrived_api::arrived_chunk(&state, digest).await {
                Some(b) => Ok(b),
                None => read_stored().await?,
            }
        }
        other => other,
    }
    .map_err(|e| match e {
        imgd_core::store::StoreError::Missing(d) => ProxyError::BlobUnknown(format!("chunk {d}")),
        other => ProxyError::Storage(other.into()),
    })?;
    let size = bytes.len() as u64;
    let asked = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = crate::blob_body::parse_range(asked, size)?;
    let body = match &range {
        Some(r) => bytes.slice(r.start as usize..r.end as usize),
        None => bytes,
    };
    state.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
    state
        .stats
        .chunk_bytes_served
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let octets = (header::CONTENT_TYPE, "application/octet-stream".to_string());
    Ok(match range {
        Some(r) => (
            axum::http::StatusCode::PARTIAL_CONTENT,
            [
                octets,
                (
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{size}", r.start, r.end - 1),
                ),
            ],
            body,
        )
            .into_response(),
        None => ([octets], body).into_response(),
    })
}

/// `GET /imgd/v1/stats`: counters since start.
pub async fn stats(State(state): State<Arc<AppState>>) -> Json<imgd_core::wire::ProxyStats> {
    Json(state.stats.snapshot())
}

/// `GET /imgd/v1/traces/{manifest digest}`: the image's learned startup trace.
pub async fn get_trace(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
) -> Result<Json<StartupTrace>, ProxyError> {
    let digest = parse_digest(&digest)?;
    // A trace stored by an earlier version (without ranges) no longer decodes: none.
    match state.storage.meta.get::<Traces>(&digest).ok().flatten() {
        Some(t) => Ok(Json(t)),
        None => Err(ProxyError::BlobUnknown(format!(
            "startup trace of {digest}"
        ))),
    }
}

/// `PUT /imgd/v1/traces/{manifest digest}`: stores a startup trace unless one exists.
pub async fn put_trace(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    Json(trace): Json<StartupTrace>,
) -> Result<Response, ProxyError> {
    let digest = parse_digest(&digest)?;
    if trace.paths.len() > MAX_TRACE_PATHS
        || trace.paths.iter().any(|p| p.len() > 4096)
        || trace.reads.len() > trace.paths.len()
        || trace.reads.iter().any(|r| r.len() > MAX_TRACE_RANGES)
    {
        return Err(ProxyError::BadRequest("startup trace too large".into()));
    }
    let meta = &state.storage.meta;
    // A trace stored by an earlier version (without ranges) no longer decodes: replaced.
    if !matches!(meta.get::<Traces>(&digest), Ok(Some(_))) {
        meta.put::<Traces>(&digest, &trace)
            .map_err(StorageError::from)?;
    }
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// `GET /imgd/v1/verify`: a full verification pass over storage
/// ([`crate::verify::VerifyReport`]; `problems` is empty when storage is sound).
pub async fn verify(
    _: Authorized,
    State(state): State<Arc<AppState>>,
) -> Result<Json<crate::verify::VerifyReport>, ProxyError> {
    let storage = state.storage.clone();
    let report = tokio::task::spawn_blocking(move || crate::verify::verify(&storage))
        .await
        .map_err(|e| ProxyError::BadRequest(e.to_string()))??;
    Ok(Json(report))
}
