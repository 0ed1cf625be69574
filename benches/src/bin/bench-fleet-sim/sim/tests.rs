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
        image_bytes,
        cpu: CpuModel::PerHost(4),
        start_jitter_s: 0.0,
        policy,
        seed: 1,
    }
}

#[test]
fn one_host_alone_takes_the_image_at_its_link_rate() {
    let s = scenario(1, 1, Policy::PollAll { refresh_s: 0.1 }, 200 << 20);
    let out = run(&s, &Costs::default(), &FetchSettings::default());
    let ideal = s.image_bytes as f64 / s.host_link_bytes_s;
    let took = out.finish[0];
    assert!(
        took >= ideal && took < ideal * 1.1,
        "{took} s against {ideal} s"
    );
    assert_eq!(out.proxy_bytes_by_zone, vec![s.image_bytes as f64]);
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
    let image = s.image_bytes as f64;
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
