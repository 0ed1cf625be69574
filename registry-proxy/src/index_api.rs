//! Layer indexes for agents, in two parts ([`imgd_core::index::format`]): the main part
//! (file table and checkpoints, with each window's location and sha256), which an agent
//! fetches before a mount, and the windows part, of which it fetches ranges, one window
//! at a time, as reads need them. Both are read from the one stored index file.

use crate::chunk_api::{ensure, index_state, parse_digest, Authorized, RepoQuery};
use crate::errors::ProxyError;
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use imgd_core::index::format::HEADER_LEN;
use imgd_core::index::LayerIndex;
use imgd_core::wire::{IndexState, INDEX_DIGEST_HEADER};
use imgd_core::Digest;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Which part of a stored index to read.
enum Part {
    Main,
    /// The windows part, or the range of it a `Range` header asks for.
    Windows(Option<String>),
}

/// What was read: the bytes, and for a range, where they are in the windows part and its size.
struct Read {
    bytes: Vec<u8>,
    range: Option<(Range<u64>, u64)>,
}

/// Reads `part` of the stored index file `idx` (blocking): its header first, for the
/// main part's length, then only the bytes asked for.
fn read_part(state: &AppState, idx: &Digest, part: Part) -> Result<Read, ProxyError> {
    let path = state.storage.indexes.path(idx);
    let file = std::fs::File::open(&path)
        .map_err(|e| ProxyError::BlobUnknown(format!("index {idx}: {e}")))?;
    let io = |e: std::io::Error| ProxyError::BadRequest(format!("reading index {idx}: {e}"));
    let size = file.metadata().map_err(io)?.len();
    let mut head = [0u8; HEADER_LEN];
    file.read_exact_at(&mut head, 0).map_err(io)?;
    // The header says where the main part ends; an index of another version is refused
    // here (and by the agent).
    let main = LayerIndex::main_len_in_header(&head)
        .map_err(|e| ProxyError::BlobUnknown(format!("index {idx}: {e}")))?;
    if main > size {
        return Err(ProxyError::BlobUnknown(format!("index {idx} is truncated")));
    }
    let (range, windows) = match part {
        Part::Main => (0..main, None),
        Part::Windows(asked) => {
            let total = size - main;
            let r = crate::blob_body::parse_range(asked.as_deref(), total)?.unwrap_or(0..total);
            (main + r.start..main + r.end, Some((r, total)))
        }
    };
    let mut bytes = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut bytes, range.start).map_err(io)?;
    Ok(Read {
        bytes,
        range: windows,
    })
}

async fn read(
    state: &Arc<AppState>,
    digest: &str,
    q: &RepoQuery,
    part: Part,
) -> Result<(Digest, Read), ProxyError> {
    let digest = parse_digest(digest)?;
    ensure(state, digest, q).await?;
    match index_state(state, &digest)? {
        IndexState::Indexed { digest: idx, .. } => {
            let st = state.clone();
            let read = tokio::task::spawn_blocking(move || read_part(&st, &idx, part))
                .await
                .map_err(|e| ProxyError::BadRequest(e.to_string()))??;
            Ok((idx, read))
        }
        IndexState::Unavailable { reason } => Err(ProxyError::BlobUnknown(format!(
            "index of {digest}: {reason}"
        ))),
    }
}

/// `GET /imgd/v1/indexes/{layer digest}?repo=`: the main part of the layer's index.
pub async fn index(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    Query(q): Query<RepoQuery>,
) -> Result<Response, ProxyError> {
    let (idx, read) = read(&state, &digest, &q, Part::Main).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/vnd.imgd.index.v1".to_string(),
            ),
            (INDEX_DIGEST_HEADER, idx.to_string()),
        ],
        read.bytes,
    )
        .into_response())
}

/// `GET /imgd/v1/indexes/{layer digest}/windows?repo=`: the windows part of the layer's
/// index; with `Range: bytes=A-B`, just those (206), so that an agent fetches one window.
pub async fn windows(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    Query(q): Query<RepoQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ProxyError> {
    let asked = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ranged = asked.is_some();
    let (_, read) = read(&state, &digest, &q, Part::Windows(asked)).await?;
    let octets = (header::CONTENT_TYPE, "application/octet-stream".to_string());
    Ok(match read.range {
        Some((r, total)) if ranged => (
            axum::http::StatusCode::PARTIAL_CONTENT,
            [
                octets,
                (
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{total}", r.start, r.end.saturating_sub(1)),
                ),
            ],
            read.bytes,
        )
            .into_response(),
        _ => ([octets], read.bytes).into_response(),
    })
}
