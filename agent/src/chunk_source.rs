//! What this agent offers peers over the data plane: verified chunks from its cache, the
//! verified pieces of partial chunks, the main parts and checkpoint windows of layer
//! indexes, and have-maps of the blobs it holds or is fetching (blob fetches and reads
//! alike).

use crate::dataplane::{ChunkSource, HaveMap, PiecesAnswer};
use crate::fetch::Fetcher;
use crate::index_share::IndexShare;
use crate::pieces::Pieces;
use crate::proxy_client::Repo;
use bytes::Bytes;
use imgd_core::index::WindowRef;
use imgd_core::{Digest, VerifiedChunk};
use std::sync::Arc;

/// The cache and the piece store (through the fetcher, which also knows chunks in
/// flight) as a chunk source.
pub struct CacheSource {
    pub fetcher: Arc<Fetcher>,
    pub pieces: Arc<Pieces>,
    pub shared_indexes: Arc<IndexShare>,
}

impl ChunkSource for CacheSource {
    fn chunk(&self, digest: &Digest) -> Option<Bytes> {
        // Verified on the read from disk; the receiving peer verifies again (its hop).
        let bytes = self.fetcher.cache.get_chunk(digest).ok().flatten();
        let bytes = bytes.map(VerifiedChunk::into_bytes);
        crate::metrics::served("peer", bytes.as_ref().map_or(0, |b| b.len() as u64));
        bytes
    }

    fn have(&self, blob: &Digest) -> Option<HaveMap> {
        self.fetcher.have_map(blob)
    }

    fn pieces(&self, chunk: &Digest, first: u32, count: u32) -> PiecesAnswer {
        match self.pieces.stored_pieces(chunk, first, count) {
            Some(b) => {
                crate::metrics::served("peer", b.len() as u64);
                PiecesAnswer::Here(b)
            }
            // Pending only for pieces coming: a fetch covering them (or of the whole chunk).
            None if self.pieces.fetching_pieces(chunk, first, count) => PiecesAnswer::Pending,
            None if self.fetcher.reads.states.fetching(chunk)
                && !self.pieces.fetching_some_pieces(chunk) =>
            {
                PiecesAnswer::Pending
            }
            None if self.pieces.fetch_for_peer(chunk, first, count) => PiecesAnswer::Pending,
            None => PiecesAnswer::NotHere,
        }
    }

    fn window(&self, layer: &Digest, window: &WindowRef) -> PiecesAnswer {
        self.shared_indexes.serve_window(layer, window)
    }

    fn index_main(
        &self,
        layer: &Digest,
        sha256: &Digest,
        _len: u32,
        repo: (&str, Option<&str>),
    ) -> PiecesAnswer {
        let repo = Repo {
            name: repo.0.to_string(),
            ns: repo.1.map(str::to_string),
        };
        self.shared_indexes.serve_main(layer, sha256, repo)
    }

    fn fetching(&self, chunk: &Digest) -> bool {
        self.fetcher.reads.states.fetching(chunk)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.fetcher.changes.subscribe())
    }

    fn subscribed(&self, blob: &Digest, peer_id: &[u8]) {
        if let Ok(id) = std::str::from_utf8(peer_id) {
            self.fetcher.note_subscriber(blob, id);
        }
    }
}
