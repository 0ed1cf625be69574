//! A blob the proxy is still ingesting: its chunks fetched as they arrive there, before
//! its chunk list exists (the list needs the whole blob). Each chunk is verified by its
//! sha256 as any other; the blob's own digest is checked by the proxy at the end, and a
//! blob that fails it never gets a chunk list, so the fetch fails then (the chunks taken
//! were right by their own digests and stay cached, unreferenced, for eviction).
//!
//! Only for hosts without a swarm: with one, hosts split the proxy's work by owner once
//! the list is known ([`super`]), and fetching every chunk of a first pull from the proxy
//! would multiply its egress by the number of hosts.

use super::{Fetcher, Repo};
use imgd_core::Digest;
use std::collections::HashSet;

/// Most arrived-list requests of one blob (each waits up to the proxy's long-poll bound
/// of 5 s, or answers once a chunk arrived: 16,384 is a 64 GiB blob).
const MAX_POLLS: usize = 1 << 14;

impl Fetcher {
    /// Fetches the chunks of `blob` that arrive at the proxy while it ingests the blob,
    /// until it is stored there (or anything fails: the caller's ordinary fetch then does
    /// the rest). Returns the chunks fetched here.
    pub(super) async fn fetch_arriving(&self, repo: &Repo, blob: &Digest) -> HashSet<Digest> {
        let mut fetched = HashSet::new();
        if self.provide.is_some() {
            return fetched;
        }
        let mut have = 0;
        for _ in 0..MAX_POLLS {
            let (replica, arrived) = match self.proxy.arrived(repo, blob, have).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(%blob, error = %e, "arrived chunks not available");
                    return fetched;
                }
            };
            if arrived.done {
                return fetched;
            }
            let new: Vec<_> = arrived
                .chunks
                .get(have..)
                .unwrap_or_default()
                .iter()
                .filter(|c| !self.cache.has_chunk(&c.digest))
                .map(|c| c.digest)
                .collect();
            have = have.max(arrived.chunks.len());
            let parallel = self.settings.parallel_chunks.max(1);
            let mut results = futures::StreamExt::buffer_unordered(
                futures::stream::iter(new.into_iter().map(|d| async move {
                    let chunk = self.proxy.arrived_chunk(replica, &d).await?;
                    self.cache.put_chunk(&chunk)?;
                    // Counted when received: a chunk evicted before the list comes is
                    // fetched again, and both fetches moved bytes.
                    self.stats.add(super::Source::Proxy, chunk.len() as u64);
                    Ok::<_, super::FetchError>(d)
                })),
                parallel,
            );
            while let Some(r) = futures::StreamExt::next(&mut results).await {
                match r {
                    Ok(d) => {
                        tracing::debug!(%blob, chunk = %d, "chunk fetched while the proxy ingests its blob");
                        fetched.insert(d);
                    }
                    Err(e) => {
                        tracing::debug!(%blob, error = %e, "arrived chunk not fetched");
                        return fetched;
                    }
                }
            }
        }
        fetched
    }
}
