//! `imgd`: the node agent daemon.

use anyhow::Context;
use clap::Parser;
use imgd_agent::config::{AgentConfig, DEFAULT_CONFIG};
use std::net::SocketAddr;
use std::path::PathBuf;

/// imgd node agent: verified chunk cache, peer-to-peer chunk sharing, registry mirror.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see --print-default-config).
    #[arg(long, short, env = "IMGD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// imgd-proxy URL (overrides `proxy_url`).
    #[arg(long)]
    proxy: Option<String>,
    /// Local API socket (overrides `socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Registry mirror listen address (overrides `mirror_listen`).
    #[arg(long)]
    mirror_listen: Option<SocketAddr>,
    /// Cache quota in bytes (overrides `cache_quota_bytes`).
    #[arg(long)]
    cache_quota: Option<u64>,
    /// Run without peers.
    #[arg(long)]
    no_swarm: bool,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    imgd_core::logging::init(cli.log_json);
    let mut config = match &cli.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(p) = cli.proxy {
        config.proxy_url = p;
    }
    if let Some(s) = cli.socket {
        config.socket = s;
    }
    if let Some(m) = cli.mirror_listen {
        config.mirror_listen = m;
    }
    if let Some(q) = cli.cache_quota {
        config.cache_quota_bytes = q;
    }
    if cli.no_swarm {
        config.swarm.enabled = false;
    }
    // TLS to an https proxy uses rustls with the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(run(config))
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let socket = config.socket.clone();
    let mirror_listen = config.mirror_listen;
    let agent = imgd_agent::agent::start(config).await?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let api = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    // Owner and group only: the local API mounts images and fills the cache.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o660))
        .with_context(|| format!("restricting {}", socket.display()))?;
    let mirror = tokio::net::TcpListener::bind(mirror_listen)
        .await
        .with_context(|| format!("binding mirror {mirror_listen}"))?;
    tracing::info!(node = agent.node_id, socket = %socket.display(), mirror = %mirror_listen, "imgd ready");
    let api_server = axum::serve(api, imgd_agent::api::router(agent.clone()));
    let mirror_server = axum::serve(mirror, imgd_agent::mirror::router(agent.clone()));
    tokio::select! {
        r = async { api_server.await } => r.context("local API")?,
        r = async { mirror_server.await } => r.context("mirror")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    let _ = agent.fetcher.cache.flush_access();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
