//! The data plane client: one authenticated connection ([`PeerClient`]); the pool of
//! them per peer address is [`super::pool::PeerPool`].
//!
//! Every received chunk is verified against the digest that was asked for while it is
//! read (hashing each piece right after it arrives, while it is still in cache, by an
//! [`imgd_core::ChunkReceiver`]) and handed on as an [`imgd_core::VerifiedChunk`] (pieces
//! as [`imgd_core::VerifiedPieces`]), so no later hop hashes it again; a mismatch is
//! reported as [`DataPlaneError::Corrupt`] so the caller can penalise the peer. Every call has a time limit covering the whole exchange, so a peer that drips
//! its answer fails with [`DataPlaneError::Timeout`].

use super::wire::{self, FrameLimits, Message, PartAsk, HEADER_LEN};
use super::LayerPart;
use super::Result;
use super::{handshake, tune_socket, with_timeout, DataPlaneConfig, DataPlaneError, HaveMap};
use bytes::{BufMut, Bytes, BytesMut};
use imgd_core::index::{LayerIndex, WindowRef};
use imgd_core::wire::PartRef;
use imgd_core::{ChunkReceiver, Digest, VerifiedChunk, VerifiedPieces};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes read (and then hashed) at a time while receiving a chunk.
const READ_PIECE: usize = 256 << 10;

/// An answer that keeps coming may take this many request time-outs in all.
const SLOW_ANSWER: u32 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Ready,
    /// A request is under way; seen at the start of a call, it means the previous call
    /// was cancelled mid-exchange and the stream is out of step.
    Busy,
    Broken,
}

/// What a peer answered to a request for something it may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<T> {
    /// Here it is (verified).
    Here(T),
    /// The peer is fetching it now: ask again shortly.
    Pending,
    /// The peer does not hold it.
    NotHere,
}

impl<T> Answer<T> {
    /// The same answer, with `f` applied to what is here.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Answer<U> {
        match self {
            Answer::Here(t) => Answer::Here(f(t)),
            Answer::Pending => Answer::Pending,
            Answer::NotHere => Answer::NotHere,
        }
    }
}

/// What the bytes of a reply must match.
enum Verify {
    Nothing,
    /// A whole chunk: its sha256.
    Chunk(Digest),
    /// Pieces `first..` of a chunk: each 64 KiB piece's sha256 in order, and their
    /// total length.
    Pieces {
        first: usize,
        digests: Vec<Digest>,
        len: usize,
    },
    /// A part of what a mount needs of a layer: its sha256 (for an index main part, its
    /// trailer), and its length.
    Part {
        which: LayerPart,
        sha256: Digest,
        len: usize,
    },
}

/// A reply, its bytes verified as [`Verify`] asked.
enum Received {
    Chunk(VerifiedChunk),
    Pieces(VerifiedPieces),
    /// Bytes checked some other way (an index main part, by its trailer).
    Bytes(Bytes),
    Control(Message),
}

/// One authenticated connection to a peer, carrying one request at a time.
pub struct PeerClient {
    stream: TcpStream,
    peer: SocketAddr,
    peer_id: Vec<u8>,
    limits: FrameLimits,
    next_id: u32,
    state: State,
}

impl PeerClient {
    /// Connects to `addr` and runs the handshake, both within
    /// [`Limits::handshake_timeout`](super::Limits::handshake_timeout) each.
    pub async fn connect(addr: SocketAddr, cfg: &DataPlaneConfig) -> Result<Self> {
        let limits = &cfg.limits;
        let mut stream = with_timeout(limits.handshake_timeout, "connect", async {
            Ok(TcpStream::connect(addr).await?)
        })
        .await?;
        tune_socket(&stream, limits)?;
        let peer_id = handshake::client(&mut stream, cfg).await?;
        Ok(PeerClient {
            stream,
            peer: addr,
            peer_id,
            limits: FrameLimits::from(limits),
            next_id: 1,
            state: State::Ready,
        })
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The peer's node id, authenticated by the handshake.
    pub fn peer_id(&self) -> &[u8] {
        &self.peer_id
    }

    /// Whether the connection can carry another request (no earlier failure).
    pub fn is_usable(&self) -> bool {
        self.state == State::Ready
    }

    /// Fetches chunk `digest`: `Ok(None)` if the peer does not hold it. The bytes are
    /// verified; wrong ones give [`DataPlaneError::Corrupt`] (the connection stays
    /// usable, the peer is to blame).
    pub async fn get_chunk(
        &mut self,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<Option<VerifiedChunk>> {
        Ok(match self.chunk_answer(digest, timeout).await? {
            Answer::Here(bytes) => Some(bytes),
            Answer::Pending | Answer::NotHere => None,
        })
    }

    /// Like [`get_chunk`](Self::get_chunk), telling "being fetched there" apart.
    pub async fn chunk_answer(
        &mut self,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<Answer<VerifiedChunk>> {
        let req = Message::GetChunk { digest: *digest };
        match self.exchange(&req, Verify::Chunk(*digest), timeout).await? {
            Received::Chunk(chunk) => Ok(Answer::Here(chunk)),
            Received::Control(Message::Pending) => Ok(Answer::Pending),
            Received::Control(Message::NotFound) => Ok(Answer::NotHere),
            other => self.unexpected(other, "GetChunk"),
        }
    }

    /// Pieces `first..first + digests.len()` of chunk `chunk`, `len` bytes in all. Each
    /// piece is checked against its digest in `digests`; a wrong one (or a wrong length)
    /// gives [`DataPlaneError::Corrupt`] naming the piece's digest.
    pub async fn get_pieces(
        &mut self,
        chunk: &Digest,
        first: u32,
        digests: &[Digest],
        len: usize,
        timeout: Duration,
    ) -> Result<Answer<VerifiedPieces>> {
        let count = u32::try_from(digests.len())
            .map_err(|_| DataPlaneError::Protocol("too many pieces".into()))?;
        let req = Message::GetPieces {
            chunk: *chunk,
            first,
            count,
        };
        let verify = Verify::Pieces {
            first: first as usize,
            digests: digests.to_vec(),
            len,
        };
        match self.exchange(&req, verify, timeout).await? {
            Received::Pieces(pieces) => Ok(Answer::Here(pieces)),
            Received::Control(Message::Pending) => Ok(Answer::Pending),
            Received::Control(Message::NotFound) => Ok(Answer::NotHere),
            other => self.unexpected(other, "GetPieces"),
        }
    }

    /// Inflate checkpoint window `window` of layer `layer`'s index, checked against its
    /// sha256 (a wrong one gives [`DataPlaneError::Corrupt`] naming it).
    pub async fn window_answer(
        &mut self,
        layer: &Digest,
        window: &WindowRef,
        timeout: Duration,
    ) -> Result<Answer<Bytes>> {
        let req = Message::GetWindow {
            layer: *layer,
            sha256: window.sha256,
            offset: window.offset,
            len: window.len,
        };
        match self
            .exchange(&req, Verify::Chunk(window.sha256), timeout)
            .await?
        {
            // Verified by its sha256 as a chunk is (the bytes only: a window is no chunk).
            Received::Chunk(window) => Ok(Answer::Here(window.into_bytes())),
            Received::Control(Message::Pending) => Ok(Answer::Pending),
            Received::Control(Message::NotFound) => Ok(Answer::NotHere),
            other => self.unexpected(other, "GetWindow"),
        }
    }

    /// Part `which` of what a mount needs of layer `layer` (its index's main part or its
    /// chunk list), named by `part`, from the proxy by `repo` (and `ns`) if the peer has
    /// not got it; checked against the sha256 and length (wrong bytes give
    /// [`DataPlaneError::Corrupt`] naming the sha256).
    pub async fn layer_part_answer(
        &mut self,
        which: LayerPart,
        layer: &Digest,
        part: &PartRef,
        repo: (&str, Option<&str>),
        timeout: Duration,
    ) -> Result<Answer<Bytes>> {
        let len = u32::try_from(part.len).map_err(|_| {
            DataPlaneError::Protocol(format!("a {which:?} part of {} bytes", part.len))
        })?;
        let ask = PartAsk {
            layer: *layer,
            sha256: part.sha256,
            len,
            repo: repo.0.to_string(),
            ns: repo.1.map(str::to_string),
        };
        let req = match which {
            LayerPart::IndexMain => Message::GetIndexMain(ask),
            LayerPart::ChunkList => Message::GetChunkList(ask),
        };
        let verify = Verify::Part {
            which,
            sha256: part.sha256,
            len: len as usize,
        };
        match self.exchange(&req, verify, timeout).await? {
            Received::Bytes(b) => Ok(Answer::Here(b)),
            Received::Control(Message::Pending) => Ok(Answer::Pending),
            Received::Control(Message::NotFound) => Ok(Answer::NotHere),
            other => self.unexpected(other, "a layer part"),
        }
    }

    /// Asks which chunks of blob `blob` the peer holds: `Ok(None)` if it does not know
    /// the blob.
    pub async fn have(&mut self, blob: &Digest, timeout: Duration) -> Result<Option<HaveMap>> {
        match self
            .exchange(&Message::Have { blob: *blob }, Verify::Nothing, timeout)
            .await?
        {
            Received::Control(Message::HaveMap(map)) => Ok(Some(map)),
            Received::Control(Message::Unknown) => Ok(None),
            other => self.unexpected(other, "Have"),
        }
    }

    /// Subscribes to blob `blob`'s have-map: the connection becomes the subscription's
    /// ([`Subscription::next`] reads the pushed maps). Sends the request only; errors
    /// and the first map come from `next`.
    pub async fn subscribe(mut self, blob: &Digest, timeout: Duration) -> Result<Subscription> {
        if self.state != State::Ready {
            return Err(DataPlaneError::Closed);
        }
        let id = self.next_id;
        let protocol = |e: wire::WireError| DataPlaneError::Protocol(e.to_string());
        let (head, body) =
            wire::encode_frame(id, &Message::Subscribe { blob: *blob }, &self.limits)
                .map_err(protocol)?;
        let frame = [&head[..], &body[..]].concat();
        with_timeout(timeout, "subscribe", async {
            Ok(self.stream.write_all(&frame).await?)
        })
        .await?;
        Ok(Subscription { client: self, id })
    }

    fn unexpected<T>(&mut self, reply: Received, request: &str) -> Result<T> {
        let kind = match reply {
            Received::Control(Message::Error(text)) => return Err(DataPlaneError::Remote(text)),
            Received::Control(m) => m.kind(),
            Received::Chunk(_) | Received::Bytes(_) => wire::kind::CHUNK,
            Received::Pieces(_) => wire::kind::PIECES,
        };
        self.state = State::Broken;
        Err(DataPlaneError::Protocol(format!(
            "frame kind {kind:#04x} in reply to {request}"
        )))
    }

    /// Sends `req` and reads its reply within `timeout`, keeping track of whether the
    /// stream is still in step.
    async fn exchange(
        &mut self,
        req: &Message,
        verify: Verify,
        timeout: Duration,
    ) -> Result<Received> {
        if self.state != State::Ready {
            self.state = State::Broken;
            return Err(DataPlaneError::Closed);
        }
        self.state = State::Busy;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        // The answer must start within `timeout` and its body keep coming (no gap of
        // `timeout`), within `SLOW_ANSWER` × `timeout` in all: a loaded peer that is
        // sending is not cut off (the proxy would pay for it), a stuck one is.
        let result = with_timeout(
            timeout.saturating_mul(SLOW_ANSWER),
            "request",
            self.exchange_inner(id, req, verify, timeout),
        )
        .await;
        self.state = match &result {
            Ok(_) | Err(DataPlaneError::Corrupt { .. } | DataPlaneError::Remote(_)) => State::Ready,
            Err(_) => State::Broken,
        };
        result
    }

    async fn exchange_inner(
        &mut self,
        id: u32,
        req: &Message,
        verify: Verify,
        idle: Duration,
    ) -> Result<Received> {
        let protocol = |e: wire::WireError| DataPlaneError::Protocol(e.to_string());
        let (head, body) = wire::encode_frame(id, req, &self.limits).map_err(protocol)?;
        let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
        frame.extend_from_slice(&head);
        frame.extend_from_slice(&body);
        let mut head = [0u8; HEADER_LEN];
        with_timeout(idle, "request", async {
            self.stream.write_all(&frame).await?;
            read_exact_or_closed(&mut self.stream, &mut head).await
        })
        .await?;
        let header = wire::decode_header(&head, &self.limits).map_err(protocol)?;
        if header.request_id != id {
            return Err(DataPlaneError::Protocol(format!(
                "reply for request {} to request {id}",
                header.request_id
            )));
        }
        match (header.kind, verify) {
            (wire::kind::CHUNK, Verify::Chunk(digest)) => {
                let chunk = self.read_chunk(digest, header.len, idle).await?;
                chunk
                    .map(Received::Chunk)
                    .map_err(|_| DataPlaneError::Corrupt {
                        peer: self.peer,
                        digest,
                    })
            }
            (
                wire::kind::PIECES,
                Verify::Pieces {
                    first,
                    digests,
                    len,
                },
            ) => {
                let body = self.read_body(header.len, idle).await?;
                let wrong = |digest| DataPlaneError::Corrupt {
                    peer: self.peer,
                    digest,
                };
                if body.len() != len {
                    return Err(wrong(digests.last().copied().unwrap_or(Digest::of(b""))));
                }
                VerifiedPieces::check(first, &digests, body)
                    .map(Received::Pieces)
                    .map_err(|e| wrong(e.expected))
            }
            (wire::kind::CHUNK, Verify::Part { which, sha256, len }) => {
                let body = self.read_body(header.len, idle).await?;
                let named = match which {
                    LayerPart::IndexMain => LayerIndex::main_part_digest(&body),
                    LayerPart::ChunkList => Some(Digest::of(&body)),
                };
                if body.len() != len || named != Some(sha256) {
                    return Err(DataPlaneError::Corrupt {
                        peer: self.peer,
                        digest: sha256,
                    });
                }
                Ok(Received::Bytes(body))
            }
            (
                wire::kind::GET_CHUNK
                | wire::kind::HAVE
                | wire::kind::GET_PIECES
                | wire::kind::GET_WINDOW
                | wire::kind::GET_INDEX_MAIN
                | wire::kind::GET_CHUNK_LIST
                | wire::kind::CHUNK
                | wire::kind::PIECES,
                _,
            ) => Err(DataPlaneError::Protocol(format!(
                "unexpected frame kind {:#04x} from the server",
                header.kind
            ))),
            _ => {
                // A control frame: its length is within max_control (decode_header).
                let mut body = vec![0u8; header.len];
                read_exact_or_closed(&mut self.stream, &mut body).await?;
                wire::decode_body(&header, &body)
                    .map(Received::Control)
                    .map_err(protocol)
            }
        }
    }

    /// Reads a `len`-byte chunk body (len already checked against the limit), each read
    /// within `idle`, hashing each piece as soon as it arrives; then checks it against
    /// `digest`. The outer error is the connection's, the inner one the peer's bytes'.
    async fn read_chunk(
        &mut self,
        digest: Digest,
        len: usize,
        idle: Duration,
    ) -> Result<std::result::Result<VerifiedChunk, imgd_core::ChunkMismatch>> {
        let mut rx = ChunkReceiver::new(digest, len);
        while rx.len() < len {
            let want = (len - rx.len()).min(READ_PIECE);
            let stream = &mut self.stream;
            let n = with_timeout(idle, "request body", async {
                Ok(stream.read_buf(&mut rx.tail(want)).await?)
            })
            .await?;
            if n == 0 {
                return Err(DataPlaneError::Closed);
            }
        }
        Ok(rx.finish())
    }

    /// Reads a `len`-byte body (len already checked against the limit), each read within
    /// `idle`.
    async fn read_body(&mut self, len: usize, idle: Duration) -> Result<Bytes> {
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            let want = (len - buf.len()).min(READ_PIECE);
            let n = with_timeout(idle, "request body", async {
                Ok(self.stream.read_buf(&mut (&mut buf).limit(want)).await?)
            })
            .await?;
            if n == 0 {
                return Err(DataPlaneError::Closed);
            }
        }
        Ok(buf.freeze())
    }
}

/// A have-map subscription on its own connection ([`PeerClient::subscribe`]). Dropping
/// it closes the connection, which ends the subscription on the server.
pub struct Subscription {
    client: PeerClient,
    id: u32,
}

impl Subscription {
    /// The next pushed map: `Ok(None)` if the peer does not know the blob (the
    /// subscription is over). The server pushes at least every
    /// [`SUBSCRIPTION_HEARTBEAT`](super::server::SUBSCRIPTION_HEARTBEAT), so a `timeout`
    /// a few times that tells a dead peer from a quiet one.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<HaveMap>> {
        let c = &mut self.client;
        let id = self.id;
        let read = async {
            let protocol = |e: wire::WireError| DataPlaneError::Protocol(e.to_string());
            let mut head = [0u8; HEADER_LEN];
            read_exact_or_closed(&mut c.stream, &mut head).await?;
            let header = wire::decode_header(&head, &c.limits).map_err(protocol)?;
            if header.request_id != id || header.kind == wire::kind::CHUNK {
                return Err(DataPlaneError::Protocol(format!(
                    "frame kind {:#04x} for request {} on subscription {id}",
                    header.kind, header.request_id
                )));
            }
            let mut body = vec![0u8; header.len];
            read_exact_or_closed(&mut c.stream, &mut body).await?;
            wire::decode_body(&header, &body).map_err(protocol)
        };
        match with_timeout(timeout, "subscription", read).await? {
            Message::HaveMap(map) => Ok(Some(map)),
            Message::Unknown => Ok(None),
            Message::Error(text) => Err(DataPlaneError::Remote(text)),
            other => Err(DataPlaneError::Protocol(format!(
                "frame kind {:#04x} on a subscription",
                other.kind()
            ))),
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.client.peer
    }
}

async fn read_exact_or_closed(stream: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(DataPlaneError::Closed),
        Err(e) => Err(e.into()),
    }
}
