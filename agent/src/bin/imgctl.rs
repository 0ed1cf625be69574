//! `imgctl`: the command line of the imgd agent, over its local unix socket.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use imgd_agent::api::{ImageSummary, PrefetchEvent, PrefetchRequest, Status};
use imgd_agent::fetch::Source;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[path = "imgctl/configure.rs"]
mod configure;

/// Control the imgd agent.
#[derive(Parser)]
#[command(name = "imgctl", version, about)]
struct Cli {
    /// The agent's local API socket.
    #[arg(long, env = "IMGD_SOCKET", default_value = "/run/imgd/imgd.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull every chunk of IMAGE into the cache, with progress.
    Prefetch {
        /// REPO:TAG or REPO@sha256:DIGEST, as the proxy names it (e.g. local/app:1).
        image: String,
        /// Only the files the image's first container start read (its learned trace).
        #[arg(long)]
        startup: bool,
    },
    /// Mount IMAGE read-only at DIR; files are fetched as they are read.
    Mount { image: String, dir: PathBuf },
    /// Unmount an imgd mount.
    Umount { dir: PathBuf },
    /// Keep a cached IMAGE's chunks from eviction.
    Pin { image: String },
    /// Let a pinned IMAGE's chunks be evicted again.
    Unpin { image: String },
    /// Cached images with their size and how much is cached.
    Images,
    /// Cache use, peers and traffic by source.
    Status,
    /// Evict down to the quota and repair the cache.
    Gc,
    /// Re-hash every cached chunk and cross-check the metadata (changes nothing).
    Verify,
    /// Point a container engine at the agent's registry mirror (undoable).
    Configure {
        #[command(subcommand)]
        engine: configure::EngineCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

/// Sends one request over the unix socket; returns the status and the response body.
async fn request(
    socket: &PathBuf,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "the imgd agent is not running (cannot connect to {})",
                socket.display()
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "imgd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        bail!(
            "agent answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(resp)
}

async fn get_json<T: serde::de::DeserializeOwned>(
    socket: &PathBuf,
    method: &str,
    path: &str,
) -> Result<T> {
    let body = request(socket, method, path, None)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    serde_json::from_slice(&body).context("decoding the agent's answer")
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

async fn prefetch(socket: &PathBuf, image: &str, startup: bool) -> Result<()> {
    let req = serde_json::to_vec(&PrefetchRequest {
        image: image.to_string(),
        startup,
    })?;
    let mut body = request(socket, "POST", "/v1/prefetch", Some(req))
        .await?
        .into_body();
    let started = Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut cache, mut peers, mut proxy) = (0u64, 0u64, 0u64);
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            match serde_json::from_slice::<PrefetchEvent>(&line)? {
                PrefetchEvent::Start { image, total_bytes } => {
                    bar.set_length(total_bytes);
                    bar.set_message(image);
                }
                PrefetchEvent::Progress { bytes, source } => {
                    match source {
                        Source::Cache => cache += bytes,
                        Source::Peer => peers += bytes,
                        Source::Proxy => proxy += bytes,
                    }
                    bar.inc(bytes);
                }
                PrefetchEvent::Done(summary) => {
                    bar.finish_and_clear();
                    println!(
                        "{} {} in {:.1}s: {} from cache, {} from peers, {} from proxy",
                        summary.image,
                        mb(summary.total_bytes),
                        started.elapsed().as_secs_f64(),
                        mb(cache),
                        mb(peers),
                        mb(proxy)
                    );
                    return Ok(());
                }
                PrefetchEvent::StartupDone {
                    image,
                    fetched_bytes,
                } => {
                    bar.finish_and_clear();
                    println!(
                        "{image}: startup files warmed, {} fetched in {:.1}s",
                        mb(fetched_bytes),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                PrefetchEvent::Error { message } => {
                    bar.abandon();
                    bail!("prefetch of {image} failed: {message}");
                }
            }
        }
    }
    bail!("the agent closed the prefetch of {image} without a result")
}

async fn pin(socket: &PathBuf, image: String, pinned: bool) -> Result<()> {
    let req = serde_json::to_vec(&imgd_agent::api::PinRequest { image, pinned })?;
    request(socket, "POST", "/v1/pin", Some(req)).await?;
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prefetch { image, startup } => prefetch(&cli.socket, &image, startup).await,
        Command::Mount { image, dir } => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("mount point {}", dir.display()))?;
            let req = serde_json::to_vec(&imgd_agent::api::MountRequest { image, dir })?;
            let body = request(&cli.socket, "POST", "/v1/mount", Some(req))
                .await?
                .into_body()
                .collect()
                .await?
                .to_bytes();
            let m: imgd_agent::mounts::MountStatus = serde_json::from_slice(&body)?;
            println!("mounted {} at {}", m.image, m.dir);
            Ok(())
        }
        Command::Umount { dir } => {
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let req = serde_json::to_vec(&imgd_agent::api::UmountRequest { dir })?;
            request(&cli.socket, "POST", "/v1/umount", Some(req)).await?;
            Ok(())
        }
        Command::Pin { image } => pin(&cli.socket, image, true).await,
        Command::Unpin { image } => pin(&cli.socket, image, false).await,
        Command::Images => {
            let images: Vec<ImageSummary> = get_json(&cli.socket, "GET", "/v1/images").await?;
            println!(
                "{:<40} {:>12} {:>12} {:>6}  MANIFEST",
                "IMAGE", "SIZE", "CACHED", "PINNED"
            );
            for i in images {
                println!(
                    "{:<40} {:>12} {:>12} {:>6}  {}",
                    i.image,
                    mb(i.total_bytes),
                    mb(i.cached_bytes),
                    if i.pinned { "yes" } else { "" },
                    i.manifest_digest
                );
            }
            Ok(())
        }
        Command::Status => {
            let s: Status = get_json(&cli.socket, "GET", "/v1/status").await?;
            println!("node      {}", s.node_id);
            if s.proxies.len() > 1 {
                for p in &s.proxies {
                    let state = if p.up { "up" } else { "down (failing over)" };
                    println!("proxy     {} {state}", p.url);
                }
            } else {
                println!("proxy     {}", s.proxy_url);
            }
            println!(
                "swarm     {} ({} peers known, {} in the routing table)",
                s.swarm,
                s.peers.len(),
                s.routing_table.len()
            );
            println!(
                "cache     {} of {} quota (peak {})",
                mb(s.cache_used_bytes),
                mb(s.cache_quota_bytes),
                mb(s.cache_peak_used_bytes)
            );
            let r = &s.cache_open_repair;
            println!(
                "repaired  at start: {} staged files, {} rows without a file, {} damaged, {} orphans adopted, {} removed",
                r.staged_removed,
                r.rows_without_file,
                r.damaged_removed,
                r.orphans_adopted,
                r.orphans_removed
            );
            println!(
                "received  {} from cache, {} from peers, {} from proxy ({} more as pieces)",
                mb(s.bytes_from_cache),
                mb(s.bytes_from_peers),
                mb(s.bytes_from_proxy),
                mb(s.bytes_from_proxy_pieces)
            );
            println!(
                "in flight {} blobs, {} chunks",
                s.blobs_in_flight, s.chunks_in_flight
            );
            println!("mounts    {}", s.mounts.len());
            for m in &s.mounts {
                let pct = 100.0 * m.fetched_bytes as f64 / m.total_bytes.max(1) as f64;
                println!(
                    "  {} at {} ({}, pid {}): fetched {} in {} chunks ({pct:.1}% of {}), {} reads, {} EIO",
                    m.image,
                    m.dir,
                    m.state,
                    m.pid.map_or("?".to_string(), |p| p.to_string()),
                    mb(m.fetched_bytes),
                    m.fetched_chunks,
                    mb(m.total_bytes),
                    m.reads,
                    m.eio
                );
            }
            println!("peers     {}", s.peers.len());
            for p in s.peers {
                println!("  {} {} penalty {}", p.id, p.data_addr, p.penalty);
            }
            Ok(())
        }
        Command::Gc => {
            let report: serde_json::Value = get_json(&cli.socket, "POST", "/v1/gc").await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Configure { engine } => configure::run(engine),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "imgctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Verify => {
            let report: imgd_agent::cache::VerifyReport =
                get_json(&cli.socket, "GET", "/v1/verify").await?;
            println!(
                "checked {} chunks: {} bad, {} missing, {} orphans",
                report.checked,
                report.bad.len(),
                report.missing.len(),
                report.orphans.len()
            );
            if !report.is_clean() {
                bail!("the cache is not consistent: {report:?}");
            }
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imgctl: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("imgctl: {e:#}");
        std::process::exit(1);
    }
}
