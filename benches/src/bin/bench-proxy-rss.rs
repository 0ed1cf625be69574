//! Streaming memory of imgd-proxy: the peak RSS of the proxy process while a 1 GiB gzip
//! layer is ingested (verified, chunked, indexed) and served, and again when it is served
//! from chunks. The upstream is an OCI layout directory, so only the proxy is measured.
//!
//! `cargo build --workspace --bins --release && cargo run --release -p imgd-benches --bin bench-proxy-rss [-- MiB]`

use anyhow::{bail, Context, Result};
use imgd_benches::{mb_per_s, report};
use imgd_core::Digest;
use imgd_tests::daemons::Proxy;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

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
    }
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((status, body, h.finish()))
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

fn main() -> Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1024);
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
    Ok(())
}
