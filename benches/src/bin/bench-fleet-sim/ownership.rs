//! Which host fetches which chunk from the proxy: the agent's rendezvous rule.
//!
//! `agent/src/fetch.rs` gives every chunk one owner among the hosts fetching its blob:
//! the host with the highest `weight(chunk digest, node id)`, the first 8 bytes of
//! sha256(digest ‖ node id). The simulation uses the same function on synthetic chunk
//! digests and node ids, so owners are spread exactly as unevenly as the agent's are.

use imgd_core::{Digest, Sha256};

/// The synthetic digest of chunk `i` of the simulated image.
pub fn chunk_digest(i: u32) -> Digest {
    let mut h = Sha256::new();
    h.update(b"simulated chunk ");
    h.update(&i.to_be_bytes());
    h.finish()
}

/// The synthetic node id of host `h`.
pub fn node_id(h: u32) -> String {
    format!("12D3KooWsimulatedhost{h:06}")
}

/// Rendezvous weight of `node` for `chunk`, the agent's own function.
pub fn weight(chunk: &Digest, node: &str) -> u64 {
    imgd_core::rendezvous::weight(chunk.as_bytes(), node.as_bytes())
}

/// For each chunk, its owner among `hosts`: the host with the highest weight.
pub fn owners(chunks: u32, hosts: &[u32]) -> Vec<u32> {
    let ids: Vec<String> = hosts.iter().map(|&h| node_id(h)).collect();
    (0..chunks)
        .map(|c| {
            let d = chunk_digest(c);
            let best = ids
                .iter()
                .enumerate()
                .max_by_key(|(_, id)| weight(&d, id))
                .map(|(i, _)| hosts[i]);
            best.unwrap_or(0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_has_one_owner_among_the_hosts_and_owners_spread() {
        let hosts: Vec<u32> = (10..18).collect();
        let owners = owners(256, &hosts);
        assert!(owners.iter().all(|o| hosts.contains(o)));
        for h in &hosts {
            let n = owners.iter().filter(|o| *o == h).count();
            assert!(n > 10, "host {h} owns only {n} of 256 chunks");
        }
    }
}
