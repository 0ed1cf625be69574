//! The learned startup trace records which bytes of each file the start read, not only
//! the file names: a later mount's warm-up fetches what those bytes need, so a 20 MiB
//! library of which the start read 200 KB costs about 1 MiB (the span from its
//! checkpoint), not the whole library.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const READ: usize = 200_000;

fn image() -> ImageSpec {
    ImageSpec::new(
        "ranges",
        vec![LayerSpec::gzip(vec![
            FileSpec::dir("lib"),
            FileSpec::compressible("lib/libbig.so", 77, 20 << 20),
        ])],
    )
}

fn mount(a: &Agent, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (ok, out, err) = a
        .imgctl(&["mount", "local/ranges:1", dir.to_str().unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    dir.to_path_buf()
}

fn head(path: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; READ];
    std::fs::File::open(path)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

#[test]
fn a_learned_start_warms_only_the_bytes_the_first_start_read() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (img, size) =
        skopeo::push_image(&reg, &tmp.path().join("img"), image(), "ranges:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();

    let first = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("first"))).unwrap();
    let lower = mount(&first, &tmp.path().join("first-lower"));
    let want = head(&lower.join("lib/libbig.so"));
    let (ok, o, e) = first.imgctl(&["umount", lower.to_str().unwrap()]).unwrap();
    assert!(ok, "{o}{e}");
    let trace: imgd_core::wire::StartupTrace = proxy
        .get(&format!("/imgd/v1/traces/{}", img.manifest.digest), &[])
        .unwrap()
        .json_as()
        .unwrap();
    let k = trace
        .paths
        .iter()
        .position(|p| p == b"lib/libbig.so")
        .expect("the library is in the trace");
    let ranges = trace.ranges(k).expect("the trace has ranges");
    println!("trace of the library: {ranges:?}");
    assert!(!ranges.is_empty() && ranges[0].0 == 0, "{ranges:?}");
    let end = ranges.last().unwrap().1;
    assert!(
        end >= READ as u64 && end <= 4 << 20,
        "only about what was read (with readahead): {ranges:?}"
    );

    // The second agent registers a mount only 500 ms after its process serves, while
    // the process's startup prefetch asks for chunks at once: they must be served (they
    // once got "no such mount", and every read of those chunks failed for a while).
    // The only test in this binary, so setting the variable races nothing.
    std::env::set_var(imgd_agent::mounts::REGISTER_PAUSE_ENV, "500");
    let second = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("second"))).unwrap();
    std::env::remove_var(imgd_agent::mounts::REGISTER_PAUSE_ENV);
    let lower = mount(&second, &tmp.path().join("second-lower"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !second.log().contains("startup files prefetched") {
        assert!(
            Instant::now() < deadline,
            "no startup prefetch:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = second.status().unwrap();
    let warmed = status["mounts"][0]["fetched_bytes"].as_u64().unwrap();
    println!("image {size} bytes; the warm-up fetched {warmed} bytes for a {READ}-byte read of a 20 MiB file");
    assert!(warmed > 0, "the warm-up fetched something: {status}");
    assert!(
        !second.log().contains("startup prefetch failed"),
        "the warm-up was served while the mount was being registered:\n{}",
        second.log()
    );
    assert!(
        warmed <= 3 << 20,
        "the warm-up fetched what the read needs, not the whole library: {warmed} bytes of a {size}-byte image"
    );
    assert_eq!(head(&lower.join("lib/libbig.so")), want);
    let after = second.status().unwrap()["mounts"][0]["fetched_bytes"]
        .as_u64()
        .unwrap();
    if after != warmed {
        // The read itself was warmed; only the spans read ahead of it (the file's next
        // bytes, on the readahead threads) may fetch more, and with dense checkpoints
        // the first of them is done quickly. Let them finish, then check that they are
        // what fetched.
        std::thread::sleep(Duration::from_secs(2));
        let m = second.status().unwrap()["mounts"][0].clone();
        assert!(
            m["spans_read_ahead"].as_u64().unwrap() > 0,
            "the start's read was not warmed: {after} bytes fetched after a warm-up of {warmed}, and nothing was read ahead: {m}"
        );
    }
    let (ok, o, e) = second.imgctl(&["umount", lower.to_str().unwrap()]).unwrap();
    assert!(ok, "{o}{e}");
}
