//! Upstream faults through imgd-proxy: each gives the client an honest error and leaves
//! nothing stored, and the proxy recovers once the fault is gone.

use imgd_core::Digest;
use imgd_tests::daemons::Proxy;
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{self, presets, ImageInfo};
use imgd_tests::process::free_port;
use imgd_tests::registry::Registry;
use imgd_tests::registry_client::HttpResponse;
use imgd_tests::skopeo::{self, Format};
use std::path::Path;
use std::time::{Duration, Instant};

fn push_small(reg: &Registry, dir: &Path) -> ImageInfo {
    let layout = image::build_layout(&dir.join("small"), &[presets::small_multi_layer()]).unwrap();
    skopeo::push_layout(
        &layout.dir,
        "small",
        &reg.docker_ref("app:1"),
        Format::OciExact,
        false,
    )
    .unwrap();
    layout.image("small").unwrap().clone()
}

fn oci_code(r: &HttpResponse) -> String {
    r.json()
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Nothing of a failed fetch is visible: no chunk or temp file, no chunk list.
fn assert_nothing_stored(proxy: &Proxy, blob: &Digest) {
    assert_eq!(proxy.stored_chunk_files(), 0, "no chunk kept");
    assert_eq!(proxy.temp_files(), 0, "no staged file left");
    let r = proxy.get(&format!("/imgd/v1/blobs/{blob}"), &[]).unwrap();
    assert_eq!(r.status, 404, "no chunk list: {}", r.text());
}

fn registry_blob_file(reg: &Registry, d: &Digest) -> std::path::PathBuf {
    let hex = d.hex();
    reg.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let img = push_small(&reg, tmp.path());
    let layer = img.layers[0].blob.digest;
    let file = registry_blob_file(&reg, &layer);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();

    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let path = format!("/v2/local/app/blobs/{layer}");
    let r = proxy.get(&path, &[]).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(oci_code(&r), "DIGEST_INVALID");
    assert!(r.text().contains(&layer.to_string()));
    assert_nothing_stored(&proxy, &layer);

    std::fs::write(&file, &good).unwrap();
    let r = proxy.get(&path, &[]).unwrap();
    assert_eq!(r.status, 200, "recovers once upstream is fixed");
    assert_eq!(Digest::of(&r.body), layer);
}

#[test]
fn a_truncated_blob_body_is_refused_and_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let img = push_small(&reg, tmp.path());
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let proxy = Proxy::start(&[format!("local={}", relay.url())]).unwrap();
    let layer = img.layers[0].blob.digest;
    relay.add(
        &format!("/blobs/{layer}"),
        Fault::Truncate { after: 1000 },
        None,
    );
    let path = format!("/v2/local/app/blobs/{layer}");
    let r = proxy.get(&path, &[]).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_nothing_stored(&proxy, &layer);

    relay.clear();
    let r = proxy.get(&path, &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(Digest::of(&r.body), layer);
}

#[test]
fn upstream_statuses_pass_through_with_oci_bodies() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let img = push_small(&reg, tmp.path());
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let proxy = Proxy::start(&[format!("local={}", relay.url())]).unwrap();

    let r = proxy.get("/v2/local/app/manifests/nope", &[]).unwrap();
    assert_eq!((r.status, oci_code(&r).as_str()), (404, "MANIFEST_UNKNOWN"));
    let unknown = Digest::of(b"not there");
    let r = proxy
        .get(&format!("/v2/local/app/blobs/{unknown}"), &[])
        .unwrap();
    assert_eq!((r.status, oci_code(&r).as_str()), (404, "BLOB_UNKNOWN"));
    assert_nothing_stored(&proxy, &unknown);

    let oci_body = br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#.to_vec();
    relay.add(
        "/manifests/1",
        Fault::Respond {
            status: 429,
            headers: vec![
                ("Retry-After".into(), "7".into()),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: oci_body.clone(),
        },
        Some(1),
    );
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.body, oci_body);

    relay.add(
        "/manifests/1",
        Fault::Respond {
            status: 503,
            headers: vec![],
            body: b"down for maintenance".to_vec(),
        },
        Some(1),
    );
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("down for maintenance"), "{}", r.text());

    // Malformed JSON is refused, and so is a manifest that does not match its digest.
    relay.add(
        "/manifests/1",
        Fault::Respond {
            status: 200,
            headers: vec![],
            body: b"{not json".to_vec(),
        },
        Some(1),
    );
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(
        (r.status, oci_code(&r).as_str()),
        (502, "MANIFEST_INVALID"),
        "{}",
        r.text()
    );
    let by_digest = format!("/manifests/{}", img.manifest.digest);
    let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#.to_vec();
    relay.add(
        &by_digest,
        Fault::Respond {
            status: 200,
            headers: vec![],
            body: other,
        },
        Some(1),
    );
    let r = proxy
        .get(&format!("/v2/local/app{by_digest}"), &[])
        .unwrap();
    assert_eq!(
        (r.status, oci_code(&r).as_str()),
        (502, "DIGEST_INVALID"),
        "{}",
        r.text()
    );
    // Nothing of that was cached: the real manifest comes through now.
    let r = proxy
        .get(&format!("/v2/local/app{by_digest}"), &[])
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(Digest::of(&r.body), img.manifest.digest);
}

#[test]
fn credentials_are_needed_and_used_for_a_protected_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start_with_htpasswd("imgd", "s3cret").unwrap();
    let layout =
        image::build_layout(&tmp.path().join("small"), &[presets::small_multi_layer()]).unwrap();
    skopeo::push_layout_with(
        &layout.dir,
        "small",
        &reg.docker_ref("app:1"),
        Format::OciExact,
        false,
        &["--dest-creds", "imgd:s3cret"],
    )
    .unwrap();

    let anonymous = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let r = anonymous.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(
        (r.status, oci_code(&r).as_str()),
        (401, "UNAUTHORIZED"),
        "{}",
        r.text()
    );

    let config = tmp.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!("[[upstream]]\nname = \"local\"\nurl = \"{}\"\nusername = \"imgd\"\npassword = \"s3cret\"\n", reg.url()),
    )
    .unwrap();
    let storage = tmp.path().join("store");
    let proxy = Proxy::start_in(&storage, &[], &["--config", config.to_str().unwrap()]).unwrap();
    let out = tmp.path().join("out");
    let src = format!("docker://{}/local/app:1", proxy.addr());
    skopeo::copy(
        &src,
        &format!("dir:{}", out.display()),
        &["--src-tls-verify=false"],
    )
    .unwrap();
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    assert_eq!(
        Digest::of(&manifest),
        layout.image("small").unwrap().manifest.digest
    );
}

#[test]
fn a_dead_upstream_fails_fast_and_stores_nothing() {
    let dead = format!("http://127.0.0.1:{}", free_port().unwrap());
    let proxy = Proxy::start(&[format!("local={dead}")]).unwrap();
    let started = Instant::now();
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let blob = Digest::of(b"x");
    let r = proxy
        .get(&format!("/v2/local/app/blobs/{blob}"), &[])
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("unreachable"), "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert_nothing_stored(&proxy, &blob);
}
