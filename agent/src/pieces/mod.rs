//! Partial chunks: the verified 64 KiB pieces of chunks that lazy reads needed.
//!
//! A lazy read needs a few hundred KiB of a 4 MiB chunk, so it fetches just the pieces
//! covering it ([`Pieces::read`]): from a peer that holds the chunk or its pieces (or is
//! fetching them, or owns the chunk among the hosts reading the image, waited for
//! boundedly: `fetch::read_swarm`), else by `Range` from the proxy; each piece checked
//! against its sha256 from the chunk list before it is stored or used. While a read
//! fetches pieces from the proxy the chunk is in flight in this host's have-maps, and
//! afterwards partial (also shown as in flight): peers ask for its pieces
//! ([`Pieces::stored_pieces`] answers them). Whole chunks stay the unit
//! of the cache, the P2P prefetch and dedup: a partial chunk is completed in the
//! background ([`Pieces::run_completer`]) once reads left it alone for a while, by
//! fetching its missing pieces, checking the whole chunk against its digest and putting
//! it into the chunk cache; its pieces are then removed.
//!
//! A chunk's life here ([`ChunkState`]): *absent* → *partial* (some pieces verified and
//! stored) → *complete* (in the chunk cache). What is on disk ([`store`]) is only ever
//! verified pieces and marks of partial chunks, so after `kill -9` a restarted agent
//! ([`Pieces::open`]) checks the pieces of every marked chunk again, drops any that does
//! not verify, and completes the chunk.
//!
//! A piece from a peer that does not match its digest gets the peer penalised (banned)
//! and the pieces are asked elsewhere. One from the proxy is an error (counted as a
//! verification failure of the proxy); the read then falls back to the whole chunk
//! through the fetcher (cache, peers, proxy), which verifies it as a whole.

mod for_peers;
pub mod store;

use crate::cache::ChunkCache;
use crate::chunk_state::Transition;
use crate::fetch::{Fetcher, Got, Want};
use crate::proxy_client::{ProxyClient, ProxyClientError};
use bytes::Bytes;
use imgd_core::chunk::pieces_in;
use imgd_core::{ChunkList, Digest, VerifiedChunk, VerifiedPieces, PIECE_SIZE};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{PartialMark, PieceStore};

/// How long a partial chunk is left alone by reads before it is completed.
pub const COMPLETE_AFTER: Duration = Duration::from_secs(10);

/// Errors getting pieces.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    #[error("chunk {index} of blob {blob} has no piece digests")]
    NoPieces { blob: Digest, index: usize },
    #[error("pieces {pieces:?} of chunk {index} of blob {blob}: out of range")]
    OutOfRange {
        blob: Digest,
        index: usize,
        pieces: Range<usize>,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyClientError),
    #[error("{from} sent piece {piece} of chunk {chunk} that does not match its digest")]
    Corrupt {
        from: &'static str,
        chunk: Digest,
        piece: usize,
    },
    #[error("storing pieces of chunk {chunk}: {message}")]
    Store { chunk: Digest, message: String },
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// Where a chunk is in its life, as far as pieces go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkState {
    /// No piece of it here.
    Absent,
    /// Some pieces verified and stored: `present[p]` for piece `p`.
    Partial { present: Vec<bool> },
    /// Whole and verified in the chunk cache.
    Complete,
}

/// A partial chunk being tracked.
struct Partial {
    mark: PartialMark,
    present: Vec<bool>,
    touched: Instant,
}

/// Piece counters since start.
#[derive(Default, Debug)]
pub struct PieceStats {
    /// Piece bytes fetched from the proxy for reads.
    pub read_bytes: AtomicU64,
    /// Piece bytes fetched from peers (for reads and completions).
    pub peer_bytes: AtomicU64,
    /// Bytes fetched to complete partial chunks.
    pub completion_bytes: AtomicU64,
    /// Pieces refused because they did not match their digest.
    pub corrupt: AtomicU64,
    /// Chunks completed from pieces.
    pub completed: AtomicU64,
}

/// The agent's partial chunks.
pub struct Pieces {
    store: Arc<PieceStore>,
    cache: Arc<ChunkCache>,
    proxy: ProxyClient,
    fetcher: Arc<Fetcher>,
    partial: Mutex<HashMap<Digest, Partial>>,
    gates: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    complete_after: Duration,
    pub stats: PieceStats,
    /// Blobs mounts read here, and the piece fetches running for peers ([`for_peers`]).
    for_peers: for_peers::ForPeers,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where missing pieces are fetched from.
#[derive(Clone, Copy)]
enum Sources {
    /// Peers that hold them, are fetching them or own the chunk, else the proxy.
    Swarm,
    /// The proxy (this host fetches them for a peer that found it the chunk's owner).
    Proxy,
}

/// Bytes a fetch of pieces got, by source.
#[derive(Default)]
struct FetchedBytes {
    proxy: u64,
    peers: u64,
}

/// Byte range of piece `p` in a chunk of `size` bytes.
fn piece_range(size: u32, p: usize) -> Range<u64> {
    let start = (p * PIECE_SIZE) as u64;
    start..(start + PIECE_SIZE as u64).min(u64::from(size))
}

impl Pieces {
    /// Opens the piece store of the fetcher's cache and takes back the partial chunks a
    /// previous run left: each stored piece is checked again (a damaged one is removed),
    /// and a chunk the cache meanwhile holds whole loses its pieces. Blocking.
    pub fn open(fetcher: Arc<Fetcher>, complete_after: Duration) -> Result<Pieces, PieceError> {
        let (cache, proxy) = (fetcher.cache.clone(), fetcher.proxy.clone());
        let store = PieceStore::open(cache.dir()).map_err(|e| PieceError::Store {
            chunk: Digest::of(b""),
            message: e.to_string(),
        })?;
        let mut partial = HashMap::new();
        for (chunk, mark) in store.marks() {
            if cache.has_chunk(&chunk) || mark.pieces.len() != pieces_in(mark.size) {
                mark.pieces.iter().for_each(|d| store.remove(d));
                store.unmark(&chunk);
                continue;
            }
            let present: Vec<bool> = mark.pieces.iter().map(|d| store.get(d).is_some()).collect();
            tracing::info!(%chunk, pieces = present.iter().filter(|p| **p).count(), of = present.len(), "partial chunk taken back");
            fetcher.reads.states.mark_partial(chunk);
            partial.insert(
                chunk,
                Partial {
                    mark,
                    present,
                    touched: Instant::now(),
                },
            );
        }
        Ok(Pieces {
            store: Arc::new(store),
            cache,
            proxy,
            fetcher,
            partial: Mutex::new(partial),
            gates: Mutex::new(HashMap::new()),
            complete_after,
            stats: PieceStats::default(),
            for_peers: Default::default(),
        })
    }

    /// The state of chunk `i` of `list`.
    pub fn state(&self, list: &ChunkList, i: usize) -> ChunkState {
        let Some(c) = list.chunks.get(i) else {
            return ChunkState::Absent;
        };
        if self.cache.has_chunk(&c.digest) {
            return ChunkState::Complete;
        }
        match lock(&self.partial).get(&c.digest) {
            Some(p) => ChunkState::Partial {
                present: p.present.clone(),
            },
            None => ChunkState::Absent,
        }
    }

    /// Pieces `first..first + count` of `chunk` for a peer, concatenated, if every one
    /// is here: from the whole chunk in the cache, else from stored pieces (each checked
    /// again as it is read). Blocking.
    pub fn stored_pieces(&self, chunk: &Digest, first: u32, count: u32) -> Option<Bytes> {
        let (first, count) = (first as usize, count as usize);
        let end = first.checked_add(count)?;
        if let Some(whole) = self.cache.get_chunk(chunk).ok().flatten() {
            let size = u32::try_from(whole.len()).ok()?;
            if count == 0 || end > pieces_in(size) {
                return None;
            }
            let a = piece_range(size, first).start as usize;
            let b = piece_range(size, end - 1).end as usize;
            return Some(whole.bytes().slice(a..b));
        }
        let digests = {
            let partial = lock(&self.partial);
            let p = partial.get(chunk)?;
            if count == 0 || end > p.present.len() || !p.present[first..end].iter().all(|x| *x) {
                return None;
            }
            p.mark.pieces[first..end].to_vec()
        };
        let mut out = bytes::BytesMut::new();
        for d in &digests {
            out.extend_from_slice(&self.store.get(d)?);
        }
        Some(out.freeze())
    }

    /// Partial chunks tracked now.
    pub fn partial_count(&self) -> usize {
        lock(&self.partial).len()
    }

    fn gate(&self, chunk: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.gates).entry(*chunk).or_default().clone()
    }

    fn release(&self, chunk: &Digest, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut gates = lock(&self.gates);
        if Arc::strong_count(&gate) <= 2 {
            gates.remove(chunk);
        }
    }

    /// Pieces `pieces` of chunk `i` of `list`, concatenated, and the bytes that had to be
    /// fetched for them: from the chunk cache if it holds the chunk, else stored pieces,
    /// else fetched from the proxy (verified, stored, and the chunk marked partial).
    pub async fn read(
        &self,
        list: &ChunkList,
        i: usize,
        pieces: Range<usize>,
    ) -> Result<(Bytes, u64), PieceError> {
        let (chunk, digests) = match (list.chunks.get(i), list.pieces_of(i)) {
            (Some(c), Some(d)) => (*c, d),
            _ => {
                return Err(PieceError::NoPieces {
                    blob: list.blob,
                    index: i,
                })
            }
        };
        if pieces.is_empty() || pieces.end > digests.len() {
            return Err(PieceError::OutOfRange {
                blob: list.blob,
                index: i,
                pieces,
            });
        }
        let bytes = piece_range(chunk.size, pieces.start).start
            ..piece_range(chunk.size, pieces.end - 1).end;
        if let Some(whole) = self.cache.get_chunk(&chunk.digest)? {
            return Ok((
                whole
                    .bytes()
                    .slice(bytes.start as usize..bytes.end as usize),
                0,
            ));
        }
        let gate = self.gate(&chunk.digest);
        let result = async {
            let _turn = gate.lock().await;
            self.read_locked(list, i, pieces, &bytes, Sources::Swarm)
                .await
        }
        .await;
        self.release(&chunk.digest, gate);
        result
    }

    async fn read_locked(
        &self,
        list: &ChunkList,
        i: usize,
        pieces: Range<usize>,
        bytes: &Range<u64>,
        sources: Sources,
    ) -> Result<(Bytes, u64), PieceError> {
        let chunk = list.chunks[i];
        let mark = PartialMark {
            blob: list.blob,
            index: i,
            size: chunk.size,
            pieces: list.pieces_of(i).unwrap_or_default().to_vec(),
        };
        let mut have = self.stored(&mark, pieces.clone()).await;
        let got = self
            .fetch_missing(&chunk.digest, &mark, &mut have, pieces.start, sources)
            .await?;
        self.stats
            .read_bytes
            .fetch_add(got.proxy, Ordering::Relaxed);
        self.stats
            .peer_bytes
            .fetch_add(got.peers, Ordering::Relaxed);
        let fetched = got.proxy + got.peers;
        let mut out = bytes::BytesMut::with_capacity((bytes.end - bytes.start) as usize);
        for piece in have.into_iter().flatten() {
            out.extend_from_slice(&piece);
        }
        Ok((out.freeze(), fetched))
    }

    /// The stored pieces `pieces` of the chunk `mark` describes (`None` where absent).
    async fn stored(&self, mark: &PartialMark, pieces: Range<usize>) -> Vec<Option<Bytes>> {
        let digests = mark.pieces[pieces].to_vec();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || digests.iter().map(|d| store.get(d)).collect())
            .await
            .unwrap_or_default()
    }

    /// Fetches the pieces missing from `have` (which holds pieces `first..`) from peers
    /// or the proxy, one request per run of missing pieces; verifies, stores and marks
    /// them. Returns the bytes fetched from each.
    async fn fetch_missing(
        &self,
        chunk: &Digest,
        mark: &PartialMark,
        have: &mut [Option<Bytes>],
        first: usize,
        sources: Sources,
    ) -> Result<FetchedBytes, PieceError> {
        let mut fetched = FetchedBytes::default();
        let mut k = 0;
        while k < have.len() {
            if have[k].is_some() {
                k += 1;
                continue;
            }
            let run_start = k;
            while k < have.len() && have[k].is_none() {
                k += 1;
            }
            let (a, b) = (first + run_start, first + k);
            let range = piece_range(mark.size, a).start..piece_range(mark.size, b - 1).end;
            let want = Want::Pieces {
                first: a,
                digests: &mark.pieces[a..b],
                len: (range.end - range.start) as usize,
            };
            let from_peer = match sources {
                Sources::Swarm => {
                    self.fetcher
                        .read_from_peers(&mark.blob, mark.index, *chunk, want)
                        .await
                }
                Sources::Proxy => None,
            };
            // In flight for peers while the proxy is asked; partial once kept. Pieces
            // from a peer were verified by the data plane client; the proxy's are here.
            // The fetch from the proxy stays in flight here (`flying`, which a read or a
            // fetch for a peer of overlapping pieces waits for) until its pieces are
            // stored and marked present, so that the waiter finds them.
            let (verified, flight, flying) = match from_peer {
                Some(Got::Pieces(pieces)) => {
                    fetched.peers += pieces.len() as u64;
                    tracing::debug!(target: "imgd_bytes", %chunk, first = a, count = b - a, "pieces from a peer");
                    (pieces, None, None)
                }
                _ => {
                    let waited = self.wait_for_overlapping(chunk, &(a..b)).await;
                    if waited || self.any_present(chunk, a..b) {
                        // A fetch here of some of these pieces ended meanwhile (one for
                        // a peer, or a read, while this one asked the peers): take what
                        // it stored and look at the run again.
                        let again = self.stored(mark, a..b).await;
                        let mut took = false;
                        for (j, p) in again.into_iter().enumerate() {
                            if p.is_some() {
                                have[a - first + j] = p;
                                took = true;
                            }
                        }
                        if took {
                            k = run_start;
                            continue;
                        }
                    }
                    let flight = self.fetcher.reads.states.begin(*chunk);
                    let flying = self.pieces_in_flight(*chunk, a..b);
                    let body = self.proxy.chunk_range(chunk, range.clone()).await?;
                    fetched.proxy += body.len() as u64;
                    tracing::debug!(target: "imgd_bytes", %chunk, first = a, count = b - a, for_peer = matches!(sources, Sources::Proxy), "pieces from the proxy");
                    let whole_range = body.len() as u64 == range.end - range.start;
                    let checked = VerifiedPieces::check(a, &mark.pieces[a..b], body)
                        .map_err(|e| e.piece)
                        .and_then(|p| if whole_range { Ok(p) } else { Err(b - 1) });
                    match checked {
                        Ok(pieces) => (pieces, flight, Some(flying)),
                        Err(piece) => {
                            crate::metrics::verification_failed("proxy");
                            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            return Err(PieceError::Corrupt {
                                from: "the proxy",
                                chunk: *chunk,
                                piece,
                            });
                        }
                    }
                }
            };
            let verified: Vec<(usize, Bytes)> = verified.pieces().collect();
            self.keep(chunk, mark, &verified).await?;
            if let Some(f) = flight {
                f.end(Transition::Pieces);
            } else {
                self.fetcher.reads.states.mark_partial(*chunk);
            }
            drop(flying);
            for (p, part) in verified {
                have[p - first] = Some(part);
            }
        }
        Ok(fetched)
    }

    /// Whether any of pieces `pieces` of `chunk` is stored here now.
    fn any_present(&self, chunk: &Digest, pieces: Range<usize>) -> bool {
        lock(&self.partial).get(chunk).is_some_and(|p| {
            p.present
                .get(pieces)
                .is_some_and(|run| run.iter().any(|x| *x))
        })
    }

    /// Stores verified pieces, marks the chunk partial and records them as present.
    async fn keep(
        &self,
        chunk: &Digest,
        mark: &PartialMark,
        pieces: &[(usize, Bytes)],
    ) -> Result<(), PieceError> {
        let (store, c, m) = (self.store.clone(), *chunk, mark.clone());
        let items: Vec<(Digest, Bytes)> = pieces
            .iter()
            .map(|(p, b)| (mark.pieces[*p], b.clone()))
            .collect();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            // The mark first: a piece on disk always belongs to a marked chunk, so a
            // restart finds every piece (and checks it again).
            store.mark(&c, &m).map_err(|e| e.to_string())?;
            for (d, b) in &items {
                store.put(d, b).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|message| PieceError::Store {
            chunk: *chunk,
            message,
        })?;
        let mut partial = lock(&self.partial);
        let entry = partial.entry(*chunk).or_insert_with(|| Partial {
            mark: mark.clone(),
            present: vec![false; mark.pieces.len()],
            touched: Instant::now(),
        });
        entry.touched = Instant::now();
        for (p, _) in pieces {
            if let Some(slot) = entry.present.get_mut(*p) {
                *slot = true;
            }
        }
        Ok(())
    }

    /// Completes partial chunks that reads left alone for `complete_after`, one at a
    /// time, forever (spawn it).
    pub async fn run_completer(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let due: Vec<Digest> = lock(&self.partial)
                .iter()
                .filter(|(_, p)| p.touched.elapsed() >= self.complete_after)
                .map(|(d, _)| *d)
                .collect();
            for chunk in due {
                if let Err(e) = self.complete(&chunk).await {
                    tracing::warn!(%chunk, error = %e, "completing a partial chunk failed; will retry");
                    if let Some(p) = lock(&self.partial).get_mut(&chunk) {
                        p.touched = Instant::now();
                    }
                }
            }
        }
    }

    /// Fetches the missing pieces of a partial chunk, checks the whole chunk, puts it
    /// into the cache and drops its pieces.
    pub async fn complete(&self, chunk: &Digest) -> Result<(), PieceError> {
        let gate = self.gate(chunk);
        let result = async {
            let _turn = gate.lock().await;
            let Some(mark) = lock(&self.partial).get(chunk).map(|p| p.mark.clone()) else {
                return Ok(());
            };
            if !self.cache.has_chunk(chunk) {
                let all = 0..mark.pieces.len();
                let mut have = self.stored(&mark, all).await;
                let got = self
                    .fetch_missing(chunk, &mark, &mut have, 0, Sources::Swarm)
                    .await?;
                self.stats
                    .completion_bytes
                    .fetch_add(got.proxy, Ordering::Relaxed);
                self.stats
                    .peer_bytes
                    .fetch_add(got.peers, Ordering::Relaxed);
                let mut whole = Vec::with_capacity(mark.size as usize);
                for piece in have.into_iter().flatten() {
                    whole.extend_from_slice(&piece);
                }
                let (cache, c) = (self.cache.clone(), *chunk);
                tokio::task::spawn_blocking(move || {
                    // The pieces were checked by their own digests; this binds them to
                    // the chunk's (a chunk list whose two disagree is caught here).
                    let whole =
                        VerifiedChunk::check(c, whole.into()).map_err(|_| PieceError::Corrupt {
                            from: "the chunk list (pieces vs chunk digest)",
                            chunk: c,
                            piece: 0,
                        })?;
                    cache.put_chunk(&whole).map_err(PieceError::from)
                })
                .await
                .map_err(|e| PieceError::Store {
                    chunk: *chunk,
                    message: e.to_string(),
                })??;
            }
            let (store, c, m) = (self.store.clone(), *chunk, mark.clone());
            let _ = tokio::task::spawn_blocking(move || {
                m.pieces.iter().for_each(|d| store.remove(d));
                store.unmark(&c);
            })
            .await;
            lock(&self.partial).remove(chunk);
            self.fetcher.reads.states.completed(chunk);
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%chunk, "partial chunk completed");
            Ok(())
        }
        .await;
        self.release(chunk, gate);
        result
    }
}
