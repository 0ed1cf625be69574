//! Layer indexes for agents, in two parts ([`imgd_core::index::format`]): the main part
//! (file table and checkpoints, with each window's location and sha256), which an agent
//! fetches before a mount, and the windows part, of which it fetches ranges, one window
//! at a time, as reads need them. Both are read from the one stored index file, and
//! streamed from it 1 MiB at a time (a layer of random data has 128 MiB of windows per
//! GiB: a whole windows part is never held in memory).

use crate::chunk_api::{ensure, index_state, parse_digest, Authorized, RepoQuery};
use crate::errors::ProxyError;
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use imgd_core::index::format::HEADER_LEN;
use imgd_core::index::LayerIndex;
use imgd_core::wire::{IndexState, LayerParts, PartRef, INDEX_DIGEST_HEADER};
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

/// Largest piece of an index file read at once.
const READ_PIECE: u64 = 1 << 20;

/// What to send: the open index file and the bytes of it asked for, and for the windows
/// part, where they are in it and its size.
struct Read {
    file: Arc<std::fs::File>,
    bytes: Range<u64>,
    range: Option<(Range<u64>, u64)>,
}

impl Read {
    fn len(&self) -> u64 {
        self.bytes.end - self.bytes.start
    }

    /// The bytes, streamed from the file a piece at a time (the open file stays readable
    /// if the index is evicted meanwhile).
    fn body(self) -> axum::body::Body {
        let file = self.file;
        let pieces = (self.bytes.start..self.bytes.end)
            .step_by(READ_PIECE as usize)
            .map(move |at| (at, (self.bytes.end - at).min(READ_PIECE)));
        let stream = futures::stream::iter(pieces).then(move |(at, len)| {
            let file = file.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, at)?;
                    Ok::<_, std::io::Error>(bytes::Bytes::from(buf))
                })
                .await
                .map_err(std::io::Error::other)?
            }
        });
        axum::body::Body::from_stream(stream)
    }
}

/// Opens the stored index file `idx` (blocking) and reads its header, for the main
/// part's length: where `part` is in the file.
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
    Ok(Read {
        file: Arc::new(file),
        bytes: range,
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
    read_indexed(state, &digest, part).await
}

/// [`read`] of a layer known to be stored.
async fn read_indexed(
    state: &Arc<AppState>,
    digest: &Digest,
    part: Part,
) -> Result<(Digest, Read), ProxyError> {
    match index_state(state, digest)? {
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
    state
        .stats
        .index_bytes_served
        .fetch_add(read.len(), std::sync::atomic::Ordering::Relaxed);
    Ok((
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/vnd.imgd.index.v1".to_string(),
            ),
            (header::CONTENT_LENGTH.as_str(), read.len().to_string()),
            (INDEX_DIGEST_HEADER, idx.to_string()),
        ],
        read.body(),
    )
        .into_response())
}

/// `GET /imgd/v1/layers/{layer digest}/parts?repo=`: what a mount needs of the layer,
/// named ([`LayerParts`]): the sha256 (its trailer) and length of the index's main part,
/// and the sha256 and length of the chunk list's canonical bytes, so that an agent can
/// take them from a peer and check them.
pub async fn parts(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    Query(q): Query<RepoQuery>,
) -> Result<axum::Json<LayerParts>, ProxyError> {
    let layer = parse_digest(&digest)?;
    let list = ensure(&state, layer, &q).await?;
    let (idx, read) = read_indexed(&state, &layer, Part::Main).await?;
    let trailer_at = read
        .bytes
        .end
        .checked_sub(32)
        .filter(|at| *at >= HEADER_LEN as u64);
    let Some(at) = trailer_at else {
        return Err(ProxyError::BlobUnknown(format!("index {idx} is truncated")));
    };
    let file = read.file.clone();
    let (trailer, list_bytes) = tokio::task::spawn_blocking(move || {
        let mut t = [0u8; 32];
        let canonical = list.canonical_bytes();
        file.read_exact_at(&mut t, at)
            .map(|()| (t, (Digest::of(&canonical), canonical.len() as u64)))
    })
    .await
    .map_err(|e| ProxyError::BadRequest(e.to_string()))?
    .map_err(|e| ProxyError::BadRequest(format!("reading index {idx}: {e}")))?;
    Ok(axum::Json(LayerParts {
        index_main: PartRef {
            sha256: Digest::from_bytes(trailer),
            len: read.len(),
        },
        chunk_list: PartRef {
            sha256: list_bytes.0,
            len: list_bytes.1,
        },
    }))
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
    state
        .stats
        .window_bytes_served
        .fetch_add(read.len(), std::sync::atomic::Ordering::Relaxed);
    let octets = (header::CONTENT_TYPE, "application/octet-stream".to_string());
    let length = (header::CONTENT_LENGTH, read.len().to_string());
    Ok(match read.range.clone() {
        Some((r, total)) if ranged => (
            axum::http::StatusCode::PARTIAL_CONTENT,
            [
                octets,
                length,
                (
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{total}", r.start, r.end.saturating_sub(1)),
                ),
            ],
            read.body(),
        )
            .into_response(),
        _ => ([octets, length], read.body()).into_response(),
    })
}
