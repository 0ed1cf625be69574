//! Control messages per host and blob under each policy: what the swarm spends to find
//! holders and keep have-maps fresh, the data plane's chunk requests aside.

use crate::params::Policy;

/// Kademlia's replication factor: a provider record is stored on this many nodes.
const K_CLOSEST: u64 = 20;
/// Kademlia's lookup parallelism.
const ALPHA: u64 = 3;
/// How often a fetching host looks its blob's providers up again.
const LOOKUP_EVERY_S: f64 = 1.0;

/// Messages of one DHT lookup in a fleet of `hosts`: about `ALPHA` per routing step,
/// `log2(hosts)` steps.
fn lookup(hosts: usize) -> u64 {
    ALPHA * (hosts.max(2) as f64).log2().ceil() as u64
}

/// Control messages of one host that fetched the blob for `fetching_s` seconds.
///
/// - Polling: one have-map request to each of the other hosts per refresh.
/// - Providers: one provider lookup at start and one per [`LOOKUP_EVERY_S`] while
///   fetching; a provider record stored at start and at the end (a lookup plus
///   [`K_CLOSEST`] stores); `k` subscriptions; and at most one pushed update from each
///   subscription per batch interval (an upper bound: an idle holder pushes nothing).
pub fn messages(policy: &Policy, hosts: usize, fetching_s: f64) -> u64 {
    let fetching_s = fetching_s.max(0.0);
    match *policy {
        Policy::PollAll { refresh_s } => {
            (fetching_s / refresh_s).ceil() as u64 * (hosts.saturating_sub(1)) as u64
        }
        Policy::Providers {
            k, push_batch_s, ..
        } => {
            let lookups = 1 + (fetching_s / LOOKUP_EVERY_S) as u64;
            let provides = 2 * (lookup(hosts) + K_CLOSEST);
            let pushes = k as u64 * (fetching_s / push_batch_s).ceil() as u64;
            lookups * lookup(hosts) + provides + k as u64 + pushes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_grows_with_the_fleet_and_providers_do_not() {
        let poll = Policy::PollAll { refresh_s: 0.1 };
        let push = Policy::Providers {
            k: 16,
            push_batch_s: 0.05,
            home_zones: true,
        };
        assert_eq!(messages(&poll, 101, 1.0), 1000);
        assert_eq!(messages(&poll, 10_001, 1.0), 100_000);
        let (small, big) = (messages(&push, 100, 10.0), messages(&push, 10_000, 10.0));
        assert!(big < small * 2, "{small} vs {big}");
    }
}
