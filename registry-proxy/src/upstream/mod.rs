//! Upstream sources of manifests and blobs: an OCI registry, or an OCI image layout
//! directory. Everything fetched by digest is verified here or by the caller before use.

mod layout;
mod registry;
pub mod retry;

pub use layout::LayoutUpstream;
pub use registry::RegistryUpstream;

use crate::config::{ConfigError, RetryConfig, UpstreamConfig};
use bytes::Bytes;
use futures::stream::BoxStream;
use imgd_core::Digest;
use std::time::Duration;

pub use imgd_core::wire::MANIFEST_MEDIA_TYPES;

/// Errors from an upstream, each mapped to an honest status for the client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream answered with an error status; its body and headers pass through.
    #[error("upstream answered {status}")]
    Status {
        status: u16,
        body: Bytes,
        content_type: Option<String>,
        retry_after: Option<String>,
    },
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream timed out: {0}")]
    Timeout(String),
    #[error("upstream body interrupted: {0}")]
    Interrupted(String),
    #[error("upstream body truncated: got {got} of {expected} bytes")]
    Truncated { got: u64, expected: u64 },
    #[error("digest mismatch: expected {expected}, upstream sent {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("malformed manifest from upstream: {0}")]
    MalformedManifest(String),
    #[error("upstream authentication failed: {0}")]
    Auth(String),
    #[error("{0} not found upstream")]
    NotFound(String),
}

impl UpstreamError {
    /// True for faults of reachability (not answers): a stale cached copy may be served.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::Interrupted(_) => true,
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A manifest as fetched: its exact bytes, media type and digest.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// A blob body as it streams from upstream (not yet verified).
pub struct BlobStream {
    /// The size the upstream announced, if any.
    pub size: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

/// One configured upstream.
pub enum Upstream {
    Registry(RegistryUpstream),
    Layout(LayoutUpstream),
}

impl Upstream {
    /// Builds an upstream from its validated configuration.
    pub fn from_config(
        cfg: &UpstreamConfig,
        timeout: Duration,
        retry: &RetryConfig,
    ) -> Result<Upstream, ConfigError> {
        match (&cfg.url, &cfg.layout) {
            (Some(url), None) => Ok(Upstream::Registry(RegistryUpstream::new(
                cfg, url, timeout, retry,
            )?)),
            (None, Some(dir)) => Ok(Upstream::Layout(LayoutUpstream::new(dir.clone()))),
            _ => Err(ConfigError::Invalid(format!(
                "upstream {:?} needs exactly one of url or layout",
                cfg.name
            ))),
        }
    }

    /// Fetches a manifest by tag or digest, offering the `accept` media types.
    /// A manifest fetched by digest is verified against it.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &[String],
        max_bytes: usize,
    ) -> Result<Manifest, UpstreamError> {
        let m = match self {
            Upstream::Registry(r) => r.manifest(repo, reference, accept, max_bytes).await?,
            Upstream::Layout(l) => l.manifest(reference, max_bytes).await?,
        };
        check_manifest(&m, reference, max_bytes)?;
        Ok(m)
    }

    /// Opens the stream of a blob.
    pub async fn blob(&self, repo: &str, digest: &Digest) -> Result<BlobStream, UpstreamError> {
        match self {
            Upstream::Registry(r) => r.blob(repo, digest).await,
            Upstream::Layout(l) => l.blob(digest).await,
        }
    }
}

impl Upstream {
    /// Confirms that `repo` holds the blob, asking upstream with this upstream's
    /// credentials (`HEAD`). An upstream error status is the answer when it does not.
    pub async fn check_blob(&self, repo: &str, digest: &Digest) -> Result<(), UpstreamError> {
        match self {
            Upstream::Registry(r) => r.check_blob(repo, digest).await,
            Upstream::Layout(l) => l.check_blob(digest).await,
        }
    }

    /// Confirms that `repo` holds the manifest `digest`, like [`Upstream::check_blob`].
    pub async fn check_manifest(&self, repo: &str, digest: &Digest) -> Result<(), UpstreamError> {
        match self {
            Upstream::Registry(r) => r.check_manifest(repo, digest).await,
            Upstream::Layout(l) => l.check_blob(digest).await,
        }
    }
}

/// Verifies a fetched manifest: digest against a digest reference, then the shared
/// parser's checks (`imgd_core::manifest`: size, `schemaVersion` 2, known media type,
/// well-formed descriptors within the count limit).
fn check_manifest(m: &Manifest, reference: &str, max_bytes: usize) -> Result<(), UpstreamError> {
    if let Ok(expected) = reference.parse::<Digest>() {
        if expected != m.digest {
            return Err(UpstreamError::DigestMismatch {
                expected,
                actual: m.digest,
            });
        }
    }
    let limits = imgd_core::manifest::ManifestLimits {
        max_bytes,
        ..Default::default()
    };
    imgd_core::manifest::parse(&m.bytes, Some(&m.media_type), &limits)
        .map(|_| ())
        .map_err(|e| UpstreamError::MalformedManifest(e.to_string()))
}

/// The media type of manifest bytes when no usable `Content-Type` came with them.
pub fn sniff_media_type(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(t) = v.get("mediaType").and_then(|t| t.as_str()) {
        return t.to_string();
    }
    if v.get("manifests").is_some() {
        MANIFEST_MEDIA_TYPES[1].to_string()
    } else {
        MANIFEST_MEDIA_TYPES[0].to_string()
    }
}
