//! imgd-proxy: an OCI Distribution pull-through proxy that stores every blob as 4 MiB
//! content-addressed chunks and builds a seekable index of every layer as it streams.

pub mod access;
pub mod arrived_api;
pub mod blob_body;
pub mod chunk_api;
pub mod config;
pub mod errors;
pub mod flight;
pub mod index_api;
pub mod ingest;
pub mod ledger;
pub mod metrics;
pub mod peers;
pub mod pins;
pub mod refusals;
pub mod registry_api;
pub mod routing;
pub mod server;
pub mod space;
pub mod spool;
pub mod storage;
pub mod upstream;
pub mod verify;
pub mod window_spool;

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of the proxy, reported by `GET /imgd/v1/stats`.
#[derive(Default)]
pub struct Stats {
    pub upstream_blob_bytes: AtomicU64,
    pub upstream_blob_fetches: AtomicU64,
    pub chunk_bytes_served: AtomicU64,
    pub chunks_served: AtomicU64,
    pub blob_bytes_served: AtomicU64,
    /// Blob bytes and blobs ingested from peer replicas instead of upstream.
    pub peer_blob_bytes: AtomicU64,
    pub peer_blob_fetches: AtomicU64,
    /// Bytes of index main parts and of checkpoint windows served by the index API.
    pub index_bytes_served: AtomicU64,
    pub window_bytes_served: AtomicU64,
}

impl Stats {
    /// The counters' current values.
    pub fn snapshot(&self) -> imgd_core::wire::ProxyStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        imgd_core::wire::ProxyStats {
            upstream_blob_bytes: get(&self.upstream_blob_bytes),
            upstream_blob_fetches: get(&self.upstream_blob_fetches),
            chunk_bytes_served: get(&self.chunk_bytes_served),
            chunks_served: get(&self.chunks_served),
            blob_bytes_served: get(&self.blob_bytes_served),
            peer_blob_bytes: get(&self.peer_blob_bytes),
            peer_blob_fetches: get(&self.peer_blob_fetches),
            index_bytes_served: get(&self.index_bytes_served),
            window_bytes_served: get(&self.window_bytes_served),
        }
    }
}
