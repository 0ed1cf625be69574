//! Upstream faults through imgd-proxy: each gives the client an honest error and leaves
//! nothing stored, and the proxy recovers once the fault is gone. Transient statuses are
//! retried within limits; redirects to blob storage are followed without the registry's
//! credentials; an expiring bearer token is renewed mid-pull; a proxy killed mid-ingest
//! restarts with nothing partial and storage that verifies.

use imgd_core::Digest;
use imgd_tests::daemons::Proxy;
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::{self, presets, ImageInfo, LayoutInfo};
use imgd_tests::process::free_port;
use imgd_tests::registry::Registry;
use imgd_tests::registry_client::HttpResponse;
use imgd_tests::skopeo::{self, Format};
use imgd_tests::token_auth::TokenAuth;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Builds the `small` image as a layout under `dir` and pushes it to `reg` as `app:1`,
/// with the registry's credentials if it has any.
fn push_small_layout(reg: &Registry, dir: &Path) -> LayoutInfo {
    let layout = image::build_layout(&dir.join("small"), &[presets::small_multi_layer()]).unwrap();
    let creds = reg
        .credentials()
        .map(|(user, pass)| format!("{user}:{pass}"));
    let extra: Vec<&str> = creds.iter().flat_map(|c| ["--dest-creds", c]).collect();
    skopeo::push_layout_with(
        &layout.dir,
        "small",
        &reg.docker_ref("app:1"),
        Format::OciExact,
        false,
        &extra,
    )
    .unwrap();
    layout
}

fn push_small(reg: &Registry, dir: &Path) -> ImageInfo {
    push_small_layout(reg, dir).image("small").unwrap().clone()
}

/// The proxy's `local/app:1` pulled with skopeo into `dir/out`; returns that directory.
fn pull_through(proxy: &Proxy, dir: &Path) -> PathBuf {
    let out = dir.join("out");
    skopeo::pull_to_dir(&format!("{}/local/app:1", proxy.addr()), &out).unwrap();
    out
}

fn oci_code(r: &HttpResponse) -> String {
    r.json()
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Asserts that `r` is HTTP `status` with the OCI error `code` in its body.
fn assert_oci_error(r: &HttpResponse, status: u16, code: &str) {
    assert_eq!(
        (r.status, oci_code(r).as_str()),
        (status, code),
        "{}",
        r.text()
    );
}

/// Nothing of a failed fetch is visible: no chunk or temp file, no chunk list.
fn assert_nothing_stored(proxy: &Proxy, blob: &Digest) {
    assert_eq!(proxy.stored_chunk_files(), 0, "no chunk kept");
    assert_eq!(proxy.temp_files(), 0, "no staged file left");
    let r = proxy.get(&format!("/imgd/v1/blobs/{blob}"), &[]).unwrap();
    assert_eq!(r.status, 404, "no chunk list: {}", r.text());
}

/// A proxy for `local` = `url` with extra config TOML: `tables` (e.g. `[retry]`) and
/// `upstream_keys` of the upstream (e.g. credentials).
fn proxy_with(dir: &Path, url: &str, tables: &str, upstream_keys: &str) -> Proxy {
    let text =
        format!("{tables}\n[[upstream]]\nname = \"local\"\nurl = \"{url}\"\n{upstream_keys}\n");
    Proxy::start_with_config(dir, &text).unwrap()
}

/// Upstream keys with the credentials of the registries started by `protected_registry`.
const CREDS: &str = "username = \"imgd\"\npassword = \"s3cret\"";

/// A registry that wants basic auth (the user and password of [`CREDS`]).
fn protected_registry() -> Registry {
    Registry::start_with_htpasswd("imgd", "s3cret").unwrap()
}

fn respond(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Fault {
    Fault::Respond {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.to_vec(),
    }
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
    assert_oci_error(&r, 502, "DIGEST_INVALID");
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
fn upstream_errors_pass_through_with_oci_bodies() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let img = push_small(&reg, tmp.path());
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let proxy = Proxy::start(&[format!("local={}", relay.url())]).unwrap();

    let r = proxy.get("/v2/local/app/manifests/nope", &[]).unwrap();
    assert_oci_error(&r, 404, "MANIFEST_UNKNOWN");
    let unknown = Digest::of(b"not there");
    let r = proxy
        .get(&format!("/v2/local/app/blobs/{unknown}"), &[])
        .unwrap();
    assert_oci_error(&r, 404, "BLOB_UNKNOWN");
    assert_nothing_stored(&proxy, &unknown);

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
    assert_oci_error(&r, 502, "MANIFEST_INVALID");
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
    assert_oci_error(&r, 502, "DIGEST_INVALID");
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
    let reg = protected_registry();
    let layout = push_small_layout(&reg, tmp.path());

    let anonymous = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let r = anonymous.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_oci_error(&r, 401, "UNAUTHORIZED");

    let proxy = proxy_with(tmp.path(), &reg.url(), "", CREDS);
    let out = pull_through(&proxy, tmp.path());
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

const FAST_RETRY: &str = "[retry]\nmax_attempts = 3\ninitial_backoff_ms = 100\nmax_backoff_ms = 400\nmax_retry_after_secs = 2\nmax_total_wait_secs = 5\n";

#[test]
fn transient_statuses_are_retried_within_limits_then_passed_through() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let img = push_small(&reg, tmp.path());
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let proxy = proxy_with(tmp.path(), &relay.url(), FAST_RETRY, "");
    let tag = "/manifests/1";
    let oci_429 = br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#;
    let json = ("Content-Type", "application/json");

    // Two 429s asking for 1 s each: honoured, and the third attempt succeeds.
    relay.add(
        tag,
        respond(429, &[("Retry-After", "1"), json], oci_429),
        Some(2),
    );
    let started = Instant::now();
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(Digest::of(&r.body), img.manifest.digest);
    assert_eq!(relay.count("GET", tag), 3, "two refusals and a success");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After honoured"
    );
    println!(
        "two 429s with Retry-After: 1 answered in {:?}",
        started.elapsed()
    );

    // A 503 burst on a blob: retried with backoff, then the blob is verified and stored.
    let layer = img.layers[0].blob.digest;
    let blob_path = format!("/blobs/{layer}");
    relay.add(&blob_path, respond(503, &[], b"busy"), Some(2));
    let r = proxy
        .get(&format!("/v2/local/app{blob_path}"), &[])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(Digest::of(&r.body), layer);
    assert_eq!(relay.count("GET", &blob_path), 3);

    // A Retry-After beyond the cap (2 s) is not waited for: the 429 passes through at once.
    relay.add(
        tag,
        respond(429, &[("Retry-After", "3600"), json], oci_429),
        Some(1),
    );
    let before = relay.count("GET", tag);
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("3600"));
    assert_eq!(r.body, oci_429.to_vec());
    assert_eq!(relay.count("GET", tag) - before, 1, "no retry");

    // An upstream that stays down: exactly max_attempts, then its 503 and body (for a tag
    // never resolved before; a known one would be answered stale from cache).
    let new_tag = "/manifests/2";
    relay.add(new_tag, respond(503, &[], b"down for maintenance"), None);
    let r = proxy.get("/v2/local/app/manifests/2", &[]).unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("down for maintenance"), "{}", r.text());
    assert_eq!(relay.count("GET", new_tag), 3, "max_attempts = 3");
    let other = img.layers[1].blob.digest;
    relay.add(
        &format!("/blobs/{other}"),
        respond(502, &[], b"bad gateway"),
        None,
    );
    let r = proxy
        .get(&format!("/v2/local/app/blobs/{other}"), &[])
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(relay.count("GET", &format!("/blobs/{other}")), 3);
    let r = proxy.get(&format!("/imgd/v1/blobs/{other}"), &[]).unwrap();
    assert_eq!(r.status, 404, "nothing cached: {}", r.text());
    assert_eq!(proxy.temp_files(), 0);
}

#[test]
fn a_blob_redirected_to_storage_is_fetched_without_the_registry_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = protected_registry();
    let layout = push_small_layout(&reg, tmp.path());
    let img = layout.image("small").unwrap();
    let (good, bad) = (img.layers[0].blob.digest, img.layers[2].blob.digest);
    let good_bytes = std::fs::read(layout.blob_path(&good)).unwrap();
    let mut wrong = std::fs::read(layout.blob_path(&bad)).unwrap();
    wrong[10] ^= 0xff;
    let storage =
        FaultRelay::serve_static(&[("/bucket/good", good_bytes), ("/bucket/bad", wrong)]).unwrap();
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let proxy = proxy_with(tmp.path(), &relay.url(), "", CREDS);
    for (digest, key) in [(good, "good"), (bad, "bad")] {
        let location = format!("{}/bucket/{key}?X-Signature=abc", storage.url());
        relay.add(
            &format!("/blobs/{digest}"),
            respond(307, &[("Location", &location)], b""),
            None,
        );
    }

    let r = proxy
        .get(&format!("/v2/local/app/blobs/{good}"), &[])
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(Digest::of(&r.body), good);
    let asked = relay.seen();
    let to_registry = asked
        .iter()
        .find(|q| q.path.contains(&format!("/blobs/{good}")))
        .unwrap();
    assert!(
        to_registry
            .header("authorization")
            .is_some_and(|a| a.starts_with("Basic ")),
        "the registry gets the credentials: {to_registry:?}"
    );
    let fetched = storage.seen();
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    assert!(fetched[0].path.starts_with("/bucket/good?X-Signature=abc"));
    assert_eq!(
        fetched[0].header("authorization"),
        None,
        "blob storage never sees the registry's credentials"
    );
    let r = proxy
        .get(&format!("/v2/local/app/blobs/{good}"), &[])
        .unwrap();
    assert_eq!(Digest::of(&r.body), good);
    assert_eq!(storage.seen().len(), 1, "served from cache");

    let r = proxy
        .get(&format!("/v2/local/app/blobs/{bad}"), &[])
        .unwrap();
    assert_oci_error(&r, 502, "DIGEST_INVALID");
    let r = proxy.get(&format!("/imgd/v1/blobs/{bad}"), &[]).unwrap();
    assert_eq!(r.status, 404, "nothing cached: {}", r.text());
    assert_eq!(proxy.temp_files(), 0);
    assert_eq!(storage.count("GET", "/bucket/bad"), 1);
}

#[test]
fn a_bearer_token_expiring_mid_pull_is_renewed() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let img = push_small(&reg, tmp.path());
    // Each token is good for 3 requests; the pull makes 5 (manifest, config, 3 layers).
    let front = TokenAuth::start(reg.addr(), 3).unwrap();
    let direct =
        imgd_tests::registry_client::get(&format!("{}/v2/app/manifests/1", front.url()), &[])
            .unwrap();
    assert_eq!(direct.status, 401, "the front wants a token");
    assert!(direct
        .header("www-authenticate")
        .is_some_and(|h| h.contains("realm=")));

    let refused_before = front.refused();
    let proxy = Proxy::start(&[format!("local={}", front.url())]).unwrap();
    let out = pull_through(&proxy, tmp.path());
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    assert_eq!(Digest::of(&manifest), img.manifest.digest);
    for blob in img.referenced_blobs() {
        let bytes = std::fs::read(out.join(blob.digest.hex())).unwrap();
        assert_eq!(Digest::of(&bytes), blob.digest);
    }
    assert!(
        front.tokens_issued() >= 2,
        "renewed: {} tokens",
        front.tokens_issued()
    );
    let refused = front.refused() - refused_before;
    println!(
        "tokens issued: {}, registry requests refused: {refused}",
        front.tokens_issued()
    );
    assert!(refused >= 2, "a challenge and an expiry: {refused}");
}
