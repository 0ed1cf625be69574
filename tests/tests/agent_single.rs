//! One agent: kill -9 in the middle of a prefetch loses nothing verified, a wrong chunk
//! from the proxy is caught and never cached, and imgctl gives clear errors.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::presets;
use imgd_tests::process::free_port;
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::Path;
use std::time::{Duration, Instant};

fn agent(dir: &Path, proxy_url: &str) -> Agent {
    Agent::start(AgentOptions::local(proxy_url, dir)).unwrap()
}

#[test]
fn kill_9_during_prefetch_then_restart_completes_with_a_consistent_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, size) = skopeo::push_image(
        &reg,
        &tmp.path().join("big"),
        presets::big_gzip(160),
        "big:1",
    )
    .unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let data = tmp.path().join("agent");

    let mut a = agent(&data, &proxy.url());
    let mut prefetch = a.spawn_imgctl(&["prefetch", "local/big:1"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let used = a.status().unwrap()["cache_used_bytes"].as_u64().unwrap();
        if used >= 8 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prefetch made no progress:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    a.kill().unwrap();
    let _ = prefetch.wait();
    let used_at_kill = a.status().is_err();
    assert!(used_at_kill, "the agent is dead");
    // What the crash left staged, plus a half-written chunk as a kill during staging
    // leaves it.
    let staging = data.join("data/cache/tmp/chunks");
    std::fs::write(staging.join(".tmpKILLED"), vec![7u8; 1 << 20]).unwrap();
    let staged = std::fs::read_dir(&staging).unwrap().count() as u64;

    let a = agent(&data, &proxy.url());
    // The repair at open must have found nothing listed that was missing or damaged (a
    // chunk's file is committed before its row), whole orphans only from a kill between
    // a file's rename and its row (at most one per chunk fetched at once, 4 by default),
    // and removed every staged file.
    let s = a.status().unwrap();
    let repair = &s["cache_open_repair"];
    println!("repaired at open after kill -9: {repair}");
    for (field, want) in [
        ("rows_without_file", 0),
        ("damaged_removed", 0),
        ("orphans_removed", 0),
        ("staged_removed", staged),
    ] {
        assert_eq!(repair[field].as_u64(), Some(want), "{field}: {s}");
    }
    assert!(repair["orphans_adopted"].as_u64().unwrap() <= 4, "{s}");
    assert_eq!(
        std::fs::read_dir(&staging).unwrap().count(),
        0,
        "staged files removed"
    );
    let (ok, out, err) = a.imgctl(&["verify"]).unwrap();
    assert!(
        ok,
        "after kill -9 every listed chunk is whole and verified: {out}{err}"
    );
    let (ok, out, err) = a.imgctl(&["prefetch", "local/big:1"]).unwrap();
    assert!(ok, "{out}{err}");
    println!("after restart: {out}");
    let s = a.status().unwrap();
    assert!(
        s["bytes_from_cache"].as_u64().unwrap() > 0,
        "resumed from what was kept: {s}"
    );
    assert!(s["bytes_from_cache"].as_u64().unwrap() < size, "{s}");
    assert_eq!(
        s["bytes_from_cache"].as_u64().unwrap() + s["bytes_from_proxy"].as_u64().unwrap(),
        size
    );
    let (ok, out, err) = a.imgctl(&["verify"]).unwrap();
    assert!(ok, "{out}{err}");
    let (_, images, _) = a.imgctl(&["images"]).unwrap();
    assert!(images.contains("local/big:1"), "{images}");
}

#[test]
fn imgctl_reports_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let nobody = Agent::start(AgentOptions::local(
        format!("http://127.0.0.1:{}", free_port().unwrap()),
        tmp.path().join("a"),
    ))
    .unwrap();
    let (ok, _, err) = nobody.imgctl(&["prefetch", "local/app:1"]).unwrap();
    assert!(!ok);
    assert!(err.contains("proxy unreachable"), "{err}");

    let reg = Registry::start().unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let a = agent(&tmp.path().join("b"), &proxy.url());
    let (ok, _, err) = a.imgctl(&["prefetch", "local/nothing:1"]).unwrap();
    assert!(!ok);
    assert!(err.contains("unknown image local/nothing:1"), "{err}");
    let (ok, _, err) = a.imgctl(&["prefetch", "UPPER/../x"]).unwrap();
    assert!(!ok);
    assert!(err.contains("invalid image reference"), "{err}");

    let out = std::process::Command::new(imgd_tests::daemons::workspace_bin("imgctl").unwrap())
        .args(["--socket", "/nonexistent/imgd.sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent is not running"));
}

#[test]
fn the_local_api_and_the_mirror_listen_only_where_configured() {
    // The documented default and the built-in default put the mirror on loopback.
    let out = std::process::Command::new(imgd_tests::daemons::workspace_bin("imgd").unwrap())
        .arg("--print-default-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("mirror_listen"))
        .unwrap_or_else(|| panic!("no mirror_listen in:\n{text}"));
    let addr: std::net::SocketAddr = line
        .split('"')
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(addr.ip().is_loopback(), "{line}");
    let built_in = imgd_agent::config::AgentConfig::default().mirror_listen;
    assert!(built_in.ip().is_loopback(), "{built_in}");

    // A running agent: the API socket is for its owner and group only, and the mirror
    // listens on the configured loopback address and nowhere else.
    let tmp = tempfile::tempdir().unwrap();
    let a = agent(
        &tmp.path().join("a"),
        &format!("http://127.0.0.1:{}", free_port().unwrap()),
    );
    let meta = std::fs::metadata(&a.socket).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let port = a.mirror.rsplit(':').next().unwrap();
    let (ok, listening, err) = imgd_tests::process::run_ok("ss", &["-Hltn"]);
    assert!(ok, "{err}");
    let locals: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|local| local.ends_with(&format!(":{port}")))
        .collect();
    assert_eq!(locals, [a.mirror.as_str()], "{listening}");
}

#[test]
fn a_chunk_the_proxy_sends_wrong_is_caught_and_never_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    skopeo::push_image(
        &reg,
        &tmp.path().join("img"),
        presets::big_gzip(12),
        "big:1",
    )
    .unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let relay = FaultRelay::start(&proxy.addr()).unwrap();
    let a = agent(&tmp.path().join("agent"), &relay.url());
    // The first whole-chunk answer (the config's, or a layer's during ingest or after) gets
    // a byte flipped.
    relay.add("/imgd/v1/chunks/", Fault::FlipByte { at: 10 }, Some(1));
    let metric = "imgd_agent_verification_failures_total{where=\"proxy\"}";
    let before = a.metrics().unwrap();

    // The chunk fetched while the proxy ingests is retried by the ordinary fetch; one
    // fetched after fails the prefetch, and a second prefetch gets it right.
    let (ok, _, _) = a.imgctl(&["prefetch", "local/big:1"]).unwrap();
    if !ok {
        let (ok, out, err) = a.imgctl(&["prefetch", "local/big:1"]).unwrap();
        assert!(ok, "the second prefetch: {out}{err}");
    }
    let caught = a.metrics().unwrap().delta(&before, metric);
    let chunk_gets: Vec<String> = relay
        .seen()
        .iter()
        .filter(|r| r.path.contains("/imgd/v1/chunks/"))
        .map(|r| r.path.clone())
        .collect();
    assert!(
        caught >= 1.0,
        "the wrong chunk was counted against the proxy; chunk requests {chunk_gets:?}\n{}",
        a.log()
    );
    a.verify_clean().unwrap();
}
