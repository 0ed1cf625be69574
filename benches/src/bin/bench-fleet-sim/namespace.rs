//! The namespace runs the model is checked against: every host on this 2-core machine,
//! so under [`CpuModel::Shared`] the hosts' (and the proxy's) work queues on 2 cores.

use crate::params::{mbit, Costs, CpuModel, FetchSettings, Policy, Scenario, GATHER_UNLOADED};
use crate::{report, sim};

/// `bench-swarm` on this machine (README performance table, 2026-11-23): 8 hosts, tbf
/// 500 Mbit/s each way, a 115.9 MB image, all prefetching at once (polling agent).
struct SwarmRun {
    hosts: usize,
    mbit: f64,
    image_bytes: u64,
    alone_s: f64,
    slowest_s: f64,
    egress: f64,
}

const MEASURED: SwarmRun = SwarmRun {
    hosts: 8,
    mbit: 500.0,
    image_bytes: 115_900_000,
    alone_s: 2.05,
    slowest_s: 4.02,
    egress: 1.00,
};

/// `swarm_zones` on this machine (release build, unshaped veths): `zones` subnets of
/// `per_zone` hosts, bootstrap peers only, one `swarm.zone` per subnet, all prefetching one
/// image at once. Times are from the common start; egress is the most the proxy sent into
/// one subnet, counted by iptables on its bridge (IP bytes, headers included).
pub struct ZonedRun {
    zones: usize,
    per_zone: usize,
    slowest_s: f64,
    egress: f64,
    /// What `--probe-cpu` and the agents' logs showed of a run of the same size.
    probe: Probe,
}

/// A run of `swarm_zones` measured by `--probe-cpu` (and its agents' logs): the inputs of
/// the shared-core model.
pub struct Probe {
    /// CPU seconds all agents spent in the prefetch window.
    agents_cpu_s: f64,
    /// CPU seconds the proxy spent in it.
    proxy_cpu_s: f64,
    /// What the proxy sent into the subnets in it (iptables, both subnets).
    egress_bytes: f64,
    /// Over how long the `imgctl prefetch` processes started.
    spawn_s: f64,
    /// Per blob (in [`ZONED_BLOBS`] order), quantiles 0, 25, 50, 75, 100 % of `after_ms`
    /// of the agents' "chunk owners chosen" lines (one per host), in seconds.
    gather_s: [[f64; 5]; 4],
    when: &'static str,
}

impl Probe {
    /// Start-up CPU seconds per host: the agents' CPU less what the model charges for
    /// their chunks (every host receives the image, peers send all but the proxy's part).
    fn startup_cpu_s(&self, hosts: usize, costs: &Costs) -> f64 {
        let gib = (1u64 << 30) as f64;
        let image = ZONED_BLOBS.iter().sum::<u64>() as f64;
        let received = hosts as f64 * image;
        let chunks = received / gib * costs.receive_cpu_s_per_gib
            + (received - self.egress_bytes) / gib * costs.send_cpu_s_per_gib;
        (self.agents_cpu_s - chunks) / hosts as f64
    }

    /// The proxy's ingest CPU per GiB: its CPU less serving at its measured rate.
    fn ingest_cpu_s_per_gib(&self, costs: &Costs) -> f64 {
        let serving = self.egress_bytes / costs.proxy_serve_bytes_s;
        let image = ZONED_BLOBS.iter().sum::<u64>() as f64;
        (self.proxy_cpu_s - serving) / (image / (1u64 << 30) as f64)
    }
}

const ZONED: [ZonedRun; 2] = [
    ZonedRun {
        zones: 2,
        per_zone: 4,
        slowest_s: ZONED_8_SLOWEST,
        egress: ZONED_8_EGRESS,
        probe: PROBE_8,
    },
    ZonedRun {
        zones: 2,
        per_zone: 16,
        slowest_s: ZONED_32_SLOWEST,
        egress: ZONED_32_EGRESS,
        probe: PROBE_32,
    },
];

/// Runs of the model (seeds) per zoned check.
const SEEDS: u64 = 20;

/// The policies the zoned runs are checked under: the agent's first.
pub const AGENT: Policy = Policy::Providers {
    k: 16,
    push_batch_s: 0.05,
    home_zones: false,
};

fn bench_swarm_run(hosts: usize, policy: Policy) -> Scenario {
    Scenario {
        hosts,
        zones: 1,
        host_link_bytes_s: mbit(MEASURED.mbit),
        zone_link_bytes_s: f64::INFINITY,
        proxy_link_bytes_s: f64::INFINITY,
        blobs: vec![MEASURED.image_bytes],
        cpu: CpuModel::Shared(2),
        start_jitter_s: 0.0,
        policy,
        gather_s: vec![GATHER_UNLOADED],
        seed: 7,
    }
}

/// As [`bench_swarm_run`], with the zoned run's subnets, image and unshaped veths.
fn zoned_run(run: &ZonedRun, policy: Policy) -> Scenario {
    Scenario {
        zones: run.zones,
        host_link_bytes_s: f64::INFINITY,
        blobs: ZONED_BLOBS.to_vec(),
        start_jitter_s: run.probe.spawn_s,
        gather_s: run.probe.gather_s.to_vec(),
        ..bench_swarm_run(run.zones * run.per_zone, policy)
    }
}

/// The one-host calibration (returns the costs with `startup_s` set), the model against
/// `bench-swarm`, and against the zoned runs under each of `policies`.
pub fn check(costs: &Costs, fetch: &FetchSettings, poll: Policy, policies: &[Policy]) -> Costs {
    // The fixed per-host start-up latency is what one host alone took beyond the model's
    // transfer time; everything else comes from the measured per-chunk costs.
    let mut costs = costs.clone();
    let alone = sim::run(&bench_swarm_run(1, poll), &costs, fetch);
    costs.startup_s = (MEASURED.alone_s - report::max(&alone.finish)).max(0.0);
    println!(
        "Calibration: one host alone, {:.1} MB at {} Mbit/s: model {:.2} s of transfer, measured {:.2} s, so {:.2} s of fixed start-up per host.",
        MEASURED.image_bytes as f64 / 1e6,
        MEASURED.mbit,
        report::max(&alone.finish),
        MEASURED.alone_s,
        costs.startup_s
    );
    println!();
    let swarm = sim::run(&bench_swarm_run(MEASURED.hosts, poll), &costs, fetch);
    report::check(&[swarm], &MEASURED.into_measured(), MEASURED.image_bytes);
    println!();
    let thirty_two = sim::run(&bench_swarm_run(32, poll), &costs, fetch);
    report::prediction(
        "32 hosts, same links and image",
        &thirty_two,
        MEASURED.image_bytes,
    );
    for run in &ZONED {
        let hosts = run.zones * run.per_zone;
        let zoned = Costs {
            startup_cpu_s: run.probe.startup_cpu_s(hosts, &costs),
            proxy_ingest_cpu_s_per_gib: run.probe.ingest_cpu_s_per_gib(&costs),
            ..costs.clone()
        };
        let g: Vec<String> = (run.probe.gather_s.iter())
            .map(|q| format!("{:.2}-{:.2}", q[0], q[4]))
            .collect();
        for &policy in policies {
            println!();
            println!(
                "Model: {}, on 2 shared cores; measured at {hosts} hosts ({}): {:.3} CPU s of start-up per host, the proxy's ingest {:.1} CPU s per GiB, gathers per blob {} s (min-max), imgctl started over {:.2} s.",
                policy.name(),
                run.probe.when,
                zoned.startup_cpu_s,
                zoned.proxy_ingest_cpu_s_per_gib,
                g.join(", "),
                run.probe.spawn_s
            );
            // Which owner starts first, so which zone fetches a chunk, is chance: the mean
            // of several seeds is what is compared.
            let outs: Vec<sim::Outcome> = (1..=SEEDS)
                .map(|seed| {
                    let s = Scenario {
                        seed,
                        ..zoned_run(run, policy)
                    };
                    sim::run(&s, &zoned, fetch)
                })
                .collect();
            report::check(&outs, &run.measured(), ZONED_BLOBS.iter().sum());
        }
    }
    costs
}

impl SwarmRun {
    fn into_measured(self) -> report::Measured {
        report::Measured {
            label: format!(
                "{} hosts, tbf {} Mbit/s each way, {:.1} MB image (bench-swarm, 2026-11-23)",
                self.hosts,
                self.mbit,
                self.image_bytes as f64 / 1e6
            ),
            slowest_s: self.slowest_s,
            egress: self.egress,
            per_zone: false,
        }
    }
}

impl ZonedRun {
    fn measured(&self) -> report::Measured {
        report::Measured {
            label: format!(
                "{} hosts in {} routed subnets, bootstrap peers only, {:.1} MB image in {} blobs (swarm_zones, {})",
                self.zones * self.per_zone,
                self.zones,
                ZONED_BLOBS.iter().sum::<u64>() as f64 / 1e6,
                ZONED_BLOBS.len(),
                ZONED_WHEN
            ),
            slowest_s: self.slowest_s,
            egress: self.egress,
            per_zone: true,
        }
    }
}

// `cargo test --release -p imgd-tests --test swarm_zones -- --include-ignored --nocapture
// --test-threads=1` at 22:53-22:55 on 2026-12-01 (main at 1782022, quiet machine).
const ZONED_WHEN: &str = "2026-12-01 22:54";
const ZONED_8_SLOWEST: f64 = 2.82;
const ZONED_8_EGRESS: f64 = 0.58;
const ZONED_32_SLOWEST: f64 = 15.49;
const ZONED_32_EGRESS: f64 = 0.95;
/// The image's blobs: config and three gzip layers (`presets::big_gzip(160)`), from the
/// proxy's manifest during the run of 2026-12-02 00:05 (57,989,338 bytes in all).
const ZONED_BLOBS: [u64; 4] = [656, 23_252_805, 23_007_394, 11_728_483];

// `bench-fleet-sim --probe-cpu 1` beside `cargo test --release -p imgd-tests --test
// swarm_zones -- --ignored --nocapture thirty_two` (with `IMGD_ZONES_HOSTS=4` for 2 x 4
// hosts), main at 7d7edba, on 2026-12-02; the gathers from the agents' logs the test
// prints, the egress from iptables (8 hosts) or from the logs' `from_proxy` chunks (32
// hosts: the test stops at the first subnet over its bound). Other helpers were building:
// the load shows in the runs' own times (8 hosts 4.00 s, egress 0.64 / 0.75; 32 hosts
// 21.29 s, 2.84x into the first subnet after data-plane time-outs), which is why the
// check compares with the quiet run of 22:54 above, and takes only CPU seconds (what the
// agents and the proxy did, not how long they waited) and gathers from these.
const PROBE_8: Probe = Probe {
    agents_cpu_s: 4.02,
    proxy_cpu_s: 0.80,
    egress_bytes: 37_348_754.0 + 43_456_592.0,
    spawn_s: 0.01,
    gather_s: [
        [0.429, 0.439, 0.449, 0.451, 0.553],
        [0.415, 0.424, 0.443, 0.572, 0.754],
        [0.518, 0.557, 0.646, 0.655, 0.676],
        [0.408, 0.416, 0.421, 0.422, 0.429],
    ],
    when: "00:07, load 7.6",
};
const PROBE_32: Probe = Probe {
    agents_cpu_s: 26.52,
    proxy_cpu_s: 1.11,
    egress_bytes: 312_925_312.0,
    spawn_s: 0.05,
    gather_s: [
        [1.109, 1.244, 1.396, 1.525, 1.661],
        [2.010, 2.119, 2.344, 2.584, 3.122],
        [2.005, 2.082, 2.173, 2.381, 3.319],
        [0.902, 1.001, 1.068, 1.129, 1.335],
    ],
    when: "00:30, load 3.9",
};
