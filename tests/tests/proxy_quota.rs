//! imgd-proxy under a storage quota smaller than the images pulled through it: the files
//! in storage never outgrow the quota (sampled all along), least recently used images
//! are evicted and pull again correctly, a pinned image stays whole, `/metrics` shows use,
//! quota and evictions, and a `kill -9` in the middle of an eviction leaves storage that
//! verifies clean.

use imgd_core::Digest;
use imgd_tests::daemons::{workspace_bin, Proxy};
use imgd_tests::fault_relay::FaultRelay;
use imgd_tests::image::{FileSpec, ImageInfo, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const QUOTA: u64 = 40 * MIB;

/// Bytes of every file under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Samples the bytes of chunk, index and staged files every few ms; keeps the maximum.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(storage: PathBuf) -> Sampler {
        let (stop, max, samples) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, m, n) = (stop.clone(), max.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let used: u64 = ["chunks", "indexes", "tmp"]
                    .iter()
                    .map(|k| bytes_under(&storage.join(k)))
                    .sum();
                m.fetch_max(used, Ordering::Relaxed);
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sampler {
            stop,
            max,
            samples,
            thread: Some(thread),
        }
    }

    /// (maximum seen, number of samples).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.max.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

/// An image of one uncompressed layer of `mib` MiB of random data (so `mib / 4` chunks).
fn push(reg: &Registry, dir: &Path, name: &str, seed: u64, mib: u64) -> ImageInfo {
    let spec = ImageSpec::new(
        name,
        vec![LayerSpec::uncompressed(vec![
            FileSpec::dir("data"),
            FileSpec::random("data/blob.bin", seed, mib * MIB),
        ])],
    );
    skopeo::push_image(reg, &dir.join(name), spec, &format!("{name}:1"))
        .unwrap()
        .0
}

/// Pulls `name:1` through the proxy with skopeo (which checks every digest) and checks
/// the layer's bytes once more.
fn pull(proxy: &Proxy, dir: &Path, img: &ImageInfo) {
    let out = dir.join(format!("out-{}", img.name));
    let _ = std::fs::remove_dir_all(&out);
    skopeo::pull_to_dir(&format!("{}/local/{}:1", proxy.addr(), img.name), &out)
        .unwrap_or_else(|e| panic!("pulling {}: {e:#}\n{}", img.name, proxy.log()));
    let layer = img.layers[0].blob.digest;
    let bytes = std::fs::read(out.join(layer.hex())).unwrap();
    assert_eq!(Digest::of(&bytes), layer, "{}", img.name);
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

fn verify(proxy: &Proxy) -> serde_json::Value {
    let r = proxy.get("/imgd/v1/verify", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json().unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    report
}

fn is_stored(proxy: &Proxy, d: &Digest) -> bool {
    proxy
        .get(&format!("/imgd/v1/blobs/{d}"), &[])
        .unwrap()
        .status
        == 200
}

#[test]
fn a_quota_below_the_images_pulled_holds_evicts_lru_keeps_pins_and_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    // Four images of 12 MiB (3 chunks each): 48 MiB against a quota of 40 MiB.
    let pinned = push(&reg, tmp.path(), "pinned", 1, 12);
    let imgs: Vec<ImageInfo> = (0..3)
        .map(|i| push(&reg, tmp.path(), &format!("app{i}"), 10 + i, 12))
        .collect();
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let config = format!(
        "storage_quota_bytes = {QUOTA}\n[[upstream]]\nname = \"local\"\nurl = \"{}\"\n",
        relay.url()
    );
    let mut proxy = Proxy::start_with_config(tmp.path(), &config).unwrap();
    let storage = proxy.storage().to_path_buf();
    let sampler = Sampler::start(storage.clone());

    // Pinned through the command line: fetched whole at once.
    let out = Command::new(workspace_bin("imgd-proxy").unwrap())
        .args(["pin", "local/pinned:1", "--url", &proxy.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
    let pin: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pinned_blobs = [pinned.config.digest, pinned.layers[0].blob.digest];
    for d in &pinned_blobs {
        assert!(pin["blobs"].to_string().contains(&d.to_string()), "{pin}");
        assert!(is_stored(&proxy, d));
    }
    // app0, app1, app2, then app0 again: each pull needs room only LRU eviction makes.
    for img in imgs.iter().chain(std::iter::once(&imgs[0])) {
        pull(&proxy, tmp.path(), img);
    }
    let metrics = proxy.get("/metrics", &[]).unwrap().text();
    let (max, samples) = sampler.finish();
    assert!(samples > 50, "sampled {samples} times");
    assert!(
        max <= QUOTA,
        "storage reached {max} bytes, over the quota of {QUOTA}"
    );
    assert!(max > QUOTA / 2, "the test never filled storage: {max}");
    for d in &pinned_blobs {
        assert!(is_stored(&proxy, d), "pinned blob {d} was evicted");
    }
    // app0 was evicted for app2 and pulled again: its layer came from upstream twice.
    let app0 = imgs[0].layers[0].blob.digest;
    assert_eq!(relay.count("GET", &format!("/blobs/{app0}")), 2);
    assert!(
        !is_stored(&proxy, &imgs[1].layers[0].blob.digest),
        "app1 is the LRU one"
    );
    assert_eq!(metric(&metrics, "imgd_proxy_storage_quota_bytes"), QUOTA);
    assert!(
        metric(&metrics, "imgd_proxy_evictions_total") >= 2,
        "{metrics}"
    );
    let committed = metric(
        &metrics,
        "imgd_proxy_storage_use_bytes{state=\"committed\"}",
    );
    assert!(committed <= QUOTA && committed > QUOTA / 2, "{metrics}");
    verify(&proxy);

    // A kill -9 between an eviction's records and its files.
    std::env::set_var("IMGD_PROXY_TEST_EVICTION_PAUSE_MS", "30000");
    proxy.restart().unwrap();
    std::env::remove_var("IMGD_PROXY_TEST_EVICTION_PAUSE_MS");
    let url = format!(
        "{}/v2/local/app1/blobs/{}",
        proxy.url(),
        imgs[1].layers[0].blob.digest
    );
    let client = std::thread::spawn(move || imgd_tests::registry_client::get(&url, &[]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy.log().contains("eviction paused") {
        assert!(Instant::now() < deadline, "no eviction:\n{}", proxy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.kill().unwrap();
    let _ = client.join();
    let out = Command::new(workspace_bin("imgd-proxy").unwrap())
        .args(["verify", "--storage-dir"])
        .arg(&storage)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert!(
        report["unreferenced_chunks"].as_u64().unwrap() > 0,
        "killed after the records went, before the files: {report}"
    );
    proxy.restart().unwrap();
    let report = verify(&proxy);
    assert_eq!(
        report["unreferenced_chunks"], 0,
        "removed at start: {report}"
    );
    for d in &pinned_blobs {
        assert!(is_stored(&proxy, d), "pinned blob {d} was evicted");
    }
    pull(&proxy, tmp.path(), &imgs[1]);
    pull(&proxy, tmp.path(), &pinned);
    verify(&proxy);
    assert!(bytes_under(&storage.join("chunks")) <= QUOTA);
}
