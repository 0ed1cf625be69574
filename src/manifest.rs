//! OCI / Docker manifest parsing with limits: the one parser the proxy and the agent use
//! on manifests from the network.
//!
//! [`parse`] checks the size before reading any JSON, then the structure: `schemaVersion`
//! 2, a known document media type (OCI or Docker v2 image manifest or index), well-formed
//! descriptors (sha256 digests, sizes) and at most [`ManifestLimits::max_descriptors`] of
//! them. Deep JSON nesting cannot overflow the stack: ignored fields are skipped without
//! recursion and parsed ones stop at serde_json's recursion limit (128). An index's child
//! must be an image
//! manifest ([`parse_child`]): nesting stops at one level, so no chain of indexes (and no
//! cycle, which digests already make impossible) is followed.

use crate::digest::Digest;
use serde::Deserialize;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer media types an image mount can read (tar, tar+gzip, tar+zstd, OCI and Docker).
pub const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Limits of [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestLimits {
    /// Largest document in bytes (default 4 MiB, the size registries accept).
    pub max_bytes: usize,
    /// Most descriptors (layers, or an index's manifests) in one document (default 1024).
    pub max_descriptors: usize,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        ManifestLimits {
            max_bytes: 4 << 20,
            max_descriptors: 1024,
        }
    }
}

/// Why a manifest was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("unsupported manifest schemaVersion {0:?} (only 2 is supported)")]
    SchemaVersion(Option<u64>),
    #[error("unknown manifest media type {0:?}")]
    UnknownMediaType(String),
    #[error("manifest media type {field:?} disagrees with the content type {content_type:?}")]
    MediaTypeMismatch { field: String, content_type: String },
    #[error("{what} has {count} descriptors, more than the limit of {limit}")]
    TooManyDescriptors {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("malformed manifest: {0}")]
    Malformed(&'static str),
    #[error("an image index names another index ({0}); nested indexes are not followed")]
    NestedIndex(Digest),
    #[error("layer {digest} has media type {media_type:?}, which cannot be mounted")]
    UnsupportedLayer { digest: Digest, media_type: String },
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest: a config and layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index (or Docker manifest list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageIndex {
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// The JSON fields read; everything else (annotations, subject, ...) is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<u64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

fn is_index(t: &str) -> bool {
    t == OCI_INDEX || t == DOCKER_LIST
}

fn is_image(t: &str) -> bool {
    t == OCI_MANIFEST || t == DOCKER_MANIFEST
}

/// The media type part of a `Content-Type` value (parameters dropped), if it is one of
/// the manifest types.
fn known_content_type(ct: Option<&str>) -> Option<&str> {
    let t = ct?.split(';').next()?.trim();
    (is_index(t) || is_image(t)).then_some(t)
}

/// Parses and checks a manifest. `content_type` is the `Content-Type` it came with, if
/// any; a generic one (`application/json`) is ignored.
pub fn parse(
    bytes: &[u8],
    content_type: Option<&str>,
    limits: &ManifestLimits,
) -> Result<Manifest, ManifestError> {
    if bytes.len() > limits.max_bytes {
        return Err(ManifestError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    if raw.schema_version != Some(2) {
        return Err(ManifestError::SchemaVersion(raw.schema_version));
    }
    let ct = known_content_type(content_type);
    let media_type = match (raw.media_type, ct) {
        (Some(field), Some(ct)) if field != ct => {
            return Err(ManifestError::MediaTypeMismatch {
                field,
                content_type: ct.to_string(),
            })
        }
        (Some(field), _) => field,
        (None, Some(ct)) => ct.to_string(),
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    let count = |what, n: usize| {
        if n > limits.max_descriptors {
            return Err(ManifestError::TooManyDescriptors {
                what,
                count: n,
                limit: limits.max_descriptors,
            });
        }
        Ok(())
    };
    if is_index(&media_type) {
        let manifests = raw
            .manifests
            .ok_or(ManifestError::Malformed("image index without `manifests`"))?;
        count("image index", manifests.len())?;
        Ok(Manifest::Index(ImageIndex {
            media_type,
            manifests,
        }))
    } else if is_image(&media_type) {
        let config = raw
            .config
            .ok_or(ManifestError::Malformed("image manifest without `config`"))?;
        let layers = raw
            .layers
            .ok_or(ManifestError::Malformed("image manifest without `layers`"))?;
        count("image manifest", layers.len())?;
        Ok(Manifest::Image(ImageManifest {
            media_type,
            config,
            layers,
        }))
    } else {
        Err(ManifestError::UnknownMediaType(media_type))
    }
}

/// Parses the manifest an index named as `digest`: it must be an image manifest.
pub fn parse_child(
    digest: Digest,
    bytes: &[u8],
    content_type: Option<&str>,
    limits: &ManifestLimits,
) -> Result<ImageManifest, ManifestError> {
    match parse(bytes, content_type, limits)? {
        Manifest::Image(m) => Ok(m),
        Manifest::Index(_) => Err(ManifestError::NestedIndex(digest)),
    }
}

impl ImageIndex {
    /// The first manifest for `os`/`architecture`.
    pub fn pick(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }
}

impl ImageManifest {
    /// Checks every layer has a media type a mount can read.
    pub fn check_layers_mountable(&self) -> Result<(), ManifestError> {
        match self
            .layers
            .iter()
            .find(|l| !LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
        {
            Some(l) => Err(ManifestError::UnsupportedLayer {
                digest: l.digest,
                media_type: l.media_type.clone(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
