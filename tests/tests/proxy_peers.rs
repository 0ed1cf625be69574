//! Proxy replicas that know each other (`peers`): a blob one replica stores is ingested by
//! the other from it, not from upstream; a peer that lies or is dead costs one failed
//! response or nothing, never a bad blob; and a peer never lets a repository see a blob
//! its upstream would not show it.

use imgd_tests::daemons::Proxy;
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::image::presets;
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use serde_json::json;
use std::path::Path;

/// A proxy of the registry behind `relay`, with `peers`.
fn proxy(dir: &Path, relay: &FaultRelay, peers: &[String]) -> Proxy {
    let mut args = Vec::new();
    for p in peers {
        args.push("--peer".to_string());
        args.push(p.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start_in(dir, &[format!("local={}", relay.url())], &args).unwrap()
}

/// Pulls `image` through `proxy` with skopeo, which checks every digest.
fn pull(proxy: &Proxy, image: &str, out: &Path) {
    skopeo::copy(
        &format!("docker://{}/{image}", proxy.addr()),
        &format!("oci:{}:x", out.display()),
        &["--src-tls-verify=false"],
    )
    .unwrap();
}

fn blob_gets(relay: &FaultRelay) -> usize {
    relay.count("GET", "/blobs/")
}

fn assert_verifies(proxy: &Proxy) {
    let report = proxy.get("/imgd/v1/verify", &[]).unwrap().json().unwrap();
    assert_eq!(report["problems"], json!([]), "{report}");
}

#[test]
fn a_replica_ingests_from_its_peer_and_upstream_sends_each_blob_once() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (image, size) = skopeo::push_image(
        &reg,
        &tmp.path().join("img"),
        presets::big_gzip(80),
        "big:1",
    )
    .unwrap();
    let blobs = image.referenced_blobs().len() as u64;
    let relays = [
        FaultRelay::start(reg.addr()).unwrap(),
        FaultRelay::start(reg.addr()).unwrap(),
    ];
    // b names a as its peer; a names none.
    let a = proxy(&tmp.path().join("a"), &relays[0], &[]);
    let b = proxy(&tmp.path().join("b"), &relays[1], &[a.url()]);

    pull(&a, "local/big:1", &tmp.path().join("pull-a"));
    let sa = a.stats().unwrap();
    assert_eq!(sa.upstream_blob_fetches, blobs, "{sa:?}");
    assert_eq!(sa.upstream_blob_bytes, size, "{sa:?}");

    pull(&b, "local/big:1", &tmp.path().join("pull-b"));
    let sb = b.stats().unwrap();
    assert_eq!(
        sb.upstream_blob_fetches, 0,
        "b fetched from upstream: {sb:?}"
    );
    assert_eq!(sb.peer_blob_fetches, blobs, "{sb:?}");
    assert_eq!(sb.peer_blob_bytes, size, "{sb:?}");
    assert_eq!(
        blob_gets(&relays[1]),
        0,
        "b's upstream relay saw blob GETs: {:?}",
        relays[1].seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    assert_eq!(blob_gets(&relays[0]) as u64, blobs);
    let metrics = b.get("/metrics", &[]).unwrap().text();
    assert!(
        metrics.contains(&format!("imgd_proxy_peer_blob_fetches_total {blobs}")),
        "{metrics}"
    );
    assert_verifies(&a);
    assert_verifies(&b);
}

#[test]
fn a_lying_peer_costs_one_cut_response_and_a_dead_one_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (image, _) = skopeo::push_image(
        &reg,
        &tmp.path().join("img"),
        presets::big_gzip(20),
        "big:1",
    )
    .unwrap();
    let layer = image.layers[0].blob.clone();
    let upstream = FaultRelay::start(reg.addr()).unwrap();
    let honest = proxy(&tmp.path().join("honest"), &upstream, &[]);
    let path = format!("/v2/local/big/blobs/{}", layer.digest);
    assert_eq!(honest.get(&path, &[]).unwrap().status, 200);

    // The liar is the honest proxy behind a relay that flips a byte of every blob it serves.
    let liar = FaultRelay::start(&honest.addr()).unwrap();
    liar.add("/data", Fault::FlipByte { at: 12345 }, None);
    let own_upstream = FaultRelay::start(reg.addr()).unwrap();
    let dead = "http://127.0.0.1:9".to_string();
    let c = proxy(&tmp.path().join("c"), &own_upstream, &[liar.url(), dead]);

    // First request: the liar's blob fails its digest; the response is cut off.
    let first = c.get(&path, &[]);
    let cut = match &first {
        Err(_) => true,
        Ok(r) => r.status != 200 || r.body.len() as u64 != layer.size,
    };
    assert!(cut, "a response was completed with a wrong blob");
    assert_eq!(liar.count("GET", "/data"), 1);
    assert_eq!(c.stored_chunk_files(), 0, "the bad blob left chunks");
    assert_eq!(c.temp_files(), 0, "the bad blob left temp files");

    // The liar is now asked last; the dead peer refuses; upstream serves the blob.
    let second = c.get(&path, &[]).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(imgd_core::Digest::of(&second.body), layer.digest);
    let s = c.stats().unwrap();
    assert_eq!(
        (s.upstream_blob_fetches, s.peer_blob_fetches),
        (1, 0),
        "{s:?}"
    );
    assert_eq!(
        liar.count("GET", "/data"),
        1,
        "the liar was asked again at once"
    );
    assert_verifies(&c);
}

#[test]
fn a_peer_does_not_widen_what_a_repository_may_see() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (image, _) =
        skopeo::push_image(&reg, &tmp.path().join("img"), presets::big_gzip(8), "big:1").unwrap();
    skopeo::push_image(
        &reg,
        &tmp.path().join("other"),
        presets::small_multi_layer(),
        "other:1",
    )
    .unwrap();
    let layer = image.layers[0].blob.digest;
    let relays = [
        FaultRelay::start(reg.addr()).unwrap(),
        FaultRelay::start(reg.addr()).unwrap(),
    ];
    let a = proxy(&tmp.path().join("a"), &relays[0], &[]);
    assert_eq!(
        a.get(&format!("/v2/local/big/blobs/{layer}"), &[])
            .unwrap()
            .status,
        200
    );
    let b = proxy(&tmp.path().join("b"), &relays[1], &[a.url()]);
    // `other` does not hold the layer upstream: b must say so, though its peer stores it.
    let r = b
        .get(&format!("/v2/local/other/blobs/{layer}"), &[])
        .unwrap();
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    let s = b.stats().unwrap();
    assert_eq!(
        (s.peer_blob_fetches, s.upstream_blob_fetches),
        (0, 0),
        "{s:?}"
    );
    // Asked under the repository that holds it, b takes it from the peer.
    let r = b.get(&format!("/v2/local/big/blobs/{layer}"), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(b.stats().unwrap().peer_blob_fetches, 1);
    assert_eq!(blob_gets(&relays[1]), 0);
}
