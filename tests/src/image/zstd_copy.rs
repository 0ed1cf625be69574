//! A zstd copy of a built image: every layer decompressed and compressed again with the
//! `zstd` CLI, as `application/vnd.oci.image.layer.v1.tar+zstd`. The config (diff_ids of
//! the uncompressed tars) is unchanged, so the copy's rootfs is the original's.

use super::{ImageInfo, LayoutInfo};
use crate::media_types;
use anyhow::{bail, Context, Result};
use imgd_core::Digest;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Media type of a zstd OCI layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Writes an OCI layout at `dst` holding `image` of `layout` with zstd layers (`zstd -3`),
/// named `name`. Returns the image as written.
pub fn zstd_copy(
    layout: &LayoutInfo,
    image: &ImageInfo,
    dst: &Path,
    name: &str,
) -> Result<ImageInfo> {
    zstd_copy_with(layout, image, dst, name, &["-3"])
}

/// [`zstd_copy`] with the layers compressed by `zstd -q -c ARGS` (e.g. `--long=28` for a
/// 256 MiB window).
pub fn zstd_copy_with(
    layout: &LayoutInfo,
    image: &ImageInfo,
    dst: &Path,
    name: &str,
    zstd_args: &[&str],
) -> Result<ImageInfo> {
    let mut info = image.clone();
    let blobs = dst.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(dst.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let put = |bytes: &[u8]| -> Result<(Digest, u64)> {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes)?;
        Ok((d, bytes.len() as u64))
    };
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(layout.blob_path(&image.manifest.digest))?)?;
    put(&std::fs::read(layout.blob_path(&image.config.digest))?)?;
    let layers = manifest["layers"]
        .as_array_mut()
        .context("manifest without layers")?;
    for (i, layer) in layers.iter_mut().enumerate() {
        let digest: Digest = layer["digest"]
            .as_str()
            .context("layer without digest")?
            .parse()
            .map_err(|e| anyhow::anyhow!("layer digest: {e:?}"))?;
        let blob = std::fs::read(layout.blob_path(&digest))?;
        let tar = match layer["mediaType"].as_str() {
            Some(media_types::OCI_LAYER_GZIP) => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut out)?;
                out
            }
            Some(media_types::OCI_LAYER_TAR) => blob,
            other => bail!("cannot recompress a layer of type {other:?}"),
        };
        let (d, size) = put(&zstd(&tar, zstd_args)?)?;
        *layer = json!({"mediaType": OCI_LAYER_ZSTD, "digest": d.to_string(), "size": size});
        let blob = &mut info
            .layers
            .get_mut(i)
            .context("layer of the image info")?
            .blob;
        (blob.digest, blob.size, blob.media_type) = (d, size, OCI_LAYER_ZSTD.to_string());
    }
    let bytes = serde_json::to_vec(&manifest)?;
    let (d, size) = put(&bytes)?;
    info.manifest.digest = d;
    info.manifest.size = size;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_types::OCI_MANIFEST,
            "digest": d.to_string(),
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    });
    std::fs::write(dst.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(info)
}

/// `zstd -q -c ARGS` of `data`.
fn zstd(data: &[u8], args: &[&str]) -> Result<Vec<u8>> {
    let mut child = Command::new("zstd")
        .args(["-q", "-c"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running zstd (Debian's zstd, see .ci/setup)")?;
    let mut stdin = child.stdin.take().context("zstd stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("zstd writer panicked"))??;
    if !out.status.success() {
        bail!("zstd failed: {}", out.status);
    }
    Ok(out.stdout)
}
