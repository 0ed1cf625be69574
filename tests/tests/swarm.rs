//! Agents on a LAN of network namespaces share chunks: the proxy sends each chunk about
//! once, a real client pulls through an agent's mirror, and a second host gets the image
//! from its peer.

use imgd_core::Digest;
use imgd_tests::daemons::Agent;
use imgd_tests::lan_setup::LanSetup;
use std::time::{Duration, Instant};

/// Waits until every agent knows `n` peers.
fn wait_for_peers(agents: &[Agent], n: usize) {
    for a in agents {
        a.wait_for_peers(n, Duration::from_secs(30)).unwrap();
    }
}

fn assert_cache_clean(a: &Agent) {
    a.verify_clean().unwrap();
}

#[test]
fn four_hosts_prefetching_at_once_get_each_chunk_from_the_proxy_about_once() {
    let tmp = tempfile::tempdir().unwrap();
    let net = LanSetup::start(tmp.path(), 320, 4).unwrap();
    let (lan, proxy, image_size) = (&net.lan, &net.proxy, net.image_size);
    assert!(image_size >= 100_000_000, "image of {image_size} bytes");
    // Warm the proxy from upstream first: its chunk egress to the LAN is what is measured.
    let (ok, _, err) = imgd_tests::process::run_ok(
        "curl",
        &["-sf", &format!("{}/v2/local/big/manifests/1", proxy.url())],
    );
    assert!(ok, "{err}");
    let agents: Vec<Agent> = lan
        .hosts
        .iter()
        .map(|h| Agent::start_on_host(h, proxy, tmp.path(), "").unwrap())
        .collect();
    wait_for_peers(&agents, 3);

    let started = Instant::now();
    let children: Vec<_> = agents
        .iter()
        .map(|a| a.spawn_imgctl(&["prefetch", "local/big:1"]).unwrap())
        .collect();
    let mut outputs = Vec::new();
    for (a, c) in agents.iter().zip(children) {
        let out = c.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "prefetch failed: {text}\n{}", a.log());
        outputs.push(text.trim().to_string());
    }
    let elapsed = started.elapsed();
    for a in &agents {
        assert_cache_clean(a);
        let s = a.status().unwrap();
        let received: u64 = ["bytes_from_cache", "bytes_from_peers", "bytes_from_proxy"]
            .iter()
            .map(|k| s[k].as_u64().unwrap())
            .sum();
        assert_eq!(
            received, image_size,
            "every chunk of the image is on every host: {s}"
        );
    }
    let egress = proxy.stats().unwrap().chunk_bytes_served;
    let ratio = egress as f64 / image_size as f64;
    println!("4 hosts, image {image_size} bytes, {elapsed:?}: proxy chunk egress {egress} bytes = {ratio:.2}x the image");
    for o in &outputs {
        println!("  {o}");
    }
    assert!(
        ratio <= 1.25,
        "proxy egress {ratio:.2}x the image (without sharing it would be 4x)"
    );
}

#[test]
fn skopeo_pulls_through_an_agent_mirror_and_a_second_host_gets_the_image_from_its_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let net = LanSetup::start(tmp.path(), 40, 2).unwrap();
    let (lan, proxy, image_size) = (&net.lan, &net.proxy, net.image_size);
    let manifest = net.image.manifest.digest;
    let agents: Vec<Agent> = lan
        .hosts
        .iter()
        .map(|h| Agent::start_on_host(h, proxy, tmp.path(), "").unwrap())
        .collect();
    wait_for_peers(&agents, 1);

    // skopeo on host 0 pulls through host 0's mirror (loopback of that namespace).
    let out = tmp.path().join("out");
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let status = lan.hosts[0]
        .command("skopeo")
        .args([
            "--policy",
            policy.to_str().unwrap(),
            "copy",
            "-q",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{}/local/big:1", agents[0].mirror))
        .arg(format!("dir:{}", out.display()))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "skopeo through the mirror:\n{}",
        agents[0].log()
    );
    let got = std::fs::read(out.join("manifest.json")).unwrap();
    assert_eq!(
        Digest::of(&got),
        manifest,
        "manifest digest equals upstream's"
    );
    for f in std::fs::read_dir(&out).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.len() == 64 {
            assert_eq!(Digest::of(&std::fs::read(f.path()).unwrap()).hex(), name);
        }
    }

    let (ok, text, err) = agents[1].imgctl(&["prefetch", "local/big:1"]).unwrap();
    assert!(ok, "{text}{err}");
    let s = agents[1].status().unwrap();
    let from_peers = s["bytes_from_peers"].as_u64().unwrap();
    println!("second host: {text}");
    assert!(
        from_peers as f64 >= 0.9 * image_size as f64,
        "mostly from the peer: {s}"
    );
    assert_cache_clean(&agents[1]);
}
