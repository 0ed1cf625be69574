//! Fleet simulator: what one machine cannot host. A discrete-event model of the agent's
//! fetch policy (`agent/src/fetch.rs`: rendezvous owners, rarest first, `parallel_chunks`,
//! `owner_wait`) over FIFO links, driven by per-chunk costs measured by this repository's
//! benchmarks. It first reproduces the namespace runs of `bench-swarm` (every host on this
//! 2-core machine) and prints its error against them, then runs fleets of 100 to 10,000
//! hosts in zones behind one proxy uplink, with today's have-map polling and with
//! issue 12's provider lookups, and prints proxy egress per zone, p50 / p99 completion of a
//! 3 GB image, and control messages per host, next to Kraken's published figures.
//!
//! `cargo run --release -p imgd-benches --bin bench-fleet-sim [-- --quick]`
//! (`--quick` leaves out the 10,000-host fleet).

mod control;
mod ownership;
mod params;
mod report;
mod resources;
mod rng;
mod sim;

use params::{mbit, Costs, CpuModel, FetchSettings, Policy, Scenario};

/// `bench-swarm` on this machine (README performance table, 2026-11-23): 8 hosts, tbf
/// 500 Mbit/s each way, a 115.9 MB image, all prefetching at once.
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

const POLL: Policy = Policy::PollAll { refresh_s: 0.1 };
const PROVIDERS: Policy = Policy::Providers {
    k: 16,
    push_batch_s: 0.05,
    home_zones: true,
};
/// The agent's policy today: providers and pushes, one proxy copy per zone.
const AGENT: Policy = Policy::Providers {
    k: 16,
    push_batch_s: 0.05,
    home_zones: false,
};

/// `swarm_zones` on this machine (release build, unshaped veths): `zones` subnets of
/// `per_zone` hosts, bootstrap peers only, one `swarm.zone` per subnet, all prefetching one
/// image at once. Times are from the common start; egress is the most the proxy sent into
/// one subnet, counted by iptables on its bridge (IP bytes, headers included).
struct ZonedRun {
    zones: usize,
    per_zone: usize,
    image_bytes: u64,
    slowest_s: f64,
    egress: f64,
    when: &'static str,
}

const ZONED: [ZonedRun; 2] = [
    ZonedRun {
        zones: 2,
        per_zone: 4,
        image_bytes: ZONED_8_IMAGE,
        slowest_s: ZONED_8_SLOWEST,
        egress: ZONED_8_EGRESS,
        when: ZONED_WHEN,
    },
    ZonedRun {
        zones: 2,
        per_zone: 16,
        image_bytes: ZONED_32_IMAGE,
        slowest_s: ZONED_32_SLOWEST,
        egress: ZONED_32_EGRESS,
        when: ZONED_WHEN,
    },
];

/// As [`namespace_run`], with the zoned run's subnets, image and unshaped veths.
fn zoned_run(run: &ZonedRun, policy: Policy) -> Scenario {
    Scenario {
        zones: run.zones,
        host_link_bytes_s: f64::INFINITY,
        image_bytes: run.image_bytes,
        seed: 11,
        ..namespace_run(run.zones * run.per_zone, &MEASURED, policy)
    }
}

fn namespace_run(hosts: usize, run: &SwarmRun, policy: Policy) -> Scenario {
    Scenario {
        hosts,
        zones: 1,
        host_link_bytes_s: mbit(run.mbit),
        zone_link_bytes_s: f64::INFINITY,
        proxy_link_bytes_s: f64::INFINITY,
        image_bytes: run.image_bytes,
        cpu: CpuModel::Shared(2),
        start_jitter_s: 0.0,
        policy,
        seed: 7,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let fetch = FetchSettings::default();
    let mut costs = Costs::default();

    // Calibration: the fixed per-host start-up cost is what one host alone took beyond the
    // model's transfer time; everything else comes from the measured per-chunk costs.
    let alone = sim::run(&namespace_run(1, &MEASURED, POLL), &costs, &fetch);
    costs.startup_s = (MEASURED.alone_s - report::max(&alone.finish)).max(0.0);
    println!("# imgd fleet simulation");
    println!();
    println!(
        "Calibration: one host alone, {:.1} MB at {} Mbit/s: model {:.2} s of transfer, measured {:.2} s, so {:.2} s of fixed start-up per host.",
        MEASURED.image_bytes as f64 / 1e6,
        MEASURED.mbit,
        report::max(&alone.finish),
        MEASURED.alone_s,
        costs.startup_s
    );
    println!();
    let check = sim::run(
        &namespace_run(MEASURED.hosts, &MEASURED, POLL),
        &costs,
        &fetch,
    );
    report::check(&check, &MEASURED.into_measured(), MEASURED.image_bytes);
    println!();
    let thirty_two = sim::run(&namespace_run(32, &MEASURED, POLL), &costs, &fetch);
    report::prediction(
        "32 hosts, same links and image",
        &thirty_two,
        MEASURED.image_bytes,
    );
    for run in &ZONED {
        for policy in [AGENT, PROVIDERS] {
            println!();
            println!("Model: {}.", policy.name());
            let out = sim::run(&zoned_run(run, policy), &costs, &fetch);
            report::check(&out, &run.measured(), run.image_bytes);
        }
    }

    println!();
    let sizes: &[usize] = if quick {
        &[100, 1_000]
    } else {
        &[100, 1_000, 10_000]
    };
    report::fleet_header();
    for &hosts in sizes {
        for policy in [POLL, AGENT, PROVIDERS] {
            simulate(&fleet(hosts, policy), &costs, &fetch);
        }
    }
    println!();
    println!(
        "Kraken's setup: 2,600 hosts, and 5 proxy replicas (5 x 10 Gbit/s) for its 5 origins:"
    );
    println!();
    report::fleet_header_columns();
    for policy in [POLL, PROVIDERS] {
        let mut s = fleet(2_600, policy);
        s.proxy_link_bytes_s *= 5.0;
        simulate(&s, &costs, &fetch);
    }
    report::kraken();
}

fn simulate(s: &Scenario, costs: &Costs, fetch: &FetchSettings) {
    let started = std::time::Instant::now();
    let out = sim::run(s, costs, fetch);
    report::fleet_row(s, &out, started.elapsed());
}

/// A fleet of `hosts` in zones of 250 behind one proxy uplink, pulling a 3 GB image at
/// once, each host limited to 300 MB/s as in Kraken's benchmark.
fn fleet(hosts: usize, policy: Policy) -> Scenario {
    Scenario {
        hosts,
        zones: hosts.div_ceil(250),
        host_link_bytes_s: 300e6,
        zone_link_bytes_s: mbit(40_000.0),
        proxy_link_bytes_s: mbit(10_000.0),
        image_bytes: 3_000_000_000,
        cpu: CpuModel::PerHost(4),
        start_jitter_s: 1.0,
        policy,
        seed: hosts as u64,
    }
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
                "{} hosts in {} routed subnets, bootstrap peers only, {:.1} MB image (swarm_zones, {})",
                self.zones * self.per_zone,
                self.zones,
                self.image_bytes as f64 / 1e6,
                self.when
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
const ZONED_8_IMAGE: u64 = 57_989_338;
const ZONED_8_SLOWEST: f64 = 2.82;
const ZONED_8_EGRESS: f64 = 0.58;
const ZONED_32_IMAGE: u64 = 57_989_338;
const ZONED_32_SLOWEST: f64 = 15.49;
const ZONED_32_EGRESS: f64 = 0.95;
