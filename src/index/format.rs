//! The seekable layer index: types and the versioned, self-verifying binary encoding.
//!
//! Encoding: `MAGIC` (8 bytes) | version (u16 LE) | postcard([`LayerIndex`]) | sha256 of
//! everything before it (32 bytes). The sha256 of the whole encoding is the index digest.

use crate::digest::{Digest, Sha256};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// First bytes of every encoded index.
pub const MAGIC: &[u8; 8] = b"IMGDIDX\0";
/// Current encoding version.
pub const INDEX_VERSION: u16 = 4;

/// How a layer blob is compressed, detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Plain tar: any offset is directly readable.
    None,
    /// gzip: readable from the nearest [`Checkpoint`].
    Gzip,
    /// zstd: readable from frame starts ([`Checkpoint`]s with no window), the layer's
    /// own frames when they are small (zstd:chunked, see [`crate::index::zstd_layer`]),
    /// else those of its seekable copy ([`LayerIndex::copy`], [`crate::index::zstd_copy`]).
    Zstd,
}

impl Compression {
    /// Detects the compression from a blob's first bytes (at least 4 are needed).
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// A point where decompression can restart: in a gzip stream, a deflate block boundary
/// with its window (zran's technique); in a zstd stream, a frame start (`bits` 0, empty
/// window: zstd frames are independent). Which one is told by [`LayerIndex::compression`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset in the compressed blob of the first byte not yet fully consumed.
    pub compressed_offset: u64,
    /// Number of bits (0..=7) of the byte before `compressed_offset` that belong to the
    /// next deflate block; 0 means the block starts at `compressed_offset` exactly.
    pub bits: u8,
    /// Offset in the uncompressed (tar) stream that inflation resumes at.
    pub uncompressed_offset: u64,
    /// The up to 32 KiB of uncompressed output before `uncompressed_offset`, raw-deflated
    /// ([`crate::index::gzip::pack_window`]); empty when the restart needs no window.
    #[serde(with = "serde_bytes_vec")]
    pub window: Vec<u8>,
}

/// Type of a tar entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A hard link; `link_target` names the entry it links to.
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One data extent of a sparse file: `length` bytes at logical `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseExtent {
    pub offset: u64,
    pub length: u64,
}

/// One tar entry of a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalised relative path (no leading `/` or `./`, no `.` or `..` components, no
    /// trailing `/`). Raw bytes: tar names need not be UTF-8. Whiteouts keep their names.
    #[serde(with = "serde_bytes_vec")]
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Logical size in bytes (for sparse files, the full size including holes).
    pub size: u64,
    /// Modification time, seconds since the epoch, and nanoseconds (from PAX `mtime`).
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Symlink target as written, or hard link target as a normalised path.
    #[serde(with = "serde_bytes_opt")]
    pub link_target: Option<Vec<u8>>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes (from PAX `SCHILY.xattr.*`).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Offset of the entry's stored content in the uncompressed stream.
    pub content_offset: u64,
    /// For sparse files, the data extents in order; their bytes are stored back to back
    /// from `content_offset`. Empty for ordinary files.
    pub sparse: Vec<SparseExtent>,
}

impl Entry {
    /// Bytes of content stored in the archive (for sparse files, the extents only).
    pub fn stored_size(&self) -> u64 {
        if self.sparse.is_empty() {
            if self.kind == EntryKind::File {
                self.size
            } else {
                0
            }
        } else {
            self.sparse.iter().map(|e| e.length).sum()
        }
    }

    /// The path as text, lossily converted for display.
    pub fn path_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.path)
    }
}

/// The seekable index of one layer blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    /// Digest of the layer blob this index describes.
    pub layer: Digest,
    pub compression: Compression,
    /// Size of the compressed blob.
    pub compressed_size: u64,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
    /// False when files cannot be read at random offsets.
    pub random_access: bool,
    /// Tar entries in archive order.
    pub entries: Vec<Entry>,
    /// Restart checkpoints (gzip and zstd), ordered by offset. The first is at offset 0.
    /// For a layer with a seekable copy, their compressed offsets are in the copy.
    pub checkpoints: Vec<Checkpoint>,
    /// The derived seekable copy that reads of a plain zstd layer use (its digest, size
    /// and chunks), `None` when reads use the layer blob itself.
    pub copy: Option<crate::index::zstd_copy::SeekableCopy>,
    /// The zstd:chunked TOC that was checked against the stream, if the layer has one.
    pub toc: Option<crate::index::zstd_chunked::TocBinding>,
}

/// Error decoding an encoded index.
#[derive(Debug, thiserror::Error)]
pub enum IndexDecodeError {
    #[error("not an imgd index (bad magic)")]
    Magic,
    #[error("unsupported index version {0} (this build reads version {INDEX_VERSION})")]
    Version(u16),
    #[error("index is truncated")]
    Truncated,
    #[error("index digest mismatch: its trailing sha256 does not match its contents")]
    Corrupt,
    #[error("malformed index body: {0}")]
    Body(#[from] postcard::Error),
    #[error("inconsistent index: {0}")]
    Invalid(String),
}

impl LayerIndex {
    /// Encodes the index. The digest of the returned bytes identifies it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        // Serialising plain data into a Vec cannot fail.
        out = postcard::to_extend(self, out).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(&out);
        out.extend_from_slice(h.finish().as_bytes());
        out
    }

    /// Length in bytes of [`LayerIndex::encode`]'s output, without encoding.
    pub fn encoded_len(&self) -> u64 {
        let size = postcard::ser_flavors::Size::default();
        let body = postcard::serialize_with_flavor(self, size).unwrap_or(usize::MAX);
        (MAGIC.len() + 2 + 32).saturating_add(body) as u64
    }

    /// Decodes and verifies an encoded index.
    pub fn decode(bytes: &[u8]) -> Result<LayerIndex, IndexDecodeError> {
        if bytes.len() < MAGIC.len() {
            return Err(IndexDecodeError::Truncated);
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(IndexDecodeError::Magic);
        }
        if bytes.len() < MAGIC.len() + 2 + 32 {
            return Err(IndexDecodeError::Truncated);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != INDEX_VERSION {
            return Err(IndexDecodeError::Version(version));
        }
        let (signed, trailer) = bytes.split_at(bytes.len() - 32);
        if Digest::of(signed).as_bytes() != trailer {
            return Err(IndexDecodeError::Corrupt);
        }
        let (index, rest) = postcard::take_from_bytes::<LayerIndex>(&signed[10..])?;
        if !rest.is_empty() {
            return Err(IndexDecodeError::Corrupt);
        }
        index.validate().map_err(IndexDecodeError::Invalid)?;
        Ok(index)
    }

    /// The entry with the given normalised path, if any (last one wins, as in tar).
    pub fn find(&self, path: &[u8]) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.path == path)
    }
}

/// Serialises `Vec<u8>` as a byte string (compact in postcard, readable in JSON).
mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        <Vec<u8>>::deserialize(d)
    }
}

mod serde_bytes_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&serde_bytes_ref(b)),
            None => s.serialize_none(),
        }
    }

    struct BytesRef<'a>(&'a [u8]);
    fn serde_bytes_ref(b: &[u8]) -> BytesRef<'_> {
        BytesRef(b)
    }
    impl serde::Serialize for BytesRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        <Option<Vec<u8>>>::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerIndex {
        LayerIndex {
            layer: Digest::of(b"layer"),
            compression: Compression::Gzip,
            compressed_size: 10,
            uncompressed_size: 2048,
            random_access: true,
            entries: vec![Entry {
                path: b"etc/passwd".to_vec(),
                kind: EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 5,
                mtime: 1,
                mtime_nsec: 0,
                link_target: None,
                dev_major: 0,
                dev_minor: 0,
                xattrs: BTreeMap::from([("user.a".to_string(), b"b".to_vec())]),
                content_offset: 512,
                sparse: vec![],
            }],
            checkpoints: vec![Checkpoint {
                compressed_offset: 0,
                bits: 0,
                uncompressed_offset: 0,
                window: vec![],
            }],
            copy: None,
            toc: None,
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let idx = sample();
        let enc = idx.encode();
        assert_eq!(LayerIndex::decode(&enc).unwrap(), idx);
        let mut bad = enc.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(matches!(
            LayerIndex::decode(&bad),
            Err(IndexDecodeError::Corrupt)
        ));
        assert!(matches!(
            LayerIndex::decode(&enc[..20]),
            Err(IndexDecodeError::Corrupt | IndexDecodeError::Truncated)
        ));
        assert!(matches!(
            LayerIndex::decode(b"garbage!garbage!"),
            Err(IndexDecodeError::Magic)
        ));
    }
}
