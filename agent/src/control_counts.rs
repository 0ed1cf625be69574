//! Control requests this host sent, by kind and by blob: what finding a blob's holders
//! and keeping their have-maps fresh costs (chunk requests aside). Shown in the status
//! JSON (`control_requests`, per blob) and as `imgd_agent_control_requests_total{kind}`.
//!
//! For one fetch of one blob (`imgctl prefetch`) a host sends at most
//! [`requests_per_blob_bound`]`(max_asked_peers)` requests, whatever the number of hosts:
//! [`crate::holders::MAX_PROVIDER_LOOKUPS`] provider lookups, one provider announcement
//! and one withdrawal, and at most `2 × max_asked_peers` subscriptions
//! ([`crate::holders::SUBSCRIBE_BUDGET`]). With the default 16 that is **42**. Pushed
//! have-maps are answers, not requests; they are counted apart (`pushed`) and bounded by
//! rate (one per 50 ms per subscription) and by the blob's chunk changes. Mount reads
//! without a running blob fetch ask up to `max_asked_peers` peers per uncached read
//! (`have`), which this bound does not cover.

use imgd_core::Digest;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// Kinds of control traffic, with their names in the status JSON and the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    /// A Kademlia provider lookup (`get_providers`).
    ProviderLookup,
    /// A provider announcement (`start_providing`).
    Provide,
    /// A withdrawn announcement (`stop_providing`, on eviction).
    Withdraw,
    /// A have-map subscription on the data plane.
    Subscribe,
    /// A one-off have-map request on the data plane.
    Have,
    /// A have-map a subscription pushed to this host (not a request).
    Pushed,
}

const KINDS: [ControlKind; 6] = [
    ControlKind::ProviderLookup,
    ControlKind::Provide,
    ControlKind::Withdraw,
    ControlKind::Subscribe,
    ControlKind::Have,
    ControlKind::Pushed,
];

impl ControlKind {
    pub fn name(self) -> &'static str {
        match self {
            ControlKind::ProviderLookup => "provider_lookup",
            ControlKind::Provide => "provide",
            ControlKind::Withdraw => "withdraw",
            ControlKind::Subscribe => "subscribe",
            ControlKind::Have => "have",
            ControlKind::Pushed => "pushed",
        }
    }

    /// Whether this host sent it (everything but [`ControlKind::Pushed`]).
    pub fn is_request(self) -> bool {
        self != ControlKind::Pushed
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The bound on control requests per host per blob fetch, for `max_asked_peers`.
pub fn requests_per_blob_bound(max_asked_peers: usize) -> u64 {
    crate::holders::MAX_PROVIDER_LOOKUPS as u64
        + 2
        + crate::holders::SUBSCRIBE_BUDGET as u64 * max_asked_peers as u64
}

/// Most blobs whose counts are kept; the oldest are dropped past it (totals stay).
pub const MAX_BLOBS_COUNTED: usize = 1024;

#[derive(Default)]
struct Counts {
    per_blob: HashMap<Digest, [u64; KINDS.len()]>,
    order: VecDeque<Digest>,
    totals: [u64; KINDS.len()],
}

/// The counters.
#[derive(Default)]
pub struct ControlCounts {
    counts: Mutex<Counts>,
}

impl ControlCounts {
    /// Counts one `kind` for `blob`.
    pub fn count(&self, blob: &Digest, kind: ControlKind) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.totals[kind.index()] += 1;
        if !c.per_blob.contains_key(blob) {
            if c.order.len() >= MAX_BLOBS_COUNTED {
                if let Some(old) = c.order.pop_front() {
                    c.per_blob.remove(&old);
                }
            }
            c.order.push_back(*blob);
        }
        c.per_blob.entry(*blob).or_default()[kind.index()] += 1;
    }

    /// Totals by kind name.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        KINDS
            .iter()
            .map(|k| (k.name(), c.totals[k.index()]))
            .collect()
    }

    /// Per blob (digest text), by kind name, kinds never counted left out.
    pub fn per_blob(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.per_blob
            .iter()
            .map(|(blob, n)| {
                let kinds = KINDS
                    .iter()
                    .filter(|k| n[k.index()] > 0)
                    .map(|k| (k.name(), n[k.index()]))
                    .collect();
                (blob.to_string(), kinds)
            })
            .collect()
    }

    /// Requests (not pushes) sent for `blob`.
    pub fn requests(&self, blob: &Digest) -> u64 {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.per_blob.get(blob).map_or(0, |n| {
            KINDS
                .iter()
                .filter(|k| k.is_request())
                .map(|k| n[k.index()])
                .sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_blob_and_in_total_and_forgets_the_oldest_blobs() {
        let c = ControlCounts::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        c.count(&a, ControlKind::ProviderLookup);
        c.count(&a, ControlKind::Subscribe);
        c.count(&a, ControlKind::Pushed);
        c.count(&b, ControlKind::Have);
        assert_eq!(c.requests(&a), 2);
        assert_eq!(c.requests(&b), 1);
        let per = c.per_blob();
        assert_eq!(per[&a.to_string()]["pushed"], 1);
        assert!(!per[&a.to_string()].contains_key("have"));
        let totals: HashMap<_, _> = c.totals().into_iter().collect();
        assert_eq!(
            (totals["subscribe"], totals["have"], totals["pushed"]),
            (1, 1, 1)
        );
        for i in 0..MAX_BLOBS_COUNTED {
            c.count(&Digest::of(&i.to_le_bytes()), ControlKind::Have);
        }
        assert_eq!(c.per_blob().len(), MAX_BLOBS_COUNTED);
        assert_eq!(c.requests(&a), 0, "the oldest blob was dropped");
        let totals: HashMap<_, _> = c.totals().into_iter().collect();
        assert_eq!(totals["have"], 1 + MAX_BLOBS_COUNTED as u64);
    }

    #[test]
    fn the_default_bound_is_42() {
        assert_eq!(requests_per_blob_bound(16), 42);
    }
}
