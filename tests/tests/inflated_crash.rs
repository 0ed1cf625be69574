//! `kill -9` of a mount process while it writes inflated spans to disk leaves no span
//! marked present that is not whole: a later mount reads the right bytes.
//!
//! Alone in its test binary: it sets the fault-injection variable that the agent passes
//! on to its mount processes (`IMGD_FAULT_SPAN_WRITE_PAUSE_MS`: a pause halfway through
//! writing each span, so the kill lands inside a span's write).

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::ImgdMount;
use imgd_tests::image::{EntryKind, FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const PAUSE_MS: u64 = 1500;

/// Bytes of the span logs of every inflated layer.
fn span_log_bytes(root: &Path) -> u64 {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::metadata(e.path().join("spans")).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_kill_9_while_spans_are_written_leaves_no_partial_span_marked_present() {
    std::env::set_var("IMGD_FAULT_SPAN_WRITE_PAUSE_MS", PAUSE_MS.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    // Incompressible: a span per 4 MiB chunk, so the file has several.
    let file = FileSpec::random("data/file.bin", 11, 20 * MIB);
    let EntryKind::File(content) = &file.kind else {
        unreachable!()
    };
    let want = content.to_vec();
    let spec = ImageSpec::new(
        "crash",
        vec![LayerSpec::gzip(vec![FileSpec::dir("data"), file.clone()])],
    );
    skopeo::push_image(&reg, &tmp.path().join("img"), spec, "crash:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let a = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent"))).unwrap();
    let root = a.data_dir.join("data/cache/inflated");
    let dir = tmp.path().join("mnt");

    let m = ImgdMount::mount(&a, "local/crash:1", &dir).unwrap();
    let pid = a.status().unwrap()["mounts"][0]["pid"].as_u64().unwrap() as i32;
    let path = dir.join("data/file.bin");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf));
        (r.is_ok(), buf.len())
    });
    // The first span is whole and recorded; the readahead threads are now halfway
    // through writing the next ones.
    let deadline = Instant::now() + Duration::from_secs(60);
    while span_log_bytes(&root) == 0 {
        assert!(Instant::now() < deadline, "no span was ever recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(PAUSE_MS / 2));
    let records_before = span_log_bytes(&root) / 24;
    // SAFETY: kill(2) of the mount process this test's agent started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let (read_ok, read_len) = reader.join().unwrap();
    println!(
        "killed the mount process with {records_before} span(s) recorded; the reader got ok={read_ok} after {read_len} bytes"
    );
    assert!(
        !read_ok || read_len < want.len(),
        "the kill landed after the whole file was read"
    );
    drop(m);
    // The agent cleans up the dead mount; wait until it is gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.status().unwrap()["mounts"]
        .as_array()
        .is_some_and(|v| !v.is_empty())
    {
        assert!(Instant::now() < deadline, "the dead mount stays listed");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A new mount trusts what the log says is present: those bytes must be whole.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let m = ImgdMount::mount(&a, "local/crash:1", &dir).unwrap();
    let got = std::fs::read(dir.join("data/file.bin")).unwrap();
    let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
    assert!(
        got.len() == want.len() && first_bad.is_none(),
        "read {} of {} bytes after the crash, first wrong byte at {first_bad:?}",
        got.len(),
        want.len()
    );
    let s = &a.status().unwrap()["mounts"][0];
    println!("after the crash: {s}");
    assert!(
        s["disk_reads"].as_u64().unwrap() > 0,
        "the span recorded before the kill was read from disk: {s}"
    );
    drop(m);
}
