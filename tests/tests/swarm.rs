//! Agents on a LAN of network namespaces share chunks: the proxy sends each chunk about
//! once, a real client pulls through an agent's mirror, and a second host gets the image
//! from its peer.

use imgd_core::Digest;
use imgd_tests::daemons::{Agent, AgentOptions};
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

/// The peer ids in an agent's Kademlia routing table and peer set, from its status.
fn routing_and_peers(a: &Agent) -> (Vec<String>, Vec<String>) {
    let s = a.status().unwrap();
    let ids = |v: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> Option<String>| {
        v.as_array()
            .map(|a| a.iter().filter_map(f).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    (
        ids(&s["routing_table"], &|v| v.as_str().map(String::from)),
        ids(&s["peers"], &|p| p["id"].as_str().map(String::from)),
    )
}

#[test]
fn a_host_without_the_swarm_key_gets_into_no_members_routing_table() {
    let tmp = tempfile::tempdir().unwrap();
    let lan = imgd_tests::netns::Lan::new(3).unwrap();
    // No chunk moves here: the proxy URL is never asked.
    let start = |h: usize, extra: String| {
        Agent::start(AgentOptions {
            host: Some(&lan.hosts[h]),
            proxy_url: format!("http://{}:1", lan.gateway),
            data_dir: tmp.path().join(&lan.hosts[h].ns),
            extra_toml: extra,
            swarm: true,
        })
        .unwrap()
    };
    // Two members (mDNS on, as by default), then an outsider with a key of its own that
    // both hears them on mDNS and bootstraps to the first one directly.
    let members = [start(0, String::new()), start(1, String::new())];
    let ids: Vec<String> = members
        .iter()
        .map(|a| a.status().unwrap()["node_id"].as_str().unwrap().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, a) in members.iter().enumerate() {
        loop {
            let (table, _) = routing_and_peers(a);
            if table.contains(&ids[1 - i]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "members did not meet:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let other_key = tmp.path().join("other.key");
    std::fs::write(&other_key, "ab".repeat(32)).unwrap();
    let outsider = start(
        2,
        format!(
            "key_file = {other_key:?}\nbootstrap = [\"/ip4/{}/tcp/7400/p2p/{}\"]\n",
            lan.hosts[0].addr, ids[0]
        ),
    );
    let outsider_id = outsider.status().unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Until the outsider's dial of the bootstrap member failed in the handshake (or it got
    // in, which the checks below catch).
    let let_in = |a: &Agent| {
        let (table, peers) = routing_and_peers(a);
        table.contains(&outsider_id) || peers.contains(&outsider_id)
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    while !outsider.log().contains("swarm connection failed") && !members.iter().any(let_in) {
        assert!(
            Instant::now() < deadline,
            "the outsider neither failed nor got in:\n{}",
            outsider.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Several routing-table copies later (every 500 ms), and mDNS rounds, it is nowhere.
    std::thread::sleep(Duration::from_secs(4));
    for (i, a) in members.iter().enumerate() {
        let (table, peers) = routing_and_peers(a);
        assert!(
            !table.contains(&outsider_id) && !peers.contains(&outsider_id),
            "member {i} let the outsider in: table {table:?}, peers {peers:?}\n{}",
            a.log()
        );
        assert!(
            table.contains(&ids[1 - i]),
            "member {i} still has the other member: {table:?}"
        );
    }
    let (_, peers) = routing_and_peers(&outsider);
    assert!(peers.is_empty(), "the outsider knows no member: {peers:?}");
}
