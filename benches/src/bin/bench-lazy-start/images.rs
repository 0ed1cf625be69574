//! The benchmarked image, as a writable layout with one variant per lazy run.

use crate::runc::Workload;
use anyhow::{Context, Result};
use imgd_tests::debian_image;
use imgd_tests::image::{self, FileSpec, ImageSpec, LayerSpec, LayoutInfo};
use std::path::Path;

const MIB: u64 = 1 << 20;
/// What the synthetic image's container prints.
const HELLO: &str = "hello from an imgd lazy start";

/// Which image to start.
#[derive(Clone, Copy)]
pub enum Source {
    /// Debian 12 with python3, numpy and scipy from apt; its command imports them
    /// ([`debian_image`], built once and cached).
    Debian,
    /// A static busybox printing one file, plus this many MiB of incompressible data it
    /// never reads (the earlier synthetic image).
    Synthetic(u64),
}

/// A layout holding the image (named `base`), and what running it looks like.
pub struct Prepared {
    pub layout: LayoutInfo,
    /// The image's reference in the layout.
    pub name: String,
    pub workload: Workload,
    /// Config + layer bytes (what a full pull downloads, manifest aside).
    pub compressed: u64,
    pub uncompressed: u64,
    pub layers: usize,
    pub describe: String,
}

const BASE: &str = "base";

/// Writes the image of `source` into a layout under `dir`.
pub fn prepare(source: Source, dir: &Path) -> Result<Prepared> {
    let (layout, workload, describe) = match source {
        Source::Debian => {
            let built = debian_image::build()?;
            // The cache's image is named debian-numpy; the copy adds the variants.
            let layout = built.scratch_copy(dir)?;
            let workload = Workload {
                argv: debian_image::ARGV.iter().map(|s| s.to_string()).collect(),
                env: vec![
                    format!("PATH={}", debian_image::PATH_ENV),
                    "HOME=/root".into(),
                    "LANG=C.UTF-8".into(),
                ],
                first_line_prefix: debian_image::FIRST_LINE_PREFIX.into(),
            };
            (
                layout,
                workload,
                "Debian 12 + python3 + numpy + scipy (apt), command imports numpy and scipy"
                    .to_string(),
            )
        }
        Source::Synthetic(mib) => {
            let layout = image::build_layout(dir, &[synthetic(mib)?])?;
            let workload = Workload {
                argv: vec!["/bin/sh".into(), "-c".into(), "cat /etc/hello.txt".into()],
                env: vec!["PATH=/bin".into()],
                first_line_prefix: HELLO.into(),
            };
            (
                layout,
                workload,
                format!("busybox printing one file + {mib} MiB of random data"),
            )
        }
    };
    let base = layout.images.first().context("no image in the layout")?;
    let compressed = base.referenced_blobs().iter().map(|b| b.size).sum();
    let uncompressed = base.layers.iter().map(|l| l.uncompressed_size).sum();
    let layers = base.layers.len();
    let name = base.name.clone();
    Ok(Prepared {
        name,
        layout,
        workload,
        compressed,
        uncompressed,
        layers,
        describe,
    })
}

/// Base layer with a static busybox and the greeting, then `mib` MiB of incompressible
/// data in files of at most 64 MiB over four gzip layers.
fn synthetic(mib: u64) -> Result<ImageSpec> {
    let base = image::presets::busybox_base(HELLO)?;
    let mut layers = vec![base];
    let data_layers = 4u64;
    let mut left = mib * MIB;
    let mut seed = 4000;
    for l in 0..data_layers {
        let mut in_layer = left / (data_layers - l);
        left -= in_layer;
        let dir = format!("data/{l}");
        let mut files = vec![FileSpec::dir("data"), FileSpec::dir(dir.clone())];
        let mut n = 0;
        while in_layer > 0 {
            let len = in_layer.min(64 * MIB);
            in_layer -= len;
            files.push(FileSpec::random(format!("{dir}/blob-{n}.bin"), seed, len));
            seed += 1;
            n += 1;
        }
        layers.push(LayerSpec::gzip(files));
    }
    Ok(ImageSpec::new(BASE, layers))
}

/// The zstd variant of the prepared image: every layer decompressed and compressed again
/// by the `zstd` CLI (`zstd -3`, one frame per layer; skopeo 1.9 does not recompress gzip
/// to zstd), in a layout of its own under `dir`, named `zbase`. Returns the layout and
/// the image's compressed size (config + layers).
pub fn zstd_variant(prepared: &Prepared, dir: &Path) -> Result<(LayoutInfo, u64)> {
    const NAME: &str = "zbase";
    let base = prepared
        .layout
        .image(&prepared.name)
        .context("image in layout")?;
    let mut info = image::zstd_copy(&prepared.layout, base, dir, NAME)?;
    info.name = NAME.to_string();
    let compressed = info.referenced_blobs().iter().map(|b| b.size).sum();
    let layout = LayoutInfo {
        dir: dir.to_path_buf(),
        images: vec![info],
        indexes: Vec::new(),
    };
    Ok((layout, compressed))
}

/// Adds `n` images to the layout that share every layer of image `name` and differ only
/// in a comment appended to their config's last `Cmd` word (so each has its own manifest
/// digest, hence no startup trace yet); they are named `{name}-1` .. `{name}-n`.
pub fn add_variants(layout: &LayoutInfo, name: &str, n: usize) -> Result<Vec<String>> {
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let info = layout.image(name).context("image in layout")?;
    let read_json = |d: &imgd_core::Digest| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            layout.blob_path(d),
        )?)?)
    };
    let manifest = read_json(&info.manifest.digest)?;
    let config = read_json(&info.config.digest)?;
    let index_path = layout.dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let write_blob = |bytes: &[u8]| -> Result<(String, u64)> {
        let d = imgd_core::Digest::of(bytes);
        std::fs::write(layout.blob_path(&d), bytes)?;
        Ok((d.to_string(), bytes.len() as u64))
    };
    let mut names = Vec::new();
    for i in 1..=n {
        let mut c = config.clone();
        let cmd = c["config"]["Cmd"]
            .as_array_mut()
            .context("config without Cmd")?;
        let last = cmd.last_mut().context("empty Cmd")?;
        *last = format!("{} # variant {i}", last.as_str().unwrap_or_default()).into();
        let (digest, size) = write_blob(&serde_json::to_vec(&c)?)?;
        let mut m = manifest.clone();
        m["config"]["digest"] = digest.into();
        m["config"]["size"] = size.into();
        let (digest, size) = write_blob(&serde_json::to_vec(&m)?)?;
        let ref_name = format!("{name}-{i}");
        index["manifests"]
            .as_array_mut()
            .context("index.json manifests")?
            .push(serde_json::json!({
                "mediaType": info.manifest.media_type,
                "digest": digest,
                "size": size,
                "annotations": { REF_NAME: ref_name },
            }));
        names.push(ref_name);
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(names)
}
