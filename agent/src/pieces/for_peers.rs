//! Pieces fetched for a peer: the owner of a chunk among the hosts reading its blob
//! fetches the pieces a peer asks for when it has neither them nor a fetch of the chunk
//! running, and answers `Pending` meanwhile, so that hosts reading one chunk at the same
//! moment take each piece from the proxy once.
//!
//! Without this, a peer that asked the owner for pieces the owner had not read yet (or
//! had read other pieces of) was told "not here" and asked the proxy itself: at 8 hosts
//! starting one image at once, 2.5x one host's pieces came from the proxy.
//!
//! Only the owner (by this host's own recent view of the hosts reading the blob,
//! [`crate::fetch::Fetcher::owns_for_reads`]) fetches; a host that merely has the chunk
//! in flight or partial says "not here", as before. The fetch goes to the proxy at once
//! (the asker found this host to be the owner: asking peers again could wait on the
//! asker), every piece verified and stored, one per chunk and piece range at a time.
//!
//! Two fetches here of overlapping pieces (a read's and one for a peer) do not both ask
//! the proxy for the overlap: the later waits for the earlier, boundedly, and takes what
//! it stored.
//!
//! `Pending` is a promise about the pieces asked: it is answered while a fetch here of
//! pieces covering them runs ([`Pieces::fetching_pieces`]), not merely while some pieces
//! of the chunk are coming, so that a peer does not wait on pieces nobody fetches. Reading chunk lists and have-maps here is from
//! memory: a peer's request never touches the disk unless the pieces are there.

use super::{lock, Pieces};
use imgd_core::{ChunkList, Digest};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Longest a fetch of pieces waits for a fetch here of overlapping pieces to end before
/// it asks the proxy for them anyway.
const OVERLAP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What [`Pieces`] knows to fetch pieces for peers.
#[derive(Default)]
pub(super) struct ForPeers {
    /// The chunk lists of the blobs that mounts here read, by blob.
    lists: Mutex<HashMap<Digest, Arc<ChunkList>>>,
    /// Where each of their chunks is: blob and index.
    chunks: Mutex<HashMap<Digest, (Digest, usize)>>,
    /// Fetches for peers running now: chunk, first piece, piece count.
    running: Mutex<HashSet<(Digest, u32, u32)>>,
    /// Piece ranges being fetched from the proxy now, by chunk.
    flying: Mutex<HashMap<Digest, Vec<Range<usize>>>>,
}

/// A range of pieces shown as being fetched until dropped.
pub(super) struct Flying<'a> {
    pieces: &'a Pieces,
    chunk: Digest,
    range: Range<usize>,
}

impl Drop for Flying<'_> {
    fn drop(&mut self) {
        let mut flying = lock(&self.pieces.for_peers.flying);
        if let Some(ranges) = flying.get_mut(&self.chunk) {
            if let Some(k) = ranges.iter().position(|r| *r == self.range) {
                ranges.swap_remove(k);
            }
            if ranges.is_empty() {
                flying.remove(&self.chunk);
            }
        }
    }
}

impl Pieces {
    /// A mount here reads the blob of `list`: peers may ask this host, as a chunk's
    /// owner, to fetch its pieces.
    pub fn reading(&self, list: &ChunkList) {
        let mut lists = lock(&self.for_peers.lists);
        if lists.contains_key(&list.blob) {
            return;
        }
        lists.insert(list.blob, Arc::new(list.clone()));
        let mut chunks = lock(&self.for_peers.chunks);
        for (i, c) in list.chunks.iter().enumerate() {
            chunks.entry(c.digest).or_insert((list.blob, i));
        }
    }

    /// Pieces `range` of `chunk` are fetched from the proxy until the guard is dropped.
    pub(super) fn pieces_in_flight(&self, chunk: Digest, range: Range<usize>) -> Flying<'_> {
        lock(&self.for_peers.flying)
            .entry(chunk)
            .or_default()
            .push(range.clone());
        Flying {
            pieces: self,
            chunk,
            range,
        }
    }

    /// Waits, at most [`OVERLAP_WAIT`], while a fetch here of pieces of `chunk` that
    /// overlap `range` runs (a read's and a fetch for a peer, whose ranges differ:
    /// each read covers its own checkpoint to its own file's end); whether it waited.
    pub(super) async fn wait_for_overlapping(&self, chunk: &Digest, range: &Range<usize>) -> bool {
        let overlaps = || {
            lock(&self.for_peers.flying)
                .get(chunk)
                .is_some_and(|ranges| {
                    ranges
                        .iter()
                        .any(|r| r.start < range.end && range.start < r.end)
                })
        };
        if !overlaps() {
            return false;
        }
        let until = std::time::Instant::now() + OVERLAP_WAIT;
        while overlaps() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Whether a fetch here of pieces of `chunk` covering `first..first + count` runs.
    pub fn fetching_pieces(&self, chunk: &Digest, first: u32, count: u32) -> bool {
        let (a, b) = (first as usize, first as usize + count as usize);
        let covered = lock(&self.for_peers.flying)
            .get(chunk)
            .is_some_and(|ranges| ranges.iter().any(|r| r.start <= a && b <= r.end));
        covered || lock(&self.for_peers.running).contains(&(*chunk, first, count))
    }

    /// Whether pieces (not the whole chunk) of `chunk` are being fetched here.
    pub fn fetching_some_pieces(&self, chunk: &Digest) -> bool {
        lock(&self.for_peers.flying).contains_key(chunk)
    }

    /// A peer asked for pieces `first..first + count` of `chunk`, which are not all
    /// here and which no read here is fetching. Starts fetching them if this host owns
    /// the chunk among the hosts reading its blob; returns whether a fetch for the peer
    /// runs now (the peer is then told `Pending`).
    pub fn fetch_for_peer(self: &Arc<Self>, chunk: &Digest, first: u32, count: u32) -> bool {
        let key = (*chunk, first, count);
        if lock(&self.for_peers.running).contains(&key) {
            return true;
        }
        let Some((list, i)) = self.locate(chunk) else {
            return false;
        };
        if !self.fetcher.owns_for_reads(&list.blob, chunk) {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if !lock(&self.for_peers.running).insert(key) {
            return true;
        }
        let me = self.clone();
        let pieces = first as usize..(first as usize).saturating_add(count as usize);
        runtime.spawn(async move {
            if let Err(e) = me.fetch_from_proxy(&list, i, pieces).await {
                tracing::warn!(chunk = %key.0, error = %e, "could not fetch pieces a peer asked for");
            }
            lock(&me.for_peers.running).remove(&key);
        });
        true
    }

    /// Fetches pieces `pieces` of chunk `i` of `list` that are not stored from the proxy,
    /// verified, and stores them.
    async fn fetch_from_proxy(
        &self,
        list: &ChunkList,
        i: usize,
        pieces: Range<usize>,
    ) -> Result<(), super::PieceError> {
        let Some(chunk) = list.chunks.get(i).copied() else {
            return Ok(());
        };
        let all = list.pieces_of(i).unwrap_or_default();
        if pieces.is_empty() || pieces.end > all.len() || self.cache.has_chunk(&chunk.digest) {
            return Ok(());
        }
        let bytes = super::piece_range(chunk.size, pieces.start).start
            ..super::piece_range(chunk.size, pieces.end - 1).end;
        self.read_locked(list, i, pieces, &bytes, super::Sources::Proxy)
            .await?;
        Ok(())
    }

    /// The chunk list and index of `chunk`, among the blobs mounts here read.
    fn locate(&self, chunk: &Digest) -> Option<(Arc<ChunkList>, usize)> {
        let (blob, i) = *lock(&self.for_peers.chunks).get(chunk)?;
        let list = lock(&self.for_peers.lists).get(&blob)?.clone();
        Some((list, i))
    }
}
