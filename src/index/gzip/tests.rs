//! Tests of the checkpointing inflater, and gzip helpers for other tests.

use super::*;

/// gzip compression for tests.
pub(crate) fn gzip_compress(data: &[u8], level: i32) -> Vec<u8> {
    compress(data, level).expect("deflate")
}

/// Deterministic test data: runs of pseudo-random bytes, text-like and zero runs.
pub(crate) fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = (next() % 20_000) as usize + 1;
        match next() % 3 {
            0 => out.extend((0..run).map(|_| next() as u8)),
            1 => out.extend((0..run).map(|i| b"the quick brown fox "[i % 20])),
            _ => out.extend(std::iter::repeat_n(0u8, run)),
        }
    }
    out.truncate(len);
    out
}

use std::convert::Infallible;

impl From<GzipError> for Infallible {
    fn from(e: GzipError) -> Self {
        panic!("{e}")
    }
}

/// Inflates `blob` fed in slices of the sizes produced by `sizes` (cycled).
fn inflate_all(
    blob: &[u8],
    span: u64,
    sizes: &[usize],
) -> Result<(Vec<u8>, InflateSummary), GzipError> {
    let mut inf = CheckpointingInflater::new(span)?;
    let mut out = Vec::new();
    let mut rest = blob;
    let mut k = 0;
    while !rest.is_empty() {
        let n = sizes[k % sizes.len()].clamp(1, rest.len());
        k += 1;
        inf.feed(&rest[..n], &mut |o: &[u8]| -> Result<(), GzipError> {
            out.extend_from_slice(o);
            Ok(())
        })?;
        rest = &rest[n..];
    }
    Ok((out, inf.finish()?))
}

fn check_restarts(blob: &[u8], data: &[u8], s: &InflateSummary) {
    let cps = &s.checkpoints;
    for (i, cp) in cps.iter().enumerate() {
        let start = input_start(cp) as usize;
        let uo = cp.uncompressed_offset as usize;
        let packed = cp.window.map_or(&[][..], |w| {
            &s.windows[w.offset as usize..(w.offset + u64::from(w.len)) as usize]
        });
        assert!(cp.window.is_none_or(|w| w.matches(packed)));
        let window = unpack_window(packed).unwrap();
        assert!(window.len() <= WINDOW_SIZE);
        if uo > 0 {
            let w = &data[uo.saturating_sub(window.len())..uo];
            assert_eq!(window.as_slice(), w, "window of checkpoint {i}");
        }
        // From the checkpoint to the next one, with exactly the bytes up to it.
        let (end_in, end_out) = cps.get(i + 1).map_or((blob.len(), data.len()), |n| {
            (n.compressed_offset as usize, n.uncompressed_offset as usize)
        });
        let got =
            inflate_from_checkpoint(cp, packed, &blob[start..end_in], 0, end_out - uo).unwrap();
        assert!(got == data[uo..end_out], "restart at checkpoint {i}");
        // With a skip, through to the end of the blob.
        let skip = ((end_out - uo) / 3) as u64;
        let got = inflate_from_checkpoint(cp, packed, &blob[start..], skip, usize::MAX).unwrap();
        assert!(
            got == data[uo + skip as usize..],
            "restart+skip at checkpoint {i}"
        );
    }
}

#[test]
fn checkpoints_restart_and_do_not_depend_on_slicing() {
    let data = test_data(6 << 20, 7);
    let blob = gzip_compress(&data, 6);
    let (out, a) = inflate_all(&blob, 1 << 20, &[blob.len()]).unwrap();
    assert!(out == data);
    assert_eq!(a.compressed_size, blob.len() as u64);
    assert_eq!(a.uncompressed_size, data.len() as u64);
    assert!(
        a.checkpoints.len() >= 4,
        "{} checkpoints",
        a.checkpoints.len()
    );
    assert_eq!(a.checkpoints[0].compressed_offset, 0);
    for w in a.checkpoints.windows(2) {
        assert!(w[1].uncompressed_offset - w[0].uncompressed_offset >= 1 << 20);
        assert!(w[1].compressed_offset > w[0].compressed_offset);
    }
    let (out2, b) = inflate_all(&blob, 1 << 20, &[1, 7, 4096, 65_537, 3]).unwrap();
    assert!(out2 == data);
    assert_eq!(a, b);
    assert!(
        a.checkpoints.iter().any(|c| c.bits != 0),
        "expected unaligned checkpoints"
    );
    check_restarts(&blob, &data, &a);
}

#[test]
fn chunk_boundaries_get_checkpoints_even_with_a_huge_span() {
    // Poorly compressible: 6 bits of entropy per byte.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..12 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 64) as u8
        })
        .collect();
    let blob = gzip_compress(&data, 6);
    assert!(blob.len() > 2 * CHUNK_SIZE);
    let (_, s) = inflate_all(&blob, u64::MAX, &[100_000]).unwrap();
    for k in 1..=(blob.len() / CHUNK_SIZE) {
        let b = (k * CHUNK_SIZE) as u64;
        let near = s
            .checkpoints
            .iter()
            .any(|c| c.compressed_offset >= b && c.compressed_offset < b + (256 << 10));
        let offs: Vec<_> = s.checkpoints.iter().map(|c| c.compressed_offset).collect();
        assert!(
            near,
            "no checkpoint just after chunk boundary {k}: {offs:?}"
        );
    }
    check_restarts(&blob, &data, &s);
}

#[test]
fn multi_member_streams() {
    let a = test_data(3 << 20, 11);
    let b = test_data(2 << 20, 12);
    let mut blob = gzip_compress(&a, 6);
    let first_len = blob.len();
    blob.extend(gzip_compress(b"", 6));
    blob.extend(gzip_compress(&b, 9));
    let data = [a.as_slice(), b.as_slice()].concat();
    // Split the second member's magic across feeds.
    let (out, s) = inflate_all(&blob, 1 << 20, &[first_len + 1, 1, 1 << 20]).unwrap();
    assert!(out == data);
    assert!(s
        .checkpoints
        .iter()
        .any(|c| c.uncompressed_offset > a.len() as u64));
    check_restarts(&blob, &data, &s);
}

#[test]
fn errors_are_reported() {
    let data = test_data(100_000, 5);
    let blob = gzip_compress(&data, 6);
    let mut garbage = blob.clone();
    garbage.extend_from_slice(b"junk");
    assert_eq!(
        inflate_all(&garbage, DEFAULT_SPAN, &[1000]).unwrap_err(),
        GzipError::TrailingGarbage {
            offset: blob.len() as u64
        }
    );
    let mut one = blob.clone();
    one.push(0x1f);
    assert!(matches!(
        inflate_all(&one, DEFAULT_SPAN, &[1000]),
        Err(GzipError::TrailingGarbage { .. })
    ));
    assert!(matches!(
        inflate_all(&blob[..blob.len() - 3], DEFAULT_SPAN, &[1000]),
        Err(GzipError::Truncated { .. })
    ));
    let mut bad = blob.clone();
    bad[blob.len() / 2] ^= 0x55;
    bad[blob.len() / 2 + 1] ^= 0xaa;
    assert!(matches!(
        inflate_all(&bad, DEFAULT_SPAN, &[1000]),
        Err(GzipError::Corrupt { .. })
    ));
    let mut crc = blob.clone();
    let n = crc.len();
    crc[n - 6] ^= 1;
    assert!(matches!(
        inflate_all(&crc, DEFAULT_SPAN, &[1000]),
        Err(GzipError::Corrupt { .. })
    ));
    assert!(matches!(
        inflate_all(b"not gzip at all", DEFAULT_SPAN, &[3]),
        Err(GzipError::Corrupt { .. })
    ));
}

#[test]
fn restart_with_too_little_input_says_so() {
    let data = test_data(3 << 20, 9);
    let blob = gzip_compress(&data, 6);
    let (_, s) = inflate_all(&blob, 1 << 20, &[blob.len()]).unwrap();
    let cp = &s.checkpoints[1];
    let start = input_start(cp) as usize;
    let w = cp.window.unwrap().range();
    let packed = &s.windows[w.start as usize..w.end as usize];
    let err =
        inflate_from_checkpoint(cp, packed, &blob[start..start + 100], 0, 1 << 20).unwrap_err();
    assert!(matches!(err, GzipError::NeedMoreInput { .. }), "{err}");
    // A window of the wrong length is refused before it is used.
    let err = inflate_from_checkpoint(cp, &packed[1..], &blob[start..], 0, 10).unwrap_err();
    assert!(matches!(err, GzipError::BadCheckpoint(_)), "{err}");
}
