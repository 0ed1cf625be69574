//! Serving a stored blob from its chunks, whole or by `Range`.

use crate::errors::ProxyError;
use crate::storage::Storage;
use crate::Stats;
use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use imgd_core::ChunkList;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Parses a `Range` header against a blob of `size` bytes. `Ok(None)` means "serve it
/// whole" (no header, or a multi-range request, which the spec lets us answer with 200).
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ProxyError> {
    let Some(h) = header else { return Ok(None) };
    let spec = h
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| ProxyError::BadRequest(format!("unsupported range unit in {h:?}")))?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| ProxyError::BadRequest(format!("malformed range {h:?}")))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| ProxyError::BadRequest(format!("malformed range {h:?}")))
    };
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => {
            let n = num(b)?.min(size);
            size - n..size
        }
        (false, true) => num(a)?..size,
        (false, false) => num(a)?..num(b)?.saturating_add(1).min(size),
        (true, true) => return Err(ProxyError::BadRequest(format!("malformed range {h:?}"))),
    };
    if range.start >= range.end || range.start >= size {
        return Err(ProxyError::Range(size));
    }
    Ok(Some(range))
}

/// A body streaming `range` of the blob from its chunk files, one chunk in memory at a time.
pub fn blob_body(
    storage: Arc<Storage>,
    stats: Arc<Stats>,
    list: ChunkList,
    range: Range<u64>,
) -> Body {
    let chunk_size = imgd_core::CHUNK_SIZE as u64;
    let indices = list.chunks_covering(range.clone());
    let stream = futures::stream::iter(indices).then(move |i| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=2-4"), 10).unwrap(), Some(2..5));
        assert_eq!(parse_range(Some("bytes=7-"), 10).unwrap(), Some(7..10));
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), Some(7..10));
        assert_eq!(parse_range(Some("bytes=5-100"), 10).unwrap(), Some(5..10));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10).unwrap(), None);
        assert!(matches!(
            parse_range(Some("bytes=10-"), 10),
            Err(ProxyError::Range(10))
        ));
        assert!(parse_range(Some("items=1-2"), 10).is_err());
        assert!(parse_range(Some("bytes=x-2"), 10).is_err());
    }
}
