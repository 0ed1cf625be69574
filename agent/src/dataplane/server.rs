//! The data plane server: answers `GetChunk`, `GetPieces` and `Have` from a
//! [`ChunkSource`], and pushes have-maps to `Subscribe`rs ([`subscription`]).
//!
//! Every accepted connection must pass the [`handshake`] first. A connection is then
//! served one request at a time, in order (a client may pipeline). The number of
//! connections ([`Limits::max_connections`](super::Limits::max_connections)) and of
//! [`ChunkSource`] calls running at once over all connections
//! ([`Limits::max_lookups`](super::Limits::max_lookups)) are bounded. Chunk bodies are
//! written straight from the source's `Bytes`, with one vectored write of header and
//! body.

use super::wire::{self, FrameLimits, Message, PartAsk, HEADER_LEN};
use super::LayerPart;
use super::{handshake, tune_socket, with_timeout, DataPlaneConfig, DataPlaneError, Result};
use super::{HaveMap, MAX_NODE_ID_LEN};
use bytes::{Buf, Bytes};
use imgd_core::index::WindowRef;
use imgd_core::Digest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// What a node serves to its peers: its verified chunk cache. Calls run on tokio's
/// blocking pool, so implementations may block (disk reads, locks).
pub trait ChunkSource: Send + Sync + 'static {
    /// The bytes of the chunk with this digest, if held. They are sent as they are:
    /// the receiver verifies them, and a source that returns wrong bytes gets its node
    /// reported as corrupt.
    fn chunk(&self, digest: &Digest) -> Option<Bytes>;

    /// Which chunks of blob `blob` are held or being fetched, if the blob is known.
    fn have(&self, blob: &Digest) -> Option<HaveMap>;

    /// A counter that moves whenever some have-map may have changed, so subscriptions
    /// push at once; `None` (the default): subscriptions look again every
    /// [`SUBSCRIPTION_HEARTBEAT`].
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The authenticated peer `peer_id` subscribed to `blob`'s have-map: it is fetching
    /// the blob (the fetcher counts it among the blob's hosts). The default ignores it.
    fn subscribed(&self, _blob: &Digest, _peer_id: &[u8]) {}

    /// Pieces `first..first + count` (64 KiB each, the last of a chunk shorter) of the
    /// chunk with this digest, from the whole chunk or from stored pieces. The receiver
    /// checks each against its digest.
    fn pieces(&self, _chunk: &Digest, _first: u32, _count: u32) -> PiecesAnswer {
        PiecesAnswer::NotHere
    }

    /// Inflate checkpoint window `window` of layer `layer`'s index, stored or fetched on
    /// request (`Pending` while it comes). The receiver checks it against its sha256.
    fn window(&self, _layer: &Digest, _window: &WindowRef) -> PiecesAnswer {
        PiecesAnswer::NotHere
    }

    /// Part `which` of what a mount needs of layer `ask.layer` (its index's main part or
    /// its chunk list) whose sha256 is `ask.sha256`, stored or fetched on request from
    /// the proxy by the asker's repository (`Pending` while it comes). The receiver
    /// checks it against the sha256.
    fn layer_part(&self, _which: LayerPart, _ask: &PartAsk) -> PiecesAnswer {
        PiecesAnswer::NotHere
    }

    /// Whether this node is fetching the chunk now (a `GetChunk` of a chunk not held is
    /// then answered `Pending` rather than `NotFound`).
    fn fetching(&self, _chunk: &Digest) -> bool {
        false
    }
}

/// What a [`ChunkSource`] has of some pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PiecesAnswer {
    /// The pieces, concatenated.
    Here(Bytes),
    /// Not all here, but this node is fetching the chunk now.
    Pending,
    /// Not here, and not coming.
    NotHere,
}

/// A subscription pushes its map at least this often, changed or not, so the subscriber
/// can tell a dead server from a quiet one.
pub const SUBSCRIPTION_HEARTBEAT: Duration = Duration::from_secs(5);

struct Shared {
    cfg: DataPlaneConfig,
    limits: FrameLimits,
    source: Arc<dyn ChunkSource>,
    lookups: Semaphore,
    subscriptions: Semaphore,
}

/// Serves the data plane on `listener` until the returned future is dropped, which
/// also closes every connection it accepted. Returns early only for an invalid
/// configuration (over-long node id, zero limits).
pub async fn serve(
    listener: TcpListener,
    cfg: DataPlaneConfig,
    source: Arc<dyn ChunkSource>,
) -> Result<()> {
    let l = &cfg.limits;
    if cfg.node_id.len() > MAX_NODE_ID_LEN {
        return Err(DataPlaneError::Config(format!(
            "node id of {} bytes exceeds {MAX_NODE_ID_LEN}",
            cfg.node_id.len()
        )));
    }
    if l.max_connections == 0 || l.max_lookups == 0 || l.max_control < 64 {
        return Err(DataPlaneError::Config(
            "max_connections and max_lookups must be positive, max_control >= 64".into(),
        ));
    }
    let connections = Arc::new(Semaphore::new(l.max_connections));
    let shared = Arc::new(Shared {
        limits: FrameLimits::from(l),
        lookups: Semaphore::new(l.max_lookups),
        subscriptions: Semaphore::new(l.max_subscriptions),
        source,
        cfg,
    });
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        tracing::warn!(%addr, "data plane: too many connections, refusing");
                        continue;
                    };
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        if let Err(e) = connection(stream, addr, &shared).await {
                            tracing::debug!(%addr, error = %e, "data plane connection ended");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "data plane accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Serves one connection: handshake, then requests until EOF, idle timeout or error.
async fn connection(mut stream: TcpStream, addr: SocketAddr, shared: &Shared) -> Result<()> {
    let limits = &shared.cfg.limits;
    tune_socket(&stream, limits)?;
    let peer_id = match handshake::server(&mut stream, &shared.cfg).await {
        Ok(id) => id,
        Err(e) => {
            tracing::info!(%addr, error = %e, "data plane handshake refused");
            return Err(e);
        }
    };
    tracing::debug!(%addr, peer = %imgd_core::digest::to_hex(&peer_id), "data plane peer");
    loop {
        let mut head = [0u8; HEADER_LEN];
        let first = with_timeout(limits.idle_timeout, "idle connection", async {
            Ok(stream.read(&mut head).await?)
        })
        .await?;
        if first == 0 {
            return Ok(()); // clean close between requests
        }
        with_timeout(limits.write_timeout, "reading a request", async {
            Ok(stream.read_exact(&mut head[first..]).await?)
        })
        .await?;
        let request = match read_request(&mut stream, &head, shared).await {
            Ok(r) => r,
            Err((id, e)) => {
                // Tell the peer why before hanging up; best effort.
                let msg = Message::Error(e.to_string());
                let _ = write_frame(&mut stream, id, &msg, shared).await;
                return Err(e);
            }
        };
        let (id, msg) = request;
        if let Message::Subscribe { blob } = msg {
            // The connection is the subscription's now; it ends with it.
            return subscription(stream, id, blob, &peer_id, shared).await;
        }
        let reply = answer(msg, shared).await;
        write_frame(&mut stream, id, &reply, shared).await?;
    }
}

/// Reads the body of the request whose header is `head`. On error, also returns the
/// request id to answer with.
async fn read_request(
    stream: &mut TcpStream,
    head: &[u8; HEADER_LEN],
    shared: &Shared,
) -> std::result::Result<(u32, Message), (u32, DataPlaneError)> {
    let protocol = |id, e: wire::WireError| (id, DataPlaneError::Protocol(e.to_string()));
    let header = wire::decode_header(head, &shared.limits).map_err(|e| protocol(0, e))?;
    let id = header.request_id;
    if !matches!(
        header.kind,
        wire::kind::GET_CHUNK
            | wire::kind::HAVE
            | wire::kind::GET_PIECES
            | wire::kind::GET_WINDOW
            | wire::kind::GET_INDEX_MAIN
            | wire::kind::GET_CHUNK_LIST
            | wire::kind::SUBSCRIBE
    ) {
        let e = format!("expected a request, got frame kind {:#04x}", header.kind);
        return Err((id, DataPlaneError::Protocol(e)));
    }
    // Requests are 32, 40 or 76 bytes, or a `GetIndexMain` or `GetChunkList` of at most
    // 584 (checked by decode_header).
    let mut body = [0u8; wire::GET_PART_FIXED + 2 * wire::MAX_REPO_NAME];
    let limit = shared.cfg.limits.write_timeout;
    with_timeout(limit, "reading a request", async {
        Ok(stream.read_exact(&mut body[..header.len]).await?)
    })
    .await
    .map_err(|e| (id, e))?;
    let msg = wire::decode_body(&header, &body[..header.len]).map_err(|e| protocol(id, e))?;
    Ok((id, msg))
}

/// The answer to a request for a layer part.
fn part_answer(
    source: &dyn ChunkSource,
    which: LayerPart,
    ask: &PartAsk,
    max_chunk: usize,
) -> Message {
    match source.layer_part(which, ask) {
        PiecesAnswer::Here(b) if b.len() > max_chunk => Message::Error(format!(
            "the {which:?} part {} is larger than the frame limit",
            ask.sha256
        )),
        PiecesAnswer::Here(b) => Message::Chunk(b),
        PiecesAnswer::Pending => Message::Pending,
        PiecesAnswer::NotHere => Message::NotFound,
    }
}

/// Looks the request up in the source on the blocking pool, under the lookup limit.
async fn answer(request: Message, shared: &Shared) -> Message {
    let Ok(_permit) = shared.lookups.acquire().await else {
        return Message::Error("server shutting down".into());
    };
    let source = shared.source.clone();
    let max_chunk = shared.limits.max_chunk;
    let looked_up = tokio::task::spawn_blocking(move || match request {
        Message::GetChunk { digest } => match source.chunk(&digest) {
            Some(b) if b.len() > max_chunk => {
                tracing::warn!(%digest, len = b.len(), "data plane: chunk too large to serve");
                Message::Error(format!("chunk {digest} is larger than the frame limit"))
            }
            Some(b) => Message::Chunk(b),
            None if source.fetching(&digest) => Message::Pending,
            None => Message::NotFound,
        },
        Message::GetPieces {
            chunk,
            first,
            count,
        } => match source.pieces(&chunk, first, count) {
            PiecesAnswer::Here(b) if b.len() > max_chunk => {
                Message::Error(format!("pieces of {chunk} are larger than the frame limit"))
            }
            PiecesAnswer::Here(b) => Message::Pieces(b),
            PiecesAnswer::Pending => Message::Pending,
            PiecesAnswer::NotHere => Message::NotFound,
        },
        Message::GetWindow {
            layer,
            sha256,
            offset,
            len,
        } => match source.window(
            &layer,
            &WindowRef {
                offset,
                len,
                sha256,
            },
        ) {
            PiecesAnswer::Here(b) if b.len() > max_chunk => {
                Message::Error(format!("window {sha256} is larger than the frame limit"))
            }
            PiecesAnswer::Here(b) => Message::Chunk(b),
            PiecesAnswer::Pending => Message::Pending,
            PiecesAnswer::NotHere => Message::NotFound,
        },
        Message::GetIndexMain(ask) => part_answer(&*source, LayerPart::IndexMain, &ask, max_chunk),
        Message::GetChunkList(ask) => part_answer(&*source, LayerPart::ChunkList, &ask, max_chunk),
        Message::Have { blob } => match source.have(&blob) {
            Some(m) => Message::HaveMap(m),
            None => Message::Unknown,
        },
        _ => Message::Error("not a request".into()),
    })
    .await;
    looked_up.unwrap_or_else(|e| {
        tracing::error!(error = %e, "data plane chunk source failed");
        Message::Error("internal error in the chunk source".into())
    })
}

/// Serves a `Subscribe` on its connection: the blob's have-map now, then again whenever
/// it changed (at most one frame per [`wire::PUSH_INTERVAL_MS`]) and at least every
/// [`SUBSCRIPTION_HEARTBEAT`], until the client hangs up (or sends anything: a subscribed
/// client only listens), the blob becomes unknown (`Unknown` is sent) or
/// [`Limits::max_subscription`](super::Limits::max_subscription) has passed. At most
/// [`Limits::max_subscriptions`](super::Limits::max_subscriptions) run at once; one more
/// is answered with an `Error`.
async fn subscription(
    mut stream: TcpStream,
    id: u32,
    blob: Digest,
    peer_id: &[u8],
    shared: &Shared,
) -> Result<()> {
    let Ok(_permit) = shared.subscriptions.try_acquire() else {
        let busy = Message::Error("too many subscriptions".into());
        return write_frame(&mut stream, id, &busy, shared).await;
    };
    shared.source.subscribed(&blob, peer_id);
    let mut changes = shared.source.changes();
    let end = tokio::time::Instant::now() + shared.cfg.limits.max_subscription;
    let interval = Duration::from_millis(wire::PUSH_INTERVAL_MS);
    let mut sent: Option<(HaveMap, tokio::time::Instant)> = None;
    loop {
        if let Some(rx) = changes.as_mut() {
            rx.borrow_and_update();
        }
        let reply = answer(Message::Have { blob }, shared).await;
        let now = tokio::time::Instant::now();
        match &reply {
            Message::HaveMap(map) => {
                let stale = sent.as_ref().is_none_or(|(last, at)| {
                    last != map || now.duration_since(*at) >= SUBSCRIPTION_HEARTBEAT
                });
                if stale {
                    write_frame(&mut stream, id, &reply, shared).await?;
                    sent = Some((map.clone(), now));
                }
            }
            _ => return write_frame(&mut stream, id, &reply, shared).await,
        }
        // The rate bound, then wait for a change, a heartbeat, the end or a hang-up.
        let mut probe = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stream.read(&mut probe) => return Ok(()),
        }
        let heartbeat = tokio::time::sleep(SUBSCRIPTION_HEARTBEAT.saturating_sub(interval));
        tokio::select! {
            _ = changed(&mut changes) => {}
            _ = heartbeat => {}
            _ = tokio::time::sleep_until(end) => return Ok(()),
            _ = stream.read(&mut probe) => return Ok(()),
        }
    }
}

/// Resolves when the source's change counter moved; never without a counter.
async fn changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match changes {
        Some(rx) => {
            if rx.changed().await.is_err() {
                // The source dropped its counter: heartbeats only from now on.
                *changes = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Writes one frame with a single vectored write of header and body.
async fn write_frame(
    stream: &mut TcpStream,
    id: u32,
    msg: &Message,
    shared: &Shared,
) -> Result<()> {
    let (head, body) = match wire::encode_frame(id, msg, &shared.limits) {
        Ok(parts) => parts,
        Err(e) => {
            // E.g. a have-map too large for one control frame.
            tracing::warn!(error = %e, "data plane: reply does not fit in a frame");
            let err = Message::Error(format!("reply does not fit in a frame: {e}"));
            wire::encode_frame(id, &err, &shared.limits)
                .map_err(|e| DataPlaneError::Protocol(e.to_string()))?
        }
    };
    let mut frame = Bytes::copy_from_slice(&head).chain(body);
    let limit = shared.cfg.limits.write_timeout;
    with_timeout(limit, "writing a reply", async {
        Ok(stream.write_all_buf(&mut frame).await?)
    })
    .await
}
