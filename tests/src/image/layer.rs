//! Writing layer tars (and their gzip blobs) from [`LayerSpec`]s.

use std::fs::Permissions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use imgd_core::{Digest, Sha256};
use tar::{Builder, EntryType, Header};

use super::{layout::BlobInfo, Compression, EntryKind, FileSpec, LayerSpec};
use crate::media_types;

/// A layer written into a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The blob as stored and pushed (compressed for gzip layers).
    pub blob: BlobInfo,
    /// sha256 of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The blob's compression.
    pub compression: Compression,
}

/// Writes the uncompressed tar of `spec` to `out` and returns `out`. Deterministic: the same
/// spec always gives the same bytes.
pub fn write_layer_tar<W: Write>(spec: &LayerSpec, out: W) -> Result<W> {
    let mut builder = Builder::new(out);
    for file in &spec.files {
        append_entry(&mut builder, file).with_context(|| format!("tar entry {}", file.path))?;
    }
    builder.into_inner().context("finishing tar")
}

fn append_entry<W: Write>(builder: &mut Builder<W>, file: &FileSpec) -> io::Result<()> {
    if !file.xattrs.is_empty() {
        let keys: Vec<String> = file
            .xattrs
            .iter()
            .map(|(name, _)| format!("SCHILY.xattr.{name}"))
            .collect();
        let records = keys
            .iter()
            .zip(&file.xattrs)
            .map(|(k, (_, v))| (k.as_str(), v.as_slice()));
        builder.append_pax_extensions(records)?;
    }
    let mut header = Header::new_gnu();
    header.set_mode(file.mode);
    header.set_uid(file.uid);
    header.set_gid(file.gid);
    header.set_mtime(file.mtime);
    header.set_size(0);
    let path = file.tar_path();
    match &file.kind {
        EntryKind::File(content) => {
            header.set_entry_type(EntryType::Regular);
            header.set_size(content.len());
            builder.append_data(&mut header, &path, content.reader())
        }
        EntryKind::Dir => {
            header.set_entry_type(EntryType::Directory);
            builder.append_data(&mut header, &path, io::empty())
        }
        EntryKind::Symlink(target) => {
            header.set_entry_type(EntryType::Symlink);
            builder.append_link(&mut header, &path, target)
        }
        EntryKind::Hardlink(target) => {
            header.set_entry_type(EntryType::Link);
            builder.append_link(&mut header, &path, target)
        }
        EntryKind::Fifo => {
            header.set_entry_type(EntryType::Fifo);
            builder.append_data(&mut header, &path, io::empty())
        }
        EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
            let kind = match file.kind {
                EntryKind::CharDevice { .. } => EntryType::Char,
                _ => EntryType::Block,
            };
            header.set_entry_type(kind);
            header.set_device_major(*major)?;
            header.set_device_minor(*minor)?;
            builder.append_data(&mut header, &path, io::empty())
        }
        EntryKind::Whiteout | EntryKind::OpaqueWhiteout => {
            header.set_entry_type(EntryType::Regular);
            builder.append_data(&mut header, &path, io::empty())
        }
    }
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The inner writer, the digest and the byte count of everything written.
    pub(crate) fn finish(self) -> (W, Digest, u64) {
        (self.inner, self.hasher.finish(), self.count)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the layer blob of `spec` into `blobs_dir` (a layout's `blobs/sha256`), named by
/// its digest.
pub(crate) fn write_layer_blob(blobs_dir: &Path, spec: &LayerSpec) -> Result<LayerInfo> {
    let tmp = tempfile::NamedTempFile::new_in(blobs_dir).context("temporary layer file")?;
    let file = tmp
        .as_file()
        .try_clone()
        .context("duplicating layer file handle")?;
    let blob_writer = HashWriter::new(BufWriter::new(file));
    let (blob_writer, diff_id, uncompressed_size) = match spec.compression {
        Compression::Gzip => {
            let gz = GzEncoder::new(blob_writer, flate2::Compression::default());
            let tar = write_layer_tar(spec, HashWriter::new(gz))?;
            let (gz, diff_id, size) = tar.finish();
            (gz.finish().context("finishing gzip")?, diff_id, size)
        }
        Compression::Uncompressed => {
            let tar = write_layer_tar(spec, HashWriter::new(blob_writer))?;
            let (inner, diff_id, size) = tar.finish();
            (inner, diff_id, size)
        }
    };
    let (buf, digest, size) = blob_writer.finish();
    buf.into_inner()
        .map_err(|e| e.into_error())
        .context("flushing layer blob")?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(0o644))
        .context("layer blob permissions")?;
    tmp.persist(blobs_dir.join(digest.hex()))
        .context("naming layer blob")?;
    let media_type = match spec.compression {
        Compression::Gzip => media_types::OCI_LAYER_GZIP,
        Compression::Uncompressed => media_types::OCI_LAYER_TAR,
    };
    Ok(LayerInfo {
        blob: BlobInfo {
            digest,
            size,
            media_type: media_type.to_owned(),
        },
        diff_id,
        uncompressed_size,
        compression: spec.compression,
    })
}
