//! Unit tests of the index builder (gzip, tar, zstd and plain layers).

use super::*;
use crate::index::format::EntryKind;
use crate::index::gzip::tests::{gzip_compress, test_data};
use crate::index::tar::tests::TestTar;
use crate::index::tar::TarError;

fn sample_tar() -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut t = TestTar::default();
    let contents: Vec<Vec<u8>> = (0..6u64)
        .map(|i| test_data((i as usize * 700_000) % 2_500_000 + i as usize, i + 1))
        .collect();
    for (i, c) in contents.iter().enumerate() {
        t.file(format!("dir/file{i}").as_bytes(), c);
    }
    (t.end(), contents)
}

fn build(blob: &[u8], sizes: &[usize]) -> Result<LayerIndex, IndexError> {
    let mut b = IndexBuilder::new(test_options());
    let mut rest = blob;
    let mut k = 0;
    while !rest.is_empty() {
        let n = sizes[k % sizes.len()].clamp(1, rest.len());
        k += 1;
        b.push(&rest[..n])?;
        rest = &rest[n..];
    }
    b.finish(Digest::of(blob))
}

#[test]
fn plain_and_gzip_layers_index_the_same_entries() {
    let (tar, contents) = sample_tar();
    let plain = build(&tar, &[1, 2, 100_000]).unwrap();
    assert_eq!(plain.compression, Compression::None);
    assert_eq!(plain.compressed_size, tar.len() as u64);
    assert_eq!(plain.uncompressed_size, tar.len() as u64);
    assert!(plain.checkpoints.is_empty() && plain.random_access);
    assert_eq!(plain.entries.len(), contents.len());
    for (e, c) in plain.entries.iter().zip(&contents) {
        assert_eq!(e.kind, EntryKind::File);
        let at = e.content_offset as usize;
        assert!(tar[at..at + c.len()] == c[..], "{}", e.path_lossy());
    }
    let gz = gzip_compress(&tar, 6);
    let a = build(&gz, &[3, 1, 65_536]).unwrap();
    let b = build(&gz, &[gz.len()]).unwrap();
    assert_eq!(a, b, "slicing must not change the index");
    assert_eq!(a.compression, Compression::Gzip);
    assert_eq!(a.entries, plain.entries);
    assert_eq!(
        (a.compressed_size, a.uncompressed_size),
        (gz.len() as u64, tar.len() as u64)
    );
    assert!(a.checkpoints.len() > 3);
    assert_eq!(a.layer, Digest::of(&gz));
    assert_eq!(LayerIndex::decode(&a.encode()).unwrap(), a);
}

#[test]
fn default_checkpoints_are_dense_and_windows_small() {
    // Like programs and libraries: text, and binary code of a few bits of entropy
    // per byte; about 3 times compressible.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = [
        "import ", "numpy", " as ", "np\n", "def ", "return ", "self", ".data",
    ];
    let mut t = TestTar::default();
    for i in 0..6u64 {
        let mut f = Vec::with_capacity(3 << 20);
        while f.len() < 3 << 20 {
            if next() % 2 == 0 {
                (0..2000).for_each(|_| f.extend_from_slice(words[next() as usize % 8].as_bytes()));
            } else {
                f.extend((0..8000).map(|_| (next() % 23) as u8));
            }
        }
        t.file(format!("f{i}").as_bytes(), &f);
    }
    let tar = t.end();
    let gz = gzip_compress(&tar, 6);
    let idx = index_blob(&gz, IndexOptions::default()).unwrap();
    let cps = &idx.checkpoints;
    // Deflate blocks of level 6 are well under 256 KiB of input.
    let max_gap = (256 << 10) + (256 << 10);
    for w in cps.windows(2) {
        assert!(w[1].compressed_offset - w[0].compressed_offset <= max_gap);
        assert!(w[1].uncompressed_offset - w[0].uncompressed_offset <= (4 << 20) + (1 << 20));
    }
    assert!(gz.len() as u64 - cps[cps.len() - 1].compressed_offset <= max_gap);
    // The windows are compressed, and they are not in the main part: each denser
    // checkpoint costs the main part less than 64 bytes.
    let stored = idx.windows_size as usize;
    let raw = (cps.len() - 1) * crate::index::gzip::WINDOW_SIZE;
    assert!(stored < raw * 3 / 4, "{stored} bytes of windows, raw {raw}");
    let sparse = IndexOptions {
        checkpoint_compressed_span: u64::MAX,
        ..IndexOptions::default()
    };
    let v1 = index_blob(&gz, sparse).unwrap();
    assert!(
        cps.len() > v1.checkpoints.len(),
        "denser: {} vs {}",
        cps.len(),
        v1.checkpoints.len()
    );
    let more = idx.encoded_len() - v1.encoded_len();
    assert!(
        more < 64 * (cps.len() - v1.checkpoints.len()) as u64,
        "main part grew by {more} bytes"
    );
    // And every checkpoint still restarts: read across each one.
    for cp in cps {
        let at = cp.uncompressed_offset.saturating_sub(5);
        let got = crate::index::read_stored(&idx, at, 1000, &mut |r: std::ops::Range<u64>| {
            Ok::<_, std::io::Error>(gz[r.start as usize..r.end as usize].to_vec())
        })
        .unwrap();
        let end = (at as usize + 1000).min(tar.len());
        assert!(got == tar[at as usize..end]);
    }
}

#[test]
fn zstd_layers_index_the_same_entries_with_a_seekable_copy() {
    let (tar, _) = sample_tar();
    let plain = build(&tar, &[100_000]).unwrap();
    let zst = crate::index::zstd::tests::zstd_compress(&tar, 3);
    let idx = build(&zst, &[3, 1, 65_536]).unwrap();
    assert_eq!(
        idx,
        build(&zst, &[zst.len()]).unwrap(),
        "slicing must not change the index"
    );
    assert_eq!(idx.compression, Compression::Zstd);
    assert!(idx.random_access);
    assert_eq!(idx.entries, plain.entries);
    assert_eq!(
        (idx.compressed_size, idx.uncompressed_size),
        (zst.len() as u64, tar.len() as u64)
    );
    let copy = idx.copy.as_ref().unwrap();
    assert_eq!(idx.readable_blob(), (copy.digest, copy.size));
    assert_eq!(idx.checkpoints.len(), tar.len().div_ceil(1 << 20));
    assert!(idx
        .checkpoints
        .iter()
        .all(|c| c.window.is_none() && c.bits == 0));
    assert_eq!(LayerIndex::decode(&idx.encode()).unwrap(), idx);
    let (_, copy_bytes) = index_blob_with_copy(&zst, test_options()).unwrap();
    assert_eq!(Digest::of(&copy_bytes), copy.digest);
    assert!(zstd::bulk::decompress(&copy_bytes, tar.len()).unwrap() == tar);
    let err = build(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], &[1]).unwrap_err();
    assert!(matches!(err, IndexError::Zstd(_)), "{err}");
}

#[test]
fn bad_streams_are_errors() {
    let (tar, _) = sample_tar();
    let mut gz = gzip_compress(&tar, 6);
    gz.extend_from_slice(b"\0\0garbage");
    assert!(matches!(
        build(&gz, &[4096]),
        Err(IndexError::Gzip(GzipError::TrailingGarbage { .. }))
    ));
    let cut = gzip_compress(&tar[..tar.len() / 2], 6);
    assert!(matches!(
        build(&cut, &[4096]),
        Err(IndexError::Tar(TarError::Truncated { .. }))
    ));
    assert!(matches!(
        build(&gz[..gz.len() / 2], &[4096]),
        Err(IndexError::Gzip(GzipError::Truncated { .. }))
    ));
    assert!(matches!(
        build(b"ab", &[1]),
        Err(IndexError::Tar(TarError::Truncated { .. }))
    ));
    // Poisoned after an error.
    let mut b = IndexBuilder::new(test_options());
    let first = b
        .push(b"\x1f\x8b\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        .unwrap_err();
    assert_eq!(b.push(&tar).unwrap_err(), first);
    assert_eq!(b.finish(Digest::of(b"")).unwrap_err(), first);
    let empty = build(b"", &[1]).unwrap();
    assert!(empty.entries.is_empty() && empty.compression == Compression::None);
    let err = build(&gz, &[4096]).unwrap_err().to_string();
    assert!(err.contains("trailing garbage"), "{err}");
}
