//! What a simulated run is made of: the measured per-chunk costs, the fleet's shape, and
//! the fetch policy under test.

/// Bytes per second from megabits per second.
pub fn mbit(m: f64) -> f64 {
    m * 1e6 / 8.0
}

/// Per-chunk costs, each measured on the development machine by a benchmark of this
/// repository (the figures are in the README's performance table).
#[derive(Clone, Debug)]
pub struct Costs {
    /// The chunk size of imgd's chunk lists.
    pub chunk_bytes: u64,
    /// CPU seconds per GiB a receiving agent spends (read, sha256, cache write):
    /// `bench-p2p`, receiver side.
    pub receive_cpu_s_per_gib: f64,
    /// CPU seconds per GiB a serving agent spends: `bench-p2p`, sender side.
    pub send_cpu_s_per_gib: f64,
    /// The proxy's rate serving stored chunks (`bench-proxy-rss`, pull served from chunks).
    pub proxy_serve_bytes_s: f64,
    /// Round trip between two hosts (one request's latency, added to every transfer).
    pub rtt_s: f64,
    /// Fixed time from `imgctl prefetch` to the first chunk request (manifest, chunk lists),
    /// calibrated from the one-host run (see `calibration`).
    pub startup_s: f64,
}

impl Default for Costs {
    fn default() -> Self {
        Costs {
            chunk_bytes: imgd_core::CHUNK_SIZE as u64,
            receive_cpu_s_per_gib: 0.72,
            send_cpu_s_per_gib: 0.21,
            proxy_serve_bytes_s: 1_604e6,
            rtt_s: 0.000_2,
            startup_s: 0.0,
        }
    }
}

/// The agent's fetch settings the simulation uses (defaults of `agent/src/config.rs` and
/// the constants of `agent/src/fetch.rs`).
#[derive(Clone, Debug)]
pub struct FetchSettings {
    /// `parallel_chunks`: chunk fetches in flight per host.
    pub parallel_chunks: usize,
    /// `owner_wait_ms`: after this long with nothing new in its scope, a host fetches any
    /// chunk from the proxy itself.
    pub owner_wait_s: f64,
    /// `holders::GATHER_MAX`: a host fetching under the provider policy waits at most this
    /// long for its first provider lookups and maps before it starts (the 32-host run's
    /// logs: 1.5–2.4 s, under load).
    pub gather_s: f64,
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            parallel_chunks: 4,
            owner_wait_s: 4.0,
            gather_s: 2.0,
        }
    }
}

/// How hosts learn who holds which chunk, and whom they split the proxy's work with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Today's agent (`Fetcher::refresh_maps`): every fetching host asks every peer it
    /// knows for its have-map every `refresh_s`; chunk owners are chosen among all hosts;
    /// a holder is picked at random among those with the chunk.
    PollAll { refresh_s: f64 },
    /// Issue 12's design, as the simulator found it must be to keep one copy per zone:
    /// - each host subscribes to the have-maps of `k` peers of its zone found through
    ///   provider records, which push updates in batches every `push_batch_s`;
    /// - it takes a chunk from the least loaded of those holding it, or from the chunk's
    ///   owner in its zone (every host can compute it from the provider records);
    /// - owners are chosen among the fetching hosts of each zone and fetch the chunks they
    ///   own *before* peers' chunks;
    /// - with `home_zones`, only the owner in the chunk's home zone (a rendezvous choice
    ///   among zones) takes it from the proxy; the other zones' owners take it from that
    ///   owner, across zones. Without (as the agent does today), each zone's owner takes
    ///   it from the proxy: one copy per zone.
    Providers {
        k: usize,
        push_batch_s: f64,
        home_zones: bool,
    },
}

impl Policy {
    pub fn name(&self) -> String {
        match self {
            Policy::PollAll { .. } => "poll all peers (today)".into(),
            Policy::Providers {
                k,
                home_zones: true,
                ..
            } => format!("providers, k = {k}, pushed, home zones"),
            Policy::Providers { k, .. } => format!("providers, k = {k}, pushed (the agent)"),
        }
    }

    /// Whether peers and chunk owners are looked for in the host's zone only.
    pub fn zone_local(&self) -> bool {
        matches!(self, Policy::Providers { .. })
    }

    /// Whether each chunk comes from the proxy into its home zone only.
    pub fn home_zones(&self) -> bool {
        matches!(
            self,
            Policy::Providers {
                home_zones: true,
                ..
            }
        )
    }
}

/// Where the agents' CPU work (verifying received chunks, serving chunks) runs.
#[derive(Clone, Copy, Debug)]
pub enum CpuModel {
    /// Every host has this many cores of its own.
    PerHost(usize),
    /// Every host runs on one machine of this many cores (the namespace runs).
    Shared(usize),
}

/// One simulated run: a fleet, its links, an image and a policy.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub hosts: usize,
    /// Hosts are spread evenly over this many zones (subnets, racks).
    pub zones: usize,
    /// Each host's link rate, bytes per second, in each direction.
    pub host_link_bytes_s: f64,
    /// Each zone's link to the core (where the proxy is), bytes per second, each direction.
    pub zone_link_bytes_s: f64,
    /// The proxy's own uplink, bytes per second.
    pub proxy_link_bytes_s: f64,
    pub image_bytes: u64,
    /// Where the agents' CPU work runs.
    pub cpu: CpuModel,
    /// Hosts start at a uniformly random moment in `[0, start_jitter_s]`.
    pub start_jitter_s: f64,
    pub policy: Policy,
    pub seed: u64,
}
