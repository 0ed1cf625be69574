//! The reads of mount processes that the agent serves: chunks and pieces the process does
//! not find in the cache, fetched (cache, peers, proxy) within the mount's read bound.

use super::Mounts;
use crate::error::AgentError;
use bytes::Bytes;

impl Mounts {
    /// Chunk `chunk` of layer `layer` of mount `id`, through the fetcher within the read
    /// bound, and whether it had to be fetched. `None`: no such mount or chunk.
    pub async fn chunk(
        &self,
        id: &str,
        layer: usize,
        chunk: usize,
    ) -> Option<Result<(Bytes, bool), AgentError>> {
        let record = self.live_record(id)?;
        let list = record.lists.get(layer)?;
        list.chunks.get(chunk)?;
        let bound = self.ctx.config.read_timeout();
        Some(
            match tokio::time::timeout(bound, self.ctx.fetcher.chunk(list, chunk)).await {
                Ok(r) => r
                    .map(|(chunk, fetched)| (chunk.into_bytes(), fetched))
                    .map_err(AgentError::from),
                Err(_) => Err(AgentError::Mount(format!(
                    "no source delivered chunk {chunk} of {} within {bound:?}",
                    list.blob
                ))),
            },
        )
    }

    /// Pieces `wanted` of chunk `chunk` of layer `layer` of mount `id`, concatenated, and
    /// the bytes fetched for them (`None`: no such mount, chunk or pieces). A piece that
    /// fails its digest makes the read fall back to the whole chunk (cache, peers,
    /// proxy), verified as a whole.
    pub async fn pieces(
        &self,
        id: &str,
        layer: usize,
        chunk: usize,
        wanted: std::ops::Range<usize>,
    ) -> Option<Result<(Bytes, u64), AgentError>> {
        let record = self.live_record(id)?;
        let list = record.lists.get(layer)?;
        let c = *list.chunks.get(chunk)?;
        let n = list.pieces_of(chunk)?.len();
        if wanted.is_empty() || wanted.end > n {
            return None;
        }
        let bound = self.ctx.config.read_timeout();
        let read = async {
            match self.ctx.pieces.read(list, chunk, wanted.clone()).await {
                Ok(r) => Ok(r),
                Err(e) => {
                    tracing::warn!(chunk = %c.digest, error = %e, "pieces failed; fetching the whole chunk");
                    let (whole, fetched) = self.ctx.fetcher.chunk(list, chunk).await?;
                    let whole = whole.into_bytes();
                    let start = wanted.start * imgd_core::PIECE_SIZE;
                    let end = (wanted.end * imgd_core::PIECE_SIZE).min(whole.len());
                    let n = if fetched { whole.len() as u64 } else { 0 };
                    Ok((whole.slice(start.min(end)..end), n))
                }
            }
        };
        Some(match tokio::time::timeout(bound, read).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Mount(format!(
                "no source delivered pieces {wanted:?} of chunk {chunk} of {} within {bound:?}",
                list.blob
            ))),
        })
    }
}
