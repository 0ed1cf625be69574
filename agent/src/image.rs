//! Image references and their resolution through the proxy into an [`ImageRecord`].

use crate::cache::{CacheError, ChunkCache, ImageRecord};
use crate::proxy_client::{ProxyClient, ProxyClientError, Repo};
use imgd_core::manifest::{self, Manifest, ManifestError, ManifestLimits};
use imgd_core::Digest;

/// A parsed image reference: `REPO:TAG` or `REPO@sha256:...`, where `REPO` is the name
/// the proxy routes (e.g. `local/app` or `docker.io/library/alpine`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub repo: String,
    pub reference: String,
}

/// Errors resolving an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {0:?}: expected REPO:TAG or REPO@sha256:DIGEST")]
    BadReference(String),
    #[error("unknown image {0}")]
    Unknown(String),
    #[error(transparent)]
    Proxy(#[from] ProxyClientError),
    #[error("malformed manifest of {image}: {message}")]
    Malformed { image: String, message: String },
    #[error("image index of {image} has no linux/{arch} manifest")]
    NoPlatform { image: String, arch: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl ImageRef {
    /// Parses `REPO:TAG`, `REPO@DIGEST`, or `REPO` (tag `latest`).
    pub fn parse(s: &str) -> Result<ImageRef, ImageError> {
        let bad = || ImageError::BadReference(s.to_string());
        let (repo, reference) = if let Some((r, d)) = s.split_once('@') {
            d.parse::<Digest>().map_err(|_| bad())?;
            (r, d)
        } else {
            match s.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t),
                _ => (s, "latest"),
            }
        };
        if repo.is_empty() || reference.is_empty() || repo.contains("..") || repo.starts_with('/') {
            return Err(bad());
        }
        Ok(ImageRef {
            repo: repo.to_string(),
            reference: reference.to_string(),
        })
    }
}

impl ImageRef {
    /// The repository as the proxy routes it.
    pub fn proxy_repo(&self) -> Repo {
        Repo::new(&self.repo)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(f, "{}{sep}{}", self.repo, self.reference)
    }
}

/// The architecture name OCI uses for this machine.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn malformed(image: &ImageRef, message: impl Into<String>) -> ImageError {
    ImageError::Malformed {
        image: image.to_string(),
        message: message.into(),
    }
}

/// Parses and resolves `image` and keeps its record (manifest and blob list) in `cache`.
pub async fn resolve_and_keep(
    proxy: &ProxyClient,
    cache: &ChunkCache,
    image: &str,
) -> Result<(ImageRef, ImageRecord), ImageError> {
    let r = ImageRef::parse(image)?;
    let record = resolve(proxy, &r).await?;
    cache.put_image(&r.to_string(), &record)?;
    Ok((r, record))
}

/// Resolves `image` through the proxy: follows an index to the host's platform and
/// returns the image's manifest and blobs.
pub async fn resolve(proxy: &ProxyClient, image: &ImageRef) -> Result<ImageRecord, ImageError> {
    let top = proxy
        .manifest(&image.proxy_repo(), &image.reference, &[])
        .await
        .map_err(|e| {
            if e.is_not_found() {
                ImageError::Unknown(image.to_string())
            } else {
                e.into()
            }
        })?;
    let limits = ManifestLimits::default();
    let bad = |e: ManifestError| malformed(image, e.to_string());
    let (manifest, parsed) =
        match manifest::parse(&top.bytes, Some(&top.media_type), &limits).map_err(bad)? {
            Manifest::Index(index) => {
                let arch = host_arch();
                let child = index
                    .pick("linux", arch)
                    .ok_or_else(|| ImageError::NoPlatform {
                        image: image.to_string(),
                        arch: arch.to_string(),
                    })?
                    .digest;
                let m = proxy
                    .manifest(&image.proxy_repo(), &child.to_string(), &[])
                    .await?;
                let parsed = manifest::parse_child(child, &m.bytes, Some(&m.media_type), &limits)
                    .map_err(bad)?;
                (m, parsed)
            }
            Manifest::Image(parsed) => (top, parsed),
        };
    parsed.check_layers_mountable().map_err(bad)?;
    let config = parsed.config.digest;
    let layers = parsed.layers.iter().map(|l| l.digest).collect();
    let total = parsed
        .layers
        .iter()
        .fold(parsed.config.size, |t, l| t.saturating_add(l.size));
    let pulled_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(ImageRecord {
        manifest_digest: manifest.digest,
        media_type: manifest.media_type,
        manifest: manifest.bytes.to_vec(),
        config,
        layers,
        total_size: total,
        pulled_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = ImageRef::parse("local/app:1").unwrap();
        assert_eq!((r.repo.as_str(), r.reference.as_str()), ("local/app", "1"));
        let r = ImageRef::parse("host:5000/app").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.reference.as_str()),
            ("host:5000/app", "latest")
        );
        let d = Digest::of(b"x");
        let r = ImageRef::parse(&format!("a/b@{d}")).unwrap();
        assert_eq!(r.to_string(), format!("a/b@{d}"));
        assert!(ImageRef::parse("a@sha256:zz").is_err());
        assert!(ImageRef::parse("../x:1").is_err());
    }
}
