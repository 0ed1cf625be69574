//! Learned prefetch: the files an image's first container start reads are recorded, in
//! order, with the byte ranges read of each, and stored with the image at the proxy (keyed
//! by manifest digest), so any host's later mount of the image fetches what reads of those
//! ranges need first, in the background, before they are asked for: a 20 MB library of
//! which the start read 200 KB costs about 200 KB (plus the span from its checkpoint).

use crate::fetch::{FetchError, Fetcher};
use futures::StreamExt;
use imgd_core::index::plan_read;
use imgd_core::wire::{StartupTrace, MAX_TRACE_PATHS, MAX_TRACE_RANGES};
use imgd_core::ChunkList;
use imgd_fuse::view::{ImageView, Ino};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// What a recorder holds.
#[derive(Default)]
struct Recording {
    on: bool,
    /// Files opened, first open of each, in order.
    order: Vec<Ino>,
    seen: HashSet<Ino>,
    /// The byte ranges read of each opened file, sorted and disjoint.
    reads: HashMap<Ino, Vec<Range<u64>>>,
}

/// Records the regular files opened on a mount, first open of each, in order, and the
/// byte ranges read of each.
#[derive(Default)]
pub struct TraceRecorder {
    state: Mutex<Recording>,
}

impl TraceRecorder {
    /// A recorder that is recording.
    pub fn recording() -> Arc<TraceRecorder> {
        let r = TraceRecorder::default();
        r.state.lock().unwrap_or_else(|p| p.into_inner()).on = true;
        Arc::new(r)
    }

    /// Notes that `ino` was opened.
    pub fn opened(&self, ino: Ino) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.on && st.order.len() < MAX_TRACE_PATHS && st.seen.insert(ino) {
            st.order.push(ino);
        }
    }

    /// Notes that `size` bytes at `offset` of `ino` were read (of an opened file).
    pub fn read(&self, ino: Ino, offset: u64, size: u32) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.on && size > 0 && st.seen.contains(&ino) {
            let r = offset..offset.saturating_add(u64::from(size));
            add_range(st.reads.entry(ino).or_default(), r);
        }
    }

    /// Stops recording and returns the trace as paths of `view` (`None` if already taken).
    pub fn finish(&self, view: &ImageView) -> Option<StartupTrace> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.on {
            return None;
        }
        st.on = false;
        let (mut paths, mut reads) = (Vec::new(), Vec::new());
        for ino in &st.order {
            let Some(path) = path_of(view, *ino) else {
                continue;
            };
            paths.push(path);
            let ranges = st.reads.get(ino).map(Vec::as_slice).unwrap_or_default();
            reads.push(ranges.iter().map(|r| (r.start, r.end)).collect());
        }
        Some(StartupTrace { paths, reads })
    }
}

/// Adds `r` to the sorted, disjoint `ranges`, merging what it overlaps or touches; past
/// [`MAX_TRACE_RANGES`] the two ranges with the smallest gap between them are merged.
fn add_range(ranges: &mut Vec<Range<u64>>, mut r: Range<u64>) {
    let at = ranges.partition_point(|x| x.end < r.start);
    let mut end = at;
    while end < ranges.len() && ranges[end].start <= r.end {
        r.start = r.start.min(ranges[end].start);
        r.end = r.end.max(ranges[end].end);
        end += 1;
    }
    ranges.splice(at..end, [r]);
    if ranges.len() > MAX_TRACE_RANGES {
        let k = (1..ranges.len())
            .min_by_key(|&k| ranges[k].start - ranges[k - 1].end)
            .unwrap_or(1);
        ranges[k - 1].end = ranges[k].end;
        ranges.remove(k);
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

/// The compressed ranges reads of the trace's files need (from a checkpoint to the end
/// of each range read, or of the whole file for a trace without ranges), as `(layer,
/// blob range)` in trace order. Paths the view does not have are skipped, and so are
/// stream ranges `(layer, range)` `inflated` already (on disk, so reading them needs no
/// chunk).
pub fn ranges_of(
    view: &ImageView,
    trace: &StartupTrace,
    inflated: impl Fn(usize, Range<u64>) -> bool,
) -> Vec<(usize, Range<u64>)> {
    let mut wanted = Vec::new();
    for (k, path) in trace.paths.iter().enumerate() {
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
        // Ranges of the file's bytes map onto the stream only where it is stored whole.
        let parts: Vec<Range<u64>> = match trace.ranges(k) {
            Some(read) if entry.sparse.is_empty() => read
                .iter()
                .map(|&(a, b)| {
                    let (a, b) = (a.min(entry.size), b.min(entry.size));
                    stored.start + a..stored.start + b
                })
                .filter(|r| !r.is_empty())
                .collect(),
            _ => vec![stored],
        };
        for part in parts {
            if inflated(layer, part.clone()) {
                continue;
            }
            let Ok(plan) = plan_read(index, part.start, part.end - part.start) else {
                continue;
            };
            if !plan.compressed.is_empty() {
                wanted.push((layer, plan.compressed));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_merge_where_they_touch_and_stay_bounded() {
        let mut v = Vec::new();
        for r in [10..20, 30..40, 20..25, 0..5, 38..50, 5..6] {
            add_range(&mut v, r);
        }
        assert_eq!(v, vec![0..6, 10..25, 30..50]);
        let mut v = Vec::new();
        for k in 0..(MAX_TRACE_RANGES as u64 + 10) {
            add_range(&mut v, k * 100..k * 100 + 10);
        }
        assert_eq!(v.len(), MAX_TRACE_RANGES);
        assert!(
            v.windows(2).all(|w| w[0].end < w[1].start),
            "sorted, disjoint"
        );
        assert_eq!(
            (v[0].start, v[v.len() - 1].end),
            (0, (MAX_TRACE_RANGES as u64 + 9) * 100 + 10)
        );
    }

    #[test]
    fn a_recorder_keeps_the_ranges_of_opened_files_only() {
        let r = TraceRecorder::recording();
        r.read(7, 0, 100); // not opened: ignored
        r.opened(7);
        r.read(7, 4096, 4096);
        r.read(7, 0, 4096);
        let st = r.state.lock().unwrap();
        let merged = std::ops::Range {
            start: 0,
            end: 8192,
        };
        assert_eq!(st.reads.get(&7), Some(&vec![merged]));
    }
}
