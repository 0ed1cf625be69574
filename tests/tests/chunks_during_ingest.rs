//! The chunk API during ingest: an agent (no swarm) prefetching a blob the proxy is still
//! ingesting from a slow upstream gets its chunks as each arrives whole and hashed, before
//! the blob is stored; and when a blob fails its digest at the end, the prefetch fails,
//! nothing is stored at the proxy, and any chunk the agent took was right by its own
//! digest (its cache verifies clean).

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Waits (at most 60 s) until the agent holds at least one 4 MiB chunk; returns whether
/// the proxy had stored `layer` at that moment, and how long it took.
fn first_chunk(agent: &Agent, proxy: &Proxy, layer: &str) -> (bool, Duration) {
    let t = Instant::now();
    loop {
        let used = agent.status().unwrap()["cache_used_bytes"]
            .as_u64()
            .unwrap_or(0);
        if used >= 4 * MIB {
            let r = proxy.get(&format!("/imgd/v1/blobs/{layer}"), &[]).unwrap();
            return (r.status == 200, t.elapsed());
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no chunk reached the agent:\n{}\n{}",
            agent.log(),
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_agent_gets_chunks_of_a_blob_the_proxy_is_still_ingesting() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let spec = |name: &str, seed| {
        ImageSpec::new(
            name,
            vec![LayerSpec::uncompressed(vec![
                FileSpec::dir("data"),
                FileSpec::random("data/big.bin", seed, 24 * MIB),
            ])],
        )
    };
    let (good, _) =
        skopeo::push_image(&reg, &tmp.path().join("good"), spec("good", 7), "good:1").unwrap();
    let (bad, _) =
        skopeo::push_image(&reg, &tmp.path().join("bad"), spec("bad", 8), "bad:1").unwrap();
    let layer = good.layers[0].blob.digest;
    let relay = FaultRelay::start(reg.addr()).unwrap();
    // ~4 MB/s: the 24 MiB layer takes about 6 s to arrive.
    let slow = Fault::Throttle {
        bytes_per_sec: 4_000_000,
    };
    relay.add(&format!("/blobs/{layer}"), slow.clone(), None);
    let proxy = Proxy::start_in(
        &tmp.path().join("store"),
        &[format!("local={}", relay.url())],
        &[],
    )
    .unwrap();
    let agent = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("a"))).unwrap();

    let t = Instant::now();
    let mut prefetch = agent.spawn_imgctl(&["prefetch", "local/good:1"]).unwrap();
    let (stored, after) = first_chunk(&agent, &proxy, &layer.to_string());
    assert!(
        !stored,
        "the agent's first chunk came only after the proxy stored the blob ({after:?})"
    );
    assert!(prefetch.wait().unwrap().success(), "{}", agent.log());
    let whole = t.elapsed();
    assert!(
        after * 2 < whole,
        "first chunk after {after:?}, whole prefetch {whole:?}"
    );
    assert_eq!(relay.count("GET", &format!("/blobs/{layer}")), 1);
    let s = agent.status().unwrap();
    assert!(s["cache_used_bytes"].as_u64().unwrap() >= 24 * MIB, "{s}");
    agent.verify_clean().unwrap();
    let r = proxy.get(&format!("/imgd/v1/blobs/{layer}"), &[]).unwrap();
    assert_eq!(r.status, 200, "stored at the end");

    // A blob that does not match its digest (one byte flipped, at full speed): whatever
    // chunks went out were right by their own digests; the blob fails, nothing is
    // stored, the prefetch fails.
    let bad_layer = bad.layers[0].blob.digest;
    drop(slow);
    relay.add(
        &format!("/blobs/{bad_layer}"),
        Fault::FlipByte {
            at: (20 * MIB) as usize,
        },
        None,
    );
    let agent = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("b"))).unwrap();
    let mut prefetch = agent.spawn_imgctl(&["prefetch", "local/bad:1"]).unwrap();
    assert!(
        !prefetch.wait().unwrap().success(),
        "a blob failing its digest fails the prefetch"
    );
    let r = proxy
        .get(&format!("/imgd/v1/blobs/{bad_layer}"), &[])
        .unwrap();
    assert_eq!(r.status, 404, "nothing stored");
    agent.verify_clean().unwrap();
    let report = proxy.get("/imgd/v1/verify", &[]).unwrap().json().unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
}
