//! Hostile layers: each is rejected with a clear error or indexed by a documented rule
//! (see the `tar` module documentation and [`IndexOptions`]).

use crate::index::builder::{index_blob, IndexBuilder, IndexError, IndexOptions};
use crate::index::format::EntryKind;
use crate::index::gzip::tests::gzip_compress;
use crate::index::gzip::GzipError;
use crate::index::tar::tests::{header, pax, seal, TestTar};
use crate::index::tar::{TarError, BLOCK};
use crate::index::zstd::tests::zstd_compress;
use crate::index::zstd::ZstdError;
use crate::Digest;

fn link(name: &[u8], ty: u8, target: &[u8]) -> [u8; BLOCK] {
    let mut h = header(name, ty, 0, false);
    h[157..157 + target.len()].copy_from_slice(target);
    h
}

/// Indexes `tar` plain, gzip-compressed, zstd-compressed and as zstd:chunked (the tests'
/// writer, 4 KiB content frames); all must agree. (The TOC's own hostile cases are in
/// `zstd_chunked_tests`.)
fn both(tar: &[u8], opts: IndexOptions) -> Result<crate::index::LayerIndex, IndexError> {
    let plain = index_blob(tar, opts);
    let chunked = crate::index::zstd_chunked_tests::write(tar, 4096).0;
    for packed in [gzip_compress(tar, 6), zstd_compress(tar, 3), chunked] {
        let other = index_blob(&packed, opts);
        match (&plain, &other) {
            (Ok(p), Ok(g)) => assert_eq!(p.entries, g.entries),
            (p, g) => assert_eq!(p.as_ref().err(), g.as_ref().err()),
        }
    }
    plain
}

#[test]
fn dotdot_paths_are_rejected_and_named() {
    for bad in [&b"../etc/passwd"[..], b"a/../../x", b"/../x"] {
        let mut t = TestTar::default();
        t.file(b"ok", b"1");
        t.file(bad, b"evil");
        let err = both(&t.end(), IndexOptions::default()).unwrap_err();
        assert_eq!(
            err,
            IndexError::Tar(TarError::UnsafePath {
                offset: 1024,
                path: String::from_utf8_lossy(bad).into_owned()
            })
        );
        assert!(err.is_hostile());
        assert!(err.to_string().contains("'..' components are not allowed"));
    }
    // Also as a hard link target, and through a PAX path.
    let mut t = TestTar::default();
    t.entry(link(b"h", b'1', b"../../etc/shadow"), b"");
    assert!(matches!(
        both(&t.end(), IndexOptions::default()),
        Err(IndexError::Tar(TarError::UnsafePath { offset: 0, .. }))
    ));
    let mut t = TestTar::default();
    t.meta(b'x', &pax(&[("path", b"x/../../y")]));
    t.file(b"innocent", b"");
    assert!(matches!(
        both(&t.end(), IndexOptions::default()),
        Err(IndexError::Tar(TarError::UnsafePath { .. }))
    ));
}

#[test]
fn absolute_paths_are_made_relative_and_symlinks_kept_verbatim() {
    let mut t = TestTar::default();
    t.file(b"/etc/passwd", b"x");
    t.file(b"//abs//./y/", b"");
    t.entry(link(b"/esc", b'2', b"../../../etc"), b"");
    t.entry(link(b"abs", b'2', b"/etc/shadow"), b"");
    let idx = both(&t.end(), IndexOptions::default()).unwrap();
    let paths: Vec<_> = idx.entries.iter().map(|e| e.path_lossy()).collect();
    assert_eq!(paths, ["etc/passwd", "abs/y", "esc", "abs"]);
    assert_eq!(idx.entries[1].kind, EntryKind::Dir);
    assert_eq!(
        idx.entries[2].link_target.as_deref(),
        Some(&b"../../../etc"[..])
    );
    assert_eq!(
        idx.entries[3].link_target.as_deref(),
        Some(&b"/etc/shadow"[..])
    );
}

#[test]
fn hard_links_must_name_an_earlier_non_directory() {
    // Missing in this layer: kept (it may name a lower layer's file).
    let mut t = TestTar::default();
    t.entry(link(b"h", b'1', b"usr/lib/libc.so"), b"");
    let idx = both(&t.end(), IndexOptions::default()).unwrap();
    assert_eq!(idx.entries[0].kind, EntryKind::Hardlink);
    // A later entry: rejected.
    let mut t = TestTar::default();
    t.entry(link(b"h", b'1', b"f"), b"");
    t.file(b"f", b"data");
    let err = both(&t.end(), IndexOptions::default()).unwrap_err();
    assert_eq!(
        err,
        IndexError::Tar(TarError::BadHardlink {
            offset: 0,
            path: "h".into(),
            target: "f".into(),
            reason: "which only comes later in the archive",
        })
    );
    assert!(err.is_hostile());
    // Itself: rejected the same way.
    let mut t = TestTar::default();
    t.entry(link(b"self", b'1', b"self"), b"");
    assert!(matches!(
        both(&t.end(), IndexOptions::default()),
        Err(IndexError::Tar(TarError::BadHardlink { .. }))
    ));
    // A directory: rejected.
    let mut t = TestTar::default();
    t.entry(header(b"d/", b'5', 0, false), b"");
    t.entry(link(b"h", b'1', b"d"), b"");
    let err = both(&t.end(), IndexOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("names \"d\", a directory"),
        "{err}"
    );
    // An earlier file: fine.
    let mut t = TestTar::default();
    t.file(b"f", b"data");
    t.entry(link(b"h", b'1', b"./f"), b"");
    assert_eq!(
        both(&t.end(), IndexOptions::default())
            .unwrap()
            .entries
            .len(),
        2
    );
}

#[test]
fn duplicates_are_kept_and_the_last_wins() {
    let mut t = TestTar::default();
    t.file(b"f", b"first");
    t.file(b"./f", b"second!");
    let idx = both(&t.end(), IndexOptions::default()).unwrap();
    assert_eq!(idx.entries.len(), 2);
    assert_eq!(idx.find(b"f").map(|e| e.size), Some(7));
}

#[test]
fn device_nodes_are_kept_unless_refused() {
    let mut t = TestTar::default();
    let mut h = header(b"dev/sda", b'4', 0, false);
    crate::index::tar::tests::octal(&mut h[329..337], 8);
    t.entry(h, b"");
    let tar = t.end();
    let idx = both(&tar, IndexOptions::default()).unwrap();
    assert_eq!(
        (idx.entries[0].kind, idx.entries[0].dev_major),
        (EntryKind::BlockDevice, 8)
    );
    let strict = IndexOptions {
        allow_devices: false,
        ..IndexOptions::default()
    };
    assert_eq!(
        both(&tar, strict).unwrap_err(),
        IndexError::Tar(TarError::DeviceNode {
            offset: 0,
            path: "dev/sda".into()
        })
    );
}

#[test]
fn a_million_tiny_entries_hit_the_default_entry_limit() {
    let opts = IndexOptions::default();
    let mut b = IndexBuilder::new(opts);
    let mut result = Ok(());
    let mut pushed = 0u64;
    for i in 0..1_000_000u32 {
        let mut h = header(format!("f{i}").as_bytes(), b'0', 0, false);
        seal(&mut h);
        result = b.push(&h);
        pushed += 1;
        if result.is_err() {
            break;
        }
    }
    let limit = opts.max_entries;
    assert_eq!(
        result,
        Err(IndexError::Tar(TarError::TooManyEntries { limit }))
    );
    assert_eq!(
        pushed,
        limit as u64 + 1,
        "stopped at the first entry too many"
    );
}

#[test]
fn max_path_length_is_enforced() {
    let opts = IndexOptions {
        max_path_len: 100,
        ..IndexOptions::default()
    };
    let mut t = TestTar::default();
    t.meta(b'x', &pax(&[("path", &[b'a'; 101][..])]));
    t.file(b"x", b"");
    assert!(matches!(
        both(&t.end(), opts),
        Err(IndexError::Tar(TarError::PathTooLong {
            what: "path",
            len: 101,
            limit: 100,
            ..
        }))
    ));
    let mut t = TestTar::default();
    t.meta(b'x', &pax(&[("linkpath", &[b'b'; 200][..])]));
    t.entry(header(b"s", b'2', 0, false), b"");
    let err = both(&t.end(), opts).unwrap_err();
    assert!(
        err.to_string().contains("link target of 200 bytes"),
        "{err}"
    );
}

#[test]
fn decompression_bombs_stop_early() {
    let mut t = TestTar::default();
    t.file(b"zeros", &vec![0u8; 64 << 20]);
    let gz = gzip_compress(&t.end(), 9);
    let opts = IndexOptions {
        max_inflate_ratio: 100,
        inflate_ratio_slack: 1 << 20,
        ..IndexOptions::default()
    };
    let err = index_blob(&gz, opts).unwrap_err();
    let IndexError::Gzip(GzipError::RatioExceeded {
        compressed,
        uncompressed,
        limit: 100,
    }) = err
    else {
        panic!("{err}");
    };
    assert!(
        uncompressed > 100 * compressed && uncompressed < 2 << 20,
        "{err}"
    );
    assert!(err.is_hostile());
    assert!(err.to_string().contains("more than 100 times"), "{err}");
    // Under the slack, or with a high enough ratio, the same layer is fine.
    let lenient = IndexOptions {
        inflate_ratio_slack: 128 << 20,
        ..opts
    };
    assert!(index_blob(&gz, lenient).is_ok());
}

#[test]
fn zstd_limits_refuse_bombs_and_frame_floods_and_skip_huge_windows() {
    let mut t = TestTar::default();
    t.file(b"zeros", &vec![0u8; 64 << 20]);
    let tar = t.end();
    let zst = zstd_compress(&tar, 19);
    let opts = IndexOptions {
        max_inflate_ratio: 100,
        inflate_ratio_slack: 1 << 20,
        ..IndexOptions::default()
    };
    let err = index_blob(&zst, opts).unwrap_err();
    assert!(
        matches!(err, IndexError::Zstd(ZstdError::RatioExceeded { uncompressed, .. }) if uncompressed < 4 << 20),
        "{err}"
    );
    assert!(
        err.is_hostile() && err.to_string().contains("more than 100 times"),
        "{err}"
    );
    assert!(
        index_blob(&zst, IndexOptions::default()).is_ok(),
        "a 64 MiB zero file is fine"
    );
    // A frame asking for a larger window than allowed: not decoded (not indexed, but not
    // hostile either: the layer is still served for full pulls).
    let noisy: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut t = TestTar::default();
    t.file(b"noise", &noisy);
    let zst = zstd_compress(&t.end(), 3);
    let small = IndexOptions {
        max_zstd_window_log: 16,
        ..IndexOptions::default()
    };
    let err = index_blob(&zst, small).unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::Zstd(ZstdError::WindowTooLarge { limit: 65536, .. })
        ),
        "{err}"
    );
    assert!(
        !err.is_hostile() && err.to_string().contains("window larger than"),
        "{err}"
    );
    // Many tiny frames.
    let mut t = TestTar::default();
    t.file(b"f", &[7u8; 20_000]);
    let tar = t.end();
    let frames: Vec<u8> = tar.chunks(100).flat_map(|c| zstd_compress(c, 1)).collect();
    let few = IndexOptions {
        max_zstd_frames: 50,
        ..IndexOptions::default()
    };
    assert_eq!(
        index_blob(&frames, few).unwrap_err(),
        IndexError::Zstd(ZstdError::TooManyFrames { limit: 50 })
    );
    assert_eq!(
        index_blob(&frames, IndexOptions::default())
            .unwrap()
            .entries
            .len(),
        1
    );
    // Truncated or followed by garbage: malformed, not hostile.
    let zst = zstd_compress(&tar, 3);
    let err = index_blob(&zst[..zst.len() - 3], IndexOptions::default()).unwrap_err();
    assert!(matches!(err, IndexError::Zstd(ZstdError::Truncated { .. })) && !err.is_hostile());
    let err = index_blob(&[&zst[..], b"junk!"].concat(), IndexOptions::default()).unwrap_err();
    assert!(matches!(err, IndexError::Zstd(ZstdError::Corrupt { .. })) && !err.is_hostile());
}

#[test]
fn index_size_is_limited() {
    let mut t = TestTar::default();
    for i in 0..100 {
        t.file(format!("{i:0>90}").as_bytes(), b"");
    }
    let tar = t.end();
    let idx = index_blob(&tar, IndexOptions::default()).unwrap();
    let exact = idx.encoded_len();
    assert!(idx.encode().len() as u64 <= exact + idx.windows_size + 64);
    let opts = |max_index_bytes| IndexOptions {
        max_index_bytes,
        ..IndexOptions::default()
    };
    assert!(index_blob(&tar, opts(exact)).is_ok());
    let err = index_blob(&tar, opts(exact - 1)).unwrap_err();
    assert!(matches!(err, IndexError::TooLarge { .. }) && err.is_hostile());
    // Stopped while streaming, long before the end, when far over the limit.
    let mut b = IndexBuilder::new(opts(1000));
    let at = tar.chunks(BLOCK).position(|block| b.push(block).is_err());
    assert!(at.is_some_and(|at| at < 30), "{at:?}");
}

#[test]
fn malformed_streams_are_format_errors_not_hostile() {
    let mut t = TestTar::default();
    t.file(b"f", b"data");
    let tar = t.end();
    let mut bad = tar.clone();
    bad[0] ^= 1; // name changed, checksum not
    let err = index_blob(&bad, IndexOptions::default()).unwrap_err();
    assert_eq!(err, IndexError::Tar(TarError::BadChecksum { offset: 0 }));
    assert!(!err.is_hostile());
    let mut gz = gzip_compress(&tar, 6);
    let end = gz.len() as u64;
    gz.extend_from_slice(b"garbage");
    let err = index_blob(&gz, IndexOptions::default()).unwrap_err();
    assert_eq!(
        err,
        IndexError::Gzip(GzipError::TrailingGarbage { offset: end })
    );
    assert!(!err.is_hostile());
    let mut b = IndexBuilder::new(IndexOptions::default());
    b.push(&gz[..10]).unwrap();
    assert!(b.finish(Digest::of(b"")).is_err());
}
