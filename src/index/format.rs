//! The seekable layer index: types and the versioned, self-verifying binary encoding.
//!
//! Encoding (version 5), in two parts:
//! - the **main part**: `MAGIC` (8 bytes) | version (u16 LE) | body length (u32 LE) |
//!   inflated body length (u32 LE) | body: zstd(postcard([`LayerIndex`])) | sha256 of
//!   everything before it (32 bytes). It holds the file table and the checkpoints, each
//!   with the location and sha256 of its window;
//! - the **windows part**: the checkpoints' packed windows back to back, in checkpoint
//!   order ([`LayerIndex::windows_size`] bytes). Each is checked against the sha256 the
//!   main part gives it before it is used.
//!
//! The proxy stores both parts in one file (its sha256 is the index digest) and serves
//! them apart: an agent fetches the main part before a mount and each window when a read
//! first restarts at its checkpoint ([`crate::index::windows`]).

use crate::digest::{Digest, Sha256};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// First bytes of every encoded index.
pub const MAGIC: &[u8; 8] = b"IMGDIDX\0";
/// Bytes before the main part's body: magic, version, body length (compressed), body
/// length inflated.
pub const HEADER_LEN: usize = 18;
/// Largest inflated main part accepted (the builder's default `max_index_bytes`).
const MAX_MAIN_RAW: usize = 256 << 20;
/// Largest inflate ratio of a main part's body accepted.
const MAX_MAIN_RATIO: usize = 64;
const HEADER: usize = HEADER_LEN;
/// Current encoding version.
pub const INDEX_VERSION: u16 = 5;

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
    /// Where the up to 32 KiB of uncompressed output before `uncompressed_offset`,
    /// raw-deflated ([`crate::index::gzip::pack_window`]), is in the windows part; `None`
    /// when the restart needs no window (the blob start, zstd frames).
    pub window: Option<WindowRef>,
}

/// The location and digest of one checkpoint's packed window in the windows part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRef {
    /// Offset in the windows part.
    pub offset: u64,
    /// Length of the packed window (1..=[`crate::index::gzip::MAX_PACKED_WINDOW`]).
    pub len: u32,
    /// sha256 of the packed window.
    pub sha256: Digest,
}

impl WindowRef {
    /// The byte range of the window in the windows part.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }

    /// Whether `packed` is this window (its length and sha256).
    pub fn matches(&self, packed: &[u8]) -> bool {
        packed.len() == self.len as usize && Digest::of(packed) == self.sha256
    }
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
    /// Size of the windows part (0 for layers without windows: plain tar, zstd).
    pub windows_size: u64,
    /// The windows part, when this index has it in memory (built here, or decoded from
    /// both parts); `None` when only the main part was decoded, so windows are fetched
    /// as reads need them. Not part of the main part's encoding.
    #[serde(skip)]
    pub windows: Option<std::sync::Arc<[u8]>>,
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
    #[error("index windows part of {got} bytes, the main part says {want}")]
    WindowsSize { got: u64, want: u64 },
    #[error("window of checkpoint {checkpoint} does not match its sha256")]
    WindowDigest { checkpoint: usize },
}

impl LayerIndex {
    /// Encodes the main part, then the windows part if this index has it in memory. The
    /// digest of the returned bytes identifies the index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_main();
        if let Some(w) = &self.windows {
            out.extend_from_slice(w);
        }
        out
    }

    /// Encodes the main part only (what an agent fetches before a mount). Its body is
    /// zstd-compressed (level 3): file tables compress about 5 times.
    pub fn encode_main(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        let raw = postcard::to_allocvec(self).unwrap_or_default();
        let body = zstd::bulk::compress(&raw, 3).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + body.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
        let mut h = Sha256::new();
        h.update(&out);
        out.extend_from_slice(h.finish().as_bytes());
        out
    }

    /// Length in bytes of [`LayerIndex::encode_main`]'s output before its body is
    /// compressed (an upper bound of it, give or take zstd's few bytes), without encoding.
    pub fn encoded_len(&self) -> u64 {
        let size = postcard::ser_flavors::Size::default();
        let body = postcard::serialize_with_flavor(self, size).unwrap_or(usize::MAX);
        (HEADER + 32).saturating_add(body) as u64
    }

    /// Length of the main part of an encoded index, from its first [`HEADER_LEN`] bytes
    /// (the magic and version are checked, nothing else).
    pub fn main_len_in_header(head: &[u8]) -> Result<u64, IndexDecodeError> {
        if head.len() < MAGIC.len() {
            return Err(IndexDecodeError::Truncated);
        }
        if &head[..MAGIC.len()] != MAGIC {
            return Err(IndexDecodeError::Magic);
        }
        if head.len() < HEADER_LEN {
            return Err(IndexDecodeError::Truncated);
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != INDEX_VERSION {
            return Err(IndexDecodeError::Version(version));
        }
        let body = u32::from_le_bytes([head[10], head[11], head[12], head[13]]);
        Ok((HEADER_LEN + 32) as u64 + u64::from(body))
    }

    /// The sha256 that names an encoded main part: its trailer, if `main` is exactly one
    /// main part (by its header) whose trailer is the sha256 of the bytes before it. The
    /// proxy announces it, so that a main part from a peer is checked against it.
    pub fn main_part_digest(main: &[u8]) -> Option<Digest> {
        let total = Self::main_len(main).ok()?;
        if total != main.len() || total < HEADER_LEN + 32 {
            return None;
        }
        let (signed, trailer) = main.split_at(total - 32);
        let trailer: [u8; 32] = trailer.try_into().ok()?;
        (Digest::of(signed).as_bytes() == &trailer).then(|| Digest::from_bytes(trailer))
    }

    /// Length of the main part at the start of an encoded index, which must hold it.
    pub fn main_len(bytes: &[u8]) -> Result<usize, IndexDecodeError> {
        let total = Self::main_len_in_header(bytes)?;
        if (bytes.len() as u64) < total {
            return Err(IndexDecodeError::Truncated);
        }
        Ok(total as usize)
    }

    /// Decodes and verifies an encoded index: its main part alone (the windows are then
    /// fetched as needed), or both parts (every window is then checked against its
    /// sha256).
    pub fn decode(bytes: &[u8]) -> Result<LayerIndex, IndexDecodeError> {
        let total = Self::main_len(bytes)?;
        let (main, windows) = bytes.split_at(total);
        let (signed, trailer) = main.split_at(total - 32);
        if Digest::of(signed).as_bytes() != trailer {
            return Err(IndexDecodeError::Corrupt);
        }
        let raw_len = u32::from_le_bytes([main[14], main[15], main[16], main[17]]) as usize;
        let body = &signed[HEADER..];
        // Bounded before anything is allocated: a body inflates at most MAX_MAIN_RATIO
        // times (file tables compress about 5 times), and to at most MAX_MAIN_RAW bytes.
        if raw_len > MAX_MAIN_RAW || raw_len > body.len().saturating_mul(MAX_MAIN_RATIO) {
            return Err(IndexDecodeError::Invalid(format!(
                "main part of {} bytes claims {raw_len} bytes inflated",
                body.len()
            )));
        }
        let raw = zstd::bulk::decompress(body, raw_len)
            .map_err(|e| IndexDecodeError::Invalid(format!("main part does not inflate: {e}")))?;
        if raw.len() != raw_len {
            return Err(IndexDecodeError::Corrupt);
        }
        let (mut index, rest) = postcard::take_from_bytes::<LayerIndex>(&raw)?;
        if !rest.is_empty() {
            return Err(IndexDecodeError::Corrupt);
        }
        index.validate().map_err(IndexDecodeError::Invalid)?;
        if !windows.is_empty() {
            index.attach_windows(windows.into())?;
        }
        Ok(index)
    }

    /// Attaches the windows part, checking its size and every window's sha256.
    pub fn attach_windows(
        &mut self,
        windows: std::sync::Arc<[u8]>,
    ) -> Result<(), IndexDecodeError> {
        if windows.len() as u64 != self.windows_size {
            return Err(IndexDecodeError::WindowsSize {
                got: windows.len() as u64,
                want: self.windows_size,
            });
        }
        for (i, cp) in self.checkpoints.iter().enumerate() {
            if let Some(w) = &cp.window {
                let r = w.range();
                if !w.matches(&windows[r.start as usize..r.end as usize]) {
                    return Err(IndexDecodeError::WindowDigest { checkpoint: i });
                }
            }
        }
        self.windows = Some(windows);
        Ok(())
    }

    /// The packed window of checkpoint `i` from the windows part in memory: `Some(empty)`
    /// if it has none, `None` if it has one that is not in memory.
    pub fn loaded_window(&self, i: usize) -> Option<&[u8]> {
        let cp = self.checkpoints.get(i)?;
        let Some(w) = &cp.window else {
            return Some(&[]);
        };
        let r = w.range();
        self.windows
            .as_deref()?
            .get(r.start as usize..r.end as usize)
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
                window: None,
            }],
            copy: None,
            toc: None,
            windows_size: 0,
            windows: None,
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
