//! Lazy start benchmark: time from `imgctl mount` to a container's first line of output
//! (runc on an overlayfs whose lower layer is the imgd FUSE mount) against the full pull
//! and unpack ("the skopeo way": `skopeo copy docker://PROXY/... oci:DIR` through the same
//! shaped link, `umoci unpack`, then the same runc start), measured in the same run, and
//! the bytes the lazy start moved by its first line against the compressed image.
//!
//! The image is real by default: Debian 12 with python3, numpy and scipy installed by apt
//! (three gzip layers, `imgd_tests::debian_image`, built once and cached in
//! `/var/cache/imgd-bench`), whose command imports numpy and scipy and then prints a line.
//! `--synthetic MIB` runs the earlier busybox image instead (one file read, MIB MiB of
//! random data never read), which hides every cost of a real start.
//!
//! Bytes are counted outside the agent, on the host namespace's link (`ip -s link`,
//! everything the host received: manifests, layer indexes, chunks, TCP/IP headers),
//! sampled when `imgctl mount` returns (what a mount needs before its first read) and at
//! the container's first line. The agent's own count of chunk bytes is shown beside them.
//!
//! The image's zstd variant (every layer recompressed by the `zstd` CLI, so lazy reads go
//! through the proxy's seekable copy of each layer) is started lazily too, at every rate,
//! and its time and bytes are reported against the gzip image's first start.
//!
//! With learned prefetch in the agent, two more variants: a later start of the image (its
//! startup trace, recorded by the first start, is warmed in the background at mount), and a
//! start after `imgctl prefetch --startup` (timed apart). Every lazy run uses a fresh agent
//! cache, and every first start its own image (same layers, own config, so no trace yet).
//!
//! One host in a network namespace, its link shaped with tc tbf to each rate in turn; the
//! proxy listens on the LAN gateway (root namespace) and is warmed (every blob fetched
//! through it once, untimed) so the measured path is proxy -> host. The agent runs in the
//! namespace (swarm disabled); runc runs in the root namespace.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-lazy-start [-- [MBIT ...] [--synthetic MIB]]`
//! (default rates: 1000 and 100 Mbit/s). Needs root, FUSE, runc, umoci, skopeo,
//! docker-registry, tc, and debootstrap plus a Debian mirror the first time (or
//! busybox-static for `--synthetic`).

mod images;
mod output;
mod runc;

use anyhow::{bail, Context, Result};
use images::{Prepared, Source};
use imgd_tests::daemons::{workspace_bin, Agent, AgentOptions, Proxy};
use imgd_tests::guards::{path_str, run_capture, ImgdMount, Overlay};
use imgd_tests::netns::{Host, Lan};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use runc::{run_until_first_line, write_bundle, Workload, RUN_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Lazy runs per mode and rate (fresh agent data dir each) and full-pull runs per rate;
/// the best of each is reported. `IMGD_BENCH_LAZY_RUNS=N` runs N lazy starts per mode
/// instead (a quicker look at bytes).
const LAZY_RUNS_DEFAULT: usize = 3;
const BASELINE_RUNS: usize = 2;
/// Bound of any one step (a pull of the whole image included).
const STEP_TIMEOUT: Duration = Duration::from_secs(900);

/// One timed start.
pub struct LazyRun {
    /// From `imgctl mount` to the container's first line.
    pub took: Duration,
    /// `imgctl mount` alone.
    pub mount: Duration,
    /// Bytes received on the host's link by the time `imgctl mount` returned (manifest,
    /// config, layer indexes).
    pub at_mount: u64,
    /// Bytes received on the host's link by the container's first line.
    pub by_first_line: u64,
    /// Bytes received on the host's link by the end (a learned warm-up finished).
    pub total: u64,
    /// The mount's `fetched_bytes` at the end (chunks fetched into the cache, learned
    /// prefetch included).
    pub fetched: u64,
    /// Whether the agent logged a learned startup prefetch for this mount.
    pub learned: bool,
    /// The `imgctl prefetch --startup` run before the mount, if any: its time and the
    /// bytes received on the host's link while it ran.
    pub prewarm: Option<(Duration, u64)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// A mount of an image without a startup trace (the start records one).
    First,
    /// A mount of an image with a trace: the agent warms the traced files in the background.
    Learned,
    /// `imgctl prefetch --startup` first (timed apart), then the mount.
    Prewarmed,
}

struct Bench<'a> {
    tmp: &'a Path,
    host: &'a Host,
    proxy: &'a Proxy,
    template: serde_json::Value,
    workload: Workload,
    runs: usize,
    first_line: Option<String>,
}

impl Bench<'_> {
    fn next(&mut self) -> (PathBuf, String) {
        self.runs += 1;
        (
            self.tmp.join(format!("run{}", self.runs)),
            format!("imgd-bench-{}-{}", std::process::id(), self.runs),
        )
    }

    /// mount -> overlay -> runc until the first line, with a fresh agent.
    fn lazy(&mut self, image: &str, mode: Mode) -> Result<LazyRun> {
        let (dir, id) = self.next();
        let agent = Agent::start(AgentOptions {
            host: Some(self.host),
            proxy_url: self.proxy.url(),
            data_dir: dir.join("agent"),
            extra_toml: String::new(),
            swarm: false,
        })?;
        let rx_before = self.host.rx_bytes()?;
        let prewarm = if mode == Mode::Prewarmed {
            let t = Instant::now();
            let (ok, out, err) = agent.imgctl(&["prefetch", "--startup", image])?;
            if !ok {
                bail!("imgctl prefetch --startup {image}: {out}{err}");
            }
            Some((t.elapsed(), self.host.rx_bytes()? - rx_before))
        } else {
            None
        };
        // The start's own bytes are counted from the mount, a prefetch's apart.
        let rx_before = self.host.rx_bytes()?;
        let lower = dir.join("lower");
        let bundle = dir.join("bundle");

        let started = Instant::now();
        let mount = ImgdMount::mount(&agent, image, &lower)?;
        let mount_took = started.elapsed();
        let at_mount = self.host.rx_bytes()? - rx_before;
        let overlay = Overlay::mount(&lower, &dir)?;
        write_bundle(&self.template, &bundle, overlay.merged(), &self.workload)?;
        let (took, line, by_first_line) =
            run_until_first_line(&bundle, &id, &self.workload, started, || {
                self.host.rx_bytes()
            })?;
        let by_first_line = by_first_line - rx_before;
        self.first_line.get_or_insert(line);

        // A learned prefetch runs in the background; let it finish before the totals.
        let mut learned = false;
        if mode == Mode::Learned {
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                let log = agent.log();
                if log.contains("startup prefetch failed") {
                    bail!("learned prefetch failed:\n{log}");
                }
                if log.contains("startup files prefetched") {
                    learned = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let total = self.host.rx_bytes()? - rx_before;
        let status = agent.status()?;
        let m = &status["mounts"][0];
        let fetched = m["fetched_bytes"]
            .as_u64()
            .with_context(|| format!("no fetched_bytes in status: {status}"))?;
        if m["eio"].as_u64().unwrap_or(0) != 0 {
            bail!("the mount answered EIO: {m}");
        }
        drop(overlay);
        drop(mount); // stores the startup trace of a first start
        if let Some(keep) = std::env::var_os("IMGD_BENCH_KEEP_LOGS") {
            let keep = Path::new(&keep);
            std::fs::create_dir_all(keep)?;
            std::fs::write(keep.join(format!("run{}.log", self.runs)), agent.log())?;
        }
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(LazyRun {
            took,
            mount: mount_took,
            at_mount,
            by_first_line,
            total,
            fetched,
            learned,
            prewarm,
        })
    }

    /// skopeo copy (in the host's namespace, through the shaped link) -> umoci unpack ->
    /// runc until the first line. Returns the total and the three phases.
    fn full_pull(&mut self, image: &str, policy: &Path) -> Result<[Duration; 4]> {
        let (dir, id) = self.next();
        std::fs::create_dir_all(&dir)?;
        let layout = dir.join("layout");
        let unpacked = dir.join("unpacked");
        let bundle = dir.join("bundle");
        let src = format!("docker://{}/{image}", self.proxy.addr());
        let dst = format!("oci:{}:lazy", path_str(&layout)?);

        let started = Instant::now();
        run_capture(
            self.host
                .command("skopeo")
                .arg("--policy")
                .arg(policy)
                .args(["copy", "--quiet", "--src-tls-verify=false", &src, &dst]),
            "skopeo copy (in the host's namespace)",
            STEP_TIMEOUT,
        )?;
        let pulled = started.elapsed();
        run_capture(
            Command::new("umoci")
                .args(["unpack", "--image", &format!("{}:lazy", path_str(&layout)?)])
                .arg(&unpacked),
            "umoci unpack",
            STEP_TIMEOUT,
        )?;
        let unpacked_at = started.elapsed();
        write_bundle(
            &self.template,
            &bundle,
            &unpacked.join("rootfs"),
            &self.workload,
        )?;
        let (took, _, ()) = run_until_first_line(&bundle, &id, &self.workload, started, || Ok(()))?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok([took, pulled, unpacked_at - pulled, took - unpacked_at])
    }

    /// One run per image in `mode`; the fastest.
    fn best_lazy(&mut self, images: &[String], mode: Mode, what: &str) -> Result<LazyRun> {
        let mut best: Option<LazyRun> = None;
        for (i, image) in images.iter().enumerate() {
            eprintln!("{what} {} of {} ({image}) ...", i + 1, images.len());
            let r = self.lazy(image, mode)?;
            eprintln!(
                "  {:.3}s (mount {:.3}s), {:.2} MB on the link at mount, {:.2} MB by the first line, {:.2} MB in all, {:.2} MB chunks{}",
                r.took.as_secs_f64(),
                r.mount.as_secs_f64(),
                r.at_mount as f64 / 1e6,
                r.by_first_line as f64 / 1e6,
                r.total as f64 / 1e6,
                r.fetched as f64 / 1e6,
                if r.learned { ", learned prefetch" } else { "" }
            );
            if mode == Mode::Learned && !r.learned {
                bail!("the agent did not prefetch from a learned trace for {image}");
            }
            if best.as_ref().is_none_or(|b| r.took < b.took) {
                best = Some(r);
            }
        }
        best.context("no run")
    }
}

/// Lazy runs per mode and rate: [`LAZY_RUNS_DEFAULT`], or `IMGD_BENCH_LAZY_RUNS`.
fn lazy_runs() -> usize {
    std::env::var("IMGD_BENCH_LAZY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(LAZY_RUNS_DEFAULT)
}

/// `IMGD_BENCH_QUICK=1`: lazy first and learned starts only (no zstd variant, no
/// prefetch --startup, no baseline), a quicker look at bytes and times.
fn quick() -> bool {
    std::env::var_os("IMGD_BENCH_QUICK").is_some()
}

/// Whether the agent has learned (trace-based) startup prefetch.
fn learned_prefetch_available() -> bool {
    let help = workspace_bin("imgctl")
        .ok()
        .and_then(|b| Command::new(b).args(["prefetch", "--help"]).output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    help.contains("--startup")
}

/// `[MBIT ...] [--synthetic MIB]`.
fn parse_args() -> Result<(Vec<u32>, Source)> {
    let mut rates = Vec::new();
    let mut source = Source::Debian;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--synthetic" {
            let mib = args.next().context("--synthetic needs MIB")?;
            source = Source::Synthetic(mib.parse().context("--synthetic MIB")?);
        } else {
            rates.push(a.parse().with_context(|| format!("rate {a:?} (Mbit/s)"))?);
        }
    }
    if rates.is_empty() {
        rates = vec![1000, 100];
    }
    Ok((rates, source))
}

/// Bytes of layer indexes the proxy stores (`imgd_proxy_storage_bytes{kind="indexes"}`).
fn proxy_index_bytes(proxy: &Proxy) -> Result<u64> {
    let r = proxy.get("/metrics", &[])?;
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .find_map(|l| l.strip_prefix("imgd_proxy_storage_bytes{kind=\"indexes\"} "))
        .and_then(|v| v.trim().parse().ok())
        .context("no imgd_proxy_storage_bytes{kind=\"indexes\"} in /metrics")
}

/// The results at one link rate.
pub struct RateResult {
    pub mbit: u32,
    pub first: LazyRun,
    /// The first start of the zstd variant.
    pub zstd: LazyRun,
    pub learned: Option<(LazyRun, LazyRun)>,
    pub full: [Duration; 4],
}

fn main() -> Result<()> {
    let (rates, source) = parse_args()?;
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-lazy-start needs root (namespaces, tc, FUSE, overlayfs, runc)");
    }
    let learned_available = learned_prefetch_available();
    let tmp = tempfile::tempdir()?;
    eprintln!("preparing the image ...");
    let prepared: Prepared = images::prepare(source, &tmp.path().join("img"))?;
    let size = prepared.compressed;
    // One image per lazy run and rate, each without a startup trace until its first start.
    let per_rate = lazy_runs();
    let variants = images::add_variants(&prepared.layout, &prepared.name, per_rate * rates.len())?;
    let quick = quick();
    let (zlayout, zsize, zvariants) = if quick {
        (None, 0, Vec::new())
    } else {
        eprintln!("recompressing the layers with zstd ...");
        let (zlayout, zsize) = images::zstd_variant(&prepared, &tmp.path().join("zimg"))?;
        let zvariants = images::add_variants(&zlayout, "zbase", per_rate * rates.len())?;
        (Some(zlayout), zsize, zvariants)
    };
    let reg = Registry::start()?;
    let push = |layout: &Path, variants: &[String], repo: &str| -> Result<Vec<String>> {
        eprintln!("pushing {} variants of {repo} ...", variants.len());
        let mut refs = Vec::new();
        for (i, v) in variants.iter().enumerate() {
            skopeo::push_layout(
                layout,
                v,
                &reg.docker_ref(&format!("{repo}:{}", i + 1)),
                Format::OciExact,
                false,
            )?;
            refs.push(format!("local/{repo}:{}", i + 1));
        }
        Ok(refs)
    };
    let images = push(&prepared.layout.dir, &variants, "lazy")?;
    let zimages = match &zlayout {
        Some(z) => push(&z.dir, &zvariants, "zlazy")?,
        None => Vec::new(),
    };
    let _ = std::fs::remove_dir_all(&prepared.layout.dir);
    if let Some(z) = &zlayout {
        let _ = std::fs::remove_dir_all(&z.dir);
    }

    let lan = Lan::new(1)?;
    let host = &lan.hosts[0];
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    eprintln!("warming the proxy ...");
    let all: Vec<String> = images.iter().chain(&zimages).cloned().collect();
    skopeo::warm_proxy(&proxy.addr(), &all, tmp.path())?;
    let index_bytes = proxy_index_bytes(&proxy)?;

    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let spec_dir = tmp.path().join("spec");
    std::fs::create_dir_all(&spec_dir)?;
    run_capture(
        Command::new("runc").args(["spec", "--bundle", path_str(&spec_dir)?]),
        "runc spec",
        RUN_TIMEOUT,
    )?;
    let template = serde_json::from_slice(&std::fs::read(spec_dir.join("config.json"))?)?;
    let mut bench = Bench {
        tmp: tmp.path(),
        host,
        proxy: &proxy,
        template,
        workload: prepared.workload.clone(),
        runs: 0,
        first_line: None,
    };

    let mut results = Vec::new();
    for (r, &mbit) in rates.iter().enumerate() {
        eprintln!("== link shaped to {mbit} Mbit/s ==");
        host.shape(mbit)?;
        let imgs = &images[r * per_rate..(r + 1) * per_rate];
        let first = bench.best_lazy(imgs, Mode::First, "lazy first start")?;
        if quick {
            let learned = if learned_available {
                Some(bench.best_lazy(imgs, Mode::Learned, "learned start")?)
            } else {
                None
            };
            output::print_quick(mbit, &first, learned.as_ref(), size);
            continue;
        }
        let zimgs = &zimages[r * per_rate..(r + 1) * per_rate];
        let zstd = bench.best_lazy(zimgs, Mode::First, "lazy first start, zstd variant")?;
        let learned = if learned_available {
            Some((
                bench.best_lazy(imgs, Mode::Learned, "learned start")?,
                bench.best_lazy(imgs, Mode::Prewarmed, "start after prefetch --startup")?,
            ))
        } else {
            None
        };
        let mut full: Option<[Duration; 4]> = None;
        for i in 0..BASELINE_RUNS {
            eprintln!("full pull + unpack {} of {BASELINE_RUNS} ...", i + 1);
            let t = bench.full_pull(&imgs[0], &policy)?;
            eprintln!("  {:.3}s", t[0].as_secs_f64());
            if full.is_none_or(|b| t[0] < b[0]) {
                full = Some(t);
            }
        }
        results.push(RateResult {
            mbit,
            first,
            zstd,
            learned,
            full: full.context("no baseline run")?,
        });
    }

    println!(
        "image: {}; {} gzip layers, {:.1} MB compressed, {:.1} MB uncompressed; layer indexes at the proxy {:.1} MB ({:.1}% of the image)",
        prepared.describe,
        prepared.layers,
        size as f64 / 1e6,
        prepared.uncompressed as f64 / 1e6,
        index_bytes as f64 / 1e6,
        100.0 * index_bytes as f64 / size as f64,
    );
    if let Some(line) = &bench.first_line {
        println!("the container's first line: {line}");
    }
    println!(
        "lazy: imgctl mount + overlayfs + runc until the first line, a fresh agent cache each run, best of {}", lazy_runs()
    );
    println!(
        "baseline (the skopeo way): skopeo copy docker://PROXY oci:DIR through the same link + umoci unpack + runc until the first line, best of {BASELINE_RUNS}"
    );
    println!(
        "link bytes: received by the host's namespace (indexes, manifests, chunks, TCP/IP headers)"
    );
    println!(
        "zstd variant: the same layers recompressed by `zstd -3`, {:.1} MB compressed; lazy reads use the proxy's seekable copies",
        zsize as f64 / 1e6
    );
    for r in &results {
        output::print_rate(r, size, zsize);
    }
    drop(bench);
    drop(proxy);
    drop(lan);
    drop(reg);
    Ok(())
}
