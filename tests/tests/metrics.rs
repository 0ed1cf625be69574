//! Operability: `/metrics`, `/healthz` and `/readyz` on imgd-proxy and on the agent (its
//! mirror listener). A prefetch and a read through a lazy mount move the counters by
//! exactly the bytes they moved.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::ImgdMount;
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::registry_client;
use imgd_tests::scrape::Scrape;
use imgd_tests::skopeo;
use std::path::Path;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;

/// Three layers (gzip and uncompressed) of random data, so no two chunks are equal.
fn image() -> ImageSpec {
    ImageSpec::new(
        "obs",
        vec![
            LayerSpec::gzip(vec![
                FileSpec::dir("etc"),
                FileSpec::file("etc/motd", "metrics are counted exactly\n"),
                FileSpec::random("etc/blob.bin", 1, 6 * MIB),
            ]),
            LayerSpec::uncompressed(vec![
                FileSpec::dir("data"),
                FileSpec::random("data/a.bin", 2, 5 * MIB),
            ]),
            LayerSpec::gzip(vec![FileSpec::random("data/b.bin", 3, 300 * 1024)]),
        ],
    )
}

/// A scrape of `url`'s `/metrics`, checked for the format.
fn scrape(url: &str) -> Scrape {
    Scrape::get(url).unwrap()
}

/// Asserts how much `imgd_agent_received_bytes_total` grew from `before` to `after`, by
/// source.
fn assert_received(after: &Scrape, before: &Scrape, expected: &[(&str, f64)]) {
    for &(source, bytes) in expected {
        let series = format!("imgd_agent_received_bytes_total{{source=\"{source}\"}}");
        assert_eq!(after.delta(before, &series), bytes, "{series}");
    }
}

fn get_text(url: &str) -> (u16, String) {
    let r = registry_client::get(url, &[]).unwrap();
    (r.status, String::from_utf8(r.body).unwrap())
}

fn files_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            files_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}

#[test]
fn metrics_health_and_readiness_of_proxy_and_agent_count_what_a_pull_and_a_read_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (info, image_bytes) =
        skopeo::push_image(&reg, &tmp.path().join("img"), image(), "obs:1").unwrap();
    let blobs = info.referenced_blobs();
    let chunks: u64 = blobs.iter().map(|b| b.size.div_ceil(CHUNK)).sum();
    assert_eq!(blobs.len(), 4, "config and three layers");
    assert!(chunks >= 5, "several chunks: {chunks}");

    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    // The swarm is on (readiness checks it) but without mDNS, so no peer of another test
    // on this host serves chunks: every byte comes from the proxy.
    let agent = Agent::start(AgentOptions {
        extra_toml: "mdns = false\n".into(),
        swarm: true,
        ..AgentOptions::local(proxy.url(), tmp.path().join("agent"))
    })
    .unwrap();
    let agent_url = format!("http://{}", agent.mirror);

    // Health and readiness.
    assert_eq!(
        get_text(&format!("{}/healthz", proxy.url())),
        (200, "ok\n".into())
    );
    assert_eq!(
        get_text(&format!("{}/readyz", proxy.url())),
        (200, "ready\nstorage: ok\n".into())
    );
    assert_eq!(
        get_text(&format!("{agent_url}/healthz")),
        (200, "ok\n".into())
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = get_text(&format!("{agent_url}/readyz"));
        if status == 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("not ready\n"), "{body}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status, 200, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[..3], ["ready", "storage: ok", "swarm: listening"]);
    assert!(lines[3].starts_with("data_plane: bound "), "{body}");

    let p0 = scrape(&proxy.url());
    let a0 = scrape(&agent_url);
    assert_eq!(a0.v("imgd_agent_cache_size_bytes"), 0.0);
    assert_eq!(a0.v("imgd_agent_cache_quota_bytes"), 4294967296.0);
    assert_eq!(a0.v("imgd_agent_peers"), 0.0);
    assert_eq!(a0.v("imgd_agent_swarm_listening"), 1.0);
    assert_eq!(p0.v("imgd_proxy_storage_bytes{kind=\"chunks\"}"), 0.0);

    let (ok, out, err) = agent.imgctl(&["prefetch", "local/obs:1"]).unwrap();
    assert!(ok, "prefetch: {out}{err}");
    let p1 = scrape(&proxy.url());
    let a1 = scrape(&agent_url);
    let image = image_bytes as f64;
    println!(
        "image: {image_bytes} bytes in {} blobs, {chunks} chunks",
        blobs.len()
    );

    // The proxy fetched every blob from upstream once and served it as chunks.
    assert_eq!(
        p1.delta(&p0, "imgd_proxy_upstream_received_bytes_total"),
        image
    );
    assert_eq!(
        p1.delta(&p0, "imgd_proxy_upstream_blob_fetches_total"),
        blobs.len() as f64
    );
    assert_eq!(
        p1.delta(&p0, "imgd_proxy_served_bytes_total{api=\"chunk\"}"),
        image
    );
    assert_eq!(
        p1.delta(&p0, "imgd_proxy_chunks_served_total"),
        chunks as f64
    );
    assert_eq!(
        p1.delta(&p0, "imgd_proxy_served_bytes_total{api=\"registry\"}"),
        0.0
    );
    assert_eq!(p1.v("imgd_proxy_storage_bytes{kind=\"chunks\"}"), image);
    assert_eq!(
        p1.v("imgd_proxy_storage_files{kind=\"chunks\"}"),
        chunks as f64
    );
    assert!(
        !p1.0
            .keys()
            .any(|k| k.starts_with("imgd_proxy_upstream_errors_total")
                || k.starts_with("imgd_proxy_verification_failures_total")),
        "no upstream error, no verification failure"
    );

    // The agent received exactly the image from the proxy, and caches exactly it.
    assert_received(&a1, &a0, &[("proxy", image), ("peer", 0.0), ("cache", 0.0)]);
    assert_eq!(
        a1.delta(
            &a0,
            "imgd_agent_chunk_fetch_seconds_count{source=\"proxy\"}"
        ),
        chunks as f64
    );
    assert!(a1.v("imgd_agent_chunk_fetch_seconds_sum{source=\"proxy\"}") > 0.0);
    let cached = files_size(&agent.data_dir.join("data/cache/chunks"));
    assert_eq!(cached, image_bytes);
    assert_eq!(a1.v("imgd_agent_cache_size_bytes"), image);
    assert_eq!(a1.v("imgd_agent_cache_peak_bytes"), image);
    assert_eq!(a1.v("imgd_agent_cache_chunks"), chunks as f64);
    assert_eq!(a1.v("imgd_agent_cache_evictions_total"), 0.0);

    // A second prefetch finds everything in the cache; the proxy serves nothing more.
    let (ok, out, err) = agent.imgctl(&["prefetch", "local/obs:1"]).unwrap();
    assert!(ok, "prefetch: {out}{err}");
    let p2 = scrape(&proxy.url());
    let a2 = scrape(&agent_url);
    assert_received(&a2, &a1, &[("cache", image), ("proxy", 0.0)]);
    assert_eq!(
        p2.delta(&p1, "imgd_proxy_served_bytes_total{api=\"chunk\"}"),
        0.0
    );

    // Blobs served by the proxy's registry API and by the agent's mirror, and an
    // upstream error, are counted.
    let config = &info.config;
    let path = format!("/v2/local/obs/blobs/{}", config.digest);
    assert_eq!(
        proxy.get(&path, &[]).unwrap().body.len() as u64,
        config.size
    );
    let r = registry_client::get(&format!("{agent_url}{path}"), &[]).unwrap();
    assert_eq!((r.status, r.body.len() as u64), (200, config.size));
    let missing = proxy.get("/v2/local/obs/manifests/nope", &[]).unwrap();
    assert_eq!(missing.status, 404);
    let p3 = scrape(&proxy.url());
    let a3 = scrape(&agent_url);
    assert_eq!(
        p3.delta(&p2, "imgd_proxy_served_bytes_total{api=\"registry\"}"),
        config.size as f64
    );
    assert_eq!(
        p3.v("imgd_proxy_upstream_errors_total{status=\"404\"}"),
        1.0
    );
    assert_eq!(
        a3.delta(&a2, "imgd_agent_served_bytes_total{to=\"mirror\"}"),
        config.size as f64
    );
    assert_eq!(a3.v("imgd_agent_served_bytes_total{to=\"peer\"}"), 0.0);

    // A read through a lazy mount is counted on that mount's series.
    let dir = tmp.path().join("mnt");
    let mount = ImgdMount::mount(&agent, "local/obs:1", &dir).unwrap();
    let series = |name: &str| {
        format!(
            "{name}{{mount=\"{}\",image=\"local/obs:1\"}}",
            mount.dir().display()
        )
    };
    let a4 = scrape(&agent_url);
    assert_eq!(a4.v(&series("imgd_agent_fuse_reads_total")), 0.0);
    assert!(
        a4.0.contains_key(&series("imgd_agent_fuse_reads_total")),
        "the mount has its series: {:?}",
        a4.0.keys()
            .filter(|k| k.contains("fuse"))
            .collect::<Vec<_>>()
    );
    let read = std::fs::read(mount.dir().join("data/a.bin")).unwrap();
    assert_eq!(read.len() as u64, 5 * MIB);
    let a5 = scrape(&agent_url);
    let reads = a5.delta(&a4, &series("imgd_agent_fuse_reads_total"));
    println!("reading 5 MiB took {reads} FUSE reads");
    // A FUSE read request is at most 1 MiB (256 pages) and at least a page.
    assert!((5.0..=5.0 * 256.0).contains(&reads), "{reads}");
    assert_eq!(
        a5.delta(&a4, &series("imgd_agent_fuse_read_bytes_total")),
        (5 * MIB) as f64
    );
    assert_eq!(a5.v(&series("imgd_agent_fuse_eio_total")), 0.0);
    // Everything was cached: the read fetched nothing.
    assert_eq!(a5.v(&series("imgd_agent_mount_fetched_bytes_total")), 0.0);
    assert_received(&a5, &a4, &[("proxy", 0.0)]);

    // A cached chunk damaged on disk is caught when read, counted, and fetched again.
    let b = &info.layers[2].blob;
    assert!(b.size < CHUNK, "one chunk, whose digest is the blob's");
    let hex = b.digest.hex();
    let file = agent
        .data_dir
        .join("data/cache/chunks")
        .join(&hex[..2])
        .join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let read = std::fs::read(mount.dir().join("data/b.bin")).unwrap();
    assert_eq!(read.len(), 300 * 1024);
    let a6 = scrape(&agent_url);
    assert_eq!(
        a6.delta(
            &a5,
            "imgd_agent_verification_failures_total{where=\"cache\"}"
        ),
        1.0
    );
    assert_received(&a6, &a5, &[("proxy", b.size as f64)]);
    assert_eq!(
        a6.v(&series("imgd_agent_mount_fetched_bytes_total")),
        b.size as f64
    );
    assert_eq!(a6.v("imgd_agent_cache_size_bytes"), image);
    drop(mount);
    let a7 = scrape(&agent_url);
    assert!(
        !a7.0
            .keys()
            .any(|k| k.starts_with("imgd_agent_fuse_reads_total")),
        "an unmounted mount has no series"
    );
}

/// The multiaddr agent `a` listens on for the swarm on loopback, from its log.
fn loopback_multiaddr(a: &Agent) -> String {
    let id = a.status().unwrap()["node_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = a.log();
        if let Some(at) = log.find("/ip4/127.0.0.1/tcp/") {
            let addr: String = log[at..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            return format!("{addr}/p2p/{id}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no swarm address in\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn chunks_a_peer_serves_are_counted_by_both_agents_and_not_by_the_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (info, image_bytes) =
        skopeo::push_image(&reg, &tmp.path().join("img"), image(), "obs:1").unwrap();
    let chunks: u64 = info
        .referenced_blobs()
        .iter()
        .map(|b| b.size.div_ceil(CHUNK))
        .sum();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    // Generous peer timeouts: on a loaded machine a slow peer must not send B to the proxy.
    let fetch = "[fetch]\npeer_timeout_ms = 30000\nowner_wait_ms = 30000\n";
    let a = Agent::start(AgentOptions {
        extra_toml: format!("mdns = false\n{fetch}"),
        swarm: true,
        ..AgentOptions::local(proxy.url(), tmp.path().join("a"))
    })
    .unwrap();
    let (ok, out, err) = a.imgctl(&["prefetch", "local/obs:1"]).unwrap();
    assert!(ok, "prefetch: {out}{err}");
    // B finds A through a bootstrap address only (no mDNS: no peer of another test).
    let b = Agent::start(AgentOptions {
        extra_toml: format!(
            "mdns = false\nbootstrap = [{:?}]\n{fetch}",
            loopback_multiaddr(&a)
        ),
        swarm: true,
        ..AgentOptions::local(proxy.url(), tmp.path().join("b"))
    })
    .unwrap();
    let (a_url, b_url) = (
        format!("http://{}", a.mirror),
        format!("http://{}", b.mirror),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while scrape(&a_url).v("imgd_agent_peers") < 1.0 || scrape(&b_url).v("imgd_agent_peers") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agents did not meet:\n{}\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let (p0, a0, b0) = (scrape(&proxy.url()), scrape(&a_url), scrape(&b_url));
    let (ok, out, err) = b.imgctl(&["prefetch", "local/obs:1"]).unwrap();
    assert!(ok, "prefetch: {out}{err}");
    let (p1, a1, b1) = (scrape(&proxy.url()), scrape(&a_url), scrape(&b_url));
    let image = image_bytes as f64;
    assert_received(&b1, &b0, &[("peer", image), ("proxy", 0.0)]);
    assert_eq!(
        b1.delta(&b0, "imgd_agent_chunk_fetch_seconds_count{source=\"peer\"}"),
        chunks as f64
    );
    assert_eq!(
        a1.delta(&a0, "imgd_agent_served_bytes_total{to=\"peer\"}"),
        image
    );
    assert_eq!(
        p1.delta(&p0, "imgd_proxy_served_bytes_total{api=\"chunk\"}"),
        0.0
    );
    assert_eq!(b1.v("imgd_agent_peers"), 1.0);
    assert_eq!(b1.v("imgd_agent_peers_usable"), 1.0);
    assert_eq!(b1.v("imgd_agent_cache_size_bytes"), image);
    assert!(
        !b1.0
            .keys()
            .any(|k| k.starts_with("imgd_agent_verification_failures_total")),
        "no verification failure"
    );
}
