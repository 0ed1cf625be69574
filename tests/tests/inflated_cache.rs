//! The on-disk inflated cache of lazy mounts: a warm read after a remount is a read of
//! the inflated stream on disk (no inflation, no chunk read), and inflated layers count
//! against the cache quota, are evicted under it, and never while a mount holds them.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::ImgdMount;
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn push(reg: &Registry, dir: &Path, name: &str, seed: u64, mib: u64) -> Vec<u8> {
    let file = FileSpec::compressible("data/file.bin", seed, mib * MIB);
    let spec = ImageSpec::new(
        name,
        vec![LayerSpec::gzip(vec![FileSpec::dir("data"), file.clone()])],
    );
    skopeo::push_image(reg, &dir.join(name), spec, &format!("{name}:1")).unwrap();
    match file.kind {
        imgd_tests::image::EntryKind::File(c) => c.to_vec(),
        _ => unreachable!(),
    }
}

fn inflated_root(a: &Agent) -> PathBuf {
    a.data_dir.join("data/cache/inflated")
}

/// The inflated layers on disk, by directory name.
fn inflated_layers(a: &Agent) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(inflated_root(a))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mount_status(a: &Agent, dir: &Path) -> serde_json::Value {
    let s = a.status().unwrap();
    s["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"] == dir.to_str().unwrap())
        .unwrap_or_else(|| panic!("{} not mounted: {s}", dir.display()))
        .clone()
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

#[test]
fn a_warm_read_after_a_remount_is_served_from_the_inflated_cache_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let want = push(&reg, tmp.path(), "warm", 1, 24);
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let a = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent"))).unwrap();
    let dir = tmp.path().join("mnt");

    let m = ImgdMount::mount(&a, "local/warm:1", &dir).unwrap();
    let got = std::fs::read(dir.join("data/file.bin")).unwrap();
    assert!(got == want, "first read: wrong bytes");
    let first = mount_status(&a, &dir);
    println!("first mount: {first}");
    assert!(first["spans_inflated"].as_u64().unwrap() > 0, "{first}");
    assert!(first["chunk_reads"].as_u64().unwrap() > 0, "{first}");
    drop(m);
    // The agent measures the inflated layers every 2 s.
    let inflated = || {
        a.status().unwrap()["cache_inflated_bytes"]
            .as_u64()
            .unwrap()
    };
    wait_for(
        "the inflated stream to count",
        Duration::from_secs(10),
        || inflated() >= 24 * MIB,
    );
    assert_eq!(inflated_layers(&a).len(), 1);

    drop_caches();
    let m = ImgdMount::mount(&a, "local/warm:1", &dir).unwrap();
    let got = std::fs::read(dir.join("data/file.bin")).unwrap();
    assert!(got == want, "read after the remount: wrong bytes");
    let second = mount_status(&a, &dir);
    println!("after the remount: {second}");
    assert_eq!(second["spans_inflated"].as_u64(), Some(0), "{second}");
    assert_eq!(
        second["chunk_reads"].as_u64(),
        Some(0),
        "{second}\n{}",
        a.log()
    );
    assert!(second["disk_reads"].as_u64().unwrap() > 0, "{second}");
    assert_eq!(second["eio"].as_u64(), Some(0), "{second}");
    drop(m);
}

/// Waits (bounded) until `cond` holds, checking every 200 ms.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn inflated_layers_are_evicted_under_the_quota_but_never_while_mounted() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let want_a = push(&reg, tmp.path(), "a", 2, 16);
    let want_b = push(&reg, tmp.path(), "b", 3, 16);
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    // One image's chunks and inflated stream fit; two images' do not.
    let quota = 36 * MIB;
    let a = Agent::start_with_args(
        AgentOptions::local(proxy.url(), tmp.path().join("agent")),
        &["--cache-quota", &quota.to_string()],
    )
    .unwrap();
    let (dir_a, dir_b) = (tmp.path().join("mnt-a"), tmp.path().join("mnt-b"));
    let used = |a: &Agent| {
        let s = a.status().unwrap();
        let (c, i) = (
            s["cache_used_bytes"].as_u64().unwrap(),
            s["cache_inflated_bytes"].as_u64().unwrap(),
        );
        (c, i)
    };

    let mount_a = ImgdMount::mount(&a, "local/a:1", &dir_a).unwrap();
    assert!(std::fs::read(dir_a.join("data/file.bin")).unwrap() == want_a);
    let layers_a = inflated_layers(&a);
    assert_eq!(layers_a.len(), 1);
    let mount_b = ImgdMount::mount(&a, "local/b:1", &dir_b).unwrap();
    assert!(std::fs::read(dir_b.join("data/file.bin")).unwrap() == want_b);
    let both = inflated_layers(&a);
    assert_eq!(both.len(), 2, "{both:?}");
    let layer_b: Vec<_> = both.iter().filter(|l| !layers_a.contains(l)).collect();

    // Over the quota, with both mounted: the agent checks every 2 s; after three checks
    // both are still there. The reads fetched pieces, which count once the background
    // completer has made them whole chunks (after 10 s without reads).
    wait_for(
        "the agent to see the inflated data and the completed chunks",
        Duration::from_secs(40),
        || {
            assert_eq!(inflated_layers(&a), both, "evicted while mounted");
            let (c, i) = used(&a);
            c + i > quota
        },
    );
    std::thread::sleep(Duration::from_secs(6));
    let (chunks, inflated) = used(&a);
    println!("both mounted: chunks {chunks}, inflated {inflated}, quota {quota}");
    assert_eq!(inflated_layers(&a), both, "nothing evicted while mounted");
    assert!(
        chunks + inflated > quota,
        "still above the quota: {chunks} + {inflated}"
    );
    let m = a.metrics().unwrap();
    assert_eq!(m.v("imgd_agent_cache_evicted_inflated_layers_total"), 0.0);

    // Unmounted, the least recently used layer is evicted, and only it.
    drop(mount_a);
    wait_for(
        "a's inflated layer to be evicted",
        Duration::from_secs(15),
        || inflated_layers(&a).len() < 2,
    );
    let left = inflated_layers(&a);
    assert_eq!(
        left.iter().collect::<Vec<_>>(),
        layer_b,
        "b stays: {left:?}"
    );
    let (chunks, inflated) = used(&a);
    println!("a unmounted: chunks {chunks}, inflated {inflated}");
    assert!(
        chunks + inflated <= quota,
        "{chunks} + {inflated} vs {quota}"
    );
    let m = a.metrics().unwrap();
    assert_eq!(m.v("imgd_agent_cache_evicted_inflated_layers_total"), 1.0);

    // b still reads (from disk), and a again, inflated anew from its chunks.
    drop_caches();
    assert!(std::fs::read(dir_b.join("data/file.bin")).unwrap() == want_b);
    assert_eq!(mount_status(&a, &dir_b)["eio"].as_u64(), Some(0));
    let mount_a = ImgdMount::mount(&a, "local/a:1", &dir_a).unwrap();
    assert!(std::fs::read(dir_a.join("data/file.bin")).unwrap() == want_a);
    drop(mount_a);
    drop(mount_b);
}
