//! A pool of data plane connections per peer address ([`PeerPool`]): at most a bounded
//! number of requests in flight per peer, idle connections reused, a stale one retried
//! once on a fresh connection.

use super::client::{Answer, PeerClient, Subscription};
use super::LayerPart;
use super::{DataPlaneConfig, DataPlaneError, HaveMap, Result};
use bytes::Bytes;
use imgd_core::index::WindowRef;
use imgd_core::wire::PartRef;
use imgd_core::{Digest, VerifiedChunk, VerifiedPieces};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Connections to one peer address.
struct Slot {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<PeerClient>>,
}

enum Op {
    Chunk(Digest),
    Have(Digest),
    Pieces {
        chunk: Digest,
        first: u32,
        digests: Vec<Digest>,
        len: usize,
    },
    Window {
        layer: Digest,
        window: WindowRef,
    },
    Part {
        which: LayerPart,
        layer: Digest,
        part: PartRef,
        repo: String,
        ns: Option<String>,
    },
}

enum Reply {
    Chunk(Answer<VerifiedChunk>),
    Pieces(Answer<VerifiedPieces>),
    Window(Answer<Bytes>),
    Part(Answer<Bytes>),
    Have(Option<HaveMap>),
}

/// Keeps up to `max_in_flight_per_peer` connections per peer address, one request in
/// flight on each, reusing idle ones and reconnecting after failures. Requests are
/// idempotent, so a request that fails on a reused (possibly stale) connection is
/// retried once on a fresh one.
pub struct PeerPool {
    cfg: Arc<DataPlaneConfig>,
    per_peer: usize,
    peers: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
}

impl PeerPool {
    /// A pool with at most `max_in_flight_per_peer` (at least 1) requests, and so
    /// connections, per peer at once. 4 is a good default.
    pub fn new(cfg: DataPlaneConfig, max_in_flight_per_peer: usize) -> Self {
        PeerPool {
            cfg: Arc::new(cfg),
            per_peer: max_in_flight_per_peer.max(1),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// [`PeerClient::get_chunk`] on a pooled connection to `addr`; `timeout` also
    /// covers waiting for a free connection and connecting.
    pub async fn get_chunk(
        &self,
        addr: SocketAddr,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<Option<VerifiedChunk>> {
        Ok(match self.chunk_answer(addr, digest, timeout).await? {
            Answer::Here(bytes) => Some(bytes),
            Answer::Pending | Answer::NotHere => None,
        })
    }

    /// [`PeerClient::chunk_answer`] on a pooled connection to `addr`.
    pub async fn chunk_answer(
        &self,
        addr: SocketAddr,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<Answer<VerifiedChunk>> {
        match self.run(addr, Op::Chunk(*digest), timeout).await? {
            Reply::Chunk(c) => Ok(c),
            _ => Err(DataPlaneError::Protocol("mismatched reply".into())),
        }
    }

    /// [`PeerClient::get_pieces`] on a pooled connection to `addr`.
    pub async fn get_pieces(
        &self,
        addr: SocketAddr,
        chunk: &Digest,
        first: u32,
        digests: &[Digest],
        len: usize,
        timeout: Duration,
    ) -> Result<Answer<VerifiedPieces>> {
        let op = Op::Pieces {
            chunk: *chunk,
            first,
            digests: digests.to_vec(),
            len,
        };
        match self.run(addr, op, timeout).await? {
            Reply::Pieces(p) => Ok(p),
            _ => Err(DataPlaneError::Protocol("mismatched reply".into())),
        }
    }

    /// [`PeerClient::window_answer`] on a pooled connection to `addr`.
    pub async fn window_answer(
        &self,
        addr: SocketAddr,
        layer: &Digest,
        window: &WindowRef,
        timeout: Duration,
    ) -> Result<Answer<Bytes>> {
        let op = Op::Window {
            layer: *layer,
            window: *window,
        };
        match self.run(addr, op, timeout).await? {
            Reply::Window(w) => Ok(w),
            _ => Err(DataPlaneError::Protocol("mismatched reply".into())),
        }
    }

    /// [`PeerClient::layer_part_answer`] on a pooled connection to `addr`.
    pub async fn layer_part_answer(
        &self,
        addr: SocketAddr,
        which: LayerPart,
        layer: &Digest,
        part: &PartRef,
        repo: (&str, Option<&str>),
        timeout: Duration,
    ) -> Result<Answer<Bytes>> {
        let op = Op::Part {
            which,
            layer: *layer,
            part: *part,
            repo: repo.0.to_string(),
            ns: repo.1.map(str::to_string),
        };
        match self.run(addr, op, timeout).await? {
            Reply::Part(m) => Ok(m),
            _ => Err(DataPlaneError::Protocol("mismatched reply".into())),
        }
    }

    /// [`PeerClient::have`] on a pooled connection to `addr`.
    pub async fn have(
        &self,
        addr: SocketAddr,
        blob: &Digest,
        timeout: Duration,
    ) -> Result<Option<HaveMap>> {
        match self.run(addr, Op::Have(*blob), timeout).await? {
            Reply::Have(m) => Ok(m),
            _ => Err(DataPlaneError::Protocol("mismatched reply".into())),
        }
    }

    /// Subscribes to `blob`'s have-map at `addr` on a fresh connection of its own (not
    /// one of the pool's: a subscription holds its connection for its whole life).
    /// `timeout` covers connecting and sending the request.
    pub async fn subscribe(
        &self,
        addr: SocketAddr,
        blob: &Digest,
        timeout: Duration,
    ) -> Result<Subscription> {
        let deadline = Instant::now() + timeout;
        let client = tokio::time::timeout_at(deadline, PeerClient::connect(addr, &self.cfg))
            .await
            .map_err(|_| DataPlaneError::Timeout("connect"))??;
        let left = deadline.saturating_duration_since(Instant::now());
        client.subscribe(blob, left).await
    }

    /// Closes the idle connections to `addr` and forgets it (e.g. a penalised peer).
    /// Requests under way finish on their connections.
    pub fn forget(&self, addr: SocketAddr) {
        lock(&self.peers).remove(&addr);
    }

    /// Number of idle pooled connections to `addr`.
    pub fn idle_connections(&self, addr: SocketAddr) -> usize {
        lock(&self.peers)
            .get(&addr)
            .map_or(0, |slot| lock(&slot.idle).len())
    }

    fn slot(&self, addr: SocketAddr) -> Arc<Slot> {
        let mut peers = lock(&self.peers);
        peers
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Slot {
                    permits: Arc::new(Semaphore::new(self.per_peer)),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    async fn run(&self, addr: SocketAddr, op: Op, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let slot = self.slot(addr);
        let _permit = tokio::time::timeout_at(deadline, slot.permits.clone().acquire_owned())
            .await
            .map_err(|_| DataPlaneError::Timeout("waiting for a free connection"))?
            .map_err(|_| DataPlaneError::Closed)?;
        for attempt in 0..2 {
            let pooled = lock(&slot.idle).pop();
            let reused = pooled.is_some();
            let mut client = match pooled {
                Some(c) => c,
                None => tokio::time::timeout_at(deadline, PeerClient::connect(addr, &self.cfg))
                    .await
                    .map_err(|_| DataPlaneError::Timeout("connect"))??,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match &op {
                Op::Chunk(d) => client.chunk_answer(d, left).await.map(Reply::Chunk),
                Op::Have(b) => client.have(b, left).await.map(Reply::Have),
                Op::Pieces {
                    chunk,
                    first,
                    digests,
                    len,
                } => client
                    .get_pieces(chunk, *first, digests, *len, left)
                    .await
                    .map(Reply::Pieces),
                Op::Window { layer, window } => client
                    .window_answer(layer, window, left)
                    .await
                    .map(Reply::Window),
                Op::Part {
                    which,
                    layer,
                    part,
                    repo,
                    ns,
                } => client
                    .layer_part_answer(*which, layer, part, (repo, ns.as_deref()), left)
                    .await
                    .map(Reply::Part),
            };
            if client.is_usable() {
                lock(&slot.idle).push(client);
            }
            match result {
                Err(DataPlaneError::Io(_) | DataPlaneError::Closed) if reused && attempt == 0 => {
                    tracing::debug!(%addr, "data plane: stale pooled connection, reconnecting");
                }
                other => return other,
            }
        }
        Err(DataPlaneError::Closed)
    }
}

/// Locks a mutex, ignoring poisoning (the guarded data stays consistent: plain
/// pushes, pops and inserts).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
