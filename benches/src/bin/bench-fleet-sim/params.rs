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
    /// CPU seconds one host's prefetch spends beyond its per-chunk work (the `imgctl`
    /// client, manifest and chunk lists, provider records and lookups, subscriptions and
    /// the maps they push): measured by `--probe-cpu` in the namespace runs
    /// ([`crate::namespace`]). It runs from the prefetch's start, beside its fetches, on
    /// the host's cores (or the shared ones); the prefetch ends when both are done.
    pub startup_cpu_s: f64,
    /// CPU seconds per GiB the proxy spends ingesting a blob it does not have yet (fetch,
    /// inflate, chunk, hash, index) before any host gets its chunk list; charged only
    /// when the hosts and the proxy share one machine ([`CpuModel::Shared`]): the fleets'
    /// proxy holds the image already.
    pub proxy_ingest_cpu_s_per_gib: f64,
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
            startup_cpu_s: 0.0,
            proxy_ingest_cpu_s_per_gib: 0.0,
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
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            parallel_chunks: 4,
            owner_wait_s: 4.0,
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
    /// Issue 12's provider records and pushed have-maps (`agent/src/holders.rs`):
    /// - each host subscribes to the have-maps of `k` (`max_asked_peers`) of the blob's
    ///   providers, its zone's first and then others (`PeerSet::choose`); they push every
    ///   change, at most one push per `push_batch_s` (`PUSH_INTERVAL_MS`);
    /// - owners are chosen among the fetching hosts of each zone and fetch the chunks they
    ///   own that no watched peer holds or fetches *before* peers' chunks;
    /// - without `home_zones` (the agent), a host takes a chunk a watched peer holds from
    ///   a holder in its zone if one has it, else from one outside, at random;
    /// - with `home_zones` (a design the simulator explored, not the agent), hosts
    ///   subscribe in their zone only, also take chunks from their zone's owner, from the
    ///   least loaded holder, and only the owner in the chunk's home zone (a rendezvous
    ///   choice among zones) takes it from the proxy; the other zones' owners take it from
    ///   that owner, across zones.
    Providers {
        k: usize,
        push_batch_s: f64,
        home_zones: bool,
    },
}

impl Policy {
    pub fn name(&self) -> String {
        match self {
            Policy::PollAll { .. } => "poll all peers (before issue 12)".into(),
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
    /// The image's blobs (layers), bytes each: each host fetches them all at once, each
    /// with `parallel_chunks` chunks in flight (`Agent::prefetch`, `Fetcher::fetch_blob`).
    pub blobs: Vec<u64>,
    /// Where the agents' CPU work runs.
    pub cpu: CpuModel,
    /// Hosts start at a uniformly random moment in `[0, start_jitter_s]`.
    pub start_jitter_s: f64,
    pub policy: Policy,
    /// Under the provider policy, how long a host gathers a blob's providers and their
    /// first maps before it chooses owners and starts (`Holders::fetchers`), per blob (the
    /// last entry for the blobs after): quantiles 0, 25, 50, 75 and 100 % of a
    /// distribution each host draws from. At least `holders::FIRST_LOOKUP_GAP`, 0.25 s
    /// (the second lookup), about `holders::GATHER_MAX`, 2 s, when lookups are slow, plus
    /// the time to be scheduled on a loaded machine.
    pub gather_s: Vec<[f64; 5]>,
    pub seed: u64,
}

/// An unloaded host's gather: the second provider lookup, `holders::FIRST_LOOKUP_GAP`
/// after the first, answers at once.
pub const GATHER_UNLOADED: [f64; 5] = [0.25; 5];

impl Scenario {
    pub fn image_bytes(&self) -> u64 {
        self.blobs.iter().sum()
    }
}
