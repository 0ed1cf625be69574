//! zstd:chunked layers (containers/storage `pkg/chunked`): the footer, the TOC, and the
//! check of the TOC against the stream the index was built from.
//!
//! A zstd:chunked blob is an ordinary zstd stream of the layer's tar, written so that
//! every regular file's content starts a new frame (and large contents are cut into
//! frames at rolling-checksum boundaries), followed by three skippable frames:
//! - the TOC: zstd-compressed JSON, one entry per tar entry (`type`, `name`, `mode`,
//!   `size`, `uid`, `gid`, `linkName`, `digest` of the content, `offset`/`endOffset` of
//!   its frames in the blob) plus `chunk` entries (`chunkOffset` in the file, `offset` of
//!   its frame);
//! - the tar-split data (not used here);
//! - the footer, 64 bytes of little-endian u64: TOC offset, compressed and uncompressed
//!   length, manifest type (1), the tar-split's offset and lengths, and the magic
//!   `GNUlInUx` (40 bytes in the first version, without the tar-split fields). (The layer annotations `io.github.containers.zstd-chunked.manifest-position`
//!   and `manifest-checksum` repeat the TOC's position and sha256.)
//!
//! imgd builds the layer's file table from the stream, as for any layer, and reads from
//! the layer's own frames. The TOC is not trusted for anything: it is checked
//! ([`verify`]) against what the stream holds, entry by entry, with every file's sha256,
//! and a layer whose TOC disagrees is not indexed (it takes the full path).

use crate::digest::{Digest, Sha256};
use crate::index::format::{Entry, EntryKind};
use crate::index::tar::normalize;
use serde::{Deserialize, Serialize};

/// The footer's magic, its last 8 bytes (containers/storage's constant; the first
/// versions, as in Debian's podman 4.3, wrote `GnUlInUx`).
pub const FOOTER_MAGICS: [&[u8; 8]; 2] = [b"GNUlInUx", b"GnUlInUx"];
/// Footer sizes: today's, and the first version's (without the tar-split fields).
pub const FOOTER_SIZES: [usize; 2] = [64, 40];
/// The TOC's manifest type (CRFS-style JSON).
const MANIFEST_TYPE_CRFS: u64 = 1;
/// The skippable frame header before the TOC bytes.
const SKIPPABLE_HEADER: u64 = 8;

/// The TOC of a zstd:chunked layer, as its index binds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocBinding {
    /// sha256 of the compressed TOC (the `manifest-checksum` annotation).
    pub digest: Digest,
    /// Offset of the compressed TOC in the blob (the annotation's first number).
    pub offset: u64,
    /// Its compressed length.
    pub size: u64,
    /// Number of TOC entries checked (files, directories, links... and chunks).
    pub entries: u64,
}

/// Why a zstd:chunked layer's TOC was not accepted.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZstdChunkedError {
    #[error("zstd:chunked footer: {0}")]
    Footer(String),
    #[error("zstd:chunked TOC of {size} bytes exceeds the limit of {limit} bytes")]
    TocTooLarge { size: u64, limit: u64 },
    #[error("zstd:chunked TOC is unreadable: {0}")]
    Toc(String),
    #[error("zstd:chunked TOC disagrees with the stream at '{path}': {what}")]
    Mismatch { path: String, what: String },
    #[error("zstd:chunked TOC has {toc} entries, the stream {stream}")]
    Count { toc: usize, stream: usize },
}

/// What the footer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub toc_offset: u64,
    pub toc_size: u64,
    pub toc_uncompressed: u64,
    pub manifest_type: u64,
}

/// The footer in the content of a blob's last skippable frame; `None` if that content
/// is no zstd:chunked footer (a plain multi-frame zstd layer).
pub fn parse_footer(content: &[u8]) -> Option<Footer> {
    if !FOOTER_SIZES.contains(&content.len())
        || !FOOTER_MAGICS.iter().any(|m| content.ends_with(*m))
    {
        return None;
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&content[8 * i..8 * i + 8]);
        u64::from_le_bytes(b)
    };
    Some(Footer {
        toc_offset: word(0),
        toc_size: word(1),
        toc_uncompressed: word(2),
        manifest_type: word(3),
    })
}

/// A skippable frame the builder kept: its start offset and captured content.
pub struct Skippable {
    pub start: u64,
    pub size: u64,
    pub content: Option<Vec<u8>>,
}

/// What the stream holds, to check the TOC against.
pub struct Stream<'a> {
    pub entries: &'a [Entry],
    /// `(compressed, uncompressed)` offset of every frame boundary, ascending.
    pub boundaries: &'a [(u64, u64)],
    /// sha256 of each regular file's content, by entry index, ascending.
    pub digests: &'a [(usize, Digest)],
}

impl Stream<'_> {
    fn uncompressed_at(&self, compressed: u64) -> Option<u64> {
        let i = self
            .boundaries
            .binary_search_by_key(&compressed, |b| b.0)
            .ok()?;
        Some(self.boundaries[i].1)
    }
}

#[derive(Deserialize)]
struct Toc {
    version: u32,
    #[serde(default)]
    entries: Vec<TocEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    uid: i64,
    #[serde(default)]
    gid: i64,
    #[serde(default)]
    dev_major: i64,
    #[serde(default)]
    dev_minor: i64,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    end_offset: i64,
    #[serde(default)]
    chunk_offset: i64,
}

/// One TOC entry with the chunks that follow it.
struct Item<'a> {
    path: Vec<u8>,
    entry: &'a TocEntry,
    chunks: Vec<&'a TocEntry>,
}

/// Checks the TOC the footer points at against the stream; see the module docs.
/// `limit` bounds the TOC's compressed and uncompressed sizes.
pub fn verify(
    footer: &Footer,
    skippable: &[Skippable],
    limit: u64,
    stream: &Stream<'_>,
) -> Result<TocBinding, ZstdChunkedError> {
    if footer.manifest_type != MANIFEST_TYPE_CRFS {
        return Err(ZstdChunkedError::Footer(format!(
            "unknown manifest type {}",
            footer.manifest_type
        )));
    }
    let size = footer.toc_size.max(footer.toc_uncompressed);
    if size > limit {
        return Err(ZstdChunkedError::TocTooLarge { size, limit });
    }
    let frame = skippable
        .iter()
        .find(|s| s.start.checked_add(SKIPPABLE_HEADER) == Some(footer.toc_offset))
        .filter(|s| s.size == footer.toc_size)
        .ok_or_else(|| {
            ZstdChunkedError::Footer(format!(
                "no skippable frame of {} bytes at offset {} after the data frames",
                footer.toc_size, footer.toc_offset
            ))
        })?;
    let compressed = frame
        .content
        .as_deref()
        .ok_or(ZstdChunkedError::TocTooLarge { size, limit })?;
    let json = zstd::bulk::decompress(compressed, footer.toc_uncompressed as usize)
        .map_err(|e| ZstdChunkedError::Toc(format!("not zstd: {e}")))?;
    if json.len() as u64 != footer.toc_uncompressed {
        return Err(ZstdChunkedError::Toc(format!(
            "{} bytes uncompressed, the footer says {}",
            json.len(),
            footer.toc_uncompressed
        )));
    }
    let toc: Toc =
        serde_json::from_slice(&json).map_err(|e| ZstdChunkedError::Toc(e.to_string()))?;
    if toc.version != 1 {
        return Err(ZstdChunkedError::Toc(format!("version {}", toc.version)));
    }
    let items = group(&toc.entries)?;
    if items.len() != stream.entries.len() {
        return Err(ZstdChunkedError::Count {
            toc: items.len(),
            stream: stream.entries.len(),
        });
    }
    // Pair by path (duplicates in order): the TOC's order need not be the tar's.
    let mut ours: Vec<usize> = (0..stream.entries.len()).collect();
    ours.sort_by(|&a, &b| stream.entries[a].path.cmp(&stream.entries[b].path));
    let mut theirs: Vec<&Item<'_>> = items.iter().collect();
    theirs.sort_by(|a, b| a.path.cmp(&b.path));
    for (&i, item) in ours.iter().zip(theirs) {
        check_entry(stream, i, item)?;
    }
    Ok(TocBinding {
        digest: Digest::of(compressed),
        offset: footer.toc_offset,
        size: footer.toc_size,
        entries: toc.entries.len() as u64,
    })
}

/// TOC entries with their chunk entries; entries the tar scanner drops (the root `./`)
/// are dropped too.
fn group(entries: &[TocEntry]) -> Result<Vec<Item<'_>>, ZstdChunkedError> {
    let mut items: Vec<Item<'_>> = Vec::with_capacity(entries.len());
    for t in entries {
        let path = normalize(t.name.as_bytes(), 0).map_err(|_| mismatch(&t.name, "unsafe path"))?;
        if t.kind == "chunk" {
            match items.last_mut() {
                Some(prev) if prev.path == path && prev.entry.kind == "reg" => prev.chunks.push(t),
                _ => return Err(mismatch(&t.name, "chunk entry without its file")),
            }
        } else if !path.is_empty() {
            items.push(Item {
                path,
                entry: t,
                chunks: Vec::new(),
            });
        }
    }
    Ok(items)
}

fn mismatch(path: &str, what: &str) -> ZstdChunkedError {
    ZstdChunkedError::Mismatch {
        path: path.to_string(),
        what: what.to_string(),
    }
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::File => "reg",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::CharDevice => "char",
        EntryKind::BlockDevice => "block",
        EntryKind::Fifo => "fifo",
    }
}

fn check_entry(stream: &Stream<'_>, i: usize, item: &Item<'_>) -> Result<(), ZstdChunkedError> {
    let e = &stream.entries[i];
    let t = item.entry;
    let bad = |what: String| Err(mismatch(&e.path_lossy(), &what));
    if item.path != e.path {
        return bad(format!("the TOC names '{}' here", t.name));
    }
    if t.kind != kind_name(e.kind) {
        return bad(format!(
            "type {} in the TOC, {} in the tar",
            t.kind,
            kind_name(e.kind)
        ));
    }
    let same = |a: i64, b: u64| u64::try_from(a).is_ok_and(|a| a == b);
    if e.kind != EntryKind::Hardlink
        && !(same(t.mode & 0o7777, u64::from(e.mode)) && same(t.uid, e.uid) && same(t.gid, e.gid))
    {
        return bad("mode, uid or gid differ".into());
    }
    let link = match e.kind {
        EntryKind::Symlink => Some(t.link_name.as_bytes().to_vec()),
        EntryKind::Hardlink => normalize(t.link_name.as_bytes(), 0).ok(),
        _ => None,
    };
    if link.is_some() && link.as_deref() != e.link_target.as_deref() {
        return bad("link target differs".into());
    }
    if matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice)
        && !(same(t.dev_major, u64::from(e.dev_major)) && same(t.dev_minor, u64::from(e.dev_minor)))
    {
        return bad("device numbers differ".into());
    }
    if e.kind != EntryKind::File {
        return Ok(());
    }
    if !same(t.size, e.size) {
        return bad(format!("size {} in the TOC, {} in the tar", t.size, e.size));
    }
    if e.size == 0 || !e.sparse.is_empty() {
        return Ok(());
    }
    let ours = stream
        .digests
        .binary_search_by_key(&i, |d| d.0)
        .ok()
        .map(|k| stream.digests[k].1);
    if ours.map(|d| d.to_string()).as_deref() != Some(t.digest.as_str()) {
        return bad("the content's sha256 is not the TOC's digest".into());
    }
    let at = |compressed: i64| {
        u64::try_from(compressed)
            .ok()
            .and_then(|c| stream.uncompressed_at(c))
    };
    let end = e.content_offset + e.size;
    if at(t.offset) != Some(e.content_offset) || at(t.end_offset) != Some(end) {
        return bad("offset or endOffset is not the frame boundary of the content".into());
    }
    let mut prev = 0;
    for c in &item.chunks {
        let inside = u64::try_from(c.chunk_offset)
            .ok()
            .filter(|&o| o > prev && o < e.size);
        match inside {
            Some(o) if at(c.offset) == Some(e.content_offset + o) => prev = o,
            _ => {
                return bad(format!(
                    "chunk at {} is not a frame of the content",
                    c.chunk_offset
                ))
            }
        }
    }
    Ok(())
}

/// sha256 of each regular file's content as the tar stream passes, for [`verify`].
#[derive(Default)]
pub struct ContentHasher {
    pos: u64,
    seen: usize,
    queue: std::collections::VecDeque<(usize, u64, u64)>,
    current: Option<Sha256>,
    digests: Vec<(usize, Digest)>,
}

impl ContentHasher {
    /// Hashes `out`, the next bytes of the tar stream; `entries` are the scanner's
    /// entries after it consumed `out`.
    pub fn consume(&mut self, out: &[u8], entries: &[Entry]) {
        for (i, e) in entries.iter().enumerate().skip(self.seen) {
            if e.kind == EntryKind::File && e.sparse.is_empty() && e.size > 0 {
                self.queue.push_back((
                    i,
                    e.content_offset,
                    e.content_offset.saturating_add(e.size),
                ));
            }
        }
        self.seen = entries.len();
        let (s, t) = (self.pos, self.pos + out.len() as u64);
        while let Some(&(i, a, b)) = self.queue.front() {
            if a >= t {
                break;
            }
            let (lo, hi) = (a.max(s), b.min(t));
            if lo < hi {
                let h = self.current.get_or_insert_with(Sha256::new);
                h.update(&out[(lo - s) as usize..(hi - s) as usize]);
            }
            if b > t {
                break;
            }
            let h = self.current.take().unwrap_or_default();
            self.digests.push((i, h.finish()));
            self.queue.pop_front();
        }
        self.pos = t;
    }

    /// The digests of the contents that ended so far, by entry index.
    pub fn digests(&self) -> &[(usize, Digest)] {
        &self.digests
    }
}
