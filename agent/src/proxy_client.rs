//! Client of imgd-proxy: manifests over the registry API, chunk lists, chunks and indexes
//! over the chunk API. Everything fetched by digest is verified here. With several proxy
//! replicas, each request goes to the replica [`ReplicaSet`] chooses for its key and fails
//! over to the others.

use crate::proxy_replicas::ReplicaSet;
use bytes::Bytes;
use imgd_core::wire::BlobInfo;
use imgd_core::{Digest, VerifiedChunk, CHUNK_SIZE};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

mod arrived;
mod metadata;

/// Errors talking to the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyClientError {
    #[error("proxy unreachable at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("proxy answered {status} for {url}: {body}")]
    Status {
        status: u16,
        url: String,
        body: String,
    },
    #[error("proxy sent {what} that does not match its digest {digest}")]
    Corrupt { what: &'static str, digest: Digest },
    #[error("proxy sent malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
}

impl ProxyClientError {
    /// True when the proxy said the thing does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProxyClientError::Status { status: 404, .. })
    }

    /// True when another replica may answer better: this one could not be reached, was
    /// overloaded or failing (429, 5xx), or sent something corrupt or malformed.
    fn fails_over(&self) -> bool {
        match self {
            ProxyClientError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => true,
        }
    }
}

/// Largest manifest the agent reads (the shared parser's limit).
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest chunk list or startup trace (JSON) the agent reads.
const MAX_JSON_BYTES: usize = 16 << 20;
/// Largest encoded layer index the agent reads (the index builder's default limit).
const MAX_INDEX_BYTES: usize = 256 << 20;

/// A repository as the proxy routes it: a name (e.g. `local/app`) and, as containerd
/// sends it, an optional `ns` naming the upstream registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    pub name: String,
    pub ns: Option<String>,
}

impl Repo {
    /// A repository without `ns`.
    pub fn new(name: &str) -> Repo {
        Repo {
            name: name.to_string(),
            ns: None,
        }
    }

    fn ns_query(&self, first: char) -> String {
        self.ns
            .as_ref()
            .map(|ns| format!("{first}ns={ns}"))
            .unwrap_or_default()
    }
}

/// A manifest as the proxy served it.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// Talks to imgd-proxy (one, or several replicas).
#[derive(Clone)]
pub struct ProxyClient {
    replicas: Arc<ReplicaSet>,
    http: reqwest::Client,
    /// `Authorization` for the chunk API, if the proxy requires a token.
    token: Option<String>,
}

impl ProxyClient {
    /// A client of the proxy at `base` (`http://host:port`), with a per-request timeout.
    pub fn new(base: &str, timeout: Duration) -> Result<ProxyClient, ProxyClientError> {
        ProxyClient::with_replicas(&[base.to_string()], timeout)
    }

    /// A client of the proxy replicas at `bases` (at least one), with a per-request
    /// timeout (per replica tried).
    pub fn with_replicas(
        bases: &[String],
        timeout: Duration,
    ) -> Result<ProxyClient, ProxyClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| ProxyClientError::Unreachable {
                url: bases.join(", "),
                message: e.to_string(),
            })?;
        if bases.is_empty() {
            return Err(ProxyClientError::Unreachable {
                url: String::new(),
                message: "no proxy URL configured".into(),
            });
        }
        Ok(ProxyClient {
            replicas: Arc::new(ReplicaSet::new(bases)),
            http,
            token: None,
        })
    }

    /// Sends `token` as `Authorization: Bearer` with every chunk API request (`None`: no
    /// token). The registry API (`/v2/`) never gets it.
    pub fn with_token(mut self, token: Option<String>) -> ProxyClient {
        self.token = token.map(|t| format!("Bearer {t}"));
        self
    }

    /// Adds the chunk API token to a request for `path`, if one is set.
    fn authorize(&self, req: reqwest::RequestBuilder, path: &str) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) if path.starts_with("/imgd/") => req.header("authorization", t),
            _ => req,
        }
    }

    /// The first proxy replica's base URL.
    pub fn base(&self) -> &str {
        self.replicas.base(0)
    }

    /// The replicas and their health.
    pub fn replicas(&self) -> &ReplicaSet {
        &self.replicas
    }

    /// Runs `attempt` on the replicas in `order` until one answers. A replica whose error
    /// [fails over](ProxyClientError::fails_over) is marked down and the next one is asked
    /// (with `not_found_fails_over`, a 404 also moves on, without marking it down); the
    /// last error is returned when none answers.
    async fn on_replicas<T, F, Fut>(
        &self,
        order: Vec<usize>,
        not_found_fails_over: bool,
        mut attempt: F,
    ) -> Result<T, ProxyClientError>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<T, ProxyClientError>>,
    {
        let mut last = None;
        let n = order.len();
        for (k, i) in order.into_iter().enumerate() {
            match attempt(i).await {
                Ok(v) => {
                    self.replicas.mark_up(i);
                    return Ok(v);
                }
                Err(e) => {
                    let down = e.fails_over();
                    if k + 1 == n || !(down || (not_found_fails_over && e.is_not_found())) {
                        return Err(e);
                    }
                    if down {
                        self.replicas.mark_down(i, &e.to_string());
                        crate::metrics::proxy_failover(self.replicas.base(i));
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ProxyClientError::Unreachable {
            url: String::new(),
            message: "no proxy replica configured".into(),
        }))
    }

    async fn get(
        &self,
        replica: usize,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<reqwest::Response, ProxyClientError> {
        let url = format!("{}{path}", self.replicas.base(replica));
        let mut req = self.authorize(self.http.get(&url), path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(req, url).await
    }

    /// Reads a response body of at most `limit` bytes; a longer one is refused as soon as
    /// it passes the limit, so a hostile or broken proxy cannot make the agent buffer it.
    async fn body(
        mut resp: reqwest::Response,
        url: &str,
        limit: usize,
    ) -> Result<Bytes, ProxyClientError> {
        let too_big = || ProxyClientError::Malformed {
            what: "response",
            message: format!("{url}: body over the {limit}-byte limit"),
        };
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_big());
        }
        let mut body = bytes::BytesMut::new();
        while let Some(part) = resp
            .chunk()
            .await
            .map_err(|e| ProxyClientError::Unreachable {
                url: url.to_string(),
                message: format!("reading body: {e:#}"),
            })?
        {
            if body.len() + part.len() > limit {
                return Err(too_big());
            }
            body.extend_from_slice(&part);
        }
        Ok(body.freeze())
    }

    /// A manifest by tag or digest (`repo` as the proxy routes it, e.g. `local/app`).
    pub async fn manifest(
        &self,
        repo: &Repo,
        reference: &str,
        accept: &[String],
    ) -> Result<FetchedManifest, ProxyClientError> {
        let key = format!("{}/{reference}", repo.name);
        let order = self.replicas.order(key.as_bytes(), None);
        self.on_replicas(order, false, |i| {
            self.manifest_at(i, repo, reference, accept)
        })
        .await
    }

    async fn manifest_at(
        &self,
        replica: usize,
        repo: &Repo,
        reference: &str,
        accept: &[String],
    ) -> Result<FetchedManifest, ProxyClientError> {
        let accept = if accept.is_empty() {
            imgd_core::wire::MANIFEST_MEDIA_TYPES.join(", ")
        } else {
            accept.join(", ")
        };
        let path = format!(
            "/v2/{}/manifests/{reference}{}",
            repo.name,
            repo.ns_query('?')
        );
        let resp = self.get(replica, &path, &[("Accept", &accept)]).await?;
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(imgd_core::wire::MANIFEST_MEDIA_TYPES[0])
            .to_string();
        let bytes = Self::body(resp, &path, MAX_MANIFEST_BYTES).await?;
        let digest = Digest::of(&bytes);
        if let Ok(want) = reference.parse::<Digest>() {
            if want != digest {
                return Err(ProxyClientError::Corrupt {
                    what: "a manifest",
                    digest: want,
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The chunk list and index state of a blob, which the proxy ingests if needed. The
    /// replica that answers becomes the blob's route.
    pub async fn blob_info(
        &self,
        repo: &Repo,
        blob: &Digest,
    ) -> Result<BlobInfo, ProxyClientError> {
        let order = self.replicas.order(blob.as_bytes(), None);
        self.on_replicas(order, false, |i| async move {
            let info = self.blob_info_at(i, repo, blob).await?;
            let chunks: Vec<Digest> = info.chunks.chunks.iter().map(|c| c.digest).collect();
            self.replicas.remember(repo, blob, &chunks, i);
            Ok(info)
        })
        .await
    }

    async fn blob_info_at(
        &self,
        replica: usize,
        repo: &Repo,
        blob: &Digest,
    ) -> Result<BlobInfo, ProxyClientError> {
        let path = format!(
            "/imgd/v1/blobs/{blob}?repo={}{}",
            repo.name,
            repo.ns_query('&')
        );
        let resp = self.get(replica, &path, &[]).await?;
        let body = Self::body(resp, &path, MAX_JSON_BYTES).await?;
        let info: BlobInfo =
            serde_json::from_slice(&body).map_err(|e| ProxyClientError::Malformed {
                what: "chunk list",
                message: e.to_string(),
            })?;
        if info.chunks.blob != *blob {
            return Err(ProxyClientError::Corrupt {
                what: "a chunk list",
                digest: *blob,
            });
        }
        info.chunks
            .validate()
            .map_err(|e| ProxyClientError::Malformed {
                what: "chunk list",
                message: e.to_string(),
            })?;
        Ok(info)
    }

    /// A chunk, verified against its digest: first from the replica that served its
    /// blob's chunk list; a replica that does not hold it is told to ingest the blob.
    pub async fn chunk(&self, digest: &Digest) -> Result<VerifiedChunk, ProxyClientError> {
        self.routed(digest, |i| self.chunk_at(i, digest)).await
    }

    /// Runs `fetch` (of `digest`, a chunk or a layer's index) on the replicas, its route's
    /// replica first. On another replica, a 404 is answered by asking it for the blob's
    /// chunk list (which makes it ingest the blob) and fetching again.
    async fn routed<T, F, Fut>(&self, digest: &Digest, fetch: F) -> Result<T, ProxyClientError>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<T, ProxyClientError>>,
    {
        let route = self.replicas.route(digest);
        let order = self
            .replicas
            .order(digest.as_bytes(), route.as_ref().map(|r| r.replica));
        let fetch = &fetch;
        let route = route.as_ref();
        self.on_replicas(order, true, |i| async move {
            match (fetch(i).await, route) {
                (Err(e), Some(r)) if e.is_not_found() && r.replica != i => {
                    self.blob_info_at(i, &r.repo, &r.blob).await?;
                    fetch(i).await
                }
                (result, _) => result,
            }
        })
        .await
    }

    async fn chunk_at(
        &self,
        replica: usize,
        digest: &Digest,
    ) -> Result<VerifiedChunk, ProxyClientError> {
        let path = format!("/imgd/v1/chunks/{digest}");
        let resp = self.get(replica, &path, &[]).await?;
        let bytes = Self::body(resp, &path, CHUNK_SIZE).await?;
        VerifiedChunk::check(*digest, bytes).map_err(|_| {
            crate::metrics::verification_failed("proxy");
            ProxyClientError::Corrupt {
                what: "a chunk",
                digest: *digest,
            }
        })
    }

    /// Bytes `range` of a chunk, by `Range` (not verified here: the caller checks each
    /// piece against its digest).
    pub async fn chunk_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, ProxyClientError> {
        self.routed(digest, |i| self.chunk_range_at(i, digest, range.clone()))
            .await
    }

    async fn chunk_range_at(
        &self,
        replica: usize,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, ProxyClientError> {
        let path = format!("/imgd/v1/chunks/{digest}");
        let want = range.end.saturating_sub(range.start);
        if want == 0 || range.end > CHUNK_SIZE as u64 {
            return Err(ProxyClientError::Malformed {
                what: "chunk range",
                message: format!("{range:?} of chunk {digest}"),
            });
        }
        let asked = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self.get(replica, &path, &[("Range", &asked)]).await?;
        if resp.status().as_u16() != 206 {
            return Err(ProxyClientError::Malformed {
                what: "chunk range",
                message: format!("{path}: answered {} to a Range request", resp.status()),
            });
        }
        let bytes = Self::body(resp, &path, want as usize).await?;
        if bytes.len() as u64 != want {
            return Err(ProxyClientError::Malformed {
                what: "chunk range",
                message: format!("{path}: {} bytes for {asked}", bytes.len()),
            });
        }
        Ok(bytes)
    }
}

/// Sends a request; a transport failure or a non-2xx answer becomes an error naming `url`.
async fn send(
    req: reqwest::RequestBuilder,
    url: String,
) -> Result<reqwest::Response, ProxyClientError> {
    let resp = req
        .send()
        .await
        .map_err(|e| ProxyClientError::Unreachable {
            url: url.clone(),
            message: format!("{e:#}"),
        })?;
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        return Err(ProxyClientError::Status { status, url, body });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy stand-in whose every answer is `len` bytes, with or without a length.
    async fn oversized_server(len: usize, chunked: bool) -> String {
        let app = axum::Router::new().fallback(move || async move {
            let body = vec![b'x'; len];
            if chunked {
                let parts = body
                    .chunks(64 << 10)
                    .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>();
                axum::body::Body::from_stream(futures::stream::iter(parts))
            } else {
                axum::body::Body::from(body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn bodies_over_their_limit_are_refused() {
        // As the binaries do: reqwest's rustls needs a process-wide crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        for chunked in [false, true] {
            let url = oversized_server(MAX_MANIFEST_BYTES + 1, chunked).await;
            let client = ProxyClient::new(&url, Duration::from_secs(5)).unwrap();
            let Err(err) = client.manifest(&Repo::new("a/b"), "latest", &[]).await else {
                panic!("an oversized manifest was accepted");
            };
            assert!(err.to_string().contains("limit"), "{err}");
            let Err(err) = client.chunk(&Digest::of(b"x")).await else {
                panic!("an oversized chunk was accepted");
            };
            assert!(err.to_string().contains("limit"), "{err}");
        }
    }
}
