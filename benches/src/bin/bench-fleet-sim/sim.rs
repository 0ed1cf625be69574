//! The discrete-event engine: every host of a [`Scenario`] fetches the image's blobs,
//! chunk by chunk, from peers and the proxy, choosing as the agent's fetcher does under
//! the scenario's [`Policy`] ([`choice`]); every chunk is verified (CPU) on arrival.
//!
//! A host's prefetch asks for each blob's chunk list after the calibrated fixed latency
//! (once the proxy ingested the blob, if it had to); under the provider policy it then
//! gathers the blob's providers for a while ([`Scenario::gather_s`]) before it starts
//! fetching the blob. Its start-up CPU work runs beside all that, and it is done when
//! that work and every chunk are. CPU work (start-up, verifying, serving, the proxy's
//! ingest on a shared machine) queues on the host's cores, or on the machine's when the
//! hosts share one.
//!
//! What a host does shows to the others as the agent's have-maps do: under the provider
//! policy, its subscribers see its chunks in flight and held when it pushes its map (at
//! once, or one push interval after the last push), half a round trip later; under
//! polling, a chunk it holds shows after half a poll interval on average.

mod choice;
mod events;
mod maps;
mod transfers;

use crate::ownership;
use crate::params::{Costs, CpuModel, FetchSettings, Policy, Scenario};
use crate::resources::{Cpu, Link};
use crate::rng::Rng;
use events::{Event, Queue};
use maps::Push;

/// What a job on a CPU is for.
#[derive(Clone, Copy, Debug)]
enum Job {
    Startup(u32),
    Ingest(u32),
    Verify {
        host: u32,
        chunk: u32,
    },
    /// Work that delays nothing but takes its share (serving a chunk).
    Background,
}

/// One host's fetch of one blob: the chunks not yet asked for and those in flight.
struct Slots {
    /// When its fetch started (chunk list known, providers gathered), if it did.
    start: Option<f64>,
    unasked: Vec<u32>,
    in_flight: usize,
    /// Its scope's visibility version at its last choice that found no holder (polling).
    seen_version: u64,
    /// Its news count at its last choice that found no holder (providers).
    seen_news: u64,
}

/// One host's prefetch.
struct Host {
    zone: u32,
    /// When its prefetch was asked for, if it was.
    start: f64,
    begun: bool,
    done: Option<f64>,
    /// Whether its start-up CPU work is done.
    startup_done: bool,
    blobs: Vec<Slots>,
    /// Each chunk's position in its blob's `unasked` (`u32::MAX`: asked).
    position: Vec<u32>,
    remaining: usize,
    up: Link,
    down: Link,
    /// Chunks this host owns (fetches from the proxy), in chunk order.
    owned: Vec<u32>,
    ticking: bool,
    /// The peers whose have-maps it subscribes to (provider policy only).
    neighbors: Vec<u32>,
    /// Changes seen at its neighbors, and when the last one came.
    news: u64,
    last_news: f64,
    push: Push,
}

/// What the hosts of one scope (a zone, or the whole fleet) see of each other at once.
struct Scope {
    holders: Vec<Vec<u32>>,
    proxy_flight: Vec<Option<u32>>,
    version: u64,
    /// When a chunk last became visible in the scope.
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
    /// Each chunk's blob.
    blob_of: Vec<u32>,
    hosts: Vec<Host>,
    scopes: Vec<Scope>,
    cpus: Vec<Cpu<Job>>,
    proxy: Link,
    zone_down: Vec<Link>,
    zone_up: Vec<Link>,
    queue: Queue,
    rng: Rng,
    proxy_bytes_by_zone: Vec<f64>,
    cross_zone: f64,
    chunks: usize,
    /// `held[h * chunks + c]`: `h`'s subscribers see it holds chunk `c`.
    held: Vec<bool>,
    /// `flight[h * chunks + c]`: `h`'s subscribers see it fetching chunk `c`.
    flight: Vec<bool>,
    /// Who subscribes to each host's have-map.
    subscribers: Vec<Vec<u32>>,
    /// `owner[scope][c]`: the host that fetches chunk `c` from the proxy for its scope.
    owner: Vec<Vec<u32>>,
    /// The hosts of each zone.
    zone_members: Vec<Vec<u32>>,
    /// Each chunk's home zone (home-zone policy): the one whose owner fetches it.
    home: Vec<u32>,
    /// Whether the proxy holds each blob (from the start, unless it ingests them).
    ingested: Vec<bool>,
}

/// Runs `s` to the end (every host holds the image).
pub fn run(s: &Scenario, costs: &Costs, fetch: &FetchSettings) -> Outcome {
    let mut sim = Sim::new(s, costs, fetch);
    while let Some((at, event)) = sim.queue.pop() {
        sim.handle(at, event);
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
        let (mut chunk_sizes, mut blob_of, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
        for (b, &bytes) in s.blobs.iter().enumerate() {
            let first = chunk_sizes.len() as u32;
            for i in 0..bytes.div_ceil(costs.chunk_bytes) {
                chunk_sizes.push((bytes - i * costs.chunk_bytes).min(costs.chunk_bytes) as f64);
                blob_of.push(b as u32);
            }
            ranges.push(first..chunk_sizes.len() as u32);
        }
        let chunks = chunk_sizes.len();
        let zones = s.zones.max(1);
        let zone_of = |h: usize| (h * zones / s.hosts.max(1)) as u32;
        let zone_members: Vec<Vec<u32>> = (0..zones as u32)
            .map(|z| {
                (0..s.hosts as u32)
                    .filter(|&h| zone_of(h as usize) == z)
                    .collect()
            })
            .collect();
        let scope_count = if s.policy.zone_local() { zones } else { 1 };
        // Owners: among the zone's hosts (zone-local policy) or all hosts.
        let owner: Vec<Vec<u32>> = if scope_count == 1 {
            let all: Vec<u32> = (0..s.hosts as u32).collect();
            vec![ownership::owners(chunks as u32, &all)]
        } else {
            let owners = |m: &Vec<u32>| ownership::owners(chunks as u32, m);
            zone_members.iter().map(owners).collect()
        };
        let mut rng = Rng::new(s.seed);
        let mut queue = Queue::default();
        let mut hosts = Vec::with_capacity(s.hosts);
        for h in 0..s.hosts {
            let zone = zone_of(h);
            let scope = if scope_count == 1 { 0 } else { zone as usize };
            let owned = (0..chunks as u32)
                .filter(|&c| owner[scope][c as usize] == h as u32)
                .collect();
            let mut position = vec![0; chunks];
            let blobs = ranges
                .iter()
                .map(|r| {
                    for (i, c) in r.clone().enumerate() {
                        position[c as usize] = i as u32;
                    }
                    Slots {
                        start: None,
                        unasked: r.clone().collect(),
                        in_flight: 0,
                        seen_version: u64::MAX,
                        seen_news: u64::MAX,
                    }
                })
                .collect();
            hosts.push(Host {
                zone,
                start: 0.0,
                done: None,
                startup_done: false,
                begun: false,
                blobs,
                position,
                remaining: chunks,
                up: Link::new(s.host_link_bytes_s),
                down: Link::new(s.host_link_bytes_s),
                owned,
                ticking: false,
                neighbors: Vec::new(),
                news: 0,
                last_news: f64::NEG_INFINITY,
                push: Push::default(),
            });
            queue.push(rng.unit() * s.start_jitter_s, Event::Begin(h as u32));
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
        if let Policy::Providers { k, home_zones, .. } = s.policy {
            for h in 0..s.hosts {
                let zone = hosts[h].zone as usize;
                let others = |m: &&u32| **m != h as u32;
                let inside: Vec<u32> = zone_members[zone].iter().filter(others).copied().collect();
                let mut picked = rng.distinct(&inside, k);
                if !home_zones && picked.len() < k {
                    // `PeerSet::choose`: the zone's peers first, then any others.
                    let outside: Vec<u32> = (0..s.hosts as u32)
                        .filter(|&o| zone_of(o as usize) as usize != zone)
                        .collect();
                    picked.extend(rng.distinct(&outside, k - picked.len()));
                }
                for &n in &picked {
                    subscribers[n as usize].push(h as u32);
                }
                hosts[h].neighbors = picked;
            }
        }
        let proxy_rate = s.proxy_link_bytes_s.min(costs.proxy_serve_bytes_s);
        // The proxy ingests the blobs on the first chunk-list request, on the shared
        // machine (a fleet's proxy holds the image already).
        let shared = matches!(s.cpu, CpuModel::Shared(_));
        let ingests = shared && costs.proxy_ingest_cpu_s_per_gib > 0.0;
        if ingests {
            queue.push(costs.startup_s, Event::Ingest);
        }
        let ingested = vec![!ingests; s.blobs.len()];
        Sim {
            s,
            costs,
            fetch,
            chunk_sizes,
            blob_of,
            hosts,
            scopes,
            cpus,
            proxy: Link::new(proxy_rate),
            zone_down: vec![Link::new(s.zone_link_bytes_s); zones],
            zone_up: vec![Link::new(s.zone_link_bytes_s); zones],
            queue,
            rng,
            proxy_bytes_by_zone: vec![0.0; zones],
            cross_zone: 0.0,
            chunks,
            held: vec![false; s.hosts * chunks],
            flight: vec![false; s.hosts * chunks],
            subscribers,
            owner,
            home: ownership::owners(chunks as u32, &(0..zones as u32).collect::<Vec<_>>()),
            zone_members,
            ingested,
        }
    }

    fn scope_of(&self, h: u32) -> usize {
        if self.scopes.len() == 1 {
            0
        } else {
            self.hosts[h as usize].zone as usize
        }
    }

    fn cpu_index(&self, h: u32) -> usize {
        if self.cpus.len() == 1 {
            0
        } else {
            h as usize
        }
    }

    /// Queues `secs` of CPU work for host `h` (on its cores or the shared ones) at `t`.
    fn compute(&mut self, h: u32, t: f64, secs: f64, job: Job) {
        let i = self.cpu_index(h);
        if let Some((at, epoch)) = self.cpus[i].submit(t, secs, job) {
            let cpu = i as u32;
            self.queue.push(at, Event::CpuDone { cpu, epoch });
        }
    }

    fn handle(&mut self, t: f64, event: Event) {
        match event {
            Event::Begin(h) => {
                self.hosts[h as usize].start = t;
                self.compute(h, t, self.costs.startup_cpu_s, Job::Startup(h));
                self.hosts[h as usize].begun = true;
                for b in 0..self.s.blobs.len() {
                    if self.ingested[b] {
                        self.listed(h, b as u32, t + self.costs.startup_s);
                    }
                }
            }
            Event::Ingest => {
                for b in 0..self.s.blobs.len() {
                    let bytes = self.s.blobs[b] as f64;
                    let secs = cpu_secs(bytes, self.costs.proxy_ingest_cpu_s_per_gib);
                    self.compute(0, t, secs, Job::Ingest(b as u32));
                }
            }
            Event::BlobReady { host, blob } => {
                self.hosts[host as usize].blobs[blob as usize].start = Some(t);
                self.pick(host, t);
            }
            Event::CpuDone { cpu, epoch } => {
                let Some((done, next)) = self.cpus[cpu as usize].complete(t, epoch) else {
                    return;
                };
                if let Some((at, epoch)) = next {
                    self.queue.push(at, Event::CpuDone { cpu, epoch });
                }
                for job in done {
                    match job {
                        Job::Startup(h) => {
                            self.hosts[h as usize].startup_done = true;
                            self.maybe_done(h, t);
                        }
                        Job::Ingest(b) => {
                            self.ingested[b as usize] = true;
                            for h in 0..self.hosts.len() as u32 {
                                let host = &self.hosts[h as usize];
                                if host.begun {
                                    let asked = host.start + self.costs.startup_s;
                                    self.listed(h, b, t.max(asked));
                                }
                            }
                        }
                        Job::Verify { host, chunk } => self.arrived(host, chunk, t),
                        Job::Background => {}
                    }
                }
            }
            Event::Received { host, chunk } => {
                let bytes = self.chunk_sizes[chunk as usize];
                let secs = cpu_secs(bytes, self.costs.receive_cpu_s_per_gib);
                self.compute(host, t, secs, Job::Verify { host, chunk });
            }
            Event::Visible { host, chunk } => self.visible(host, chunk, t),
            Event::InFlight { host, chunk } => self.in_flight(host, chunk, t),
            Event::Push(h) => self.push(h, t),
            Event::Tick(h) => {
                self.hosts[h as usize].ticking = false;
                self.pick(h, t);
            }
        }
    }

    /// Host `h` got blob `b`'s chunk list at `t`: it fetches the blob once it gathered
    /// the blob's providers (provider policy), at once otherwise.
    fn listed(&mut self, h: u32, b: u32, t: f64) {
        let gather = match self.s.policy {
            Policy::Providers { .. } => {
                let g = &self.s.gather_s;
                g.get(b as usize)
                    .or(g.last())
                    .map_or(0.0, |q| quantile(q, self.rng.unit()))
            }
            Policy::PollAll { .. } => 0.0,
        };
        let event = Event::BlobReady { host: h, blob: b };
        self.queue.push(t + gather, event);
    }

    fn maybe_done(&mut self, h: u32, t: f64) {
        let host = &mut self.hosts[h as usize];
        if host.remaining == 0 && host.startup_done && host.done.is_none() {
            host.done = Some(t);
        }
    }

    fn arrived(&mut self, host: u32, chunk: u32, t: f64) {
        let blob = self.blob_of[chunk as usize] as usize;
        let hs = &mut self.hosts[host as usize];
        hs.blobs[blob].in_flight -= 1;
        hs.remaining -= 1;
        self.maybe_done(host, t);
        self.changed(host, chunk, true, t);
        self.pick(host, t);
    }

    /// Marks `chunk` asked for by `h`; its subscribers will see it in flight.
    fn take(&mut self, h: u32, chunk: u32, t: f64) {
        let blob = self.blob_of[chunk as usize] as usize;
        let host = &mut self.hosts[h as usize];
        let pos = host.position[chunk as usize] as usize;
        let slots = &mut host.blobs[blob];
        slots.unasked.swap_remove(pos);
        if let Some(&moved) = slots.unasked.get(pos) {
            host.position[moved as usize] = pos as u32;
        }
        host.position[chunk as usize] = u32::MAX;
        slots.in_flight += 1;
        self.changed(h, chunk, false, t);
    }
}

/// The value at `u` (in `[0, 1)`) of the distribution given by its quantiles 0, 25, 50,
/// 75 and 100 %, linear in between.
fn quantile(q: &[f64; 5], u: f64) -> f64 {
    let x = u * 4.0;
    let i = (x as usize).min(3);
    q[i] + (q[i + 1] - q[i]) * (x - i as f64)
}

fn cpu_secs(bytes: f64, per_gib: f64) -> f64 {
    bytes / (1u64 << 30) as f64 * per_gib
}

#[cfg(test)]
mod tests;
