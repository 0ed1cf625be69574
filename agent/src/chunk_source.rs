//! What this agent offers peers over the data plane: verified chunks from its cache and
//! have-maps of the blobs it holds or is fetching.

use crate::dataplane::{ChunkSource, HaveMap};
use crate::fetch::Fetcher;
use bytes::Bytes;
use imgd_core::Digest;
use std::sync::Arc;

/// The cache (through the fetcher, which also knows chunks in flight) as a chunk source.
pub struct CacheSource(pub Arc<Fetcher>);

impl ChunkSource for CacheSource {
    fn chunk(&self, digest: &Digest) -> Option<Bytes> {
        let bytes = self.0.cache.get_chunk(digest).ok().flatten();
        crate::metrics::served("peer", bytes.as_ref().map_or(0, |b| b.len() as u64));
        bytes
    }

    fn have(&self, blob: &Digest) -> Option<HaveMap> {
        self.0.have_map(blob)
    }
}
