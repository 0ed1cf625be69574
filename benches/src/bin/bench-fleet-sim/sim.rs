//! The discrete-event engine: every host of a [`Scenario`] fetches the whole image, chunk
//! by chunk, from peers and the proxy, choosing as the agent's fetcher does under the
//! scenario's [`Policy`]; every chunk is verified (CPU) on arrival.
//!
//! The choice per free fetch slot follows `Fetcher::pick`: a chunk some known peer holds,
//! the rarest first (among up to [`SAMPLE`] missing chunks drawn at random, then all of
//! them); else a chunk this host owns that nobody fetches from the proxy; once nothing
//! became visible in its scope for `owner_wait` (and that long after its start), any chunk. A host with nothing to start looks again at its next tick
//! (have-map poll or push batch). A chunk a host received becomes visible to the others
//! after the policy's lag (half a poll or push interval on average, plus half a round trip).

use crate::ownership;
use crate::params::{Costs, CpuModel, FetchSettings, Policy, Scenario};
use crate::resources::{Cpu, Link};
use crate::rng::Rng;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Missing chunks looked at per choice before all of them are.
const SAMPLE: usize = 64;

#[derive(Clone, Copy, Debug)]
enum Event {
    Start(u32),
    Arrived { host: u32, chunk: u32 },
    Visible { host: u32, chunk: u32 },
    Tick(u32),
}

struct Queued {
    at: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    // Earliest first out of the max-heap.
    fn cmp(&self, o: &Self) -> Ordering {
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

/// One host's fetch.
struct Host {
    zone: u32,
    start: f64,
    done: Option<f64>,
    /// Chunks not yet asked for, with each chunk's position in it (`u32::MAX`: asked).
    unasked: Vec<u32>,
    position: Vec<u32>,
    remaining: usize,
    in_flight: usize,
    up: Link,
    down: Link,
    /// Chunks this host owns (fetches from the proxy), in chunk order.
    owned: Vec<u32>,
    /// Its scope's visibility version at its last choice that found no holder.
    seen_version: u64,
    ticking: bool,
    /// The peers whose have-maps it subscribes to (provider policy only).
    neighbors: Vec<u32>,
    /// Chunks that became visible at its neighbors, and that count at its last choice
    /// that found no holder.
    news: u64,
    seen_news: u64,
}

/// What the hosts of one scope (a zone, or the whole fleet) see of each other.
struct Scope {
    holders: Vec<Vec<u32>>,
    proxy_flight: Vec<Option<u32>>,
    version: u64,
    /// When a chunk last became visible in the scope (the agent's watched maps moving).
    last_moved: f64,
}

/// The result of one run.
pub struct Outcome {
    /// When each host held the whole image, seconds from the common start.
    pub finish: Vec<f64>,
    /// Bytes the proxy sent into each zone.
    pub proxy_bytes_by_zone: Vec<f64>,
    pub cross_zone_peer_bytes: f64,
    /// Control messages each host sent or received for the blob.
    pub control_per_host: Vec<u64>,
}

struct Sim<'a> {
    s: &'a Scenario,
    costs: &'a Costs,
    fetch: &'a FetchSettings,
    chunk_sizes: Vec<f64>,
    hosts: Vec<Host>,
    scopes: Vec<Scope>,
    cpus: Vec<Cpu>,
    proxy: Link,
    zone_down: Vec<Link>,
    zone_up: Vec<Link>,
    queue: BinaryHeap<Queued>,
    seq: u64,
    rng: Rng,
    proxy_bytes_by_zone: Vec<f64>,
    cross_zone: f64,
    chunks: usize,
    /// `visible[h * chunks + c]`: host `h`'s copy of chunk `c` is visible to its subscribers.
    visible: Vec<bool>,
    /// Who subscribes to each host's have-map.
    subscribers: Vec<Vec<u32>>,
    /// `owner[scope][c]`: the host that fetches chunk `c` from the proxy for its scope.
    owner: Vec<Vec<u32>>,
    /// The hosts of each zone.
    zone_members: Vec<Vec<u32>>,
    /// Each chunk's home zone (provider policy): the one whose owner fetches it from the proxy.
    home: Vec<u32>,
}

/// Runs `s` to the end (every host holds the image).
pub fn run(s: &Scenario, costs: &Costs, fetch: &FetchSettings) -> Outcome {
    let mut sim = Sim::new(s, costs, fetch);
    while let Some(q) = sim.queue.pop() {
        sim.handle(q.at, q.event);
    }
    let finish: Vec<f64> = sim
        .hosts
        .iter()
        .map(|h| h.done.unwrap_or(f64::NAN))
        .collect();
    let control_per_host = sim
        .hosts
        .iter()
        .map(|h| crate::control::messages(&s.policy, s.hosts, h.done.unwrap_or(h.start) - h.start))
        .collect();
    Outcome {
        finish,
        proxy_bytes_by_zone: sim.proxy_bytes_by_zone,
        cross_zone_peer_bytes: sim.cross_zone,
        control_per_host,
    }
}

impl<'a> Sim<'a> {
    fn new(s: &'a Scenario, costs: &'a Costs, fetch: &'a FetchSettings) -> Sim<'a> {
        let chunks = s.image_bytes.div_ceil(costs.chunk_bytes) as usize;
        let chunk_sizes = (0..chunks as u64)
            .map(|i| (s.image_bytes - i * costs.chunk_bytes).min(costs.chunk_bytes) as f64)
            .collect();
        let zones = s.zones.max(1);
        let zone_of = |h: usize| (h * zones / s.hosts.max(1)) as u32;
        let scope_count = if s.policy.zone_local() { zones } else { 1 };
        // Owners: among the zone's hosts (zone-local policy) or all hosts.
        let mut owner_of = vec![Vec::new(); scope_count];
        for (scope, owners) in owner_of.iter_mut().enumerate() {
            let members: Vec<u32> = (0..s.hosts)
                .filter(|&h| scope_count == 1 || zone_of(h) as usize == scope)
                .map(|h| h as u32)
                .collect();
            *owners = ownership::owners(chunks as u32, &members);
        }
        let mut rng = Rng::new(s.seed);
        let mut queue = BinaryHeap::new();
        let mut hosts = Vec::with_capacity(s.hosts);
        for h in 0..s.hosts {
            let zone = zone_of(h);
            let scope = if scope_count == 1 { 0 } else { zone as usize };
            let owned = (0..chunks as u32)
                .filter(|&c| owner_of[scope][c as usize] == h as u32)
                .collect();
            hosts.push(Host {
                zone,
                start: 0.0,
                done: None,
                unasked: (0..chunks as u32).collect(),
                position: (0..chunks as u32).collect(),
                remaining: chunks,
                in_flight: 0,
                up: Link::new(s.host_link_bytes_s),
                down: Link::new(s.host_link_bytes_s),
                owned,
                seen_version: u64::MAX,
                ticking: false,
                neighbors: Vec::new(),
                news: 0,
                seen_news: u64::MAX,
            });
            let gather = if s.policy.zone_local() {
                fetch.gather_s
            } else {
                0.0
            };
            let at = rng.unit() * s.start_jitter_s + costs.startup_s + gather;
            queue.push(Queued {
                at,
                seq: h as u64,
                event: Event::Start(h as u32),
            });
        }
        let scopes = (0..scope_count)
            .map(|_| Scope {
                holders: vec![Vec::new(); chunks],
                proxy_flight: vec![None; chunks],
                version: 0,
                last_moved: f64::NEG_INFINITY,
            })
            .collect();
        let cpus = match s.cpu {
            CpuModel::PerHost(cores) => (0..s.hosts).map(|_| Cpu::new(cores)).collect(),
            CpuModel::Shared(cores) => vec![Cpu::new(cores)],
        };
        let mut subscribers = vec![Vec::new(); s.hosts];
        if let Policy::Providers { k, .. } = s.policy {
            let members = |z: u32| (0..s.hosts as u32).filter(move |&h| zone_of(h as usize) == z);
            for h in 0..s.hosts {
                let zone: Vec<u32> = members(hosts[h].zone).filter(|&m| m != h as u32).collect();
                let picked = rng.distinct(&zone, k);
                for &n in &picked {
                    subscribers[n as usize].push(h as u32);
                }
                hosts[h].neighbors = picked;
            }
        }
        let proxy_rate = s.proxy_link_bytes_s.min(costs.proxy_serve_bytes_s);
        Sim {
            s,
            costs,
            fetch,
            chunk_sizes,
            hosts,
            scopes,
            cpus,
            proxy: Link::new(proxy_rate),
            zone_down: vec![Link::new(s.zone_link_bytes_s); zones],
            zone_up: vec![Link::new(s.zone_link_bytes_s); zones],
            queue,
            seq: s.hosts as u64,
            rng,
            proxy_bytes_by_zone: vec![0.0; zones],
            cross_zone: 0.0,
            chunks,
            visible: vec![false; s.hosts * chunks],
            subscribers,
            owner: owner_of,
            home: ownership::owners(chunks as u32, &(0..zones as u32).collect::<Vec<_>>()),
            zone_members: (0..zones as u32)
                .map(|z| {
                    (0..s.hosts as u32)
                        .filter(|&h| zone_of(h as usize) == z)
                        .collect()
                })
                .collect(),
        }
    }

    fn at(&mut self, at: f64, event: Event) {
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            event,
        });
    }

    fn scope_of(&self, h: u32) -> usize {
        if self.scopes.len() == 1 {
            0
        } else {
            self.hosts[h as usize].zone as usize
        }
    }

    fn cpu_of(&mut self, h: u32) -> &mut Cpu {
        let i = if self.cpus.len() == 1 { 0 } else { h as usize };
        &mut self.cpus[i]
    }

    fn handle(&mut self, t: f64, event: Event) {
        match event {
            Event::Start(h) => {
                self.hosts[h as usize].start = t;
                self.pick(h, t);
            }
            Event::Arrived { host, chunk } => {
                let lag = self.lag();
                let hs = &mut self.hosts[host as usize];
                hs.in_flight -= 1;
                hs.remaining -= 1;
                if hs.remaining == 0 {
                    hs.done = Some(t);
                }
                self.at(t + lag, Event::Visible { host, chunk });
                self.pick(host, t);
            }
            Event::Visible { host, chunk } => {
                let scope = self.scope_of(host);
                let sc = &mut self.scopes[scope];
                sc.holders[chunk as usize].push(host);
                sc.last_moved = t;
                if sc.proxy_flight[chunk as usize] == Some(host) {
                    sc.proxy_flight[chunk as usize] = None;
                }
                sc.version += 1;
                self.visible[host as usize * self.chunks + chunk as usize] = true;
                for i in 0..self.subscribers[host as usize].len() {
                    let s = self.subscribers[host as usize][i];
                    self.hosts[s as usize].news += 1;
                }
                let home = self.home[chunk as usize] as usize;
                if self.s.policy.home_zones()
                    && scope == home
                    && self.owner[home][chunk as usize] == host
                {
                    // The other zones' owners of the chunk wait for this copy.
                    for z in 0..self.owner.len() {
                        let o = self.owner[z][chunk as usize];
                        self.hosts[o as usize].news += 1;
                    }
                }
                if self.owner[scope][chunk as usize] == host && self.s.policy.zone_local() {
                    // Every host of the zone knows the chunk's owner.
                    let zone = self.hosts[host as usize].zone as usize;
                    for i in 0..self.zone_members[zone].len() {
                        let m = self.zone_members[zone][i];
                        self.hosts[m as usize].news += 1;
                    }
                }
            }
            Event::Tick(h) => {
                self.hosts[h as usize].ticking = false;
                self.pick(h, t);
            }
        }
    }

    /// How long until the others see a chunk this host just verified.
    fn lag(&mut self) -> f64 {
        let interval = match self.s.policy {
            Policy::PollAll { refresh_s } => refresh_s,
            Policy::Providers { push_batch_s, .. } => push_batch_s,
        };
        self.rng.unit() * interval + self.costs.rtt_s / 2.0
    }

    fn tick_interval(&self) -> f64 {
        match self.s.policy {
            Policy::PollAll { refresh_s } => refresh_s,
            Policy::Providers { push_batch_s, .. } => push_batch_s,
        }
    }

    /// Fills host `h`'s free fetch slots at time `t`.
    fn pick(&mut self, h: u32, t: f64) {
        loop {
            let host = &self.hosts[h as usize];
            if host.in_flight >= self.fetch.parallel_chunks || host.unasked.is_empty() {
                break;
            }
            // Today's fetcher takes peers' chunks before its own; the provider policy
            // fetches the chunks it owns first, since its zone waits for them.
            let owned_first = self.s.policy.zone_local();
            let owned = if owned_first {
                self.owned_choice(h, t)
            } else {
                None
            };
            if let Some((chunk, from)) = owned {
                self.take(h, chunk);
                match from {
                    Some(peer) => self.start_peer(h, peer, chunk, t),
                    None => self.start_proxy(h, chunk, t),
                }
            } else if let Some((chunk, holder)) = self.peer_choice(h) {
                self.take(h, chunk);
                self.start_peer(h, holder, chunk, t);
            } else if let Some((chunk, _)) = self.owned_choice(h, t).filter(|_| !owned_first) {
                self.take(h, chunk);
                self.start_proxy(h, chunk, t);
            } else if t - self.hosts[h as usize].start >= self.fetch.owner_wait_s
                && t - self.scopes[self.scope_of(h)].last_moved >= self.fetch.owner_wait_s
            {
                let chunk = self.any_choice(h);
                self.take(h, chunk);
                self.start_proxy(h, chunk, t);
            } else {
                break;
            }
        }
        let tick = self.tick_interval();
        let host = &mut self.hosts[h as usize];
        if host.in_flight < self.fetch.parallel_chunks && !host.unasked.is_empty() && !host.ticking
        {
            host.ticking = true;
            self.at(t + tick, Event::Tick(h));
        }
    }

    /// The chunk to take from a peer next, and the peer.
    fn peer_choice(&mut self, h: u32) -> Option<(u32, u32)> {
        match self.s.policy {
            Policy::PollAll { .. } => self.polled_choice(h),
            Policy::Providers { .. } => self.neighbor_choice(h),
        }
    }

    /// Provider policy: the chunk rarest among the peers `h` knows of for it (its
    /// neighbors, and the chunk's owner in its zone) that one of them holds, from the
    /// least loaded of those.
    fn neighbor_choice(&mut self, h: u32) -> Option<(u32, u32)> {
        let host = &self.hosts[h as usize];
        if host.news == host.seen_news {
            return None;
        }
        let (chunks, visible) = (self.chunks, &self.visible);
        let owners = &self.owner[host.zone as usize];
        let sources = |c: u32| {
            let owner = owners[c as usize];
            let extra = (!host.neighbors.contains(&owner)).then_some(owner);
            host.neighbors
                .iter()
                .copied()
                .chain(extra)
                .filter(move |&n| visible[n as usize * chunks + c as usize])
        };
        let n = host.unasked.len();
        let mut best: Option<(u32, usize)> = None;
        let consider = |c: u32, best: &mut Option<(u32, usize)>| {
            let k = sources(c).count();
            if k > 0 && best.is_none_or(|(_, b)| k < b) {
                *best = Some((c, k));
            }
        };
        if n > SAMPLE {
            for _ in 0..SAMPLE {
                consider(host.unasked[self.rng.below(n)], &mut best);
            }
        }
        if best.is_none() {
            for &c in &host.unasked {
                consider(c, &mut best);
            }
        }
        let Some((chunk, _)) = best else {
            let news = host.news;
            self.hosts[h as usize].seen_news = news;
            return None;
        };
        let holder = sources(chunk).min_by(|a, b| {
            let (a, b) = (&self.hosts[*a as usize].up, &self.hosts[*b as usize].up);
            a.free_at().total_cmp(&b.free_at())
        })?;
        Some((chunk, holder))
    }

    /// Polling policy: the rarest chunk some peer in `h`'s scope holds, from a random
    /// holder (`fetch.rs` shuffles the holders and asks the first).
    fn polled_choice(&mut self, h: u32) -> Option<(u32, u32)> {
        let scope = self.scope_of(h);
        let version = self.scopes[scope].version;
        if self.hosts[h as usize].seen_version == version {
            return None;
        }
        let n = self.hosts[h as usize].unasked.len();
        let holders = |c: u32| self.scopes[scope].holders[c as usize].len();
        let mut best: Option<(u32, usize)> = None;
        let consider = |c: u32, best: &mut Option<(u32, usize)>| {
            let k = holders(c);
            if k > 0 && best.is_none_or(|(_, b)| k < b) {
                *best = Some((c, k));
            }
        };
        let unasked = &self.hosts[h as usize].unasked;
        if n > SAMPLE {
            for _ in 0..SAMPLE {
                consider(unasked[self.rng.below(n)], &mut best);
            }
        }
        if best.is_none() {
            for &c in unasked {
                consider(c, &mut best);
            }
        }
        let Some((chunk, _)) = best else {
            self.hosts[h as usize].seen_version = version;
            return None;
        };
        let list = &self.scopes[scope].holders[chunk as usize];
        let holder = list[self.rng.below(list.len())];
        Some((chunk, holder))
    }

    /// A chunk `h` owns that nobody in its scope holds or fetches from the proxy yet, and
    /// where to get it: `None` is the proxy. Under the provider policy every chunk also has
    /// a home zone, whose owner alone fetches it from the proxy; the owners in the other
    /// zones take it from that owner once it has it (or from the proxy after `owner_wait`).
    fn owned_choice(&self, h: u32, t: f64) -> Option<(u32, Option<u32>)> {
        let scope = &self.scopes[self.scope_of(h)];
        let host = &self.hosts[h as usize];
        let waited = t - host.start >= self.fetch.owner_wait_s;
        host.owned.iter().copied().find_map(|c| {
            let free = host.position[c as usize] != u32::MAX
                && scope.proxy_flight[c as usize].is_none()
                && scope.holders[c as usize].is_empty();
            if !free {
                return None;
            }
            let home = self.home[c as usize] as usize;
            if !self.s.policy.home_zones() || home == host.zone as usize {
                return Some((c, None));
            }
            let home_owner = self.owner[home][c as usize];
            if self.visible[home_owner as usize * self.chunks + c as usize] {
                Some((c, Some(home_owner)))
            } else {
                waited.then_some((c, None))
            }
        })
    }

    /// After `owner_wait` of a still scope: a chunk nobody fetches from the proxy (and, under the provider
    /// policy, that its owner does not hold), else any missing one.
    fn any_choice(&self, h: u32) -> u32 {
        let scope_index = self.scope_of(h);
        let scope = &self.scopes[scope_index];
        let host = &self.hosts[h as usize];
        let owner_has = |c: u32| {
            let owner = self.owner[scope_index][c as usize];
            self.s.policy.zone_local() && self.visible[owner as usize * self.chunks + c as usize]
        };
        host.unasked
            .iter()
            .copied()
            .find(|&c| scope.proxy_flight[c as usize].is_none() && !owner_has(c))
            .unwrap_or(host.unasked[0])
    }

    /// Marks `chunk` asked for by `h`.
    fn take(&mut self, h: u32, chunk: u32) {
        let host = &mut self.hosts[h as usize];
        let pos = host.position[chunk as usize] as usize;
        host.unasked.swap_remove(pos);
        if let Some(&moved) = host.unasked.get(pos) {
            host.position[moved as usize] = pos as u32;
        }
        host.position[chunk as usize] = u32::MAX;
        host.in_flight += 1;
    }

    fn start_peer(&mut self, h: u32, from: u32, chunk: u32, t: f64) {
        let bytes = self.chunk_sizes[chunk as usize];
        let sent = t + self.costs.rtt_s / 2.0;
        let mut end = self.hosts[from as usize].up.serve(sent, bytes);
        let (zf, zh) = (self.hosts[from as usize].zone, self.hosts[h as usize].zone);
        if zf != zh {
            end = end.max(self.zone_up[zf as usize].serve(sent, bytes));
            end = end.max(self.zone_down[zh as usize].serve(sent, bytes));
            self.cross_zone += bytes;
        }
        end = end.max(self.hosts[h as usize].down.serve(sent, bytes));
        let send_cpu = self.cpu_secs(bytes, self.costs.send_cpu_s_per_gib);
        self.cpu_of(from).run(sent, send_cpu);
        self.arrive(h, chunk, end + self.costs.rtt_s / 2.0);
    }

    fn start_proxy(&mut self, h: u32, chunk: u32, t: f64) {
        let bytes = self.chunk_sizes[chunk as usize];
        let sent = t + self.costs.rtt_s / 2.0;
        let zone = self.hosts[h as usize].zone as usize;
        let mut end = self.proxy.serve(sent, bytes);
        end = end.max(self.zone_down[zone].serve(sent, bytes));
        end = end.max(self.hosts[h as usize].down.serve(sent, bytes));
        self.proxy_bytes_by_zone[zone] += bytes;
        let scope = self.scope_of(h);
        self.scopes[scope].proxy_flight[chunk as usize] = Some(h);
        self.arrive(h, chunk, end + self.costs.rtt_s / 2.0);
    }

    /// Verifies the received chunk on `h`'s CPU, then it has arrived.
    fn arrive(&mut self, h: u32, chunk: u32, received: f64) {
        let bytes = self.chunk_sizes[chunk as usize];
        let secs = self.cpu_secs(bytes, self.costs.receive_cpu_s_per_gib);
        let verified = self.cpu_of(h).run(received, secs);
        self.at(verified, Event::Arrived { host: h, chunk });
    }

    fn cpu_secs(&self, bytes: f64, per_gib: f64) -> f64 {
        bytes / (1u64 << 30) as f64 * per_gib
    }
}

#[cfg(test)]
mod tests;
