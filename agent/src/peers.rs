//! The peers this agent knows: their data-plane address, zone, measured round trip and
//! a penalty score; and, per blob, the peers known to fetch or hold it (its providers).
//!
//! Discovery (mDNS, Kademlia, bootstrap) adds peers; the fetcher penalises a peer that
//! serves corrupt chunks, times out, lacks a chunk it advertised or is out-raced by a
//! hedged request, and prefers peers with lower penalties. A peer
//! whose penalty reaches [`BAN_PENALTY`] is not asked again until it decays.
//!
//! Providers come from Kademlia provider records (the swarm's lookups) and from the data
//! plane (a peer that subscribes to a blob's have-map is fetching it). [`PeerSet::choose`]
//! picks the few of them a host asks: same zone first, then lowest penalty, then lowest
//! measured round trip, at random among equals.

use crate::dataplane::DataPlaneError;
use imgd_core::Digest;
use rand::seq::SliceRandom;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Penalty at which a peer is no longer asked.
pub const BAN_PENALTY: u32 = 100;
/// Penalty for a corrupt chunk.
pub const CORRUPT_PENALTY: u32 = 100;
/// Penalty for a timeout or a failed connection.
pub const FAILURE_PENALTY: u32 = 20;
/// Penalty for being out-raced by the hedged request to another holder (a slow peer).
pub const SLOW_PENALTY: u32 = 5;
/// Slowness alone never takes a peer past this: a slow but honest peer drifts behind
/// faster holders but is not banned (on a loaded host every peer is sometimes slow).
pub const SLOW_PENALTY_CAP: u32 = BAN_PENALTY / 2;
/// Penalties halve after this long without new ones.
const DECAY: Duration = Duration::from_secs(60);
/// Most providers remembered per blob (a lookup in a huge fleet returns many; a host
/// asks only a few).
pub const MAX_PROVIDERS_KEPT: usize = 1024;

/// The penalty, and why, for a holder whose chunk request did not deliver: `None` when it
/// answered that it lacks a chunk it advertised, else the error (corrupt bytes, timeout,
/// I/O, an error frame).
pub fn penalty_for(failure: Option<&DataPlaneError>) -> (u32, String) {
    match failure {
        None => (
            FAILURE_PENALTY,
            "advertised a chunk it does not have".into(),
        ),
        Some(e @ DataPlaneError::Corrupt { .. }) => (CORRUPT_PENALTY, e.to_string()),
        Some(e) => (FAILURE_PENALTY, e.to_string()),
    }
}

/// One known peer.
#[derive(Clone, Debug)]
pub struct Peer {
    /// libp2p peer id, as text.
    pub id: String,
    /// Address of its chunk data plane.
    pub data_addr: SocketAddr,
    pub penalty: u32,
    last_penalty: Option<Instant>,
    /// Its `zone` label (from identify), if it has one.
    pub zone: Option<String>,
    /// Smoothed round trip of its data plane (subscription set-up), once measured.
    pub rtt: Option<Duration>,
}

impl Peer {
    /// Whether it is in zone `zone` (a host without a zone puts every peer in its zone).
    pub fn in_zone(&self, zone: Option<&str>) -> bool {
        zone.is_none_or(|z| self.zone.as_deref() == Some(z))
    }
}

/// What this host knows of one blob's providers.
#[derive(Default)]
struct Providers {
    ids: HashSet<String>,
    /// Provider lookups of the blob that finished.
    lookups_done: u32,
}

/// The set of known peers, shared between discovery and fetching.
#[derive(Default)]
pub struct PeerSet {
    peers: RwLock<HashMap<String, Peer>>,
    /// The peer ids in the swarm's Kademlia routing table, as last copied out.
    routing_table: RwLock<Vec<String>>,
    providers: RwLock<HashMap<Digest, Providers>>,
}

impl PeerSet {
    /// Adds or updates a peer's data address and zone.
    pub fn upsert(&self, id: &str, data_addr: SocketAddr, zone: Option<&str>) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let entry = peers.entry(id.to_string()).or_insert_with(|| Peer {
            id: id.to_string(),
            data_addr,
            penalty: 0,
            last_penalty: None,
            zone: None,
            rtt: None,
        });
        entry.data_addr = data_addr;
        entry.zone = zone.map(String::from);
    }

    /// The known peer `id`, if any.
    pub fn get(&self, id: &str) -> Option<Peer> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Records a measured round trip to `id` (smoothed, 7/8 old + 1/8 new).
    pub fn record_rtt(&self, id: &str, rtt: Duration) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get_mut(id) {
            p.rtt = Some(p.rtt.map_or(rtt, |old| (old * 7 + rtt) / 8));
        }
    }

    /// Adds providers of `blob` (up to [`MAX_PROVIDERS_KEPT`]).
    pub fn add_providers(&self, blob: &Digest, ids: impl IntoIterator<Item = String>) {
        let mut all = self.providers.write().unwrap_or_else(|p| p.into_inner());
        let entry = all.entry(*blob).or_default();
        for id in ids {
            if entry.ids.len() >= MAX_PROVIDERS_KEPT {
                break;
            }
            entry.ids.insert(id);
        }
    }

    /// Records that a provider lookup of `blob` finished (found all it will find).
    pub fn lookup_done(&self, blob: &Digest) {
        let mut all = self.providers.write().unwrap_or_else(|p| p.into_inner());
        all.entry(*blob).or_default().lookups_done += 1;
    }

    /// The known providers of `blob`, sorted, and how many lookups of it finished.
    pub fn providers(&self, blob: &Digest) -> (Vec<String>, u32) {
        let all = self.providers.read().unwrap_or_else(|p| p.into_inner());
        let Some(p) = all.get(blob) else {
            return (Vec::new(), 0);
        };
        let mut ids: Vec<String> = p.ids.iter().cloned().collect();
        ids.sort();
        (ids, p.lookups_done)
    }

    /// Forgets what is known of `blob`'s providers (its fetch ended).
    pub fn forget_providers(&self, blob: &Digest) {
        self.providers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(blob);
    }

    /// Up to `k` usable peers among `among`, none of `exclude`: those in `zone` first,
    /// then by penalty, then by measured round trip (in whole milliseconds; unmeasured
    /// last), at random among equals so that hosts spread over equally good peers.
    pub fn choose(
        &self,
        among: &[String],
        zone: Option<&str>,
        k: usize,
        exclude: &HashSet<String>,
    ) -> Vec<Peer> {
        let wanted: HashSet<&String> = among.iter().filter(|id| !exclude.contains(*id)).collect();
        let mut found: Vec<Peer> = self
            .usable()
            .into_iter()
            .filter(|p| wanted.contains(&p.id))
            .collect();
        found.shuffle(&mut rand::rng());
        found.sort_by_key(|p| {
            let rtt_ms = p.rtt.map_or(u128::MAX, |d| d.as_millis());
            (!p.in_zone(zone), p.penalty, rtt_ms)
        });
        found.truncate(k);
        found
    }

    /// Forgets a peer.
    pub fn remove(&self, id: &str) {
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Adds `amount` to a peer's penalty.
    pub fn penalise(&self, id: &str, amount: u32, why: &str) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get_mut(id) {
            p.penalty = p.penalty.saturating_add(amount);
            p.last_penalty = Some(Instant::now());
            tracing::warn!(peer = id, penalty = p.penalty, why, "peer penalised");
        }
    }

    /// Records that a peer was out-raced by a hedged request: [`SLOW_PENALTY`], up to
    /// [`SLOW_PENALTY_CAP`].
    pub fn slowed(&self, id: &str) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get_mut(id) {
            if p.penalty < SLOW_PENALTY_CAP {
                p.penalty = (p.penalty + SLOW_PENALTY).min(SLOW_PENALTY_CAP);
                p.last_penalty = Some(Instant::now());
                tracing::debug!(peer = id, penalty = p.penalty, "peer slower than the hedge");
            }
        }
    }

    /// Peers that may be asked (penalty below [`BAN_PENALTY`] after decay), best first.
    pub fn usable(&self) -> Vec<Peer> {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out: Vec<Peer> = peers
            .values_mut()
            .filter_map(|p| {
                if let Some(t) = p.last_penalty {
                    let halvings = (now - t).as_secs() / DECAY.as_secs();
                    if halvings > 0 {
                        p.penalty >>= halvings.min(31);
                        p.last_penalty = if p.penalty == 0 { None } else { Some(now) };
                    }
                }
                (p.penalty < BAN_PENALTY).then(|| p.clone())
            })
            .collect();
        out.sort_by_key(|p| p.penalty);
        out
    }

    /// Records the peer ids of the Kademlia routing table (the swarm copies it out).
    pub fn set_routing_table(&self, mut ids: Vec<String>) {
        ids.sort();
        *self
            .routing_table
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// The peer ids of the Kademlia routing table, sorted.
    pub fn routing_table(&self) -> Vec<String> {
        self.routing_table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every known peer, banned or not.
    pub fn all(&self) -> Vec<Peer> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_ban_and_order() {
        let s = PeerSet::default();
        s.upsert("a", "127.0.0.1:1".parse().unwrap(), None);
        s.upsert("b", "127.0.0.1:2".parse().unwrap(), None);
        s.penalise("a", FAILURE_PENALTY, "test");
        assert_eq!(
            s.usable().iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        s.penalise("a", CORRUPT_PENALTY, "test");
        assert_eq!(s.usable().len(), 1);
        assert_eq!(s.all().len(), 2);
    }

    #[test]
    fn failures_are_penalised_by_kind() {
        assert_eq!(penalty_for(None).0, FAILURE_PENALTY);
        let corrupt = DataPlaneError::Corrupt {
            peer: "127.0.0.1:1".parse().unwrap(),
            digest: imgd_core::Digest::of(b"x"),
        };
        assert_eq!(penalty_for(Some(&corrupt)).0, CORRUPT_PENALTY);
        let slow = DataPlaneError::Timeout("request");
        assert_eq!(penalty_for(Some(&slow)).0, FAILURE_PENALTY);
    }

    #[test]
    fn slowness_alone_orders_peers_but_never_bans_them() {
        let s = PeerSet::default();
        s.upsert("slow", "127.0.0.1:1".parse().unwrap(), None);
        s.upsert("fast", "127.0.0.1:2".parse().unwrap(), None);
        for _ in 0..100 {
            s.slowed("slow");
        }
        let usable = s.usable();
        assert_eq!(
            usable.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["fast", "slow"]
        );
        assert_eq!(usable[1].penalty, SLOW_PENALTY_CAP);
        // A real failure on top still bans it.
        s.penalise("slow", CORRUPT_PENALTY, "test");
        assert_eq!(s.usable().len(), 1);
    }

    #[test]
    fn choose_prefers_the_zone_then_penalty_then_round_trip_and_is_bounded() {
        let s = PeerSet::default();
        let ids: Vec<String> = (0..40).map(|i| format!("p{i:02}")).collect();
        for (i, id) in ids.iter().enumerate() {
            // p00..p09 in zone a, the rest in b or in none.
            let zone = match i {
                0..10 => Some("a"),
                10..30 => Some("b"),
                _ => None,
            };
            s.upsert(id, format!("127.0.0.1:{}", 1000 + i).parse().unwrap(), zone);
            s.record_rtt(id, Duration::from_millis(40 - i as u64));
        }
        s.penalise("p03", FAILURE_PENALTY, "test");
        s.penalise("p09", BAN_PENALTY, "test");
        let none = HashSet::new();
        let got = s.choose(&ids, Some("a"), 16, &none);
        let got: Vec<&str> = got.iter().map(|p| p.id.as_str()).collect();
        // Zone a's usable peers first, fastest first, the penalised one last of them;
        // the banned one never; then the others, fastest first.
        assert_eq!(
            &got[..9],
            ["p08", "p07", "p06", "p05", "p04", "p02", "p01", "p00", "p03"]
        );
        assert_eq!(got.len(), 16);
        assert_eq!(&got[9..11], ["p39", "p38"]);
        // Bounded, excluding what was asked already, and only among `among`.
        let exclude: HashSet<String> = ids[..8].iter().cloned().collect();
        let got = s.choose(&ids[..12], Some("a"), 3, &exclude);
        let got: Vec<&str> = got.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(got, ["p08", "p11", "p10"]);
        // Without a zone of its own, every peer is in its zone: fastest first.
        let got = s.choose(&ids, None, 2, &none);
        assert_eq!(
            got.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["p39", "p38"]
        );
    }

    #[test]
    fn providers_are_kept_per_blob_and_bounded() {
        let s = PeerSet::default();
        let blob = Digest::of(b"blob");
        assert_eq!(s.providers(&blob), (vec![], 0));
        s.add_providers(&blob, ["b".to_string(), "a".to_string()]);
        s.add_providers(&blob, ["a".to_string()]);
        s.lookup_done(&blob);
        assert_eq!(s.providers(&blob), (vec!["a".into(), "b".into()], 1));
        s.add_providers(&blob, (0..2 * MAX_PROVIDERS_KEPT).map(|i| i.to_string()));
        assert_eq!(s.providers(&blob).0.len(), MAX_PROVIDERS_KEPT);
        s.forget_providers(&blob);
        assert_eq!(s.providers(&blob), (vec![], 0));
    }
}
