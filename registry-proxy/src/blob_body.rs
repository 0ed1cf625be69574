//! Serving a stored blob from its chunks, whole or by `Range`.

use crate::errors::ProxyError;
use crate::space::Lease;
use crate::storage::Storage;
use crate::Stats;
use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use imgd_core::range::{parse_byte_range, RangeError};
use imgd_core::ChunkList;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Parses a `Range` header against a blob of `size` bytes (see [`parse_byte_range`]).
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ProxyError> {
    parse_byte_range(header, size).map_err(|e| match e {
        RangeError::Unsatisfiable(size) => ProxyError::Range(size),
        RangeError::Malformed(h) => ProxyError::BadRequest(format!("malformed range {h:?}")),
    })
}

/// A body streaming `range` of the blob from its chunk files, one chunk in memory at a
/// time. The `lease` keeps the blob from eviction until the body is done or dropped.
pub fn blob_body(
    storage: Arc<Storage>,
    stats: Arc<Stats>,
    list: ChunkList,
    range: Range<u64>,
    lease: Lease,
) -> Body {
    let chunk_size = imgd_core::CHUNK_SIZE as u64;
    let indices = list.chunks_covering(range.clone());
    let stream = futures::stream::iter(indices).then(move |i| {
        let _held = &lease;
        let storage = storage.clone();
        let stats = stats.clone();
        let chunk = list.chunks[i];
        let start = i as u64 * chunk_size;
        let range = range.clone();
        async move {
            let bytes: Bytes =
                tokio::task::spawn_blocking(move || storage.chunks.read(&chunk.digest))
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)?;
            let from = range.start.saturating_sub(start) as usize;
            let to = (range.end - start).min(bytes.len() as u64) as usize;
            let piece = bytes.slice(from.min(to)..to);
            stats
                .blob_bytes_served
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
            Ok::<Bytes, std::io::Error>(piece)
        }
    });
    Body::from_stream(stream)
}
