//! Pulling an image from a registry over `/v2/` and verifying everything on the way: every
//! manifest's digest and media type, every blob's presence (HEAD), size and digest (GET),
//! and every layer's diff_id against its config.

use std::io::{self, Read};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::MultiGzDecoder;
use imgd_core::{Digest, Sha256};
use serde_json::Value;

use crate::media_types;
use crate::registry_client::RegistryClient;

/// A manifest (or index / manifest list) pulled and verified.
#[derive(Debug, Clone)]
pub struct PulledManifest {
    /// sha256 of the manifest bytes (equal to `Docker-Content-Digest`).
    pub digest: Digest,
    /// The manifest's media type (`Content-Type`, equal to its `mediaType` field).
    pub media_type: String,
    /// The manifest bytes as served.
    pub raw: Vec<u8>,
    /// The parsed manifest.
    pub json: Value,
    /// For an index or manifest list: its manifests, pulled and verified, in order.
    pub children: Vec<PulledManifest>,
    /// For an image manifest: the config blob.
    pub config: Option<PulledBlob>,
    /// For an image manifest: the layer blobs, bottom first.
    pub layers: Vec<PulledBlob>,
}

impl PulledManifest {
    /// Whether this is an OCI index or Docker manifest list.
    pub fn is_index(&self) -> bool {
        is_index(&self.media_type)
    }

    /// Every image manifest under this one (itself if it is one), depth first.
    pub fn images(&self) -> Vec<&PulledManifest> {
        if self.is_index() {
            self.children.iter().flat_map(|c| c.images()).collect()
        } else {
            vec![self]
        }
    }
}

/// A blob a manifest references, fetched and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledBlob {
    /// The descriptor's digest (verified against the content).
    pub digest: Digest,
    /// The descriptor's size (verified against the content and `Content-Length`).
    pub size: u64,
    /// The descriptor's media type.
    pub media_type: String,
    /// For layers: sha256 of the uncompressed tar, checked against the config's diff_ids.
    pub diff_id: Option<Digest>,
}

fn is_index(media_type: &str) -> bool {
    media_type == media_types::OCI_INDEX || media_type == media_types::DOCKER_MANIFEST_LIST
}

/// Pulls `repo:reference` (a tag or `sha256:...`) from `client` and verifies it completely:
/// manifests by digest and media type, recursively through indexes; blobs by HEAD (200,
/// `Content-Length`) and GET (size, sha256); layers' uncompressed sha256 against the
/// config's `rootfs.diff_ids`.
pub fn pull_verified(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
) -> Result<PulledManifest> {
    pull_manifest(client, repo, reference, None)
        .with_context(|| format!("pulling {repo}:{reference}"))
}

fn pull_manifest(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
    expected_type: Option<&str>,
) -> Result<PulledManifest> {
    let resp = client.manifest(repo, reference, &[])?;
    ensure!(
        resp.status == 200,
        "manifest {reference}: status {}: {}",
        resp.status,
        resp.text()
    );
    let digest = Digest::of(&resp.body);
    if reference.starts_with("sha256:") {
        ensure!(
            reference == digest.to_string(),
            "manifest {reference} has digest {digest}"
        );
    }
    if let Some(header) = resp.header("docker-content-digest") {
        ensure!(
            header == digest.to_string(),
            "Docker-Content-Digest {header} but content is {digest}"
        );
    }
    let json = resp.json()?;
    let content_type = resp.header("content-type").unwrap_or_default().to_owned();
    // `mediaType` is optional in OCI manifests; when present it must match Content-Type.
    let media_type = match json["mediaType"].as_str() {
        Some(declared) => {
            ensure!(
                content_type == declared,
                "Content-Type {content_type} but mediaType {declared}"
            );
            declared.to_owned()
        }
        None => content_type,
    };
    if let Some(expected) = expected_type {
        ensure!(
            media_type == expected,
            "descriptor says {expected}, manifest is {media_type}"
        );
    }
    let mut pulled = PulledManifest {
        digest,
        media_type,
        raw: resp.body,
        json,
        children: Vec::new(),
        config: None,
        layers: Vec::new(),
    };
    if pulled.is_index() {
        for desc in descriptors(&pulled.json["manifests"])? {
            let child = pull_manifest(client, repo, &desc.0.to_string(), Some(&desc.2))
                .with_context(|| format!("manifest {} of index {digest}", desc.0))?;
            ensure!(
                child.raw.len() as u64 == desc.1,
                "manifest {} size differs",
                desc.0
            );
            pulled.children.push(child);
        }
        return Ok(pulled);
    }
    let config_desc = descriptors(&Value::Array(vec![pulled.json["config"].clone()]))?;
    let (config_digest, config_size, config_type) =
        config_desc.into_iter().next().context("no config")?;
    let config_bytes = blob(client, repo, &config_digest, config_size)?;
    let config: Value = serde_json::from_slice(&config_bytes).context("config is not JSON")?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .context("config has no rootfs.diff_ids")?;
    let layers = descriptors(&pulled.json["layers"])?;
    ensure!(
        diff_ids.len() == layers.len(),
        "{} diff_ids for {} layers",
        diff_ids.len(),
        layers.len()
    );
    for ((digest, size, media_type), diff_id) in layers.into_iter().zip(diff_ids) {
        let bytes = blob(client, repo, &digest, size)?;
        let actual =
            uncompressed_digest(&bytes, &media_type).with_context(|| format!("layer {digest}"))?;
        ensure!(
            diff_id.as_str() == Some(actual.to_string().as_str()),
            "layer {digest}: uncompressed digest {actual}, config says {diff_id}"
        );
        pulled.layers.push(PulledBlob {
            digest,
            size,
            media_type,
            diff_id: Some(actual),
        });
    }
    pulled.config = Some(PulledBlob {
        digest: config_digest,
        size: config_size,
        media_type: config_type,
        diff_id: None,
    });
    Ok(pulled)
}

/// (digest, size, media type) of each descriptor in `list`.
fn descriptors(list: &Value) -> Result<Vec<(Digest, u64, String)>> {
    let list = list.as_array().context("descriptor list is not an array")?;
    list.iter()
        .map(|d| {
            let digest: Digest = d["digest"]
                .as_str()
                .context("descriptor without digest")?
                .parse()
                .map_err(|e| anyhow::anyhow!("bad digest in {d}: {e:?}"))?;
            let size = d["size"].as_u64().context("descriptor without size")?;
            let media_type = d["mediaType"]
                .as_str()
                .context("descriptor without mediaType")?;
            Ok((digest, size, media_type.to_owned()))
        })
        .collect()
}

/// HEAD then GET a blob, checking status, size and digest.
fn blob(client: &RegistryClient, repo: &str, digest: &Digest, size: u64) -> Result<Vec<u8>> {
    let head = client.head_blob(repo, digest)?;
    ensure!(
        head.status == 200,
        "HEAD blob {digest}: status {}",
        head.status
    );
    let length = head
        .header("content-length")
        .and_then(|l| l.parse::<u64>().ok());
    ensure!(
        length == Some(size),
        "HEAD blob {digest}: Content-Length {length:?}, descriptor {size}"
    );
    let bytes = client.blob_verified(repo, digest)?;
    ensure!(
        bytes.len() as u64 == size,
        "blob {digest}: {} bytes, descriptor {size}",
        bytes.len()
    );
    Ok(bytes)
}

/// A reader of a layer blob's uncompressed tar, decompressing according to `media_type`.
pub fn layer_reader<'a>(blob: &'a [u8], media_type: &str) -> Result<Box<dyn Read + 'a>> {
    if media_type.ends_with("gzip") {
        Ok(Box::new(MultiGzDecoder::new(blob)))
    } else if media_type.ends_with(".tar") {
        Ok(Box::new(blob))
    } else {
        bail!("unsupported layer media type {media_type}");
    }
}

/// sha256 of a layer blob's uncompressed tar, decompressing according to `media_type`.
pub fn uncompressed_digest(blob: &[u8], media_type: &str) -> Result<Digest> {
    let mut reader = layer_reader(blob, media_type)?;
    let mut hasher = HashSink(Sha256::new());
    io::copy(&mut reader, &mut hasher).context("decompressing layer")?;
    Ok(hasher.0.finish())
}

struct HashSink(Sha256);

impl io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
