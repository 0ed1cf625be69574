//! What this host tells the swarm about its blobs: provider records (a blob announced
//! once it fetches or holds it, withdrawn when an eviction leaves it incomplete; peers
//! that subscribe to a blob it fetches counted among that blob's providers) and the
//! have-maps peers ask for.

use super::Fetcher;
use crate::control_counts::ControlKind;
use crate::dataplane::HaveMap;
use imgd_core::Digest;

impl Fetcher {
    /// A peer subscribed to `blob`'s have-map here: while this host fetches the blob,
    /// that peer counts among its hosts (it fetches the blob too).
    pub fn note_subscriber(&self, blob: &Digest, peer_id: &str) {
        if self.jobs.shared(blob).is_some() {
            self.peers.add_providers(blob, [peer_id.to_string()]);
        }
    }

    /// Announces `blob` in the swarm's provider records, once while held.
    pub(super) fn announce(&self, blob: &Digest) {
        let Some(tx) = &self.provide else { return };
        let mut provided = self.provided.lock().unwrap_or_else(|p| p.into_inner());
        if provided.insert(*blob) {
            if tx
                .try_send(crate::swarm::SwarmCommand::Provide(*blob))
                .is_ok()
            {
                self.control.count(blob, ControlKind::Provide);
            } else {
                provided.remove(blob);
            }
        }
    }

    /// Withdraws the provider records of announced blobs that are no longer whole here
    /// and not being fetched (after an eviction).
    pub fn withdraw_evicted(&self) {
        let Some(tx) = &self.provide else { return };
        let announced: Vec<Digest> = self
            .provided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        for blob in announced {
            if self.jobs.shared(&blob).is_some() {
                continue;
            }
            let whole = match self.cache.blob(&blob) {
                Ok(Some(list)) => self.cache.missing_chunks(&list).is_empty(),
                _ => false,
            };
            if !whole
                && tx
                    .try_send(crate::swarm::SwarmCommand::StopProviding(blob))
                    .is_ok()
            {
                self.control.count(&blob, ControlKind::Withdraw);
                self.provided
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&blob);
                tracing::info!(%blob, "blob evicted: provider record withdrawn");
            }
        }
    }

    /// What this node has of `blob`, for a peer's have query (`None`: blob unknown here).
    pub fn have_map(&self, blob: &Digest) -> Option<HaveMap> {
        let list = self.cache.blob(blob).ok().flatten()?;
        let mut map = HaveMap::new(list.chunks.len() as u32);
        for (i, c) in list.chunks.iter().enumerate() {
            map.set_present(i as u32, self.cache.has_chunk(&c.digest));
            map.set_in_flight(i as u32, self.reads.states.shows_in_flight(&c.digest));
        }
        if let Some(job) = self.jobs.shared(blob) {
            for (i, state) in job.states().iter().enumerate() {
                if state.is_in_flight() {
                    map.set_in_flight(i as u32, true);
                }
            }
        }
        Some(map)
    }
}
