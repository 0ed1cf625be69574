//! Chunk bytes that were hashed and found to match their digest: [`VerifiedChunk`].
//!
//! The type is the proof of the check. Its fields are private and its only
//! constructors hash the bytes and compare them with the expected digest
//! ([`VerifiedChunk::check`] for bytes at hand, [`ChunkReceiver`] for bytes that arrive
//! piece by piece and are hashed as they arrive), so code that holds a `VerifiedChunk`
//! never needs to hash it again: the receiver of a hop verifies once, and whatever it
//! hands the chunk to (the cache, a reader, a peer) takes the type instead of bytes.
//! There is no unchecked constructor: bytes read back from disk are checked again
//! (disks rot), which is a new hop, not a second hash of the same one.

use crate::digest::{Digest, Sha256};
use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};

/// Bytes that do not hash to the digest they were expected to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunk bytes hash to {actual}, expected {expected}")]
pub struct ChunkMismatch {
    /// The digest asked for.
    pub expected: Digest,
    /// What the bytes hash to.
    pub actual: Digest,
}

/// A chunk's bytes together with their digest, checked to match.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedChunk {
    digest: Digest,
    bytes: Bytes,
}

impl VerifiedChunk {
    /// Hashes `bytes` and returns them as verified if they hash to `expected`.
    pub fn check(expected: Digest, bytes: Bytes) -> Result<Self, ChunkMismatch> {
        let mut hasher = Sha256::new();
        hasher.update(&bytes);
        verdict(expected, hasher, bytes)
    }

    /// The digest the bytes hash to.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The verified bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Length of the chunk in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True for an empty chunk.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes, giving up the proof.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl std::fmt::Debug for VerifiedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedChunk")
            .field("digest", &self.digest)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// A chunk being received: bytes can only be appended, and every appended byte is
/// hashed once, right after it arrives (while it is still in the CPU cache). At the end,
/// [`ChunkReceiver::finish`] compares the digest and gives the [`VerifiedChunk`].
pub struct ChunkReceiver {
    expected: Digest,
    buf: BytesMut,
    hasher: Sha256,
}

impl ChunkReceiver {
    /// A receiver for a chunk expected to hash to `expected`, with room for `capacity`
    /// bytes.
    pub fn new(expected: Digest, capacity: usize) -> Self {
        ChunkReceiver {
            expected,
            buf: BytesMut::with_capacity(capacity),
            hasher: Sha256::new(),
        }
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True before any byte arrived.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends (and hashes) `bytes`.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.buf.extend_from_slice(bytes);
    }

    /// A place to append at most `max` bytes in place (e.g. for
    /// `AsyncReadExt::read_buf`): what was appended is hashed when the [`Tail`] is
    /// dropped. It exposes only the unwritten end of the buffer, so bytes already
    /// hashed cannot be changed.
    pub fn tail(&mut self, max: usize) -> Tail<'_> {
        Tail {
            start: self.buf.len(),
            left: max,
            rx: self,
        }
    }

    /// The chunk, if what was received hashes to the expected digest.
    pub fn finish(self) -> Result<VerifiedChunk, ChunkMismatch> {
        verdict(self.expected, self.hasher, self.buf.freeze())
    }
}

/// Compares the hash of everything fed to `hasher` with `expected` and pairs it with
/// `bytes`, which must be exactly what was fed.
fn verdict(expected: Digest, hasher: Sha256, bytes: Bytes) -> Result<VerifiedChunk, ChunkMismatch> {
    let actual = hasher.finish();
    if actual != expected {
        return Err(ChunkMismatch { expected, actual });
    }
    Ok(VerifiedChunk {
        digest: actual,
        bytes,
    })
}

/// The unwritten end of a [`ChunkReceiver`]'s buffer, at most `max` bytes; the bytes
/// written through it are hashed when it is dropped.
pub struct Tail<'a> {
    rx: &'a mut ChunkReceiver,
    start: usize,
    left: usize,
}

impl Drop for Tail<'_> {
    fn drop(&mut self) {
        let rx = &mut *self.rx;
        rx.hasher.update(&rx.buf[self.start..]);
    }
}

// SAFETY: every method delegates to `BytesMut`'s `BufMut`, only capping the length at
// `left` (as `bytes::buf::Limit` does); `advance_mut`'s contract is the caller's, as
// there.
unsafe impl BufMut for Tail<'_> {
    fn remaining_mut(&self) -> usize {
        self.rx.buf.remaining_mut().min(self.left)
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.left, "advance_mut past the tail's end");
        // SAFETY: the caller initialised `cnt` bytes of `chunk_mut`, which is a prefix
        // of the buffer's own spare capacity.
        unsafe { self.rx.buf.advance_mut(cnt) };
        self.left -= cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        let left = self.left;
        let chunk = self.rx.buf.chunk_mut();
        let n = chunk.len().min(left);
        &mut chunk[..n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_digest_gives_the_checked_bytes_and_digest() {
        let bytes = Bytes::from_static(b"chunk bytes");
        let d = Digest::of(&bytes);
        let v = VerifiedChunk::check(d, bytes.clone()).unwrap();
        assert_eq!(*v.digest(), d);
        assert_eq!(v.bytes(), &bytes);
        assert_eq!(v.len(), bytes.len());
        assert_eq!(v.into_bytes(), bytes);
    }

    #[test]
    fn a_wrong_digest_cannot_make_the_type() {
        let bytes = Bytes::from_static(b"chunk bytes");
        let wrong = Digest::of(b"other bytes");
        let err = VerifiedChunk::check(wrong, bytes.clone()).unwrap_err();
        assert_eq!(err.expected, wrong);
        assert_eq!(err.actual, Digest::of(&bytes));
        // One flipped byte is enough.
        let mut flipped = bytes.to_vec();
        flipped[0] ^= 1;
        assert!(VerifiedChunk::check(Digest::of(&bytes), flipped.into()).is_err());
    }

    #[test]
    fn a_receiver_hashes_what_arrives_in_parts() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&body);
        let mut rx = ChunkReceiver::new(d, body.len());
        rx.extend_from_slice(&body[..10]);
        let mut rest = &body[10..];
        while !rest.is_empty() {
            let mut tail = rx.tail(4096);
            let n = tail.remaining_mut().min(rest.len()).min(3000);
            tail.put_slice(&rest[..n]);
            assert_eq!(tail.remaining_mut(), 4096 - n, "capped at max");
            drop(tail);
            rest = &rest[n..];
        }
        assert_eq!(rx.len(), body.len());
        let v = rx.finish().unwrap();
        assert_eq!(*v.digest(), d);
        assert_eq!(&v.bytes()[..], &body[..]);
    }

    #[test]
    fn a_receiver_with_wrong_or_missing_bytes_fails() {
        let body = b"the whole chunk".to_vec();
        let d = Digest::of(&body);
        let mut short = ChunkReceiver::new(d, 0);
        short.extend_from_slice(&body[..body.len() - 1]);
        assert!(short.finish().is_err());
        let mut wrong = ChunkReceiver::new(d, 0);
        wrong.tail(64).put_slice(b"the whole chunK");
        assert_eq!(wrong.finish().unwrap_err().expected, d);
    }

    #[test]
    #[should_panic]
    fn a_tail_does_not_grow_past_its_max() {
        let mut rx = ChunkReceiver::new(Digest::of(b""), 16);
        rx.tail(4).put_slice(b"12345");
    }
}
