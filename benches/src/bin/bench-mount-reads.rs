//! Mount read benchmark: reads through a warm imgd FUSE mount against the same image
//! unpacked on local disk with `umoci unpack`, measured in this run.
//!
//! The image has a gzip layer of large compressible files (256 MiB in all) and a gzip
//! layer of 10,000 files of 1 KiB (100 directories of 100). The agent runs in the root
//! namespace with the swarm disabled; the mount is warmed first (every file read once,
//! untimed) so every chunk is in the agent's cache, then, after dropping the page cache
//! (`echo 3 > /proc/sys/vm/drop_caches`) before every measured run:
//! - sequential read of the large files (1 MiB buffer), mount MB/s / local MB/s;
//! - metadata walk of the 10,000 files: `find DIR -type f | wc -l` and
//!   `find DIR -printf '%s %m %u\n' > /dev/null`, mount time / local time.
//!
//! Runs alternate between mount and local; the best of 3 of each is reported.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p imgd-benches --bin bench-mount-reads`
//! Needs root (FUSE, drop_caches, umoci), docker-registry and skopeo.

use anyhow::{bail, Context, Result};
use imgd_benches::{mb_per_s, report};
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::{run_bounded, ImgdMount};
use imgd_tests::image::{self, FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use imgd_tests::umoci;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BIG_FILES: u64 = 4;
const BIG_FILE_MIB: u64 = 64;
const DIRS: usize = 100;
const FILES_PER_DIR: usize = 100;
const SMALL_FILE: u64 = 1024;
const RUNS: usize = 3;
/// Bound of any one command.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const IMAGE: &str = "local/reads:1";

fn reads_image() -> ImageSpec {
    let mut big = vec![FileSpec::dir("big")];
    for i in 0..BIG_FILES {
        big.push(FileSpec::compressible(
            format!("big/file{i}.bin"),
            7000 + i,
            BIG_FILE_MIB * MIB,
        ));
    }
    let mut small = vec![FileSpec::dir("small")];
    for d in 0..DIRS {
        small.push(FileSpec::dir(format!("small/d{d:03}")));
        for f in 0..FILES_PER_DIR {
            small.push(FileSpec::compressible(
                format!("small/d{d:03}/f{f:03}.txt"),
                (d * FILES_PER_DIR + f) as u64,
                SMALL_FILE,
            ));
        }
    }
    ImageSpec::new("reads", vec![LayerSpec::gzip(big), LayerSpec::gzip(small)])
}

/// Writes dirty pages back and drops the page, dentry and inode caches.
fn drop_caches() -> Result<()> {
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// Reads every regular file under `dir` once (to warm a mount); returns the bytes read.
fn read_tree(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; MIB as usize];
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            total += read_tree(&e.path())?;
        } else if ft.is_file() {
            total += read_file(&e.path(), &mut buf)?;
        }
    }
    Ok(total)
}

fn read_file(path: &Path, buf: &mut [u8]) -> Result<u64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut n = 0;
    loop {
        match f.read(buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// The large files read one after the other with a 1 MiB buffer: bytes and time.
fn sequential_read(root: &Path) -> Result<(u64, Duration)> {
    let mut buf = vec![0u8; MIB as usize];
    let started = Instant::now();
    let mut total = 0;
    for i in 0..BIG_FILES {
        total += read_file(&root.join(format!("big/file{i}.bin")), &mut buf)?;
    }
    Ok((total, started.elapsed()))
}

/// `find DIR -type f | wc -l`: the count and the time.
fn find_files(dir: &Path) -> Result<(usize, Duration)> {
    let (out, took) = run_bounded(
        Command::new("find").arg(dir).args(["-type", "f"]),
        "find -type f",
        true,
        STEP_TIMEOUT,
    )?;
    Ok((out.lines().count(), took))
}

/// `find DIR -printf '%s %m %u\n' > /dev/null`: a stat of every entry.
fn find_stat(dir: &Path) -> Result<Duration> {
    let (_, took) = run_bounded(
        Command::new("find")
            .arg(dir)
            .args(["-printf", "%s %m %u\n"]),
        "find -printf",
        false,
        STEP_TIMEOUT,
    )?;
    Ok(took)
}

/// Best (least) time of each side over `RUNS` alternating runs, caches dropped before each.
fn best_pair(
    mount: &Path,
    local: &Path,
    mut f: impl FnMut(&Path) -> Result<Duration>,
) -> Result<(Duration, Duration)> {
    let (mut m, mut l) = (Duration::MAX, Duration::MAX);
    for _ in 0..RUNS {
        drop_caches()?;
        m = m.min(f(mount)?);
        drop_caches()?;
        l = l.min(f(local)?);
    }
    Ok((m, l))
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-mount-reads needs root (FUSE, drop_caches, umoci)");
    }
    let tmp = tempfile::tempdir()?;
    let big_bytes = BIG_FILES * BIG_FILE_MIB * MIB;
    let small_files = DIRS * FILES_PER_DIR;
    eprintln!(
        "building and pushing the image ({} MiB in {BIG_FILES} files, {small_files} files of {SMALL_FILE} bytes) ...",
        big_bytes / MIB
    );
    let reg = Registry::start()?;
    let layout = image::build_layout(&tmp.path().join("img"), &[reads_image()])?;
    skopeo::push_layout(
        &layout.dir,
        "reads",
        &reg.docker_ref("reads:1"),
        Format::OciExact,
        false,
    )?;
    let size: u64 = layout
        .image("reads")
        .context("image in layout")?
        .referenced_blobs()
        .iter()
        .map(|b| b.size)
        .sum();
    eprintln!("unpacking it locally with umoci ...");
    let local = umoci::unpack(&layout.dir, "reads", &tmp.path().join("local"))?;

    let proxy = Proxy::start_with(
        "127.0.0.1",
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
        &[],
    )?;
    let agent = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent")))?;
    let mnt = tmp.path().join("mnt");
    let mount = ImgdMount::mount(&agent, IMAGE, &mnt)?;
    eprintln!("warming the mount (every file read once) ...");
    let t = Instant::now();
    let warmed = read_tree(&mnt)?;
    eprintln!(
        "  {:.1} MB in {:.1}s (first reads, chunks from the proxy)",
        warmed as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let fetched_before = agent.status()?["mounts"][0]["fetched_bytes"]
        .as_u64()
        .unwrap_or(0);

    eprintln!("sequential reads ...");
    let mut seq_bytes = 0;
    let (seq_m, seq_l) = best_pair(&mnt, &local, |root| {
        let (n, took) = sequential_read(root)?;
        if n != big_bytes {
            bail!("read {n} bytes of the large files under {}", root.display());
        }
        seq_bytes = n;
        Ok(took)
    })?;
    eprintln!("metadata walks ...");
    let (find_m, find_l) = best_pair(&mnt.join("small"), &local.join("small"), |dir| {
        let (n, took) = find_files(dir)?;
        if n != small_files {
            bail!("find counted {n} files under {}", dir.display());
        }
        Ok(took)
    })?;
    let (stat_m, stat_l) = best_pair(&mnt.join("small"), &local.join("small"), find_stat)?;

    let s = agent.status()?;
    let m = &s["mounts"][0];
    let fetched_during = m["fetched_bytes"].as_u64().unwrap_or(0) - fetched_before;
    if m["eio"].as_u64().unwrap_or(0) != 0 {
        bail!("the mount answered EIO: {m}");
    }
    drop(mount);
    drop(agent);

    let (mb_m, mb_l) = (mb_per_s(seq_bytes, seq_m), mb_per_s(seq_bytes, seq_l));
    println!(
        "image {:.1} MB compressed: {BIG_FILES} files of {BIG_FILE_MIB} MiB (gzip layer), {small_files} files of {SMALL_FILE} bytes in {DIRS} dirs (gzip layer)",
        size as f64 / 1e6
    );
    println!(
        "warm imgd FUSE mount (every chunk cached, root namespace, no swarm) vs umoci unpack on local disk; page cache dropped before every run, best of {RUNS}"
    );
    report("sequential read, mount", mb_m, "MB/s");
    report("sequential read, local disk", mb_l, "MB/s");
    report("ratio mount / local (target >= 0.5)", mb_m / mb_l, "x");
    report(
        &format!("find -type f | wc -l ({small_files} files), mount"),
        find_m.as_secs_f64() * 1e3,
        "ms",
    );
    report(
        "find -type f | wc -l, local disk",
        find_l.as_secs_f64() * 1e3,
        "ms",
    );
    report(
        "ratio mount / local time (target <= 2.0)",
        find_m.as_secs_f64() / find_l.as_secs_f64(),
        "x",
    );
    report(
        "find -printf '%s %m %u' (stat of each), mount",
        stat_m.as_secs_f64() * 1e3,
        "ms",
    );
    report(
        "find -printf '%s %m %u', local disk",
        stat_l.as_secs_f64() * 1e3,
        "ms",
    );
    report(
        "ratio mount / local time (target <= 2.0)",
        stat_m.as_secs_f64() / stat_l.as_secs_f64(),
        "x",
    );
    report(
        "bytes fetched by the mount while measuring",
        fetched_during as f64 / 1e6,
        "MB",
    );
    drop(proxy);
    drop(reg);
    Ok(())
}
