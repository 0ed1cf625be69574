//! A run of a chunk's pieces, each hashed and found to match its digest from the chunk
//! list: [`VerifiedPieces`], the piece-grain sibling of
//! [`VerifiedChunk`](crate::VerifiedChunk). A lazy read gets pieces from a peer or the
//! proxy, and whichever client received them checks them once; the piece store and the
//! read take this type, so they do not hash them again.

use crate::chunk::PIECE_SIZE;
use crate::digest::Digest;
use bytes::Bytes;

/// A run of pieces whose bytes do not fit their digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("piece {piece} of a chunk does not hash to {expected} (or is missing)")]
pub struct PieceMismatch {
    /// The piece's index in its chunk.
    pub piece: usize,
    /// The digest it should have had.
    pub expected: Digest,
}

/// Pieces `first..first + count` of one chunk, back to back ([`PIECE_SIZE`] each, the
/// last of a chunk maybe shorter), each checked against its digest.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VerifiedPieces {
    first: usize,
    count: usize,
    bytes: Bytes,
}

impl VerifiedPieces {
    /// Checks `body` as pieces `first..first + digests.len()` of a chunk: piece `k` is
    /// `body[k * PIECE_SIZE..]`, at most [`PIECE_SIZE`] bytes and not empty, and must hash
    /// to `digests[k]`; `body` may not run past the last piece.
    pub fn check(first: usize, digests: &[Digest], body: Bytes) -> Result<Self, PieceMismatch> {
        let Some(last) = digests.last() else {
            let fits = body.is_empty();
            let empty = VerifiedPieces {
                first,
                count: 0,
                bytes: body,
            };
            return fits.then_some(empty).ok_or(PieceMismatch {
                piece: first,
                expected: Digest::of(b""),
            });
        };
        if body.len() > digests.len() * PIECE_SIZE {
            return Err(PieceMismatch {
                piece: first + digests.len() - 1,
                expected: *last,
            });
        }
        for (k, expected) in digests.iter().enumerate() {
            let piece = body
                .get(k * PIECE_SIZE..((k + 1) * PIECE_SIZE).min(body.len()))
                .unwrap_or_default();
            if piece.is_empty() || Digest::of(piece) != *expected {
                return Err(PieceMismatch {
                    piece: first + k,
                    expected: *expected,
                });
            }
        }
        Ok(VerifiedPieces {
            first,
            count: digests.len(),
            bytes: body,
        })
    }

    /// Index of the first piece in its chunk.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Number of pieces.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of all pieces.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True if there are no pieces.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each piece with its index in the chunk.
    pub fn pieces(&self) -> impl Iterator<Item = (usize, Bytes)> + '_ {
        (0..self.count).map(|k| {
            let end = ((k + 1) * PIECE_SIZE).min(self.bytes.len());
            (self.first + k, self.bytes.slice(k * PIECE_SIZE..end))
        })
    }

    /// The pieces' bytes, giving up the proof.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 253) as u8).collect()
    }

    fn digests(body: &[u8]) -> Vec<Digest> {
        body.chunks(PIECE_SIZE).map(Digest::of).collect()
    }

    #[test]
    fn right_pieces_give_their_bytes_by_index() {
        let b = body(2 * PIECE_SIZE + 100);
        let v = VerifiedPieces::check(5, &digests(&b), b.clone().into()).unwrap();
        assert_eq!((v.first(), v.count(), v.len()), (5, 3, b.len()));
        let got: Vec<(usize, Bytes)> = v.pieces().collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (5, Bytes::copy_from_slice(&b[..PIECE_SIZE])));
        assert_eq!(got[2], (7, Bytes::copy_from_slice(&b[2 * PIECE_SIZE..])));
    }

    #[test]
    fn a_wrong_missing_or_extra_byte_cannot_make_the_type() {
        let b = body(2 * PIECE_SIZE + 100);
        let d = digests(&b);
        let mut flipped = b.clone();
        flipped[PIECE_SIZE + 1] ^= 1;
        let err = VerifiedPieces::check(3, &d, flipped.into()).unwrap_err();
        assert_eq!(
            err,
            PieceMismatch {
                piece: 4,
                expected: d[1]
            }
        );
        let short = Bytes::copy_from_slice(&b[..2 * PIECE_SIZE]);
        assert_eq!(VerifiedPieces::check(0, &d, short).unwrap_err().piece, 2);
        let mut long = b.clone();
        long.extend_from_slice(&[0; PIECE_SIZE]);
        assert!(VerifiedPieces::check(0, &d, long.into()).is_err());
        assert!(VerifiedPieces::check(0, &[], Bytes::from_static(b"x")).is_err());
    }
}
