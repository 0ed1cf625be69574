//! Unit tests of the chunk cache, with shared helpers.

mod chunks;
mod eviction;
mod images;
mod repair;

use super::*;
use bytes::Bytes;
use imgd_core::{ChunkList, ChunkRef};
use tempfile::TempDir;

impl ChunkCache {
    /// Verifies `bytes` as chunk `digest` (as a receiving client does) and stores them.
    pub(super) fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<(), CacheError> {
        let chunk = VerifiedChunk::check(*digest, Bytes::copy_from_slice(bytes))
            .expect("test bytes hash to their digest");
        self.put_chunk(&chunk)
    }

    /// [`ChunkCache::get_chunk`]'s bytes.
    pub(super) fn get_bytes(&self, digest: &Digest) -> Result<Option<Bytes>, CacheError> {
        Ok(self.get_chunk(digest)?.map(VerifiedChunk::into_bytes))
    }
}

/// A fresh cache directory and a cache in it.
pub(super) fn cache(quota: u64) -> (TempDir, ChunkCache) {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), quota).unwrap();
    (dir, c)
}

/// `n` bytes of content unique to `seed`, and their digest.
pub(super) fn chunk(seed: u32, n: usize) -> (Digest, Vec<u8>) {
    let mut bytes: Vec<u8> = seed.to_le_bytes().to_vec();
    bytes.resize(n.max(4), (seed % 251) as u8);
    (Digest::of(&bytes), bytes)
}

/// A one-chunk blob made of `bytes` (a valid layout for any size up to CHUNK_SIZE).
pub(super) fn blob_of(digest: Digest, bytes: &[u8]) -> ChunkList {
    ChunkList {
        blob: Digest::of(&[b"blob".as_slice(), bytes].concat()),
        size: bytes.len() as u64,
        chunks: vec![ChunkRef {
            digest,
            size: bytes.len() as u32,
        }],
        pieces: vec![],
    }
}

/// An image record with the given layers.
pub(super) fn image(layers: &[Digest]) -> ImageRecord {
    ImageRecord {
        manifest_digest: Digest::of(b"manifest"),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        manifest: b"{}".to_vec(),
        config: Digest::of(b"config"),
        layers: layers.to_vec(),
        total_size: 0,
        pulled_at: 0,
    }
}

#[test]
fn cache_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChunkCache>();
    assert_send_sync::<CacheError>();
}
