//! The derived seekable copy of a plain zstd layer.
//!
//! A plain zstd stream (one frame, or a few large ones, as the `zstd` CLI, containers/image
//! and BuildKit write them) cannot be entered in the middle: a decoder's state is its
//! whole window, megabytes, so zran-style checkpoints do not work. The proxy therefore
//! writes, while it indexes the layer, a *copy* of the layer's tar stream as independent
//! zstd frames of [`COPY_FRAME`] uncompressed bytes each ([`CopyWriter`]):
//! - each frame is an ordinary zstd frame (with its content size), so the concatenated
//!   copy is itself a valid zstd stream of the same tar;
//! - each frame start is a [`Checkpoint`] with an empty window (`bits` 0): its offset in
//!   the copy and in the tar stream;
//! - the copy is cut into 4 MiB chunks addressed by their sha256, like any blob
//!   ([`CopyChunk`]), and is identified by its own sha256 ([`SeekableCopy`]).
//!
//! The layer's index binds the copy (digest, size and chunk digests), so a reader that
//! checked the index's digest verifies every chunk of the copy it fetches. Full pulls
//! still get the original blob; only lazy reads use the copy.

use crate::chunk::{ChunkList, ChunkRef, CHUNK_SIZE};
use crate::digest::{Digest, Sha256};
use crate::index::format::{Checkpoint, Compression, LayerIndex};
use crate::index::zstd::ZstdError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{self, CCtx, CParameter};

/// Uncompressed bytes per frame of the copy: 1 MiB.
pub const COPY_FRAME: usize = 1 << 20;
/// zstd level of the copy's frames (libzstd's default).
pub const COPY_LEVEL: i32 = 3;

/// The seekable copy of a layer, as its index binds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeekableCopy {
    /// sha256 of the whole copy.
    pub digest: Digest,
    /// Size of the copy in bytes.
    pub size: u64,
    /// Digests of its 4 MiB chunks, in order (the last may be shorter).
    pub chunks: Vec<Digest>,
}

impl SeekableCopy {
    /// The copy's chunk list (what a reader fetches chunks of).
    pub fn chunk_list(&self) -> ChunkList {
        let chunk = CHUNK_SIZE as u64;
        ChunkList {
            blob: self.digest,
            size: self.size,
            chunks: self
                .chunks
                .iter()
                .enumerate()
                .map(|(i, d)| ChunkRef {
                    digest: *d,
                    size: (self.size.saturating_sub(i as u64 * chunk)).min(chunk) as u32,
                })
                .collect(),
            // No piece digests: reads of the copy fetch whole chunks.
            pieces: Vec::new(),
        }
    }
}

impl LayerIndex {
    /// The blob that reads of this layer fetch byte ranges of, and its size: the
    /// seekable copy if the index binds one, else the layer blob itself.
    pub fn readable_blob(&self) -> (Digest, u64) {
        match &self.copy {
            Some(c) => (c.digest, c.size),
            None => (self.layer, self.compressed_size),
        }
    }

    /// Checks the copy binding: only zstd layers have one, its chunks add up to its
    /// size, and the checkpoints lie inside it.
    pub(crate) fn validate_copy(&self) -> Result<(), String> {
        let Some(copy) = &self.copy else {
            return Ok(());
        };
        if self.compression != Compression::Zstd {
            return Err("seekable copy bound to a layer that is not zstd".into());
        }
        if copy.chunks.len() as u64 != copy.size.div_ceil(CHUNK_SIZE as u64) {
            return Err("seekable copy's chunk count does not match its size".into());
        }
        if self.uncompressed_size > 0 && copy.size == 0 {
            return Err("empty seekable copy of a non-empty layer".into());
        }
        Ok(())
    }
}

/// One 4 MiB chunk of the copy (the last may be shorter), with its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyChunk {
    pub digest: Digest,
    pub bytes: Bytes,
}

/// What [`CopyWriter::finish`] returns.
pub struct FinishedCopy {
    pub copy: SeekableCopy,
    /// One per frame, ordered; the first at offset 0 (none for an empty stream).
    pub checkpoints: Vec<Checkpoint>,
    /// Chunks not taken yet, the last chunk included.
    pub chunks: Vec<CopyChunk>,
}

/// Writes the seekable copy of a tar stream pushed in slices of any size.
pub struct CopyWriter {
    cctx: CCtx<'static>,
    frame: Vec<u8>,
    chunk: Vec<u8>,
    ready: Vec<CopyChunk>,
    whole: Sha256,
    size: u64,
    uncompressed: u64,
    digests: Vec<Digest>,
    checkpoints: Vec<Checkpoint>,
}

impl CopyWriter {
    /// A writer at the start of the copy.
    pub fn new() -> Result<Self, ZstdError> {
        let mut cctx = CCtx::try_create()
            .ok_or_else(|| ZstdError::Encode("cannot allocate a zstd encoder".into()))?;
        let set = |c: &mut CCtx<'static>, p: CParameter| {
            c.set_parameter(p)
                .map(|_| ())
                .map_err(|e| ZstdError::Encode(zstd_safe::get_error_name(e).into()))
        };
        set(&mut cctx, CParameter::CompressionLevel(COPY_LEVEL))?;
        set(&mut cctx, CParameter::ContentSizeFlag(true))?;
        Ok(CopyWriter {
            cctx,
            frame: Vec::with_capacity(COPY_FRAME),
            chunk: Vec::with_capacity(CHUNK_SIZE),
            ready: Vec::new(),
            whole: Sha256::new(),
            size: 0,
            uncompressed: 0,
            digests: Vec::new(),
            checkpoints: Vec::new(),
        })
    }

    /// Appends tar-stream bytes.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), ZstdError> {
        while !data.is_empty() {
            let take = (COPY_FRAME - self.frame.len()).min(data.len());
            self.frame.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.frame.len() == COPY_FRAME {
                self.flush_frame()?;
            }
        }
        Ok(())
    }

    fn flush_frame(&mut self) -> Result<(), ZstdError> {
        if self.frame.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(self.frame.len()));
        self.cctx
            .compress2(&mut out, &self.frame)
            .map_err(|e| ZstdError::Encode(zstd_safe::get_error_name(e).into()))?;
        self.checkpoints.push(Checkpoint {
            compressed_offset: self.size,
            bits: 0,
            uncompressed_offset: self.uncompressed,
            window: None,
        });
        self.uncompressed += self.frame.len() as u64;
        self.frame.clear();
        self.whole.update(&out);
        self.size += out.len() as u64;
        let mut rest = &out[..];
        while !rest.is_empty() {
            let take = (CHUNK_SIZE - self.chunk.len()).min(rest.len());
            self.chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.chunk.len() == CHUNK_SIZE {
                self.seal_chunk();
            }
        }
        Ok(())
    }

    fn seal_chunk(&mut self) {
        let bytes = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_SIZE));
        let digest = Digest::of(&bytes);
        self.digests.push(digest);
        self.ready.push(CopyChunk {
            digest,
            bytes: bytes.into(),
        });
    }

    /// The frame-start checkpoints so far.
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// Takes the complete chunks written so far (the caller stores them).
    pub fn take_chunks(&mut self) -> Vec<CopyChunk> {
        std::mem::take(&mut self.ready)
    }

    /// Writes the last frame and chunk.
    pub fn finish(mut self) -> Result<FinishedCopy, ZstdError> {
        self.flush_frame()?;
        if !self.chunk.is_empty() {
            self.seal_chunk();
        }
        Ok(FinishedCopy {
            copy: SeekableCopy {
                digest: self.whole.finish(),
                size: self.size,
                chunks: self.digests,
            },
            checkpoints: self.checkpoints,
            chunks: self.ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_is_a_zstd_stream_of_independent_frames() {
        let data: Vec<u8> = (0..(9 << 20) + 123u32)
            .map(|i| ((i / 3) * 7 % 251) as u8)
            .collect();
        let mut w = CopyWriter::new().unwrap();
        let mut got: Vec<CopyChunk> = Vec::new();
        for piece in data.chunks(777_777) {
            w.write(piece).unwrap();
            got.extend(w.take_chunks());
        }
        let done = w.finish().unwrap();
        got.extend(done.chunks);
        let copy: Vec<u8> = got.iter().flat_map(|c| c.bytes.iter().copied()).collect();
        assert_eq!(copy.len() as u64, done.copy.size);
        assert_eq!(Digest::of(&copy), done.copy.digest);
        let list = done.copy.chunk_list();
        list.validate().unwrap();
        for (c, r) in got.iter().zip(&list.chunks) {
            assert_eq!(
                (Digest::of(&c.bytes), c.bytes.len() as u32),
                (r.digest, r.size)
            );
        }
        assert_eq!(zstd::bulk::decompress(&copy, 20 << 20).unwrap(), data);
        assert_eq!(done.checkpoints.len(), 10);
        for cp in &done.checkpoints {
            let at = cp.compressed_offset as usize;
            let out = crate::index::zstd::decode_from_frame(&copy[at..], 0, 5000, 20).unwrap();
            let u = cp.uncompressed_offset as usize;
            let end = (u + 5000).min(data.len());
            assert!(out == data[u..end], "frame at {at} restarts alone");
        }
    }
}
