//! The split index (version 5): a mount fetches only the index's main part (file table
//! and checkpoints with each window's sha256) before its first read; a read fetches the
//! one window its checkpoint needs, by `Range` on the proxy's windows part, verifies it
//! and stores it with the index. A wrong window from the proxy fails the read with `EIO`
//! within the read bound and is not stored; the next read fetches it again.

use imgd_core::index::LayerIndex;
use imgd_core::Digest;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SMALL: &[u8] = b"a small file in the middle of a big layer\n";

/// One gzip layer: 3 MiB of noise, a small file, 3 MiB of noise (several checkpoints,
/// each with a window, before the small file).
fn image() -> ImageSpec {
    ImageSpec::new(
        "splitidx",
        vec![LayerSpec::gzip(vec![
            FileSpec::dir("data"),
            FileSpec::random("data/a.bin", 41, 3 << 20),
            FileSpec::file("data/small.txt", SMALL),
            FileSpec::random("data/b.bin", 42, 3 << 20),
        ])],
    )
}

struct Setup {
    _tmp: tempfile::TempDir,
    _reg: Registry,
    _proxy: Proxy,
    relay: FaultRelay,
    agent: Agent,
    data: PathBuf,
    mnt: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    skopeo::push_image(&reg, &tmp.path().join("img"), image(), "splitidx:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let relay = FaultRelay::start(&proxy.addr()).unwrap();
    let data = tmp.path().join("agent");
    let agent = Agent::start(AgentOptions {
        extra_toml: "[mount]\nread_timeout_ms = 3000\n".into(),
        ..AgentOptions::local(relay.url(), &data)
    })
    .unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let (ok, out, err) = agent
        .imgctl(&["mount", "local/splitidx:1", mnt.to_str().unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    Setup {
        _tmp: tmp,
        _reg: reg,
        _proxy: proxy,
        relay,
        agent,
        data,
        mnt,
    }
}

/// The stored window files of the agent whose data dir is `data`.
fn window_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("data/indexes/windows"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// The layer's index as the agent stored it, and that file's size.
fn stored_index(data: &Path) -> (LayerIndex, u64) {
    let dir = data.join("data/indexes");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file() && !p.to_string_lossy().ends_with(".tmp"))
        .expect("a stored index");
    let bytes = std::fs::read(&file).unwrap();
    (LayerIndex::decode(&bytes).unwrap(), bytes.len() as u64)
}

#[test]
fn a_mount_needs_only_the_main_part_before_its_first_read() {
    let s = setup();
    let (index, stored) = stored_index(&s.data);
    // The agent holds the main part only: every window is elsewhere.
    assert!(index.windows.is_none() && index.windows_size > 0);
    let windows = index
        .checkpoints
        .iter()
        .filter(|c| c.window.is_some())
        .count();
    assert!(windows >= 4, "{windows} checkpoints with windows");
    assert_eq!(stored, index.encode_main().len() as u64);
    println!(
        "index: main part {stored} bytes fetched at mount; windows part {} bytes ({windows} windows) not fetched",
        index.windows_size
    );
    assert!(
        stored < index.windows_size / 4,
        "main {stored} vs windows {}",
        index.windows_size
    );
    assert_eq!(
        s.relay.count("GET", "/windows?"),
        0,
        "no window before a read"
    );
    assert!(window_files(&s.data).is_empty());

    assert_eq!(std::fs::read(s.mnt.join("data/small.txt")).unwrap(), SMALL);
    // One span was inflated, from one checkpoint: one window, asked for by Range.
    let asked: Vec<_> = s
        .relay
        .seen()
        .into_iter()
        .filter(|r| r.path.contains("/windows?"))
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].header("range").is_some());
    let files = window_files(&s.data);
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(Digest::of(&std::fs::read(&files[0]).unwrap()).hex(), name);
    assert!(index
        .checkpoints
        .iter()
        .any(|c| c.window.is_some_and(|w| w.sha256.hex() == name)));
}

#[test]
fn a_wrong_window_from_the_proxy_is_eio_and_not_stored() {
    let s = setup();
    s.relay.add("/windows?", Fault::FlipByte { at: 10 }, None);
    let started = Instant::now();
    let err = std::fs::read(s.mnt.join("data/small.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        window_files(&s.data).is_empty(),
        "a wrong window is not stored"
    );
    assert!(
        s.agent
            .log()
            .contains("the proxy sent a wrong index window"),
        "and the agent said so"
    );
    assert!(s.agent.status().unwrap()["mounts"][0]["eio"].as_u64() >= Some(1));
    // The proxy sends the right one again: the next read fetches it and succeeds.
    s.relay.clear();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(std::fs::read(s.mnt.join("data/small.txt")).unwrap(), SMALL);
    assert_eq!(window_files(&s.data).len(), 1);
}
