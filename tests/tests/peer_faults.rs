//! Faulty and hostile peers on a LAN of network namespaces: a swarm member that lies
//! (flipped bytes, truncated chunks, slow drips, chunks it advertises but does not have)
//! costs time, never correctness; an outsider without the swarm key, or off the
//! allow-list, gets no chunk and no have-map.

use imgd_tests::daemons::{workspace_bin, Agent, Proxy};
use imgd_tests::evil_peer::start_liar;
use imgd_tests::guards::{path_str, run_capture};
use imgd_tests::lan_setup::LanSetup;
use imgd_tests::netns::Host;
use std::path::Path;
use std::time::{Duration, Instant};

/// Peer timeout of the agents here: a dripping peer costs this much per chunk asked.
const PEER_TIMEOUT_MS: u64 = 2000;

/// The longest a prefetch of the 24 MiB image may take with a liar in the swarm (alone
/// with the proxy it takes about a second; a drip costs a few peer timeouts).
const PREFETCH_BOUND: Duration = Duration::from_secs(60);

/// Prefetches the image, within the bound; returns the time it took.
fn prefetch(a: &Agent) -> Duration {
    let started = Instant::now();
    let (ok, out, err) = a.imgctl(&["prefetch", "local/big:1"]).unwrap();
    let took = started.elapsed();
    assert!(ok, "prefetch: {out}{err}\n{}", a.log());
    assert!(took < PREFETCH_BOUND, "prefetch took {took:?}\n{}", a.log());
    took
}

fn bytes_from(a: &Agent, source: &str) -> u64 {
    a.status().unwrap()[format!("bytes_from_{source}")]
        .as_u64()
        .unwrap()
}

/// The liar's penalty as `a` sees it (0 if `a` does not list it).
fn penalty_of(a: &Agent, liar: &str) -> u64 {
    let s = a.status().unwrap();
    s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == liar)
        .map_or(0, |p| p["penalty"].as_u64().unwrap())
}

#[test]
fn lying_peers_are_detected_penalised_and_routed_around() {
    let tmp = tempfile::tempdir().unwrap();
    let net = LanSetup::start(tmp.path(), 24, 3).unwrap();
    let (lan, proxy, image_size) = (&net.lan, &net.proxy, net.image_size);
    let extra = format!("[fetch]\npeer_timeout_ms = {PEER_TIMEOUT_MS}\n");
    // mode, least penalty host A must have given the liar after meeting it
    let cases = [
        ("flip", 100),
        ("truncate", 20),
        ("drip", 20),
        ("phantom", 20),
    ];
    for (mode, least_penalty) in cases {
        let dir = tmp.path().join(mode);
        std::fs::create_dir_all(&dir).unwrap();
        let (_evil, liar) = start_liar(&lan.hosts[0], proxy, &dir, "local/big:1", mode);
        let a = Agent::start_on_host(&lan.hosts[1], proxy, &dir, &extra).unwrap();
        a.wait_for_peers(1, Duration::from_secs(30)).unwrap();

        // Host A: only the liar claims the chunks; A must get them all from the proxy.
        let took_a = prefetch(&a);
        a.verify_clean().unwrap();
        assert_eq!(
            bytes_from(&a, "peers"),
            0,
            "{mode}: nothing of the liar's kept"
        );
        assert_eq!(bytes_from(&a, "proxy"), image_size, "{mode}");
        let penalty = penalty_of(&a, &liar);
        assert!(
            penalty >= least_penalty,
            "{mode}: the liar is penalised ({penalty}):\n{}",
            a.log()
        );

        // Host B: A and the liar both claim every chunk; B ends up with A's.
        let b = Agent::start_on_host(&lan.hosts[2], proxy, &dir, &extra).unwrap();
        b.wait_for_peers(2, Duration::from_secs(30)).unwrap();
        let took_b = prefetch(&b);
        b.verify_clean().unwrap();
        assert_eq!(
            bytes_from(&b, "peers"),
            image_size,
            "{mode}: all from A\n{}",
            b.log()
        );
        assert_eq!(bytes_from(&b, "proxy"), 0, "{mode}");
        println!(
            "{mode}: A {took_a:?} (liar penalty {penalty}), B {took_b:?} (liar penalty {})",
            penalty_of(&b, &liar)
        );
        if mode == "flip" && b.log().contains("corrupt bytes") {
            assert!(penalty_of(&b, &liar) >= 100, "B banned the liar it met");
        }
    }
}

/// Runs the probe on `host` against `target`; returns its JSON report.
fn probe(host: &Host, proxy: &Proxy, dir: &Path, target: &str, wrong_key: bool) -> String {
    let bin = workspace_bin("imgd-evil-peer").unwrap();
    let mut cmd = host.command(path_str(&bin).unwrap());
    cmd.args(["--proxy", &proxy.url(), "--image", "local/big:1"])
        .args(["--probe", target, "--dir"])
        .arg(dir);
    if wrong_key {
        cmd.arg("--wrong-key");
    }
    run_capture(&mut cmd, "imgd-evil-peer --probe", Duration::from_secs(60)).unwrap()
}

fn parse(report: &str) -> serde_json::Value {
    serde_json::from_str(report.trim()).unwrap_or_else(|e| panic!("{e}: {report}"))
}

#[test]
fn outsiders_without_the_key_or_off_the_allow_list_get_no_chunk_and_no_chunk_list() {
    let tmp = tempfile::tempdir().unwrap();
    let net = LanSetup::start(tmp.path(), 8, 2).unwrap();
    let (lan, proxy) = (&net.lan, &net.proxy);
    let bin = workspace_bin("imgd-evil-peer").unwrap();
    let member = tmp.path().join("member");
    let mut id_cmd = std::process::Command::new(&bin);
    id_cmd.arg("--dir").arg(&member).arg("--print-id");
    let member_id = run_capture(&mut id_cmd, "--print-id", Duration::from_secs(30)).unwrap();
    // Extra TOML lands in the agent's [swarm] table.
    let allow = format!("allow_list = [{:?}]\n", member_id.trim());
    let a = Agent::start_on_host(&lan.hosts[1], proxy, tmp.path(), &allow).unwrap();
    let (ok, out, err) = a.imgctl(&["prefetch", "local/big:1"]).unwrap();
    assert!(ok, "{out}{err}");
    let target = format!("{}:7401", lan.hosts[1].addr);

    let cases = [
        ("no swarm key", tmp.path().join("outsider"), true),
        ("not on the allow-list", tmp.path().join("stranger"), false),
    ];
    for (who, dir, wrong_key) in cases {
        let report = probe(&lan.hosts[0], proxy, &dir, &target, wrong_key);
        let r = parse(&report);
        assert!(
            r["handshake"].as_str().unwrap().starts_with("refused"),
            "{who}: {report}"
        );
        assert_eq!(r["bytes_after_handshake"], 0, "{who}: {report}");
        assert_eq!(r["chunk"], false, "{who}: {report}");
        assert_eq!(r["have_map"], false, "{who}: {report}");
        println!("{who}: {report}");
    }
    let refused = a.log().matches("data plane handshake refused").count();
    assert!(refused >= 2, "the agent logged both refusals:\n{}", a.log());

    // The same probe as a member (the key, on the list) gets both: the probe can tell.
    let report = probe(&lan.hosts[0], proxy, &member, &target, false);
    let r = parse(&report);
    assert_eq!(r["handshake"], "ok", "{report}");
    assert_eq!(r["chunk"], true, "{report}");
    assert_eq!(r["have_map"], true, "{report}");
}
