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
use imgd_core::Digest;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a replica that failed a request is tried only after the others.
const DOWN_FOR: Duration = Duration::from_secs(5);

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

struct Replica {
    base: String,
    down_until: Mutex<Option<Instant>>,
}

/// The replicas, their health and the routes learnt from chunk lists.
pub struct ReplicaSet {
    replicas: Vec<Replica>,
    routes: Mutex<HashMap<Digest, Route>>,
}

impl ReplicaSet {
    /// The replicas at `bases` (`http://host:port`, without a trailing `/`).
    pub fn new(bases: &[String]) -> ReplicaSet {
        ReplicaSet {
            replicas: bases
                .iter()
                .map(|b| Replica {
                    base: b.trim_end_matches('/').to_string(),
                    down_until: Mutex::new(None),
                })
                .collect(),
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
        self.replicas.get(i).map(|r| r.base.as_str()).unwrap_or("")
    }

    /// Every replica's base URL and whether it is up (not failed in the last [`DOWN_FOR`]).
    pub fn health(&self) -> Vec<(String, bool)> {
        (0..self.len())
            .map(|i| (self.replicas[i].base.clone(), self.is_up(i)))
            .collect()
    }

    fn is_up(&self, i: usize) -> bool {
        let down = self.replicas[i]
            .down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        down.is_none_or(|until| Instant::now() >= until)
    }

    /// The order to try the replicas in for `key`: `first` (a route's replica) if given,
    /// then by rendezvous weight; replicas that are down go last, in the same order.
    pub fn order(&self, key: &[u8], first: Option<usize>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| {
            std::cmp::Reverse(imgd_core::rendezvous::weight(
                key,
                self.replicas[i].base.as_bytes(),
            ))
        });
        if let Some(f) = first.filter(|&f| f < self.len()) {
            order.retain(|&i| i != f);
            order.insert(0, f);
        }
        let (up, down): (Vec<usize>, Vec<usize>) = order.into_iter().partition(|&i| self.is_up(i));
        up.into_iter().chain(down).collect()
    }

    /// Replica `i` failed a request: it is tried last for [`DOWN_FOR`].
    pub fn mark_down(&self, i: usize, why: &str) {
        let Some(r) = self.replicas.get(i) else {
            return;
        };
        let mut down = r.down_until.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_none_or(|until| Instant::now() >= until) {
            tracing::warn!(replica = %r.base, error = why, "proxy replica failed a request; trying the others first for {DOWN_FOR:?}");
        }
        *down = Some(Instant::now() + DOWN_FOR);
    }

    /// Replica `i` answered: it is up again.
    pub fn mark_up(&self, i: usize) {
        if let Some(r) = self.replicas.get(i) {
            *r.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
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
    fn keys_spread_over_the_replicas_and_every_agent_agrees() {
        let (a, b) = (set(3), set(3));
        let mut firsts = [0usize; 3];
        for i in 0..300u32 {
            let key = Digest::of(&i.to_be_bytes());
            let order = a.order(key.as_bytes(), None);
            assert_eq!(order, b.order(key.as_bytes(), None));
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2]);
            firsts[order[0]] += 1;
        }
        assert!(firsts.iter().all(|&n| n > 60), "{firsts:?}");
    }

    #[test]
    fn a_down_replica_goes_last_until_it_answers_again() {
        let s = set(2);
        let key = b"blob";
        let first = s.order(key, None)[0];
        s.mark_down(first, "connection refused");
        assert_eq!(s.order(key, None), vec![1 - first, first]);
        assert_eq!(s.health().iter().filter(|(_, up)| !up).count(), 1);
        s.mark_up(first);
        assert_eq!(s.order(key, None)[0], first);
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
