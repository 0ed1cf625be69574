//! Pulling a blob from upstream into storage: verify, chunk, index, commit.
//!
//! One pass over the stream feeds two workers on blocking threads: the spool (sha256 of
//! the blob and of each 4 MiB chunk, chunks written to synced temp files as they arrive,
//! [`crate::spool`]) and the index builder (inflate with checkpoints, tar scan). For a
//! zstd layer the builder also writes the layer's seekable copy
//! ([`imgd_core::index::zstd_copy`]); it sends the copy's chunks to the spool, which
//! stages them with the blob's, and the packed windows of a gzip layer's checkpoints,
//! which the spool appends to a temp file ([`crate::window_spool`]). Only when the whole blob hashes to its digest are the
//! chunks renamed into the store and the chunk list, index and copy committed in one
//! metadata batch. On any failure the temp files are deleted: nothing is kept.
//!
//! Every uncached blob has one [`Flight`] (single flight, [`SingleFlight`]): clients read
//! it while it arrives ([`crate::flight`]) or wait for its end. It runs in its own task,
//! so clients that disconnect do not cancel it; if that task dies anyway (panic, runtime
//! shutdown), its guard removes the flight from the map and fails it for its readers, so
//! the next client starts a new ingest instead of waiting on a dead one.

use crate::flight::{Flight, FlightState};
use crate::ledger::FileKind;
use crate::peers::{PeerBlob, Peers};
use crate::refusals::Refusals;
use crate::routing::Route;
use crate::space::{Space, SpaceError};
use crate::storage::{Storage, StorageError};
use crate::upstream::{BlobStream, Upstream, UpstreamError};
use crate::window_spool::{ChannelWindows, WindowSpool};
use crate::Stats;
use bytes::Bytes;
use futures::StreamExt;
use imgd_core::index::{CopyChunk, IndexBuilder, IndexError, IndexOptions, LayerIndex};
use imgd_core::single_flight::{Join, Leader};
use imgd_core::store::StoreError;
use imgd_core::wire::IndexState;
use imgd_core::{ChunkList, Digest, SingleFlight};
use std::sync::atomic::Ordering;
use std::sync::Arc;
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

/// What [`Ingestor::open`] found: the stored blob, or its flight.
pub enum Opened {
    Stored(ChunkList),
    Flight(Arc<Flight>),
}

/// Running ingests: the leader is the ingest task, the shared part its [`Flight`].
type Flights = SingleFlight<Digest, (), Flight>;

/// The ingest task's hold on its flight. Finished, it leaves the map and publishes the
/// verdict; dropped unfinished (the task panicked or was aborted), it leaves the map and
/// fails the flight, so readers are told rather than left waiting.
struct FlightLead {
    /// `None` once finished.
    lead: Option<Leader<Digest, (), Flight>>,
    flight: Arc<Flight>,
}

impl FlightLead {
    fn new(lead: Leader<Digest, (), Flight>) -> Self {
        FlightLead {
            flight: lead.shared().clone(),
            lead: Some(lead),
        }
    }

    /// Leaves the map, then publishes `state` (the blob is stored first when `Done`).
    fn finish(mut self, state: FlightState) {
        if let Some(lead) = self.lead.take() {
            lead.finish(());
            self.flight.publish(state);
        }
    }
}

impl Drop for FlightLead {
    fn drop(&mut self) {
        if let Some(lead) = self.lead.take() {
            drop(lead);
            self.flight
                .publish(FlightState::Failed(Arc::new(IngestError::Worker(
                    "ingest abandoned before it ended".into(),
                ))));
        }
    }
}

/// Runs ingests with single flight per blob digest.
pub struct Ingestor {
    storage: Arc<Storage>,
    space: Arc<Space>,
    stats: Arc<Stats>,
    index_options: IndexOptions,
    refusals: Arc<Refusals>,
    /// Other replicas an uncached blob may be ingested from ([`crate::peers`]).
    peers: Arc<Peers>,
    flights: Flights,
}

impl Ingestor {
    /// An ingestor writing into the storage of `space`, indexing layers with
    /// `index_options`, remembering refused layers in `refusals` and asking `peers` for
    /// blobs before upstream.
    pub fn new(
        space: Arc<Space>,
        stats: Arc<Stats>,
        index_options: IndexOptions,
        refusals: Refusals,
        peers: Peers,
    ) -> Self {
        Ingestor {
            storage: space.storage_arc(),
            space,
            stats,
            index_options,
            refusals: Arc::new(refusals),
            peers: Arc::new(peers),
            flights: SingleFlight::new(),
        }
    }

    /// The chunk list of `digest`, ingesting it from the route's upstream first if it is
    /// not stored (waiting for the whole ingest). An ingest records the route in
    /// [`crate::storage::Access`]; a caller served a blob that was already stored (or
    /// that another route's ingest stored) authorizes it itself.
    pub async fn ensure(
        &self,
        route: &Route,
        digest: Digest,
    ) -> Result<ChunkList, Arc<IngestError>> {
        match self.open(route, digest)? {
            Opened::Stored(list) => Ok(list),
            Opened::Flight(f) => f.finished().await,
        }
    }

    /// The temp file of a chunk with `digest` that has arrived whole in a running flight.
    pub fn arrived_chunk_path(&self, digest: &Digest) -> Option<std::path::PathBuf> {
        self.flights
            .all_shared()
            .iter()
            .find_map(|f| f.arrived_chunk_path(digest))
    }

    /// The stored blob, or the flight ingesting it (started here if there is none).
    pub fn open(&self, route: &Route, digest: Digest) -> Result<Opened, Arc<IngestError>> {
        let wrap = |e: StorageError| Arc::new(IngestError::Storage(e));
        if let Some(list) = self.storage.blob(&digest).map_err(wrap)? {
            return Ok(Opened::Stored(list));
        }
        let new_flight = || {
            Flight::new(
                digest,
                crate::access::key(route, &digest),
                self.storage.dir.join("tmp").join("chunks"),
            )
        };
        let lead = match self.flights.join(digest, new_flight) {
            Join::Follower(f) => return Ok(Opened::Flight(f.shared().clone())),
            Join::Leader(lead) => FlightLead::new(lead),
        };
        // A flight that just ended left its blob stored before leaving the map. (A client
        // that joined this flight meanwhile reads the stored blob through it.)
        if let Some(list) = self.storage.blob(&digest).map_err(wrap)? {
            lead.finish(FlightState::Done(list.clone()));
            return Ok(Opened::Stored(list));
        }
        if let Some(r) = self.refusals.lookup(&self.storage, &digest).map_err(wrap)? {
            tracing::info!(%digest, reason = r.reason, "refused layer asked for again, answered from the negative cache");
            let e = Arc::new(IngestError::RememberedRefusal {
                digest,
                reason: r.reason,
                refused_at: r.refused_at,
                expires_at: r.expires_at,
            });
            lead.finish(FlightState::Failed(e.clone()));
            return Err(e);
        }
        let flight = lead.flight.clone();
        let span = tracing::info_span!("ingest", %digest, repo = route.repo);
        let run = Run {
            upstream: route.upstream.clone(),
            repo: route.repo.clone(),
            peers: self.peers.clone(),
            flight: flight.clone(),
            space: self.space.clone(),
            stats: self.stats.clone(),
            index_options: self.index_options,
        };
        let (refusals, storage) = (self.refusals.clone(), self.storage.clone());
        tokio::spawn(
            async move {
                let result = run
                    .ingest()
                    .await
                    .inspect_err(crate::metrics::ingest_failed);
                if let Err(IngestError::Refused { error, .. }) = &result {
                    if let Err(e) = refusals.remember(&storage, &digest, &error.to_string()) {
                        tracing::warn!(%digest, error = %e, "could not record the refusal");
                    }
                }
                lead.finish(match result {
                    Ok(list) => FlightState::Done(list),
                    Err(e) => FlightState::Failed(Arc::new(e)),
                });
            }
            .instrument(span),
        );
        Ok(Opened::Flight(flight))
    }
}

/// One ingest's inputs.
struct Run {
    upstream: Arc<Upstream>,
    repo: String,
    peers: Arc<Peers>,
    flight: Arc<Flight>,
    space: Arc<Space>,
    stats: Arc<Stats>,
    index_options: IndexOptions,
}

/// Where an ingest's bytes come from.
#[derive(Clone, Copy)]
enum Origin {
    Upstream,
    /// A peer replica ([`Peers::base`]).
    Peer(usize),
}

impl Run {
    async fn ingest(self) -> Result<ChunkList, IngestError> {
        let (blob, origin) = self.open_stream().await?;
        let peers = self.peers.clone();
        let result = self.ingest_stream(blob, origin).await;
        if let (Origin::Peer(i), Err(IngestError::Upstream(e))) = (origin, &result) {
            peers.mark_down(i, &format!("its blob failed: {e}"));
        }
        result
    }

    /// The blob's stream: from a peer replica that stores it, or from upstream. A peer is
    /// asked only once upstream confirmed that the repository holds the blob (or the
    /// route is on record), so peers never widen who sees what.
    async fn open_stream(&self) -> Result<(BlobStream, Origin), IngestError> {
        let digest = self.flight.digest;
        if !self.peers.is_empty() {
            let recorded = self
                .space
                .storage()
                .meta
                .contains::<crate::storage::Access>(&self.flight.access_key)
                .map_err(StorageError::from)?;
            if !recorded {
                self.upstream.check_blob(&self.repo, &digest).await?;
            }
            if let Some(PeerBlob { peer, stream }) = self.peers.blob(&digest).await {
                return Ok((stream, Origin::Peer(peer)));
            }
        }
        Ok((
            self.upstream.blob(&self.repo, &digest).await?,
            Origin::Upstream,
        ))
    }

    async fn ingest_stream(
        self,
        mut blob: BlobStream,
        origin: Origin,
    ) -> Result<ChunkList, IngestError> {
        let digest = self.flight.digest;
        let (bytes_counter, fetch_counter) = match origin {
            Origin::Upstream => (
                &self.stats.upstream_blob_bytes,
                &self.stats.upstream_blob_fetches,
            ),
            Origin::Peer(_) => (&self.stats.peer_blob_bytes, &self.stats.peer_blob_fetches),
        };
        self.flight.publish_received(blob.size, 0);
        let (chunk_tx, chunk_rx) = mpsc::channel(16);
        let (index_tx, index_rx) = mpsc::channel(16);
        let (space, flight, size) = (self.space.clone(), self.flight.clone(), blob.size);
        let chunker =
            tokio::task::spawn_blocking(move || spool_blob(chunk_rx, &space, flight, size));
        let opts = self.index_options;
        let copy_tx = chunk_tx.clone();
        let indexer =
            tokio::task::spawn_blocking(move || index_blob(index_rx, copy_tx, digest, opts));

        let mut received = 0u64;
        let mut failure = None;
        while let Some(piece) = blob.body.next().await {
            match piece {
                Ok(bytes) => {
                    received += bytes.len() as u64;
                    bytes_counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if index_tx.send(Some(bytes.clone())).await.is_err() {
                        break; // the indexer refused the layer; its error is reported below
                    }
                    if chunk_tx.send(ChunkMsg::Bytes(bytes)).await.is_err() {
                        break; // the spool failed; its error is reported below
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
        // The spool commits only after the index's verdict: a refused layer leaves nothing.
        let indexed = indexer
            .await
            .map_err(|e| IngestError::Worker(e.to_string()))?;
        let refused = match &indexed {
            Some(Err(error)) if error.is_hostile() && failure.is_none() => Some(error.clone()),
            _ => None,
        };
        if failure.is_none() && refused.is_none() {
            let index = match indexed {
                Some(Ok(index)) => Ok(Box::new(index)),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("blob stream aborted".into()),
            };
            let access_key = self.flight.access_key.clone();
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
        fetch_counter.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%digest, bytes = list.size, chunks = list.chunks.len(), index = ?index_state, "blob stored");
        Ok(list)
    }
}

/// Messages to the spool: the blob's bytes, then the order to commit with the index
/// verdict. A channel closed without `Commit` means the ingest failed: discard all.
enum ChunkMsg {
    Bytes(Bytes),
    /// A chunk of the layer's seekable copy (from the indexer).
    Copy(CopyChunk),
    /// The packed window of the next gzip checkpoint (from the indexer).
    Window(Vec<u8>),
    Commit {
        /// The layer index, or why there is none.
        index: Result<Box<LayerIndex>, String>,
        /// The access record to write with the blob.
        access_key: String,
    },
}

/// Spools the blob into chunk temp files (making room under the quota as it goes, and
/// publishing each piece to the flight's readers); commits them with the index and the
/// blob's records only if the blob matches its digest.
fn spool_blob(
    mut feed: mpsc::Receiver<ChunkMsg>,
    space: &Arc<Space>,
    flight: Arc<Flight>,
    size: Option<u64>,
) -> Result<(ChunkList, IndexState), IngestError> {
    let digest = flight.digest;
    let storage = space.storage();
    let mut claim = space.claim();
    let mut spool = crate::spool::Spool::new(flight, space.clone(), size);
    let mut copy_staging = storage.chunks.staging();
    let mut copy_chunks = Vec::new();
    let mut windows = WindowSpool::default();
    let (index, access_key) = loop {
        match feed.blocking_recv() {
            Some(ChunkMsg::Bytes(bytes)) => spool.push(&mut claim, &bytes)?,
            Some(ChunkMsg::Copy(c)) => {
                space.stage(
                    &mut claim,
                    &mut copy_staging,
                    FileKind::Chunk,
                    c.digest,
                    &c.bytes,
                )?;
                copy_chunks.push(c.digest);
            }
            Some(ChunkMsg::Window(w)) => windows.append(space, &mut claim, &storage.indexes, &w)?,
            Some(ChunkMsg::Commit { index, access_key }) => break (index, access_key),
            None => return Err(IngestError::Worker("blob stream aborted".into())),
        }
    };
    let list = spool.finish(digest)?;
    let mut index_staging = storage.indexes.staging();
    let mut copy = None;
    let index_state = match index {
        Ok(index) => {
            if let Some(c) = &index.copy {
                if c.chunks != copy_chunks {
                    return Err(IngestError::Worker(
                        "the seekable copy's chunks differ from those its index binds".into(),
                    ));
                }
                copy = Some(c.chunk_list());
            }
            // The stored index is the main part followed by the spooled windows.
            let main = index.encode_main();
            let windows_size = index.windows_size;
            drop(index);
            windows.stage_index(
                space,
                &mut claim,
                &mut index_staging,
                &storage.indexes,
                &main,
                windows_size,
            )?
        }
        Err(reason) => {
            // No index is stored: the spooled windows go, and their reservation.
            space.release(&mut claim, windows.len());
            drop(windows);
            IndexState::Unavailable { reason }
        }
    };
    let files = spool.take_files();
    // Without an index, the copy is not kept (its staged files are dropped).
    let staged = match copy {
        Some(_) => vec![index_staging, copy_staging],
        None => vec![index_staging],
    };
    space.commit(
        claim,
        files,
        staged,
        &list,
        &index_state,
        copy.as_ref(),
        &access_key,
    )?;
    if let Some(c) = &copy {
        tracing::info!(%digest, copy = %c.blob, bytes = c.size, chunks = c.chunks.len(), "seekable copy stored");
    }
    Ok((list, index_state))
}

/// Builds the layer index in the same pass, sending the chunks of a zstd layer's
/// seekable copy to the spool (`copy_to`) as they fill. A blob that is not a tar layer
/// gets an error, and the blob is still stored; a hostile layer's error ends the feed at
/// once (the receiver is dropped), which aborts the ingest. `None` if the feed was
/// aborted (or the spool stopped).
fn index_blob(
    mut feed: Feed,
    copy_to: mpsc::Sender<ChunkMsg>,
    digest: Digest,
    opts: IndexOptions,
) -> Option<Result<LayerIndex, IndexError>> {
    let window_to = copy_to.clone();
    let sink = ChannelWindows {
        send: move |w| window_to.blocking_send(ChunkMsg::Window(w)).is_ok(),
    };
    let mut builder = IndexBuilder::with_window_sink(opts, sink);
    let mut error = None;
    let send = |chunks: Vec<CopyChunk>| {
        chunks
            .into_iter()
            .try_for_each(|c| copy_to.blocking_send(ChunkMsg::Copy(c)).map_err(drop))
            .is_ok()
    };
    loop {
        match feed.blocking_recv() {
            Some(Some(bytes)) => {
                if error.is_none() {
                    error = builder.push(&bytes).err();
                    if let Some(e) = error.as_ref().filter(|e| e.is_hostile()) {
                        return Some(Err(e.clone()));
                    }
                    if !send(builder.take_copy_chunks()) {
                        return None;
                    }
                }
            }
            Some(None) => break,
            None => return None,
        }
    }
    Some(match error {
        Some(e) => Err(e),
        None => match builder.finish_parts(digest) {
            Ok(built) => {
                if !send(built.copy_chunks) {
                    return None;
                }
                Ok(built.index)
            }
            Err(e) => Err(e),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_aborted_ingest_task_leaves_no_flight_and_fails_its_readers() {
        let flights: Flights = SingleFlight::new();
        let digest = Digest::of(b"blob");
        let new_flight = || Flight::new(digest, "key".into(), "/nonexistent".into());
        let Join::Leader(lead) = flights.join(digest, new_flight) else {
            panic!("the first open leads");
        };
        let lead = FlightLead::new(lead);
        let Join::Follower(reader) = flights.join(digest, new_flight) else {
            panic!("a second open joins the flight");
        };
        let flight = reader.shared().clone();
        let task = tokio::spawn(async move {
            let _lead = lead;
            std::future::pending::<()>().await
        });
        tokio::task::yield_now().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(
            flights.is_empty(),
            "the aborted ingest's flight left the map"
        );
        let verdict = tokio::time::timeout(std::time::Duration::from_secs(5), flight.finished())
            .await
            .expect("readers are told, not left waiting");
        assert!(verdict.is_err(), "the flight failed");
        assert!(matches!(flights.join(digest, new_flight), Join::Leader(_)));
    }
}
