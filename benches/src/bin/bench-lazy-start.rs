//! Lazy start benchmark: time from `imgctl mount` to a container's first line of output
//! (runc on an overlayfs whose lower layer is the imgd FUSE mount) against the full pull
//! and unpack ("the skopeo way": `skopeo copy docker://PROXY/... oci:DIR` through the same
//! shaped link, `umoci unpack`, then the same runc start), measured in this run. Also
//! reports the bytes the lazy start fetched against the compressed image size.
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
use imgd_tests::image::{self, FileSpec, ImageSpec, LayerSpec};
use imgd_tests::netns::{Host, Lan};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
const IMAGE: &str = "local/lazy:1";

fn arg(i: usize, default: u64) -> Result<u64> {
    Ok(std::env::args()
        .nth(i)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default))
}

/// Base layer with a static busybox and the greeting, then `mib` MiB of incompressible
/// data in files of at most 64 MiB over four gzip layers.
fn lazy_image(mib: u64) -> Result<ImageSpec> {
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let base = LayerSpec::gzip(vec![
        FileSpec::dir("bin"),
        FileSpec::file("bin/busybox", busybox).mode(0o755),
        FileSpec::symlink("bin/sh", "busybox"),
        FileSpec::symlink("bin/cat", "busybox"),
        FileSpec::dir("etc"),
        FileSpec::file("etc/hello.txt", format!("{HELLO}\n")),
        FileSpec::dir("tmp").mode(0o1777),
        FileSpec::dir("proc"),
        FileSpec::dir("dev"),
        FileSpec::dir("sys"),
    ]);
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

/// Runs `cmd` to completion within `timeout` (killed by pid past it); fails on non-zero exit.
fn run_bounded(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let mut child = KillOnDrop(Some(child));
    let deadline = Instant::now() + timeout;
    loop {
        let c = child.0.as_mut().context("child")?;
        if c.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.0.take().context("child")?.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child killed (by its pid) and reaped on drop.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An overlayfs mount at `merged`, unmounted on drop.
struct Overlay {
    merged: PathBuf,
}

impl Overlay {
    fn mount(lower: &Path, scratch: &Path) -> Result<Overlay> {
        let (upper, work, merged) = (
            scratch.join("upper"),
            scratch.join("work"),
            scratch.join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d)?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        run_bounded(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&merged),
            "mount -t overlay",
            RUN_TIMEOUT,
        )?;
        Ok(Overlay { merged })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.merged)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
        }
    }
}

/// An `imgctl mount`, unmounted through the agent on drop (lazily by the kernel if the
/// agent cannot).
struct ImgdMount<'a> {
    agent: &'a Agent,
    dir: PathBuf,
}

impl<'a> ImgdMount<'a> {
    fn mount(agent: &'a Agent, image: &str, dir: &Path) -> Result<ImgdMount<'a>> {
        std::fs::create_dir_all(dir)?;
        let (ok, out, err) = agent.imgctl(&["mount", image, path_str(dir)?])?;
        if !ok {
            bail!("imgctl mount: {out}{err}\n{}", agent.log());
        }
        Ok(ImgdMount {
            agent,
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for ImgdMount<'_> {
    fn drop(&mut self) {
        let ok = self
            .dir
            .to_str()
            .and_then(|d| self.agent.imgctl(&["umount", d]).ok())
            .is_some_and(|(ok, _, _)| ok);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
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

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
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

/// Bytes received on the host's links (all but loopback), from `ip -s link` in its netns.
fn link_rx_bytes(host: &Host) -> Result<u64> {
    let out = run_bounded(
        Command::new("ip").args(["-n", &host.ns, "-j", "-s", "link", "show"]),
        "ip -s link",
        RUN_TIMEOUT,
    )?;
    let links: serde_json::Value = serde_json::from_str(&out)?;
    Ok(links
        .as_array()
        .context("ip -j output")?
        .iter()
        .filter(|l| l["ifname"] != "lo")
        .filter_map(|l| l["stats64"]["rx"]["bytes"].as_u64())
        .sum())
}

struct LazyRun {
    took: Duration,
    fetched: u64,
    wire: u64,
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
    fn lazy(&mut self) -> Result<LazyRun> {
        let (dir, id) = self.next();
        let agent = Agent::start(AgentOptions {
            host: Some(self.host),
            proxy_url: self.proxy.url(),
            data_dir: dir.join("agent"),
            extra_toml: String::new(),
            swarm: false,
        })?;
        let rx_before = link_rx_bytes(self.host)?;
        let lower = dir.join("lower");
        let bundle = dir.join("bundle");

        let started = Instant::now();
        let mount = ImgdMount::mount(&agent, IMAGE, &lower)?;
        let overlay = Overlay::mount(&lower, &dir)?;
        write_bundle(&self.template, &bundle, &overlay.merged)?;
        let took = run_until_first_line(&bundle, &id, started)?;

        let wire = link_rx_bytes(self.host)? - rx_before;
        let status = agent.status()?;
        let m = &status["mounts"][0];
        let fetched = m["fetched_bytes"]
            .as_u64()
            .with_context(|| format!("no fetched_bytes in status: {status}"))?;
        if m["eio"].as_u64().unwrap_or(0) != 0 {
            bail!("the mount answered EIO: {m}");
        }
        drop(overlay);
        drop(mount);
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(LazyRun {
            took,
            fetched,
            wire,
        })
    }

    /// skopeo copy (in the host's namespace, through the shaped link) -> umoci unpack ->
    /// runc until the first line. Returns the total and the three phases.
    fn full_pull(&mut self, policy: &Path) -> Result<[Duration; 4]> {
        let (dir, id) = self.next();
        std::fs::create_dir_all(&dir)?;
        let layout = dir.join("layout");
        let unpacked = dir.join("unpacked");
        let bundle = dir.join("bundle");
        let src = format!("docker://{}/{IMAGE}", self.proxy.addr());
        let dst = format!("oci:{}:lazy", path_str(&layout)?);

        let started = Instant::now();
        run_bounded(
            self.host
                .command("skopeo")
                .arg("--policy")
                .arg(policy)
                .args(["copy", "--quiet", "--src-tls-verify=false", &src, &dst]),
            "skopeo copy (in the host's namespace)",
            STEP_TIMEOUT,
        )?;
        let pulled = started.elapsed();
        run_bounded(
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

fn main() -> Result<()> {
    let mib = arg(1, 400)?;
    let mbit = arg(2, 1000)? as u32;
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-lazy-start needs root (namespaces, tc, FUSE, overlayfs, runc)");
    }
    let tmp = tempfile::tempdir()?;
    eprintln!("building and pushing a {mib} MiB image ...");
    let reg = Registry::start()?;
    let layout = image::build_layout(&tmp.path().join("img"), &[lazy_image(mib)?])?;
    skopeo::push_layout(
        &layout.dir,
        "lazy",
        &reg.docker_ref("lazy:1"),
        Format::OciExact,
        false,
    )?;
    let size: u64 = layout
        .image("lazy")
        .context("image in layout")?
        .referenced_blobs()
        .iter()
        .map(|b| b.size)
        .sum();
    let _ = std::fs::remove_dir_all(&layout.dir);

    let lan = Lan::new(1)?;
    let host = &lan.hosts[0];
    host.shape(mbit)?;
    let proxy = Proxy::start_with(
        &lan.gateway,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
        &[],
    )?;
    eprintln!("warming the proxy ...");
    let warm = tmp.path().join("warm");
    skopeo::copy(
        &format!("docker://{}/{IMAGE}", proxy.addr()),
        &format!("oci:{}:lazy", path_str(&warm)?),
        &["--src-tls-verify=false"],
    )
    .context("warming the proxy")?;
    let _ = std::fs::remove_dir_all(&warm);

    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let spec_dir = tmp.path().join("spec");
    std::fs::create_dir_all(&spec_dir)?;
    run_bounded(
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

    let mut lazy: Option<LazyRun> = None;
    for i in 0..LAZY_RUNS {
        eprintln!("lazy start {} of {LAZY_RUNS} ...", i + 1);
        let r = bench.lazy()?;
        eprintln!(
            "  {:.3}s, {:.2} MB fetched",
            r.took.as_secs_f64(),
            r.fetched as f64 / 1e6
        );
        if lazy.as_ref().is_none_or(|b| r.took < b.took) {
            lazy = Some(r);
        }
    }
    let lazy = lazy.context("no lazy run")?;
    let mut full: Option<[Duration; 4]> = None;
    for i in 0..BASELINE_RUNS {
        eprintln!("full pull + unpack {} of {BASELINE_RUNS} ...", i + 1);
        let r = bench.full_pull(&policy)?;
        eprintln!("  {:.3}s", r[0].as_secs_f64());
        if full.is_none_or(|b| r[0] < b[0]) {
            full = Some(r);
        }
    }
    let full = full.context("no baseline run")?;

    println!(
        "image {:.1} MB compressed ({mib} MiB of content, 5 gzip layers), host link shaped to {mbit} Mbit/s",
        size as f64 / 1e6
    );
    println!(
        "lazy: imgctl mount + overlayfs + runc until the first line (best of {LAZY_RUNS}, fresh agent cache each)"
    );
    println!(
        "baseline (the skopeo way): skopeo copy docker://PROXY oci:DIR through the same link + umoci unpack + runc until the first line (best of {BASELINE_RUNS})"
    );
    report("lazy start", lazy.took.as_secs_f64(), "s");
    report(
        "full pull + unpack + start (baseline)",
        full[0].as_secs_f64(),
        "s",
    );
    report("  of which skopeo copy", full[1].as_secs_f64(), "s");
    report("  of which umoci unpack", full[2].as_secs_f64(), "s");
    report(
        "  of which runc until the first line",
        full[3].as_secs_f64(),
        "s",
    );
    report(
        "ratio lazy / baseline (target <= 0.10)",
        lazy.took.as_secs_f64() / full[0].as_secs_f64(),
        "x",
    );
    report(
        "chunk bytes fetched by the lazy start",
        lazy.fetched as f64 / 1e6,
        "MB",
    );
    report(
        "fetched / compressed image size (target <= 0.10)",
        lazy.fetched as f64 / size as f64,
        "x",
    );
    report(
        "  all bytes on the host's link / image size",
        lazy.wire as f64 / size as f64,
        "x",
    );
    if learned_prefetch_available() {
        println!(
            "learned prefetch: the agent has it (imgctl prefetch --startup), not measured by this bench yet"
        );
    } else {
        println!("learned prefetch: not available yet");
    }
    drop(bench);
    drop(proxy);
    drop(lan);
    drop(reg);
    Ok(())
}
