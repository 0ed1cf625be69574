//! Two imgd-proxy replicas behind four agents: one replica is killed in the middle of the
//! prefetch; every prefetch completes from the other, every cache verifies, the agents say
//! which replica failed, and upstream sent each blob at most once per replica.

use imgd_agent::proxy_replicas::ReplicaSet;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::presets;
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::time::{Duration, Instant};

const IMAGE: &str = "local/big:1";

#[test]
fn a_replica_killed_mid_prefetch_costs_time_not_correctness() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    // Three gzip layers of 64 MiB of content each (about 25 MB compressed).
    let (image, size) = skopeo::push_image(
        &reg,
        &tmp.path().join("img"),
        presets::big_gzip(192),
        "big:1",
    )
    .unwrap();
    // Each replica reaches the registry through a relay that counts its blob requests.
    let relays = [
        FaultRelay::start(reg.addr()).unwrap(),
        FaultRelay::start(reg.addr()).unwrap(),
    ];
    let mut proxies: Vec<Proxy> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let storage = tmp.path().join(format!("proxy{i}"));
            Proxy::start_in(&storage, &[format!("local={}", r.url())], &[]).unwrap()
        })
        .collect();
    let urls: Vec<String> = proxies.iter().map(Proxy::url).collect();

    // The replica the agents ask first for the last layer (the agent's own rendezvous
    // order) ingests it slowly, so that it dies in the middle of the prefetch.
    let slow_layer = image.layers.last().unwrap().blob.digest;
    let victim = ReplicaSet::new(&urls).order(slow_layer.as_bytes(), None)[0];
    relays[victim].add(
        &slow_layer.to_string(),
        Fault::Throttle {
            bytes_per_sec: 2 << 20,
        },
        None,
    );

    let agents: Vec<Agent> = (0..4)
        .map(|i| {
            Agent::start(AgentOptions {
                extra_toml: format!("proxy_urls = {urls:?}"),
                ..AgentOptions::local(&urls[0], tmp.path().join(format!("agent{i}")))
            })
            .unwrap()
        })
        .collect();
    let prefetches: Vec<_> = agents
        .iter()
        .map(|a| a.spawn_imgctl(&["prefetch", IMAGE]).unwrap())
        .collect();

    // Kill the victim once it is streaming the slow layer from upstream.
    let deadline = Instant::now() + Duration::from_secs(60);
    while relays[victim].count("GET", &format!("/blobs/{slow_layer}")) == 0 {
        let seen =
            |r: &FaultRelay| -> Vec<String> { r.seen().into_iter().map(|s| s.path).collect() };
        assert!(
            Instant::now() < deadline,
            "the slow layer was never asked for; relays saw {:?} and {:?}; agent log:\n{}",
            seen(&relays[0]),
            seen(&relays[1]),
            agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    proxies[victim].kill().unwrap();

    for (i, p) in prefetches.into_iter().enumerate() {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prefetch on agent {i} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            agents[i].log()
        );
    }
    let failover = format!(
        "imgd_agent_proxy_failovers_total{{replica=\"{}\"}}",
        urls[victim]
    );
    let mut failed_over = 0.0;
    for a in &agents {
        a.verify_clean().unwrap();
        let images = a.images().unwrap();
        let listed = images
            .as_array()
            .and_then(|l| l.iter().find(|i| i["image"] == IMAGE))
            .cloned()
            .unwrap_or_default();
        assert_eq!(listed["cached_bytes"], listed["total_bytes"], "{images}");
        assert_eq!(listed["total_bytes"].as_u64(), Some(size), "{images}");
        failed_over += a.metrics().unwrap().v(&failover);
    }
    assert!(
        failed_over >= 1.0,
        "the agents counted the dead replica's failures"
    );
    for blob in image.layers.iter().map(|l| l.blob.digest) {
        for (i, r) in relays.iter().enumerate() {
            let n = r.count("GET", &format!("/blobs/{blob}"));
            assert!(
                n <= 1,
                "replica {i} fetched layer {blob} {n} times from upstream"
            );
        }
    }
    // The surviving replica served the slow layer in the end.
    assert_eq!(
        relays[1 - victim].count("GET", &format!("/blobs/{slow_layer}")),
        1
    );
}
