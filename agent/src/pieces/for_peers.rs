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
//! in flight or partial says "not here", as before. The fetch is an ordinary read
//! ([`Pieces::read`]: peers first, then the proxy, every piece verified and stored), one
//! per chunk and piece range at a time. Reading chunk lists and have-maps here is from
//! memory: a peer's request never touches the disk unless the pieces are there.

use super::{lock, Pieces};
use imgd_core::{ChunkList, Digest};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// What [`Pieces`] knows to fetch pieces for peers.
#[derive(Default)]
pub(super) struct ForPeers {
    /// The chunk lists of the blobs that mounts here read, by blob.
    lists: Mutex<HashMap<Digest, Arc<ChunkList>>>,
    /// Where each of their chunks is: blob and index.
    chunks: Mutex<HashMap<Digest, (Digest, usize)>>,
    /// Fetches for peers running now: chunk, first piece, piece count.
    running: Mutex<HashSet<(Digest, u32, u32)>>,
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
            if let Err(e) = me.read(&list, i, pieces).await {
                tracing::warn!(chunk = %key.0, error = %e, "could not fetch pieces a peer asked for");
            }
            lock(&me.for_peers.running).remove(&key);
        });
        true
    }

    /// The chunk list and index of `chunk`, among the blobs mounts here read.
    fn locate(&self, chunk: &Digest) -> Option<(Arc<ChunkList>, usize)> {
        let (blob, i) = *lock(&self.for_peers.chunks).get(chunk)?;
        let list = lock(&self.for_peers.lists).get(&blob)?.clone();
        Some((list, i))
    }
}
