//! Lazy start benchmark: time from `imgctl mount` to a container's first line of output
//! (runc on an overlayfs whose lower layer is the imgd FUSE mount) against the full pull
//! and unpack ("the skopeo way": `skopeo copy docker://PROXY/... oci:DIR` through the same
//! shaped link, `umoci unpack`, then the same runc start), measured in this run. Also
//! reports the bytes the lazy start fetched against the compressed image size.
//!
//! With learned prefetch in the agent, two more variants: a later start of the image (its
//! startup trace, recorded by the first start, is warmed in the background at mount), and a
//! start after `imgctl prefetch --startup` (timed apart). Every lazy run uses a fresh agent
//! cache, and every first start its own image (same layers, own config, so no trace yet).
//!
//! One host in a network namespace, its link shaped to MBIT Mbit/s with tc tbf; the proxy
//! listens on the LAN gateway (root namespace) and is warmed (every blob fetched through it
//! once, untimed) so the measured path is proxy -> host. The agent runs in the namespace
//! (swarm disabled, a fresh data dir for every lazy run); runc runs in the root namespace.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-lazy-start [-- MIB MBIT]`
//! (defaults: 400 MiB of image content, 1000 Mbit/s). Needs root, FUSE, runc, umoci, skopeo,
//! docker-registry, tc and busybox-static.

use anyhow::{bail, Context, Result};
use imgd_benches::report;
use imgd_tests::daemons::{workspace_bin, Agent, AgentOptions, Proxy};
use imgd_tests::guards::{path_str, run_capture, ImgdMount, KillOnDrop, Overlay};
use imgd_tests::image::{self, FileSpec, ImageSpec, LayerSpec, LayoutInfo};
use imgd_tests::netns::{Host, Lan};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// What the container prints: the first line ends the clock.
const HELLO: &str = "hello from an imgd lazy start";
/// Lazy runs (fresh agent data dir each) and full-pull runs; the best of each is reported.
const LAZY_RUNS: usize = 3;
const BASELINE_RUNS: usize = 2;
/// Bound of any one step (a pull of the whole image included).
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on the container's first line and on its exit.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Base layer with a static busybox and the greeting, then `mib` MiB of incompressible
/// data in files of at most 64 MiB over four gzip layers.
fn lazy_image(mib: u64) -> Result<ImageSpec> {
    let base = image::presets::busybox_base(HELLO)?;
    let mut layers = vec![base];
    let data_layers = 4u64;
    let mut left = mib * MIB;
    let mut seed = 4000;
    for l in 0..data_layers {
        let mut in_layer = left / (data_layers - l);
        left -= in_layer;
        let dir = format!("data/{l}");
        let mut files = vec![FileSpec::dir("data"), FileSpec::dir(dir.clone())];
        let mut n = 0;
        while in_layer > 0 {
            let len = in_layer.min(64 * MIB);
            in_layer -= len;
            files.push(FileSpec::random(format!("{dir}/blob-{n}.bin"), seed, len));
            seed += 1;
            n += 1;
        }
        layers.push(LayerSpec::gzip(files));
    }
    Ok(ImageSpec::new("lazy", layers))
}

/// A runc container, force-deleted on drop.
struct Container {
    id: String,
    child: KillOnDrop,
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(c) = self.child.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Writes a runc bundle at `dir` from `template` (a `runc spec` config) whose rootfs is
/// `rootfs` and whose process prints the greeting.
fn write_bundle(template: &serde_json::Value, dir: &Path, rootfs: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut spec = template.clone();
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "cat /etc/hello.txt"]);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// Starts the bundle with runc and returns once the container's first line arrives (the
/// clock stops there), then waits for it to exit and deletes it.
fn run_until_first_line(bundle: &Path, id: &str, started: Instant) -> Result<Duration> {
    let child = Command::new("runc")
        .args(["run", "--bundle", path_str(bundle)?, id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning runc")?;
    let mut container = Container {
        id: id.to_string(),
        child: KillOnDrop(Some(child)),
    };
    let c = container.child.0.as_mut().context("runc child")?;
    let stdout = c.stdout.take().context("runc stdout")?;
    let mut stderr = c.stderr.take().context("runc stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(r) => r?,
        Err(_) => bail!("no output from the container within {RUN_TIMEOUT:?}"),
    };
    let took = started.elapsed();
    if line.trim_end() != HELLO {
        // Kill first: reading stderr of a live runc could block.
        if let Some(c) = container.child.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        bail!("container printed {line:?} instead of the greeting; runc: {err}");
    }
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let c = container.child.0.as_mut().context("runc child")?;
        if let Some(status) = c.try_wait()? {
            if !status.success() {
                bail!("runc exited with {status}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("container did not exit within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(container);
    Ok(took)
}

/// One timed start.
struct LazyRun {
    /// From `imgctl mount` to the container's first line.
    took: Duration,
    /// The mount's `fetched_bytes` (chunks fetched into the cache, learned prefetch included).
    fetched: u64,
    /// Bytes received on the host's link from before the mount (or the prefetch) to the end.
    wire: u64,
    /// Whether the agent logged a learned startup prefetch for this mount.
    learned: bool,
    /// The `imgctl prefetch --startup` run before the mount, if any.
    prewarm: Option<Duration>,
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
    runs: usize,
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
            Some(t.elapsed())
        } else {
            None
        };
        let lower = dir.join("lower");
        let bundle = dir.join("bundle");

        let started = Instant::now();
        let mount = ImgdMount::mount(&agent, image, &lower)?;
        let overlay = Overlay::mount(&lower, &dir)?;
        write_bundle(&self.template, &bundle, overlay.merged())?;
        let took = run_until_first_line(&bundle, &id, started)?;

        // A learned prefetch runs in the background; let it finish before counting bytes.
        let mut learned = false;
        if mode == Mode::Learned {
            let deadline = Instant::now() + Duration::from_secs(10);
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
        let wire = self.host.rx_bytes()? - rx_before;
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
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(LazyRun {
            took,
            fetched,
            wire,
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
        write_bundle(&self.template, &bundle, &unpacked.join("rootfs"))?;
        let took = run_until_first_line(&bundle, &id, started)?;
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
                "  {:.3}s, {:.2} MB fetched, {:.2} MB on the link{}",
                r.took.as_secs_f64(),
                r.fetched as f64 / 1e6,
                r.wire as f64 / 1e6,
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

/// Whether the agent has learned (trace-based) startup prefetch.
fn learned_prefetch_available() -> bool {
    let help = workspace_bin("imgctl")
        .ok()
        .and_then(|b| Command::new(b).args(["prefetch", "--help"]).output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    help.contains("--startup")
}

/// Adds `n` images to the layout that share every layer of image `name` and differ only
/// in their config's `Cmd` (so each has its own manifest digest, hence no startup trace
/// yet); they are named `{name}1` .. `{name}n`.
fn add_variants(layout: &LayoutInfo, name: &str, n: usize) -> Result<Vec<String>> {
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let info = layout.image(name).context("image in layout")?;
    let read_json = |d: &imgd_core::Digest| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            layout.blob_path(d),
        )?)?)
    };
    let manifest = read_json(&info.manifest.digest)?;
    let config = read_json(&info.config.digest)?;
    let index_path = layout.dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let write_blob = |bytes: &[u8]| -> Result<(String, u64)> {
        let d = imgd_core::Digest::of(bytes);
        std::fs::write(layout.blob_path(&d), bytes)?;
        Ok((d.to_string(), bytes.len() as u64))
    };
    let mut names = Vec::new();
    for i in 1..=n {
        let mut c = config.clone();
        c["config"]["Cmd"] =
            serde_json::json!(["/bin/sh", "-c", format!("cat /etc/hello.txt # variant {i}")]);
        let (digest, size) = write_blob(&serde_json::to_vec(&c)?)?;
        let mut m = manifest.clone();
        m["config"]["digest"] = digest.into();
        m["config"]["size"] = size.into();
        let (digest, size) = write_blob(&serde_json::to_vec(&m)?)?;
        let ref_name = format!("{name}{i}");
        index["manifests"]
            .as_array_mut()
            .context("index.json manifests")?
            .push(serde_json::json!({
                "mediaType": m["mediaType"],
                "digest": digest,
                "size": size,
                "annotations": { REF_NAME: ref_name },
            }));
        names.push(ref_name);
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(names)
}

fn main() -> Result<()> {
    let mib = imgd_benches::numeric_arg(1, 400)?;
    let mbit = imgd_benches::numeric_arg(2, 1000)? as u32;
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-lazy-start needs root (namespaces, tc, FUSE, overlayfs, runc)");
    }
    let learned_available = learned_prefetch_available();
    let tmp = tempfile::tempdir()?;
    eprintln!("building and pushing a {mib} MiB image ...");
    let reg = Registry::start()?;
    let layout = image::build_layout(&tmp.path().join("img"), &[lazy_image(mib)?])?;
    let size: u64 = layout
        .image("lazy")
        .context("image in layout")?
        .referenced_blobs()
        .iter()
        .map(|b| b.size)
        .sum();
    // One image per lazy run, each without a startup trace until its first start.
    let variants = add_variants(&layout, "lazy", LAZY_RUNS)?;
    let images: Vec<String> = (1..=LAZY_RUNS).map(|i| format!("local/lazy:{i}")).collect();
    for (i, v) in variants.iter().enumerate() {
        skopeo::push_layout(
            &layout.dir,
            v,
            &reg.docker_ref(&format!("lazy:{}", i + 1)),
            Format::OciExact,
            false,
        )?;
    }
    let _ = std::fs::remove_dir_all(&layout.dir);

    let lan = Lan::new(1)?;
    let host = &lan.hosts[0];
    host.shape(mbit)?;
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    eprintln!("warming the proxy ...");
    let warm = tmp.path().join("warm");
    for image in &images {
        // Into one layout: blobs already there are not fetched again.
        skopeo::copy(
            &format!("docker://{}/{image}", proxy.addr()),
            &format!(
                "oci:{}:{}",
                path_str(&warm)?,
                image.replace(['/', ':'], "-")
            ),
            &["--src-tls-verify=false"],
        )
        .context("warming the proxy")?;
    }
    let _ = std::fs::remove_dir_all(&warm);

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
        runs: 0,
    };

    let first = bench.best_lazy(&images, Mode::First, "lazy first start")?;
    let (learned, prewarmed) = if learned_available {
        (
            Some(bench.best_lazy(&images, Mode::Learned, "learned start")?),
            Some(bench.best_lazy(&images, Mode::Prewarmed, "start after prefetch --startup")?),
        )
    } else {
        (None, None)
    };
    let mut full: Option<[Duration; 4]> = None;
    for i in 0..BASELINE_RUNS {
        eprintln!("full pull + unpack {} of {BASELINE_RUNS} ...", i + 1);
        let r = bench.full_pull(&images[0], &policy)?;
        eprintln!("  {:.3}s", r[0].as_secs_f64());
        if full.is_none_or(|b| r[0] < b[0]) {
            full = Some(r);
        }
    }
    let full = full.context("no baseline run")?;
    let base = full[0].as_secs_f64();
    let pct = |x: f64| 100.0 * x;

    println!(
        "image {:.1} MB compressed ({mib} MiB of content, 5 gzip layers), host link shaped to {mbit} Mbit/s",
        size as f64 / 1e6
    );
    println!(
        "lazy: imgctl mount + overlayfs + runc until the first line, a fresh agent cache each run, best of {LAZY_RUNS}"
    );
    println!(
        "baseline (the skopeo way): skopeo copy docker://PROXY oci:DIR through the same link + umoci unpack + runc until the first line, best of {BASELINE_RUNS}"
    );
    report(
        "lazy first start (no startup trace yet)",
        first.took.as_secs_f64(),
        "s",
    );
    report("full pull + unpack + start (baseline)", base, "s");
    report("  of which skopeo copy", full[1].as_secs_f64(), "s");
    report("  of which umoci unpack", full[2].as_secs_f64(), "s");
    report(
        "  of which runc until the first line",
        full[3].as_secs_f64(),
        "s",
    );
    report(
        "lazy first start / baseline (target <= 10%)",
        pct(first.took.as_secs_f64() / base),
        "%",
    );
    report(
        "chunk bytes fetched by the lazy first start",
        first.fetched as f64 / 1e6,
        "MB",
    );
    report(
        "fetched / compressed image size (target <= 10%)",
        pct(first.fetched as f64 / size as f64),
        "%",
    );
    report(
        "  all bytes on the host's link / image size",
        pct(first.wire as f64 / size as f64),
        "%",
    );
    match (learned, prewarmed) {
        (Some(l), Some(p)) => {
            report(
                "learned start (trace warmed at mount)",
                l.took.as_secs_f64(),
                "s",
            );
            report(
                "  learned start / baseline",
                pct(l.took.as_secs_f64() / base),
                "%",
            );
            report(
                "  chunk bytes fetched (warm included)",
                l.fetched as f64 / 1e6,
                "MB",
            );
            report(
                "  all bytes on the host's link / image size",
                pct(l.wire as f64 / size as f64),
                "%",
            );
            let pre = p.prewarm.unwrap_or_default();
            report(
                "imgctl prefetch --startup (before the mount)",
                pre.as_secs_f64(),
                "s",
            );
            report("  then start", p.took.as_secs_f64(), "s");
            report(
                "  all bytes on the host's link / image size",
                pct(p.wire as f64 / size as f64),
                "%",
            );
        }
        _ => println!("learned prefetch: not available yet"),
    }
    drop(bench);
    drop(proxy);
    drop(lan);
    drop(reg);
    Ok(())
}
