//! First pulls stream while the proxy ingests: clients of an uncached blob get its bytes
//! as they arrive from a slowed upstream, sharing one upstream fetch; a blob that does
//! not match its digest cuts every client's response off, stores nothing and is fetched
//! again by the next request; a `kill -9` mid-stream leaves nothing partial.

use imgd_core::Digest;
use imgd_tests::daemons::Proxy;
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// One raw HTTP/1.1 response as a client saw it.
#[derive(Debug)]
struct Seen {
    status: u16,
    content_length: u64,
    body: Vec<u8>,
    /// From sending the request to the first body byte.
    first_byte: Option<Duration>,
    /// From sending the request to the end of the body (or the cut).
    total: Duration,
}

impl Seen {
    fn complete(&self) -> bool {
        self.body.len() as u64 == self.content_length
    }
}

fn get(addr: &str, path: &str) -> Seen {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t = Instant::now();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut body = Vec::new();
    let mut first_byte = None;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        if !head.ends_with(b"\r\n\r\n") {
            let before = head.len();
            head.extend_from_slice(data);
            match head.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(p) => {
                    data = &data[p + 4 - before..];
                    head.truncate(p + 4);
                }
                None => continue,
            }
        }
        if !data.is_empty() && first_byte.is_none() {
            first_byte = Some(t.elapsed());
        }
        body.extend_from_slice(data);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX);
    Seen {
        status,
        content_length,
        body,
        first_byte,
        total: t.elapsed(),
    }
}

fn registry_blob_file(reg: &Registry, d: &Digest) -> std::path::PathBuf {
    let hex = d.hex();
    reg.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

fn verify_clean(proxy: &Proxy) -> serde_json::Value {
    let r = proxy.get("/imgd/v1/verify", &[]).unwrap();
    let report = r.json().unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    report
}

#[test]
fn first_pulls_stream_and_a_bad_blob_cuts_every_client_off_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let spec = ImageSpec::new(
        "stream",
        vec![LayerSpec::uncompressed(vec![
            FileSpec::dir("data"),
            FileSpec::random("data/big.bin", 5, 24 * MIB),
        ])],
    );
    let (img, _) = skopeo::push_image(&reg, &tmp.path().join("img"), spec, "app:1").unwrap();
    let layer = img.layers[0].blob.digest;
    let size = img.layers[0].blob.size;
    let relay = FaultRelay::start(reg.addr()).unwrap();
    // ~8 MB/s: the layer takes about 3 s to arrive.
    let slow = Fault::Throttle {
        bytes_per_sec: 8_000_000,
    };
    relay.add(&format!("/blobs/{layer}"), slow.clone(), None);
    let storage = tmp.path().join("store");
    let mut proxy = Proxy::start_in(&storage, &[format!("local={}", relay.url())], &[]).unwrap();
    let path = format!("/v2/local/app/blobs/{layer}");
    let fetches = || relay.count("GET", &format!("/blobs/{layer}"));

    // A good blob: two clients (the second joins late) stream it from one upstream fetch,
    // the first byte long before the whole blob is there.
    let (addr, p) = (proxy.addr(), path.clone());
    let first = std::thread::spawn(move || get(&addr, &p));
    std::thread::sleep(Duration::from_millis(700));
    let late = get(&proxy.addr(), &path);
    let first = first.join().unwrap();
    for seen in [&first, &late] {
        assert_eq!(seen.status, 200);
        assert_eq!(seen.content_length, size);
        assert!(seen.complete(), "{} of {size}", seen.body.len());
        assert_eq!(Digest::of(&seen.body), layer);
    }
    let ttfb = first.first_byte.unwrap();
    assert!(
        first.total > Duration::from_secs(2) && ttfb * 5 < first.total,
        "first byte after {ttfb:?}, whole blob after {:?}",
        first.total
    );
    assert_eq!(fetches(), 1, "one upstream fetch for both clients");
    assert_eq!(
        proxy.stats().unwrap().upstream_blob_fetches,
        1,
        "stored once verified"
    );
    assert_eq!(
        proxy
            .get(&format!("/imgd/v1/blobs/{layer}"), &[])
            .unwrap()
            .status,
        200
    );

    // The same blob, now corrupted upstream (one byte near its end), on a fresh proxy.
    proxy.kill().unwrap();
    std::fs::remove_dir_all(&storage).unwrap();
    proxy.restart().unwrap();
    let file = registry_blob_file(&reg, &layer);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 1000;
    bad[at] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();
    let (addr, p) = (proxy.addr(), path.clone());
    let first = std::thread::spawn(move || get(&addr, &p));
    std::thread::sleep(Duration::from_millis(700));
    let second = get(&proxy.addr(), &path);
    let first = first.join().unwrap();
    for seen in [&first, &second] {
        assert_eq!(seen.status, 200, "streaming had begun");
        assert!(!seen.complete(), "a bad blob's response was completed");
        assert!(
            seen.body.len() as u64 > size / 2,
            "bytes were streamed before the verdict: {}",
            seen.body.len()
        );
        assert_eq!(seen.body[..], bad[..seen.body.len()]);
    }
    assert_eq!(fetches(), 2, "both clients shared one fetch");
    let r = proxy.get(&format!("/imgd/v1/blobs/{layer}"), &[]).unwrap();
    assert_eq!(r.status, 404, "nothing stored: {}", r.text());
    assert_eq!(proxy.stored_chunk_files(), 0);
    assert_eq!(proxy.temp_files(), 0, "the spooled chunks are deleted");
    verify_clean(&proxy);
    // The next request fetches again (and is cut off again).
    let again = get(&proxy.addr(), &path);
    assert!(!again.complete());
    assert_eq!(fetches(), 3);

    // kill -9 mid-stream: nothing partial survives.
    std::fs::write(&file, &good).unwrap();
    let (addr, p) = (proxy.addr(), path.clone());
    let client = std::thread::spawn(move || get(&addr, &p));
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.temp_files() < 2 {
        assert!(Instant::now() < deadline, "no progress:\n{}", proxy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.kill().unwrap();
    let cut = client.join().unwrap();
    assert!(
        !cut.complete() && !cut.body.is_empty(),
        "{} bytes",
        cut.body.len()
    );
    assert_eq!(proxy.stored_chunk_files(), 0);
    relay.clear();
    proxy.restart().unwrap();
    assert_eq!(proxy.temp_files(), 0, "spooled chunks are removed at start");
    let report = verify_clean(&proxy);
    assert_eq!(report["blobs"], 0, "{report}");
    let whole = get(&proxy.addr(), &path);
    assert!(whole.complete());
    assert_eq!(Digest::of(&whole.body), layer);
}
