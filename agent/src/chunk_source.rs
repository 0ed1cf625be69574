//! What this agent offers peers over the data plane: verified chunks from its cache, the
//! verified pieces of partial chunks, what mounts need of layers (index main parts,
//! checkpoint windows, chunk lists), and have-maps of the blobs it holds or is fetching (blob fetches and reads
//! alike).

use crate::dataplane::{ChunkSource, HaveMap, LayerPart, PiecesAnswer};
use crate::fetch::Fetcher;
use crate::layer_parts::PartShare;
use crate::pieces::Pieces;
use crate::window_share::WindowShare;
use bytes::Bytes;
use imgd_core::index::WindowRef;
use imgd_core::peer_wire::PartAsk;
use imgd_core::{Digest, VerifiedChunk};
use std::sync::Arc;

/// The cache and the piece store (through the fetcher, which also knows chunks in
/// flight) as a chunk source.
pub struct CacheSource {
    pub fetcher: Arc<Fetcher>,
    pub pieces: Arc<Pieces>,
    pub windows: Arc<WindowShare>,
    pub parts: Arc<PartShare>,
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
        self.windows.serve_window(layer, window)
    }

    fn layer_part(&self, which: LayerPart, ask: &PartAsk) -> PiecesAnswer {
        self.parts.serve(which, ask)
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
