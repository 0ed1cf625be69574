//! [`IndexBuilder`]: builds a [`LayerIndex`] while a layer blob streams past, in one pass
//! and bounded memory (apart from the entry list).
//!
//! - gzip blobs are inflated with a [`CheckpointingInflater`] whose output feeds the
//!   [`TarScanner`] directly; the index gets the inflater's checkpoints, and their
//!   packed windows go to the builder's [`WindowSink`] as they are made (a `Vec<u8>` by
//!   default, attached to the index; a caller with large layers gives a sink that
//!   spools them to a file, [`IndexBuilder::with_window_sink`]).
//! - Plain tar blobs feed the scanner directly.
//! - zstd blobs are decoded with a [`ZstdInflater`] (window, frame count and ratio
//!   limits) whose output feeds the [`TarScanner`] and a [`CopyWriter`], which writes the
//!   layer's seekable copy (independent 1 MiB frames); the index gets the copy's frame
//!   starts as checkpoints and binds the copy. The copy's chunks are taken from the
//!   builder as they fill ([`IndexBuilder::take_copy_chunks`]) and stored by the caller.

use crate::digest::Digest;
use crate::index::format::{Compression, LayerIndex};
use crate::index::gzip::{CheckpointingInflater, GzipError};
use crate::index::options::SizeFloor;
pub use crate::index::options::{IndexError, IndexOptions};
use crate::index::tar::TarScanner;
use crate::index::window_sink::WindowSink;
use crate::index::zstd_copy::CopyChunk;
use crate::index::zstd_layer::ZstdLayer;

/// Bytes needed to tell the compression apart.
const DETECT_LEN: usize = 4;

enum Mode<W> {
    /// Fewer than [`DETECT_LEN`] bytes seen so far.
    Detect(Vec<u8>),
    Gzip {
        inflater: Box<CheckpointingInflater<W>>,
        tar: Box<TarScanner>,
    },
    Plain(Box<TarScanner>),
    Zstd(Box<ZstdLayer>),
}

/// Builds a [`LayerIndex`] from a blob pushed in slices of any size.
///
/// After an error the builder is poisoned: later `push` and `finish` calls return the
/// same error.
pub struct IndexBuilder<W = Vec<u8>> {
    opts: IndexOptions,
    mode: Mode<W>,
    /// The window sink until a gzip inflater takes it (and after, for other layers).
    sink: Option<W>,
    size: u64,
    floor: SizeFloor,
    failed: Option<IndexError>,
}

/// What [`IndexBuilder::finish_parts`] returns.
pub struct BuiltIndex<W> {
    /// The index, without its windows part in memory (`windows` is `None`;
    /// `windows_size` says how many bytes the sink got).
    pub index: LayerIndex,
    /// The seekable copy's chunks not taken yet (zstd layers).
    pub copy_chunks: Vec<CopyChunk>,
    /// The sink, holding the windows part (nothing was written to it unless
    /// `index.windows_size > 0`).
    pub windows: W,
}

impl IndexBuilder {
    /// A builder at the start of a blob, keeping the windows part in memory.
    pub fn new(opts: IndexOptions) -> Self {
        Self::with_window_sink(opts, Vec::new())
    }

    /// Checks the blob ended properly (complete gzip or zstd stream, tar end marker or
    /// end at a header boundary) and returns its index, windows part attached.
    pub fn finish(self, layer: Digest) -> Result<LayerIndex, IndexError> {
        self.finish_with_copy(layer).map(|(index, _)| index)
    }

    /// [`IndexBuilder::finish`], also returning the seekable copy's chunks not taken yet.
    pub fn finish_with_copy(
        self,
        layer: Digest,
    ) -> Result<(LayerIndex, Vec<CopyChunk>), IndexError> {
        let BuiltIndex {
            mut index,
            copy_chunks,
            windows,
        } = self.finish_parts(layer)?;
        if !windows.is_empty() {
            index.windows = Some(windows.into());
        }
        Ok((index, copy_chunks))
    }
}

impl<W: WindowSink> IndexBuilder<W> {
    /// A builder at the start of a blob that hands the packed windows of gzip
    /// checkpoints to `windows` as they are made.
    pub fn with_window_sink(opts: IndexOptions, windows: W) -> Self {
        IndexBuilder {
            opts,
            mode: Mode::Detect(Vec::with_capacity(DETECT_LEN)),
            sink: Some(windows),
            size: 0,
            floor: SizeFloor::default(),
            failed: None,
        }
    }

    /// The detected compression, once enough bytes were pushed.
    pub fn compression(&self) -> Option<Compression> {
        match self.mode {
            Mode::Detect(_) => None,
            Mode::Gzip { .. } => Some(Compression::Gzip),
            Mode::Plain(_) => Some(Compression::None),
            Mode::Zstd(_) => Some(Compression::Zstd),
        }
    }

    /// Bytes pushed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pushes the next bytes of the blob.
    pub fn push(&mut self, data: &[u8]) -> Result<(), IndexError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.push_inner(data);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn push_inner(&mut self, mut data: &[u8]) -> Result<(), IndexError> {
        self.size += data.len() as u64;
        if let Mode::Detect(head) = &mut self.mode {
            let take = (DETECT_LEN - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if head.len() < DETECT_LEN {
                return Ok(());
            }
            let head = std::mem::take(head);
            self.start(&head)?;
        }
        self.feed(data)
    }

    /// Leaves detection mode and feeds the buffered head.
    fn start(&mut self, head: &[u8]) -> Result<(), IndexError> {
        self.mode = match Compression::detect(head) {
            Compression::Gzip => Mode::Gzip {
                inflater: Box::new(
                    CheckpointingInflater::with_window_sink(
                        self.opts.checkpoint_span,
                        self.sink.take().ok_or_else(|| {
                            IndexError::Gzip(GzipError::WindowSink("no window sink".into()))
                        })?,
                    )?
                    .with_compressed_span(self.opts.checkpoint_compressed_span)
                    .with_ratio_limit(self.opts.ratio_limit()),
                ),
                tar: Box::new(TarScanner::new(self.opts.tar())),
            },
            Compression::None => Mode::Plain(Box::new(TarScanner::new(self.opts.tar()))),
            Compression::Zstd => Mode::Zstd(Box::new(ZstdLayer::new(&self.opts)?)),
        };
        self.feed(head)
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), IndexError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.mode {
            Mode::Gzip { inflater, tar } => {
                inflater.feed(data, &mut |out: &[u8]| {
                    tar.feed(out).map_err(IndexError::Tar)
                })?;
                self.floor.add(
                    tar.entries(),
                    inflater.checkpoints(),
                    inflater.windows_len(),
                );
            }
            Mode::Plain(tar) => {
                tar.feed(data)?;
                self.floor.add(tar.entries(), &[], 0);
            }
            Mode::Zstd(layer) => {
                layer.feed(data)?;
                self.floor.add(layer.entries(), layer.checkpoints(), 0);
            }
            Mode::Detect(_) => {}
        }
        check_size(self.floor.bytes, self.opts.max_index_bytes)
    }

    /// The chunks of the seekable copy (zstd layers) completed so far; each is returned
    /// once. The last ones come with [`IndexBuilder::finish_with_copy`].
    pub fn take_copy_chunks(&mut self) -> Vec<CopyChunk> {
        match &mut self.mode {
            Mode::Zstd(layer) => layer.take_copy_chunks(),
            _ => Vec::new(),
        }
    }

    /// Checks the blob ended properly (complete gzip or zstd stream, tar end marker or
    /// end at a header boundary) and returns its index (without the windows part in
    /// memory), the copy's last chunks and the window sink.
    pub fn finish_parts(mut self, layer: Digest) -> Result<BuiltIndex<W>, IndexError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if let Mode::Detect(head) = &mut self.mode {
            let head = std::mem::take(head);
            self.start(&head)?;
        }
        let size = self.size;
        let mut copy_chunks = Vec::new();
        let mut sink = self.sink.take();
        let index = match self.mode {
            Mode::Gzip { inflater, tar } => {
                let summary = inflater.finish()?;
                let entries = tar.finish()?;
                sink = Some(summary.windows);
                LayerIndex {
                    layer,
                    compression: Compression::Gzip,
                    compressed_size: size,
                    uncompressed_size: summary.uncompressed_size,
                    random_access: true,
                    entries,
                    checkpoints: summary.checkpoints,
                    copy: None,
                    toc: None,
                    windows_size: summary.windows_size,
                    windows: None,
                }
            }
            Mode::Plain(tar) => LayerIndex {
                layer,
                compression: Compression::None,
                compressed_size: size,
                uncompressed_size: size,
                random_access: true,
                entries: tar.finish()?,
                checkpoints: Vec::new(),
                copy: None,
                toc: None,
                windows_size: 0,
                windows: None,
            },
            Mode::Zstd(zstd) => {
                let done = zstd.finish()?;
                copy_chunks = done.copy_chunks;
                LayerIndex {
                    layer,
                    compression: Compression::Zstd,
                    compressed_size: size,
                    uncompressed_size: done.uncompressed_size,
                    random_access: true,
                    entries: done.entries,
                    checkpoints: done.checkpoints,
                    copy: done.copy,
                    toc: done.toc,
                    windows_size: 0,
                    windows: None,
                }
            }
            // `start` above always leaves detection mode.
            Mode::Detect(_) => {
                return Err(IndexError::Tar(crate::index::tar::TarError::Truncated {
                    offset: size,
                    what: "the blob's first bytes",
                }))
            }
        };
        check_size(
            index.encoded_len().saturating_add(index.windows_size),
            self.opts.max_index_bytes,
        )?;
        tracing::debug!(
            layer = %index.layer,
            compression = ?index.compression,
            entries = index.entries.len(),
            checkpoints = index.checkpoints.len(),
            "indexed layer"
        );
        let windows = sink.ok_or_else(|| {
            IndexError::Gzip(GzipError::WindowSink("the window sink was lost".into()))
        })?;
        Ok(BuiltIndex {
            index,
            copy_chunks,
            windows,
        })
    }
}

fn check_size(size: u64, limit: u64) -> Result<(), IndexError> {
    if size > limit {
        return Err(IndexError::TooLarge { size, limit });
    }
    Ok(())
}

/// Builds the index of a whole in-memory blob (convenience for tests and small blobs).
pub fn index_blob(blob: &[u8], opts: IndexOptions) -> Result<LayerIndex, IndexError> {
    let mut b = IndexBuilder::new(opts);
    b.push(blob)?;
    b.finish(Digest::of(blob))
}

/// Builds the index of a whole in-memory blob and returns the seekable copy's bytes
/// with it (empty unless the blob is zstd).
pub fn index_blob_with_copy(
    blob: &[u8],
    opts: IndexOptions,
) -> Result<(LayerIndex, Vec<u8>), IndexError> {
    let mut b = IndexBuilder::new(opts);
    b.push(blob)?;
    let mut copy: Vec<u8> = b
        .take_copy_chunks()
        .iter()
        .flat_map(|c| c.bytes.to_vec())
        .collect();
    let (index, rest) = b.finish_with_copy(Digest::of(blob))?;
    copy.extend(rest.iter().flat_map(|c| c.bytes.to_vec()));
    Ok((index, copy))
}

/// Options of the unit and property tests: a 1 MiB checkpoint span, so that test blobs of
/// a few MiB get several checkpoints.
#[cfg(test)]
pub(crate) fn test_options() -> IndexOptions {
    IndexOptions {
        checkpoint_span: 1 << 20,
        ..IndexOptions::default()
    }
}

#[cfg(test)]
#[path = "builder_tests.rs"]
mod tests;

#[cfg(test)]
mod perf {
    use super::*;
    use crate::index::gzip::tests::{gzip_compress, test_data};
    use crate::index::tar::tests::TestTar;
    use std::time::Instant;

    /// Plain streaming inflate with the same library (the floor for the indexer).
    fn plain_inflate(blob: &[u8]) -> u64 {
        use libz_rs_sys as z;
        let mut out = vec![0u8; 256 << 10];
        let mut strm = Box::new(z::z_stream::default());
        let mut total = 0u64;
        // SAFETY: test-only; boxed stream initialised before use and ended once; buffers
        // outlive every call.
        unsafe {
            assert_eq!(
                z::inflateInit2_(
                    &mut *strm,
                    31,
                    z::zlibVersion(),
                    std::mem::size_of::<z::z_stream>() as i32
                ),
                z::Z_OK
            );
            for piece in blob.chunks(256 << 10) {
                strm.next_in = piece.as_ptr();
                strm.avail_in = piece.len() as u32;
                loop {
                    strm.next_out = out.as_mut_ptr();
                    strm.avail_out = out.len() as u32;
                    let rc = z::inflate(&mut *strm, z::Z_NO_FLUSH);
                    total += (out.len() - strm.avail_out as usize) as u64;
                    if rc == z::Z_STREAM_END || strm.avail_in == 0 && strm.avail_out > 0 {
                        break;
                    }
                    assert!(rc == z::Z_OK, "{rc}");
                }
            }
            z::inflateEnd(&mut *strm);
        }
        total
    }

    /// `cargo test -p imgd-core --lib index::builder::perf -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn index_speed_vs_plain_inflate() {
        let mut t = TestTar::default();
        for i in 0..400u64 {
            t.file(
                format!("f{i}").as_bytes(),
                &test_data(((i % 9) as usize + 1) << 17, i),
            );
        }
        let tar = t.end();
        let gz = gzip_compress(&tar, 6);
        let best = |f: &mut dyn FnMut()| {
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        let plain = best(&mut || assert_eq!(plain_inflate(&gz), tar.len() as u64));
        let index = best(&mut || {
            let mut b = IndexBuilder::new(test_options());
            for piece in gz.chunks(256 << 10) {
                b.push(piece).unwrap();
            }
            b.finish(Digest::of(b"")).unwrap();
        });
        let mb = gz.len() as f64 / 1e6;
        println!(
            "{mb:.0} MB gzip ({} MB tar): plain inflate {:.0} MB/s, index {:.0} MB/s ({:.0}%)",
            tar.len() / 1_000_000,
            mb / plain,
            mb / index,
            100.0 * plain / index
        );
    }
}
