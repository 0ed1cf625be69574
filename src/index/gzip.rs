//! gzip inflation with restart checkpoints (the zran technique).
//!
//! [`CheckpointingInflater`] is fed a gzip blob in slices of any size, hands the inflated
//! bytes to a callback, and records a [`Checkpoint`] at deflate block boundaries every
//! `span` uncompressed bytes or every `compressed_span` compressed bytes, whichever comes
//! first (and whenever the compressed position crossed a multiple of [`CHUNK_SIZE`]).
//! [`inflate_from_checkpoint`] restarts inflation at such a checkpoint.
//!
//! Checkpoint conventions:
//! - The first checkpoint is always the start of the blob (`compressed_offset` 0, `bits` 0,
//!   `uncompressed_offset` 0, empty window); restarting there parses the gzip header.
//! - Every other checkpoint is a raw deflate restart point: `compressed_offset` is the
//!   number of blob bytes consumed, and when `bits > 0` the top `bits` bits of the byte
//!   before it start the next block. The input for a restart therefore begins at
//!   [`input_start`]`(cp)`, one byte early when `bits > 0`.
//! - Multi-member blobs (concatenated gzip members) are supported: checkpoints are placed
//!   inside any member, including just after a member's header (a valid raw restart point
//!   with a shorter window). When inflation from a raw checkpoint reaches the end of its
//!   member, the 8-byte trailer is skipped and the next member is read in gzip mode.
//! - Bytes after the last member that do not start another member are an error
//!   ([`GzipError::TrailingGarbage`]), including zero padding; so are blobs that end
//!   inside a member ([`GzipError::Truncated`]).
//!
//! Limits: checkpoints can only sit at deflate block boundaries, so encoders that emit
//! huge blocks (zlib-ng/zlib-rs level 1 compressing a buffer in one call emits a single
//! block) get few checkpoints and reads inflate from further back (still correctly).
//! Each checkpoint's 32 KiB window is raw-deflated ([`window`]) and handed to a
//! [`WindowSink`] (about 14 KB each on a Debian image, 32 KiB on incompressible data),
//! which holds the index's windows part: in memory (`Vec<u8>`) or spooled to a file, so
//! a large layer's windows are not held in memory; readers fetch a window only when
//! they restart at its checkpoint. With the default spacing
//! (256 KiB of compressed input, at most 4 MiB of output) a read fetches at most about
//! 256 KiB of compressed input and inflates at most one span before the bytes it wants.

use crate::chunk::CHUNK_SIZE;
use crate::index::format::{Checkpoint, WindowRef};
use crate::index::window_sink::WindowSink;
use libz_rs_sys as z;
use std::ffi::c_int;

/// Default uncompressed distance between checkpoints: 4 MiB.
pub const DEFAULT_SPAN: u64 = 4 << 20;
/// Default compressed distance between checkpoints: 256 KiB (windows are fetched lazily,
/// so dense checkpoints cost a mount nothing up front).
pub const DEFAULT_COMPRESSED_SPAN: u64 = 256 << 10;
/// Size of a deflate window.
pub const WINDOW_SIZE: usize = 32 * 1024;
/// Output buffer size of the inflater.
const OUT_BUF: usize = 256 * 1024;
/// Largest input handed to one `inflate` call (`avail_in` is 32 bits).
const MAX_IN: usize = 1 << 30;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// windowBits: 15-bit window with a gzip header and trailer.
const GZIP_BITS: c_int = 15 + 16;
/// windowBits: 15-bit window, raw deflate.
const RAW_BITS: c_int = -15;

/// Errors of gzip inflation.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum GzipError {
    /// The compressed data is invalid.
    #[error("corrupt gzip data at compressed offset {offset}: {message}")]
    Corrupt { offset: u64, message: String },
    /// Bytes after the last gzip member that do not begin another member.
    #[error("trailing garbage after the last gzip member at compressed offset {offset}")]
    TrailingGarbage { offset: u64 },
    /// The blob ended inside a gzip member.
    #[error("gzip stream truncated: the blob ended inside a member after {offset} bytes")]
    Truncated { offset: u64 },
    /// The compressed bytes supplied to a restart ran out before the requested output.
    #[error("compressed input ran out after producing {produced} of {wanted} requested bytes")]
    NeedMoreInput { produced: usize, wanted: usize },
    /// A checkpoint or input slice that cannot be used.
    #[error("invalid checkpoint or input: {0}")]
    BadCheckpoint(String),
    /// The stream inflates to more than the allowed multiple of its compressed size (a
    /// decompression bomb).
    #[error("gzip stream inflates {uncompressed} bytes from {compressed}: more than {limit} times its compressed size")]
    RatioExceeded {
        compressed: u64,
        uncompressed: u64,
        limit: u64,
    },
    /// The [`WindowSink`] could not store a checkpoint's window.
    #[error("could not store the window of a checkpoint: {0}")]
    WindowSink(String),
    /// zlib failed for a reason other than bad data (allocation, internal state).
    #[error("zlib error {code}: {message}")]
    Zlib { code: i32, message: String },
}

/// Result of one [`Inflate::run`] call.
struct Step {
    ret: c_int,
    consumed: usize,
    produced: usize,
}

/// Owns one zlib inflate stream; `inflateEnd` runs on drop.
///
/// Safety reasoning: the `z_stream` lives in a `Box`, so it never moves after
/// `inflateInit2_` (zlib keeps internal state tied to it). zlib is only ever handed
/// pointers to our buffers for the duration of a single call: [`Inflate::run`] sets
/// `next_in`/`next_out` from live slices with matching lengths and clears them before
/// returning, so no dangling pointer survives a call. Every call is made on a stream that
/// was successfully initialised (construction fails otherwise) and not yet ended.
struct Inflate {
    strm: Box<z::z_stream>,
}

impl Inflate {
    fn new(window_bits: c_int) -> Result<Self, GzipError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised (allocator set) z_stream at a
        // stable heap address; the version string is zlib's own static C string.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if ret != z::Z_OK {
            return Err(GzipError::Zlib {
                code: ret,
                message: "inflateInit2 failed".into(),
            });
        }
        Ok(Inflate { strm })
    }

    /// One `inflate` call over `input` into `output`.
    fn run(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        let avail_in = input.len().min(MAX_IN);
        let avail_out = output.len().min(MAX_IN);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out as u32;
        // SAFETY: initialised stream; next_in/next_out point into live slices of at least
        // avail_in/avail_out bytes for the duration of this call.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let step = Step {
            ret,
            consumed: avail_in - self.strm.avail_in as usize,
            produced: avail_out - self.strm.avail_out as usize,
        };
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        step
    }

    fn check(&self, ret: c_int, what: &str) -> Result<(), GzipError> {
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(GzipError::Zlib {
                code: ret,
                message: format!("{what} failed"),
            })
        }
    }

    fn reset(&mut self, window_bits: c_int) -> Result<(), GzipError> {
        // SAFETY: initialised stream.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        self.check(ret, "inflateReset2")
    }

    fn prime(&mut self, bits: c_int, value: c_int) -> Result<(), GzipError> {
        // SAFETY: initialised stream.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, bits, value) };
        self.check(ret, "inflatePrime")
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), GzipError> {
        if dict.is_empty() {
            return Ok(());
        }
        // SAFETY: initialised stream; `dict` is a live slice of `dict.len()` (<= 32 KiB,
        // checked by the caller) bytes that zlib copies during the call.
        let ret =
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        self.check(ret, "inflateSetDictionary")
    }

    /// The current window (up to 32 KiB of the latest output of this member).
    fn dictionary(&self) -> Vec<u8> {
        let mut buf = vec![0u8; WINDOW_SIZE];
        let mut len: u32 = 0;
        // SAFETY: initialised stream; `buf` has the 32 KiB zlib may write, `len` is a
        // valid u32 out-pointer.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        if ret != z::Z_OK {
            return Vec::new();
        }
        buf.truncate((len as usize).min(WINDOW_SIZE));
        buf
    }

    fn message(&self) -> String {
        if self.strm.msg.is_null() {
            return "invalid data".into();
        }
        // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised in `new` and is ended exactly once here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

/// Where the inflater is in a (possibly multi-member) gzip blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Inside a member (including its header and trailer).
    InMember,
    /// After a member's trailer: the next bytes must start another member.
    BetweenMembers { magic: [u8; 2], have: usize },
}

/// What a finished inflation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InflateSummary<W = Vec<u8>> {
    /// Compressed bytes consumed (the blob size).
    pub compressed_size: u64,
    /// Uncompressed bytes produced.
    pub uncompressed_size: u64,
    /// Checkpoints, ordered, the first at offset 0.
    pub checkpoints: Vec<Checkpoint>,
    /// The sink that received the checkpoints' packed windows back to back (the index's
    /// windows part).
    pub windows: W,
    /// Bytes written to `windows`.
    pub windows_size: u64,
}

/// A bound on the inflate ratio, checked as the stream goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatioLimit {
    /// Largest allowed uncompressed / compressed ratio.
    pub max_ratio: u64,
    /// Uncompressed bytes allowed whatever the ratio (small layers of zeros are fine).
    pub slack: u64,
}

/// Push-based gzip inflater that records restart [`Checkpoint`]s as it goes, handing
/// their packed windows to a [`WindowSink`] (`W`, in memory by default).
pub struct CheckpointingInflater<W = Vec<u8>> {
    z: Inflate,
    span: u64,
    compressed_span: u64,
    limit: Option<RatioLimit>,
    phase: Phase,
    /// Compressed / uncompressed bytes of the members before the current one (zlib's
    /// counters restart with each member).
    base_in: u64,
    base_out: u64,
    out: Vec<u8>,
    out_len: usize,
    checkpoints: Vec<Checkpoint>,
    windows: W,
    windows_size: u64,
}

impl CheckpointingInflater {
    /// An inflater at the start of a gzip blob, checkpointing every `span` (at least 1)
    /// uncompressed bytes, keeping the windows in memory.
    pub fn new(span: u64) -> Result<Self, GzipError> {
        Self::with_window_sink(span, Vec::new())
    }
}

impl<W: WindowSink> CheckpointingInflater<W> {
    /// [`CheckpointingInflater::new`], handing the packed windows to `windows`.
    pub fn with_window_sink(span: u64, windows: W) -> Result<Self, GzipError> {
        Ok(CheckpointingInflater {
            z: Inflate::new(GZIP_BITS)?,
            span: span.max(1),
            compressed_span: u64::MAX,
            limit: None,
            phase: Phase::InMember,
            base_in: 0,
            base_out: 0,
            out: vec![0u8; OUT_BUF],
            out_len: 0,
            checkpoints: vec![Checkpoint {
                compressed_offset: 0,
                bits: 0,
                uncompressed_offset: 0,
                window: None,
            }],
            windows,
            windows_size: 0,
        })
    }

    /// Also checkpoints every `span` (at least 1) compressed bytes.
    pub fn with_compressed_span(mut self, span: u64) -> Self {
        self.compressed_span = span.max(1);
        self
    }

    /// Fails the inflation ([`GzipError::RatioExceeded`]) once more than `limit.slack`
    /// bytes came out and they are more than `limit.max_ratio` times the bytes consumed;
    /// checked at every 256 KiB of output and at the end of each gzip member.
    pub fn with_ratio_limit(mut self, limit: RatioLimit) -> Self {
        self.limit = Some(limit);
        self
    }

    fn check_ratio(&self) -> Result<(), GzipError> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let (cin, cout) = (self.total_in(), self.total_out());
        if cout > limit.slack && cout > cin.max(1).saturating_mul(limit.max_ratio) {
            return Err(GzipError::RatioExceeded {
                compressed: cin,
                uncompressed: cout,
                limit: limit.max_ratio,
            });
        }
        Ok(())
    }

    /// Compressed bytes consumed so far.
    pub fn total_in(&self) -> u64 {
        self.base_in + self.z.strm.total_in
    }

    /// Uncompressed bytes produced so far.
    pub fn total_out(&self) -> u64 {
        self.base_out + self.z.strm.total_out
    }

    /// Checkpoints recorded so far.
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// Bytes of packed windows recorded so far.
    pub fn windows_len(&self) -> u64 {
        self.windows_size
    }

    /// Feeds the next compressed bytes; inflated bytes are passed to `out` in order.
    pub fn feed<E: From<GzipError>>(
        &mut self,
        mut input: &[u8],
        out: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match self.phase {
                Phase::InMember => {
                    let n = self.inflate_member(input, out)?;
                    input = &input[n..];
                }
                Phase::BetweenMembers {
                    mut magic,
                    mut have,
                } => {
                    let take = (2 - have).min(input.len());
                    magic[have..have + take].copy_from_slice(&input[..take]);
                    have += take;
                    input = &input[take..];
                    if have < 2 {
                        self.phase = Phase::BetweenMembers { magic, have };
                        break;
                    }
                    if magic != GZIP_MAGIC {
                        return Err(GzipError::TrailingGarbage {
                            offset: self.total_in(),
                        }
                        .into());
                    }
                    self.phase = Phase::InMember;
                    let mut rest: &[u8] = &magic;
                    while !rest.is_empty() && self.phase == Phase::InMember {
                        let n = self.inflate_member(rest, out)?;
                        rest = &rest[n..];
                    }
                }
            }
        }
        self.flush(out)
    }

    fn flush<E>(&mut self, out: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        if self.out_len > 0 {
            let n = std::mem::take(&mut self.out_len);
            out(&self.out[..n])?;
        }
        Ok(())
    }

    /// Inflates from `input` until it is consumed or the member ends; returns the number
    /// of input bytes consumed.
    fn inflate_member<E: From<GzipError>>(
        &mut self,
        input: &[u8],
        out: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut pos = 0;
        loop {
            if self.out_len == self.out.len() {
                self.flush(out)?;
            }
            // Output stops at every multiple of OUT_BUF, where the ratio is checked: the
            // same points whatever the input slicing, so the verdict does not depend on it.
            let to_mark = OUT_BUF - (self.total_out() % OUT_BUF as u64) as usize;
            let end = self.out.len().min(self.out_len + to_mark);
            let step = self
                .z
                .run(&input[pos..], &mut self.out[self.out_len..end], z::Z_BLOCK);
            pos += step.consumed;
            self.out_len += step.produced;
            match step.ret {
                z::Z_OK => {}
                z::Z_STREAM_END => {
                    self.base_in += self.z.strm.total_in;
                    self.base_out += self.z.strm.total_out;
                    self.z.reset(GZIP_BITS)?;
                    self.phase = Phase::BetweenMembers {
                        magic: [0; 2],
                        have: 0,
                    };
                    if let Err(e) = self.check_ratio() {
                        self.flush(out)?;
                        return Err(e.into());
                    }
                    return Ok(pos);
                }
                // No progress possible: all input is consumed (the output buffer always
                // has room here), so wait for more.
                z::Z_BUF_ERROR if pos == input.len() => return Ok(pos),
                _ => {
                    // Output decoded before the bad data goes out first, so that errors
                    // come in stream order whatever the input slicing.
                    let e = self.corrupt();
                    self.flush(out)?;
                    return Err(e.into());
                }
            }
            if step.produced > 0 && self.total_out() % OUT_BUF as u64 == 0 {
                if let Err(e) = self.check_ratio() {
                    self.flush(out)?;
                    return Err(e.into());
                }
            }
            self.maybe_checkpoint()?;
            if pos == input.len() && self.out_len < self.out.len() {
                return Ok(pos);
            }
        }
    }

    fn corrupt(&self) -> GzipError {
        GzipError::Corrupt {
            offset: self.total_in(),
            message: self.z.message(),
        }
    }

    /// Records a checkpoint if inflate stopped at a (non-final) block boundary and the
    /// spacing condition holds.
    fn maybe_checkpoint(&mut self) -> Result<(), GzipError> {
        let dt = self.z.strm.data_type;
        // 128: at a block boundary; 64: the last block was just decoded (nothing follows
        // in this member); 0x38: more than 7 pending bits would not fit `bits`.
        if dt & 128 == 0 || dt & 64 != 0 || dt & 0x38 != 0 {
            return Ok(());
        }
        let cin = self.total_in();
        let cout = self.total_out();
        let Some(last) = self.checkpoints.last() else {
            return Ok(());
        };
        let chunk = CHUNK_SIZE as u64;
        let due = cout.saturating_sub(last.uncompressed_offset) >= self.span
            || cin.saturating_sub(last.compressed_offset) >= self.compressed_span
            || cin / chunk > last.compressed_offset / chunk;
        if !due || cin <= last.compressed_offset {
            return Ok(());
        }
        let packed = window::pack_window(&self.z.dictionary())?;
        let window = (!packed.is_empty()).then(|| WindowRef {
            offset: self.windows_size,
            len: packed.len() as u32,
            sha256: crate::digest::Digest::of(&packed),
        });
        if !packed.is_empty() {
            self.windows
                .append(&packed)
                .map_err(|e| GzipError::WindowSink(e.to_string()))?;
            self.windows_size += packed.len() as u64;
        }
        self.checkpoints.push(Checkpoint {
            compressed_offset: cin,
            bits: (dt & 7) as u8,
            uncompressed_offset: cout,
            window,
        });
        Ok(())
    }

    /// Checks the blob ended after a complete member and returns what was produced.
    pub fn finish(self) -> Result<InflateSummary<W>, GzipError> {
        match self.phase {
            Phase::BetweenMembers { have: 0, .. } => Ok(InflateSummary {
                compressed_size: self.base_in,
                uncompressed_size: self.base_out,
                checkpoints: self.checkpoints,
                windows: self.windows,
                windows_size: self.windows_size,
            }),
            Phase::BetweenMembers { .. } => Err(GzipError::TrailingGarbage {
                offset: self.base_in,
            }),
            Phase::InMember => Err(GzipError::Truncated {
                offset: self.total_in(),
            }),
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
mod deflate;
mod restart;
pub mod window;

#[cfg(any(test, feature = "fuzzing"))]
pub use deflate::compress;
pub use restart::{inflate_from_checkpoint, input_start, is_blob_start};
pub use window::{pack_window, unpack_window, MAX_PACKED_WINDOW};

#[cfg(test)]
pub(crate) mod tests;
