//! The engine's events and their queue: earliest first, ties in the order queued.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Clone, Copy, Debug)]
pub enum Event {
    /// A host's prefetch is asked for: its start-up begins.
    Begin(u32),
    /// The proxy starts ingesting the image's blobs (asked for their chunk lists).
    Ingest,
    /// A host starts fetching a blob (chunk list known, providers gathered).
    BlobReady { host: u32, blob: u32 },
    /// A CPU may have finished jobs (superseded unless `epoch` is still its current one).
    CpuDone { cpu: u32, epoch: u64 },
    /// A chunk's last byte reached a host; it is verified next.
    Received { host: u32, chunk: u32 },
    /// Subscribers now see that `host` holds `chunk`.
    Visible { host: u32, chunk: u32 },
    /// Subscribers now see that `host` fetches `chunk`.
    InFlight { host: u32, chunk: u32 },
    /// A host pushes its map's changes to its subscribers (at most once per interval).
    Push(u32),
    /// A host with free slots and nothing to start looks again.
    Tick(u32),
}

struct Queued {
    at: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    // Earliest first out of the max-heap.
    fn cmp(&self, o: &Self) -> Ordering {
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
pub struct Queue {
    heap: BinaryHeap<Queued>,
    seq: u64,
}

impl Queue {
    pub fn push(&mut self, at: f64, event: Event) {
        self.seq += 1;
        self.heap.push(Queued {
            at,
            seq: self.seq,
            event,
        });
    }

    pub fn pop(&mut self) -> Option<(f64, Event)> {
        self.heap.pop().map(|q| (q.at, q.event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_ties_in_order() {
        let mut q = Queue::default();
        q.push(2.0, Event::Tick(2));
        q.push(1.0, Event::Tick(1));
        q.push(1.0, Event::Tick(3));
        let order: Vec<u32> = std::iter::from_fn(|| q.pop())
            .map(|(_, e)| match e {
                Event::Tick(h) => h,
                _ => u32::MAX,
            })
            .collect();
        assert_eq!(order, [1, 3, 2]);
    }
}
