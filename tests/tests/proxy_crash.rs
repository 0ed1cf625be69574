//! `kill -9` of imgd-proxy while a blob is being chunked: after a restart on the same
//! storage nothing partial is visible, the pull completes, and a full verification pass
//! (`GET /imgd/v1/verify`) finds nothing wrong -- and does find a corrupted chunk.

use imgd_core::Digest;
use imgd_tests::daemons::{workspace_bin, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn verify(proxy: &Proxy) -> serde_json::Value {
    let r = proxy.get("/imgd/v1/verify", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

fn problems(report: &serde_json::Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn kill_9_mid_ingest_leaves_nothing_partial_and_storage_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    // 48 MiB of incompressible data in an uncompressed layer: 12 chunks.
    let spec = ImageSpec::new(
        "crash",
        vec![LayerSpec::uncompressed(vec![
            FileSpec::dir("data"),
            FileSpec::random("data/big.bin", 77, 48 * MIB),
        ])],
    );
    let (img, _) = skopeo::push_image(&reg, &tmp.path().join("img"), spec, "app:1").unwrap();
    let layer = img.layers[0].blob.digest;
    let relay = FaultRelay::start(reg.addr()).unwrap();
    // Slowed to ~6 MB/s, the layer takes ~8 s to arrive.
    relay.add(
        &format!("/blobs/{layer}"),
        Fault::Throttle {
            bytes_per_sec: 6_000_000,
        },
        None,
    );
    let storage = tmp.path().join("store");
    let mut proxy = Proxy::start_in(&storage, &[format!("local={}", relay.url())], &[]).unwrap();
    let url = format!("{}/v2/local/app/blobs/{layer}", proxy.url());
    let client = std::thread::spawn(move || imgd_tests::registry_client::get(&url, &[]));

    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.temp_files() < 3 {
        assert!(
            Instant::now() < deadline,
            "ingest made no progress:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.kill().unwrap();
    let _ = client.join();
    let staged = proxy.temp_files();
    assert!(
        staged >= 3,
        "killed mid-ingest, with chunks staged: {staged}"
    );
    assert_eq!(proxy.stored_chunk_files(), 0, "no chunk was committed");

    relay.clear();
    proxy.restart().unwrap();
    assert_eq!(proxy.temp_files(), 0, "staged files are removed at start");
    let r = proxy.get(&format!("/imgd/v1/blobs/{layer}"), &[]).unwrap();
    assert_eq!(
        r.status,
        404,
        "no chunk list for the cut blob: {}",
        r.text()
    );
    let r = proxy
        .get(&format!("/imgd/v1/indexes/{layer}"), &[])
        .unwrap();
    assert_eq!(r.status, 404, "no index for the cut blob: {}", r.text());
    assert_eq!(proxy.stats().unwrap().upstream_blob_fetches, 0);
    let report = verify(&proxy);
    assert_eq!(problems(&report), Vec::<String>::new(), "{report}");
    assert_eq!(report["blobs"], 0, "{report}");

    let out = tmp.path().join("out");
    skopeo::pull_to_dir(&format!("{}/local/app:1", proxy.addr()), &out).unwrap();
    let pulled = std::fs::read(out.join(layer.hex())).unwrap();
    assert_eq!(Digest::of(&pulled), layer);
    let report = verify(&proxy);
    assert_eq!(problems(&report), Vec::<String>::new(), "{report}");
    assert_eq!(report["blobs"], 2, "config and layer: {report}");
    assert_eq!(report["unreferenced_chunks"], 0, "{report}");
    assert!(report["chunk_files"].as_u64().unwrap() >= 12, "{report}");
    assert_eq!(report["manifests"], 1, "{report}");

    // The pass re-hashes what it checks: one flipped byte in a chunk file is found.
    let r = proxy.get(&format!("/imgd/v1/blobs/{layer}"), &[]).unwrap();
    let chunk = r.json().unwrap()["chunks"]["chunks"][3]["digest"]
        .as_str()
        .unwrap()
        .parse::<Digest>()
        .unwrap();
    let hex = chunk.hex();
    let file = storage.join("chunks").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let found = problems(&verify(&proxy));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains(&layer.to_string()), "{found:?}");

    // The same pass from the command line, on the stopped proxy's storage.
    proxy.kill().unwrap();
    let out = Command::new(workspace_bin("imgd-proxy").unwrap())
        .args(["verify", "--storage-dir"])
        .arg(&storage)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("blob {layer}")), "{stdout}");
    assert!(stderr.contains("1 problem(s)"), "{stderr}");
    std::fs::write(&file, {
        bytes[100] ^= 1;
        &bytes
    })
    .unwrap();
    let out = Command::new(workspace_bin("imgd-proxy").unwrap())
        .args(["verify", "--storage-dir"])
        .arg(&storage)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
