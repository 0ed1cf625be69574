//! `imgd-demo`: imgd's main job on embedded defaults, with no service to set up: a
//! container started by containerd from a lazy imgd snapshot, against a full pull of the
//! same image from the same proxy.
//!
//! It builds an image on the spot (a busybox base, 96 MiB of application data the command
//! does not read, and a small config file it does), pushes it to a private
//! `docker-registry`, and puts `imgd-proxy` in front of it. Two hosts (network namespaces
//! on a bridge, links shaped to 1 Gbit/s) each run an `imgd` agent; host A has the image
//! cached already (`imgctl prefetch`). On host B a private containerd with imgd as its
//! snapshotter pulls the image with `ctr-remote images rpull` (no layer downloaded) and
//! runs it: the container's reads are fetched lazily, as verified 64 KiB pieces from the
//! proxy (pieces do not come from peers yet; whole chunks would come from host A). Then a fresh containerd on host B does the ordinary thing, `ctr images pull` and
//! `ctr run` with its overlayfs snapshotter. Both times and the bytes are printed.
//!
//! Needs root (namespaces, FUSE, containerd, runc): the test suite's packages
//! (`.ci/setup`). Run: `cargo build --workspace --bins && cargo run -p imgd-tests --bin imgd-demo`

use anyhow::{bail, Context, Result};
use imgd_tests::containerd::{Containerd, ContainerdOptions, NAMESPACE};
use imgd_tests::daemons::{Agent, Proxy};
use imgd_tests::image::{presets, FileSpec, ImageSpec, LayerSpec};
use imgd_tests::netns::Lan;
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const STEP: Duration = Duration::from_secs(300);
const COMMAND: &str = "cat /etc/hello.txt /app/config.txt";

fn demo_image() -> Result<ImageSpec> {
    let base = presets::busybox_base("hello from a container started lazily by imgd")?;
    let mut data = vec![FileSpec::dir("app"), FileSpec::dir("app/lib")];
    for i in 0..6 {
        data.push(FileSpec::random(
            format!("app/lib/part{i}.bin"),
            100 + i,
            16 * MIB,
        ));
    }
    let top = LayerSpec::gzip(vec![
        FileSpec::dir("app"),
        FileSpec::file("app/config.txt", "config: read from the top layer\n"),
    ]);
    Ok(ImageSpec::new(
        "demo",
        vec![base, LayerSpec::gzip(data), top],
    ))
}

/// Runs `cmd`, returning the time to its first stdout line and all its output.
fn time_to_first_line(cmd: &mut Command) -> Result<(Duration, String)> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ctr")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let took = started.elapsed();
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = child.wait()?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        bail!("{cmd:?} failed: {err}");
    }
    Ok((
        took,
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join("\n"),
    ))
}

fn ctr(ctrd: &Containerd, program: &str) -> Command {
    let mut c = Command::new(program);
    c.arg("--address")
        .arg(ctrd.socket())
        .args(["--namespace", NAMESPACE]);
    c
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("imgd-demo needs root (network namespaces, FUSE, containerd)");
    }
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start()?;
    let (image, size) = skopeo::push_image(&reg, &tmp.path().join("img"), demo_image()?, "demo:1")?;
    let layers: u64 = image.layers.iter().map(|l| l.blob.size).sum();
    println!(
        "== built and pushed local/demo:1: {} layers, {}",
        image.layers.len(),
        mb(size)
    );

    let lan = Lan::new(2)?;
    for h in &lan.hosts {
        h.shape(1000)?;
    }
    let proxy = Proxy::start_on_lan(
        &lan,
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
    )?;
    println!(
        "== imgd-proxy on {} in front of the registry; hosts A and B on 1 Gbit/s links",
        proxy.addr()
    );

    let a = Agent::start_on_host(&lan.hosts[0], &proxy, tmp.path(), "")?;
    let (ok, out, err) = a.imgctl(&["prefetch", "local/demo:1"])?;
    if !ok {
        bail!("prefetch on host A: {out}{err}");
    }
    println!("== host A: imgctl prefetch local/demo:1 (A now holds every chunk)");
    let b = Agent::start_on_host(&lan.hosts[1], &proxy, tmp.path(), "")?;
    b.wait_for_peers(1, Duration::from_secs(30))?;

    let reference = format!("{}/local/demo:1", proxy.addr());
    let lazy = Containerd::start_with(&ContainerdOptions {
        imgd_snapshotter: Some(b.data_dir.join("snapshotter.sock")),
        host: Some(lan.hosts[1].clone()),
        ..Default::default()
    })?;
    println!("\n== host B, containerd with imgd as its snapshotter:");
    println!("   ctr-remote images rpull --snapshotter imgd {reference}; ctr run --snapshotter imgd ... {COMMAND:?}");
    let started = Instant::now();
    lazy.rpull(&reference, "imgd", STEP)?;
    let pulled = started.elapsed();
    let (first, output) = time_to_first_line(ctr(&lazy, "ctr").args([
        "run",
        "--rm",
        "--snapshotter",
        "imgd",
        &reference,
        "lazy",
        "sh",
        "-c",
        COMMAND,
    ]))?;
    let lazy_took = pulled + first;
    for line in output.lines() {
        println!("   | {line}");
    }
    let status = b.status()?;
    let (peers, from_proxy) = (
        status["bytes_from_peers"].as_u64().unwrap_or(0),
        status["bytes_from_proxy"].as_u64().unwrap_or(0)
            + status["bytes_from_proxy_pieces"].as_u64().unwrap_or(0),
    );
    let content = lazy.run_ctr(&["content", "ls", "-q"], STEP)?;
    let downloaded = image
        .layers
        .iter()
        .filter(|l| {
            content
                .lines()
                .any(|c| c.trim() == l.blob.digest.to_string())
        })
        .count();
    drop(lazy);

    let full = Containerd::start_with(&ContainerdOptions {
        host: Some(lan.hosts[1].clone()),
        ..Default::default()
    })?;
    println!("\n== host B, a fresh containerd with its overlayfs snapshotter (a full pull):");
    println!("   ctr images pull {reference}; ctr run ... {COMMAND:?}");
    let started = Instant::now();
    full.run_ctr(&["images", "pull", "--plain-http", &reference], STEP)?;
    let pulled = started.elapsed();
    let (first, _) = time_to_first_line(
        ctr(&full, "ctr").args(["run", "--rm", &reference, "full", "sh", "-c", COMMAND]),
    )?;
    let full_took = pulled + first;
    drop(full);

    println!("\n== pull + start to the container's first line");
    println!(
        "   full pull (overlayfs)      {:>7.2} s",
        full_took.as_secs_f64()
    );
    println!(
        "   lazy (imgd snapshotter)    {:>7.2} s   {:.1}x faster",
        lazy_took.as_secs_f64(),
        full_took.as_secs_f64() / lazy_took.as_secs_f64()
    );
    println!(
        "   layers containerd downloaded: {downloaded} of {} (imgd served them lazily)",
        image.layers.len()
    );
    println!(
        "   bytes host B fetched: {} of the image's {} of layers: {} from host A (a peer), {} from the proxy (whole chunks and pieces)",
        mb(peers + from_proxy),
        mb(layers),
        mb(peers),
        mb(from_proxy)
    );
    Ok(())
}
