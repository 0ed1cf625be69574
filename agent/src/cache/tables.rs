//! The cache's metadata tables (one RocksDB column family each) and their records.

use imgd_core::store::Table;
use imgd_core::{ChunkList, Digest};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the cache knows of one stored chunk. A row exists only while the chunk's file is
/// committed in the content store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Length of the chunk in bytes.
    pub size: u32,
    /// Logical clock tick of the last store or read: larger is more recent. The clock is
    /// per cache and restarts at open after the largest tick stored, so the order
    /// survives restarts. Ticks of reads are persisted lazily (see
    /// [`ChunkCache::flush_access`](super::ChunkCache::flush_access)).
    pub last_access: u64,
    /// Unix seconds when the chunk was stored (or adopted at open).
    pub stored_at: u64,
}

/// Chunk rows, by chunk digest.
pub struct Chunks;
impl Table for Chunks {
    const NAME: &'static str = "chunks";
    type Key = Digest;
    type Value = ChunkMeta;
}

/// Chunk lists (layouts) of blobs, by blob digest. A row records how a blob is cut; it
/// says nothing about which of its chunks are cached (see
/// [`ChunkCache::blob_cached_bytes`](super::ChunkCache::blob_cached_bytes)).
pub struct Blobs;
impl Table for Blobs {
    const NAME: &'static str = "blobs";
    type Key = Digest;
    type Value = ChunkList;
}

/// An image known to the node, as pulled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the image manifest (the platform-specific one, not an index).
    pub manifest_digest: Digest,
    /// Media type of the manifest.
    pub media_type: String,
    /// The manifest bytes exactly as served, so the agent can serve them again offline.
    pub manifest: Vec<u8>,
    /// Digest of the config blob.
    pub config: Digest,
    /// Digests of the layer blobs, in manifest order.
    pub layers: Vec<Digest>,
    /// Sum of the sizes of the config and layer blobs.
    pub total_size: u64,
    /// Unix seconds when the record was written.
    pub pulled_at: u64,
}

impl ImageRecord {
    /// The config digest followed by the layer digests.
    pub fn blobs(&self) -> impl Iterator<Item = Digest> + '_ {
        std::iter::once(self.config).chain(self.layers.iter().copied())
    }
}

/// Images, by reference string (e.g. `registry.example/app:1.2` or `app@sha256:...`).
pub struct Images;
impl Table for Images {
    const NAME: &'static str = "images";
    type Key = String;
    type Value = ImageRecord;
}

/// Why and since when an image reference is pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// Free text given by whoever pinned it (e.g. "preloaded by config").
    pub reason: String,
    /// Unix seconds when it was pinned.
    pub pinned_at: u64,
}

/// Pins, by image reference. A pinned image's chunks are never evicted.
pub struct Pins;
impl Table for Pins {
    const NAME: &'static str = "pins";
    type Key = String;
    type Value = PinRecord;
}

/// The snapshotter's column family (its rows are `snapshotter::records::Snapshots`):
/// named here, where the database is opened, so the cache does not depend on the
/// snapshotter.
pub const SNAPSHOTS: &str = "snapshots";

/// Column families of the agent's metadata database: the cache's, and the snapshotter's
/// (which shares the database, see [`ChunkCache::meta`](super::ChunkCache::meta)).
pub(crate) const TABLES: [&str; 5] = [
    Chunks::NAME,
    Blobs::NAME,
    Images::NAME,
    Pins::NAME,
    SNAPSHOTS,
];

/// Current unix time in seconds (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
