//! Fixed-size chunking of layer blobs.
//!
//! A blob, exactly as the registry stores it, is cut at [`CHUNK_SIZE`] boundaries; the
//! last chunk may be shorter. Each chunk is addressed by the sha256 of its bytes, and the
//! ordered list of chunks of a blob is its [`ChunkList`].
//!
//! Every chunk is also cut into [`PIECE_SIZE`] pieces (the last one of a chunk may be
//! shorter) whose sha256 digests the chunk list carries, in blob order, so that a lazy
//! read can fetch and verify just the pieces of a chunk it needs.

use crate::digest::{Digest, Sha256};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Size of every chunk but the last of a blob: 4 MiB.
pub const CHUNK_SIZE: usize = 4 << 20;

/// Size of every piece of a chunk but the last: 64 KiB (64 per full chunk). Small, so a
/// lazy read's checkpoint-to-file range rounds up by little (at most 64 KiB each end of
/// the range, where 256 KiB pieces fetched 1.32 times the compressed bytes the Debian
/// bench image's start asked for); the chunk list grows by 32
/// bytes a piece (0.05% of the blob).
pub const PIECE_SIZE: usize = 64 << 10;

/// Number of pieces of a chunk of `size` bytes.
pub fn pieces_in(size: u32) -> usize {
    (size as usize).div_ceil(PIECE_SIZE)
}

/// One chunk of a blob: its digest and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    pub size: u32,
}

/// The ordered chunks of one blob. Concatenated they are the blob, whose digest is `blob`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    pub blob: Digest,
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
    /// The sha256 of every piece of every chunk, in blob order ([`PIECE_SIZE`] each but
    /// the last of a chunk). Empty when the chunk list's producer did not compute them;
    /// reads then fetch whole chunks.
    #[serde(default)]
    pub pieces: Vec<Digest>,
}

/// Error for a chunk list whose chunks do not add up to a valid blob layout.
#[derive(Debug, thiserror::Error)]
#[error("invalid chunk list for {blob}: {reason}")]
pub struct ChunkListError {
    pub blob: Digest,
    pub reason: String,
}

impl ChunkList {
    /// The list encoded one way only (postcard: digests as 32 bytes), so that the sha256
    /// the proxy gives of it checks a copy from a peer.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// A list from its [`ChunkList::canonical_bytes`]: decoded, with nothing after it, and
    /// valid ([`ChunkList::validate`]).
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<ChunkList, ChunkListError> {
        let bad = |reason: String| ChunkListError {
            blob: Digest::of(b""),
            reason,
        };
        let (list, rest) = postcard::take_from_bytes::<ChunkList>(bytes)
            .map_err(|e| bad(format!("not a chunk list: {e}")))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the chunk list", rest.len())));
        }
        list.validate()?;
        Ok(list)
    }

    /// Offset of chunk `i` within the blob.
    pub fn chunk_offset(&self, i: usize) -> u64 {
        i as u64 * CHUNK_SIZE as u64
    }

    /// Indexes of the chunks that cover the blob byte range `range` (clamped to the blob).
    pub fn chunks_covering(&self, range: Range<u64>) -> Range<usize> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return 0..0;
        }
        let first = (range.start / CHUNK_SIZE as u64) as usize;
        let last = ((end - 1) / CHUNK_SIZE as u64) as usize;
        first..last + 1
    }

    /// The piece digests of chunk `i`, if the list has pieces (of [`PIECE_SIZE`]: not a
    /// list whose piece count does not add up) and chunk `i`.
    pub fn pieces_of(&self, i: usize) -> Option<&[Digest]> {
        let chunk = self.chunks.get(i)?;
        let last = self.chunks.last()?;
        let expected = (self.chunks.len() - 1) * (CHUNK_SIZE / PIECE_SIZE) + pieces_in(last.size);
        if self.pieces.len() != expected {
            return None;
        }
        // Every chunk before `i` is a full chunk of CHUNK_SIZE / PIECE_SIZE pieces.
        let first = i * (CHUNK_SIZE / PIECE_SIZE);
        self.pieces.get(first..first + pieces_in(chunk.size))
    }

    /// Checks the structural rules: every chunk but the last is exactly [`CHUNK_SIZE`],
    /// the last is non-empty and at most that, the sizes add up to `size`, and the
    /// pieces, if any, are one per [`PIECE_SIZE`] of every chunk.
    pub fn validate(&self) -> Result<(), ChunkListError> {
        let fail = |reason: String| ChunkListError {
            blob: self.blob,
            reason,
        };
        let expected = self.size.div_ceil(CHUNK_SIZE as u64) as usize;
        if self.chunks.len() != expected {
            return Err(fail(format!(
                "{} chunks for {} bytes, expected {expected}",
                self.chunks.len(),
                self.size
            )));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            let want = (self.size - self.chunk_offset(i)).min(CHUNK_SIZE as u64);
            if u64::from(c.size) != want {
                return Err(fail(format!(
                    "chunk {i} has size {}, expected {want}",
                    c.size
                )));
            }
        }
        let pieces: usize = self.chunks.iter().map(|c| pieces_in(c.size)).sum();
        if !self.pieces.is_empty() && self.pieces.len() != pieces {
            return Err(fail(format!(
                "{} piece digests, expected {pieces}",
                self.pieces.len()
            )));
        }
        Ok(())
    }
}

/// Hashes the pieces of a blob's chunks as their bytes stream past, for producers that
/// write chunks as they arrive instead of holding them (the proxy's spool).
#[derive(Default)]
pub struct PieceHasher {
    current: Sha256,
    len: usize,
    done: Vec<Digest>,
}

impl PieceHasher {
    /// Feeds the next bytes of the current chunk.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (PIECE_SIZE - self.len).min(data.len());
            self.current.update(&data[..take]);
            self.len += take;
            data = &data[take..];
            if self.len == PIECE_SIZE {
                self.end_piece();
            }
        }
    }

    fn end_piece(&mut self) {
        let h = std::mem::take(&mut self.current);
        self.done.push(h.finish());
        self.len = 0;
    }

    /// Ends the current chunk (its last piece may be short).
    pub fn end_chunk(&mut self) {
        if self.len > 0 {
            self.end_piece();
        }
    }

    /// The piece digests of the chunks ended so far, in order.
    pub fn finish(mut self) -> Vec<Digest> {
        self.end_chunk();
        self.done
    }
}

/// Splits a byte stream into chunks while computing the whole blob's digest.
///
/// Feed bytes with [`Chunker::push`]; every completed chunk is handed to the callback.
/// [`Chunker::finish`] emits the last partial chunk and returns the [`ChunkList`].
pub struct Chunker {
    buf: BytesMut,
    blob_hasher: Sha256,
    size: u64,
    chunks: Vec<ChunkRef>,
    pieces: Vec<Digest>,
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunker {
    /// A chunker at the start of a blob.
    pub fn new() -> Self {
        Chunker {
            buf: BytesMut::with_capacity(CHUNK_SIZE),
            blob_hasher: Sha256::new(),
            size: 0,
            chunks: Vec::new(),
            pieces: Vec::new(),
        }
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Feeds `data`; calls `emit(index, chunk_ref, bytes)` for each chunk completed.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        emit: &mut impl FnMut(usize, ChunkRef, Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        self.blob_hasher.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = CHUNK_SIZE - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_SIZE {
                self.flush(emit)?;
            }
        }
        Ok(())
    }

    fn flush<E>(
        &mut self,
        emit: &mut impl FnMut(usize, ChunkRef, Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        let bytes = std::mem::replace(&mut self.buf, BytesMut::with_capacity(CHUNK_SIZE)).freeze();
        let chunk = ChunkRef {
            digest: Digest::of(&bytes),
            size: bytes.len() as u32,
        };
        self.pieces.extend(bytes.chunks(PIECE_SIZE).map(Digest::of));
        let i = self.chunks.len();
        self.chunks.push(chunk);
        emit(i, chunk, bytes)
    }

    /// Emits the final partial chunk, if any, and returns the blob's chunk list.
    pub fn finish<E>(
        mut self,
        emit: &mut impl FnMut(usize, ChunkRef, Bytes) -> Result<(), E>,
    ) -> Result<ChunkList, E> {
        if !self.buf.is_empty() {
            self.flush(emit)?;
        }
        Ok(ChunkList {
            blob: self.blob_hasher.finish(),
            size: self.size,
            chunks: self.chunks,
            pieces: self.pieces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn chunk_all(data: &[u8], step: usize) -> (ChunkList, Vec<Bytes>) {
        let mut out = Vec::new();
        let mut c = Chunker::new();
        let mut emit = |_, _, b: Bytes| -> Result<(), Infallible> {
            out.push(b);
            Ok(())
        };
        for piece in data.chunks(step.max(1)) {
            c.push(piece, &mut emit).unwrap();
        }
        let list = c.finish(&mut emit).unwrap();
        (list, out)
    }

    #[test]
    fn chunks_concatenate_to_blob_whatever_the_feed_size() {
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for step in [1 << 20, 333_333, CHUNK_SIZE, data.len()] {
            let (list, chunks) = chunk_all(&data, step);
            assert_eq!(list.blob, Digest::of(&data));
            assert_eq!(list.chunks.len(), 3);
            assert_eq!(chunks.concat(), data);
            list.validate().unwrap();
            for (i, (r, b)) in list.chunks.iter().zip(&chunks).enumerate() {
                assert_eq!(r.digest, Digest::of(b));
                let pieces = list.pieces_of(i).unwrap();
                assert_eq!(pieces.len(), b.len().div_ceil(PIECE_SIZE));
                for (d, p) in pieces.iter().zip(b.chunks(PIECE_SIZE)) {
                    assert_eq!(*d, Digest::of(p));
                }
            }
            assert_eq!(list.pieces.len(), (CHUNK_SIZE / PIECE_SIZE) * 2 + 1);
            let mut streamed = PieceHasher::default();
            for b in &chunks {
                for part in b.chunks(100_000) {
                    streamed.update(part);
                }
                streamed.end_chunk();
            }
            assert_eq!(streamed.finish(), list.pieces);
            let mut bad = list.clone();
            bad.pieces.pop();
            assert!(bad.validate().is_err(), "a piece missing");
            assert!(
                bad.pieces_of(0).is_none(),
                "pieces that do not add up (another piece size) are not used"
            );
            bad.pieces.clear();
            bad.validate().unwrap();
            assert!(bad.pieces_of(0).is_none(), "no pieces: whole chunks");
        }
    }

    #[test]
    fn a_list_round_trips_through_its_canonical_bytes_and_damaged_bytes_are_refused() {
        let data: Vec<u8> = (0..(CHUNK_SIZE + 70_000))
            .map(|i| (i % 253) as u8)
            .collect();
        let (list, _) = chunk_all(&data, 1 << 20);
        assert!(!list.pieces.is_empty(), "the chunker computes pieces");
        let bytes = list.canonical_bytes();
        assert_eq!(ChunkList::from_canonical_bytes(&bytes).unwrap(), list);
        // The same list always gives the same bytes: its sha256 names it.
        assert_eq!(list.clone().canonical_bytes(), bytes);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(ChunkList::from_canonical_bytes(&longer).is_err());
        assert!(ChunkList::from_canonical_bytes(&bytes[..bytes.len() - 1]).is_err());
        // A list that decodes but does not add up (one chunk fewer) is refused.
        let mut short = list.clone();
        short.chunks.pop();
        assert!(ChunkList::from_canonical_bytes(&short.canonical_bytes()).is_err());
    }

    #[test]
    fn covering_ranges() {
        let list = ChunkList {
            blob: Digest::of(b""),
            size: CHUNK_SIZE as u64 * 2 + 10,
            chunks: vec![],
            pieces: vec![],
        };
        let c = CHUNK_SIZE as u64;
        assert_eq!(list.chunks_covering(0..1), 0..1);
        assert_eq!(list.chunks_covering(c - 1..c + 1), 0..2);
        assert_eq!(list.chunks_covering(c..c * 5), 1..3);
        assert_eq!(list.chunks_covering(c * 9..c * 10), 0..0);
    }

    #[test]
    fn empty_blob_has_no_chunks() {
        let (list, chunks) = chunk_all(b"", 1);
        assert!(list.chunks.is_empty() && chunks.is_empty());
        list.validate().unwrap();
    }
}
