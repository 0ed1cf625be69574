//! An upstream OCI registry over http(s).
//!
//! `oci-client` performs the auth handshake (the `WWW-Authenticate` challenge and the
//! bearer-token flow, anonymous or with basic credentials). Requests themselves are made
//! here with `reqwest`, because `oci-client` hides what a proxy must pass on: the status
//! code, `Content-Type`, `Retry-After` and the OCI error body, and a blob stream that is
//! not buffered. Tokens are cached per repository and renewed when upstream answers 401
//! (an expired token), once per request.

use super::{sniff_media_type, BlobStream, Manifest, UpstreamError, MANIFEST_MEDIA_TYPES};
use crate::config::{ConfigError, UpstreamConfig};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use imgd_core::Digest;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// A registry reached over http(s).
pub struct RegistryUpstream {
    base: String,
    host: String,
    auth: RegistryAuth,
    oci: oci_client::Client,
    http: reqwest::Client,
    /// `Authorization` value per repository (`None`: anonymous access works).
    tokens: Mutex<HashMap<String, Option<HeaderValue>>>,
}

impl RegistryUpstream {
    /// A registry upstream at `url` (`http://` or `https://`).
    pub fn new(cfg: &UpstreamConfig, url: &str, timeout: Duration) -> Result<Self, ConfigError> {
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

    /// GETs `url` with auth, renewing the token once on 401. Error statuses become
    /// [`UpstreamError::Status`] with the upstream body.
    async fn get(
        &self,
        repo: &str,
        url: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut renew = false;
        loop {
            let mut req = self.http.get(url).header(ACCEPT, accept);
            if let Some(auth) = self.authorization(repo, renew).await? {
                req = req.header(AUTHORIZATION, auth);
            }
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == reqwest::StatusCode::UNAUTHORIZED && !renew {
                tracing::debug!(url, "upstream 401, renewing token");
                renew = true;
                continue;
            }
            let header_str = |name| {
                resp.headers()
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
                    .map(str::to_string)
            };
            let content_type = header_str(CONTENT_TYPE);
            let retry_after = header_str(RETRY_AFTER);
            let body = read_limited(resp, 64 << 10).await.unwrap_or_default();
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                body,
                content_type,
                retry_after,
            });
        }
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
        let resp = self.get(repo, &url, &accept).await?;
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
        let resp = self.get(repo, &url, "*/*").await?;
        let size = resp.content_length();
        let body = resp.bytes_stream().map(|r| r.map_err(transport)).boxed();
        Ok(BlobStream { size, body })
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
