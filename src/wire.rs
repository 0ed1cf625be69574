//! JSON types of the proxy's chunk API (`/imgd/v1/...`), shared by the proxy and agents.
//!
//! | route | answer |
//! |---|---|
//! | `GET /imgd/v1/blobs/{digest}?repo=NAME` | [`BlobInfo`]: the chunk list (ingesting the blob from upstream first if needed) |
//! | `GET /imgd/v1/chunks/{digest}` | the chunk's bytes (`application/octet-stream`) |
//! | `GET /imgd/v1/indexes/{layer digest}?repo=NAME` | the encoded [`crate::index::LayerIndex`]'s main part; header `Imgd-Index-Digest` |
//! | `GET /imgd/v1/layers/{layer digest}/parts?repo=NAME` | [`LayerParts`]: the sha256 and length of the index's main part and of the chunk list, so that they can be taken from a peer |
//! | `GET /imgd/v1/stats` | [`ProxyStats`] |
//! | `GET /imgd/v1/traces/{manifest digest}` | the image's [`StartupTrace`] (404 if none) |
//! | `PUT /imgd/v1/traces/{manifest digest}` | stores a [`StartupTrace`] (first one wins) |

use crate::chunk::ChunkList;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};

/// The manifest media types imgd accepts: OCI manifest and index, Docker schema2 manifest
/// and manifest list.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Header carrying the digest of an encoded index.
pub const INDEX_DIGEST_HEADER: &str = "Imgd-Index-Digest";

/// Bytes named by their sha256, and their length: a part of what a mount needs of a layer,
/// which the proxy names so that it can be taken from a peer and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    pub sha256: Digest,
    pub len: u64,
}

/// What a mount needs of a layer before it serves, named (`GET
/// /imgd/v1/layers/{layer}/parts?repo=`): the main part of its index (named by its
/// trailer, see [`crate::index::LayerIndex::main_part_digest`]) and its chunk list (named
/// by the sha256 of [`ChunkList::canonical_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerParts {
    pub index_main: PartRef,
    pub chunk_list: PartRef,
}

/// What the proxy knows of one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub chunks: ChunkList,
    /// The layer index, when the blob is a layer the proxy could index.
    pub index: IndexState,
}

/// The chunks of a blob that have arrived at the proxy
/// (`GET /imgd/v1/blobs/{digest}/arrived?repo=&have=N`): while the blob is ingested, each
/// chunk is listed once it is whole, hashed and synced, and can be fetched by its digest
/// then (the agent verifies it as any chunk). `done`: the blob is stored and `chunks` is
/// its whole list (fetch its chunk list for the pieces). A blob that fails its digest at
/// the end is not stored: chunks served before were still right by their own digests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrivedChunks {
    /// The size upstream announced, if it did.
    pub size: Option<u64>,
    /// The chunks arrived so far, in blob order.
    pub chunks: Vec<crate::chunk::ChunkRef>,
    pub done: bool,
}

/// Whether a blob has a seekable index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexState {
    /// Indexed: the encoded index has this digest and size.
    Indexed { digest: Digest, size: u64 },
    /// Not indexed, with the reason (e.g. not a tar layer, or a hostile tar).
    Unavailable { reason: String },
}

/// Counters of a proxy since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    /// Blob bytes received from upstream registries.
    pub upstream_blob_bytes: u64,
    /// Blobs fetched from upstream (each verified and stored).
    pub upstream_blob_fetches: u64,
    /// Bytes of chunks served through the chunk API.
    pub chunk_bytes_served: u64,
    /// Chunks served through the chunk API.
    pub chunks_served: u64,
    /// Bytes of blobs served through the registry API (and to peer replicas).
    pub blob_bytes_served: u64,
    /// Blob bytes received from peer replicas instead of upstream.
    #[serde(default)]
    pub peer_blob_bytes: u64,
    /// Blobs ingested from peer replicas (each verified and stored).
    #[serde(default)]
    pub peer_blob_fetches: u64,
    /// Bytes of layer indexes' main parts served by the index API.
    #[serde(default)]
    pub index_bytes_served: u64,
    /// Bytes of layer indexes' windows parts (checkpoint windows) served by the index API.
    #[serde(default)]
    pub window_bytes_served: u64,
}

/// Most paths a startup trace may hold.
pub const MAX_TRACE_PATHS: usize = 20_000;

/// Most byte ranges a startup trace keeps per file; a file read in more places is kept
/// as fewer, wider ranges (the closest ones merged).
pub const MAX_TRACE_RANGES: usize = 64;

/// The files an image's first container start read, in order, and which bytes of each:
/// later mounts of the image fetch just those first, in the background.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupTrace {
    /// Paths as in the image's rootfs, relative, raw bytes.
    pub paths: Vec<Vec<u8>>,
    /// For each path, the byte ranges of the file the start read, `[start, end)`, sorted
    /// and disjoint (empty: opened, never read). A trace without them (`reads` empty)
    /// stands for the whole of every file.
    #[serde(default)]
    pub reads: Vec<Vec<(u64, u64)>>,
}

impl StartupTrace {
    /// The ranges read of path `k`: `None` for the whole file (no ranges recorded).
    pub fn ranges(&self, k: usize) -> Option<&[(u64, u64)]> {
        if self.reads.len() != self.paths.len() {
            return None;
        }
        self.reads.get(k).map(Vec::as_slice)
    }
}
