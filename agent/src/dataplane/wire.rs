//! Frames of the data plane: a 9-byte header and a size-limited body.
//!
//! ```text
//! header: len: u32 BE (body bytes) | kind: u8 | request_id: u32 BE
//! GetChunk  0x01  digest[32]                       -> Chunk | NotFound | Error
//! Have      0x02  blob digest[32]                  -> HaveMap | Unknown | Error
//! Chunk     0x81  the chunk's bytes (<= max_chunk)
//! NotFound  0x82  (empty)
//! HaveMap   0x83  chunk_count: u32 BE | present bitmap | in-flight bitmap
//! Unknown   0x84  (empty)
//! Error     0xee  UTF-8 message
//! ```
//!
//! Bitmaps are `ceil(chunk_count / 8)` bytes, chunk `i` is bit `i % 8` (LSB first) of
//! byte `i / 8`, and padding bits must be zero. A response echoes its request's id.
//!
//! Decoding is pure and checks every length against [`FrameLimits`] from the header
//! alone, before anything is allocated; [`decode_frame`] is the entry point for fuzzing.

use super::have_map::{bitmap_len, malformed};
use super::{HaveMap, Limits};
use bytes::Bytes;
use imgd_core::Digest;

/// Size of a frame header.
pub const HEADER_LEN: usize = 9;
/// Longest message an encoded [`Message::Error`] carries; longer ones are truncated.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Frame kind bytes.
pub mod kind {
    /// Request: send me the chunk with this digest.
    pub const GET_CHUNK: u8 = 0x01;
    /// Request: which chunks of this blob do you hold?
    pub const HAVE: u8 = 0x02;
    /// Response: the chunk's bytes.
    pub const CHUNK: u8 = 0x81;
    /// Response: I do not hold that chunk.
    pub const NOT_FOUND: u8 = 0x82;
    /// Response: the chunks of the blob I hold or am fetching.
    pub const HAVE_MAP: u8 = 0x83;
    /// Response: I know nothing of that blob.
    pub const UNKNOWN: u8 = 0x84;
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

impl From<&Limits> for FrameLimits {
    fn from(l: &Limits) -> Self {
        FrameLimits {
            max_chunk: l.max_chunk,
            max_control: l.max_control,
        }
    }
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

/// One data plane message (request or response).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    GetChunk { digest: Digest },
    Have { blob: Digest },
    Chunk(Bytes),
    NotFound,
    HaveMap(HaveMap),
    Unknown,
    Error(String),
}

impl Message {
    /// The frame kind byte of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::GetChunk { .. } => kind::GET_CHUNK,
            Message::Have { .. } => kind::HAVE,
            Message::Chunk(_) => kind::CHUNK,
            Message::NotFound => kind::NOT_FOUND,
            Message::HaveMap(_) => kind::HAVE_MAP,
            Message::Unknown => kind::UNKNOWN,
            Message::Error(_) => kind::ERROR,
        }
    }
}

fn kind_name(k: u8) -> &'static str {
    match k {
        kind::GET_CHUNK => "GetChunk",
        kind::HAVE => "Have",
        kind::CHUNK => "Chunk",
        kind::NOT_FOUND => "NotFound",
        kind::HAVE_MAP => "HaveMap",
        kind::UNKNOWN => "Unknown",
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
        kind::GET_CHUNK | kind::HAVE => exact(32),
        kind::NOT_FOUND | kind::UNKNOWN => exact(0),
        kind::CHUNK => at_most(limits.max_chunk),
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
        kind::CHUNK => Message::Chunk(Bytes::copy_from_slice(body)),
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
        Message::Have { blob } => Bytes::copy_from_slice(blob.as_bytes()),
        Message::Chunk(b) => b.clone(),
        Message::NotFound | Message::Unknown => Bytes::new(),
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
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_chunk: 4 << 20,
        max_control: 64 << 10,
    };

    fn encode(id: u32, msg: &Message) -> Vec<u8> {
        let (h, b) = encode_frame(id, msg, &LIMITS).unwrap();
        [&h[..], &b[..]].concat()
    }

    #[test]
    fn every_message_round_trips() {
        let mut map = HaveMap::new(13);
        map.set_present(0, true);
        map.set_present(12, true);
        map.set_in_flight(5, true);
        map.set_present(99, true); // out of range: ignored
        assert!(map.is_present(12) && !map.is_present(11) && map.is_in_flight(5));
        let msgs = [
            Message::GetChunk {
                digest: Digest::of(b"a"),
            },
            Message::Have {
                blob: Digest::of(b"b"),
            },
            Message::Chunk(Bytes::from_static(b"chunk bytes")),
            Message::Chunk(Bytes::new()),
            Message::NotFound,
            Message::HaveMap(map),
            Message::HaveMap(HaveMap::new(0)),
            Message::Unknown,
            Message::Error("no such thing".into()),
        ];
        for (i, msg) in msgs.iter().enumerate() {
            let bytes = encode(i as u32 + 7, msg);
            let (id, got, used) = decode_frame(&bytes, &LIMITS).unwrap().unwrap();
            assert_eq!((id, &got, used), (i as u32 + 7, msg, bytes.len()));
            // Every strict prefix is incomplete, not an error.
            for cut in 0..bytes.len() {
                assert_eq!(decode_frame(&bytes[..cut], &LIMITS), Ok(None));
            }
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_rejected_from_the_header() {
        let huge = encode_header(kind::CHUNK, 1, (4 << 20) + 1);
        assert!(matches!(
            decode_frame(&huge, &LIMITS),
            Err(WireError::Oversized { .. })
        ));
        let big_map = encode_header(kind::HAVE_MAP, 1, u32::MAX);
        assert!(matches!(
            decode_frame(&big_map, &LIMITS),
            Err(WireError::Oversized { .. })
        ));
        let short = encode_header(kind::GET_CHUNK, 1, 31);
        assert!(matches!(
            decode_frame(&short, &LIMITS),
            Err(WireError::BadLength { .. })
        ));
        let unknown = encode_header(0x42, 1, 0);
        assert_eq!(
            decode_frame(&unknown, &LIMITS),
            Err(WireError::UnknownKind(0x42))
        );
        // A have-map whose bitmaps disagree with its count, or with padding bits set.
        let mut bad = encode_header(kind::HAVE_MAP, 1, 6).to_vec();
        bad.extend_from_slice(&[0, 0, 0, 9, 0, 0]);
        assert!(decode_frame(&bad, &LIMITS).is_err());
        let mut pad = encode_header(kind::HAVE_MAP, 1, 6).to_vec();
        pad.extend_from_slice(&[0, 0, 0, 3, 0b1000, 0]);
        assert!(decode_frame(&pad, &LIMITS).is_err());
        // A have-map too big to encode within the control limit.
        let too_big = Message::HaveMap(HaveMap::new(1 << 20));
        assert!(encode_frame(1, &too_big, &LIMITS).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 256];
        for round in 0..20_000 {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            // Make small valid-looking lengths and kinds common.
            buf[0..3].fill(0);
            buf[4] = [0x01, 0x02, 0x81, 0x82, 0x83, 0x84, 0xee][round % 7];
            let len = (state >> 8) as usize % buf.len();
            let _ = decode_frame(&buf[..len], &LIMITS);
        }
    }
}
