//! Compressed checkpoint windows.
//!
//! A checkpoint's 32 KiB window is stored raw-deflated (no header, no trailer), so that
//! checkpoints every 1 MiB of compressed input do not make the index larger than one
//! every 4 MiB of uncompressed output did: text windows shrink 3-5 times. An empty
//! stored window means "no window" (the start of a member, or a windowless checkpoint).

use super::{GzipError, Inflate, RAW_BITS, WINDOW_SIZE};
use libz_rs_sys as z;
use std::ffi::c_int;

/// deflate level of stored windows. Level 6 stores windows of binary code about 40%
/// smaller than level 1 does; one window per MiB of compressed input costs a few % of
/// indexing time.
const WINDOW_LEVEL: c_int = 6;

/// Largest stored (compressed) window accepted: deflate's worst case for 32 KiB of
/// incompressible data is a few bytes per 16 KiB stored block over it.
pub const MAX_PACKED_WINDOW: usize = WINDOW_SIZE + 1024;

/// Raw-deflates a window (at most [`WINDOW_SIZE`] bytes); empty stays empty.
pub fn pack_window(window: &[u8]) -> Result<Vec<u8>, GzipError> {
    if window.is_empty() {
        return Ok(Vec::new());
    }
    if window.len() > WINDOW_SIZE {
        return Err(GzipError::BadCheckpoint(format!(
            "window of {} bytes",
            window.len()
        )));
    }
    let zerr = |code: c_int| GzipError::Zlib {
        code,
        message: "deflate of a window failed".into(),
    };
    let mut strm = Box::new(z::z_stream::default());
    let mut out = vec![0u8; MAX_PACKED_WINDOW];
    // SAFETY: the stream is boxed (stable address), initialised before use and ended
    // exactly once below; next_in/next_out point into live slices of the stated lengths
    // (both at most 33 KiB, so the u32 casts are exact) for the duration of the call.
    unsafe {
        let ret = z::deflateInit2_(
            &mut *strm,
            WINDOW_LEVEL,
            z::Z_DEFLATED,
            RAW_BITS,
            8,
            z::Z_DEFAULT_STRATEGY,
            z::zlibVersion(),
            std::mem::size_of::<z::z_stream>() as c_int,
        );
        if ret != z::Z_OK {
            return Err(zerr(ret));
        }
        strm.next_in = window.as_ptr();
        strm.avail_in = window.len() as u32;
        strm.next_out = out.as_mut_ptr();
        strm.avail_out = out.len() as u32;
        let ret = z::deflate(&mut *strm, z::Z_FINISH);
        let written = strm.total_out as usize;
        strm.next_in = std::ptr::null();
        strm.next_out = std::ptr::null_mut();
        z::deflateEnd(&mut *strm);
        if ret != z::Z_STREAM_END {
            return Err(zerr(ret));
        }
        out.truncate(written);
    }
    Ok(out)
}

/// Inflates a stored window; fails unless it is one complete raw deflate stream of at
/// most [`WINDOW_SIZE`] bytes.
pub fn unpack_window(packed: &[u8]) -> Result<Vec<u8>, GzipError> {
    if packed.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |what: &str| GzipError::BadCheckpoint(format!("stored window: {what}"));
    if packed.len() > MAX_PACKED_WINDOW {
        return Err(bad("too large"));
    }
    let mut z = Inflate::new(RAW_BITS)?;
    // One byte of room more than a window may hold, to tell "too long" from "exact".
    let mut out = vec![0u8; WINDOW_SIZE + 1];
    let step = z.run(packed, &mut out, z::Z_FINISH);
    if step.ret != z::Z_STREAM_END {
        return Err(bad(if step.produced > WINDOW_SIZE {
            "inflates past 32 KiB"
        } else {
            "not one complete deflate stream"
        }));
    }
    if step.consumed != packed.len() {
        return Err(bad("bytes after its end"));
    }
    out.truncate(step.produced);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::gzip::tests::test_data;

    #[test]
    fn windows_round_trip_and_bad_ones_are_refused() {
        for seed in 1..6 {
            let w = test_data(WINDOW_SIZE, seed);
            let p = pack_window(&w).unwrap();
            assert!(p.len() <= MAX_PACKED_WINDOW);
            assert_eq!(unpack_window(&p).unwrap(), w);
        }
        let noise: Vec<u8> = (0..WINDOW_SIZE as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        let p = pack_window(&noise).unwrap();
        assert!(p.len() <= MAX_PACKED_WINDOW, "{}", p.len());
        assert_eq!(unpack_window(&p).unwrap(), noise);
        let text = b"the quick brown fox ".repeat(1600);
        let p = pack_window(&text).unwrap();
        assert!(p.len() < text.len() / 10, "{} bytes", p.len());
        assert!(pack_window(&[]).unwrap().is_empty());
        assert!(unpack_window(&[]).unwrap().is_empty());
        assert!(pack_window(&vec![0; WINDOW_SIZE + 1]).is_err());
        assert!(unpack_window(&p[..p.len() - 1]).is_err(), "truncated");
        let mut extra = p.clone();
        extra.push(0);
        assert!(unpack_window(&extra).is_err(), "trailing bytes");
        // A stream that inflates past 32 KiB: the same run compressed twice as long.
        let mut longer = Vec::new();
        for _ in 0..2 {
            longer.extend_from_slice(&vec![7u8; WINDOW_SIZE]);
        }
        let long = crate::index::gzip::compress(&longer, 6).unwrap();
        assert!(
            unpack_window(&long[10..long.len() - 8]).is_err(),
            "too long"
        );
    }
}
