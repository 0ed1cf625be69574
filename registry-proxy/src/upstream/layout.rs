//! An OCI image layout directory as an upstream: `index.json` names tags with the
//! `org.opencontainers.image.ref.name` annotation; blobs live in `blobs/sha256/`.

use super::{sniff_media_type, BlobStream, Manifest, UpstreamError};
use futures::StreamExt;
use imgd_core::Digest;
use std::path::PathBuf;
use tokio_util::io::ReaderStream;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Serves images from an OCI image layout directory.
pub struct LayoutUpstream {
    dir: PathBuf,
}

impl LayoutUpstream {
    /// An upstream over the layout at `dir`.
    pub fn new(dir: PathBuf) -> Self {
        LayoutUpstream { dir }
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    async fn resolve_tag(&self, tag: &str) -> Result<(Digest, Option<String>), UpstreamError> {
        let path = self.dir.join("index.json");
        let text = tokio::fs::read(&path)
            .await
            .map_err(|e| UpstreamError::Unreachable(format!("{}: {e}", path.display())))?;
        let index: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| UpstreamError::MalformedManifest(format!("{}: {e}", path.display())))?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let entry = entries
            .iter()
            .find(|m| m["annotations"][REF_NAME].as_str() == Some(tag))
            .ok_or_else(|| UpstreamError::NotFound(format!("tag {tag}")))?;
        let digest = entry["digest"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| UpstreamError::MalformedManifest("index.json entry digest".into()))?;
        Ok((digest, entry["mediaType"].as_str().map(str::to_string)))
    }

    pub(super) async fn manifest(
        &self,
        reference: &str,
        max_bytes: usize,
    ) -> Result<Manifest, UpstreamError> {
        let (digest, media_type) = match reference.parse::<Digest>() {
            Ok(d) => (d, None),
            Err(_) => self.resolve_tag(reference).await?,
        };
        let path = self.blob_path(&digest);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(UpstreamError::NotFound(format!("manifest {reference}")))
            }
            Err(e) => {
                return Err(UpstreamError::Unreachable(format!(
                    "{}: {e}",
                    path.display()
                )))
            }
        };
        if bytes.len() > max_bytes {
            return Err(UpstreamError::MalformedManifest(format!(
                "manifest of {} bytes exceeds the limit of {max_bytes}",
                bytes.len()
            )));
        }
        let media_type = media_type.unwrap_or_else(|| sniff_media_type(&bytes));
        Ok(Manifest {
            digest: Digest::of(&bytes),
            bytes: bytes.into(),
            media_type,
        })
    }

    /// Succeeds if the layout holds the blob (or manifest) `digest`.
    pub(super) async fn check_blob(&self, digest: &Digest) -> Result<(), UpstreamError> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(m) if m.is_file() => Ok(()),
            _ => Err(UpstreamError::NotFound(format!("blob {digest}"))),
        }
    }

    pub(super) async fn blob(&self, digest: &Digest) -> Result<BlobStream, UpstreamError> {
        let path = self.blob_path(digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(UpstreamError::NotFound(format!("blob {digest}")))
            }
            Err(e) => {
                return Err(UpstreamError::Unreachable(format!(
                    "{}: {e}",
                    path.display()
                )))
            }
        };
        let size = file.metadata().await.ok().map(|m| m.len());
        let body = ReaderStream::with_capacity(file, 256 << 10)
            .map(|r| r.map_err(|e| UpstreamError::Unreachable(e.to_string())))
            .boxed();
        Ok(BlobStream { size, body })
    }
}
