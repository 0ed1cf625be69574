//! Mount read benchmark: reads through imgd FUSE mounts against the same image unpacked
//! on local disk with `umoci unpack`, measured in this run.
//!
//! The image has a gzip layer of large compressible files (256 MiB in all) and a gzip
//! layer of 10,000 files of 1 KiB (100 directories of 100). The agent runs in the root
//! namespace with the swarm disabled; a first mount is warmed (every file read once,
//! untimed), so every chunk is in the agent's chunk cache on disk and every span of the
//! large files in its inflated cache on disk. Before every measured run the kernel's
//! page, dentry and inode caches are dropped (`echo 3 > /proc/sys/vm/drop_caches`), so
//! reads of the local copy, of the chunk files and of the inflated files all come from
//! the disk. Each measurement is taken on the local copy and on:
//! - the **warm mount** (the one read before): its image view (in the mount process's
//!   memory) is warm; file bytes come from the inflated cache on disk;
//! - a **fresh mount**, mounted just before the run (and unmounted after): the view is
//!   built from the layer indexes at mount time; file bytes come from the inflated cache
//!   on disk;
//! - for the sequential read, also a **fresh mount with the inflated cache removed**
//!   (after the other runs, once no mount holds it): only the chunk cache is warm, so
//!   every span is inflated again (in parallel: the FUSE worker threads and readahead).
//!
//! Measured: sequential read of the large files (1 MiB buffer), mount MB/s / local MB/s;
//! a metadata walk of the 10,000 files, `find DIR -type f | wc -l` and `find DIR -printf
//! '%s %m %u\n' > /dev/null`, mount time / local time. The spans the mounts inflated
//! while measuring are counted and printed (none, but for the inflated-cache-removed
//! runs).
//!
//! Runs alternate between warm mount, fresh mount and local; the best of 3 of each is
//! reported.
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

/// Best (least) times of one measurement: warm mount, fresh mount, local disk.
struct Best {
    warm: Duration,
    fresh: Duration,
    local: Duration,
    /// Spans the fresh mounts inflated.
    fresh_spans: u64,
}

/// Where the measurements run: the warm mount's root, the agent that mounts the fresh
/// ones and where, and the local copy's root.
struct Sides<'a> {
    warm: &'a Path,
    agent: &'a Agent,
    fresh: &'a Path,
    local: &'a Path,
}

/// Best time of each side over `RUNS` alternating runs of `f` on `sub` of each root,
/// kernel caches dropped before each; a new mount for every fresh run.
fn best_of_sides(
    sides: &Sides<'_>,
    sub: &str,
    mut f: impl FnMut(&Path) -> Result<Duration>,
) -> Result<Best> {
    let mut best = Best {
        warm: Duration::MAX,
        fresh: Duration::MAX,
        local: Duration::MAX,
        fresh_spans: 0,
    };
    for _ in 0..RUNS {
        drop_caches()?;
        best.warm = best.warm.min(f(&sides.warm.join(sub))?);
        let fresh = ImgdMount::mount(sides.agent, IMAGE, sides.fresh)?;
        drop_caches()?;
        best.fresh = best.fresh.min(f(&fresh.dir().join(sub))?);
        best.fresh_spans += spans_inflated(sides.agent, sides.fresh)?;
        drop(fresh);
        drop_caches()?;
        best.local = best.local.min(f(&sides.local.join(sub))?);
    }
    Ok(best)
}

/// The spans the mount at `dir` inflated so far (0 if it is not listed).
fn spans_inflated(agent: &Agent, dir: &Path) -> Result<u64> {
    let s = agent.status()?;
    let want = dir.to_str().context("mount dir")?;
    Ok(s["mounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["dir"] == want))
        .and_then(|m| m["spans_inflated"].as_u64())
        .unwrap_or(0))
}

/// Best sequential read time of `RUNS` fresh mounts at `dir`, each made after the
/// agent's inflated cache was removed (no mount may hold it), and the spans inflated in
/// all.
fn cold_inflate_reads(agent: &Agent, dir: &Path, big_bytes: u64) -> Result<(Duration, u64)> {
    let root = agent.data_dir.join("data/cache/inflated");
    let (mut best, mut spans) = (Duration::MAX, 0);
    for _ in 0..RUNS {
        if root.exists() {
            std::fs::remove_dir_all(&root).context("removing the inflated cache")?;
        }
        let mount = ImgdMount::mount(agent, IMAGE, dir)?;
        drop_caches()?;
        let (n, took) = sequential_read(mount.dir())?;
        if n != big_bytes {
            bail!("read {n} bytes of the large files under {}", dir.display());
        }
        spans += spans_inflated(agent, dir)?;
        best = best.min(took);
        drop(mount);
    }
    Ok((best, spans))
}

/// Prints the three times of a measurement (in ms) and the mounts' ratios to local.
fn report_times(what: &str, b: &Best) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report(&format!("{what}, warm mount"), ms(b.warm), "ms");
    report(&format!("{what}, fresh mount"), ms(b.fresh), "ms");
    report(&format!("{what}, local disk"), ms(b.local), "ms");
    let ratio = |d: Duration| d.as_secs_f64() / b.local.as_secs_f64();
    report(
        "  ratio warm mount / local time (target <= 2.0)",
        ratio(b.warm),
        "x",
    );
    report("  ratio fresh mount / local time", ratio(b.fresh), "x");
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
    let from_proxy_before = agent.status()?["bytes_from_proxy"].as_u64().unwrap_or(0);
    let fresh_dir = tmp.path().join("mnt-fresh");
    std::fs::create_dir_all(&fresh_dir)?;
    let warm_spans_before = spans_inflated(&agent, &mnt)?;
    let sides = Sides {
        warm: &mnt,
        agent: &agent,
        fresh: &fresh_dir,
        local: &local,
    };

    eprintln!("sequential reads ...");
    let seq = best_of_sides(&sides, "", |root| {
        let (n, took) = sequential_read(root)?;
        if n != big_bytes {
            bail!("read {n} bytes of the large files under {}", root.display());
        }
        Ok(took)
    })?;
    eprintln!("metadata walks ...");
    let find = best_of_sides(&sides, "small", |dir| {
        let (n, took) = find_files(dir)?;
        if n != small_files {
            bail!("find counted {n} files under {}", dir.display());
        }
        Ok(took)
    })?;
    let stat = best_of_sides(&sides, "small", find_stat)?;

    let warm_spans = spans_inflated(&agent, &mnt)? - warm_spans_before;
    let s = agent.status()?;
    let m = &s["mounts"][0];
    if m["eio"].as_u64().unwrap_or(0) != 0 {
        bail!("the mount answered EIO: {m}");
    }
    let inflated_bytes = s["cache_inflated_bytes"].as_u64().unwrap_or(0);
    drop(mount);
    eprintln!("sequential reads with the inflated cache removed ...");
    let (cold, cold_spans) = cold_inflate_reads(&agent, &fresh_dir, big_bytes)?;
    let s = agent.status()?;
    let fetched_during = s["bytes_from_proxy"].as_u64().unwrap_or(0) - from_proxy_before;
    drop(agent);

    let mb = |d: Duration| mb_per_s(big_bytes, d);
    println!(
        "image {:.1} MB compressed: {BIG_FILES} files of {BIG_FILE_MIB} MiB (gzip layer), {small_files} files of {SMALL_FILE} bytes in {DIRS} dirs (gzip layer)",
        size as f64 / 1e6
    );
    println!(
        "imgd FUSE mounts (root namespace, no swarm, every chunk in the agent's chunk cache on disk) vs umoci unpack on local disk; page, dentry and inode caches dropped before every run, best of {RUNS}"
    );
    println!(
        "  warm mount: image view in memory, file bytes from the inflated cache on disk ({:.1} MB); fresh mount: mounted just before the run (view built then), file bytes from the inflated cache on disk; inflated cache removed: fresh mounts with only the chunk cache warm",
        inflated_bytes as f64 / 1e6
    );
    report("sequential read, warm mount", mb(seq.warm), "MB/s");
    report("sequential read, fresh mount", mb(seq.fresh), "MB/s");
    report(
        "sequential read, fresh mount, inflated cache removed",
        mb(cold),
        "MB/s",
    );
    report("sequential read, local disk", mb(seq.local), "MB/s");
    report(
        "  ratio warm mount / local (target >= 0.7)",
        mb(seq.warm) / mb(seq.local),
        "x",
    );
    report(
        "  ratio fresh mount / local (target >= 0.7)",
        mb(seq.fresh) / mb(seq.local),
        "x",
    );
    report(
        "  ratio fresh mount, inflated cache removed / local",
        mb(cold) / mb(seq.local),
        "x",
    );
    println!(
        "spans inflated while measuring: warm mount {warm_spans}, fresh mounts {}, fresh mounts with the inflated cache removed {cold_spans} ({RUNS} runs)",
        seq.fresh_spans + find.fresh_spans + stat.fresh_spans
    );
    report_times(
        &format!("find -type f | wc -l ({small_files} files)"),
        &find,
    );
    report_times("find -printf '%s %m %u' (stat of each)", &stat);
    report(
        "chunk bytes fetched from the proxy while measuring",
        fetched_during as f64 / 1e6,
        "MB",
    );
    drop(proxy);
    drop(reg);
    Ok(())
}
