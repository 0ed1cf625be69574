//! Fleet simulator: what one machine cannot host. A discrete-event model of the agent's
//! fetch policy (`agent/src/fetch.rs`, `agent/src/holders.rs`: rendezvous owners per zone,
//! subscriptions to `max_asked_peers` providers, rarest first, `parallel_chunks` per blob,
//! `owner_wait`) over FIFO links and processor-shared CPUs, driven by per-chunk and
//! per-host costs measured by this repository's benchmarks. It first reproduces the
//! namespace runs (every host on this 2-core machine: [`namespace`]) and prints its error
//! against them, then runs fleets of 100 to 10,000 hosts in zones behind one proxy uplink,
//! one machine per host, with the old have-map polling, the agent's provider lookups and
//! a home-zone design, and prints proxy egress per zone, p50 / p99 completion of a 3 GB
//! image, and control messages per host, next to Kraken's published figures.
//!
//! `cargo run --release -p imgd-benches --bin bench-fleet-sim [-- --quick]`
//! (`--quick` leaves out the 10,000-host fleet). `-- --probe-cpu N` measures the
//! namespace runs' CPU instead ([`probe`]).

mod control;
mod namespace;
mod ownership;
mod params;
mod probe;
mod report;
mod resources;
mod rng;
mod sim;

use namespace::AGENT;
use params::{mbit, Costs, CpuModel, FetchSettings, Policy, Scenario, GATHER_UNLOADED};

const POLL: Policy = Policy::PollAll { refresh_s: 0.1 };
const HOME_ZONES: Policy = Policy::Providers {
    k: 16,
    push_batch_s: 0.05,
    home_zones: true,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--probe-cpu") {
        let windows = args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(1);
        return probe::run(windows);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let fetch = FetchSettings::default();
    println!("# imgd fleet simulation");
    println!();
    let costs = namespace::check(&Costs::default(), &fetch, POLL, &[AGENT, HOME_ZONES]);

    println!();
    let sizes: &[usize] = if quick {
        &[100, 1_000]
    } else {
        &[100, 1_000, 10_000]
    };
    report::fleet_header();
    for &hosts in sizes {
        for policy in [POLL, AGENT, HOME_ZONES] {
            simulate(&fleet(hosts, policy), &costs, &fetch);
        }
    }
    println!();
    println!(
        "Kraken's setup: 2,600 hosts, and 5 proxy replicas (5 x 10 Gbit/s) for its 5 origins:"
    );
    println!();
    report::fleet_header_columns();
    for policy in [POLL, HOME_ZONES] {
        let mut s = fleet(2_600, policy);
        s.proxy_link_bytes_s *= 5.0;
        simulate(&s, &costs, &fetch);
    }
    report::kraken();
    Ok(())
}

fn simulate(s: &Scenario, costs: &Costs, fetch: &FetchSettings) {
    let started = std::time::Instant::now();
    let out = sim::run(s, costs, fetch);
    report::fleet_row(s, &out, started.elapsed());
}

/// A fleet of `hosts` in zones of 250 behind one proxy uplink, pulling a 3 GB image (one
/// blob) at once, each host limited to 300 MB/s as in Kraken's benchmark, on its own cores.
fn fleet(hosts: usize, policy: Policy) -> Scenario {
    Scenario {
        hosts,
        zones: hosts.div_ceil(250),
        host_link_bytes_s: 300e6,
        zone_link_bytes_s: mbit(40_000.0),
        proxy_link_bytes_s: mbit(10_000.0),
        blobs: vec![3_000_000_000],
        cpu: CpuModel::PerHost(4),
        start_jitter_s: 1.0,
        policy,
        gather_s: vec![GATHER_UNLOADED],
        seed: hosts as u64,
    }
}
