//! The chunks of a blob the proxy is ingesting, as they arrive
//! ([`imgd_core::wire::ArrivedChunks`]), and their bytes from the replica ingesting it.

use super::{ProxyClient, ProxyClientError, Repo, MAX_JSON_BYTES};
use imgd_core::wire::ArrivedChunks;
use imgd_core::Digest;

/// Most chunks an arrived list may hold (a 64 GiB blob).
const MAX_ARRIVED: usize = 1 << 14;

impl ProxyClient {
    /// The chunks of `blob` that have arrived at a replica (which starts ingesting it),
    /// once there are more than `have` (or after the proxy's long-poll bound), and which
    /// replica answered: fetch them from it with [`ProxyClient::arrived_chunk`].
    pub async fn arrived(
        &self,
        repo: &Repo,
        blob: &Digest,
        have: usize,
    ) -> Result<(usize, ArrivedChunks), ProxyClientError> {
        let order = self.replicas.order(blob.as_bytes(), None);
        self.on_replicas(order, false, |i| async move {
            let path = format!(
                "/imgd/v1/blobs/{blob}/arrived?repo={}{}&have={have}",
                repo.name,
                repo.ns_query('&')
            );
            let resp = self.get(i, &path, &[]).await?;
            let body = Self::body(resp, &path, MAX_JSON_BYTES).await?;
            let arrived: ArrivedChunks =
                serde_json::from_slice(&body).map_err(|e| ProxyClientError::Malformed {
                    what: "arrived chunks",
                    message: e.to_string(),
                })?;
            let too_many = arrived.chunks.len() > MAX_ARRIVED;
            let too_big = arrived
                .chunks
                .iter()
                .any(|c| c.size == 0 || c.size as usize > imgd_core::CHUNK_SIZE);
            if too_many || too_big {
                return Err(ProxyClientError::Malformed {
                    what: "arrived chunks",
                    message: format!("{} chunks, or one of a bad size", arrived.chunks.len()),
                });
            }
            Ok((i, arrived))
        })
        .await
    }

    /// A chunk from `replica` (one listed by its [`ProxyClient::arrived`]), verified
    /// against its digest.
    pub async fn arrived_chunk(
        &self,
        replica: usize,
        digest: &Digest,
    ) -> Result<imgd_core::VerifiedChunk, ProxyClientError> {
        self.chunk_at(replica, digest).await
    }
}
