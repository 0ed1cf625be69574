//! The frame structure of a zstd blob, walked from its raw bytes without decoding them.
//!
//! [`FrameWalker`] parses frame headers and block headers only (RFC 8878 §3.1), so it
//! knows where every frame starts and ends, which frames are skippable, and keeps the
//! content of small skippable frames (where zstd:chunked stores its TOC and footer).
//! The builder splits the blob at these boundaries before decoding, so that it knows the
//! uncompressed offset of every frame start: the checkpoints of a layer whose own frames
//! are small enough to read from ([`crate::index::zstd_layer`]). The decoder checks the
//! frames' contents; the walker checks that they end where it says (the builder compares).

use crate::index::zstd::ZstdError;

/// The magic number of a zstd data frame, little-endian.
const DATA_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames have magic numbers `0x184D2A50..=0x184D2A5F`.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Largest block content (RFC 8878: `Block_Maximum_Size` is at most 128 KiB).
const MAX_BLOCK: u32 = 128 << 10;
/// Capture buffers grow as bytes arrive, from at most this much.
const CAPTURE_START: usize = 1 << 20;

/// Whether a frame holds data or is skippable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Data,
    Skippable,
}

/// A frame that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameEnd {
    pub kind: FrameKind,
    /// Offset of its first byte (its magic number) in the blob.
    pub start: u64,
    /// Offset just past its last byte.
    pub end: u64,
    /// The content of a skippable frame (after its 8-byte header) if it was at most the
    /// capture limit; `None` for data frames and larger skippable frames.
    pub content: Option<Vec<u8>>,
}

enum State {
    Magic {
        buf: [u8; 4],
        n: usize,
    },
    Header {
        buf: [u8; 14],
        n: usize,
        need: usize,
    },
    BlockHeader {
        buf: [u8; 3],
        n: usize,
    },
    Block {
        left: u32,
        last: bool,
    },
    Checksum {
        left: usize,
    },
    SkipSize {
        buf: [u8; 4],
        n: usize,
    },
    SkipContent {
        left: u64,
        capture: Option<Vec<u8>>,
    },
}

/// Push-based walker of a zstd blob's frames; see the module documentation.
pub struct FrameWalker {
    state: State,
    offset: u64,
    start: u64,
    checksum: bool,
    frames: u64,
    max_frames: u64,
    capture_limit: u64,
}

fn corrupt(offset: u64, message: &str) -> ZstdError {
    ZstdError::Corrupt {
        offset,
        message: message.to_string(),
    }
}

/// Bytes of the frame header after the descriptor byte, from the descriptor (RFC 8878
/// §3.1.1.1.1): window descriptor, dictionary id and frame content size fields.
fn header_rest(fhd: u8) -> usize {
    let single_segment = fhd & 0x20 != 0;
    let window = usize::from(!single_segment);
    let dict = [0, 1, 2, 4][usize::from(fhd & 3)];
    let fcs = match fhd >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    window + dict + fcs
}

impl FrameWalker {
    /// A walker at the start of a blob, refusing more than `max_frames` frames and
    /// keeping the content of skippable frames of at most `capture_limit` bytes.
    pub fn new(max_frames: u64, capture_limit: u64) -> Self {
        FrameWalker {
            state: State::Magic { buf: [0; 4], n: 0 },
            offset: 0,
            start: 0,
            checksum: false,
            frames: 0,
            max_frames,
            capture_limit,
        }
    }

    /// Frames that ended so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Consumes `data` up to the end of the current frame or of `data`: returns how
    /// many bytes were consumed and the frame that ended with them, if one did.
    pub fn advance(&mut self, data: &[u8]) -> Result<(usize, Option<FrameEnd>), ZstdError> {
        let mut i = 0;
        while i < data.len() {
            let at = self.offset + i as u64;
            let avail = &data[i..];
            let mut ended = None;
            match &mut self.state {
                State::Magic { buf, n } => {
                    buf[*n] = avail[0];
                    *n += 1;
                    i += 1;
                    if *n == 4 {
                        let magic = u32::from_le_bytes(*buf);
                        self.state = if magic == DATA_MAGIC {
                            State::Header {
                                buf: [0; 14],
                                n: 0,
                                need: 1,
                            }
                        } else if magic & !0xF == SKIPPABLE_MAGIC {
                            State::SkipSize { buf: [0; 4], n: 0 }
                        } else {
                            return Err(corrupt(self.start, "not a zstd frame (bad magic number)"));
                        };
                    }
                }
                State::Header { buf, n, need } => {
                    buf[*n] = avail[0];
                    *n += 1;
                    i += 1;
                    if *n == 1 {
                        if buf[0] & 0x08 != 0 {
                            return Err(corrupt(at, "reserved bit set in a zstd frame header"));
                        }
                        self.checksum = buf[0] & 0x04 != 0;
                        *need = 1 + header_rest(buf[0]);
                    }
                    if *n == *need {
                        self.state = State::BlockHeader { buf: [0; 3], n: 0 };
                    }
                }
                State::BlockHeader { buf, n } => {
                    buf[*n] = avail[0];
                    *n += 1;
                    i += 1;
                    if *n == 3 {
                        let v =
                            u32::from(buf[0]) | u32::from(buf[1]) << 8 | u32::from(buf[2]) << 16;
                        let (last, kind, size) = (v & 1 == 1, (v >> 1) & 3, v >> 3);
                        if kind == 3 || size > MAX_BLOCK {
                            return Err(corrupt(at, "invalid zstd block header"));
                        }
                        let left = if kind == 1 { 1 } else { size };
                        self.state = State::Block { left, last };
                        ended = self.block_done_if_empty();
                    }
                }
                State::Block { left, .. } => {
                    let take = (*left as usize).min(avail.len());
                    *left -= take as u32;
                    i += take;
                    ended = self.block_done_if_empty();
                }
                State::Checksum { left } => {
                    let take = (*left).min(avail.len());
                    *left -= take;
                    i += take;
                    if *left == 0 {
                        ended = Some(FrameKind::Data);
                    }
                }
                State::SkipSize { buf, n } => {
                    buf[*n] = avail[0];
                    *n += 1;
                    i += 1;
                    if *n == 4 {
                        let size = u64::from(u32::from_le_bytes(*buf));
                        let capture = (size <= self.capture_limit)
                            .then(|| Vec::with_capacity((size as usize).min(CAPTURE_START)));
                        self.state = State::SkipContent {
                            left: size,
                            capture,
                        };
                        if size == 0 {
                            ended = Some(FrameKind::Skippable);
                        }
                    }
                }
                State::SkipContent { left, capture } => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(avail.len());
                    if let Some(c) = capture {
                        c.extend_from_slice(&avail[..take]);
                    }
                    *left -= take as u64;
                    i += take;
                    if *left == 0 {
                        ended = Some(FrameKind::Skippable);
                    }
                }
            }
            if let Some(kind) = ended {
                let end = self.offset + i as u64;
                let old = std::mem::replace(&mut self.state, State::Magic { buf: [0; 4], n: 0 });
                let content = match old {
                    State::SkipContent { capture, .. } => capture,
                    _ => None,
                };
                let frame = FrameEnd {
                    kind,
                    start: self.start,
                    end,
                    content,
                };
                self.offset = end;
                self.start = end;
                self.frames += 1;
                if self.frames > self.max_frames {
                    return Err(ZstdError::TooManyFrames {
                        limit: self.max_frames,
                    });
                }
                return Ok((i, Some(frame)));
            }
        }
        self.offset += data.len() as u64;
        Ok((data.len(), None))
    }

    /// After a block's content: the next block header, the checksum, or the frame's end.
    fn block_done_if_empty(&mut self) -> Option<FrameKind> {
        let State::Block { left: 0, last } = self.state else {
            return None;
        };
        if !last {
            self.state = State::BlockHeader { buf: [0; 3], n: 0 };
            None
        } else if self.checksum {
            self.state = State::Checksum { left: 4 };
            None
        } else {
            Some(FrameKind::Data)
        }
    }

    /// Checks the blob ended at a frame boundary.
    pub fn finish(&self) -> Result<(), ZstdError> {
        match self.state {
            State::Magic { n: 0, .. } => Ok(()),
            _ => Err(ZstdError::Truncated {
                offset: self.offset,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::zstd::tests::zstd_compress;

    fn walk(blob: &[u8], step: usize) -> Result<Vec<FrameEnd>, ZstdError> {
        let mut w = FrameWalker::new(1000, 16);
        let mut out = Vec::new();
        for mut piece in blob.chunks(step) {
            while !piece.is_empty() {
                let (n, ended) = w.advance(piece)?;
                out.extend(ended);
                piece = &piece[n..];
            }
        }
        w.finish()?;
        Ok(out)
    }

    #[test]
    fn finds_every_frame_and_keeps_small_skippable_contents() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let a = zstd_compress(&data, 3);
        let b = zstd::bulk::Compressor::new(1)
            .and_then(|mut c| {
                c.include_checksum(true)?;
                c.compress(&data[..1000])
            })
            .unwrap();
        let skip_small = [0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 7, 8, 9];
        let mut skip_big = vec![0x5f, 0x2a, 0x4d, 0x18, 20, 0, 0, 0];
        skip_big.extend_from_slice(&[1; 20]);
        let blob = [&a[..], &skip_small, &b, &skip_big, &zstd_compress(b"", 1)].concat();
        for step in [1, 3, 4096, blob.len()] {
            let frames = walk(&blob, step).unwrap();
            let kinds: Vec<_> = frames.iter().map(|f| f.kind).collect();
            use FrameKind::*;
            assert_eq!(kinds, [Data, Skippable, Data, Skippable, Data]);
            assert_eq!((frames[0].start, frames[0].end), (0, a.len() as u64));
            assert_eq!(frames[1].content.as_deref(), Some(&[7u8, 8, 9][..]));
            assert_eq!(frames[2].end - frames[2].start, b.len() as u64);
            assert_eq!(frames[3].content, None, "over the capture limit");
            assert_eq!(frames[4].end, blob.len() as u64);
        }
        let err = walk(&blob[..blob.len() - 1], 100).unwrap_err();
        assert!(matches!(err, ZstdError::Truncated { .. }), "{err}");
        let err = walk(b"\x28\xb5\x2f\xfe....", 1).unwrap_err();
        assert!(matches!(err, ZstdError::Corrupt { offset: 0, .. }), "{err}");
        let mut w = FrameWalker::new(2, 0);
        let three = [&skip_small[..], &skip_small, &skip_small].concat();
        let mut rest = &three[..];
        let err = loop {
            match w.advance(rest) {
                Ok((n, _)) => rest = &rest[n..],
                Err(e) => break e,
            }
        };
        assert_eq!(err, ZstdError::TooManyFrames { limit: 2 });
    }
}
