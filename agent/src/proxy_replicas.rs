//! The imgd-proxy replicas an agent knows, and which one to ask for what.
//!
//! Every request has a key (a blob, chunk or manifest digest, or a repository and tag).
//! The replicas are tried in rendezvous order of that key, so every agent sends the same
//! blob to the same replica and the fleet's requests spread over the replicas without
//! coordination; a replica that just failed is tried last for a while. A chunk list
//! fetched from a replica is remembered as a *route*: the chunks of that blob (and its
//! index) are asked first of the replica that ingested it, which holds them, and a
//! replica that does not hold them is first told to ingest the blob.

use crate::proxy_client::Repo;
use imgd_core::endpoints::Endpoints;
use imgd_core::Digest;
use std::collections::HashMap;
use std::sync::Mutex;

/// At most this many chunk and blob routes are remembered (about 1 TiB of 4 MiB chunks);
/// past it they are forgotten all at once, and requests go by rendezvous order again.
const MAX_ROUTES: usize = 1 << 18;

/// Where a blob's chunks are: the blob, its repository, and the replica that served its
/// chunk list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub blob: Digest,
    pub repo: Repo,
    pub replica: usize,
}

/// The replicas, their health ([`Endpoints`]) and the routes learnt from chunk lists.
pub struct ReplicaSet {
    replicas: Endpoints,
    routes: Mutex<HashMap<Digest, Route>>,
}

impl ReplicaSet {
    /// The replicas at `bases` (`http://host:port`, without a trailing `/`).
    pub fn new(bases: &[String]) -> ReplicaSet {
        ReplicaSet {
            replicas: Endpoints::new(bases, "proxy replica"),
            routes: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The base URL of replica `i`.
    pub fn base(&self, i: usize) -> &str {
        self.replicas.base(i)
    }

    /// Every replica's base URL and whether it is up.
    pub fn health(&self) -> Vec<(String, bool)> {
        self.replicas.health()
    }

    /// The order to try the replicas in for `key`: `first` (a route's replica) if given,
    /// then by rendezvous weight; replicas that are down go last, in the same order.
    pub fn order(&self, key: &[u8], first: Option<usize>) -> Vec<usize> {
        self.replicas.order(key, first)
    }

    /// Replica `i` failed a request: it is tried last for a while.
    pub fn mark_down(&self, i: usize, why: &str) {
        self.replicas.mark_down(i, why)
    }

    /// Replica `i` answered: it is up again.
    pub fn mark_up(&self, i: usize) {
        self.replicas.mark_up(i)
    }

    /// Remembers that replica `replica` holds `blob` and its `chunks`.
    pub fn remember(&self, repo: &Repo, blob: &Digest, chunks: &[Digest], replica: usize) {
        if self.len() < 2 {
            return;
        }
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if routes.len() + chunks.len() + 1 > MAX_ROUTES {
            routes.clear();
        }
        let route = Route {
            blob: *blob,
            repo: repo.clone(),
            replica,
        };
        for d in chunks.iter().chain(std::iter::once(blob)) {
            routes.insert(*d, route.clone());
        }
    }

    /// The route of a chunk or blob, if one was learnt.
    pub fn route(&self, digest: &Digest) -> Option<Route> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> ReplicaSet {
        let bases: Vec<String> = (0..n).map(|i| format!("http://replica{i}:5000")).collect();
        ReplicaSet::new(&bases)
    }

    #[test]
    fn a_route_puts_its_replica_first_for_the_blob_and_its_chunks() {
        let s = set(3);
        let (blob, chunk) = (Digest::of(b"blob"), Digest::of(b"chunk"));
        let other = s.order(chunk.as_bytes(), None)[2];
        s.remember(&Repo::new("a/b"), &blob, &[chunk], other);
        assert_eq!(s.route(&chunk).map(|r| r.replica), Some(other));
        assert_eq!(s.route(&blob).map(|r| r.blob), Some(blob));
        assert_eq!(s.order(chunk.as_bytes(), Some(other))[0], other);
    }
}
