//! Lazy reads in the swarm: a mount's reads (whole chunks, or the 64 KiB pieces of
//! [`crate::pieces`]) share the proxy's work with the peers reading the same image.
//!
//! - **In flight, visible**: while a read fetches a chunk (or pieces of it) from the
//!   proxy, the chunk is *in flight* here ([`ReadStates`], the states of
//!   [`crate::chunk_state`]); after a read that got pieces it stays *partial*. Both show
//!   as in flight in this host's have-maps, and a peer asking for the chunk or its pieces
//!   is told `Pending` while the fetch runs.
//! - **Ownership**: every chunk has one owner among the hosts reading its blob (this host
//!   and the peers whose have-map knows the blob), by rendezvous hashing of the chunk
//!   digest and node ids ([`imgd_core::rendezvous`]), so hosts that read the same chunk
//!   at the same moment agree, without talking, on who asks the proxy for it.
//! - **Waiting, bounded**: a read that finds no peer holding its bytes asks the peers
//!   that have the chunk in flight and the chunk's owner directly, again every
//!   [`POLL`], while one of them answers `Pending` (at most `peer_timeout`) or, while the
//!   owner has not sent it, at most `read_owner_wait`. The owner fetches the pieces a
//!   peer asks for ([`crate::pieces`]'s `for_peers`) and windows ([`crate::window_share`])
//!   and answers `Pending` meanwhile; an owner saying "not here" sees other hosts reading
//!   the blob than this host does, and this host's view is renewed. Then (or at once, when
//!   this host owns the chunk) it fetches from the proxy itself. A dead or slow peer so costs
//!   time within those bounds, never a read: the mount's read bound still ends every read.
//!
//! Every byte from a peer is verified before use (whole chunks by their digest, pieces
//! each by its digest from the chunk list, in [`crate::dataplane::PeerClient`]); a peer
//! that sends wrong bytes is penalised ([`crate::peers::CORRUPT_PENALTY`] bans it) and
//! the read goes on with the next source.

use super::{weight, Changes, Fetcher, Source};
use crate::chunk_state::{ChunkState, Fetcher as By, Transition};
use crate::dataplane::{Answer, DataPlaneError, HaveMap, LayerPart};
use crate::peers::Peer;
use crate::proxy_client::Repo;
use bytes::Bytes;
use imgd_core::index::WindowRef;
use imgd_core::wire::PartRef;
use imgd_core::{Digest, SingleFlight, VerifiedChunk, VerifiedPieces};
use rand::seq::SliceRandom;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a read waiting for a peer asks it again.
pub const POLL: Duration = Duration::from_millis(15);

/// How long the peers' have-maps of a blob are reused by reads before being asked again.
const MAP_AGE: Duration = Duration::from_millis(150);

/// Peers' have-maps of one blob, by peer id.
type Maps = Arc<HashMap<String, HaveMap>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The chunks reads are fetching here or hold pieces of, by chunk digest: only chunks
/// in flight or partial have an entry (absent and present ones need none).
#[derive(Default)]
pub struct ReadStates {
    chunks: Mutex<HashMap<Digest, ChunkState>>,
    /// Bumped on every change, so the data plane pushes the have-maps to subscribers.
    changes: Arc<Changes>,
}

impl ReadStates {
    /// Starts a read's fetch of `chunk`. `None` if a read here fetches it already (the
    /// caller then fetches without a second entry: the first one shows it).
    pub fn begin(&self, chunk: Digest) -> Option<ReadFlight<'_>> {
        let mut chunks = lock(&self.chunks);
        let from = chunks.get(&chunk).copied().unwrap_or(ChunkState::Absent);
        let next = from.apply(Transition::Start(By::Read)).ok()?;
        chunks.insert(chunk, next);
        drop(chunks);
        self.changes.bump();
        Some(ReadFlight {
            states: self,
            chunk,
            was_partial: from == ChunkState::Partial,
            ended: false,
        })
    }

    fn apply(&self, chunk: &Digest, t: Transition) {
        let mut chunks = lock(&self.chunks);
        let from = chunks.get(chunk).copied().unwrap_or(ChunkState::Absent);
        match from.apply(t) {
            Ok(ChunkState::Partial) => {
                chunks.insert(*chunk, ChunkState::Partial);
            }
            Ok(s) if s.is_in_flight() => {
                chunks.insert(*chunk, s);
            }
            Ok(_) => {
                chunks.remove(chunk);
            }
            Err(e) => {
                tracing::error!(%chunk, error = %e, "read state machine refused a transition");
                return;
            }
        }
        drop(chunks);
        self.changes.bump();
    }

    /// A chunk with verified pieces stored here and no read fetching it (pieces taken
    /// back at start, or got from a peer).
    pub fn mark_partial(&self, chunk: Digest) {
        if let Some(f) = self.begin(chunk) {
            f.end(Transition::Pieces);
        }
    }

    /// A partial chunk is now whole in the cache (completed), or its pieces are gone.
    pub fn completed(&self, chunk: &Digest) {
        if lock(&self.chunks).get(chunk) == Some(&ChunkState::Partial) {
            self.apply(chunk, Transition::Found);
        }
    }

    /// Whether peers should see `chunk` as coming here (in flight or partial).
    pub fn shows_in_flight(&self, chunk: &Digest) -> bool {
        lock(&self.chunks)
            .get(chunk)
            .is_some_and(|s| s.shows_in_flight())
    }

    /// Whether a read here is fetching `chunk` now.
    pub fn fetching(&self, chunk: &Digest) -> bool {
        lock(&self.chunks)
            .get(chunk)
            .is_some_and(|s| s.is_in_flight())
    }

    /// Chunks in flight for reads now.
    pub fn in_flight(&self) -> usize {
        lock(&self.chunks)
            .values()
            .filter(|s| s.is_in_flight())
            .count()
    }
}

/// One read's fetch of a chunk: in flight until [`end`](Self::end)ed. Dropped unended
/// (cancelled by the read bound, or failed), the chunk goes back to where it was.
pub struct ReadFlight<'a> {
    states: &'a ReadStates,
    chunk: Digest,
    was_partial: bool,
    ended: bool,
}

impl ReadFlight<'_> {
    /// Ends the fetch: `Verified` (whole, in the cache), `Pieces` (pieces stored) or
    /// `Failed`.
    pub fn end(mut self, t: Transition) {
        self.ended = true;
        self.states.apply(&self.chunk, t);
    }
}

impl Drop for ReadFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let back = if self.was_partial {
                Transition::Pieces
            } else {
                Transition::Failed
            };
            self.states.apply(&self.chunk, back);
        }
    }
}

/// The read side of the fetcher's swarm state: chunk states and recent have-maps.
#[derive(Default)]
pub struct Reads {
    pub states: ReadStates,
    maps: Mutex<HashMap<Digest, (Instant, Maps)>>,
    refreshing: SingleFlight<Digest, Maps>,
}

impl Reads {
    /// Read state that bumps `changes` whenever a chunk's state here moves.
    pub fn new(changes: Arc<Changes>) -> Self {
        Reads {
            states: ReadStates {
                chunks: Mutex::default(),
                changes,
            },
            ..Default::default()
        }
    }
}

/// What a read wants of a chunk.
#[derive(Clone, Copy)]
pub enum Want<'a> {
    /// The whole chunk (verified by its digest).
    Chunk,
    /// Pieces `first..first + digests.len()`, `len` bytes in all, each verified.
    Pieces {
        first: usize,
        digests: &'a [Digest],
        len: usize,
    },
}

/// What a peer sent for a [`Want`], verified by the data plane client: a chunk for
/// [`Want::Chunk`], pieces for [`Want::Pieces`].
#[derive(Clone, Debug)]
pub enum Got {
    Chunk(VerifiedChunk),
    Pieces(VerifiedPieces),
}

impl Got {
    fn len(&self) -> usize {
        match self {
            Got::Chunk(c) => c.len(),
            Got::Pieces(p) => p.len(),
        }
    }
}

impl Fetcher {
    /// The peers' have-maps of `blob` for reads: reused for [`MAP_AGE`], refreshed by
    /// one request round at a time.
    async fn read_maps(&self, blob: &Digest) -> Maps {
        if let Some((at, maps)) = lock(&self.reads.maps).get(blob) {
            if at.elapsed() < MAP_AGE {
                return maps.clone();
            }
        }
        self.reads
            .refreshing
            .run(*blob, || async {
                let maps = Arc::new(self.refresh_maps(blob).await);
                let mut cached = lock(&self.reads.maps);
                cached.retain(|_, (at, _)| at.elapsed() < MAP_AGE * 20);
                cached.insert(*blob, (Instant::now(), maps.clone()));
                maps
            })
            .await
    }

    /// Chunk `i` of `blob`, `digest` (or the pieces `want` names) from a peer, waiting boundedly
    /// for one that is fetching it or owns it (see the module docs). `None`: no peer had
    /// it in time; the caller asks the proxy.
    pub(crate) async fn read_from_peers(
        &self,
        blob: &Digest,
        i: usize,
        digest: Digest,
        want: Want<'_>,
    ) -> Option<Got> {
        let started = Instant::now();
        let mine = weight(&digest, &self.node_id);
        loop {
            let maps = self.read_maps(blob).await;
            let known: Vec<Peer> = self
                .peers
                .usable()
                .into_iter()
                .filter(|p| maps.contains_key(&p.id))
                .collect();
            let map = |p: &Peer| maps.get(&p.id);
            // 1. Peers holding the whole chunk, least penalised first.
            let mut holders: Vec<&Peer> = known
                .iter()
                .filter(|p| map(p).is_some_and(|m| m.is_present(i as u32)))
                .collect();
            holders.shuffle(&mut rand::rng());
            holders.sort_by_key(|p| p.penalty);
            for p in holders.iter().take(2) {
                if let Answer::Here(b) = self.ask(p, &digest, want).await {
                    return Some(b);
                }
            }
            // 2. Peers with it in flight, and its owner if that is not this host.
            let owner = known
                .iter()
                .map(|p| (weight(&digest, &p.id), p))
                .filter(|(w, _)| *w > mine)
                .max_by_key(|(w, _)| *w)
                .map(|(_, p)| p);
            let owner_started = owner
                .and_then(&map)
                .is_some_and(|m| m.is_in_flight(i as u32) || m.is_present(i as u32));
            let mut targets: Vec<&Peer> = known
                .iter()
                .filter(|p| map(p).is_some_and(|m| m.is_in_flight(i as u32)))
                .take(3)
                .collect();
            if let Some(o) = owner {
                if !targets.iter().any(|p| p.id == o.id) {
                    targets.push(o);
                }
            }
            if targets.is_empty() {
                return None;
            }
            // Asked at once; the first that sends the bytes ends the others' requests (each
            // of these peers may hold the pieces: a partial chunk shows as in flight), so
            // the bytes cross the LAN once.
            let mut answers: futures::stream::FuturesUnordered<_> =
                targets.iter().map(|p| self.ask(p, &digest, want)).collect();
            let mut pending = false;
            while let Some(a) = futures::StreamExt::next(&mut answers).await {
                match a {
                    Answer::Here(b) => return Some(b),
                    Answer::Pending => pending = true,
                    Answer::NotHere => {}
                }
            }
            let waited = started.elapsed();
            let wait_pending = pending && waited < self.settings.peer_timeout;
            // An owner fetches the pieces that hosts reading the chunk ask for
            // (`pieces::for_peers`): one that says "not here" does not count itself the
            // owner, this host's view of who reads the blob being older than its own, and
            // the maps are asked again (every `MAP_AGE`) for `read_owner_wait`. A whole
            // chunk is waited for only while the owner has not started it.
            let owner_may_send = matches!(want, Want::Pieces { .. }) || !owner_started;
            let wait_owner =
                owner.is_some() && owner_may_send && waited < self.settings.read_owner_wait;
            if !wait_pending && !wait_owner {
                tracing::debug!(%digest, ?waited, "no peer had it for a read: the proxy");
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Window `w` of layer `layer`'s index from the peer that owns it among the hosts
    /// reading the layer (rendezvous of the window's sha256 over this host and the peers
    /// whose have-map knows the layer), which fetches it from the proxy when asked.
    /// Asked again every [`POLL`] while it answers `Pending`, at most `peer_timeout`.
    /// `None`: this host owns the window, or its owner did not send it in time (the
    /// caller asks the proxy). The bytes are checked against the sha256 by the data plane.
    pub(crate) async fn window_from_peers(&self, layer: &Digest, w: &WindowRef) -> Option<Bytes> {
        let started = Instant::now();
        let mine = weight(&w.sha256, &self.node_id);
        loop {
            let maps = self.read_maps(layer).await;
            let owner = self
                .peers
                .usable()
                .into_iter()
                .filter(|p| maps.contains_key(&p.id))
                .map(|p| (weight(&w.sha256, &p.id), p))
                .filter(|(weight, _)| *weight > mine)
                .max_by_key(|(weight, _)| *weight)
                .map(|(_, p)| p);
            let Some(owner) = owner else {
                tracing::debug!(window = %w.sha256, known = maps.len(), "window: this host owns it");
                return None;
            };
            let timeout = self.settings.peer_timeout;
            match self
                .pool
                .window_answer(owner.data_addr, layer, w, timeout)
                .await
            {
                Ok(Answer::Here(b)) => {
                    self.stats.add(Source::Peer, b.len() as u64);
                    return Some(b);
                }
                Ok(Answer::Pending) if started.elapsed() < timeout => {
                    tokio::time::sleep(POLL).await;
                }
                Ok(Answer::NotHere) if started.elapsed() < self.settings.read_owner_wait => {
                    // The owner's view of the hosts reading the layer differs: renew ours.
                    tokio::time::sleep(POLL).await;
                }
                Ok(answer) => {
                    let pending = matches!(answer, Answer::Pending);
                    tracing::debug!(window = %w.sha256, owner = %owner.id, pending, waited = ?started.elapsed(), "window: the owner did not send it");
                    return None;
                }
                Err(e) => {
                    tracing::debug!(window = %w.sha256, owner = %owner.id, error = %e, "window: the owner failed");
                    self.peer_failed(&owner, &w.sha256, &e);
                    return None;
                }
            }
        }
    }

    /// Part `which` of what a mount needs of layer `layer` (its index's main part or its
    /// chunk list), named by `part`, from its owner among this host and all usable peers
    /// (rendezvous of its sha256: hosts that mount at one moment do not know yet which of
    /// them read the layer), which fetches it from the proxy by `repo` when asked. Asked
    /// again every [`POLL`] while it answers `Pending`, at most `peer_timeout`. `None`:
    /// this host owns it, it is larger than a chunk, or the owner did not send it in time
    /// (the caller asks the proxy). The bytes are checked against the sha256 and length
    /// by the data plane.
    pub(crate) async fn layer_part_from_peers(
        &self,
        which: LayerPart,
        layer: &Digest,
        part: &PartRef,
        repo: &Repo,
    ) -> Option<Bytes> {
        if part.len > imgd_core::CHUNK_SIZE as u64 {
            return None;
        }
        let started = Instant::now();
        let mine = weight(&part.sha256, &self.node_id);
        let owner = self
            .peers
            .usable()
            .into_iter()
            .map(|p| (weight(&part.sha256, &p.id), p))
            .filter(|(weight, _)| *weight > mine)
            .max_by_key(|(weight, _)| *weight)
            .map(|(_, p)| p)?;
        let timeout = self.settings.peer_timeout;
        let repo = (repo.name.as_str(), repo.ns.as_deref());
        loop {
            let answer = self
                .pool
                .layer_part_answer(owner.data_addr, which, layer, part, repo, timeout)
                .await;
            match answer {
                Ok(Answer::Here(b)) => {
                    self.stats.add(Source::Peer, b.len() as u64);
                    return Some(b);
                }
                Ok(Answer::Pending) if started.elapsed() < timeout => {
                    tokio::time::sleep(POLL).await;
                }
                Ok(answer) => {
                    let pending = matches!(answer, Answer::Pending);
                    tracing::debug!(%layer, ?which, owner = %owner.id, pending, waited = ?started.elapsed(), "layer part: the owner did not send it");
                    return None;
                }
                Err(e) => {
                    tracing::debug!(%layer, ?which, owner = %owner.id, error = %e, "layer part: the owner failed");
                    self.peer_failed(&owner, &part.sha256, &e);
                    return None;
                }
            }
        }
    }

    /// Whether this host owns chunk `chunk` of `blob` among itself and the peers that the
    /// reads' recent have-maps of the blob name (no request is made; with no recent maps,
    /// it does: a peer asked it as the owner).
    pub(crate) fn owns_for_reads(&self, blob: &Digest, chunk: &Digest) -> bool {
        let maps = lock(&self.reads.maps)
            .get(blob)
            .map(|(_, maps)| maps.clone());
        let mine = weight(chunk, &self.node_id);
        maps.is_none_or(|maps| maps.keys().all(|id| weight(chunk, id) < mine))
    }

    /// Asks peer `p` for what `want` names of chunk `digest`; failures penalise it and
    /// count as not there.
    async fn ask(&self, p: &Peer, digest: &Digest, want: Want<'_>) -> Answer<Got> {
        let timeout = self.settings.peer_timeout;
        let got = match want {
            Want::Chunk => self
                .pool
                .chunk_answer(p.data_addr, digest, timeout)
                .await
                .map(|a| a.map(Got::Chunk)),
            Want::Pieces {
                first,
                digests,
                len,
            } => {
                let first = u32::try_from(first).unwrap_or(u32::MAX);
                self.pool
                    .get_pieces(p.data_addr, digest, first, digests, len, timeout)
                    .await
                    .map(|a| a.map(Got::Pieces))
            }
        };
        match got {
            Ok(Answer::Here(b)) => {
                self.stats.add(Source::Peer, b.len() as u64);
                Answer::Here(b)
            }
            Ok(other) => other,
            Err(e) => {
                self.peer_failed(p, digest, &e);
                Answer::NotHere
            }
        }
    }

    /// Penalises peer `p` for failing a read's request about `digest`.
    fn peer_failed(&self, p: &Peer, digest: &Digest, e: &DataPlaneError) {
        if matches!(e, DataPlaneError::Corrupt { .. }) {
            crate::metrics::verification_failed("peer");
            tracing::warn!(peer = %p.id, %digest, error = %e, "a peer sent wrong bytes for a read");
        }
        let (penalty, why) = crate::peers::penalty_for(Some(e));
        self.peers.penalise(&p.id, penalty, &why);
    }
}
