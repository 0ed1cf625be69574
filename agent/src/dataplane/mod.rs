//! The lean peer-to-peer chunk data plane.
//!
//! Agents find each other over libp2p (the control plane); the 4 MiB chunk bytes flow
//! over this separate, plain TCP protocol, because libp2p streams are several times too
//! slow for bulk transfer on this hardware (see `DESIGN.md`, "Facts measured on this
//! machine").
//!
//! # Protocol
//!
//! 1. **Handshake** ([`handshake`]): over a fresh TCP connection both sides exchange a
//!    hello (`"imgd-dp-v5"`, a random 32-byte nonce, their node id) and then prove
//!    knowledge of the 32-byte pre-shared swarm key with an HMAC-SHA256 over both nonces
//!    and both ids. The client proves first; the server answers only a peer that proved
//!    the key and, when an allow-list is configured, is on it. Anything else is
//!    disconnected without a single byte more.
//! 2. **Frames** ([`wire`]): a 9-byte header (`len: u32 BE`, `kind: u8`,
//!    `request_id: u32 BE`) and a body of at most [`Limits::max_chunk`] bytes for chunk
//!    bodies and [`Limits::max_control`] for everything else. Requests are
//!    `GetChunk { digest }`, `GetPieces { chunk, first, count }` (64 KiB pieces, for
//!    lazy reads), `Have { blob }` and `Subscribe { blob }`; responses are `Chunk`,
//!    `Pieces`, `Pending` (being fetched here now: ask again), `NotFound`, `HaveMap`,
//!    `Unknown` or `Error`. A `Subscribe` turns its connection into a push channel of
//!    the blob's have-map (at most one frame per 50 ms, a heartbeat every 5 s; see
//!    [`server`]).
//! 3. **Concurrency model**: a connection carries one request at a time (the server
//!    answers in order, so pipelining would also work, and the echoed request id lets the
//!    client check it). Parallelism comes from a small pool of connections per peer
//!    ([`PeerPool`], 4 by default): each connection's receive-and-verify runs on its own
//!    task, which spreads the sha256 work over the cores. This is simpler than
//!    multiplexing and reaches the throughput target (see `bench-p2p`).
//!
//! # Security
//!
//! - **Integrity** does not depend on the transport: the client verifies the sha256 of
//!   every chunk it receives and reports a mismatch as [`DataPlaneError::Corrupt`].
//! - **Access** is by the pre-shared swarm key (and optionally an allow-list of node
//!   ids): a peer without the key can neither fetch chunks nor learn which chunks a
//!   node holds. Before the peer has proven the key, the server reveals only its hello
//!   (nonce and node id, which the swarm's discovery publishes anyway).
//! - **No confidentiality**: chunk bytes and have-maps of a LAN swarm travel in clear.
//!   The handshake authenticates the connection's setup, not each frame, so an on-path
//!   attacker could read the traffic or inject frames; injected chunks still fail the
//!   sha256 check, injected have-maps can only mislead scheduling. Use a VPN or
//!   WireGuard mesh if the network is not trusted.

pub mod client;
pub mod handshake;
mod have_map;
pub mod pool;
pub mod server;
pub mod wire;

pub use client::{Answer, PeerClient, Subscription};
pub use have_map::HaveMap;
pub use pool::PeerPool;
pub use server::{serve, ChunkSource, PiecesAnswer};

/// The parts of what a mount needs of a layer that peers serve each other whole
/// (`GetIndexMain`, `GetChunkList`), each named by the proxy's sha256 of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerPart {
    /// The main part of the layer's index (named by its trailer).
    IndexMain,
    /// The layer's chunk list, as its canonical bytes.
    ChunkList,
}

use imgd_core::{Digest, CHUNK_SIZE};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Longest node id accepted in a handshake, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// Errors of the data plane, on either side.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// A socket operation failed.
    #[error("data plane I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed for a reason other than a wrong key (malformed hello, peer
    /// hung up, bad configuration).
    #[error("data plane handshake failed: {0}")]
    Handshake(String),
    /// The peer did not prove knowledge of the swarm key, or is not on the allow-list.
    #[error("data plane peer not authorized: {0}")]
    Unauthorized(String),
    /// An operation did not complete within its time limit.
    #[error("data plane operation timed out: {0}")]
    Timeout(&'static str),
    /// The peer broke the protocol (malformed, oversized or unexpected frame).
    #[error("data plane protocol error: {0}")]
    Protocol(String),
    /// The peer reported an error for our request.
    #[error("data plane peer reported an error: {0}")]
    Remote(String),
    /// The peer sent bytes whose sha256 is not the digest we asked for.
    #[error("peer {peer} sent corrupt bytes for chunk {digest}")]
    Corrupt { peer: SocketAddr, digest: Digest },
    /// The configuration is invalid (over-long node id, zero limits).
    #[error("invalid data plane configuration: {0}")]
    Config(String),
    /// The connection is closed (by the peer, or by us after an earlier failure).
    #[error("data plane connection closed")]
    Closed,
}

/// Result of data plane operations.
pub type Result<T, E = DataPlaneError> = std::result::Result<T, E>;

/// The 32-byte pre-shared swarm key. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SwarmKey(pub [u8; 32]);

impl fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwarmKey(<redacted>)")
    }
}

/// Hard limits and time limits of the data plane. The defaults suit 4 MiB chunks.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest chunk body accepted or sent ([`CHUNK_SIZE`]).
    pub max_chunk: usize,
    /// Largest body of any other frame (64 KiB).
    pub max_control: usize,
    /// Time limit of TCP connect plus handshake (5 s).
    pub handshake_timeout: Duration,
    /// Server: how long a connection may sit without a request before it is closed (60 s).
    pub idle_timeout: Duration,
    /// Server: time limit to write one response to a slow reader (30 s).
    pub write_timeout: Duration,
    /// Server: most connections served at once; extra ones are closed at once (256).
    pub max_connections: usize,
    /// Server: most [`ChunkSource`] calls running at once over all connections (16).
    pub max_lookups: usize,
    /// Server: most have-map subscriptions served at once (128); they count as
    /// connections too.
    pub max_subscriptions: usize,
    /// Server: longest life of one subscription (10 min); the subscriber subscribes
    /// again if it still needs it.
    pub max_subscription: Duration,
    /// `SO_SNDBUF`/`SO_RCVBUF` to set on every connection; `None` keeps the kernel's
    /// autotuning, which on Linux grows to `tcp_rmem`/`tcp_wmem` max and measured
    /// best on loopback.
    pub socket_buffer: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_chunk: CHUNK_SIZE,
            max_control: 64 << 10,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_lookups: 16,
            max_subscriptions: 128,
            max_subscription: Duration::from_secs(600),
            socket_buffer: None,
        }
    }
}

/// Identity, access control and limits of one data plane endpoint (server or client).
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// The swarm's pre-shared key.
    pub key: SwarmKey,
    /// This node's id (opaque, at most [`MAX_NODE_ID_LEN`] bytes, e.g. libp2p PeerId bytes).
    pub node_id: Vec<u8>,
    /// If non-empty, only peers with one of these node ids are accepted.
    pub allow_list: Vec<Vec<u8>>,
    /// Size and time limits.
    pub limits: Limits,
}

impl DataPlaneConfig {
    /// A configuration with default limits and no allow-list.
    pub fn new(key: [u8; 32], node_id: impl Into<Vec<u8>>) -> Self {
        DataPlaneConfig {
            key: SwarmKey(key),
            node_id: node_id.into(),
            allow_list: Vec::new(),
            limits: Limits::default(),
        }
    }

    /// Whether `peer_id` may talk to us under the allow-list.
    pub fn allows(&self, peer_id: &[u8]) -> bool {
        self.allow_list.is_empty() || self.allow_list.iter().any(|id| id == peer_id)
    }
}

/// Applies `TCP_NODELAY` and the configured socket buffer sizes to a connection.
pub(crate) fn tune_socket(stream: &tokio::net::TcpStream, limits: &Limits) -> Result<()> {
    stream.set_nodelay(true)?;
    if let Some(size) = limits.socket_buffer {
        let sock = socket2::SockRef::from(stream);
        sock.set_send_buffer_size(size)?;
        sock.set_recv_buffer_size(size)?;
    }
    Ok(())
}

/// Runs `fut` with a time limit, mapping expiry to [`DataPlaneError::Timeout`].
pub(crate) async fn with_timeout<T>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| DataPlaneError::Timeout(what))?
}

#[cfg(test)]
mod tests;
