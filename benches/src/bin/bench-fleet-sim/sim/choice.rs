//! What a host with a free fetch slot starts next, as `Fetcher::pick` chooses.
//!
//! Under the agent's provider policy, per blob, in order: a chunk this host owns that no
//! watched peer holds or has in flight (from the proxy); a chunk some watched peer holds,
//! the rarest among them first (among up to [`SAMPLE`] missing chunks drawn at random,
//! then all of them), from a holder in its zone if there is one, else from any, at random
//! (`Fetcher::holders`); once `owner_wait` passed since its start and no watched map moved
//! for that long, a chunk no watched peer has in flight, else any (from the proxy).
//! Watched peers are the ones it subscribes to: its zone's first, then others.
//!
//! Polling (the agent before issue 12) takes peers' chunks before its own, from a random
//! holder, and sees every host of its scope. The home-zone design takes a chunk it owns
//! from its home zone's owner, and the least loaded holder.

use super::{Policy, Sim};
use crate::rng::Rng;

/// Missing chunks looked at per choice before all of them are.
const SAMPLE: usize = 64;

impl Sim<'_> {
    /// Fills host `h`'s free fetch slots at time `t`, blob by blob.
    pub(super) fn pick(&mut self, h: u32, t: f64) {
        let mut idle = false;
        for b in 0..self.hosts[h as usize].blobs.len() {
            if self.hosts[h as usize].blobs[b].start.is_some() {
                idle |= self.fill(h, b, t);
            }
        }
        let tick = match self.s.policy {
            Policy::PollAll { refresh_s } => refresh_s,
            Policy::Providers { push_batch_s, .. } => push_batch_s,
        };
        let host = &mut self.hosts[h as usize];
        if idle && !host.ticking {
            host.ticking = true;
            self.queue.push(t + tick, super::Event::Tick(h));
        }
    }

    /// Fills `h`'s free slots for blob `b`; whether one stays free with chunks left.
    fn fill(&mut self, h: u32, b: usize, t: f64) -> bool {
        let owned_first = self.s.policy.zone_local();
        loop {
            let slots = &self.hosts[h as usize].blobs[b];
            if slots.in_flight >= self.fetch.parallel_chunks || slots.unasked.is_empty() {
                return false;
            }
            let owned = self.owned_choice(h, b, t);
            if let Some((chunk, from)) = owned.filter(|_| owned_first) {
                self.take(h, chunk, t);
                match from {
                    Some(peer) => self.start_peer(h, peer, chunk, t),
                    None => self.start_proxy(h, chunk, t),
                }
            } else if let Some((chunk, holder)) = self.peer_choice(h, b) {
                self.take(h, chunk, t);
                self.start_peer(h, holder, chunk, t);
            } else if let Some((chunk, _)) = owned.filter(|_| !owned_first) {
                self.take(h, chunk, t);
                self.start_proxy(h, chunk, t);
            } else if self.waited_enough(h, b, t) {
                let chunk = self.any_choice(h, b);
                self.take(h, chunk, t);
                self.start_proxy(h, chunk, t);
            } else {
                return true;
            }
        }
    }

    /// Whether `owner_wait` passed since `h` started fetching blob `b` and nothing moved
    /// for as long in what it sees (its watched maps; its scope, when polling).
    fn waited_enough(&self, h: u32, b: usize, t: f64) -> bool {
        let host = &self.hosts[h as usize];
        let start = host.blobs[b].start.unwrap_or(t);
        let moved = match self.s.policy {
            Policy::PollAll { .. } => self.scopes[self.scope_of(h)].last_moved,
            Policy::Providers { .. } => host.last_news,
        };
        let wait = self.fetch.owner_wait_s;
        t - start >= wait && t - moved >= wait
    }

    /// Whether a peer `h` watches shows chunk `c` held (`held`) or in flight.
    fn watched_show(&self, h: u32, c: u32, held: bool) -> bool {
        let seen = if held { &self.held } else { &self.flight };
        let host = &self.hosts[h as usize];
        host.neighbors
            .iter()
            .any(|&n| seen[n as usize * self.chunks + c as usize])
    }

    /// The chunk to take from a peer next, and the peer.
    fn peer_choice(&mut self, h: u32, b: usize) -> Option<(u32, u32)> {
        match self.s.policy {
            Policy::PollAll { .. } => self.polled_choice(h, b),
            Policy::Providers { .. } => self.neighbor_choice(h, b),
        }
    }

    /// Provider policy: the chunk of blob `b` rarest among the peers `h` knows of for it
    /// that one of them holds, and the holder to ask.
    fn neighbor_choice(&mut self, h: u32, b: usize) -> Option<(u32, u32)> {
        let host = &self.hosts[h as usize];
        if host.news == host.blobs[b].seen_news {
            return None;
        }
        let (chunks, held) = (self.chunks, &self.held);
        let home_zones = self.s.policy.home_zones();
        let owners = &self.owner[host.zone as usize];
        let sources = |c: u32| {
            // The home-zone design: every host knows its zone's owner of each chunk.
            let owner = owners[c as usize];
            let extra = (home_zones && !host.neighbors.contains(&owner)).then_some(owner);
            host.neighbors
                .iter()
                .copied()
                .chain(extra)
                .filter(move |&n| held[n as usize * chunks + c as usize])
        };
        let best = rarest(&host.blobs[b].unasked, &mut self.rng, |c| {
            sources(c).count()
        });
        let Some(chunk) = best else {
            let news = host.news;
            self.hosts[h as usize].blobs[b].seen_news = news;
            return None;
        };
        let list: Vec<u32> = sources(chunk).collect();
        let holder = if home_zones {
            let up = |x: &u32| self.hosts[*x as usize].up.free_at();
            list.iter()
                .copied()
                .min_by(|a, b| up(a).total_cmp(&up(b)))?
        } else {
            // `Fetcher::holders`: the zone's holders first, shuffled.
            let zone = host.zone;
            let near: Vec<u32> = (list.iter().copied())
                .filter(|&x| self.hosts[x as usize].zone == zone)
                .collect();
            let pool = if near.is_empty() { list } else { near };
            pool[self.rng.below(pool.len())]
        };
        Some((chunk, holder))
    }

    /// Polling policy: the rarest chunk of blob `b` some peer in `h`'s scope holds, from a
    /// random holder (`fetch.rs` shuffled the holders and asked the first).
    fn polled_choice(&mut self, h: u32, b: usize) -> Option<(u32, u32)> {
        let scope = self.scope_of(h);
        let version = self.scopes[scope].version;
        if self.hosts[h as usize].blobs[b].seen_version == version {
            return None;
        }
        let holders = |c: u32| self.scopes[scope].holders[c as usize].len();
        let unasked = &self.hosts[h as usize].blobs[b].unasked;
        let Some(chunk) = rarest(unasked, &mut self.rng, holders) else {
            self.hosts[h as usize].blobs[b].seen_version = version;
            return None;
        };
        let list = &self.scopes[scope].holders[chunk as usize];
        let holder = list[self.rng.below(list.len())];
        Some((chunk, holder))
    }

    /// A chunk of blob `b` that `h` owns and is free to fetch, and where from (`None`:
    /// the proxy). The agent: no watched peer holds it or has it in flight. Polling: nobody
    /// in its scope holds it or fetches it from the proxy. The home-zone design: as
    /// polling, and outside the chunk's home zone it comes from the home zone's owner once
    /// that one has it (or from the proxy after `owner_wait`).
    fn owned_choice(&self, h: u32, b: usize, t: f64) -> Option<(u32, Option<u32>)> {
        let scope = &self.scopes[self.scope_of(h)];
        let host = &self.hosts[h as usize];
        let agent =
            matches!(self.s.policy, Policy::Providers { .. }) && !self.s.policy.home_zones();
        let waited = t - host.blobs[b].start.unwrap_or(t) >= self.fetch.owner_wait_s;
        host.owned.iter().copied().find_map(|c| {
            if self.blob_of[c as usize] as usize != b || host.position[c as usize] == u32::MAX {
                return None;
            }
            if agent {
                let free = !self.watched_show(h, c, true) && !self.watched_show(h, c, false);
                return free.then_some((c, None));
            }
            let free =
                scope.proxy_flight[c as usize].is_none() && scope.holders[c as usize].is_empty();
            if !free {
                return None;
            }
            let home = self.home[c as usize] as usize;
            if !self.s.policy.home_zones() || home == host.zone as usize {
                return Some((c, None));
            }
            let home_owner = self.owner[home][c as usize];
            if self.held[home_owner as usize * self.chunks + c as usize] {
                Some((c, Some(home_owner)))
            } else {
                waited.then_some((c, None))
            }
        })
    }

    /// After `owner_wait` of stillness: a chunk of blob `b` nobody `h` sees fetches (the
    /// agent: no watched peer has it in flight; the others: nobody in its scope fetches it
    /// from the proxy, nor, under the home-zone design, does its owner hold it), else any.
    fn any_choice(&self, h: u32, b: usize) -> u32 {
        let scope_index = self.scope_of(h);
        let scope = &self.scopes[scope_index];
        let unasked = &self.hosts[h as usize].blobs[b].unasked;
        let free = |c: u32| match self.s.policy {
            Policy::Providers {
                home_zones: false, ..
            } => !self.watched_show(h, c, false),
            _ => {
                let owner = self.owner[scope_index][c as usize];
                let owner_has = self.s.policy.zone_local()
                    && self.held[owner as usize * self.chunks + c as usize];
                scope.proxy_flight[c as usize].is_none() && !owner_has
            }
        };
        unasked
            .iter()
            .copied()
            .find(|&c| free(c))
            .unwrap_or(unasked[0])
    }
}

/// The chunk of `unasked` with the fewest holders (`holders`), among those with any: among
/// [`SAMPLE`] drawn at random first, then among all if none of those has a holder.
fn rarest(unasked: &[u32], rng: &mut Rng, holders: impl Fn(u32) -> usize) -> Option<u32> {
    let mut best: Option<(u32, usize)> = None;
    let consider = |c: u32, best: &mut Option<(u32, usize)>| {
        let k = holders(c);
        if k > 0 && best.is_none_or(|(_, b)| k < b) {
            *best = Some((c, k));
        }
    };
    if unasked.len() > SAMPLE {
        for _ in 0..SAMPLE {
            consider(unasked[rng.below(unasked.len())], &mut best);
        }
    }
    if best.is_none() {
        for &c in unasked {
            consider(c, &mut best);
        }
    }
    best.map(|(c, _)| c)
}
