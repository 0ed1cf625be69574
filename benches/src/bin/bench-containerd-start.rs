//! containerd lazy start benchmark: CRI `PullImage`, `RunPodSandbox`, `CreateContainer`
//! and `StartContainer` to the container's first log line, with imgd as containerd's
//! snapshotter (layers served lazily from imgd's view) against containerd's own overlayfs
//! snapshotter with a full pull, from the same proxy over the same shaped link, measured in
//! the same run.
//!
//! The image is the real one of `imgd_tests::debian_image` (Debian 12, python3, numpy and
//! scipy installed by apt, three gzip layers; built once and cached), whose command imports
//! numpy and scipy before it prints. Its first line ends the clock.
//!
//! One host in a network namespace, its link shaped with tc tbf to each rate in turn;
//! containerd (with its CRI plugin) and the agent run in the namespace, the proxy on the
//! LAN gateway, warmed (every blob fetched through it once, untimed). Every run has a fresh
//! containerd and, for imgd, a fresh agent; the pod sandbox image is pulled before the
//! clock starts. Bytes are counted outside both on the host's link (`ip -s link`): all the
//! host received from the clock's start to the first line.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-containerd-start [-- MBIT ...]`
//! (default rates: 1000 and 100 Mbit/s). Needs root, FUSE, containerd 1.6, runc,
//! skopeo, docker-registry, tc, and debootstrap plus a Debian mirror the first time.

use anyhow::{bail, Context, Result};
use imgd_benches::report;
use imgd_tests::containerd::{Containerd, ContainerdOptions, CriOptions};
use imgd_tests::cri::{self, Cri};
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::debian_image;
use imgd_tests::image::{presets, ImageSpec};
use imgd_tests::netns::{Host, Lan};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LAZY_RUNS: usize = 3;
const BASELINE_RUNS: usize = 2;
/// Bound of a pull (the whole image for the baseline) and of a start.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);

/// The snapshotter a run uses.
#[derive(Clone, Copy, PartialEq)]
enum Snapshotter {
    Imgd,
    Overlayfs,
}

/// One timed start.
struct Run {
    took: Duration,
    /// Bytes the host received from the clock's start to the first line.
    rx: u64,
    /// Chunk bytes the agent fetched from the proxy (imgd runs).
    agent_fetched: u64,
}

struct Bench<'a> {
    tmp: &'a Path,
    host: &'a Host,
    proxy: &'a Proxy,
    certs: PathBuf,
    pause: String,
    image: String,
    runs: usize,
}

impl Bench<'_> {
    fn start(&mut self, which: Snapshotter) -> Result<Run> {
        self.runs += 1;
        let dir = self.tmp.join(format!("run{}", self.runs));
        std::fs::create_dir_all(dir.join("logs"))?;
        let agent = match which {
            Snapshotter::Imgd => Some(Agent::start(AgentOptions {
                host: Some(self.host),
                proxy_url: self.proxy.url(),
                data_dir: dir.join("agent"),
                extra_toml: String::new(),
                swarm: false,
            })?),
            Snapshotter::Overlayfs => None,
        };
        let ctrd = Containerd::start_with(&ContainerdOptions {
            imgd_snapshotter: agent.as_ref().map(|a| a.data_dir.join("snapshotter.sock")),
            cri: Some(CriOptions {
                sandbox_image: self.pause.clone(),
                hosts_dir: self.certs.clone(),
                snapshotter: match which {
                    Snapshotter::Imgd => "imgd".into(),
                    Snapshotter::Overlayfs => "overlayfs".into(),
                },
            }),
            host: Some(self.host.clone()),
        })?;
        let mut cri = Cri::connect_when_ready(ctrd.socket(), Duration::from_secs(30))?;
        cri.pull(&self.pause).context("pulling the sandbox image")?;
        let fetched_before = agent_fetched(agent.as_ref())?;
        let rx_before = self.host.rx_bytes()?;
        let started = Instant::now();
        cri.pull(&self.image)
            .with_context(|| format!("CRI PullImage\n{}", ctrd.log()))?;
        let pod = cri
            .run_pod("bench", &self.image, &[], &dir.join("logs"))
            .with_context(|| format!("CRI start\n{}", ctrd.log()))?;
        let line = cri::wait_first_line(&pod.log_path, STEP_TIMEOUT)?;
        let took = started.elapsed();
        let rx = self.host.rx_bytes()? - rx_before;
        if !line.starts_with(debian_image::FIRST_LINE_PREFIX) {
            bail!("unexpected first line {line:?}");
        }
        let agent_fetched = agent_fetched(agent.as_ref())? - fetched_before;
        let _ = cri.remove_pod(&pod);
        drop(ctrd);
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Run {
            took,
            rx,
            agent_fetched,
        })
    }

    fn best(&mut self, which: Snapshotter, runs: usize, what: &str) -> Result<Run> {
        let mut best: Option<Run> = None;
        for i in 0..runs {
            let r = self.start(which)?;
            eprintln!(
                "  {what} {}/{runs}: {:.3}s, {:.1} MB received, agent fetched {:.1} MB",
                i + 1,
                r.took.as_secs_f64(),
                r.rx as f64 / 1e6,
                r.agent_fetched as f64 / 1e6
            );
            if best.as_ref().is_none_or(|b| r.took < b.took) {
                best = Some(r);
            }
        }
        best.context("no run")
    }
}

fn agent_fetched(agent: Option<&Agent>) -> Result<u64> {
    match agent {
        Some(a) => a.status()?["bytes_from_proxy"]
            .as_u64()
            .context("no bytes_from_proxy in the agent's status"),
        None => Ok(0),
    }
}

/// A tiny pod sandbox image: busybox sleeping.
fn pause_image() -> Result<ImageSpec> {
    let mut spec = ImageSpec::new("pause", vec![presets::busybox_base("pause")?]);
    spec.cmd = vec!["/bin/busybox".into(), "sleep".into(), "86400".into()];
    Ok(spec)
}

fn main() -> Result<()> {
    let rates: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("rates are Mbit/s"))
        .collect::<Result<_>>()?;
    let rates = if rates.is_empty() {
        vec![1000, 100]
    } else {
        rates
    };
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-containerd-start needs root (namespaces, tc, FUSE, containerd)");
    }
    let tmp = tempfile::tempdir()?;
    eprintln!("preparing the image ...");
    let image = debian_image::build()?;
    let size = image.compressed_size()?;
    let reg = Registry::start()?;
    image.push(&reg, "pynum:1")?;
    skopeo::push_image(&reg, &tmp.path().join("pause"), pause_image()?, "pause:1")?;

    let lan = Lan::new(1)?;
    let host = &lan.hosts[0];
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    eprintln!("warming the proxy ...");
    let warm = ["local/pynum:1".to_string(), "local/pause:1".to_string()];
    skopeo::warm_proxy(&proxy.addr(), &warm, tmp.path())?;
    let certs = tmp.path().join("certs.d");
    let hosts = certs.join(proxy.addr());
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{0}\"\n[host.\"http://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            proxy.addr()
        ),
    )?;
    let mut bench = Bench {
        tmp: tmp.path(),
        host,
        proxy: &proxy,
        certs,
        pause: format!("{}/local/pause:1", proxy.addr()),
        image: format!("{}/local/pynum:1", proxy.addr()),
        runs: 0,
    };

    let mut rows = Vec::new();
    for &mbit in &rates {
        eprintln!("== link shaped to {mbit} Mbit/s ==");
        host.shape(mbit)?;
        let lazy = bench.best(Snapshotter::Imgd, LAZY_RUNS, "imgd snapshotter")?;
        let full = bench.best(
            Snapshotter::Overlayfs,
            BASELINE_RUNS,
            "overlayfs, full pull",
        )?;
        rows.push((mbit, lazy, full));
    }

    println!(
        "containerd CRI pull + start to the first line, {:.1} MB image (Debian 12, python3, numpy, scipy)",
        size as f64 / 1e6
    );
    for (mbit, lazy, full) in &rows {
        let (l, f) = (lazy.took.as_secs_f64(), full.took.as_secs_f64());
        report(&format!("{mbit} Mbit/s: overlayfs, full pull"), f, "s");
        report(&format!("{mbit} Mbit/s: imgd snapshotter"), l, "s");
        report(
            &format!("{mbit} Mbit/s: imgd / overlayfs (time)"),
            l / f,
            "x",
        );
        report(
            &format!("{mbit} Mbit/s: received by the first line, imgd"),
            lazy.rx as f64 / 1e6,
            "MB",
        );
        report(
            &format!("{mbit} Mbit/s: received, imgd / compressed image"),
            lazy.rx as f64 / size as f64,
            "x",
        );
        report(
            &format!("{mbit} Mbit/s: received, overlayfs full pull"),
            full.rx as f64 / 1e6,
            "MB",
        );
        report(
            &format!("{mbit} Mbit/s: chunks the agent fetched, imgd"),
            lazy.agent_fetched as f64 / 1e6,
            "MB",
        );
    }
    Ok(())
}
