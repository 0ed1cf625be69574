//! The engine against cases whose outcome is known.

use super::*;
use crate::params::mbit;

fn scenario(hosts: usize, zones: usize, policy: Policy, image_bytes: u64) -> Scenario {
    Scenario {
        hosts,
        zones,
        host_link_bytes_s: mbit(1000.0),
        zone_link_bytes_s: f64::INFINITY,
        proxy_link_bytes_s: mbit(10_000.0),
        blobs: vec![image_bytes],
        cpu: CpuModel::PerHost(4),
        start_jitter_s: 0.0,
        policy,
        gather_s: vec![crate::params::GATHER_UNLOADED],
        seed: 1,
    }
}

const AGENT: Policy = Policy::Providers {
    k: 16,
    push_batch_s: 0.05,
    home_zones: false,
};

#[test]
fn one_host_alone_takes_the_image_at_its_link_rate() {
    let s = scenario(1, 1, Policy::PollAll { refresh_s: 0.1 }, 200 << 20);
    let out = run(&s, &Costs::default(), &FetchSettings::default());
    let ideal = s.image_bytes() as f64 / s.host_link_bytes_s;
    let took = out.finish[0];
    assert!(
        took >= ideal && took < ideal * 1.1,
        "{took} s against {ideal} s"
    );
    assert_eq!(out.proxy_bytes_by_zone, vec![s.image_bytes() as f64]);
}

#[test]
fn the_proxy_sends_one_copy_and_each_other_zone_takes_one_across_zones() {
    // Big enough that hosts run out of chunks to take before `owner_wait` ends.
    let policy = Policy::Providers {
        k: 8,
        push_batch_s: 0.05,
        home_zones: true,
    };
    let s = scenario(80, 2, policy, 1 << 30);
    let out = run(&s, &Costs::default(), &FetchSettings::default());
    assert!(out.finish.iter().all(|t| t.is_finite()));
    let image = s.image_bytes() as f64;
    let copies = out.proxy_bytes_by_zone.iter().sum::<f64>() / image;
    assert!(
        (1.0..1.25).contains(&copies),
        "the proxy sent {copies} copies"
    );
    let across = out.cross_zone_peer_bytes / image;
    assert!(
        (0.75..1.25).contains(&across),
        "{across} copies crossed zones"
    );
}

/// Proxy egress into each zone, in images.
fn per_zone(s: &Scenario, out: &Outcome) -> Vec<f64> {
    let image = s.image_bytes() as f64;
    out.proxy_bytes_by_zone.iter().map(|b| b / image).collect()
}

#[test]
fn small_zones_subscribe_outside_and_take_what_the_other_zone_fetched() {
    // 2 zones of 4: each host watches its 3 zone peers and, to fill its 16, the 4 others
    // (as the agent does), so a chunk the other zone fetched first comes across zones.
    let s = scenario(8, 2, AGENT, 256 << 20);
    let out = run(&s, &Costs::default(), &FetchSettings::default());
    let zones = per_zone(&s, &out);
    assert!(zones.iter().all(|&z| z < 0.8), "egress per zone {zones:?}");
    assert!(out.cross_zone_peer_bytes > 0.5 * s.image_bytes() as f64);
    // With 17 hosts a zone, a host watches its own zone only: one copy per zone.
    let s = scenario(34, 2, AGENT, 256 << 20);
    let out = run(&s, &Costs::default(), &FetchSettings::default());
    let zones = per_zone(&s, &out);
    assert!(
        zones.iter().all(|&z| (0.95..1.1).contains(&z)),
        "egress per zone {zones:?}"
    );
    assert_eq!(out.cross_zone_peer_bytes, 0.0);
}

#[test]
fn hosts_that_share_cores_finish_later_in_proportion() {
    let costs = Costs {
        startup_cpu_s: 0.2,
        ..Costs::default()
    };
    let finish = |hosts: usize, cpu: CpuModel| {
        // Unlimited links: only the CPU can hold them up.
        let s = Scenario {
            cpu,
            host_link_bytes_s: f64::INFINITY,
            proxy_link_bytes_s: f64::INFINITY,
            ..scenario(hosts, 1, AGENT, 8 << 20)
        };
        crate::report::max(&run(&s, &costs, &FetchSettings::default()).finish)
    };
    // On cores of their own, 8 or 32 hosts start up in the same time.
    let (own8, own32) = (
        finish(8, CpuModel::PerHost(2)),
        finish(32, CpuModel::PerHost(2)),
    );
    assert!((own32 - own8).abs() < 0.1, "{own8} s vs {own32} s");
    // Sharing 2 cores, their start-ups take hosts x 0.2 / 2 seconds: 0.8 s and 3.2 s.
    let (shared8, shared32) = (
        finish(8, CpuModel::Shared(2)),
        finish(32, CpuModel::Shared(2)),
    );
    assert!((0.8..1.0).contains(&shared8), "8 hosts: {shared8} s");
    assert!((3.2..3.4).contains(&shared32), "32 hosts: {shared32} s");
}

#[test]
fn each_blob_has_its_own_fetch_slots() {
    // One host, proxy only, unlimited links, 0.1 s round trips: 12 chunks in one blob go
    // 4 at a time (3 round trips); in 3 blobs of 4, all 12 at once (one round trip).
    let costs = Costs {
        rtt_s: 0.1,
        ..Costs::default()
    };
    let chunk = costs.chunk_bytes;
    let one = Scenario {
        host_link_bytes_s: f64::INFINITY,
        proxy_link_bytes_s: f64::INFINITY,
        ..scenario(1, 1, AGENT, 12 * chunk)
    };
    let three = Scenario {
        blobs: vec![4 * chunk; 3],
        ..one.clone()
    };
    let fetch = FetchSettings::default();
    let took = |s: &Scenario| run(s, &costs, &fetch).finish[0] - s.gather_s[0][0];
    let (a, b) = (took(&one), took(&three));
    assert!((0.3..0.35).contains(&a), "one blob: {a} s");
    assert!((0.1..0.15).contains(&b), "three blobs: {b} s");
}
