//! Pulling a blob from upstream into storage: verify, chunk, index, commit.
//!
//! One pass over the stream feeds two workers on blocking threads: the chunker (sha256 of
//! the blob and of each 4 MiB chunk, chunks staged to synced temp files) and the index
//! builder (inflate with checkpoints, tar scan). Only when the whole blob hashes to its
//! digest are the chunks renamed into the store and the chunk list and index committed in
//! one metadata batch. On any failure the staged files are deleted: nothing is kept.
//!
//! Requests for a blob already being ingested wait for that ingest (single flight); the
//! ingest runs in its own task, so a client that disconnects does not cancel it.

use crate::routing::Route;
use crate::storage::{Access, BlobIndexes, Blobs, Storage, StorageError};
use crate::upstream::{Upstream, UpstreamError};
use crate::Stats;
use bytes::Bytes;
use futures::StreamExt;
use imgd_core::index::{IndexBuilder, IndexError, IndexOptions, LayerIndex};
use imgd_core::store::StoreError;
use imgd_core::wire::IndexState;
use imgd_core::{ChunkList, Chunker, Digest};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::Instrument;

/// Errors of one ingest. Nothing is stored when one occurs.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("storing blob: {0}")]
    Storage(#[from] StorageError),
    #[error("ingest worker failed: {0}")]
    Worker(String),
    /// The layer broke an index limit or safety rule (see `IndexOptions`).
    #[error("layer {digest} refused: {error}")]
    Refused { digest: Digest, error: IndexError },
}

impl From<StoreError> for IngestError {
    fn from(e: StoreError) -> Self {
        IngestError::Storage(e.into())
    }
}

/// Messages to a worker: `Some(bytes)` of the blob, then `None` at a clean end. A channel
/// closed without `None` means the stream failed and the worker must discard its work.
type Feed = mpsc::Receiver<Option<Bytes>>;

/// Runs ingests with single flight per blob digest.
pub struct Ingestor {
    storage: Arc<Storage>,
    stats: Arc<Stats>,
    index_options: IndexOptions,
    inflight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl Ingestor {
    /// An ingestor writing into `storage`, indexing layers with `index_options`.
    pub fn new(storage: Arc<Storage>, stats: Arc<Stats>, index_options: IndexOptions) -> Self {
        Ingestor {
            storage,
            stats,
            index_options,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The chunk list of `digest`, ingesting it from the route's upstream first if it is
    /// not stored. An ingest records the route in [`Access`]; a caller served a blob that
    /// was already stored (or that another route's ingest stored) authorizes it itself.
    pub async fn ensure(
        &self,
        route: &Route,
        digest: Digest,
    ) -> Result<ChunkList, Arc<IngestError>> {
        let wrap = |e: StorageError| Arc::new(IngestError::Storage(e));
        if let Some(list) = self.storage.blob(&digest).map_err(wrap)? {
            return Ok(list);
        }
        let gate = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(digest).or_default().clone()
        };
        let _turn = gate.lock().await;
        let result = match self.storage.blob(&digest).map_err(wrap)? {
            Some(list) => Ok(list),
            None => {
                let span = tracing::info_span!("ingest", %digest, repo = route.repo);
                let task = tokio::spawn(
                    ingest(
                        route.upstream.clone(),
                        route.repo.clone(),
                        crate::access::key(route, &digest),
                        digest,
                        self.storage.clone(),
                        self.stats.clone(),
                        self.index_options,
                    )
                    .instrument(span),
                );
                match task.await {
                    Ok(r) => r
                        .inspect_err(crate::metrics::ingest_failed)
                        .map_err(Arc::new),
                    Err(e) => Err(Arc::new(IngestError::Worker(e.to_string()))),
                }
            }
        };
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&gate) <= 2 {
            map.remove(&digest);
        }
        result
    }
}

async fn ingest(
    upstream: Arc<Upstream>,
    repo: String,
    access_key: String,
    digest: Digest,
    storage: Arc<Storage>,
    stats: Arc<Stats>,
    index_options: IndexOptions,
) -> Result<ChunkList, IngestError> {
    let mut blob = upstream.blob(&repo, &digest).await?;
    let (chunk_tx, chunk_rx) = mpsc::channel(16);
    let (index_tx, index_rx) = mpsc::channel(16);
    let chunk_storage = storage.clone();
    let chunker = tokio::task::spawn_blocking(move || chunk_blob(chunk_rx, &chunk_storage, digest));
    let indexer = tokio::task::spawn_blocking(move || index_blob(index_rx, digest, index_options));

    let mut received = 0u64;
    let mut failure = None;
    while let Some(piece) = blob.body.next().await {
        match piece {
            Ok(bytes) => {
                received += bytes.len() as u64;
                stats
                    .upstream_blob_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if index_tx.send(Some(bytes.clone())).await.is_err() {
                    break; // the indexer refused the layer; its error is reported below
                }
                if chunk_tx.send(Some(bytes)).await.is_err() {
                    break; // the chunker failed; its error is reported below
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        match blob.size {
            Some(expected) if expected != received => {
                failure = Some(UpstreamError::Truncated {
                    got: received,
                    expected,
                })
            }
            _ => {
                let _ = index_tx.send(None).await;
            }
        }
    }
    drop(index_tx);
    // The chunker commits only after the index's verdict: a refused layer leaves nothing.
    let indexed = indexer
        .await
        .map_err(|e| IngestError::Worker(e.to_string()))?;
    let refused = match &indexed {
        Some(Err(error)) if error.is_hostile() && failure.is_none() => Some(error.clone()),
        _ => None,
    };
    if failure.is_none() && refused.is_none() {
        let _ = chunk_tx.send(None).await;
    }
    drop(chunk_tx);
    if let Some(error) = refused {
        let _ = chunker.await; // the feed ended without `None`: it discards its work
        tracing::warn!(%digest, %error, "layer refused, nothing stored");
        return Err(IngestError::Refused { digest, error });
    }
    let chunked = chunker
        .await
        .map_err(|e| IngestError::Worker(e.to_string()));
    if let Some(e) = failure {
        tracing::warn!(%digest, error = %e, "upstream blob failed, nothing stored");
        return Err(e.into());
    }
    let list = chunked??;
    let index_state = match indexed {
        Some(Ok(index)) => store_index(&storage, &index)?,
        Some(Err(e)) => IndexState::Unavailable {
            reason: e.to_string(),
        },
        None => IndexState::Unavailable {
            reason: "blob stream aborted".into(),
        },
    };
    let mut batch = storage.meta.batch();
    batch
        .put::<Blobs>(&digest, &list)
        .map_err(StorageError::from)?;
    batch
        .put::<BlobIndexes>(&digest, &index_state)
        .map_err(StorageError::from)?;
    batch
        .put::<Access>(&access_key, &true)
        .map_err(StorageError::from)?;
    storage.meta.write(batch).map_err(StorageError::from)?;
    stats.upstream_blob_fetches.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%digest, bytes = list.size, chunks = list.chunks.len(), index = ?index_state, "blob stored");
    Ok(list)
}

/// Chunks the blob into staged files; commits them only if the blob matches `digest`.
fn chunk_blob(mut feed: Feed, storage: &Storage, digest: Digest) -> Result<ChunkList, IngestError> {
    let mut staging = storage.chunks.staging();
    let mut chunker = Chunker::new();
    let mut stage = |_, c: imgd_core::ChunkRef, b: Bytes| staging.add(c.digest, &b);
    loop {
        match feed.blocking_recv() {
            Some(Some(bytes)) => chunker.push(&bytes, &mut stage)?,
            Some(None) => break,
            None => return Err(IngestError::Worker("blob stream aborted".into())),
        }
    }
    let list = chunker.finish(&mut stage)?;
    if list.blob != digest {
        return Err(UpstreamError::DigestMismatch {
            expected: digest,
            actual: list.blob,
        }
        .into());
    }
    staging.commit()?;
    Ok(list)
}

/// Builds the layer index in the same pass. A blob that is not a tar layer gets an
/// error, and the blob is still stored; a hostile layer's error ends the feed at once
/// (the receiver is dropped), which aborts the ingest. `None` if the feed was aborted.
fn index_blob(
    mut feed: Feed,
    digest: Digest,
    opts: IndexOptions,
) -> Option<Result<LayerIndex, IndexError>> {
    let mut builder = IndexBuilder::new(opts);
    let mut error = None;
    loop {
        match feed.blocking_recv() {
            Some(Some(bytes)) => {
                if error.is_none() {
                    error = builder.push(&bytes).err();
                    if let Some(e) = error.as_ref().filter(|e| e.is_hostile()) {
                        return Some(Err(e.clone()));
                    }
                }
            }
            Some(None) => break,
            None => return None,
        }
    }
    Some(match error {
        Some(e) => Err(e),
        None => builder.finish(digest),
    })
}

fn store_index(storage: &Storage, index: &LayerIndex) -> Result<IndexState, IngestError> {
    let encoded = index.encode();
    let digest = Digest::of(&encoded);
    storage.indexes.put(digest, &encoded)?;
    Ok(IndexState::Indexed {
        digest,
        size: encoded.len() as u64,
    })
}
