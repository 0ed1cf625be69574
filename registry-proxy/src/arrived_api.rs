//! The chunk API while a blob is ingested: which chunks have arrived, and their bytes.
//!
//! `GET /imgd/v1/blobs/{digest}/arrived?repo=&have=N` starts the blob's flight if it is
//! not stored (as any request for it does), then answers the chunks that are whole,
//! hashed and synced so far ([`ArrivedChunks`]), waiting (at most [`LONG_POLL`]) until
//! there are more than `have` or the flight ended. Such a chunk is served by
//! `GET /imgd/v1/chunks/{digest}` from the flight's temp file ([`arrived_chunk`]) until
//! the blob is stored. A chunk is only listed once whole and hashed; if the blob then
//! fails its digest, nothing is stored, and each chunk served was still right by its own
//! digest (which the agent checks).

use crate::access::{self, Kind};
use crate::chunk_api::{parse_digest, Authorized};
use crate::errors::ProxyError;
use crate::flight::FlightState;
use crate::ingest::Opened;
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::Json;
use bytes::Bytes;
use imgd_core::wire::ArrivedChunks;
use imgd_core::Digest;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for more chunks before answering what there is.
const LONG_POLL: Duration = Duration::from_secs(5);

/// Query of the arrived route.
#[derive(Deserialize)]
pub struct ArrivedQuery {
    repo: String,
    ns: Option<String>,
    /// Chunks the caller knows of already: answer once there are more.
    #[serde(default)]
    have: usize,
}

/// `GET /imgd/v1/blobs/{digest}/arrived?repo=&have=N`.
pub async fn arrived(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    Query(q): Query<ArrivedQuery>,
) -> Result<Json<ArrivedChunks>, ProxyError> {
    let digest = parse_digest(&digest)?;
    let route = state.upstreams.route(&q.repo, q.ns.as_deref())?;
    let stored = |list: imgd_core::ChunkList| ArrivedChunks {
        size: Some(list.size),
        chunks: list.chunks,
        done: true,
    };
    let flight = match state.ingestor.open(&route, digest)? {
        Opened::Stored(list) => {
            access::authorize(&state.storage, &route, &digest, Kind::Blob).await?;
            return Ok(Json(stored(list)));
        }
        Opened::Flight(f) => f,
    };
    let mut rx = flight.subscribe();
    let deadline = tokio::time::Instant::now() + LONG_POLL;
    let mut authorized = false;
    loop {
        let now = rx.borrow_and_update().clone();
        match now {
            FlightState::Failed(e) => return Err(e.into()),
            FlightState::Done(list) => {
                access::authorize(&state.storage, &route, &digest, Kind::Blob).await?;
                return Ok(Json(stored(list)));
            }
            FlightState::Receiving { size, .. } => {
                // Upstream answered: the route that started the flight may see it; another
                // one is asked for as a `/v2/` read of the flight would be.
                if !authorized && flight.access_key != access::key(&route, &digest) {
                    access::authorize(&state.storage, &route, &digest, Kind::Blob).await?;
                }
                authorized = true;
                let chunks = flight.arrived();
                if chunks.len() > q.have || tokio::time::Instant::now() >= deadline {
                    return Ok(Json(ArrivedChunks {
                        size,
                        chunks,
                        done: false,
                    }));
                }
            }
            FlightState::Connecting if tokio::time::Instant::now() >= deadline => {
                return Ok(Json(ArrivedChunks {
                    size: None,
                    chunks: Vec::new(),
                    done: false,
                }));
            }
            FlightState::Connecting => {}
        }
        // The flight holds the sender: `changed` fails only if it is gone, and then the
        // deadline ends the wait.
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The bytes of a chunk that has arrived in a running flight, checked against its digest
/// (`None`: no flight has it, or its file was just renamed into the store: look there).
pub async fn arrived_chunk(state: &AppState, digest: Digest) -> Option<Bytes> {
    let path = state.ingestor.arrived_chunk_path(&digest)?;
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .ok()?
        .ok()?;
    (Digest::of(&bytes) == digest).then(|| Bytes::from(bytes))
}
