//! A fleet in two subnets (zones), routed through the root namespace, with no multicast
//! between them and bootstrap peers only, prefetching one image at once: the proxy sends
//! about one copy into each subnet, every cache verifies, and no host sends more control
//! requests per blob than the stated bound (counted by the agents' counters).
//! The 32-host run of the same setup is the ignored `thirty_two_hosts_in_two_routed_subnets`.

use imgd_tests::zoned_lan::ZonedLan;
use std::time::Duration;

/// `agent/src/control_counts.rs`: 8 lookups + provide + withdraw + 2 × 16 subscriptions.
const CONTROL_REQUESTS_PER_BLOB: u64 = 42;

#[test]
fn two_routed_subnets_prefetching_at_once_cost_the_proxy_about_one_copy_each() {
    let tmp = tempfile::tempdir().unwrap();
    let fleet = ZonedLan::start(tmp.path(), 2, 4, 160).unwrap();
    assert!(
        fleet.image_size >= 40_000_000,
        "image of {} bytes",
        fleet.image_size
    );
    fleet.wait_for_peers(1, Duration::from_secs(30)).unwrap();
    let run = fleet.prefetch_all(Duration::from_secs(120)).unwrap();
    println!("{run:?}");
    let mut from_peers = 0;
    for a in fleet.all() {
        a.verify_clean().unwrap();
        let s = a.status().unwrap();
        let received: u64 = ["bytes_from_cache", "bytes_from_peers", "bytes_from_proxy"]
            .iter()
            .map(|k| s[k].as_u64().unwrap())
            .sum();
        assert_eq!(
            received, fleet.image_size,
            "the whole image on every host: {s}"
        );
        from_peers += s["bytes_from_peers"].as_u64().unwrap();
    }
    assert!(from_peers > 0, "hosts shared chunks");
    for (z, bytes) in run.egress.iter().enumerate() {
        let ratio = *bytes as f64 / fleet.image_size as f64;
        println!("subnet {z}: proxy egress {bytes} bytes = {ratio:.2}x the image");
        assert!(
            ratio <= 1.25,
            "subnet {z}: proxy egress {ratio:.2}x the image (4x without sharing)"
        );
    }
    for (h, n) in run.control_per_blob.iter().enumerate() {
        assert!(*n > 0, "host {h} counted no control request");
        assert!(
            *n <= CONTROL_REQUESTS_PER_BLOB,
            "host {h}: {n} control requests for one blob"
        );
    }
}

/// The 32-host run: 2 subnets of 16 hosts. Too heavy for the suite on a 2-core
/// machine (32 agents and 32 imgctl), so it is ignored:
/// `cargo test -p imgd-tests --test swarm_zones -- --ignored --nocapture`.
/// `IMGD_ZONES_HOSTS` (hosts per subnet, default 16) and `IMGD_ZONES_MIB` (image size
/// before compression, default 160) change its size.
#[test]
#[ignore = "32 agents: minutes on 2 cores; run by hand or by the benchmarks"]
fn thirty_two_hosts_in_two_routed_subnets() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (per_subnet, mib) = (
        env("IMGD_ZONES_HOSTS", 16) as usize,
        env("IMGD_ZONES_MIB", 160),
    );
    let tmp = tempfile::tempdir().unwrap();
    let fleet = ZonedLan::start(tmp.path(), 2, per_subnet, mib).unwrap();
    fleet.wait_for_peers(1, Duration::from_secs(60)).unwrap();
    let run = fleet.prefetch_all(Duration::from_secs(600)).unwrap();
    let mut seconds = run.seconds.clone();
    seconds.sort_by(f64::total_cmp);
    let pct = |p: f64| seconds[((seconds.len() - 1) as f64 * p).round() as usize];
    println!(
        "{} hosts, image {} bytes: p50 {:.2} s, slowest {:.2} s, control requests per host per blob max {}",
        seconds.len(),
        run.image_size,
        pct(0.5),
        pct(1.0),
        run.control_per_blob.iter().max().unwrap()
    );
    for (h, a) in fleet.all().enumerate() {
        // What each host knew when it chose chunk owners, and what it took from the proxy.
        for line in a.log().lines().filter(|l| {
            l.contains("chunk owners chosen") || l.contains("blob fetched") || l.contains(" WARN ")
        }) {
            println!("host {h}: {line}");
        }
        a.verify_clean().unwrap();
    }
    for (z, bytes) in run.egress.iter().enumerate() {
        let ratio = *bytes as f64 / run.image_size as f64;
        println!("subnet {z}: proxy egress {bytes} bytes = {ratio:.2}x the image");
        assert!(ratio <= 1.25, "subnet {z}: {ratio:.2}x");
    }
    for (h, n) in run.control_per_blob.iter().enumerate() {
        assert!(
            *n <= CONTROL_REQUESTS_PER_BLOB,
            "host {h}: {n} control requests for one blob"
        );
    }
}
