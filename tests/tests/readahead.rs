//! Spans are inflated ahead of sequential reads only: a read of a big library's header and
//! a read elsewhere in it (what a dynamic loader and a page fault of the mapped library do)
//! fetch the spans they need and nothing ahead of them, while a file read through from
//! its start has its next spans read ahead.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::ImgdMount;
use imgd_tests::image::{EntryKind, FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn mount_stats(a: &Agent) -> serde_json::Value {
    a.status().unwrap()["mounts"][0].clone()
}

#[test]
fn scattered_reads_read_nothing_ahead_and_a_sequential_read_does() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let file = FileSpec::compressible("lib/libbig.so", 91, 24 * MIB);
    let EntryKind::File(content) = &file.kind else {
        unreachable!()
    };
    let want = content.to_vec();
    let spec = ImageSpec::new(
        "ahead",
        vec![LayerSpec::gzip(vec![FileSpec::dir("lib"), file.clone()])],
    );
    let (_, size) = skopeo::push_image(&reg, &tmp.path().join("img"), spec, "ahead:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let a = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent"))).unwrap();
    let dir = tmp.path().join("mnt");
    let m = ImgdMount::mount(&a, "local/ahead:1", &dir).unwrap();
    let path = dir.join("lib/libbig.so");

    // The ELF header, then a page of code 12 MiB in.
    let f = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 832];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, want[..832]);
    let mut page = vec![0u8; 4096];
    let at = 12 * MIB as usize;
    f.read_exact_at(&mut page, at as u64).unwrap();
    assert_eq!(page, want[at..at + 4096]);
    // Anything read ahead would be fetched by now.
    std::thread::sleep(Duration::from_secs(1));
    let s = mount_stats(&a);
    let scattered = s["fetched_bytes"].as_u64().unwrap();
    println!("image {size} bytes; two scattered reads fetched {scattered} bytes: {s}");
    assert_eq!(
        s["spans_read_ahead"].as_u64().unwrap(),
        0,
        "scattered reads read spans ahead: {s}"
    );
    assert!(
        scattered <= size / 4,
        "two small reads fetched {scattered} of {size} bytes: {s}"
    );

    // The whole file, from its start: the readahead threads work ahead of it.
    let mut all = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert!(all == want, "the file reads back intact");
    let s = mount_stats(&a);
    assert!(
        s["spans_read_ahead"].as_u64().unwrap() > 0,
        "a sequential read read nothing ahead: {s}"
    );
    assert_eq!(s["eio"].as_u64().unwrap(), 0, "{s}");
    drop(m);
}
