//! The index builder's zstd mode: decoding with limits, the layer's frame table, and
//! the choice between reading the layer's own frames and writing a seekable copy.
//!
//! The blob is split at its frame boundaries ([`FrameWalker`]) before it is decoded
//! ([`ZstdInflater`], window, frame count and ratio limits), so the uncompressed offset
//! of every frame start is known. How lazy reads will work is decided by the first data
//! frame with output, whose output is kept meanwhile (at most [`DIRECT_FRAME`] bytes):
//! - **Direct**: it decodes to at most [`DIRECT_FRAME`] bytes (zstd:chunked, whose first
//!   frame holds the headers before the first file's content, and which starts a frame
//!   per file and per rolling-checksum chunk; pzstd; the zstd seekable format; any small
//!   layer). The checkpoints are the layer's own data-frame
//!   starts (empty window) and reads fetch ranges of the layer blob itself: no copy.
//!   If the blob ends in a zstd:chunked footer, its TOC is checked against the stream
//!   ([`crate::index::zstd_chunked::verify`]) and bound in the index.
//! - **Copy**: it decodes to more (the `zstd` CLI, containers/image's plain zstd):
//!   the kept output and the rest go to a [`CopyWriter`], whose frames are the
//!   checkpoints ([`crate::index::zstd_copy`]). A TOC at the end is then ignored.
//!
//! A layer decided Direct whose later frames are large (two streams concatenated, the
//! first small; a zstd:chunked file whose content the rolling checksum does not cut) is
//! still read correctly, only from the start of the large frame.

use crate::index::format::Checkpoint;
use crate::index::options::{IndexError, IndexOptions};
use crate::index::tar::TarScanner;
use crate::index::zstd::{ZstdError, ZstdInflater};
use crate::index::zstd_chunked::{self, ContentHasher, Skippable, Stream, TocBinding};
use crate::index::zstd_copy::{CopyChunk, CopyWriter, SeekableCopy};
use crate::index::zstd_frames::{FrameEnd, FrameKind, FrameWalker};
use crate::index::Entry;
use std::collections::VecDeque;

/// Largest frame output for reads from the layer's own frames: 4 MiB.
pub const DIRECT_FRAME: u64 = 4 << 20;
/// Skippable frames kept at the end (TOC, tar-split, footer).
const KEEP_SKIPPABLE: usize = 3;

enum Reads {
    Sniff(Vec<u8>),
    Decided(Decided),
}

enum Decided {
    Direct(ContentHasher),
    Copy(Box<CopyWriter>),
}

/// What [`ZstdLayer::finish`] returns.
pub struct FinishedZstd {
    pub uncompressed_size: u64,
    pub entries: Vec<Entry>,
    pub checkpoints: Vec<Checkpoint>,
    pub copy: Option<SeekableCopy>,
    pub toc: Option<TocBinding>,
    /// Copy chunks not taken yet.
    pub copy_chunks: Vec<CopyChunk>,
}

/// A zstd layer being indexed; see the module documentation.
pub struct ZstdLayer {
    walker: FrameWalker,
    decoder: ZstdInflater,
    tar: TarScanner,
    reads: Reads,
    /// Uncompressed offset of the current frame's start.
    frame_start: u64,
    /// Largest output of a data frame that ended.
    largest: u64,
    /// `(compressed, uncompressed)` of every frame boundary (Direct and Sniff).
    boundaries: Vec<(u64, u64)>,
    /// Data-frame starts with output (Direct and Sniff).
    checkpoints: Vec<Checkpoint>,
    skippable: VecDeque<Skippable>,
    last: Option<FrameKind>,
    toc_limit: u64,
}

impl ZstdLayer {
    pub fn new(opts: &IndexOptions) -> Result<Self, IndexError> {
        Ok(ZstdLayer {
            walker: FrameWalker::new(opts.max_zstd_frames, opts.max_zstd_toc_bytes),
            decoder: ZstdInflater::new(opts.zstd_limits())?,
            tar: TarScanner::new(opts.tar()),
            reads: Reads::Sniff(Vec::new()),
            frame_start: 0,
            largest: 0,
            boundaries: vec![(0, 0)],
            checkpoints: Vec::new(),
            skippable: VecDeque::new(),
            last: None,
            toc_limit: opts.max_zstd_toc_bytes,
        })
    }

    /// The entries found so far.
    pub fn entries(&self) -> &[Entry] {
        self.tar.entries()
    }

    /// The checkpoints so far (the copy's, once a copy is written).
    pub fn checkpoints(&self) -> &[Checkpoint] {
        match &self.reads {
            Reads::Decided(Decided::Copy(w)) => w.checkpoints(),
            _ => &self.checkpoints,
        }
    }

    /// The copy's chunks completed so far (none unless a copy is written).
    pub fn take_copy_chunks(&mut self) -> Vec<CopyChunk> {
        match &mut self.reads {
            Reads::Decided(Decided::Copy(w)) => w.take_chunks(),
            _ => Vec::new(),
        }
    }

    /// Pushes the next bytes of the blob.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), IndexError> {
        while !data.is_empty() {
            let (n, ended) = self.walker.advance(data)?;
            self.decode(&data[..n])?;
            if let Some(frame) = ended {
                self.frame_ended(frame)?;
            }
            data = &data[n..];
        }
        Ok(())
    }

    fn decode(&mut self, piece: &[u8]) -> Result<(), IndexError> {
        let ZstdLayer {
            decoder,
            tar,
            reads,
            frame_start,
            largest,
            ..
        } = self;
        let mut pos = decoder.produced();
        decoder.feed(piece, &mut |out: &[u8]| -> Result<(), IndexError> {
            tar.feed(out)?;
            pos += out.len() as u64;
            match reads {
                Reads::Sniff(kept) => {
                    kept.extend_from_slice(out);
                    let frame = (pos - *frame_start).max(*largest);
                    if frame > DIRECT_FRAME {
                        let kept = std::mem::take(kept);
                        *reads = Reads::Decided(decide(kept, frame, tar.entries())?);
                    }
                }
                Reads::Decided(Decided::Direct(hasher)) => hasher.consume(out, tar.entries()),
                Reads::Decided(Decided::Copy(copy)) => copy.write(out)?,
            }
            Ok(())
        })
    }

    fn frame_ended(&mut self, frame: FrameEnd) -> Result<(), IndexError> {
        let out = self.decoder.produced();
        let direct = !matches!(self.reads, Reads::Decided(Decided::Copy(_)));
        match frame.kind {
            FrameKind::Data => {
                if !self.decoder.at_frame_boundary() {
                    return Err(ZstdError::Corrupt {
                        offset: frame.end,
                        message: "the frame's blocks end where the decoder does not".into(),
                    }
                    .into());
                }
                let size = out - self.frame_start;
                self.largest = self.largest.max(size);
                if let (Reads::Sniff(kept), true) = (&mut self.reads, size > 0) {
                    let kept = std::mem::take(kept);
                    self.reads = Reads::Decided(decide(kept, self.largest, self.tar.entries())?);
                }
                if size > 0 && direct {
                    self.checkpoints.push(Checkpoint {
                        // The first read starts at the blob's start (skippable frames
                        // before it are skipped by the decoder).
                        compressed_offset: if self.checkpoints.is_empty() {
                            0
                        } else {
                            frame.start
                        },
                        bits: 0,
                        uncompressed_offset: self.frame_start,
                        window: None,
                    });
                }
                self.skippable.clear();
            }
            FrameKind::Skippable => {
                self.skippable.push_back(Skippable {
                    start: frame.start,
                    size: frame.end - frame.start - 8,
                    content: frame.content,
                });
                if self.skippable.len() > KEEP_SKIPPABLE {
                    self.skippable.pop_front();
                }
            }
        }
        if direct {
            self.boundaries.push((frame.end, out));
        }
        self.frame_start = out;
        self.last = Some(frame.kind);
        Ok(())
    }

    /// Checks the blob ended at a frame boundary with a complete tar stream, checks a
    /// zstd:chunked TOC, and returns the index's parts.
    pub fn finish(mut self) -> Result<FinishedZstd, IndexError> {
        self.walker.finish()?;
        let decided = match std::mem::replace(&mut self.reads, Reads::Sniff(Vec::new())) {
            Reads::Sniff(kept) => decide(kept, self.largest, self.tar.entries())?,
            Reads::Decided(d) => d,
        };
        let uncompressed_size = self.decoder.finish()?;
        let entries = self.tar.finish()?;
        match decided {
            Decided::Copy(copy) => {
                let done = copy.finish()?;
                Ok(FinishedZstd {
                    uncompressed_size,
                    entries,
                    checkpoints: done.checkpoints,
                    copy: Some(done.copy),
                    toc: None,
                    copy_chunks: done.chunks,
                })
            }
            Decided::Direct(hasher) => {
                let footer = match (self.last, self.skippable.back()) {
                    (Some(FrameKind::Skippable), Some(s)) => {
                        s.content.as_deref().and_then(zstd_chunked::parse_footer)
                    }
                    _ => None,
                };
                let toc = match footer {
                    Some(footer) => {
                        let stream = Stream {
                            entries: &entries,
                            boundaries: &self.boundaries,
                            digests: hasher.digests(),
                        };
                        let skippable: Vec<Skippable> = self.skippable.into_iter().collect();
                        Some(zstd_chunked::verify(
                            &footer,
                            &skippable,
                            self.toc_limit,
                            &stream,
                        )?)
                    }
                    None => None,
                };
                Ok(FinishedZstd {
                    uncompressed_size,
                    entries,
                    checkpoints: self.checkpoints,
                    copy: None,
                    toc,
                    copy_chunks: Vec::new(),
                })
            }
        }
    }
}

/// Leaves Sniff: Direct if the first frame decoded to at most [`DIRECT_FRAME`].
fn decide(kept: Vec<u8>, largest: u64, entries: &[Entry]) -> Result<Decided, ZstdError> {
    if largest <= DIRECT_FRAME {
        let mut hasher = ContentHasher::default();
        hasher.consume(&kept, entries);
        Ok(Decided::Direct(hasher))
    } else {
        let mut copy = Box::new(CopyWriter::new()?);
        copy.write(&kept)?;
        Ok(Decided::Copy(copy))
    }
}
