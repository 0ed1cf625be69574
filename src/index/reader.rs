//! Random reads of a layer's tar stream (and of the files in it) through its index.
//!
//! Reading is two-step so callers can fetch exactly the chunks needed: [`plan_read`]
//! maps an uncompressed range to the compressed blob range to fetch (and the checkpoint
//! to restart at); [`read_range`] inflates those bytes. [`read_file`] does both for a
//! file's logical range, handling sparse files, with a fetch callback.
//!
//! For gzip the compressed range runs from the last checkpoint at or before the start to
//! the first checkpoint at or after the end (or the blob end): inflating the bytes up to a
//! checkpoint's `compressed_offset` is exactly what produced its `uncompressed_offset`
//! bytes when the index was built, so no extra margin is needed.
//!
//! zstd is read the same way, with frame starts as checkpoints (no window, `bits` 0):
//! the range runs from the last frame start at or before the start to the first frame
//! start at or after the end, in the blob [`LayerIndex::readable_blob`] names (the
//! seekable copy of a plain zstd layer). Callers fetch byte ranges of that blob and need
//! not know which kind of checkpoint they restart from.

use crate::index::format::{Compression, Entry, EntryKind, LayerIndex, WindowRef};
// `input_start` of a zstd frame start (`bits` 0) is its offset.
use crate::index::gzip::{inflate_from_checkpoint, input_start, GzipError};
use crate::index::zstd::{decode_from_frame, ZstdError, DEFAULT_MAX_WINDOW_LOG};
use std::ops::Range;

/// Error reading through an index.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The layer cannot be read at random offsets (an index without checkpoints).
    #[error("layer is not randomly readable (its index has no restart points)")]
    NotRandomAccess,
    /// The entry has no readable content.
    #[error("{path:?} is not a regular file")]
    NotAFile { path: String },
    /// The index is inconsistent with the request.
    #[error("invalid index or plan: {0}")]
    BadIndex(String),
    /// The compressed bytes passed do not match the plan.
    #[error("expected {expected} compressed bytes for the planned range, got {got}")]
    InputLength { expected: u64, got: u64 },
    /// Inflation failed.
    #[error(transparent)]
    Gzip(#[from] GzipError),
    /// zstd decoding failed.
    #[error(transparent)]
    Zstd(#[from] ZstdError),
    /// The fetch callback failed.
    #[error("fetching compressed bytes failed: {0}")]
    Fetch(Box<dyn std::error::Error + Send + Sync>),
    /// The window of a checkpoint is not in memory and no way to fetch it was given.
    #[error("the window of checkpoint {checkpoint} is not loaded")]
    WindowMissing { checkpoint: usize },
    /// The window fetched for a checkpoint is not the one its index names (never used).
    #[error("the window of checkpoint {checkpoint} does not match its sha256 in the index")]
    WindowMismatch { checkpoint: usize },
    /// Fetching a checkpoint's window failed.
    #[error("fetching the window of checkpoint {checkpoint} failed: {message}")]
    WindowFetch { checkpoint: usize, message: String },
}

/// How to read one uncompressed range: fetch the bytes `compressed` of the readable blob
/// ([`LayerIndex::readable_blob`]), restart at `checkpoint` (gzip or zstd), and discard
/// the first `skip` bytes of output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    /// Index into `LayerIndex::checkpoints` (gzip, zstd), `None` for plain tar or empty reads.
    pub checkpoint: Option<usize>,
    /// Blob byte range to fetch and pass to [`read_range`].
    pub compressed: Range<u64>,
    /// Output bytes to discard before the requested range begins.
    pub skip: u64,
}

/// Plans reading `len` bytes at `offset` of the uncompressed stream (clamped to its end).
pub fn plan_read(index: &LayerIndex, offset: u64, len: u64) -> Result<ReadPlan, ReadError> {
    if !index.random_access {
        return Err(ReadError::NotRandomAccess);
    }
    let end = offset.saturating_add(len).min(index.uncompressed_size);
    if offset >= end {
        return Ok(ReadPlan {
            checkpoint: None,
            compressed: 0..0,
            skip: 0,
        });
    }
    if index.compression == Compression::None {
        return Ok(ReadPlan {
            checkpoint: None,
            compressed: offset..end,
            skip: 0,
        });
    }
    let cps = &index.checkpoints;
    let i = cps
        .partition_point(|c| c.uncompressed_offset <= offset)
        .checked_sub(1)
        .ok_or_else(|| ReadError::BadIndex("index without a checkpoint at 0".into()))?;
    let j = cps.partition_point(|c| c.uncompressed_offset < end);
    let start = input_start(&cps[i]);
    let readable = index.readable_blob().1;
    let stop = cps
        .get(j)
        .map_or(readable, |c| c.compressed_offset)
        .min(readable);
    if stop < start {
        return Err(ReadError::BadIndex("checkpoints out of order".into()));
    }
    Ok(ReadPlan {
        checkpoint: Some(i),
        compressed: start..stop,
        skip: offset - cps[i].uncompressed_offset,
    })
}

/// Reads up to `len` bytes following `plan`, given exactly the blob bytes of
/// `plan.compressed` and the packed window of the plan's checkpoint (empty if it has
/// none), which is checked against its sha256 before use. Fewer bytes are returned only
/// at the end of the stream.
pub fn read_range(
    index: &LayerIndex,
    plan: &ReadPlan,
    compressed: &[u8],
    window: &[u8],
    len: usize,
) -> Result<Vec<u8>, ReadError> {
    let expected = plan.compressed.end.saturating_sub(plan.compressed.start);
    if compressed.len() as u64 != expected {
        return Err(ReadError::InputLength {
            expected,
            got: compressed.len() as u64,
        });
    }
    match index.compression {
        Compression::None => Ok(compressed[..len.min(compressed.len())].to_vec()),
        Compression::Gzip | Compression::Zstd => {
            let Some(i) = plan.checkpoint else {
                return Ok(Vec::new());
            };
            let cp = index
                .checkpoints
                .get(i)
                .ok_or_else(|| ReadError::BadIndex(format!("no checkpoint {i}")))?;
            if input_start(cp) != plan.compressed.start {
                return Err(ReadError::BadIndex(
                    "plan does not start at its checkpoint".into(),
                ));
            }
            let left = index
                .uncompressed_size
                .saturating_sub(cp.uncompressed_offset.saturating_add(plan.skip));
            let want = len.min(usize::try_from(left).unwrap_or(usize::MAX));
            if index.compression == Compression::Zstd {
                let out = decode_from_frame(compressed, plan.skip, want, DEFAULT_MAX_WINDOW_LOG)?;
                if out.len() < want {
                    return Err(ZstdError::NeedMoreInput {
                        produced: out.len(),
                        wanted: want,
                    }
                    .into());
                }
                return Ok(out);
            }
            if !cp.window.map_or(window.is_empty(), |w| w.matches(window)) {
                return Err(ReadError::WindowMismatch { checkpoint: i });
            }
            let out = inflate_from_checkpoint(cp, window, compressed, plan.skip, want)?;
            if out.len() < want {
                return Err(GzipError::NeedMoreInput {
                    produced: out.len(),
                    wanted: want,
                }
                .into());
            }
            Ok(out)
        }
    }
}

/// Reads `len` bytes at `offset` of the uncompressed (tar) stream, truncated at its end,
/// fetching the planned compressed range with `fetch` (which must return exactly the
/// blob bytes of the range it is given). Windows come from the index's windows part in
/// memory ([`ReadError::WindowMissing`] if it is not there; see [`read_stored_with`]).
pub fn read_stored<B, E>(
    index: &LayerIndex,
    offset: u64,
    len: usize,
    fetch: &mut impl FnMut(Range<u64>) -> Result<B, E>,
) -> Result<Vec<u8>, ReadError>
where
    B: AsRef<[u8]>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_stored_with(index, offset, len, fetch, &mut |i, _| {
        index
            .loaded_window(i)
            .map(<[u8]>::to_vec)
            .ok_or(ReadError::WindowMissing { checkpoint: i })
    })
}

/// [`read_stored`], with the packed window of a checkpoint that has one (from its
/// index's windows part in memory if there, else) from `window(checkpoint, its ref)`,
/// which is checked against the ref's sha256 before use.
pub fn read_stored_with<B, E>(
    index: &LayerIndex,
    offset: u64,
    len: usize,
    fetch: &mut impl FnMut(Range<u64>) -> Result<B, E>,
    window: &mut impl FnMut(usize, &WindowRef) -> Result<Vec<u8>, ReadError>,
) -> Result<Vec<u8>, ReadError>
where
    B: AsRef<[u8]>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let plan = plan_read(index, offset, len as u64)?;
    if plan.compressed.is_empty() {
        return Ok(Vec::new());
    }
    let packed = match plan.checkpoint.map(|i| (i, index.checkpoints.get(i))) {
        Some((i, Some(cp))) => match (&cp.window, index.loaded_window(i)) {
            (None, _) => Vec::new(),
            (Some(_), Some(loaded)) => loaded.to_vec(),
            (Some(w), None) => window(i, w)?,
        },
        _ => Vec::new(),
    };
    let bytes = fetch(plan.compressed.clone()).map_err(|e| ReadError::Fetch(e.into()))?;
    read_range(index, &plan, bytes.as_ref(), &packed, len)
}

/// Reads `len` bytes at `file_offset` of a regular file (or of the file a hard link
/// names), truncated at the file's size. Holes of sparse files read as zeros.
/// `fetch(range)` must return exactly the blob bytes of `range`.
pub fn read_file<B, E>(
    index: &LayerIndex,
    entry: &Entry,
    file_offset: u64,
    len: usize,
    mut fetch: impl FnMut(Range<u64>) -> Result<B, E>,
) -> Result<Vec<u8>, ReadError>
where
    B: AsRef<[u8]>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_file_via(index, entry, file_offset, len, |offset, n| {
        read_stored(index, offset, n, &mut fetch)
    })
}

/// [`read_file`] with the tar-stream reads left to `stored(offset, len)`, which must
/// return the `len` bytes at `offset` of the uncompressed stream (e.g. from a cache of
/// inflated spans).
pub fn read_file_via(
    index: &LayerIndex,
    entry: &Entry,
    file_offset: u64,
    len: usize,
    mut stored: impl FnMut(u64, usize) -> Result<Vec<u8>, ReadError>,
) -> Result<Vec<u8>, ReadError> {
    let entry = resolve(index, entry)?;
    let end = file_offset.saturating_add(len as u64).min(entry.size);
    if file_offset >= end {
        return Ok(Vec::new());
    }
    let want = (end - file_offset) as usize;
    if entry.sparse.is_empty() {
        let out = stored(entry.content_offset + file_offset, want)?;
        return check_len(out, want);
    }
    // Logical [file_offset, end) -> (output position, stored position, length) segments.
    let mut segments = Vec::new();
    let mut stored_pos = 0u64;
    for e in &entry.sparse {
        let (a, b) = (e.offset.max(file_offset), (e.offset + e.length).min(end));
        if a < b {
            segments.push((a - file_offset, stored_pos + (a - e.offset), b - a));
        }
        stored_pos += e.length;
    }
    let mut out = vec![0u8; want];
    let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
        return Ok(out);
    };
    let (s_start, s_end) = (first.1, last.1 + last.2);
    let data = stored(entry.content_offset + s_start, (s_end - s_start) as usize)?;
    let data = check_len(data, (s_end - s_start) as usize)?;
    for (o, s, l) in segments {
        let (o, s, l) = (o as usize, (s - s_start) as usize, l as usize);
        out[o..o + l].copy_from_slice(&data[s..s + l]);
    }
    Ok(out)
}

/// Size of the spans a plain tar stream is cut into by [`span_of`].
pub const PLAIN_SPAN: u64 = 4 << 20;

/// The span of the uncompressed stream holding `offset`: from the last checkpoint at or
/// before it to the next checkpoint (gzip, zstd), or the aligned [`PLAIN_SPAN`] (plain tar).
/// Inflating a whole span costs one pass from its checkpoint, so caching whole spans
/// lets sequential reads inflate each byte once.
pub fn span_of(index: &LayerIndex, offset: u64) -> Range<u64> {
    let total = index.uncompressed_size;
    if index.compression == Compression::None || index.checkpoints.is_empty() {
        let start = offset / PLAIN_SPAN * PLAIN_SPAN;
        return start..(start + PLAIN_SPAN).min(total);
    }
    let cps = &index.checkpoints;
    let i = cps
        .partition_point(|c| c.uncompressed_offset <= offset)
        .saturating_sub(1);
    let start = cps[i].uncompressed_offset;
    let end = cps.get(i + 1).map_or(total, |c| c.uncompressed_offset);
    start..end.max(start)
}

fn check_len(out: Vec<u8>, want: usize) -> Result<Vec<u8>, ReadError> {
    if out.len() == want {
        Ok(out)
    } else {
        Err(ReadError::BadIndex(format!(
            "entry content runs past the end of the layer ({} of {want} bytes)",
            out.len()
        )))
    }
}

/// The regular file `entry` is, or names as a hard link target (the last regular file
/// of that path before the link when `entry` is one of `index.entries`).
fn resolve<'a>(index: &'a LayerIndex, entry: &'a Entry) -> Result<&'a Entry, ReadError> {
    let not_file = |e: &Entry| ReadError::NotAFile {
        path: e.path_lossy().into_owned(),
    };
    match entry.kind {
        EntryKind::File => Ok(entry),
        EntryKind::Hardlink => {
            let target = entry
                .link_target
                .as_deref()
                .ok_or_else(|| not_file(entry))?;
            let before = index
                .entries
                .iter()
                .position(|e| std::ptr::eq(e, entry))
                .unwrap_or(index.entries.len());
            index.entries[..before]
                .iter()
                .rev()
                .find(|e| e.path == target && e.kind == EntryKind::File)
                .ok_or_else(|| not_file(entry))
        }
        _ => Err(not_file(entry)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::builder::{index_blob, test_options};
    use crate::index::format::SparseExtent;
    use crate::index::gzip::tests::{gzip_compress, test_data};
    use crate::index::tar::tests::{header, octal, pax, TestTar};
    use std::cell::RefCell;

    /// A fetch callback over `blob` that records the ranges asked for.
    fn fetcher<'a>(
        blob: &'a [u8],
        log: &'a RefCell<Vec<Range<u64>>>,
    ) -> impl FnMut(Range<u64>) -> Result<&'a [u8], std::io::Error> + 'a {
        move |r: Range<u64>| {
            log.borrow_mut().push(r.clone());
            blob.get(r.start as usize..r.end as usize)
                .ok_or_else(|| std::io::Error::other("out of range"))
        }
    }

    #[test]
    fn files_read_back_from_gzip_with_small_fetches() {
        let mut t = TestTar::default();
        let big = test_data(9 << 20, 1);
        let small = b"small file in the middle".to_vec();
        t.file(b"big1", &big[..5 << 20]);
        t.file(b"small", &small);
        t.file(b"big2", &big[5 << 20..]);
        t.entry(header(b"empty", b'0', 0, false), b"");
        let mut hl = header(b"hard", b'1', 0, false);
        hl[157..161].copy_from_slice(b"big2");
        t.entry(hl, b"");
        let tar = t.end();
        for level in [6, 1] {
            let gz = gzip_compress(&tar, level);
            let idx = index_blob(&gz, test_options()).unwrap();
            let log = RefCell::new(Vec::new());
            let mut fetch = fetcher(&gz, &log);
            let file = |p: &[u8]| idx.find(p).unwrap();
            let got = read_file(&idx, file(b"small"), 0, 1000, &mut fetch).unwrap();
            assert_eq!(got, small);
            if level == 6 {
                let asked: u64 = log.borrow().iter().map(|r| r.end - r.start).sum();
                assert!(
                    asked < gz.len() as u64 / 4,
                    "fetched {asked} of {}",
                    gz.len()
                );
            }
            assert_eq!(
                read_file(&idx, file(b"big1"), 0, usize::MAX, &mut fetch).unwrap(),
                big[..5 << 20]
            );
            let mid = read_file(&idx, file(b"big2"), 1_234_567, 100_000, &mut fetch).unwrap();
            assert!(mid == big[(5 << 20) + 1_234_567..(5 << 20) + 1_334_567]);
            let tail = read_file(&idx, file(b"hard"), (4 << 20) - 10, 1000, &mut fetch).unwrap();
            assert!(tail == big[(9 << 20) - 10..], "read past EOF is truncated");
            assert!(read_file(&idx, file(b"empty"), 0, 10, &mut fetch)
                .unwrap()
                .is_empty());
            // Every range of the stream reads back, through every checkpoint.
            for cp in &idx.checkpoints {
                let at = cp.uncompressed_offset.saturating_sub(3);
                let got = read_stored(&idx, at, 70_000, &mut fetch).unwrap();
                let end = (at as usize + 70_000).min(tar.len());
                assert!(got == tar[at as usize..end]);
            }
        }
    }

    #[test]
    fn files_read_back_from_zstd_through_its_copy() {
        let mut t = TestTar::default();
        let big = test_data(9 << 20, 3);
        let small = b"small file in the middle".to_vec();
        t.file(b"big1", &big[..5 << 20]);
        t.file(b"small", &small);
        t.file(b"big2", &big[5 << 20..]);
        let tar = t.end();
        let zst = crate::index::zstd::tests::zstd_compress(&tar, 3);
        let (idx, copy) =
            crate::index::builder::index_blob_with_copy(&zst, test_options()).unwrap();
        let log = RefCell::new(Vec::new());
        let mut fetch = fetcher(&copy, &log);
        let got = read_file(&idx, idx.find(b"small").unwrap(), 0, 1000, &mut fetch).unwrap();
        assert_eq!(got, small);
        let asked: u64 = log.borrow().iter().map(|r| r.end - r.start).sum();
        assert!(
            asked < copy.len() as u64 / 4,
            "fetched {asked} of {}",
            copy.len()
        );
        let big2 = idx.find(b"big2").unwrap();
        let mid = read_file(&idx, big2, 1_234_567, 100_000, &mut fetch).unwrap();
        assert!(mid == big[(5 << 20) + 1_234_567..(5 << 20) + 1_334_567]);
        for cp in &idx.checkpoints {
            let at = cp.uncompressed_offset.saturating_sub(3);
            let got = read_stored(&idx, at, 70_000, &mut fetch).unwrap();
            let end = (at as usize + 70_000).min(tar.len());
            assert!(got == tar[at as usize..end]);
            let span = span_of(&idx, cp.uncompressed_offset);
            assert_eq!(span.start, cp.uncompressed_offset);
            assert!(span.end - span.start <= 1 << 20);
        }
        // The original blob's bytes are not what the plan names: reads fail, never lie.
        let mut wrong = fetcher(&zst, &log);
        assert!(read_file(&idx, big2, 3 << 20, 10, &mut wrong).is_err());
    }

    #[test]
    fn plans_are_tight() {
        let tar = {
            let mut t = TestTar::default();
            t.file(b"a", &test_data(8 << 20, 2));
            t.end()
        };
        let gz = gzip_compress(&tar, 6);
        let idx = index_blob(&gz, test_options()).unwrap();
        let cps = &idx.checkpoints;
        let p = plan_read(&idx, cps[2].uncompressed_offset + 5, 10).unwrap();
        assert_eq!(p.checkpoint, Some(2));
        assert_eq!(p.skip, 5);
        assert_eq!(p.compressed.start, input_start(&cps[2]));
        assert_eq!(p.compressed.end, cps[3].compressed_offset);
        let last = plan_read(&idx, idx.uncompressed_size - 1, 100).unwrap();
        assert_eq!(last.compressed.end, idx.compressed_size);
        let empty = plan_read(&idx, idx.uncompressed_size, 100).unwrap();
        assert!(empty.compressed.is_empty() && empty.checkpoint.is_none());
        let bytes = &gz[p.compressed.start as usize..p.compressed.end as usize];
        assert!(matches!(
            read_range(&idx, &p, &bytes[1..], idx.loaded_window(2).unwrap(), 10),
            Err(ReadError::InputLength { .. })
        ));
        let plain = index_blob(&tar, test_options()).unwrap();
        let pp = plan_read(&plain, 1000, 24).unwrap();
        assert_eq!((pp.checkpoint, pp.compressed.clone()), (None, 1000..1024));
        assert_eq!(
            read_range(&plain, &pp, &tar[1000..1024], &[], 24).unwrap(),
            tar[1000..1024]
        );
    }

    #[test]
    fn sparse_files_read_with_zero_holes() {
        let mut t = TestTar::default();
        t.meta(
            b'x',
            &pax(&[
                ("GNU.sparse.size", b"20000"),
                ("GNU.sparse.map", b"100,3,9000,4,19998,2"),
            ]),
        );
        t.file(b"sparse", b"abcdefghi");
        let tar = t.end();
        let mut want = vec![0u8; 20000];
        want[100..103].copy_from_slice(b"abc");
        want[9000..9004].copy_from_slice(b"defg");
        want[19998..].copy_from_slice(b"hi");
        for blob in [tar.clone(), gzip_compress(&tar, 6)] {
            let idx = index_blob(&blob, test_options()).unwrap();
            let e = &idx.entries[0];
            assert_eq!(
                e.sparse[1],
                SparseExtent {
                    offset: 9000,
                    length: 4
                }
            );
            let log = RefCell::new(Vec::new());
            let mut fetch = fetcher(&blob, &log);
            assert_eq!(read_file(&idx, e, 0, 1 << 20, &mut fetch).unwrap(), want);
            for (off, len) in [(101, 8900), (5000, 10), (9003, 10997), (0, 100), (19999, 5)] {
                let got = read_file(&idx, e, off, len, &mut fetch).unwrap();
                let end = (off as usize + len).min(want.len());
                assert_eq!(got, want[off as usize..end], "{off}+{len}");
            }
            log.borrow_mut().clear();
            assert_eq!(
                read_file(&idx, e, 200, 100, &mut fetch).unwrap(),
                vec![0; 100]
            );
            assert!(log.borrow().is_empty(), "holes need no fetch");
        }
    }

    #[test]
    fn errors() {
        let mut t = TestTar::default();
        let mut d = header(b"dir", b'5', 0, false);
        octal(&mut d[100..108], 0o755);
        t.entry(d, b"");
        let tar = t.end();
        let idx = index_blob(&tar, test_options()).unwrap();
        let fail = |_: Range<u64>| -> Result<Vec<u8>, std::io::Error> {
            Err(std::io::Error::other("nope"))
        };
        assert!(matches!(
            read_file(&idx, &idx.entries[0], 0, 1, fail),
            Err(ReadError::NotAFile { .. })
        ));
        let mut t = TestTar::default();
        t.file(b"f", b"data");
        let tar = t.end();
        let idx = index_blob(&tar, test_options()).unwrap();
        let err = read_file(&idx, &idx.entries[0], 0, 4, fail).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let mut z = idx.clone();
        z.compression = Compression::Zstd;
        z.random_access = false;
        assert!(matches!(
            plan_read(&z, 0, 1),
            Err(ReadError::NotRandomAccess)
        ));
    }
}
