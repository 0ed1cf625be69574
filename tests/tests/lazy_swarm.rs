//! Lazy mounts in the swarm, on a LAN of network namespaces: hosts that mount one image
//! and read it at the same moment cost the proxy about one host's start (proxy egress
//! counted by the kernel on the bridge, outside the agents); a lazy read takes its
//! pieces from a peer that holds the chunk; a peer that serves a wrong piece is caught,
//! banned, and the read still gets the right bytes.

use imgd_core::Digest;
use imgd_tests::daemons::{Agent, Proxy};
use imgd_tests::evil_peer::start_liar;
use imgd_tests::guards::path_str;
use imgd_tests::image::{EntryKind, FileSpec, ImageSpec, LayerSpec};
use imgd_tests::netns::{Host, Lan};
use imgd_tests::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const IMAGE: &str = "local/lazy:1";

/// Files of the test image: 40 compressible files of 1 MiB (about 40 MiB of tar, 15 MiB
/// of gzip: four chunks), plus a small one.
const FILES: u64 = 40;

fn image() -> ImageSpec {
    let mut files = vec![FileSpec::dir("app")];
    for k in 0..FILES {
        files.push(FileSpec::compressible(
            format!("app/f{k:02}.bin"),
            500 + k,
            1 << 20,
        ));
    }
    files.push(FileSpec::file("app/small.txt", "small\n"));
    ImageSpec::new("lazy", vec![LayerSpec::gzip(files)])
}

/// What "starting" the image reads: every other file, in order (about half the image,
/// scattered over every chunk).
fn start_files() -> Vec<String> {
    (0..FILES)
        .step_by(2)
        .map(|k| format!("app/f{k:02}.bin"))
        .collect()
}

/// A registry with the image, a LAN of `hosts` and a proxy on its gateway, warmed from
/// upstream (so the bridge sees only what the proxy sends the hosts).
struct Net {
    proxy: Proxy,
    lan: Lan,
    _registry: Registry,
}

fn net(dir: &Path, hosts: usize) -> Net {
    let registry = Registry::start().unwrap();
    imgd_tests::skopeo::push_image(&registry, &dir.join("img"), image(), "lazy:1").unwrap();
    let lan = Lan::new(hosts).unwrap();
    let proxy = Proxy::start_on_lan(
        &lan,
        &dir.join("proxy"),
        &[format!("local={}", registry.url())],
    )
    .unwrap();
    let (ok, _, err) = imgd_tests::process::run_ok(
        "curl",
        &["-sf", &format!("{}/v2/local/lazy/manifests/1", proxy.url())],
    );
    assert!(ok, "{err}");
    Net {
        proxy,
        lan,
        _registry: registry,
    }
}

fn mount(a: &Agent, dir: &Path) -> PathBuf {
    let mnt = dir.join(format!("mnt-{}", a.pid()));
    std::fs::create_dir_all(&mnt).unwrap();
    let (ok, out, err) = a
        .imgctl(&["mount", IMAGE, path_str(&mnt).unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}\n{}", a.log());
    mnt
}

/// Reads the start files under `mnt`; returns the bytes read.
fn start(mnt: &Path) -> u64 {
    let mut n = 0;
    for f in start_files() {
        n += std::fs::read(mnt.join(&f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .len() as u64;
    }
    n
}

fn umount(a: &Agent, mnt: &Path) {
    let (ok, out, err) = a.imgctl(&["umount", path_str(mnt).unwrap()]).unwrap();
    assert!(ok, "umount: {out}{err}");
}

fn status_u64(a: &Agent, key: &str) -> u64 {
    a.status().unwrap()[key].as_u64().unwrap_or(0)
}

/// Agent settings here: the completer must not run while a start is measured (it waits
/// 10 s), and a read waits for the chunk's owner at most 1 s on this loaded machine.
const EXTRA: &str = "[fetch]\nread_owner_wait_ms = 1000\n";

#[test]
fn four_hosts_starting_one_lazy_image_at_once_cost_the_proxy_about_one_start() {
    let tmp = tempfile::tempdir().unwrap();
    let net = net(tmp.path(), 4);
    let (lan, proxy) = (&net.lan, &net.proxy);

    // One host alone, in the same run: its mount and start are the baseline.
    let alone_dir = tmp.path().join("alone");
    let alone = Agent::start_on_host(&lan.hosts[0], proxy, &alone_dir, EXTRA).unwrap();
    let windows = || proxy.stats().unwrap().window_bytes_served;
    let mains = || proxy.stats().unwrap().index_bytes_served;
    let (before, windows_before, mains_before) =
        (lan.bridge_tx_bytes().unwrap(), windows(), mains());
    let t = Instant::now();
    let mnt = mount(&alone, &alone_dir);
    let read = start(&mnt);
    let alone_took = t.elapsed();
    let one = lan.bridge_tx_bytes().unwrap() - before;
    let one_windows = windows() - windows_before;
    let one_mains = mains() - mains_before;
    umount(&alone, &mnt);
    drop(alone);

    // Four fresh hosts mount and start at the same moment (with the startup trace the
    // first start stored at the proxy, as every later start of the image has).
    let dir = tmp.path().join("four");
    let agents: Vec<Agent> = lan
        .hosts
        .iter()
        .map(|h| Agent::start_on_host(h, proxy, &dir, EXTRA).unwrap())
        .collect();
    for a in &agents {
        a.wait_for_peers(3, Duration::from_secs(30)).unwrap();
    }
    let (before, windows_before, mains_before) =
        (lan.bridge_tx_bytes().unwrap(), windows(), mains());
    let go = Barrier::new(agents.len());
    let (mnts, took): (Vec<PathBuf>, Vec<Duration>) = std::thread::scope(|s| {
        let runs: Vec<_> = agents
            .iter()
            .map(|a| {
                let (go, dir) = (&go, &dir);
                s.spawn(move || {
                    go.wait();
                    let t = Instant::now();
                    let m = mount(a, dir);
                    let n = start(&m);
                    assert_eq!(n, read, "every host read the same bytes");
                    (m, t.elapsed())
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).unzip()
    });
    let four = lan.bridge_tx_bytes().unwrap() - before;
    let four_windows = windows() - windows_before;
    let four_mains = mains() - mains_before;
    let ratio = four as f64 / one as f64;
    let slowest = took.iter().max().unwrap();
    let from_peers: Vec<u64> = agents
        .iter()
        .map(|a| status_u64(a, "bytes_from_peers"))
        .collect();
    println!(
        "one host: mount and start read {read} bytes in {alone_took:?}, proxy sent {one} bytes; \
         four hosts at once: proxy sent {four} bytes = {ratio:.2}x one start, slowest \
         start {slowest:?} ({:.2}x alone); bytes from peers per host {from_peers:?}; \
         checkpoint windows from the proxy: {one_windows} bytes alone, {four_windows} for four; \
         index main parts from the proxy: {one_mains} bytes alone, {four_mains} for four",
        slowest.as_secs_f64() / alone_took.as_secs_f64()
    );
    for (a, m) in agents.iter().zip(&mnts) {
        assert_eq!(
            a.status().unwrap()["mounts"][0]["eio"].as_u64(),
            Some(0),
            "no read failed"
        );
        let bytes = std::fs::read(m.join("app/f00.bin")).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
    }
    // Without sharing the proxy sends about 4x one start. The target, <= 1.25x, is what
    // `bench-lazy-swarm` measures on a quiet machine; this test runs beside the rest of
    // the suite on 2 cores, where 25 runs (main and branch scale) gave 1.03x-1.37x, so it guards the sharing
    // itself with room for timing.
    assert!(
        ratio <= 1.5,
        "four simultaneous starts cost the proxy {ratio:.2}x one start (without sharing ~4x)"
    );
    // Each window has one owner among the hosts, which fetches it for the others: the
    // proxy serves the four about one host's windows (without sharing, 4x).
    assert!(one_windows > 0, "the start needs checkpoint windows");
    assert!(
        four_windows as f64 <= 1.5 * one_windows as f64,
        "four simultaneous starts took {four_windows} bytes of windows from the proxy, one \
         start {one_windows}"
    );
    // Each layer's index main part has one owner among the four, which fetches it for
    // the others (without sharing, 4x).
    assert!(
        one_mains > 0,
        "the mount needs the layers' index main parts"
    );
    assert!(
        four_mains as f64 <= 1.5 * one_mains as f64,
        "four simultaneous mounts took {four_mains} bytes of index main parts from the \
         proxy, one mount {one_mains}"
    );
    // One host may have owned, or been first to, every chunk it read; the others took
    // theirs from peers.
    let sharing = from_peers.iter().filter(|b| **b > 0).count();
    assert!(
        sharing >= 3,
        "at least three of four hosts took some of their start from peers: {from_peers:?}"
    );
    for (a, m) in agents.iter().zip(&mnts) {
        umount(a, m);
    }
}

/// A scrape of `a`'s metrics, from inside `host` (its mirror listens there).
fn metrics(host: &Host, a: &Agent) -> imgd_tests::scrape::Scrape {
    let out = host
        .command("curl")
        .args(["-sf", &format!("http://{}/metrics", a.mirror)])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl /metrics in {}", host.ns);
    imgd_tests::scrape::Scrape::parse(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

fn penalty_of(a: &Agent, peer: &str) -> u64 {
    a.status().unwrap()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == peer)
        .map_or(0, |p| p["penalty"].as_u64().unwrap())
}

#[test]
fn a_lazy_read_takes_pieces_from_a_peer_and_a_peer_serving_a_wrong_piece_is_banned() {
    let tmp = tempfile::tempdir().unwrap();
    let net = net(tmp.path(), 3);
    let (lan, proxy) = (&net.lan, &net.proxy);
    let want = {
        let spec = image();
        let f = spec.layers[0]
            .files
            .iter()
            .find(|f| f.path == "app/f07.bin")
            .unwrap();
        match &f.kind {
            EntryKind::File(c) => c.to_vec(),
            other => panic!("{other:?}"),
        }
    };

    // Host B meets only the liar: its read must catch the wrong pieces, ban the liar and
    // get the right bytes from the proxy.
    let (_evil, liar) = start_liar(&lan.hosts[0], proxy, tmp.path(), IMAGE, "flip");
    let b_dir = tmp.path().join("b");
    let b = Agent::start_on_host(&lan.hosts[1], proxy, &b_dir, "").unwrap();
    b.wait_for_peers(1, Duration::from_secs(30)).unwrap();
    let metric = "imgd_agent_verification_failures_total{where=\"peer\"}";
    let before = metrics(&lan.hosts[1], &b);
    let mnt = mount(&b, &b_dir);
    let got = std::fs::read(mnt.join("app/f07.bin")).unwrap();
    assert!(got == want, "the read got the right bytes");
    let caught = metrics(&lan.hosts[1], &b).delta(&before, metric);
    assert!(
        caught >= 1.0,
        "the wrong piece was counted against the peer"
    );
    let penalty = penalty_of(&b, &liar);
    assert!(
        penalty >= 100,
        "the liar is banned ({penalty}):\n{}",
        b.log()
    );
    assert!(status_u64(&b, "bytes_from_proxy_pieces") > 0);
    assert_eq!(
        status_u64(&b, "bytes_from_peers"),
        0,
        "nothing of the liar's kept"
    );
    assert_eq!(b.status().unwrap()["mounts"][0]["eio"].as_u64(), Some(0));
    umount(&b, &mnt);
    drop(b);
    drop(_evil);

    // Host A holds the whole image; host C's lazy read takes its pieces from A alone.
    let a = Agent::start_on_host(&lan.hosts[0], proxy, &tmp.path().join("a"), "").unwrap();
    let (ok, out, err) = a.imgctl(&["prefetch", IMAGE]).unwrap();
    assert!(ok, "prefetch: {out}{err}");
    let c_dir = tmp.path().join("c");
    let c = Agent::start_on_host(&lan.hosts[2], proxy, &c_dir, "").unwrap();
    c.wait_for_peers(1, Duration::from_secs(30)).unwrap();
    let mnt = mount(&c, &c_dir);
    let got = std::fs::read(mnt.join("app/f07.bin")).unwrap();
    assert!(got == want, "the read got the right bytes");
    let from_peers = status_u64(&c, "bytes_from_peers");
    println!("a 1 MiB file read lazily took {from_peers} bytes of pieces from the peer");
    assert!(from_peers > 0, "pieces came from the peer");
    assert!(
        from_peers < 3 << 20,
        "pieces, not whole chunks ({from_peers} bytes)"
    );
    assert_eq!(
        status_u64(&c, "bytes_from_proxy_pieces"),
        0,
        "no piece from the proxy"
    );
    assert_eq!(
        status_u64(&c, "bytes_from_proxy"),
        0,
        "no chunk from the proxy"
    );
    assert_eq!(Digest::of(&got), Digest::of(&want));
    umount(&c, &mnt);
}
