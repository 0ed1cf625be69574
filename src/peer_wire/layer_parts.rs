//! The bodies of the requests for what a mount needs of a layer: `GetWindow` (a checkpoint
//! window of its index), `GetIndexMain` (the index's main part) and `GetChunkList` (its
//! chunk list), decoded and encoded.

use super::{Message, PartAsk, WireError, GET_PART_FIXED, GET_WINDOW_LEN, MAX_REPO_NAME};
use crate::digest::Digest;
use bytes::Bytes;

/// The `N` bytes of `body` at `at`, if it holds them.
fn field<const N: usize>(body: &[u8], at: usize) -> Option<[u8; N]> {
    body.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// A `GetWindow` body, 76 bytes exactly (checked by the header).
pub(super) fn decode_get_window(body: &[u8]) -> Result<Message, WireError> {
    let bad = |reason| WireError::Malformed {
        kind: "GetWindow",
        reason,
    };
    let digest = |at| {
        Ok(Digest::from_bytes(
            field(body, at).ok_or(bad("shorter than two digests"))?,
        ))
    };
    let offset: [u8; 8] = field(body, 64).ok_or(bad("shorter than its offset"))?;
    let len = u32::from_be_bytes(field(body, 72).ok_or(bad("shorter than its length"))?);
    if len == 0 {
        return Err(bad("asks for an empty window"));
    }
    Ok(Message::GetWindow {
        layer: digest(0)?,
        sha256: digest(32)?,
        offset: u64::from_be_bytes(offset),
        len,
    })
}

/// Encodes a `GetWindow` body.
pub(super) fn encode_get_window(layer: &Digest, sha256: &Digest, offset: u64, len: u32) -> Bytes {
    let mut v = Vec::with_capacity(GET_WINDOW_LEN);
    v.extend_from_slice(layer.as_bytes());
    v.extend_from_slice(sha256.as_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    Bytes::from(v)
}

/// A `GetIndexMain` or `GetChunkList` body (`kind` names it in errors): two digests, the
/// length, then the repository and the namespace, each a u16 BE length and UTF-8 (an
/// empty namespace is none), and nothing after them.
pub(super) fn decode_part_ask(kind: &'static str, body: &[u8]) -> Result<PartAsk, WireError> {
    let bad = |reason| WireError::Malformed { kind, reason };
    let digest = |at| {
        Ok(Digest::from_bytes(
            field(body, at).ok_or(bad("shorter than two digests"))?,
        ))
    };
    let len = u32::from_be_bytes(field(body, 64).ok_or(bad("shorter than its length"))?);
    if len == 0 {
        return Err(bad("asks for no bytes"));
    }
    let mut at = 68;
    let mut text = |what: &'static str| -> Result<String, WireError> {
        let n = u16::from_be_bytes(field(body, at).ok_or(bad(what))?) as usize;
        if n > MAX_REPO_NAME {
            return Err(bad("a repository or namespace longer than 256 bytes"));
        }
        let bytes = body.get(at + 2..at + 2 + n).ok_or(bad(what))?;
        at += 2 + n;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| bad("a repository or namespace that is not UTF-8"))
    };
    let repo = text("shorter than its repository")?;
    let ns = text("shorter than its namespace")?;
    if at != body.len() {
        return Err(bad("bytes after its namespace"));
    }
    if repo.is_empty() {
        return Err(bad("no repository"));
    }
    Ok(PartAsk {
        layer: digest(0)?,
        sha256: digest(32)?,
        len,
        repo,
        ns: (!ns.is_empty()).then_some(ns),
    })
}

/// Encodes a `GetIndexMain` or `GetChunkList` body (`kind` names it in errors); a
/// repository or namespace longer than [`MAX_REPO_NAME`] is refused.
pub(super) fn encode_part_ask(kind: &'static str, ask: &PartAsk) -> Result<Bytes, WireError> {
    let (repo, ns) = (ask.repo.as_str(), ask.ns.as_deref().unwrap_or(""));
    if repo.len() > MAX_REPO_NAME || ns.len() > MAX_REPO_NAME {
        return Err(WireError::Malformed {
            kind,
            reason: "a repository or namespace longer than 256 bytes",
        });
    }
    let mut v = Vec::with_capacity(GET_PART_FIXED + repo.len() + ns.len());
    v.extend_from_slice(ask.layer.as_bytes());
    v.extend_from_slice(ask.sha256.as_bytes());
    v.extend_from_slice(&ask.len.to_be_bytes());
    for t in [repo, ns] {
        v.extend_from_slice(&(t.len() as u16).to_be_bytes());
        v.extend_from_slice(t.as_bytes());
    }
    Ok(Bytes::from(v))
}
