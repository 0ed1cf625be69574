//! `imgd`: the node agent daemon.

use anyhow::Context;
use clap::Parser;
use imgd_agent::config::{AgentConfig, LogFormat, DEFAULT_CONFIG};
use std::net::SocketAddr;
use std::path::PathBuf;

/// imgd node agent: verified chunk cache, peer-to-peer chunk sharing, registry mirror.
///
/// Precedence: flags, then their environment variables, then the config file, then the
/// defaults.
#[derive(Parser)]
#[command(name = "imgd", version, about)]
struct Cli {
    /// TOML configuration file (see --print-default-config).
    #[arg(long, short, env = "IMGD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, env = "IMGD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// imgd-proxy URL (overrides `proxy_url` and `proxy_urls`).
    #[arg(long, env = "IMGD_PROXY_URL")]
    proxy: Option<String>,
    /// Local API socket (overrides `socket`).
    #[arg(long, env = "IMGD_SOCKET")]
    socket: Option<PathBuf>,
    /// Registry mirror and /metrics listen address (overrides `mirror_listen`).
    #[arg(long, env = "IMGD_MIRROR_LISTEN")]
    mirror_listen: Option<SocketAddr>,
    /// Cache quota in bytes (overrides `cache_quota_bytes`).
    #[arg(long, env = "IMGD_CACHE_QUOTA")]
    cache_quota: Option<u64>,
    /// Run without peers.
    #[arg(long, env = "IMGD_NO_SWARM")]
    no_swarm: bool,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Log format: text or json (overrides `log_format`).
    #[arg(long, env = "IMGD_LOG_FORMAT", value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Log as JSON lines (same as --log-format json).
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(f) = cli.log_format {
        config.log_format = f;
    }
    if cli.log_json {
        config.log_format = LogFormat::Json;
    }
    imgd_core::logging::init(config.log_format);
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(p) = cli.proxy {
        config.proxy_url = p;
        config.proxy_urls.clear();
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
    // Every TCP listener is bound before the local API's socket appears, so that the
    // socket answering means the agent is ready (a port in use fails the start first).
    let mirror = tokio::net::TcpListener::bind(mirror_listen)
        .await
        .with_context(|| format!("binding mirror {mirror_listen}"))?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let api = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    // Owner and group only: the local API mounts images and fills the cache.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o660))
        .with_context(|| format!("restricting {}", socket.display()))?;
    if agent.config.snapshotter.enabled {
        start_snapshotter(agent.clone()).await?;
    }
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

/// Opens the containerd snapshotter and serves it on its socket in the background.
async fn start_snapshotter(agent: std::sync::Arc<imgd_agent::agent::Agent>) -> anyhow::Result<()> {
    use imgd_agent::snapshotter::{grpc, Snapshotter};
    let socket = agent.config.snapshotter_socket();
    let root = agent.config.data_dir.join("snapshotter");
    let snapshotter =
        std::sync::Arc::new(Snapshotter::open(agent, &root).context("opening the snapshotter")?);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o660))
        .with_context(|| format!("restricting {}", socket.display()))?;
    let restoring = snapshotter.clone();
    tokio::spawn(async move { restoring.restore().await });
    tracing::info!(socket = %socket.display(), "containerd snapshotter ready");
    tokio::spawn(async move {
        if let Err(e) = grpc::serve(snapshotter, listener).await {
            tracing::error!(error = %e, "snapshotter stopped");
        }
    });
    Ok(())
}
