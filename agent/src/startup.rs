//! Learned prefetch: the files an image's first container start reads are recorded, in
//! order, and stored with the image at the proxy (keyed by manifest digest), so any host's
//! later mount of the image fetches those files' chunks first, in the background, before
//! they are asked for.

use crate::fetch::{FetchError, Fetcher};
use futures::StreamExt;
use imgd_core::index::plan_read;
use imgd_core::wire::{StartupTrace, MAX_TRACE_PATHS};
use imgd_core::ChunkList;
use imgd_fuse::view::{ImageView, Ino};
use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Records the regular files opened on a mount, first open of each, in order.
#[derive(Default)]
pub struct TraceRecorder {
    state: Mutex<(bool, Vec<Ino>, HashSet<Ino>)>,
}

impl TraceRecorder {
    /// A recorder that is recording.
    pub fn recording() -> Arc<TraceRecorder> {
        let r = TraceRecorder::default();
        r.state.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
        Arc::new(r)
    }

    /// Notes that `ino` was opened.
    pub fn opened(&self, ino: Ino) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (on, order, seen) = &mut *st;
        if *on && order.len() < MAX_TRACE_PATHS && seen.insert(ino) {
            order.push(ino);
        }
    }

    /// Stops recording and returns the trace as paths of `view` (`None` if already taken).
    pub fn finish(&self, view: &ImageView) -> Option<StartupTrace> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.0 {
            return None;
        }
        st.0 = false;
        let paths = st.1.iter().filter_map(|&ino| path_of(view, ino)).collect();
        Some(StartupTrace { paths })
    }
}

/// The path of `ino` in `view` (one of them, for hard links).
fn path_of(view: &ImageView, ino: Ino) -> Option<Vec<u8>> {
    let mut parts = Vec::new();
    let mut cur = ino;
    while cur != view.root() {
        let parent = view.node(cur)?.parent;
        let (name, _) = view.children(parent).find(|(_, i)| *i == cur)?;
        parts.push(name.to_vec());
        cur = parent;
    }
    parts.reverse();
    Some(parts.join(&b'/'))
}

/// The compressed ranges a read of each of the trace's files needs (from its checkpoint
/// to its end), as `(layer, blob range)` in trace order. Paths the view does not have
/// are skipped, and so are files whose stream range `(layer, range)` is `inflated`
/// already (on disk, so reading them needs no chunk).
pub fn ranges_of(
    view: &ImageView,
    trace: &StartupTrace,
    inflated: impl Fn(usize, Range<u64>) -> bool,
) -> Vec<(usize, Range<u64>)> {
    let mut wanted = Vec::new();
    for path in &trace.paths {
        let Some((layer, entry)) = view
            .resolve_path(path)
            .and_then(|ino| view.file_source(ino))
        else {
            continue;
        };
        let Some(index) = view.layer(layer) else {
            continue;
        };
        let stored = entry.content_offset..entry.content_offset + entry.stored_size();
        if inflated(layer, stored.clone()) {
            continue;
        }
        let Ok(plan) = plan_read(index, stored.start, stored.end - stored.start) else {
            continue;
        };
        if !plan.compressed.is_empty() {
            wanted.push((layer, plan.compressed));
        }
    }
    wanted
}

/// The chunks holding the trace's files, as `(layer, chunk)` pairs in trace order, each
/// once. Paths the view does not have are skipped, and so are files whose stream range
/// `(layer, range)` is `inflated` already (on disk, so reading them needs no chunk).
pub fn chunks_of(
    view: &ImageView,
    lists: &[ChunkList],
    trace: &StartupTrace,
    inflated: impl Fn(usize, std::ops::Range<u64>) -> bool,
) -> Vec<(usize, usize)> {
    let mut wanted: Vec<(usize, usize)> = Vec::new();
    let mut seen = HashSet::new();
    for (layer, range) in ranges_of(view, trace, inflated) {
        let Some(list) = lists.get(layer) else {
            continue;
        };
        for i in list.chunks_covering(range) {
            if seen.insert((layer, i)) {
                wanted.push((layer, i));
            }
        }
    }
    wanted
}

/// Fetches the chunks holding the trace's files into the cache, file by file in trace
/// order (a few chunks at once). Returns the bytes it had to fetch.
pub async fn warm(
    fetcher: &Fetcher,
    view: &ImageView,
    lists: &[ChunkList],
    trace: &StartupTrace,
) -> Result<u64, FetchError> {
    let wanted = chunks_of(view, lists, trace, |_, _| false);
    let mut fetched = 0;
    let mut jobs = futures::stream::iter(wanted)
        .map(|(layer, i)| async move { fetcher.chunk(&lists[layer], i).await })
        .buffered(WARM_PARALLEL);
    while let Some(r) = jobs.next().await {
        let (bytes, was_fetched) = r?;
        if was_fetched {
            fetched += bytes.len() as u64;
        }
    }
    Ok(fetched)
}

/// Chunks of a startup trace fetched at once.
pub const WARM_PARALLEL: usize = 4;
