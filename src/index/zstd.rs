//! zstd decoding with the hostile-input limits, for indexing and for reads.
//!
//! [`ZstdInflater`] is fed a zstd blob (one frame or many, skippable frames included) in
//! slices of any size and hands the decoded bytes to a callback. It enforces:
//! - a largest window ([`IndexOptions::max_zstd_window_log`](crate::index::IndexOptions)),
//!   the memory a decoder must keep; a frame asking for more is refused
//!   ([`ZstdError::WindowTooLarge`]);
//! - a largest frame count ([`ZstdError::TooManyFrames`]);
//! - the same decompression-bomb ratio limit as gzip ([`ZstdError::RatioExceeded`]).
//!
//! A plain zstd stream cannot be entered in the middle of a frame (a decoder's state is
//! its whole window), so readers restart only at frame starts: [`decode_from_frame`]
//! decodes consecutive frames from a frame start. For plain zstd layers the frames are
//! those of the proxy's seekable copy ([`crate::index::zstd_copy`]).

use crate::index::gzip::RatioLimit;
use zstd::zstd_safe::{self, DCtx, DParameter, InBuffer, OutBuffer};

/// Largest window a zstd frame may ask for by default: 2^27 = 128 MiB (zstd's own
/// default decoding limit).
pub const DEFAULT_MAX_WINDOW_LOG: u32 = 27;
/// Largest number of frames in one zstd layer by default.
pub const DEFAULT_MAX_FRAMES: u64 = 2_000_000;
/// First bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Output buffer size of the decoder.
const OUT_BUF: usize = 256 * 1024;
/// libzstd's name for a frame whose window exceeds `windowLogMax`.
const WINDOW_TOO_LARGE: &str = "Frame requires too much memory for decoding";

/// Errors of zstd decoding (and of the seekable copy's encoding).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZstdError {
    /// The compressed data is invalid.
    #[error("corrupt zstd data at compressed offset {offset}: {message}")]
    Corrupt { offset: u64, message: String },
    /// The blob ended inside a frame.
    #[error("zstd stream truncated: the blob ended inside a frame after {offset} bytes")]
    Truncated { offset: u64 },
    /// A frame needs a larger window than allowed.
    #[error("zstd frame at or before compressed offset {offset} needs a window larger than the limit of {limit} bytes")]
    WindowTooLarge { offset: u64, limit: u64 },
    /// More frames than allowed.
    #[error("zstd stream has more than {limit} frames")]
    TooManyFrames { limit: u64 },
    /// The stream decodes to more than the allowed multiple of its compressed size.
    #[error("zstd stream decodes {uncompressed} bytes from {compressed}: more than {limit} times its compressed size")]
    RatioExceeded {
        compressed: u64,
        uncompressed: u64,
        limit: u64,
    },
    /// The compressed bytes supplied to a read ran out before the requested output.
    #[error("compressed input ran out after producing {produced} of {wanted} requested bytes")]
    NeedMoreInput { produced: usize, wanted: usize },
    /// Encoding a frame of the seekable copy failed.
    #[error("zstd encoder error: {0}")]
    Encode(String),
}

impl ZstdError {
    /// Whether the layer broke a limit meant to stop an attack (hostile: refused),
    /// rather than being malformed or beyond what is indexed. A window over the limit is
    /// not hostile: the decoder refuses it from the frame header, before allocating
    /// anything, and such a layer (`zstd --long`) is legitimate: it is stored and served
    /// for full pulls, only not indexed.
    pub fn is_hostile(&self) -> bool {
        matches!(
            self,
            ZstdError::TooManyFrames { .. } | ZstdError::RatioExceeded { .. }
        )
    }
}

/// Limits of a [`ZstdInflater`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZstdLimits {
    pub max_window_log: u32,
    pub max_frames: u64,
    pub ratio: Option<RatioLimit>,
}

impl Default for ZstdLimits {
    fn default() -> Self {
        ZstdLimits {
            max_window_log: DEFAULT_MAX_WINDOW_LOG,
            max_frames: DEFAULT_MAX_FRAMES,
            ratio: None,
        }
    }
}

fn decoder(max_window_log: u32) -> Result<DCtx<'static>, ZstdError> {
    let mut d = DCtx::try_create().ok_or_else(|| ZstdError::Corrupt {
        offset: 0,
        message: "cannot allocate a zstd decoder".into(),
    })?;
    d.set_parameter(DParameter::WindowLogMax(max_window_log.clamp(10, 31)))
        .map_err(|c| ZstdError::Encode(zstd_safe::get_error_name(c).to_string()))?;
    Ok(d)
}

fn decode_error(code: usize, offset: u64, max_window_log: u32) -> ZstdError {
    let message = zstd_safe::get_error_name(code);
    if message == WINDOW_TOO_LARGE {
        ZstdError::WindowTooLarge {
            offset,
            limit: 1u64 << max_window_log.min(63),
        }
    } else {
        ZstdError::Corrupt {
            offset,
            message: message.to_string(),
        }
    }
}

/// Push-based zstd decoder with limits; see the module documentation.
pub struct ZstdInflater {
    dctx: DCtx<'static>,
    limits: ZstdLimits,
    out: Vec<u8>,
    consumed: u64,
    produced: u64,
    frames: u64,
    /// Inside a frame: input of it was consumed and its end not seen yet.
    in_frame: bool,
}

impl ZstdInflater {
    /// A decoder at the start of a zstd blob.
    pub fn new(limits: ZstdLimits) -> Result<Self, ZstdError> {
        Ok(ZstdInflater {
            dctx: decoder(limits.max_window_log)?,
            limits,
            out: vec![0; OUT_BUF],
            consumed: 0,
            produced: 0,
            frames: 0,
            in_frame: false,
        })
    }

    /// Decodes `data`, handing the output to `sink` in pieces. The sink's error ends
    /// decoding and is returned.
    pub fn feed<E: From<ZstdError>>(
        &mut self,
        data: &[u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut input = InBuffer::around(data);
        loop {
            let before = input.pos();
            let mut output = OutBuffer::around(&mut self.out[..]);
            let hint = self
                .dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|c| {
                    decode_error(
                        c,
                        self.consumed + input.pos() as u64,
                        self.limits.max_window_log,
                    )
                })?;
            let n = output.pos();
            let full = n == OUT_BUF;
            if input.pos() > before || n > 0 {
                self.in_frame = true;
            }
            if hint == 0 {
                self.in_frame = false;
                self.frames += 1;
                if self.frames > self.limits.max_frames {
                    return Err(ZstdError::TooManyFrames {
                        limit: self.limits.max_frames,
                    }
                    .into());
                }
            }
            self.produced += n as u64;
            if n > 0 {
                self.check_ratio(self.consumed + input.pos() as u64)?;
                sink(&self.out[..n])?;
            }
            if input.pos() == data.len() && !full {
                break;
            }
            if n == 0 && input.pos() == before && hint != 0 {
                // No progress with input left: cannot happen with a sound decoder.
                return Err(ZstdError::Corrupt {
                    offset: self.consumed + before as u64,
                    message: "decoder made no progress".into(),
                }
                .into());
            }
        }
        self.consumed += data.len() as u64;
        Ok(())
    }

    fn check_ratio(&self, consumed: u64) -> Result<(), ZstdError> {
        let Some(limit) = self.limits.ratio else {
            return Ok(());
        };
        let out = self.produced;
        if out > limit.slack && out > consumed.max(1).saturating_mul(limit.max_ratio) {
            return Err(ZstdError::RatioExceeded {
                compressed: consumed,
                uncompressed: out,
                limit: limit.max_ratio,
            });
        }
        Ok(())
    }

    /// Checks the blob ended at a frame boundary; returns the decoded size.
    pub fn finish(self) -> Result<u64, ZstdError> {
        if self.in_frame || self.frames == 0 {
            return Err(ZstdError::Truncated {
                offset: self.consumed,
            });
        }
        Ok(self.produced)
    }

    /// Whether the input so far ended exactly at the end of a frame (or is empty).
    pub fn at_frame_boundary(&self) -> bool {
        !self.in_frame
    }

    /// Bytes decoded so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }
}

/// Decodes consecutive frames of `compressed` (which starts at a frame start), discards
/// the first `skip` bytes of output and returns the next `want` bytes; fewer only if the
/// input ends. The decoder keeps at most a `2^max_window_log` window.
pub fn decode_from_frame(
    compressed: &[u8],
    skip: u64,
    want: usize,
    max_window_log: u32,
) -> Result<Vec<u8>, ZstdError> {
    let mut d = decoder(max_window_log)?;
    let mut scratch = vec![0u8; OUT_BUF.min(skip as usize).max(1)];
    let mut out: Vec<u8> = Vec::with_capacity(want);
    let mut input = InBuffer::around(compressed);
    let mut to_skip = skip;
    while out.len() < want {
        let before = input.pos();
        let (n, hint) = if to_skip > 0 {
            let cap = scratch
                .len()
                .min(usize::try_from(to_skip).unwrap_or(usize::MAX));
            let mut o = OutBuffer::around(&mut scratch[..cap]);
            let hint = d
                .decompress_stream(&mut o, &mut input)
                .map_err(|c| decode_error(c, input.pos() as u64, max_window_log))?;
            to_skip -= o.pos() as u64;
            (o.pos(), hint)
        } else {
            let len = out.len();
            out.resize(want, 0);
            let mut o = OutBuffer::around_pos(&mut out[..], len);
            let hint = d
                .decompress_stream(&mut o, &mut input)
                .map_err(|c| decode_error(c, input.pos() as u64, max_window_log))?;
            let pos = o.pos();
            out.truncate(pos);
            (pos - len, hint)
        };
        if n == 0 && input.pos() == before && (hint != 0 || input.pos() == compressed.len()) {
            break; // input exhausted (or stuck): return what came out
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `data` compressed as one zstd frame by libzstd (as the `zstd` CLI does).
    pub fn zstd_compress(data: &[u8], level: i32) -> Vec<u8> {
        zstd::bulk::compress(data, level).unwrap()
    }

    fn decode_all(blob: &[u8], step: usize, limits: ZstdLimits) -> Result<Vec<u8>, ZstdError> {
        let mut d = ZstdInflater::new(limits)?;
        let mut out = Vec::new();
        for piece in blob.chunks(step.max(1)) {
            d.feed(piece, &mut |b: &[u8]| -> Result<(), ZstdError> {
                out.extend_from_slice(b);
                Ok(())
            })?;
        }
        assert_eq!(d.finish()?, out.len() as u64);
        Ok(out)
    }

    #[test]
    fn decodes_multi_frame_streams_in_any_slices() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut blob = zstd_compress(&data[..1_000_000], 3);
        // A skippable frame between two frames.
        blob.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        blob.extend_from_slice(&zstd_compress(&data[1_000_000..], 19));
        for step in [1, 7, 4096, blob.len()] {
            assert!(decode_all(&blob, step, ZstdLimits::default()).unwrap() == data);
        }
        let second = blob.len() - zstd_compress(&data[1_000_000..], 19).len();
        let got = decode_from_frame(&blob[second..], 5, 100, 27).unwrap();
        assert!(got == data[1_000_005..1_000_105]);
        let got = decode_from_frame(&blob, 999_990, 20, 27).unwrap();
        assert!(got == data[999_990..1_000_010], "reads across frames");
        let short = decode_from_frame(&blob[..second - 11], 999_990, 20, 27).unwrap();
        assert_eq!(short.len(), 10, "fewer bytes when the input ends");
    }

    #[test]
    fn limits_and_bad_streams_are_errors() {
        let data = vec![0u8; 50 << 20];
        let blob = zstd_compress(&data, 3);
        let limits = ZstdLimits {
            ratio: Some(RatioLimit {
                max_ratio: 100,
                slack: 1 << 20,
            }),
            ..ZstdLimits::default()
        };
        let err = decode_all(&blob, 1 << 16, limits).unwrap_err();
        assert!(matches!(err, ZstdError::RatioExceeded { .. }), "{err}");
        assert!(err.is_hostile());
        let small = ZstdLimits {
            max_window_log: 12,
            ..ZstdLimits::default()
        };
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let err = decode_all(&zstd_compress(&big, 3), 4096, small).unwrap_err();
        assert!(matches!(err, ZstdError::WindowTooLarge { .. }), "{err}");
        assert!(!err.is_hostile());
        let frames: Vec<u8> = (0..5).flat_map(|_| zstd_compress(b"x", 1)).collect();
        let few = ZstdLimits {
            max_frames: 4,
            ..ZstdLimits::default()
        };
        assert_eq!(
            decode_all(&frames, 3, few).unwrap_err(),
            ZstdError::TooManyFrames { limit: 4 }
        );
        let cut = zstd_compress(&big, 3);
        let err = decode_all(&cut[..cut.len() / 2], 999, ZstdLimits::default()).unwrap_err();
        assert!(matches!(err, ZstdError::Truncated { .. }), "{err}");
        let mut bad = cut.clone();
        bad.extend_from_slice(b"garbage!");
        let err = decode_all(&bad, 999, ZstdLimits::default()).unwrap_err();
        assert!(matches!(err, ZstdError::Corrupt { .. }), "{err}");
        assert!(!err.is_hostile());
    }
}
