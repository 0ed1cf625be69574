//! Reads of layers' tar streams, span by span: from the on-disk inflated cache
//! ([`crate::inflated`]) when the span is present there, else inflated once (concurrent
//! readers of a span share one run, [`crate::flight`]) and stored. Reads of different
//! spans inflate in parallel on the FUSE worker threads, and a file read sequentially has
//! its next spans inflated ahead of it on a small pool of readahead threads.
//!
//! Readahead is for sequential reads only, kernel-style ([`Runs`]): a file's reads that
//! follow one another form a run, and once a run has read [`SEQUENTIAL_MIN`] the spans
//! after it are inflated ahead, as far as the run has read (at most [`READAHEAD_BYTES`]).
//! A read elsewhere (an ELF header, a page fault of a mapped library) reads ahead
//! nothing: each byte read ahead of such a read is a compressed byte fetched that the
//! container may never use.
//!
//! A layer whose inflated file cannot be used (it cannot be created, or a span cannot be
//! written, e.g. the disk is full) keeps its spans in a small memory cache instead.

use crate::flight::{Flights, Joined};
use crate::fs::{BlobSource, MountStats};
use crate::inflated::LayerFile;
use crate::span_cache::SpanCache;
use crate::view::ImageView;
use imgd_core::index::{read_stored_with, span_of, ReadError, WindowRef};
use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Byte budget of the memory cache for layers that cannot use their inflated file.
const MEMORY_SPANS_BYTES: usize = 32 << 20;

/// Spans longer than this (encoders that emit huge deflate blocks leave few checkpoints)
/// are not kept whole; reads then inflate just the range they need.
const MAX_SPAN: u64 = 64 << 20;

/// How far ahead of a sequential read spans are inflated, at most.
const READAHEAD_BYTES: u64 = 16 << 20;

/// How much of a file a run of sequential reads must have read before spans are read
/// ahead of it (more than the kernel's own readahead of a read or a page fault, 1 MiB).
pub const SEQUENTIAL_MIN: u64 = 2 << 20;

/// How far past the end of a run a read may start and still continue it (reads of the
/// kernel's readahead arrive on several FUSE threads, not always in order).
const RUN_SLACK: u64 = 1 << 20;

/// Files whose runs are tracked at most; beyond, the table starts afresh.
const MAX_RUNS: usize = 4096;

/// Readahead threads, and spans queued for them at most.
const READAHEAD_THREADS: usize = 2;
const READAHEAD_QUEUE: usize = 16;

type Key = (usize, u64);

struct Inner {
    view: Arc<ImageView>,
    source: Arc<dyn BlobSource>,
    stats: Arc<MountStats>,
    files: Vec<Option<LayerFile>>,
    memory: SpanCache,
    flights: Flights<Key, Arc<Vec<u8>>>,
    queued: Mutex<HashSet<Key>>,
    runs: Mutex<Runs>,
}

/// A file's current run of sequential reads (stream offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    start: u64,
    end: u64,
}

/// The runs of sequential reads of files, by (layer, file start), and how far to read
/// ahead of each read.
#[derive(Default)]
pub struct Runs(std::collections::HashMap<Key, Run>);

impl Runs {
    /// Notes a read of `read` in the file starting at `file` of `layer`; returns how many
    /// bytes past `read.end` to read ahead (0 unless the read continues a run that has
    /// read at least [`SEQUENTIAL_MIN`]).
    pub fn note(&mut self, layer: usize, file: u64, read: Range<u64>) -> u64 {
        if self.0.len() >= MAX_RUNS {
            self.0.clear();
        }
        let run = self.0.entry((layer, file)).or_insert(Run {
            start: read.start,
            end: read.start,
        });
        if read.end <= run.end && read.start >= run.start {
            // Within the run (a late read of the kernel's readahead): nothing new.
            return 0;
        }
        if read.start < run.start || read.start > run.end.saturating_add(RUN_SLACK) {
            // A jump: a new run starts here.
            *run = Run {
                start: read.start,
                end: read.end,
            };
        } else {
            run.end = run.end.max(read.end);
        }
        let len = run.end - run.start;
        if len < SEQUENTIAL_MIN {
            0
        } else {
            len.min(READAHEAD_BYTES)
        }
    }
}

/// The span reader of one mount (clones share it).
#[derive(Clone)]
pub struct SpanReader {
    inner: Arc<Inner>,
    readahead: SyncSender<Key>,
}

/// Where a mount keeps inflated spans.
pub struct SpanStore<'a> {
    /// The inflated cache's root (`CACHE_DIR/inflated`), or `None` for memory only.
    pub root: Option<&'a Path>,
    /// Fault injection: a pause halfway through writing each span.
    pub write_pause: Option<Duration>,
}

impl SpanReader {
    /// A reader of `view`'s layers through `source`, opening (and leasing, for as long
    /// as the reader lives) each layer's inflated file under `store.root`.
    pub fn new(
        view: Arc<ImageView>,
        source: Arc<dyn BlobSource>,
        stats: Arc<MountStats>,
        store: SpanStore<'_>,
    ) -> SpanReader {
        let files = view
            .layers()
            .iter()
            .map(|index| {
                let root = store.root?;
                match LayerFile::open(root, &index.layer, index.uncompressed_size) {
                    Ok(f) => Some(f.with_write_pause(store.write_pause)),
                    Err(e) => {
                        tracing::warn!(layer = %index.layer, error = %e, "no inflated cache on disk for this layer: spans kept in memory");
                        None
                    }
                }
            })
            .collect();
        let inner = Arc::new(Inner {
            view,
            source,
            stats,
            files,
            memory: SpanCache::new(MEMORY_SPANS_BYTES),
            flights: Flights::default(),
            queued: Mutex::new(HashSet::new()),
            runs: Mutex::new(Runs::default()),
        });
        let (tx, rx) = sync_channel(READAHEAD_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..READAHEAD_THREADS {
            let (inner, rx) = (inner.clone(), rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("readahead-{n}"))
                .spawn(move || readahead_worker(&inner, &rx));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a readahead thread");
            }
        }
        SpanReader {
            inner,
            readahead: tx,
        }
    }

    /// The `len` bytes at `at` of layer `layer`'s stream (fewer at its end).
    pub fn read(&self, layer: usize, at: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        self.inner.read(layer, at, len)
    }

    /// True if `range` of layer `layer`'s stream is on disk already.
    pub fn is_present(&self, layer: usize, range: Range<u64>) -> bool {
        self.inner.file(layer).is_some_and(|f| f.present(&range))
    }

    /// Notes the read `read` (stream range) of `file` (a stream range of `layer`) and, if
    /// it continues a sequential run ([`Runs`]), queues the spans of `file` that follow
    /// it for inflation by the readahead threads.
    pub fn read_ahead(&self, layer: usize, file: Range<u64>, read: Range<u64>) {
        let Some(index) = self.inner.view.layer(layer) else {
            return;
        };
        let ahead = self
            .inner
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(layer, file.start, read.clone());
        if ahead == 0 {
            return;
        }
        let read_end = read.end;
        let stop = file.end.min(read_end.saturating_add(ahead));
        let mut pos = read_end;
        while pos < stop {
            let span = span_of(index, pos);
            if span.end <= pos {
                break;
            }
            pos = span.end;
            // The span holding `read_end` is being read now; only whole later ones.
            if span.start < read_end || span.end - span.start > MAX_SPAN {
                continue;
            }
            let key = (layer, span.start);
            if self.inner.is_ready_or_running(layer, &span) {
                continue;
            }
            if !self
                .inner
                .queued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key)
            {
                continue;
            }
            if let Err(TrySendError::Full(k) | TrySendError::Disconnected(k)) =
                self.readahead.try_send(key)
            {
                self.inner.unqueue(&k);
                break;
            }
        }
    }
}

fn readahead_worker(inner: &Inner, rx: &Mutex<Receiver<Key>>) {
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((layer, start)) = next else { return };
        inner.unqueue(&(layer, start));
        let Some(index) = inner.view.layer(layer) else {
            continue;
        };
        let span = span_of(index, start);
        if inner.is_ready_or_running(layer, &span) {
            continue;
        }
        match inner.span(layer, span) {
            Ok(_) => {
                inner.stats.spans_read_ahead.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(layer, start, error = %e, "readahead failed"),
        }
    }
}

impl Inner {
    fn unqueue(&self, key: &Key) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The window callback of reads of `layer`: from the source (the reader checks each
    /// against its sha256).
    fn windows(
        &self,
        layer: usize,
    ) -> impl FnMut(usize, &WindowRef) -> Result<Vec<u8>, ReadError> + '_ {
        move |checkpoint, w| {
            self.source
                .window(layer, checkpoint, w)
                .map_err(|message| ReadError::WindowFetch {
                    checkpoint,
                    message,
                })
        }
    }

    fn file(&self, layer: usize) -> Option<&LayerFile> {
        self.files.get(layer).and_then(Option::as_ref)
    }

    fn is_ready_or_running(&self, layer: usize, span: &Range<u64>) -> bool {
        self.flights.is_running(&(layer, span.start))
            || self.file(layer).is_some_and(|f| f.present(span))
    }

    fn read(&self, layer: usize, at: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let index = self
            .view
            .layer(layer)
            .ok_or_else(|| ReadError::BadIndex(format!("no layer {layer}")))?;
        let end = at.saturating_add(len as u64).min(index.uncompressed_size);
        if at >= end {
            return Ok(Vec::new());
        }
        // Warm: one pread of the whole range.
        if let Some(file) = self.file(layer) {
            if file.present(&(at..end)) {
                self.stats.disk_reads.fetch_add(1, Ordering::Relaxed);
                return file
                    .read_at(at, (end - at) as usize)
                    .map_err(|e| ReadError::Fetch(e.into()));
            }
        }
        let mut out = Vec::with_capacity((end - at) as usize);
        let mut pos = at;
        while pos < end {
            let span = span_of(index, pos);
            if span.end <= pos {
                break;
            }
            let stop = end.min(span.end);
            let file = self.file(layer).filter(|f| f.present(&(pos..stop)));
            if let Some(file) = file {
                self.stats.disk_reads.fetch_add(1, Ordering::Relaxed);
                let bytes = file
                    .read_at(pos, (stop - pos) as usize)
                    .map_err(|e| ReadError::Fetch(e.into()))?;
                out.extend_from_slice(&bytes);
            } else if span.end - span.start > MAX_SPAN {
                let mut fetch = |r: Range<u64>| self.source.read(layer, r);
                let n = (stop - pos) as usize;
                let bytes = read_stored_with(index, pos, n, &mut fetch, &mut self.windows(layer))?;
                out.extend_from_slice(&bytes);
            } else {
                let start = span.start;
                let data = self.span(layer, span)?;
                let (a, b) = ((pos - start) as usize, (stop - start) as usize);
                out.extend_from_slice(data.get(a..b).ok_or_else(|| {
                    ReadError::BadIndex("span shorter than the index says".into())
                })?);
            }
            pos = stop;
        }
        Ok(out)
    }

    /// The bytes of `span` of `layer`, inflated (once, however many threads ask) and
    /// stored on disk, or from the memory cache of a layer that has no usable file.
    fn span(&self, layer: usize, span: Range<u64>) -> Result<Arc<Vec<u8>>, ReadError> {
        let index = self
            .view
            .layer(layer)
            .ok_or_else(|| ReadError::BadIndex(format!("no layer {layer}")))?;
        let inflate = || -> Result<Arc<Vec<u8>>, ReadError> {
            if let Some(file) = self.file(layer).filter(|f| f.present(&span)) {
                // Another process, or a run that just ended here, stored it meanwhile.
                let bytes = file
                    .read_at(span.start, (span.end - span.start) as usize)
                    .map_err(|e| ReadError::Fetch(e.into()))?;
                return Ok(Arc::new(bytes));
            }
            let mut asked = 0u64;
            let mut fetch = |r: Range<u64>| {
                asked += r.end - r.start;
                self.source.read(layer, r)
            };
            let bytes = read_stored_with(
                index,
                span.start,
                (span.end - span.start) as usize,
                &mut fetch,
                &mut self.windows(layer),
            )?;
            if (bytes.len() as u64) < span.end - span.start {
                return Err(ReadError::BadIndex(
                    "span shorter than the index says".into(),
                ));
            }
            self.stats.spans_inflated.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "imgd_bytes", layer, start = span.start, end = span.end, compressed = asked, thread = std::thread::current().name().unwrap_or(""), "span inflated");
            let bytes = Arc::new(bytes);
            let stored = match self.file(layer) {
                Some(file) => match file.commit(span.start, &bytes) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(layer = %index.layer, error = %e, "could not store an inflated span: kept in memory");
                        false
                    }
                },
                None => false,
            };
            if !stored {
                self.memory.insert(layer, span.start, bytes.clone());
            }
            Ok(bytes)
        };
        if let Some(hit) = self.memory.get(layer, span.start) {
            return Ok(hit);
        }
        self.flights
            .run((layer, span.start), inflate)
            .map_err(|e| match e {
                Ok(own) => own,
                Err(Joined(msg)) => ReadError::Fetch(msg.into()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_lone_read_reads_nothing_ahead() {
        let mut runs = Runs::default();
        // An ELF header, then a page fault's read-around elsewhere in the same file.
        assert_eq!(runs.note(0, 0, 0..832), 0);
        assert_eq!(runs.note(0, 0, 10 * MIB..11 * MIB), 0);
        assert_eq!(
            runs.note(0, 0, 3 * MIB..4 * MIB),
            0,
            "a jump back starts afresh"
        );
    }

    #[test]
    fn a_sequential_run_reads_ahead_as_far_as_it_has_read() {
        let mut runs = Runs::default();
        let mut ahead = Vec::new();
        for k in 0..40u64 {
            ahead.push(runs.note(1, 100, 100 + k * MIB..100 + (k + 1) * MIB));
        }
        assert_eq!(&ahead[..2], &[0, 2 * MIB], "from SEQUENTIAL_MIN on");
        assert_eq!(ahead[7], 8 * MIB, "the window grows with the run");
        assert_eq!(ahead[39], READAHEAD_BYTES, "up to READAHEAD_BYTES");
    }

    #[test]
    fn reads_out_of_order_within_the_slack_continue_the_run() {
        let mut runs = Runs::default();
        assert_eq!(runs.note(0, 0, 0..MIB), 0);
        // The kernel's next two readahead reads, the later one first.
        assert_eq!(runs.note(0, 0, 2 * MIB..3 * MIB), 3 * MIB);
        assert_eq!(runs.note(0, 0, MIB..2 * MIB), 0, "nothing new");
        assert_eq!(runs.note(0, 0, 3 * MIB..4 * MIB), 4 * MIB);
        // Another file's reads are their own run.
        assert_eq!(runs.note(0, 50 * MIB, 50 * MIB..51 * MIB), 0);
    }
}
