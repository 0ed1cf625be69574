//! Writing OCI image layouts: blobs, configs, manifests, image indexes and `index.json`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgd_core::Digest;
use serde_json::{json, Value};

use super::layer::{write_layer_blob, LayerInfo};
use super::{ImageSpec, Platform};
use crate::media_types;

/// The layout annotation naming a reference (`oci:DIR:NAME`).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `created` of every config: fixed, so configs are deterministic.
const CREATED: &str = "2023-11-14T22:13:20Z";

/// A blob in a layout: what a descriptor says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// sha256 of the blob's bytes.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// The media type its descriptor carries.
    pub media_type: String,
}

/// An image manifest written into a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The spec's name (the layout reference, when the image is a top-level entry).
    pub name: String,
    /// The image's platform.
    pub platform: Platform,
    /// The manifest blob (OCI image manifest).
    pub manifest: BlobInfo,
    /// The config blob.
    pub config: BlobInfo,
    /// The layers, bottom first.
    pub layers: Vec<LayerInfo>,
}

impl ImageInfo {
    /// The config and layer blobs the manifest references.
    pub fn referenced_blobs(&self) -> Vec<&BlobInfo> {
        std::iter::once(&self.config)
            .chain(self.layers.iter().map(|l| &l.blob))
            .collect()
    }
}

/// An OCI image index written into a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexInfo {
    /// The layout reference of the index.
    pub name: String,
    /// The index blob.
    pub index: BlobInfo,
    /// The platform manifests, in index order.
    pub images: Vec<ImageInfo>,
}

/// What a finished layout holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutInfo {
    /// The layout directory (give it to skopeo as `oci:DIR:NAME`).
    pub dir: PathBuf,
    /// Top-level images, in `index.json` order (before or after the indexes, as added).
    pub images: Vec<ImageInfo>,
    /// Top-level image indexes.
    pub indexes: Vec<IndexInfo>,
}

impl LayoutInfo {
    /// The top-level image named `name`.
    pub fn image(&self, name: &str) -> Option<&ImageInfo> {
        self.images.iter().find(|i| i.name == name)
    }

    /// The top-level index named `name`.
    pub fn index(&self, name: &str) -> Option<&IndexInfo> {
        self.indexes.iter().find(|i| i.name == name)
    }

    /// Where the blob `digest` is stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }
}

/// Builds an OCI image layout in a directory, image by image; [`LayoutWriter::finish`]
/// writes `index.json`.
#[derive(Debug)]
pub struct LayoutWriter {
    dir: PathBuf,
    blobs: PathBuf,
    entries: Vec<Value>,
    images: Vec<ImageInfo>,
    indexes: Vec<IndexInfo>,
}

impl LayoutWriter {
    /// Starts a layout in `dir` (created if missing; existing blobs are kept).
    pub fn create(dir: &Path) -> Result<Self> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .context("writing oci-layout")?;
        Ok(LayoutWriter {
            dir: dir.to_owned(),
            blobs,
            entries: Vec::new(),
            images: Vec::new(),
            indexes: Vec::new(),
        })
    }

    /// Writes `bytes` as a blob and describes it as `media_type`.
    pub fn write_blob(&self, bytes: &[u8], media_type: &str) -> Result<BlobInfo> {
        let digest = Digest::of(bytes);
        let path = self.blobs.join(digest.hex());
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        Ok(BlobInfo {
            digest,
            size: bytes.len() as u64,
            media_type: media_type.to_owned(),
        })
    }

    /// Writes an image (layers, config, manifest) and names it `spec.name` in `index.json`.
    pub fn add_image(&mut self, spec: &ImageSpec) -> Result<ImageInfo> {
        self.check_new_name(&spec.name)?;
        let image = self.write_image(spec)?;
        self.entries
            .push(named(descriptor(&image.manifest, None), &spec.name));
        self.images.push(image.clone());
        Ok(image)
    }

    /// Writes every image of `specs` and an OCI image index over them (each entry with its
    /// platform), named `name` in `index.json`. The images themselves get no names.
    pub fn add_index(&mut self, name: &str, specs: &[ImageSpec]) -> Result<IndexInfo> {
        self.check_new_name(name)?;
        let images = specs
            .iter()
            .map(|s| self.write_image(s))
            .collect::<Result<Vec<_>>>()?;
        let manifests: Vec<Value> = images
            .iter()
            .map(|i| descriptor(&i.manifest, Some(&i.platform)))
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_INDEX,
            "manifests": manifests,
        });
        let index = self.write_blob(&to_json(&index)?, media_types::OCI_INDEX)?;
        self.entries.push(named(descriptor(&index, None), name));
        let info = IndexInfo {
            name: name.to_owned(),
            index,
            images,
        };
        self.indexes.push(info.clone());
        Ok(info)
    }

    /// Writes `index.json` and returns what the layout holds.
    pub fn finish(self) -> Result<LayoutInfo> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_INDEX,
            "manifests": self.entries,
        });
        fs::write(self.dir.join("index.json"), to_json(&index)?).context("writing index.json")?;
        Ok(LayoutInfo {
            dir: self.dir,
            images: self.images,
            indexes: self.indexes,
        })
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        let taken = self
            .entries
            .iter()
            .any(|e| e["annotations"][REF_NAME] == name);
        if taken {
            bail!("layout already has a reference named {name:?}");
        }
        Ok(())
    }

    fn write_image(&self, spec: &ImageSpec) -> Result<ImageInfo> {
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                write_layer_blob(&self.blobs, l)
                    .with_context(|| format!("image {}: layer {i}", spec.name))
            })
            .collect::<Result<Vec<_>>>()?;
        let config = self.write_blob(
            &to_json(&config_json(spec, &layers))?,
            media_types::OCI_CONFIG,
        )?;
        let layer_descs: Vec<Value> = layers.iter().map(|l| descriptor(&l.blob, None)).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_MANIFEST,
            "config": descriptor(&config, None),
            "layers": layer_descs,
        });
        let manifest = self.write_blob(&to_json(&manifest)?, media_types::OCI_MANIFEST)?;
        Ok(ImageInfo {
            name: spec.name.clone(),
            platform: spec.platform.clone(),
            manifest,
            config,
            layers,
        })
    }
}

/// Writes a layout in `dir` with one manifest per spec, each named `spec.name`.
pub fn build_layout(dir: &Path, specs: &[ImageSpec]) -> Result<LayoutInfo> {
    let mut writer = LayoutWriter::create(dir)?;
    for spec in specs {
        writer.add_image(spec)?;
    }
    writer.finish()
}

/// Writes a layout in `dir` holding one OCI image index named `name` over `specs` (one
/// platform manifest each; give them different platforms), for `skopeo copy --all`.
pub fn build_index_layout(dir: &Path, name: &str, specs: &[ImageSpec]) -> Result<LayoutInfo> {
    let mut writer = LayoutWriter::create(dir)?;
    writer.add_index(name, specs)?;
    writer.finish()
}

fn config_json(spec: &ImageSpec, layers: &[LayerInfo]) -> Value {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let history: Vec<Value> = (0..layers.len())
        .map(|i| json!({"created": CREATED, "created_by": format!("imgd-tests layer {i}")}))
        .collect();
    let mut config = json!({
        "created": CREATED,
        "architecture": spec.platform.architecture,
        "os": spec.platform.os,
        "config": {
            "Cmd": spec.cmd,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    if let Some(variant) = &spec.platform.variant {
        config["variant"] = json!(variant);
    }
    config
}

fn descriptor(blob: &BlobInfo, platform: Option<&Platform>) -> Value {
    let mut d = json!({
        "mediaType": blob.media_type,
        "digest": blob.digest.to_string(),
        "size": blob.size,
    });
    if let Some(p) = platform {
        d["platform"] = json!({"architecture": p.architecture, "os": p.os});
        if let Some(variant) = &p.variant {
            d["platform"]["variant"] = json!(variant);
        }
    }
    d
}

fn named(mut descriptor: Value, name: &str) -> Value {
    descriptor["annotations"] = json!({ REF_NAME: name });
    descriptor
}

fn to_json(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).context("serialising JSON")
}
