//! Swarm benchmark: N hosts (network namespaces, each link shaped with tc tbf) pull one
//! image at once through their agents. Reports proxy chunk egress / image size (without a
//! swarm it would be N) and the slowest host's time / one host pulling alone on the same
//! link, measured in this run.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-swarm [-- HOSTS MBIT MIB]`
//! (defaults: 8 hosts, 500 Mbit/s per link, 320 MiB of image content)

use anyhow::{bail, Result};
use imgd_benches::report;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::image::{self, presets};
use imgd_tests::netns::Lan;
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let hosts = imgd_benches::numeric_arg(1, 8)? as usize;
    let mbit = imgd_benches::numeric_arg(2, 500)? as u32;
    let mib = imgd_benches::numeric_arg(3, 320)?;
    let tmp = tempfile::tempdir()?;
    eprintln!("building and pushing a {mib} MiB image ...");
    let reg = Registry::start()?;
    let layout = image::build_layout(&tmp.path().join("img"), &[presets::big_gzip(mib)])?;
    skopeo::push_layout(
        &layout.dir,
        "big",
        &reg.docker_ref("big:1"),
        Format::OciExact,
        false,
    )?;
    let size: u64 = layout
        .image("big")
        .map(|i| i.referenced_blobs().iter().map(|b| b.size).sum())
        .unwrap_or(0);

    let lan = Lan::new(hosts + 1)?;
    for h in &lan.hosts {
        h.shape(mbit)?;
    }
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    let start = |i: usize| {
        Agent::start(AgentOptions {
            host: Some(&lan.hosts[i]),
            proxy_url: proxy.url(),
            data_dir: tmp.path().join(format!("agent{i}")),
            extra_toml: String::new(),
            swarm: true,
        })
    };
    let prefetch = |agents: &[&Agent]| -> Result<Vec<Duration>> {
        let t = Instant::now();
        let children: Vec<_> = agents
            .iter()
            .map(|a| a.spawn_imgctl(&["prefetch", "local/big:1"]))
            .collect::<Result<_>>()?;
        let mut times = Vec::new();
        for c in children {
            let out = c.wait_with_output()?;
            if !out.status.success() {
                bail!("prefetch failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            times.push(t.elapsed());
        }
        Ok(times)
    };

    // Warm the proxy from upstream, then the baseline: the last host alone (no peers).
    let alone = Agent::start(AgentOptions {
        host: Some(&lan.hosts[hosts]),
        proxy_url: proxy.url(),
        data_dir: tmp.path().join("alone"),
        extra_toml: String::new(),
        swarm: false,
    })?;
    prefetch(&[&alone])?; // warms the proxy (upstream ingest), not timed
    drop(alone);
    let alone = Agent::start(AgentOptions {
        host: Some(&lan.hosts[hosts]),
        proxy_url: proxy.url(),
        data_dir: tmp.path().join("alone2"),
        extra_toml: String::new(),
        swarm: false,
    })?;
    let single = prefetch(&[&alone])?[0];
    drop(alone);

    let agents: Vec<Agent> = (0..hosts).map(start).collect::<Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in &agents {
        while a.status()?["peers"].as_array().map(Vec::len).unwrap_or(0) < hosts - 1 {
            if Instant::now() > deadline {
                bail!("peers not found:\n{}", a.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let before = proxy.stats()?.chunk_bytes_served;
    let refs: Vec<&Agent> = agents.iter().collect();
    let times = prefetch(&refs)?;
    let egress = proxy.stats()?.chunk_bytes_served - before;
    let slowest = times.iter().max().copied().unwrap_or_default();
    println!(
        "image {:.1} MB, {hosts} hosts, links shaped to {mbit} Mbit/s",
        size as f64 / 1e6
    );
    report("one host alone (baseline)", single.as_secs_f64(), "s");
    report(
        &format!("slowest of {hosts} hosts at once"),
        slowest.as_secs_f64(),
        "s",
    );
    report(
        "ratio slowest / alone (target <= 1.5)",
        slowest.as_secs_f64() / single.as_secs_f64(),
        "x",
    );
    report(
        "proxy chunk egress / image size (target <= 1.25)",
        egress as f64 / size as f64,
        "x",
    );
    for (i, a) in agents.iter().enumerate() {
        let s = a.status()?;
        println!(
            "  host {i}: {:.2}s, {:.1} MB from peers, {:.1} MB from proxy",
            times[i].as_secs_f64(),
            s["bytes_from_peers"].as_u64().unwrap_or(0) as f64 / 1e6,
            s["bytes_from_proxy"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(())
}
