//! An upstream OCI registry over http(s).
//!
//! `oci-client` performs the auth handshake (the `WWW-Authenticate` challenge and the
//! bearer-token flow, anonymous or with basic credentials). Requests themselves are made
//! here with `reqwest`, because `oci-client` hides what a proxy must pass on: the status
//! code, `Content-Type`, `Retry-After` and the OCI error body, and a blob stream that is
//! not buffered. Tokens are cached per repository and renewed when upstream answers 401
//! (an expired token), once per request.
//!
//! Transient statuses (429, 500, 502, 503, 504) are retried as [`super::retry`] decides;
//! a failure to connect or a timeout is not (a dead upstream fails fast).
//! Redirects (e.g. a blob answered with 307 to blob storage) are followed here, and the
//! registry's `Authorization` goes only to the registry's own origin, never to the host a
//! redirect names.

use super::retry::{retryable_status, Retries};
use super::{sniff_media_type, BlobStream, Manifest, UpstreamError, MANIFEST_MEDIA_TYPES};
use crate::config::{ConfigError, RetryConfig, UpstreamConfig};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use imgd_core::Digest;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// A registry reached over http(s).
pub struct RegistryUpstream {
    base: String,
    host: String,
    auth: RegistryAuth,
    oci: oci_client::Client,
    http: reqwest::Client,
    retry: std::sync::Arc<RetryConfig>,
    /// `Authorization` value per repository (`None`: anonymous access works).
    tokens: Mutex<HashMap<String, Option<HeaderValue>>>,
}

impl RegistryUpstream {
    /// A registry upstream at `url` (`http://` or `https://`).
    pub fn new(
        cfg: &UpstreamConfig,
        url: &str,
        timeout: Duration,
        retry: &RetryConfig,
    ) -> Result<Self, ConfigError> {
        let base = url.trim_end_matches('/').to_string();
        let host = base
            .split_once("://")
            .map(|(_, h)| h.to_string())
            .ok_or_else(|| ConfigError::Invalid(format!("upstream url {url:?} has no scheme")))?;
        let protocol = if base.starts_with("http://") {
            ClientProtocol::HttpsExcept(vec![host.clone()])
        } else {
            ClientProtocol::Https
        };
        let oci = oci_client::Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(timeout),
            read_timeout: Some(timeout),
            ..Default::default()
        });
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("imgd-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Invalid(format!("http client: {e}")))?;
        let auth = match (&cfg.username, &cfg.password, &cfg.token) {
            (Some(u), Some(p), _) => RegistryAuth::Basic(u.clone(), p.clone()),
            (_, _, Some(t)) => RegistryAuth::Bearer(t.clone()),
            _ => RegistryAuth::Anonymous,
        };
        Ok(RegistryUpstream {
            base,
            host,
            auth,
            oci,
            http,
            retry: std::sync::Arc::new(retry.clone()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The `Authorization` header for pulling `repo`, from cache unless `renew`.
    async fn authorization(
        &self,
        repo: &str,
        renew: bool,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if !renew {
            if let Some(v) = self.tokens.lock().map_err(poisoned)?.get(repo) {
                return Ok(v.clone());
            }
        }
        let reference = Reference::with_tag(self.host.clone(), repo.to_string(), "latest".into());
        let token = self
            .oci
            .auth(&reference, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| match e {
                oci_client::errors::OciDistributionError::RequestError(e) => transport(e),
                other => UpstreamError::Auth(other.to_string()),
            })?;
        let value = match (token, &self.auth) {
            (Some(t), _) => Some(header(&format!("Bearer {t}"))?),
            (None, RegistryAuth::Basic(u, p)) => {
                use base64::Engine as _;
                let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                Some(header(&format!("Basic {b64}"))?)
            }
            (None, _) => None,
        };
        self.tokens
            .lock()
            .map_err(poisoned)?
            .insert(repo.to_string(), value.clone());
        Ok(value)
    }

    /// Sends `method` to `url` with auth: renews the token once on 401, retries transient
    /// failures, follows redirects. Error statuses become [`UpstreamError::Status`] with
    /// the upstream body.
    async fn send(
        &self,
        method: Method,
        repo: &str,
        url: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut retries = Retries::new(&self.retry);
        let mut renewed = false;
        let mut renew = false;
        loop {
            let err = match self.exchange(&method, repo, url, accept, renew).await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !renewed => {
                    tracing::debug!(url, "upstream 401, renewing token");
                    (renewed, renew) = (true, true);
                    continue;
                }
                Ok(resp) => status_error(resp).await,
                Err(e) => e,
            };
            renew = false;
            let (retryable, retry_after) = match &err {
                UpstreamError::Status {
                    status,
                    retry_after,
                    ..
                } => (retryable_status(*status), retry_after.as_deref()),
                _ => (false, None),
            };
            let wait = if retryable {
                retries.failed(retry_after)
            } else {
                None
            };
            match wait {
                Some(wait) => {
                    tracing::info!(url, error = %err, attempt = retries.attempts(), ?wait, "upstream failed, retrying");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    if retryable && retries.attempts() > 1 {
                        tracing::warn!(url, error = %err, attempts = retries.attempts(), "upstream still failing, giving up");
                    }
                    return Err(err);
                }
            }
        }
    }

    /// One request and the redirects it leads to. The `Authorization` header is sent only
    /// to the registry's own origin.
    async fn exchange(
        &self,
        method: &Method,
        repo: &str,
        url: &str,
        accept: &str,
        renew: bool,
    ) -> Result<reqwest::Response, UpstreamError> {
        let auth = self.authorization(repo, renew).await?;
        let mut current =
            Url::parse(url).map_err(|e| UpstreamError::Unreachable(format!("{url}: {e}")))?;
        let origin = current.origin();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self
                .http
                .request(method.clone(), current.clone())
                .header(ACCEPT, accept);
            if let (Some(auth), true) = (&auth, current.origin() == origin) {
                req = req.header(AUTHORIZATION, auth.clone());
            }
            let resp = req.send().await.map_err(transport)?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(location) = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
                return Ok(resp);
            };
            current = current.join(location).map_err(|e| {
                UpstreamError::Unreachable(format!("redirect to unusable {location:?}: {e}"))
            })?;
            tracing::debug!(from = url, to_host = ?current.host_str(), "following upstream redirect");
        }
        Err(UpstreamError::Unreachable(format!(
            "{url}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// Asks upstream whether `repo` holds the blob (`HEAD`), with this upstream's credentials.
    pub(super) async fn check_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<(), UpstreamError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        self.send(Method::HEAD, repo, &url, "*/*").await.map(drop)
    }

    /// Asks upstream whether `repo` holds the manifest `digest` (`HEAD`).
    pub(super) async fn check_manifest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<(), UpstreamError> {
        let url = format!("{}/v2/{repo}/manifests/{digest}", self.base);
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        self.send(Method::HEAD, repo, &url, &accept).await.map(drop)
    }

    pub(super) async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &[String],
        max_bytes: usize,
    ) -> Result<Manifest, UpstreamError> {
        let accept = if accept.is_empty() {
            MANIFEST_MEDIA_TYPES.join(", ")
        } else {
            accept.join(", ")
        };
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let resp = self.send(Method::GET, repo, &url, &accept).await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<Digest>().ok());
        let bytes = read_limited(resp, max_bytes).await?;
        let digest = Digest::of(&bytes);
        if let Some(h) = header_digest {
            if h != digest {
                return Err(UpstreamError::DigestMismatch {
                    expected: h,
                    actual: digest,
                });
            }
        }
        let media_type = match content_type {
            Some(t) if t.contains("manifest") || t.contains("index") => t,
            _ => sniff_media_type(&bytes),
        };
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    pub(super) async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<BlobStream, UpstreamError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self.send(Method::GET, repo, &url, "*/*").await?;
        let size = resp.content_length();
        let body = resp.bytes_stream().map(|r| r.map_err(transport)).boxed();
        Ok(BlobStream { size, body })
    }
}

/// The error for a response with an error status, keeping what the client must see.
async fn status_error(resp: reqwest::Response) -> UpstreamError {
    let header_str = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header_str(CONTENT_TYPE);
    let retry_after = header_str(RETRY_AFTER);
    let status = resp.status().as_u16();
    let body = read_limited(resp, 64 << 10).await.unwrap_or_default();
    UpstreamError::Status {
        status,
        body,
        content_type,
        retry_after,
    }
}

fn header(v: &str) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_str(v).map_err(|e| UpstreamError::Auth(format!("unusable credential: {e}")))
}

fn poisoned<T>(_: T) -> UpstreamError {
    UpstreamError::Auth("token cache lock poisoned".into())
}

fn transport(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout(e.to_string())
    } else if e.is_body() || e.is_decode() {
        UpstreamError::Interrupted(format!("{e:#}"))
    } else {
        UpstreamError::Unreachable(format!("{e:#}"))
    }
}

/// Reads a body, failing once it exceeds `max` bytes.
async fn read_limited(resp: reqwest::Response, max: usize) -> Result<Bytes, UpstreamError> {
    let expected = resp.content_length();
    let mut stream = resp.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(transport)?;
        if buf.len() + piece.len() > max {
            return Err(UpstreamError::MalformedManifest(format!(
                "body exceeds the limit of {max} bytes"
            )));
        }
        buf.extend_from_slice(&piece);
    }
    if let Some(n) = expected {
        if n != buf.len() as u64 {
            return Err(UpstreamError::Truncated {
                got: buf.len() as u64,
                expected: n,
            });
        }
    }
    Ok(buf.freeze())
}
