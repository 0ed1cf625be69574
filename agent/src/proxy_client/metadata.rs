//! The proxy's metadata of layers and images: layer indexes (main part and windows) and
//! startup traces.

use super::{send, ProxyClient, ProxyClientError, Repo, MAX_INDEX_BYTES, MAX_JSON_BYTES};
use bytes::Bytes;
use imgd_core::wire::{LayerParts, StartupTrace};
use imgd_core::Digest;

impl ProxyClient {
    /// The main part of the encoded index of a layer (the caller decodes and verifies it;
    /// windows are fetched apart, [`ProxyClient::index_windows`]).
    pub async fn index(&self, repo: &Repo, layer: &Digest) -> Result<Bytes, ProxyClientError> {
        self.routed(layer, |i| self.index_at(i, repo, layer)).await
    }

    async fn index_at(
        &self,
        replica: usize,
        repo: &Repo,
        layer: &Digest,
    ) -> Result<Bytes, ProxyClientError> {
        let path = format!(
            "/imgd/v1/indexes/{layer}?repo={}{}",
            repo.name,
            repo.ns_query('&')
        );
        Self::body(self.get(replica, &path, &[]).await?, &path, MAX_INDEX_BYTES).await
    }

    /// What a mount needs of a layer, named (`/imgd/v1/layers/{layer}/parts`): the sha256
    /// and length of its index's main part and of its chunk list, so that they can be
    /// taken from a peer and checked.
    pub async fn layer_parts(
        &self,
        repo: &Repo,
        layer: &Digest,
    ) -> Result<LayerParts, ProxyClientError> {
        self.routed(layer, |i| async move {
            let path = format!(
                "/imgd/v1/layers/{layer}/parts?repo={}{}",
                repo.name,
                repo.ns_query('&')
            );
            let body = Self::body(self.get(i, &path, &[]).await?, &path, MAX_JSON_BYTES).await?;
            serde_json::from_slice(&body).map_err(|e| ProxyClientError::Malformed {
                what: "layer parts",
                message: format!("{path}: {e}"),
            })
        })
        .await
    }

    /// Bytes `range` of the windows part of a layer's index, by `Range` (not verified
    /// here: the caller checks each window against its sha256 from the main part).
    pub async fn index_windows(
        &self,
        repo: &Repo,
        layer: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, ProxyClientError> {
        self.routed(layer, |i| {
            self.index_windows_at(i, repo, layer, range.clone())
        })
        .await
    }

    async fn index_windows_at(
        &self,
        replica: usize,
        repo: &Repo,
        layer: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, ProxyClientError> {
        let path = format!(
            "/imgd/v1/indexes/{layer}/windows?repo={}{}",
            repo.name,
            repo.ns_query('&')
        );
        let want = range.end.saturating_sub(range.start);
        if want == 0 || want > MAX_INDEX_BYTES as u64 {
            return Err(ProxyClientError::Malformed {
                what: "index windows range",
                message: format!("{range:?} of the index of {layer}"),
            });
        }
        let asked = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self.get(replica, &path, &[("Range", &asked)]).await?;
        if resp.status().as_u16() != 206 {
            return Err(ProxyClientError::Malformed {
                what: "index windows range",
                message: format!("{path}: answered {} to a Range request", resp.status()),
            });
        }
        let bytes = Self::body(resp, &path, want as usize).await?;
        if bytes.len() as u64 != want {
            return Err(ProxyClientError::Malformed {
                what: "index windows range",
                message: format!("{path}: {} bytes for {asked}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// The learned startup trace of an image, if one was stored.
    pub async fn trace(&self, manifest: &Digest) -> Result<Option<StartupTrace>, ProxyClientError> {
        let order = self.replicas.order(manifest.as_bytes(), None);
        self.on_replicas(order, false, |i| self.trace_at(i, manifest))
            .await
    }

    async fn trace_at(
        &self,
        replica: usize,
        manifest: &Digest,
    ) -> Result<Option<StartupTrace>, ProxyClientError> {
        let path = format!("/imgd/v1/traces/{manifest}");
        match self.get(replica, &path, &[]).await {
            Ok(resp) => {
                let body = Self::body(resp, &path, MAX_JSON_BYTES).await?;
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| ProxyClientError::Malformed {
                        what: "startup trace",
                        message: e.to_string(),
                    })
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores the startup trace of an image (the proxy keeps the first one).
    pub async fn put_trace(
        &self,
        manifest: &Digest,
        trace: &StartupTrace,
    ) -> Result<(), ProxyClientError> {
        let path = format!("/imgd/v1/traces/{manifest}");
        let body = serde_json::to_vec(trace).unwrap_or_default();
        let order = self.replicas.order(manifest.as_bytes(), None);
        self.on_replicas(order, false, |i| {
            let url = format!("{}{path}", self.replicas.base(i));
            let req = self
                .authorize(self.http.put(&url), &path)
                .header("content-type", "application/json")
                .body(body.clone());
            async move { send(req, url).await.map(|_| ()) }
        })
        .await
    }
}
