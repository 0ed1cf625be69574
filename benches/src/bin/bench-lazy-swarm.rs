//! Lazy starts in the swarm: N hosts in network namespaces mount one image and start it
//! (runc on an overlayfs over the imgd FUSE mount, as `bench-lazy-start` does) at the same
//! moment, against one host starting it alone, measured in the same run.
//!
//! Reported per N (4 and 8 by default):
//! - **proxy bytes / one host's start**: what the root namespace (the proxy listens on the
//!   LAN's gateway) sent into the bridge, counted by the kernel outside the agents, from
//!   the moment the hosts start (`imgctl mount`) to the last host's first output line,
//!   against the same count for the host alone (target <= 1.25; without sharing N);
//! - **slowest host's time to its first line / one host alone** (mount to first line).
//!
//! The image is the Debian python3 + numpy + scipy image of `bench-lazy-start` (built once
//! and cached in `/var/cache/imgd-bench`), or with `--synthetic MIB` the busybox image.
//! Every start uses fresh agents (an empty cache), with the swarm on, each in its
//! namespace, each link shaped with tc tbf to `--mbit`. A first start, not measured,
//! stores the image's startup trace at the proxy, so every measured start prefetches by it.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-lazy-swarm [-- [--hosts 4,8] [--mbit 1000] [--runs 1] [--synthetic MIB]]`
//! `IMGD_BENCH_KEEP_LOGS=DIR` keeps every agent's log there (with
//! `IMGD_TEST_AGENT_LOG=info,imgd_bytes=debug`: where each host's bytes came from).
//! Needs root, FUSE, runc, skopeo, docker-registry, tc (and debootstrap plus a Debian
//! mirror the first time, or busybox-static for `--synthetic`).

#[allow(dead_code)]
#[path = "bench-lazy-start/images.rs"]
mod images;
#[allow(dead_code)]
#[path = "bench-lazy-start/runc.rs"]
mod runc;

use anyhow::{bail, Context, Result};
use images::Source;
use imgd_core::wire::ProxyStats;
use imgd_tests::daemons::{Agent, Proxy};
use imgd_tests::guards::{path_str, run_capture, ImgdMount, Overlay};
use imgd_tests::netns::{Host, Lan};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use runc::{run_until_first_line, write_bundle, Workload, RUN_TIMEOUT};
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const IMAGE: &str = "local/lazy:1";

struct Args {
    hosts: Vec<usize>,
    mbit: u32,
    runs: usize,
    source: Source,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        hosts: vec![4, 8],
        mbit: 1000,
        runs: 1,
        source: Source::Debian,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().with_context(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--hosts" => {
                a.hosts = value("N,N,...")?
                    .split(',')
                    .map(|n| n.parse().context("--hosts N,N,..."))
                    .collect::<Result<_>>()?
            }
            "--mbit" => a.mbit = value("MBIT")?.parse().context("--mbit")?,
            "--runs" => a.runs = value("RUNS")?.parse().context("--runs")?,
            "--synthetic" => a.source = Source::Synthetic(value("MIB")?.parse()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.hosts.iter().any(|n| !(2..=50).contains(n)) {
        bail!("--hosts: between 2 and 50 hosts");
    }
    Ok(a)
}

/// One simultaneous start of the image on some hosts.
struct Start {
    /// Bytes the proxy side sent into the bridge from the start to the last first line.
    proxy_bytes: u64,
    /// Each host's time from `imgctl mount` to its container's first line.
    took: Vec<Duration>,
}

struct Bench<'a> {
    tmp: &'a Path,
    lan: &'a Lan,
    proxy: &'a Proxy,
    template: serde_json::Value,
    workload: Workload,
    round: usize,
}

impl Bench<'_> {
    /// Fresh agents on `hosts`; at one moment each mounts the image, puts an overlay on
    /// it and runs the container until its first line.
    fn start(&mut self, hosts: &[Host]) -> Result<Start> {
        self.round += 1;
        let dir = self.tmp.join(format!("round{}", self.round));
        let agents: Vec<Agent> = hosts
            .iter()
            .map(|h| Agent::start_on_host(h, self.proxy, &dir, ""))
            .collect::<Result<_>>()?;
        for a in &agents {
            a.wait_for_peers(hosts.len() - 1, Duration::from_secs(60))?;
        }
        let go = Barrier::new(agents.len());
        let (template, workload, round) = (&self.template, &self.workload, self.round);
        let before = self.lan.bridge_tx_bytes()?;
        let stats_before = self.proxy.stats()?;
        let took: Vec<Result<Duration>> = std::thread::scope(|s| {
            let runs: Vec<_> = agents
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let (go, dir) = (&go, dir.join(format!("host{i}")));
                    let id = format!("imgd-lazy-swarm-{}-{round}-{i}", std::process::id());
                    s.spawn(move || -> Result<Duration> {
                        go.wait();
                        let started = Instant::now();
                        let mount = ImgdMount::mount(a, IMAGE, &dir.join("lower"))?;
                        let overlay = Overlay::mount(mount.dir(), &dir)?;
                        let bundle = dir.join("bundle");
                        write_bundle(template, &bundle, overlay.merged(), workload)?;
                        let (t, _, ()) =
                            run_until_first_line(&bundle, &id, workload, started, || Ok(()))?;
                        let status = a.status()?;
                        let mb = |k: &str| status[k].as_u64().unwrap_or(0) as f64 / 1e6;
                        eprintln!(
                            "  host {i}: first line {:.3}s; MB from peers {:.2}, proxy chunks {:.2}, proxy pieces {:.2}",
                            t.as_secs_f64(),
                            mb("bytes_from_peers"),
                            mb("bytes_from_proxy"),
                            mb("bytes_from_proxy_pieces"),
                        );
                        if status["mounts"][0]["eio"].as_u64().unwrap_or(0) != 0 {
                            bail!("host {i}: the mount answered EIO: {status}");
                        }
                        drop(overlay);
                        drop(mount);
                        Ok(t)
                    })
                })
                .collect();
            runs.into_iter()
                .map(|r| {
                    r.join()
                        .unwrap_or_else(|_| bail!("a host's start panicked"))
                })
                .collect()
        });
        let proxy_bytes = self.lan.bridge_tx_bytes()? - before;
        let took = took.into_iter().collect::<Result<Vec<_>>>()?;
        print_proxy_apis(&stats_before, &self.proxy.stats()?, proxy_bytes);
        if let Some(keep) = std::env::var_os("IMGD_BENCH_KEEP_LOGS") {
            let keep = Path::new(&keep);
            std::fs::create_dir_all(keep)?;
            for (i, a) in agents.iter().enumerate() {
                std::fs::write(keep.join(format!("round{round}-host{i}.log")), a.log())?;
            }
        }
        drop(agents);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Start { proxy_bytes, took })
    }

    /// The run (of `runs`) whose slowest host was fastest.
    fn best(&mut self, hosts: &[Host], runs: usize) -> Result<Start> {
        let mut best: Option<Start> = None;
        for r in 0..runs.max(1) {
            eprintln!(
                "{} host(s) starting at once, run {} of {runs} ...",
                hosts.len(),
                r + 1
            );
            let s = self.start(hosts)?;
            eprintln!(
                "  proxy sent {:.2} MB; slowest first line {:.3}s",
                s.proxy_bytes as f64 / 1e6,
                slowest(&s).as_secs_f64()
            );
            if best.as_ref().is_none_or(|b| slowest(&s) < slowest(b)) {
                best = Some(s);
            }
        }
        best.context("no run")
    }
}

/// What the proxy's own counters say it served in a start, by API, beside the bridge's
/// count (the rest: manifests, chunk lists, HTTP and TCP/IP overhead).
fn print_proxy_apis(before: &ProxyStats, after: &ProxyStats, bridge: u64) {
    let mb = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
    let chunks = mb(after.chunk_bytes_served, before.chunk_bytes_served);
    let index = mb(after.index_bytes_served, before.index_bytes_served);
    let windows = mb(after.window_bytes_served, before.window_bytes_served);
    let blobs = mb(after.blob_bytes_served, before.blob_bytes_served);
    let rest = bridge as f64 / 1e6 - chunks - index - windows - blobs;
    eprintln!(
        "  proxy served (its counters), MB: chunks and pieces {chunks:.2}, index main parts {index:.2}, windows {windows:.2}, registry blobs {blobs:.2}; the rest of the bridge's count {rest:.2}"
    );
}

fn slowest(s: &Start) -> Duration {
    s.took.iter().copied().max().unwrap_or_default()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-lazy-swarm needs root (namespaces, tc, FUSE, overlayfs, runc)");
    }
    let most = args.hosts.iter().copied().max().unwrap_or(1);
    let tmp = tempfile::tempdir()?;
    eprintln!("preparing the image ...");
    let prepared = images::prepare(args.source, &tmp.path().join("img"))?;
    let reg = Registry::start()?;
    skopeo::push_layout(
        &prepared.layout.dir,
        &prepared.name,
        &reg.docker_ref("lazy:1"),
        Format::OciExact,
        false,
    )?;
    let _ = std::fs::remove_dir_all(&prepared.layout.dir);
    let lan = Lan::new(most)?;
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    eprintln!("warming the proxy ...");
    skopeo::warm_proxy(&proxy.addr(), &[IMAGE.to_string()], tmp.path())?;
    for h in &lan.hosts {
        h.shape(args.mbit)?;
    }
    let spec_dir = tmp.path().join("spec");
    std::fs::create_dir_all(&spec_dir)?;
    run_capture(
        Command::new("runc").args(["spec", "--bundle", path_str(&spec_dir)?]),
        "runc spec",
        RUN_TIMEOUT,
    )?;
    let mut bench = Bench {
        tmp: tmp.path(),
        lan: &lan,
        proxy: &proxy,
        template: serde_json::from_slice(&std::fs::read(spec_dir.join("config.json"))?)?,
        workload: prepared.workload.clone(),
        round: 0,
    };
    // The image's first start anywhere stores its startup trace at the proxy, and every
    // later start (on any host) prefetches by it: one start learns it, unmeasured, so that
    // the host alone and the hosts together start alike.
    eprintln!("learning the startup trace (a first start, not measured) ...");
    bench.start(&lan.hosts[..1])?;
    let alone = bench.best(&lan.hosts[..1], args.runs)?;
    let mut rows = Vec::new();
    for &n in &args.hosts {
        rows.push((n, bench.best(&lan.hosts[..n], args.runs)?));
    }

    println!(
        "image: {}; {} gzip layers, {:.1} MB compressed; links tbf {} Mbit/s; fresh agents (swarm on) every start, with the learned startup trace, best of {}",
        prepared.describe,
        prepared.layers,
        prepared.compressed as f64 / 1e6,
        args.mbit,
        args.runs.max(1),
    );
    println!(
        "proxy bytes: sent by the root namespace into the bridge (kernel counters), from the mounts to the last first line"
    );
    println!(
        "one host alone: {:.2} MB from the proxy, mount to first line {:.3}s",
        alone.proxy_bytes as f64 / 1e6,
        slowest(&alone).as_secs_f64()
    );
    println!(
        "| hosts | proxy MB | proxy bytes / one host's start | slowest first line | slowest / one host alone |"
    );
    println!("|---|---|---|---|---|");
    for (n, s) in &rows {
        println!(
            "| {n} | {:.2} | **{:.2}** | {:.3} s | **{:.2}** |",
            s.proxy_bytes as f64 / 1e6,
            s.proxy_bytes as f64 / alone.proxy_bytes.max(1) as f64,
            slowest(s).as_secs_f64(),
            slowest(s).as_secs_f64() / slowest(&alone).as_secs_f64()
        );
    }
    drop(bench);
    drop(proxy);
    drop(lan);
    drop(reg);
    Ok(())
}
