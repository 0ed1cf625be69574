//! Frames of the data plane: a 9-byte header and a size-limited body.
//!
//! ```text
//! header: len: u32 BE (body bytes) | kind: u8 | request_id: u32 BE
//! GetChunk  0x01  digest[32]                       -> Chunk | Pending | NotFound | Error
//! Have      0x02  blob digest[32]                  -> HaveMap | Unknown | Error
//! GetPieces 0x04  chunk digest[32] | first: u32 BE | count: u32 BE
//!                                                  -> Pieces | Pending | NotFound | Error
//! Subscribe 0x03  blob digest[32]                  -> HaveMap, HaveMap, ... | Unknown | Error
//! GetWindow 0x05  layer digest[32] | window sha256[32] | offset: u64 BE | len: u32 BE
//!                                                  -> Chunk | Pending | NotFound | Error
//! GetIndexMain 0x06  layer digest[32] | main part's sha256[32] | len: u32 BE
//!                    | repo_len: u16 BE | repo | ns_len: u16 BE | ns
//!                                                  -> Chunk | Pending | NotFound | Error
//! GetChunkList 0x07  the same, with the chunk list's sha256
//!                                                  -> Chunk | Pending | NotFound | Error
//! Chunk     0x81  the chunk's bytes (<= max_chunk)
//! NotFound  0x82  (empty)
//! HaveMap   0x83  chunk_count: u32 BE | present bitmap | in-flight bitmap
//! Unknown   0x84  (empty)
//! Pieces    0x85  pieces first..first+count of the chunk, concatenated (<= max_chunk)
//! Pending   0x86  (empty): not here yet, but this node is fetching it now; ask again
//! Error     0xee  UTF-8 message
//! ```
//!
//! `GetPieces` and `Pending` are new in version 2 of the protocol (`imgd-dp-v2`, the
//! handshake's tag; version 3, `imgd-dp-v3`, counts pieces of 64 KiB, not 256 KiB, so the
//! versions do not talk): a lazy read asks a peer for just the 64 KiB pieces it needs, and a
//! peer that is fetching the chunk says so instead of "not found", so the reader waits
//! for it rather than asking the proxy too. Pieces are checked by the receiver against
//! their digests from the chunk list, like chunks.
//!
//! `GetWindow` is new in version 4 (`imgd-dp-v4`): a lazy read's inflate checkpoint window
//! (a range of the layer index's windows part, named by its sha256 in the index's main
//! part) from the peer that owns it among the hosts reading the layer. The answer is a
//! `Chunk` frame with the window's bytes, checked by the receiver against the sha256; a
//! peer that does not hold the window but reads the layer fetches it from the proxy when
//! asked and answers `Pending` meanwhile, so hosts reading one layer take each window from
//! the proxy once.
//!
//! `GetIndexMain` is new in version 5 (`imgd-dp-v5`): the main part of a layer's index
//! (file table and checkpoints), named by its sha256 (its trailer: the sha256 of all the
//! bytes before it), which the asker got from the proxy with the part's length. The
//! asker's repository (and registry namespace, empty for none) come along, so that the
//! peer it asks, the part's owner among the swarm, can fetch the part from the proxy on
//! its behalf when it has not got it, answering `Pending` meanwhile. The answer is a
//! `Chunk` frame with the part's bytes, checked by the receiver against the sha256.
//! `GetChunkList` (also version 5) is the same for the layer's chunk list, as its
//! canonical bytes ([`crate::ChunkList::canonical_bytes`]), named by their sha256.
//!
//! `Subscribe` (also new in version 2) turns the connection into a push channel: the
//! server answers with the blob's have-map at once and then sends the whole map again,
//! with the same request id, each time it changes, at most one frame per
//! [`PUSH_INTERVAL_MS`]; the client sends nothing more and ends the subscription by
//! closing the connection. A pushed map is a whole map, never a delta, so a lost or
//! coalesced update cannot leave the subscriber with a wrong view.
//!
//! Bitmaps are `ceil(chunk_count / 8)` bytes, chunk `i` is bit `i % 8` (LSB first) of
//! byte `i / 8`, and padding bits must be zero. A response echoes its request's id.
//!
//! Decoding is pure and checks every length against [`FrameLimits`] from the header
//! alone, before anything is allocated; [`decode_frame`] is the entry point for fuzzing
//! (`imgd_core::fuzzing::peer_wire`). The agent's data plane (`imgd::dataplane`) does the
//! I/O, the handshake and the limits of connections and requests.

mod have_map;
mod layer_parts;

use crate::digest::Digest;
use bytes::Bytes;
pub use have_map::HaveMap;
use have_map::{bitmap_len, malformed};

/// Size of a frame header.
pub const HEADER_LEN: usize = 9;
/// Size of a `GetPieces` body: chunk digest, first piece, piece count.
pub const GET_PIECES_LEN: usize = 40;
/// Size of a `GetWindow` body: layer digest, window sha256, offset, length.
pub const GET_WINDOW_LEN: usize = 76;
/// Longest repository name, and namespace, a `GetIndexMain` carries.
pub const MAX_REPO_NAME: usize = 256;
/// Size of a `GetIndexMain` or `GetChunkList` body without the bytes of its repository
/// and namespace (two digests, the length and the two u16 lengths).
pub const GET_PART_FIXED: usize = 72;
/// Longest message an encoded [`Message::Error`] carries; longer ones are truncated.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Shortest time between two have-maps a server pushes on one subscription, in ms: an
/// explicit rate bound (at most 20 frames a second per subscription) that also coalesces
/// bursts of chunk completions into one frame.
pub const PUSH_INTERVAL_MS: u64 = 50;

/// Frame kind bytes.
pub mod kind {
    /// Request: send me the chunk with this digest.
    pub const GET_CHUNK: u8 = 0x01;
    /// Request: which chunks of this blob do you hold?
    pub const HAVE: u8 = 0x02;
    /// Request: send me these 64 KiB pieces ([`crate::PIECE_SIZE`]) of this chunk.
    pub const GET_PIECES: u8 = 0x04;
    /// Request: send me this inflate checkpoint window of this layer's index (v4).
    pub const GET_WINDOW: u8 = 0x05;
    /// Request: send me the main part of this layer's index (v5).
    pub const GET_INDEX_MAIN: u8 = 0x06;
    /// Request: send me this layer's chunk list (v5).
    pub const GET_CHUNK_LIST: u8 = 0x07;
    /// Request: push me this blob's have-map now and whenever it changes (v1.1).
    pub const SUBSCRIBE: u8 = 0x03;
    /// Response: the chunk's bytes.
    pub const CHUNK: u8 = 0x81;
    /// Response: I do not hold that chunk.
    pub const NOT_FOUND: u8 = 0x82;
    /// Response: the chunks of the blob I hold or am fetching.
    pub const HAVE_MAP: u8 = 0x83;
    /// Response: I know nothing of that blob.
    pub const UNKNOWN: u8 = 0x84;
    /// Response: the pieces asked for, concatenated.
    pub const PIECES: u8 = 0x85;
    /// Response: I am fetching it now; ask again shortly.
    pub const PENDING: u8 = 0x86;
    /// Response: the request failed; the body is a UTF-8 message.
    pub const ERROR: u8 = 0xee;
}

/// Largest bodies a decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest `Chunk` body.
    pub max_chunk: usize,
    /// Largest body of every other frame.
    pub max_control: usize,
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Body length in bytes, already checked against the limits.
    pub len: usize,
    /// One of the [`kind`] constants.
    pub kind: u8,
    /// The request id (echoed by responses).
    pub request_id: u32,
}

/// A malformed, unknown or oversized frame. The connection is closed after one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{kind} frame body of {len} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        kind: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{kind} frame body must be {expected} bytes, got {len}")]
    BadLength {
        kind: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("malformed {kind} frame: {reason}")]
    Malformed {
        kind: &'static str,
        reason: &'static str,
    },
}

/// A request for `len` bytes of what a mount needs of `layer`, named by their sha256, from
/// the proxy by repository `repo` (and registry namespace `ns`) if the peer has not got
/// them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartAsk {
    pub layer: Digest,
    pub sha256: Digest,
    pub len: u32,
    pub repo: String,
    pub ns: Option<String>,
}

/// One data plane message (request or response).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    GetChunk {
        digest: Digest,
    },
    Have {
        blob: Digest,
    },
    Subscribe {
        blob: Digest,
    },
    GetPieces {
        chunk: Digest,
        first: u32,
        count: u32,
    },
    /// The window `offset..offset + len` of the windows part of `layer`'s index, whose
    /// sha256 is `sha256`.
    GetWindow {
        layer: Digest,
        sha256: Digest,
        offset: u64,
        len: u32,
    },
    /// The main part of `layer`'s index, whose trailing sha256 is `sha256`.
    GetIndexMain(PartAsk),
    /// The chunk list of `layer`, whose canonical bytes' sha256 is `sha256`.
    GetChunkList(PartAsk),
    Chunk(Bytes),
    NotFound,
    HaveMap(HaveMap),
    Unknown,
    Pieces(Bytes),
    Pending,
    Error(String),
}

impl Message {
    /// The frame kind byte of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::GetChunk { .. } => kind::GET_CHUNK,
            Message::Have { .. } => kind::HAVE,
            Message::GetPieces { .. } => kind::GET_PIECES,
            Message::GetWindow { .. } => kind::GET_WINDOW,
            Message::GetIndexMain(_) => kind::GET_INDEX_MAIN,
            Message::GetChunkList(_) => kind::GET_CHUNK_LIST,
            Message::Subscribe { .. } => kind::SUBSCRIBE,
            Message::Chunk(_) => kind::CHUNK,
            Message::NotFound => kind::NOT_FOUND,
            Message::HaveMap(_) => kind::HAVE_MAP,
            Message::Unknown => kind::UNKNOWN,
            Message::Pieces(_) => kind::PIECES,
            Message::Pending => kind::PENDING,
            Message::Error(_) => kind::ERROR,
        }
    }
}

fn kind_name(k: u8) -> &'static str {
    match k {
        kind::GET_CHUNK => "GetChunk",
        kind::HAVE => "Have",
        kind::GET_PIECES => "GetPieces",
        kind::GET_WINDOW => "GetWindow",
        kind::GET_INDEX_MAIN => "GetIndexMain",
        kind::GET_CHUNK_LIST => "GetChunkList",
        kind::SUBSCRIBE => "Subscribe",
        kind::CHUNK => "Chunk",
        kind::NOT_FOUND => "NotFound",
        kind::HAVE_MAP => "HaveMap",
        kind::UNKNOWN => "Unknown",
        kind::PIECES => "Pieces",
        kind::PENDING => "Pending",
        kind::ERROR => "Error",
        _ => "unknown",
    }
}

/// Checks a body length for frame kind `k` against the limits.
fn check_len(k: u8, len: usize, limits: &FrameLimits) -> Result<(), WireError> {
    let name = kind_name(k);
    let exact = |expected: usize| {
        if len == expected {
            Ok(())
        } else {
            Err(WireError::BadLength {
                kind: name,
                len,
                expected,
            })
        }
    };
    let at_most = |limit: usize| {
        if len <= limit {
            Ok(())
        } else {
            Err(WireError::Oversized {
                kind: name,
                len,
                limit,
            })
        }
    };
    match k {
        kind::GET_CHUNK | kind::HAVE | kind::SUBSCRIBE => exact(32),
        kind::GET_PIECES => exact(GET_PIECES_LEN),
        kind::GET_WINDOW => exact(GET_WINDOW_LEN),
        kind::GET_INDEX_MAIN | kind::GET_CHUNK_LIST => at_most(GET_PART_FIXED + 2 * MAX_REPO_NAME),
        kind::NOT_FOUND | kind::UNKNOWN | kind::PENDING => exact(0),
        kind::CHUNK | kind::PIECES => at_most(limits.max_chunk),
        kind::HAVE_MAP | kind::ERROR => at_most(limits.max_control),
        other => Err(WireError::UnknownKind(other)),
    }
}

/// Encodes a frame header.
pub fn encode_header(k: u8, request_id: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4] = k;
    h[5..].copy_from_slice(&request_id.to_be_bytes());
    h
}

/// Decodes a header and checks its length against `limits`; nothing is allocated.
pub fn decode_header(buf: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Header, WireError> {
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let k = buf[4];
    let request_id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
    check_len(k, len, limits)?;
    Ok(Header {
        len,
        kind: k,
        request_id,
    })
}

/// Decodes the body of a frame whose header [`decode_header`] accepted.
pub fn decode_body(header: &Header, body: &[u8]) -> Result<Message, WireError> {
    if body.len() != header.len {
        return Err(WireError::BadLength {
            kind: kind_name(header.kind),
            len: body.len(),
            expected: header.len,
        });
    }
    let digest = || -> Result<Digest, WireError> {
        let bytes: [u8; 32] = body.try_into().map_err(|_| WireError::BadLength {
            kind: kind_name(header.kind),
            len: body.len(),
            expected: 32,
        })?;
        Ok(Digest::from_bytes(bytes))
    };
    Ok(match header.kind {
        kind::GET_CHUNK => Message::GetChunk { digest: digest()? },
        kind::HAVE => Message::Have { blob: digest()? },
        kind::GET_PIECES => {
            // 40 bytes exactly (checked by the header): digest, first, count.
            let bad = |reason| WireError::Malformed {
                kind: "GetPieces",
                reason,
            };
            let field = |at: usize| -> Result<u32, WireError> {
                let b: [u8; 4] = body
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(bad("shorter than 40 bytes"))?;
                Ok(u32::from_be_bytes(b))
            };
            let chunk: [u8; 32] = body
                .get(..32)
                .and_then(|b| b.try_into().ok())
                .ok_or(bad("shorter than a digest"))?;
            let (first, count) = (field(32)?, field(36)?);
            if count == 0 {
                return Err(bad("asks for no pieces"));
            }
            Message::GetPieces {
                chunk: Digest::from_bytes(chunk),
                first,
                count,
            }
        }
        kind::GET_WINDOW => layer_parts::decode_get_window(body)?,
        kind::GET_INDEX_MAIN => {
            Message::GetIndexMain(layer_parts::decode_part_ask("GetIndexMain", body)?)
        }
        kind::GET_CHUNK_LIST => {
            Message::GetChunkList(layer_parts::decode_part_ask("GetChunkList", body)?)
        }
        kind::SUBSCRIBE => Message::Subscribe { blob: digest()? },
        kind::CHUNK => Message::Chunk(Bytes::copy_from_slice(body)),
        kind::PIECES => Message::Pieces(Bytes::copy_from_slice(body)),
        kind::PENDING => Message::Pending,
        kind::NOT_FOUND => Message::NotFound,
        kind::UNKNOWN => Message::Unknown,
        kind::ERROR => Message::Error(String::from_utf8_lossy(body).into_owned()),
        kind::HAVE_MAP => {
            let (count, maps) = body
                .split_first_chunk::<4>()
                .ok_or_else(|| malformed("shorter than its chunk count"))?;
            let count = u32::from_be_bytes(*count);
            let n = bitmap_len(count);
            if maps.len() != n.saturating_mul(2) {
                return Err(malformed("bitmap length does not match the chunk count"));
            }
            let (present, in_flight) = maps.split_at(n);
            Message::HaveMap(HaveMap::from_bitmaps(
                count,
                present.to_vec(),
                in_flight.to_vec(),
            )?)
        }
        other => return Err(WireError::UnknownKind(other)),
    })
}

/// Decodes one frame from the start of `buf`: `Ok(None)` if `buf` does not yet hold a
/// whole frame, else the request id, the message and the bytes consumed. Pure; never
/// allocates more than the limit allows.
pub fn decode_frame(
    buf: &[u8],
    limits: &FrameLimits,
) -> Result<Option<(u32, Message, usize)>, WireError> {
    let Some((head, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = decode_header(head, limits)?;
    let Some(body) = rest.get(..header.len) else {
        return Ok(None);
    };
    let msg = decode_body(&header, body)?;
    Ok(Some((header.request_id, msg, HEADER_LEN + header.len)))
}

/// Encodes a frame as a header and a body. A `Chunk` body is the same `Bytes` (no
/// copy), so the caller can send both with one vectored write. Fails if the body would
/// exceed `limits`, which the peer would refuse.
pub fn encode_frame(
    request_id: u32,
    msg: &Message,
    limits: &FrameLimits,
) -> Result<([u8; HEADER_LEN], Bytes), WireError> {
    let body = match msg {
        Message::GetChunk { digest } => Bytes::copy_from_slice(digest.as_bytes()),
        Message::Have { blob } | Message::Subscribe { blob } => {
            Bytes::copy_from_slice(blob.as_bytes())
        }
        Message::GetPieces {
            chunk,
            first,
            count,
        } => {
            let mut v = Vec::with_capacity(GET_PIECES_LEN);
            v.extend_from_slice(chunk.as_bytes());
            v.extend_from_slice(&first.to_be_bytes());
            v.extend_from_slice(&count.to_be_bytes());
            Bytes::from(v)
        }
        Message::GetWindow {
            layer,
            sha256,
            offset,
            len,
        } => layer_parts::encode_get_window(layer, sha256, *offset, *len),
        Message::GetIndexMain(ask) => layer_parts::encode_part_ask("GetIndexMain", ask)?,
        Message::GetChunkList(ask) => layer_parts::encode_part_ask("GetChunkList", ask)?,
        Message::Chunk(b) | Message::Pieces(b) => b.clone(),
        Message::NotFound | Message::Unknown | Message::Pending => Bytes::new(),
        Message::HaveMap(m) => {
            let mut v = Vec::with_capacity(m.encoded_len());
            v.extend_from_slice(&m.chunk_count().to_be_bytes());
            v.extend_from_slice(m.present_bitmap());
            v.extend_from_slice(m.in_flight_bitmap());
            Bytes::from(v)
        }
        Message::Error(text) => {
            let mut end = text.len().min(MAX_ERROR_MESSAGE).min(limits.max_control);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Bytes::copy_from_slice(&text.as_bytes()[..end])
        }
    };
    let k = msg.kind();
    check_len(k, body.len(), limits)?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::Oversized {
        kind: kind_name(k),
        len: body.len(),
        limit: u32::MAX as usize,
    })?;
    Ok((encode_header(k, request_id, len), body))
}

#[cfg(test)]
mod tests;
