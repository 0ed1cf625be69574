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

use crate::ledger::FileKind;
use crate::refusals::Refusals;
use crate::routing::Route;
use crate::space::{Space, SpaceError};
use crate::storage::{Storage, StorageError};
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
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("ingest worker failed: {0}")]
    Worker(String),
    /// The layer broke an index limit or safety rule (see `IndexOptions`).
    #[error("layer {digest} refused: {error}")]
    Refused { digest: Digest, error: IndexError },
    /// The layer was refused earlier and the refusal is remembered (the negative cache).
    #[error("layer {digest} refused: {reason} (remembered since {refused_at}, not fetched again before {expires_at}; times in seconds since the Unix epoch)")]
    RememberedRefusal {
        digest: Digest,
        reason: String,
        refused_at: u64,
        expires_at: u64,
    },
}

impl From<StoreError> for IngestError {
    fn from(e: StoreError) -> Self {
        IngestError::Storage(e.into())
    }
}

/// Messages to the indexer: `Some(bytes)` of the blob, then `None` at a clean end. A channel
/// closed without `None` means the stream failed and the indexer must discard its work.
type Feed = mpsc::Receiver<Option<Bytes>>;

/// Runs ingests with single flight per blob digest.
pub struct Ingestor {
    storage: Arc<Storage>,
    space: Arc<Space>,
    stats: Arc<Stats>,
    index_options: IndexOptions,
    refusals: Refusals,
    inflight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl Ingestor {
    /// An ingestor writing into the storage of `space`, indexing layers with `index_options` and
    /// remembering refused layers in `refusals`.
    pub fn new(
        space: Arc<Space>,
        stats: Arc<Stats>,
        index_options: IndexOptions,
        refusals: Refusals,
    ) -> Self {
        Ingestor {
            storage: space.storage_arc(),
            space,
            stats,
            index_options,
            refusals,
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
            None => match self.refusals.lookup(&self.storage, &digest).map_err(wrap)? {
                Some(r) => {
                    tracing::info!(%digest, reason = r.reason, "refused layer asked for again, answered from the negative cache");
                    Err(Arc::new(IngestError::RememberedRefusal {
                        digest,
                        reason: r.reason,
                        refused_at: r.refused_at,
                        expires_at: r.expires_at,
                    }))
                }
                None => self.run(route, digest).await,
            },
        };
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&gate) <= 2 {
            map.remove(&digest);
        }
        result
    }

    /// Runs one ingest in its own task; a refusal is remembered.
    async fn run(&self, route: &Route, digest: Digest) -> Result<ChunkList, Arc<IngestError>> {
        {
            {
                let span = tracing::info_span!("ingest", %digest, repo = route.repo);
                let task = tokio::spawn(
                    ingest(
                        route.upstream.clone(),
                        route.repo.clone(),
                        crate::access::key(route, &digest),
                        digest,
                        self.space.clone(),
                        self.stats.clone(),
                        self.index_options,
                    )
                    .instrument(span),
                );
                let result = match task.await {
                    Ok(r) => r.inspect_err(crate::metrics::ingest_failed),
                    Err(e) => Err(IngestError::Worker(e.to_string())),
                };
                if let Err(IngestError::Refused { error, .. }) = &result {
                    if let Err(e) =
                        self.refusals
                            .remember(&self.storage, &digest, &error.to_string())
                    {
                        tracing::warn!(%digest, error = %e, "could not record the refusal");
                    }
                }
                result.map_err(Arc::new)
            }
        }
    }
}

async fn ingest(
    upstream: Arc<Upstream>,
    repo: String,
    access_key: String,
    digest: Digest,
    space: Arc<Space>,
    stats: Arc<Stats>,
    index_options: IndexOptions,
) -> Result<ChunkList, IngestError> {
    let mut blob = upstream.blob(&repo, &digest).await?;
    let (chunk_tx, chunk_rx) = mpsc::channel(16);
    let (index_tx, index_rx) = mpsc::channel(16);
    let chunker = tokio::task::spawn_blocking(move || chunk_blob(chunk_rx, &space, digest));
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
                if chunk_tx.send(ChunkMsg::Bytes(bytes)).await.is_err() {
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
        let index = match indexed {
            Some(Ok(index)) => Ok(index),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("blob stream aborted".into()),
        };
        let _ = chunk_tx.send(ChunkMsg::Commit { index, access_key }).await;
    }
    drop(chunk_tx);
    if let Some(error) = refused {
        let _ = chunker.await; // the feed ended without a commit: it discards its work
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
    let (list, index_state) = chunked??;
    stats.upstream_blob_fetches.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%digest, bytes = list.size, chunks = list.chunks.len(), index = ?index_state, "blob stored");
    Ok(list)
}

/// Messages to the chunker: the blob's bytes, then the order to commit with the index
/// verdict. A channel closed without `Commit` means the ingest failed: discard all.
enum ChunkMsg {
    Bytes(Bytes),
    Commit {
        /// The layer index, or why there is none.
        index: Result<LayerIndex, String>,
        /// The [`Access`] record to write with the blob.
        access_key: String,
    },
}

/// Chunks the blob into staged files (making room under the quota as it goes); commits
/// them with the index and the blob's records only if the blob matches `digest`.
fn chunk_blob(
    mut feed: mpsc::Receiver<ChunkMsg>,
    space: &Arc<Space>,
    digest: Digest,
) -> Result<(ChunkList, IndexState), IngestError> {
    let storage = space.storage();
    let mut claim = space.claim();
    let mut staging = storage.chunks.staging();
    let mut chunker = Chunker::new();
    let (list, index, access_key) = {
        let mut stage = |_, c: imgd_core::ChunkRef, b: Bytes| {
            space.stage(&mut claim, &mut staging, FileKind::Chunk, c.digest, &b)
        };
        let (index, access_key) = loop {
            match feed.blocking_recv() {
                Some(ChunkMsg::Bytes(bytes)) => chunker.push(&bytes, &mut stage)?,
                Some(ChunkMsg::Commit { index, access_key }) => break (index, access_key),
                None => return Err(IngestError::Worker("blob stream aborted".into())),
            }
        };
        (chunker.finish(&mut stage)?, index, access_key)
    };
    if list.blob != digest {
        return Err(UpstreamError::DigestMismatch {
            expected: digest,
            actual: list.blob,
        }
        .into());
    }
    let mut index_staging = storage.indexes.staging();
    let index_state = match index {
        Ok(index) => {
            let encoded = index.encode();
            let idx = Digest::of(&encoded);
            space.stage(
                &mut claim,
                &mut index_staging,
                FileKind::Index,
                idx,
                &encoded,
            )?;
            IndexState::Indexed {
                digest: idx,
                size: encoded.len() as u64,
            }
        }
        Err(reason) => IndexState::Unavailable { reason },
    };
    space.commit(
        claim,
        vec![staging, index_staging],
        &list,
        &index_state,
        &access_key,
    )?;
    Ok((list, index_state))
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
