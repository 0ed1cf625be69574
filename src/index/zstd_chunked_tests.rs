//! zstd:chunked layers: a small writer of the format, independent of the indexer (its
//! own tar walk, from the containers/storage description: a frame for the headers
//! between contents, a frame per content chunk, the TOC, a tar-split frame and the
//! 64-byte footer), and the tests of indexing, reading and TOC checking.

use crate::digest::Digest;
use crate::index::builder::{index_blob, IndexBuilder, IndexError, IndexOptions};
use crate::index::gzip::tests::test_data;
use crate::index::tar::tests::{header, TestTar};
use crate::index::zstd_chunked::{TocBinding, ZstdChunkedError};
use crate::index::{read_file, Compression, LayerIndex};
use serde_json::{json, Value};
use std::cell::Cell;

const SKIPPABLE: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

fn octal(field: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(field);
    u64::from_str_radix(text.trim_matches(|c: char| c == '\0' || c == ' '), 8).unwrap_or(0)
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn skippable(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&SKIPPABLE);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

fn frame(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&zstd::bulk::compress(data, 3).unwrap());
}

/// `tar` as a zstd:chunked blob whose contents are cut every `chunk` bytes, and its TOC.
pub fn write(tar: &[u8], chunk: usize) -> (Vec<u8>, Value) {
    let (mut blob, mut headers, mut entries) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pos, mut long_name, mut long_link) = (0usize, None::<String>, None::<String>);
    while pos + 512 <= tar.len() {
        let h = &tar[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let size = octal(&h[124..136]) as usize;
        let padded = size.div_ceil(512) * 512;
        let ty = h[156];
        if matches!(ty, b'x' | b'L' | b'K') {
            let body = &tar[pos + 512..pos + 512 + size];
            let record = |key: &str| {
                String::from_utf8_lossy(body).lines().find_map(|l| {
                    l.split_once(&format!(" {key}="))
                        .map(|(_, p)| p.to_string())
                })
            };
            match ty {
                b'L' => long_name = Some(cstr(body)),
                b'K' => long_link = Some(cstr(body)),
                _ => (long_name, long_link) = (record("path"), record("linkpath")),
            }
            headers.extend_from_slice(&tar[pos..pos + 512 + padded]);
            pos += 512 + padded;
            continue;
        }
        let prefix = cstr(&h[345..500]);
        let short = cstr(&h[..100]);
        let name = long_name.take().unwrap_or(if prefix.is_empty() {
            short
        } else {
            format!("{prefix}/{short}")
        });
        headers.extend_from_slice(h);
        pos += 512;
        let kind = match ty {
            b'0' | 0 if name.ends_with('/') => "dir",
            b'0' | 0 => "reg",
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            _ => "fifo",
        };
        let mut e = json!({
            "type": kind, "name": name,
            "linkName": long_link.take().unwrap_or_else(|| cstr(&h[157..257])),
            "mode": octal(&h[100..108]), "uid": octal(&h[108..116]), "gid": octal(&h[116..124]),
            "devMajor": octal(&h[329..337]), "devMinor": octal(&h[337..345]),
        });
        let content = if kind == "reg" {
            &tar[pos..pos + size]
        } else {
            &[][..]
        };
        let mut chunks = Vec::new();
        if kind == "reg" {
            e["size"] = json!(size);
        }
        if !content.is_empty() {
            frame(&mut blob, &std::mem::take(&mut headers));
            e["offset"] = json!(blob.len());
            e["digest"] = json!(Digest::of(content).to_string());
            for (i, piece) in content.chunks(chunk).enumerate() {
                if i > 0 {
                    chunks.push(json!({"type": "chunk", "name": name,
                        "offset": blob.len(), "chunkOffset": i * chunk}));
                }
                frame(&mut blob, piece);
            }
            e["endOffset"] = json!(blob.len());
        }
        entries.push(e);
        entries.extend(chunks);
        if kind == "reg" {
            headers.extend_from_slice(&tar[pos + size..pos + padded]);
            pos += padded;
        }
    }
    headers.extend_from_slice(&tar[pos..]);
    frame(&mut blob, &headers);
    let toc = json!({"version": 1, "entries": entries});
    (with_toc(&blob, &toc), toc)
}

/// `data` (a blob's data frames) followed by `toc`, a tar-split frame and the footer.
pub fn with_toc(data: &[u8], toc: &Value) -> Vec<u8> {
    let json = serde_json::to_vec(toc).unwrap();
    let packed = zstd::bulk::compress(&json, 3).unwrap();
    let mut blob = data.to_vec();
    let toc_offset = blob.len() as u64 + 8;
    skippable(&mut blob, &packed);
    let split = zstd::bulk::compress(b"{\"type\":1}\n", 3).unwrap();
    let split_offset = blob.len() as u64 + 8;
    skippable(&mut blob, &split);
    let mut footer = Vec::new();
    for v in [
        toc_offset,
        packed.len() as u64,
        json.len() as u64,
        1,
        split_offset,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(&(split.len() as u64).to_le_bytes());
    footer.extend_from_slice(&11u64.to_le_bytes());
    footer.extend_from_slice(b"GNUlInUx");
    skippable(&mut blob, &footer);
    blob
}

/// The data frames of a blob [`write`] made (everything before its TOC frame).
pub fn data_frames(blob: &[u8]) -> &[u8] {
    let footer = &blob[blob.len() - 64..];
    let toc_offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
    &blob[..toc_offset - 8]
}

/// A tar with the kinds of entries a layer has: small and empty files, a big file (many
/// chunks), a directory, links; returns it and its file contents by path.
pub fn sample_tar() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut t = TestTar::default();
    let mut files = Vec::new();
    t.entry(header(b"etc/", b'5', 0, false), b"");
    for (i, size) in [0usize, 6, 70_000, 5 << 20, 300_000]
        .into_iter()
        .enumerate()
    {
        let name = format!("etc/f{i}");
        let data = test_data(size, i as u64 + 7);
        t.file(name.as_bytes(), &data);
        files.push((name, data));
    }
    for (name, ty, target) in [
        (&b"etc/link"[..], b'2', &b"f1"[..]),
        (b"etc/hard", b'1', b"etc/f2"),
    ] {
        let mut h = header(name, ty, 0, false);
        h[157..157 + target.len()].copy_from_slice(target);
        t.entry(h, b"");
    }
    (t.end(), files)
}

fn build(blob: &[u8], step: usize, opts: IndexOptions) -> Result<LayerIndex, IndexError> {
    let mut b = IndexBuilder::new(opts);
    blob.chunks(step).try_for_each(|p| b.push(p))?;
    b.finish(Digest::of(blob))
}

#[test]
fn zstd_chunked_layers_are_read_from_their_own_frames_and_their_toc_checked() {
    let (tar, files) = sample_tar();
    let plain = index_blob(&tar, IndexOptions::default()).unwrap();
    let (blob, toc) = write(&tar, 64 << 10);
    let idx = build(&blob, 7777, IndexOptions::default()).unwrap();
    assert_eq!(
        idx,
        build(&blob, blob.len(), IndexOptions::default()).unwrap()
    );
    assert_eq!(idx.compression, Compression::Zstd);
    assert_eq!(idx.entries, plain.entries);
    assert!(idx.copy.is_none(), "no seekable copy for zstd:chunked");
    let toc_offset = data_frames(&blob).len() as u64 + 8;
    let packed = &blob[toc_offset as usize..];
    let size = u32::from_le_bytes(
        blob[toc_offset as usize - 4..toc_offset as usize]
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        idx.toc,
        Some(TocBinding {
            digest: Digest::of(&packed[..size as usize]),
            offset: toc_offset,
            size: u64::from(size),
            entries: toc["entries"].as_array().unwrap().len() as u64,
        })
    );
    // One checkpoint per frame with output: headers, and every 64 KiB of content.
    assert!(idx.checkpoints.len() > (5 << 20) / (64 << 10));
    assert!(idx
        .checkpoints
        .iter()
        .all(|c| c.window.is_none() && c.bits == 0));
    assert_eq!(LayerIndex::decode(&idx.encode()).unwrap(), idx);
    for (name, data) in &files {
        let e = idx.find(name.as_bytes()).unwrap();
        let fetched = Cell::new(0u64);
        let fetch = |r: std::ops::Range<u64>| {
            fetched.set(fetched.get() + r.end - r.start);
            Ok::<_, std::io::Error>(blob[r.start as usize..r.end as usize].to_vec())
        };
        let got = read_file(&idx, e, 0, usize::MAX, fetch).unwrap();
        assert!(got == *data, "{name}");
        // A file's read fetches its frames and at most the next header frame.
        assert!(
            fetched.get() <= data.len() as u64 + 4096,
            "{name}: {}",
            fetched.get()
        );
        if data.len() > 1 << 20 {
            fetched.set(0);
            let part = read_file(&idx, e, 3 << 20, 1000, fetch).unwrap();
            assert!(part == data[3 << 20..(3 << 20) + 1000]);
            assert!(
                fetched.get() < 300_000,
                "a read in the middle: {}",
                fetched.get()
            );
        }
    }
}

#[test]
fn plain_small_frames_are_read_directly_and_large_ones_through_a_copy() {
    let (tar, _) = sample_tar();
    // Small frames (like pzstd or the seekable format): no copy, no TOC.
    let framed = data_frames(&write(&tar, 1 << 20).0).to_vec();
    let idx = build(&framed, 65_536, IndexOptions::default()).unwrap();
    assert!(idx.copy.is_none() && idx.toc.is_none());
    // Contents in frames over 4 MiB after a small first frame: still read directly.
    let (big, _) = write(&tar, 5 << 20);
    let idx = build(&big, 65_536, IndexOptions::default()).unwrap();
    assert!(idx.copy.is_none() && idx.toc.is_some());
    // A first frame over 4 MiB: a copy is written, and a TOC at the end is ignored.
    let one_frame = zstd::bulk::compress(&tar, 3).unwrap();
    let (_, toc) = write(&tar, 64 << 10);
    let idx = build(&with_toc(&one_frame, &toc), 65_536, IndexOptions::default()).unwrap();
    assert!(idx.copy.is_some() && idx.toc.is_none());
    // One small frame: read directly.
    let small_tar = {
        let mut t = TestTar::default();
        t.file(b"a", &test_data(100_000, 1));
        t.end()
    };
    let one = zstd::bulk::compress(&small_tar, 3).unwrap();
    let idx = build(&one, 1000, IndexOptions::default()).unwrap();
    assert!(idx.copy.is_none());
    assert_eq!(idx.checkpoints.len(), 1);
}

/// Rewrites the TOC of `blob` with `edit` and indexes the result.
fn edited(blob: &[u8], toc: &Value, edit: impl FnOnce(&mut Value)) -> IndexError {
    let mut t = toc.clone();
    edit(&mut t);
    let bad = with_toc(data_frames(blob), &t);
    let err = build(&bad, 100_000, IndexOptions::default()).unwrap_err();
    assert!(!err.is_hostile(), "{err}");
    assert!(matches!(err, IndexError::ZstdChunked(_)), "{err}");
    err
}

fn entry<'a>(toc: &'a mut Value, name: &str) -> &'a mut Value {
    toc["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"].as_str().unwrap().trim_end_matches('/') == name && e["type"] != "chunk")
        .unwrap()
}

#[test]
fn a_toc_that_disagrees_with_the_stream_is_a_clear_error() {
    let (tar, _) = sample_tar();
    let (blob, toc) = write(&tar, 64 << 10);
    let err = edited(&blob, &toc, |t| {
        entry(t, "etc/f2")["digest"] = json!(Digest::of(b"x").to_string())
    });
    assert!(
        err.to_string().contains("'etc/f2': the content's sha256"),
        "{err}"
    );
    let err = edited(&blob, &toc, |t| entry(t, "etc/f4")["size"] = json!(299_999));
    assert!(err.to_string().contains("size 299999 in the TOC"), "{err}");
    let err = edited(&blob, &toc, |t| {
        let e = entry(t, "etc/f4");
        e["offset"] = json!(e["offset"].as_u64().unwrap() + 1);
    });
    assert!(err.to_string().contains("frame boundary"), "{err}");
    let err = edited(&blob, &toc, |t| {
        entry(t, "etc/link")["linkName"] = json!("f2")
    });
    assert!(err.to_string().contains("link target"), "{err}");
    let err = edited(&blob, &toc, |t| entry(t, "etc/f1")["mode"] = json!(0o4755));
    assert!(err.to_string().contains("mode"), "{err}");
    let err = edited(&blob, &toc, |t| entry(t, "etc")["type"] = json!("reg"));
    assert!(
        err.to_string()
            .contains("type reg in the TOC, dir in the tar"),
        "{err}"
    );
    let err = edited(&blob, &toc, |t| {
        entry(t, "etc/f1")["name"] = json!("etc/other")
    });
    assert!(err.to_string().contains("the TOC names 'etc/"), "{err}");
    let err = edited(&blob, &toc, |t| {
        t["entries"].as_array_mut().unwrap().remove(0);
    });
    assert_eq!(
        err,
        IndexError::ZstdChunked(ZstdChunkedError::Count { toc: 7, stream: 8 })
    );
    let err = edited(&blob, &toc, |t| {
        let chunk = t["entries"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["type"] == "chunk")
            .unwrap();
        chunk["chunkOffset"] = json!(chunk["chunkOffset"].as_u64().unwrap() + 1);
    });
    assert!(
        err.to_string().contains("is not a frame of the content"),
        "{err}"
    );
    let err = edited(&blob, &toc, |t| t["version"] = json!(2));
    assert!(err.to_string().contains("version 2"), "{err}");
    let err = edited(&blob, &toc, |t| *t = json!({"version": "one"}));
    assert!(err.to_string().contains("TOC is unreadable"), "{err}");
    let err = edited(&blob, &toc, |t| {
        entry(t, "etc/f0")["name"] = json!("../../etc/shadow")
    });
    assert!(err.to_string().contains("unsafe path"), "{err}");
}

#[test]
fn hostile_tocs_and_footers_are_refused_or_limited() {
    let (tar, _) = sample_tar();
    let (blob, _) = write(&tar, 64 << 10);
    // A TOC over the limit: not read at all.
    let small = IndexOptions {
        max_zstd_toc_bytes: 1000,
        ..IndexOptions::default()
    };
    let err = build(&blob, 100_000, small).unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::ZstdChunked(ZstdChunkedError::TocTooLarge { limit: 1000, .. })
        ),
        "{err}"
    );
    assert!(!err.is_hostile());
    // A footer pointing elsewhere, or claiming a huge TOC.
    let n = blob.len();
    for (word, value) in [(0usize, 100u64), (1, 12), (2, 1 << 40), (3, 2)] {
        let mut bad = blob.clone();
        bad[n - 64 + 8 * word..n - 64 + 8 * word + 8].copy_from_slice(&value.to_le_bytes());
        let err = build(&bad, 100_000, IndexOptions::default()).unwrap_err();
        assert!(matches!(err, IndexError::ZstdChunked(_)), "{word}: {err}");
    }
    // A TOC that is not zstd.
    let mut bad = blob.clone();
    let toc_offset = data_frames(&blob).len() + 8;
    bad[toc_offset] ^= 0xff;
    let err = build(&bad, 100_000, IndexOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not zstd"), "{err}");
    // Too many frames (hostile, as for plain zstd).
    let few = IndexOptions {
        max_zstd_frames: 50,
        ..IndexOptions::default()
    };
    let err = build(&blob, 100_000, few).unwrap_err();
    assert_eq!(
        err,
        IndexError::Zstd(crate::index::ZstdError::TooManyFrames { limit: 50 })
    );
    assert!(err.is_hostile());
    // A bomb in small frames (hostile).
    let mut t = TestTar::default();
    t.file(b"zeros", &vec![0u8; 40 << 20]);
    let (bomb, _) = write(&t.end(), 1 << 20);
    let strict = IndexOptions {
        max_inflate_ratio: 100,
        inflate_ratio_slack: 1 << 20,
        ..IndexOptions::default()
    };
    let err = build(&bomb, 100_000, strict).unwrap_err();
    assert!(err.is_hostile(), "{err}");
    // A data frame whose blocks end before the decoder's frame does (walker and decoder
    // must agree), and a truncated trailer.
    let err = build(&blob[..n - 3], 100_000, IndexOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::Zstd(crate::index::ZstdError::Truncated { .. })
        ),
        "{err}"
    );
}
