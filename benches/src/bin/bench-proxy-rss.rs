//! Streaming memory and time to first byte of imgd-proxy.
//!
//! 1. Peak RSS of the proxy process while a 1 GiB gzip layer is ingested (verified,
//!    chunked, indexed) and served, and again when it is served from chunks. The upstream
//!    is an OCI layout directory, so only the proxy is measured.
//! 2. Time to first byte of the same uncached layer from a real registry (docker-registry)
//!    in a network namespace behind a tbf-shaped link: asked of the registry itself (the
//!    baseline, best of 3 cold requests), then through a fresh proxy (which streams it
//!    while it ingests), with the ratio and the proxy's peak RSS during that first pull.
//!
//! `cargo build --workspace --bins --release && cargo run --release -p imgd-benches --bin bench-proxy-rss [-- MiB [Mbit/s]]`
//! (defaults: 1024 MiB, 1000 Mbit/s). Part 2 needs root (network namespaces, tc).

use anyhow::{bail, Context, Result};
use imgd_benches::{mb_per_s, numeric_arg, report};
use imgd_core::Digest;
use imgd_tests::daemons::Proxy;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Writes an OCI layout holding one image with one gzip layer of ~`mib` MiB.
fn make_layout(dir: &Path, mib: u64) -> Result<(Digest, u64)> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    let sh = format!(
        "head -c {}M /dev/urandom > {s}/data.bin && tar -C {s} -cf - . | gzip -1 > {d}/layer",
        mib,
        s = src.display(),
        d = dir.display()
    );
    if !Command::new("sh").arg("-c").arg(&sh).status()?.success() {
        bail!("building the layer failed");
    }
    std::fs::remove_dir_all(&src)?;
    let layer = dir.join("layer");
    let layer_digest = hash_file(&layer)?;
    let size = std::fs::metadata(&layer)?.len();
    std::fs::rename(&layer, blobs.join(layer_digest.hex()))?;
    let put = |bytes: &[u8]| -> Result<Digest> {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes)?;
        Ok(d)
    };
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = put(config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest.to_string(), "size": size}],
    })
    .to_string();
    let manifest_digest = put(manifest.as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest.to_string(),
                       "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "big"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok((layer_digest, size))
}

fn hash_file(path: &Path) -> Result<Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = imgd_core::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// GETs `path` from `addr`, hashing the body as it streams; returns (status line, bytes, digest).
fn get_streaming(addr: &str, path: &str) -> Result<(String, u64, Digest)> {
    let (status, bytes, digest, _) = get_timed(addr, path, false)?;
    Ok((status, bytes, digest))
}

/// Like [`get_streaming`], also timing the first body byte from the connect; with
/// `first_only`, stops there (bytes and digest then cover what was read).
fn get_timed(
    addr: &str,
    path: &str,
    first_only: bool,
) -> Result<(String, u64, Digest, Option<Duration>)> {
    let t = Instant::now();
    let mut first = None;
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut h = imgd_core::Sha256::new();
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        if body == 0 && !head.ends_with(b"\r\n\r\n") {
            let need = data.len();
            head.extend_from_slice(data);
            match head.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(p) => {
                    let rest = head.len() - (p + 4);
                    data = &data[need - rest..];
                    head.truncate(p + 4);
                }
                None => continue,
            }
        }
        body += data.len() as u64;
        h.update(data);
        if !data.is_empty() && first.is_none() {
            first = Some(t.elapsed());
            if first_only {
                break;
            }
        }
    }
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((status, body, h.finish(), first))
}

fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Part 2: time to first byte from a registry behind a shaped link, directly and
/// through a fresh proxy.
fn ttfb_through_shaped_link(layout: &Path, layer: Digest, size: u64, mbit: u32) -> Result<()> {
    let lan = imgd_tests::netns::Lan::new(1)?;
    let host = &lan.hosts[0];
    let reg = imgd_tests::registry::Registry::start_on_host(host)?;
    eprintln!("pushing the layer to the registry at {} ...", reg.addr());
    imgd_tests::skopeo::push_layout(
        layout,
        "big",
        &reg.docker_ref("big:1"),
        imgd_tests::skopeo::Format::OciExact,
        false,
    )?;
    host.shape(mbit)?;
    let path = format!("/v2/big/blobs/{layer}");
    let mut upstream = Vec::new();
    for _ in 0..3 {
        let (status, _, _, first) = get_timed(reg.addr(), &path, true)?;
        match first {
            Some(t) if status.contains("200") => upstream.push(t),
            _ => bail!("registry: {status}, no body"),
        }
    }
    let upstream = upstream.into_iter().min().context("no upstream run")?;
    let proxy_path = format!("/v2/up/big/blobs/{layer}");
    let fresh_proxy = |tmp: &tempfile::TempDir| {
        Proxy::start_in(
            &tmp.path().join("storage"),
            &[format!("up=http://{}", reg.addr())],
            &[],
        )
    };
    // Cold, like the baseline: a fresh proxy each time, stopped after the first byte. As
    // in any pull, the manifest comes first (which also settles upstream auth, the
    // registry's `/v2/` challenge); the layer itself is not cached.
    let mut cold = Vec::new();
    for _ in 0..3 {
        let tmp = tempfile::tempdir()?;
        let proxy = fresh_proxy(&tmp)?;
        let (status, _, _, _) = get_timed(&proxy.addr(), "/v2/up/big/manifests/1", false)?;
        if !status.contains("200") {
            bail!("manifest through the proxy: {status}");
        }
        let (status, _, _, first) = get_timed(&proxy.addr(), &proxy_path, true)?;
        match first {
            Some(t) if status.contains("200") => cold.push(t),
            _ => bail!("proxy: {status}, no body"),
        }
    }
    let cold = cold.into_iter().min().context("no proxy run")?;
    let tmp = tempfile::tempdir()?;
    let proxy = fresh_proxy(&tmp)?;
    let t = Instant::now();
    let (status, bytes, digest, first) = get_timed(&proxy.addr(), &proxy_path, false)?;
    let whole = t.elapsed();
    if !status.contains("200") || bytes != size || digest != layer {
        bail!("pull through the proxy: {status}, {bytes} of {size} bytes, digest {digest}");
    }
    let first = first.context("no first byte")?;
    let rss = peak_rss_mib(proxy.pid())?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("link: {mbit} Mbit/s (tc tbf) between the registry's namespace and the proxy");
    report(
        "registry's own time to first byte (best of 3)",
        ms(upstream),
        "ms",
    );
    report(
        "proxy's time to first byte, uncached (best of 3)",
        ms(cold),
        "ms",
    );
    report(
        "ratio proxy / registry (target <= 2)",
        cold.as_secs_f64() / upstream.as_secs_f64(),
        "x",
    );
    report(
        "proxy's time to first byte, the whole pull below",
        ms(first),
        "ms",
    );
    report(
        "first pull through the proxy, whole layer",
        mb_per_s(size, whole),
        "MB/s",
    );
    report(
        "proxy peak RSS streaming the first pull (target < 200)",
        rss,
        "MiB",
    );
    Ok(())
}

fn main() -> Result<()> {
    let mib = numeric_arg(1, 1024)?;
    let mbit = u32::try_from(numeric_arg(2, 1000)?)?;
    let tmp = tempfile::tempdir()?;
    eprintln!("building a gzip layer of {mib} MiB ...");
    let (layer, size) = make_layout(&tmp.path().join("layout"), mib)?;
    let proxy = Proxy::start_in(
        &tmp.path().join("storage"),
        &[format!("bench=oci:{}", tmp.path().join("layout").display())],
        &[],
    )?;
    let idle = peak_rss_mib(proxy.pid())?;
    let path = format!("/v2/bench/big/blobs/{layer}");
    let t = Instant::now();
    let (status, bytes, digest) = get_streaming(&proxy.addr(), &path)?;
    let first = t.elapsed();
    if !status.contains("200") || bytes != size || digest != layer {
        bail!("first pull: {status}, {bytes} of {size} bytes, digest {digest}");
    }
    let after_first = peak_rss_mib(proxy.pid())?;
    let t = Instant::now();
    let (status, bytes, digest) = get_streaming(&proxy.addr(), &path)?;
    let second = t.elapsed();
    if !status.contains("200") || bytes != size || digest != layer {
        bail!("second pull: {status}, {bytes} bytes");
    }
    let after_second = peak_rss_mib(proxy.pid())?;
    println!(
        "layer: {:.1} MB gzip ({mib} MiB of tar content)",
        size as f64 / 1e6
    );
    report("proxy peak RSS at start", idle, "MiB");
    report(
        "proxy peak RSS after ingest + serve (target < 200)",
        after_first,
        "MiB",
    );
    report(
        "proxy peak RSS after serving from chunks",
        after_second,
        "MiB",
    );
    report(
        "first pull (ingest, verify, chunk, index, serve)",
        mb_per_s(size, first),
        "MB/s",
    );
    report(
        "second pull (served from chunks)",
        mb_per_s(size, second),
        "MB/s",
    );
    drop(proxy);
    ttfb_through_shaped_link(&tmp.path().join("layout"), layer, size, mbit)
}
