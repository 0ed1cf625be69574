//! The agent's cache on a small disk (a tmpfs): beyond its quota it evicts least recently
//! used chunks but never those of pinned or mounted images; when the disk fills before
//! the quota, a prefetch fails with a clear error, nothing is corrupted, and it completes
//! once there is space again.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::{run_capture, ImgdMount};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The most the cache may exceed its quota by while a test image (one layer and a
/// config, fetched at once) is prefetched: one 4 MiB chunk per blob being fetched.
const PEAK_EXCESS: u64 = 2 * 4 * MIB;

/// A tmpfs mounted at a directory, lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("size={bytes}");
        run_capture(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
                .arg(dir),
            "mount -t tmpfs",
            Duration::from_secs(30),
        )
        .unwrap();
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, bytes: u64) {
        let opts = format!("remount,size={bytes}");
        run_capture(
            Command::new("mount").args(["-o", &opts]).arg(&self.0),
            "mount -o remount",
            Duration::from_secs(30),
        )
        .unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Pushes an image of `mib` MiB of incompressible files, its own (seeded by `seed`, so
/// no chunk is shared between images), as `name:1`; returns its size.
fn push(reg: &Registry, dir: &Path, name: &str, seed: u64, mib: u64) -> u64 {
    let mut files = vec![FileSpec::dir("data")];
    files.extend((0..mib.div_ceil(4)).map(|i| {
        let len = (mib - 4 * i).min(4) * MIB;
        FileSpec::random(format!("data/f{i}"), seed * 1000 + i, len)
    }));
    let spec = ImageSpec::new(name, vec![LayerSpec::gzip(files)]);
    let tag = format!("{name}:1");
    skopeo::push_image(reg, &dir.join(name), spec, &tag)
        .unwrap()
        .1
}

/// An agent whose cache directory is `disk` (already mounted by the caller).
fn agent(dir: &Path, proxy: &Proxy, args: &[&str]) -> Agent {
    Agent::start_with_args(AgentOptions::local(proxy.url(), dir), args).unwrap()
}

/// (cached bytes, total bytes) of `image` from the agent's image list.
fn cached(a: &Agent, image: &str) -> (u64, u64) {
    let out = Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(&a.socket)
        .arg("http://imgd/v1/images")
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let i = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == image)
        .unwrap_or_else(|| panic!("{image} not listed: {list}"));
    (
        i["cached_bytes"].as_u64().unwrap(),
        i["total_bytes"].as_u64().unwrap(),
    )
}

fn used(a: &Agent) -> u64 {
    a.status().unwrap()["cache_used_bytes"].as_u64().unwrap()
}

/// Runs `imgctl prefetch image`, sampling the cache use meanwhile; returns (success,
/// output, highest use seen).
fn prefetch_sampled(a: &Agent, image: &str) -> (bool, String, u64) {
    let mut child = a.spawn_imgctl(&["prefetch", image]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(used(a));
        assert!(Instant::now() < deadline, "prefetch of {image} hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, peak.max(used(a)))
}

/// Reads every regular file under `dir` whole; returns the bytes read.
fn read_tree(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            total += read_tree(&p);
        } else if meta.is_file() {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(bytes.len() as u64, meta.len(), "{}", p.display());
            total += meta.len();
        }
    }
    total
}

/// Evictions counted by the agent so far: (chunks, bytes).
fn evictions(a: &Agent) -> (f64, f64) {
    let m = a.metrics().unwrap();
    (
        m.v("imgd_agent_cache_evictions_total"),
        m.v("imgd_agent_cache_evicted_bytes_total"),
    )
}

fn from_proxy(a: &Agent) -> u64 {
    a.status().unwrap()["bytes_from_proxy"].as_u64().unwrap()
}

#[test]
fn beyond_the_quota_lru_eviction_spares_pinned_and_mounted_images() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let pinned = push(&reg, tmp.path(), "pinned", 1, 6);
    let mounted = push(&reg, tmp.path(), "mounted", 2, 8);
    let big = [
        push(&reg, tmp.path(), "big1", 3, 24),
        push(&reg, tmp.path(), "big2", 4, 24),
    ];
    let mut proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let quota = pinned + mounted + 12 * MIB;
    // Each big image alone overflows the quota by more than the allowed peak excess, so
    // a cache that did not evict would be caught at the first one.
    assert!(
        big[0] > quota - pinned - mounted + PEAK_EXCESS,
        "{big:?} vs quota {quota}"
    );
    let data = tmp.path().join("agent");
    let _disk = Tmpfs::mount(&data.join("data"), 64 * MIB);
    let a = agent(&data, &proxy, &["--cache-quota", &quota.to_string()]);

    let (ok, out, _) = prefetch_sampled(&a, "local/pinned:1");
    assert!(ok, "{out}");
    let (ok, out, err) = a.imgctl(&["pin", "local/pinned:1"]).unwrap();
    assert!(ok, "{out}{err}");
    let (ok, out, _) = prefetch_sampled(&a, "local/mounted:1");
    assert!(ok, "{out}");
    let mount = ImgdMount::mount(&a, "local/mounted:1", &tmp.path().join("mnt")).unwrap();
    assert_eq!(evictions(&a), (0.0, 0.0), "nothing evicted below the quota");

    for (i, size) in big.iter().enumerate() {
        let image = format!("local/big{}:1", i + 1);
        let (used_before, proxy_before, evicted_before) = (used(&a), from_proxy(&a), evictions(&a));
        let (ok, out, sampled) = prefetch_sampled(&a, &image);
        let peak = a.status().unwrap()["cache_peak_used_bytes"]
            .as_u64()
            .unwrap();
        let evicted = evictions(&a);
        let (chunks, bytes) = (evicted.0 - evicted_before.0, evicted.1 - evicted_before.1);
        println!(
            "{image} ({size} bytes) with quota {quota}: agent's peak use {peak} (sampled {sampled}), after {}, evicted {chunks} chunks of {bytes} bytes",
            used(&a)
        );
        // The agent's high-water mark: eviction runs inside every put, so the cache is
        // above its quota by at most one chunk per blob being fetched.
        assert!(
            peak <= quota + PEAK_EXCESS,
            "peak {peak} vs quota {quota} + {PEAK_EXCESS}"
        );
        assert!(ok, "{out}\n{}", a.log());
        assert!(used(&a) <= quota, "{} above quota {quota}", used(&a));
        // The prefetch itself evicted, exactly what it stored beyond what stayed.
        assert!(chunks > 0.0, "{image}: no eviction during the prefetch");
        let stored = from_proxy(&a) - proxy_before;
        assert_eq!(
            bytes as u64,
            used_before + stored - used(&a),
            "evicted bytes = used before + stored - used after"
        );
        let (got, total) = cached(&a, &image);
        assert!(got < total, "{image} only partly fits: {got} of {total}");
    }
    let (got, total) = cached(&a, "local/pinned:1");
    assert_eq!(got, total, "the pinned image is whole");
    // The mounted image's layers are protected (its small config blob is not).
    let (got, total) = cached(&a, "local/mounted:1");
    assert!(
        got + 64 * 1024 >= total,
        "the mounted image: {got} of {total}"
    );
    a.verify_clean().unwrap();

    // Without the proxy, and without the page cache, both images read whole: the pinned
    // one mounted only now, when it can come from nowhere but the cache.
    let pinned_mount =
        ImgdMount::mount(&a, "local/pinned:1", &tmp.path().join("mnt-pinned")).unwrap();
    proxy.kill().unwrap();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let read = read_tree(mount.dir());
    assert_eq!(read, 8 * MIB, "read {read} bytes of the mounted image");
    let read = read_tree(pinned_mount.dir());
    assert_eq!(read, 6 * MIB, "read {read} bytes of the pinned image");
    let s = a.status().unwrap();
    for m in s["mounts"].as_array().unwrap() {
        assert_eq!(m["eio"].as_u64(), Some(0), "{m}");
    }
    drop(pinned_mount);
    drop(mount);
    a.verify_clean().unwrap();
}

/// Bytes an unprivileged writer can still allocate on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    v[0] * v[1]
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            _ => 1,
        })
        .sum()
}

#[test]
fn a_full_disk_fails_the_prefetch_clearly_corrupts_nothing_and_recovers_with_space() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let first = push(&reg, tmp.path(), "first", 5, 24);
    let second = push(&reg, tmp.path(), "second", 6, 24);
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let data = tmp.path().join("agent");
    // Room for the first image and half the second; the quota (4 GiB) is far away.
    let size = first + second / 2 + 8 * MIB;
    let disk = Tmpfs::mount(&data.join("data"), size);
    let a = agent(&data, &proxy, &[]);

    let (ok, out, _) = prefetch_sampled(&a, "local/first:1");
    assert!(ok, "{out}\n{}", a.log());
    let (ok, out, _) = prefetch_sampled(&a, "local/second:1");
    println!("second prefetch on a full disk: {out}");
    assert!(!ok, "the disk is full: {out}");
    assert!(out.contains("no space left on the cache device"), "{out}");
    a.verify_clean().unwrap();
    let staged = count_files(&data.join("data/cache/tmp"));
    assert_eq!(staged, 0, "no staged chunk files left behind");
    let (got, total) = cached(&a, "local/second:1");
    assert!(got < total, "{got} of {total}");

    // Another process takes the last byte: now even metadata writes fail.
    let filler = data.join("data/filler");
    let dd = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    let dd_err = String::from_utf8_lossy(&dd.stderr);
    assert!(
        !dd.status.success() && dd_err.contains("No space left on device"),
        "dd stops only at a full disk: {:?} {dd_err}",
        dd.status
    );
    assert!(std::fs::metadata(&filler).unwrap().len() > 0, "dd wrote");
    let avail = free_bytes(&data.join("data"));
    assert!(avail < 64 * 1024, "{avail} bytes still free");
    let (ok, out, _) = prefetch_sampled(&a, "local/second:1");
    println!("with the disk filled by another process: {out}");
    assert!(!ok && out.contains("no space left"), "{out}");
    a.verify_clean().unwrap();

    // Space again: the same prefetch completes, on the same running agent.
    std::fs::remove_file(&filler).unwrap();
    disk.resize(size + second + 32 * MIB);
    let (ok, out, _) = prefetch_sampled(&a, "local/second:1");
    assert!(ok, "after freeing space: {out}\n{}", a.log());
    let (got, total) = cached(&a, "local/second:1");
    assert_eq!(got, total);
    assert_eq!(cached(&a, "local/first:1").0, first);
    a.verify_clean().unwrap();
    drop(a);
    drop(disk);
}
