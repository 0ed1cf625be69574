//! Lazy reads fetch verified 64 KiB pieces, not whole chunks: a small file in the
//! middle of a layer costs little more than its own compressed bytes plus the span
//! before it; a proxy that serves a wrong piece is caught (and the read still gets the
//! right bytes); a partial chunk survives `kill -9` of the agent with nothing unverified
//! kept, and is completed into a whole verified chunk in the background.

use imgd_core::Digest;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SMALL: &[u8] = b"a small file in the middle of a big layer\n";

/// One gzip layer: 6 MiB of noise, two small files, 6 MiB of noise (about 12 MiB of
/// gzip, three chunks); the small files sit in the middle chunk.
fn image() -> ImageSpec {
    ImageSpec::new(
        "pieces",
        vec![LayerSpec::gzip(vec![
            FileSpec::dir("data"),
            FileSpec::random("data/a.bin", 31, 6 << 20),
            FileSpec::file("data/small.txt", SMALL),
            FileSpec::file("data/small2.txt", SMALL),
            FileSpec::random("data/b.bin", 32, 6 << 20),
        ])],
    )
}

fn agent(dir: &Path, proxy_url: &str) -> Agent {
    Agent::start(AgentOptions::local(proxy_url, dir)).unwrap()
}

fn mount(a: &Agent, tmp: &Path) -> PathBuf {
    let dir = tmp.join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let (ok, out, err) = a
        .imgctl(&["mount", "local/pieces:1", dir.to_str().unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    dir
}

fn fetched(a: &Agent) -> u64 {
    a.status().unwrap()["mounts"][0]["fetched_bytes"]
        .as_u64()
        .unwrap()
}

/// Files under `dir` (recursively).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The piece files of the agent whose data dir is `data`.
fn piece_files(data: &Path) -> Vec<PathBuf> {
    files(&data.join("data/cache/pieces"))
}

/// True when the file is named by the sha256 of its bytes.
fn verifies(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    Digest::of(&std::fs::read(path).unwrap()).hex() == name
}

#[test]
fn a_small_read_fetches_pieces_and_a_partial_chunk_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, size) = skopeo::push_image(&reg, &tmp.path().join("img"), image(), "pieces:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let data = tmp.path().join("agent");
    let mut first = agent(&data, &proxy.url());
    let dir = mount(&first, tmp.path());

    assert_eq!(std::fs::read(dir.join("data/small.txt")).unwrap(), SMALL);
    let got = fetched(&first);
    println!("image {size} bytes; read of a small file fetched {got} bytes");
    // At most about 1 MiB of compressed input before the file (the checkpoint spacing)
    // plus piece rounding; a whole chunk is 4 MiB.
    assert!(got > 0 && got <= 2 << 20, "fetched {got} bytes");
    let pieces = piece_files(&data);
    assert!(!pieces.is_empty(), "pieces are stored");
    assert!(pieces.iter().all(|p| verifies(p)));
    let chunks_before = files(&data.join("data/cache/chunks")).len();

    // kill -9, then damage one stored piece as a crash or a disk could: the restarted
    // agent must not keep it.
    first.kill().unwrap();
    let victim = pieces[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&victim, &bytes).unwrap();
    let second = agent(&data, &proxy.url());
    assert!(!victim.exists(), "the damaged piece was removed at start");
    assert!(
        piece_files(&data).iter().all(|p| verifies(p)),
        "every piece kept verifies"
    );
    // The mount survived the agent; a read needing the dropped piece fetches it again.
    assert_eq!(std::fs::read(dir.join("data/small2.txt")).unwrap(), SMALL);

    // Left alone, the partial chunk is completed into a whole verified chunk and its
    // pieces go.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !piece_files(&data).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(piece_files(&data).is_empty(), "partial chunks completed");
    assert!(files(&data.join("data/cache/partial")).is_empty());
    assert!(files(&data.join("data/cache/chunks")).len() > chunks_before);
    second.verify_clean().unwrap();
    drop(second);
    drop(first);
}

#[test]
fn a_proxy_serving_a_wrong_piece_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    skopeo::push_image(&reg, &tmp.path().join("img"), image(), "pieces:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let relay = FaultRelay::start(&proxy.addr()).unwrap();
    let a = agent(&tmp.path().join("agent"), &relay.url());
    let dir = mount(&a, tmp.path());
    relay.add("/imgd/v1/chunks/", Fault::FlipByte { at: 1000 }, Some(1));
    let metric = "imgd_agent_verification_failures_total{where=\"proxy\"}";
    let before = a.metrics().unwrap();

    assert_eq!(std::fs::read(dir.join("data/small.txt")).unwrap(), SMALL);
    let ranged = relay
        .seen()
        .iter()
        .filter(|r| r.path.contains("/imgd/v1/chunks/") && r.header("range").is_some())
        .count();
    assert!(ranged >= 1, "the read asked for pieces by Range");
    let caught = a.metrics().unwrap().delta(&before, metric);
    assert!(
        caught >= 1.0,
        "the wrong piece was counted against the proxy"
    );
    assert!(
        a.log().contains("does not match its digest"),
        "and said so in the log"
    );
    assert_eq!(a.status().unwrap()["mounts"][0]["eio"].as_u64(), Some(0));
    assert!(piece_files(&tmp.path().join("agent"))
        .iter()
        .all(|p| verifies(p)));
}
