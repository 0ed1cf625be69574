//! Swarm benchmark: N hosts (network namespaces, each link shaped with tc tbf) pull one
//! image at once through their agents, with the swarm and, as the baseline measured in
//! the same run, without it (N agents with the swarm disabled, each on its own). Reports
//! proxy chunk egress / image size for both, the slowest host's time against one host
//! pulling alone on the same link and against the N hosts without a swarm. Every host
//! must end with the whole image cached, or the run fails.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-swarm [-- HOSTS MBIT MIB]`
//! (defaults: 8 hosts, 500 Mbit/s per link, 320 MiB of image content)

use anyhow::{bail, Context, Result};
use imgd_benches::report;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::image::{self, presets};
use imgd_tests::netns::Lan;
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGE: &str = "local/big:1";

/// `imgctl prefetch` on every agent at once; the time each took.
fn prefetch(agents: &[&Agent]) -> Result<Vec<Duration>> {
    let t = Instant::now();
    let children: Vec<_> = agents
        .iter()
        .map(|a| a.spawn_imgctl(&["prefetch", IMAGE]))
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
}

/// Fails unless the agent holds every byte of the image, of `size` bytes.
fn check_whole(a: &Agent, size: u64) -> Result<()> {
    let out = Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(&a.socket)
        .arg("http://imgd/v1/images")
        .output()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let image = list
        .as_array()
        .and_then(|l| l.iter().find(|i| i["image"] == IMAGE))
        .with_context(|| format!("{IMAGE} not listed: {list}"))?;
    let (cached, total) = (
        image["cached_bytes"].as_u64(),
        image["total_bytes"].as_u64(),
    );
    if cached != Some(size) || total != Some(size) {
        bail!("a host has {cached:?} of {total:?} bytes of the {size}-byte image: {image}");
    }
    Ok(())
}

/// `hosts` agents on the first LAN hosts, with their data under `dir/agentI`.
fn start_agents(
    lan: &Lan,
    proxy: &Proxy,
    dir: &Path,
    hosts: usize,
    swarm: bool,
) -> Result<Vec<Agent>> {
    (0..hosts)
        .map(|i| {
            Agent::start(AgentOptions {
                host: Some(&lan.hosts[i]),
                proxy_url: proxy.url(),
                data_dir: dir.join(format!("agent{i}")),
                extra_toml: String::new(),
                swarm,
            })
        })
        .collect()
}

/// One timed pull by `agents` at once: (each host's time, proxy chunk egress), after
/// checking that every host got the whole image.
fn pull_all(agents: &[Agent], proxy: &Proxy, size: u64) -> Result<(Vec<Duration>, u64)> {
    let before = proxy.stats()?.chunk_bytes_served;
    let refs: Vec<&Agent> = agents.iter().collect();
    let times = prefetch(&refs)?;
    let egress = proxy.stats()?.chunk_bytes_served - before;
    for a in agents {
        check_whole(a, size)?;
    }
    Ok((times, egress))
}

fn slowest(times: &[Duration]) -> f64 {
    times
        .iter()
        .max()
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
}

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
        .context("the image is not in its layout")?
        .referenced_blobs()
        .iter()
        .map(|b| b.size)
        .sum();
    if size == 0 {
        bail!("the image has no bytes");
    }

    let lan = Lan::new(hosts + 1)?;
    for h in &lan.hosts {
        h.shape(mbit)?;
    }
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    let alone = |dir: &str| {
        Agent::start(AgentOptions {
            host: Some(&lan.hosts[hosts]),
            proxy_url: proxy.url(),
            data_dir: tmp.path().join(dir),
            extra_toml: String::new(),
            swarm: false,
        })
    };

    // Warm the proxy from upstream, then the baseline: the last host alone (no peers).
    eprintln!("warming the proxy, then one host alone ...");
    let warm = alone("warm")?;
    prefetch(&[&warm])?; // upstream ingest, not timed
    drop(warm);
    let single_agent = alone("alone")?;
    let single = prefetch(&[&single_agent])?[0];
    check_whole(&single_agent, size)?;
    drop(single_agent);

    // The no-swarm baseline: the same hosts at once, each on its own.
    eprintln!("{hosts} hosts without a swarm ...");
    let solo = start_agents(&lan, &proxy, &tmp.path().join("solo"), hosts, false)?;
    let (solo_times, solo_egress) = pull_all(&solo, &proxy, size)?;
    drop(solo);

    eprintln!("{hosts} hosts with the swarm ...");
    let agents = start_agents(&lan, &proxy, &tmp.path().join("swarm"), hosts, true)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in &agents {
        while a.status()?["peers"].as_array().map(Vec::len).unwrap_or(0) < hosts - 1 {
            if Instant::now() > deadline {
                bail!("peers not found:\n{}", a.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (times, egress) = pull_all(&agents, &proxy, size)?;

    println!(
        "image {:.1} MB, {hosts} hosts, links shaped to {mbit} Mbit/s; every host checked to hold the whole image",
        size as f64 / 1e6
    );
    report("one host alone (baseline)", single.as_secs_f64(), "s");
    report(
        &format!("slowest of {hosts} hosts at once, no swarm (baseline)"),
        slowest(&solo_times),
        "s",
    );
    report(
        &format!("slowest of {hosts} hosts at once, swarm"),
        slowest(&times),
        "s",
    );
    report(
        "ratio swarm slowest / alone (target <= 1.5)",
        slowest(&times) / single.as_secs_f64(),
        "x",
    );
    report(
        "ratio swarm slowest / no-swarm slowest",
        slowest(&times) / slowest(&solo_times),
        "x",
    );
    report(
        "proxy chunk egress / image size, no swarm (baseline)",
        solo_egress as f64 / size as f64,
        "x",
    );
    report(
        "proxy chunk egress / image size, swarm (target <= 1.25)",
        egress as f64 / size as f64,
        "x",
    );
    report(
        "ratio swarm egress / no-swarm egress",
        egress as f64 / solo_egress as f64,
        "x",
    );
    for (i, a) in agents.iter().enumerate() {
        let s = a.status()?;
        println!(
            "  host {i}: {:.2}s ({:.2}s without a swarm), {:.1} MB from peers, {:.1} MB from proxy",
            times[i].as_secs_f64(),
            solo_times[i].as_secs_f64(),
            s["bytes_from_peers"].as_u64().unwrap_or(0) as f64 / 1e6,
            s["bytes_from_proxy"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(())
}
