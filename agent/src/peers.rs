//! The peers this agent knows: their data-plane address and a penalty score.
//!
//! Discovery (mDNS, Kademlia, bootstrap) adds peers; the fetcher penalises a peer that
//! serves corrupt chunks, times out, lacks a chunk it advertised or is out-raced by a
//! hedged request, and prefers peers with lower penalties. A peer
//! whose penalty reaches [`BAN_PENALTY`] is not asked again until it decays.

use crate::dataplane::DataPlaneError;
use std::collections::HashMap;
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
}

/// The set of known peers, shared between discovery and fetching.
#[derive(Default)]
pub struct PeerSet {
    peers: RwLock<HashMap<String, Peer>>,
    /// The peer ids in the swarm's Kademlia routing table, as last copied out.
    routing_table: RwLock<Vec<String>>,
}

impl PeerSet {
    /// Adds or updates a peer's data address.
    pub fn upsert(&self, id: &str, data_addr: SocketAddr) {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let entry = peers.entry(id.to_string()).or_insert_with(|| Peer {
            id: id.to_string(),
            data_addr,
            penalty: 0,
            last_penalty: None,
        });
        entry.data_addr = data_addr;
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
        s.upsert("a", "127.0.0.1:1".parse().unwrap());
        s.upsert("b", "127.0.0.1:2".parse().unwrap());
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
        s.upsert("slow", "127.0.0.1:1".parse().unwrap());
        s.upsert("fast", "127.0.0.1:2".parse().unwrap());
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
}
