//! One-call gzip compression, for tests and fuzzing.

use super::{GzipError, GZIP_BITS};
use libz_rs_sys as z;
use std::ffi::c_int;

/// gzip-compresses `data` at `level` in one call (zlib's deflate with a gzip wrapper);
/// for tests and fuzzing.
pub fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, GzipError> {
    let mut strm = Box::new(z::z_stream::default());
    let zerr = |code: c_int| GzipError::Zlib {
        code,
        message: "deflate failed".into(),
    };
    let mut out = vec![0u8; data.len() + data.len() / 100 + 1024];
    let avail = u32::try_from(data.len()).map_err(|_| zerr(z::Z_BUF_ERROR))?;
    // SAFETY: the stream is boxed, initialised before use and ended once; the input and
    // output pointers are live slices of the stated lengths.
    unsafe {
        let ret = z::deflateInit2_(
            &mut *strm,
            level,
            z::Z_DEFLATED,
            GZIP_BITS,
            8,
            z::Z_DEFAULT_STRATEGY,
            z::zlibVersion(),
            std::mem::size_of::<z::z_stream>() as c_int,
        );
        if ret != z::Z_OK {
            return Err(zerr(ret));
        }
        strm.next_in = data.as_ptr();
        strm.avail_in = avail;
        strm.next_out = out.as_mut_ptr();
        strm.avail_out = out.len() as u32;
        let ret = z::deflate(&mut *strm, z::Z_FINISH);
        out.truncate(strm.total_out as usize);
        z::deflateEnd(&mut *strm);
        if ret != z::Z_STREAM_END {
            return Err(zerr(ret));
        }
    }
    Ok(out)
}
