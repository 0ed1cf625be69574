//! A set of interchangeable HTTP endpoints (proxy replicas, a proxy's peers), the order
//! to try them in for a key, and which of them failed lately.
//!
//! Every request has a key (a blob, chunk or manifest digest). The endpoints are tried in
//! rendezvous order of that key ([`crate::rendezvous`]), so every client sends the same
//! key to the same endpoint and the load spreads without coordination; an endpoint that
//! just failed is tried last for a while.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an endpoint that failed a request is tried only after the others.
pub const DOWN_FOR: Duration = Duration::from_secs(5);

struct Endpoint {
    base: String,
    down_until: Mutex<Option<Instant>>,
}

/// The endpoints and their health.
pub struct Endpoints {
    endpoints: Vec<Endpoint>,
    /// What they are, for logs ("proxy replica", "proxy peer").
    what: &'static str,
}

impl Endpoints {
    /// The endpoints at `bases` (`http://host:port`; a trailing `/` is dropped), called
    /// `what` in logs.
    pub fn new(bases: &[String], what: &'static str) -> Endpoints {
        Endpoints {
            endpoints: bases
                .iter()
                .map(|b| Endpoint {
                    base: b.trim_end_matches('/').to_string(),
                    down_until: Mutex::new(None),
                })
                .collect(),
            what,
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The base URL of endpoint `i` (empty if there is none).
    pub fn base(&self, i: usize) -> &str {
        self.endpoints.get(i).map(|e| e.base.as_str()).unwrap_or("")
    }

    /// Every endpoint's base URL and whether it is up (not failed in the last [`DOWN_FOR`]).
    pub fn health(&self) -> Vec<(String, bool)> {
        (0..self.len())
            .map(|i| (self.endpoints[i].base.clone(), self.is_up(i)))
            .collect()
    }

    /// True unless endpoint `i` failed in the last [`DOWN_FOR`] (or does not exist).
    pub fn is_up(&self, i: usize) -> bool {
        let Some(e) = self.endpoints.get(i) else {
            return false;
        };
        let down = e.down_until.lock().unwrap_or_else(|p| p.into_inner());
        down.is_none_or(|until| Instant::now() >= until)
    }

    /// The order to try the endpoints in for `key`: `first` if given, then by rendezvous
    /// weight; endpoints that are down go last, in the same order.
    pub fn order(&self, key: &[u8], first: Option<usize>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| {
            std::cmp::Reverse(crate::rendezvous::weight(
                key,
                self.endpoints[i].base.as_bytes(),
            ))
        });
        if let Some(f) = first.filter(|&f| f < self.len()) {
            order.retain(|&i| i != f);
            order.insert(0, f);
        }
        let (up, down): (Vec<usize>, Vec<usize>) = order.into_iter().partition(|&i| self.is_up(i));
        up.into_iter().chain(down).collect()
    }

    /// Endpoint `i` failed a request: it is tried last for [`DOWN_FOR`].
    pub fn mark_down(&self, i: usize, why: &str) {
        let Some(e) = self.endpoints.get(i) else {
            return;
        };
        let mut down = e.down_until.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_none_or(|until| Instant::now() >= until) {
            tracing::warn!(endpoint = %e.base, error = why, "{} failed a request; trying the others first for {DOWN_FOR:?}", self.what);
        }
        *down = Some(Instant::now() + DOWN_FOR);
    }

    /// Endpoint `i` answered: it is up again.
    pub fn mark_up(&self, i: usize) {
        if let Some(e) = self.endpoints.get(i) {
            *e.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    fn set(n: usize) -> Endpoints {
        let bases: Vec<String> = (0..n).map(|i| format!("http://replica{i}:5000/")).collect();
        Endpoints::new(&bases, "test endpoint")
    }

    #[test]
    fn keys_spread_over_the_endpoints_and_every_client_agrees() {
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
        assert_eq!(a.base(0), "http://replica0:5000");
    }

    #[test]
    fn a_down_endpoint_goes_last_until_it_answers_again() {
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
    fn first_goes_first_even_when_another_weighs_more() {
        let s = set(3);
        let last = s.order(b"k", None)[2];
        assert_eq!(s.order(b"k", Some(last))[0], last);
        assert_eq!(s.order(b"k", Some(7)), s.order(b"k", None));
    }
}
