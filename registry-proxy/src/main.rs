//! `imgd-proxy`: run the chunking pull-through proxy.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use imgd_proxy::config::{LogFormat, ProxyConfig, UpstreamConfig, DEFAULT_CONFIG};
use imgd_proxy::server::{serve, AppState};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// OCI pull-through proxy that chunks and indexes every layer.
///
/// Precedence: flags, then their environment variables, then the config file, then the
/// defaults.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see --print-default-config).
    #[arg(long, short, env = "IMGD_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides `listen`).
    #[arg(long, env = "IMGD_PROXY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Storage directory (overrides `storage_dir`).
    #[arg(long, global = true, env = "IMGD_PROXY_STORAGE_DIR")]
    storage_dir: Option<PathBuf>,
    /// Add an upstream: NAME=URL (a registry) or NAME=oci:DIR (an OCI layout). In the
    /// environment variable, several are separated by commas.
    #[arg(
        long = "upstream",
        value_name = "NAME=URL",
        env = "IMGD_PROXY_UPSTREAMS",
        value_delimiter = ','
    )]
    upstreams: Vec<String>,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Log format: text or json (overrides `log_format`).
    #[arg(long, env = "IMGD_LOG_FORMAT", value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Log as JSON lines (same as --log-format json).
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Verify the storage of a stopped proxy: re-hash every blob and chunk, check every
    /// chunk list, index and manifest. Prints a JSON report; exits 1 if anything is wrong.
    Verify,
}

fn parse_upstream(s: &str, first: bool) -> anyhow::Result<UpstreamConfig> {
    let Some((name, target)) = s.split_once('=') else {
        bail!("--upstream {s:?}: expected NAME=URL or NAME=oci:DIR");
    };
    let mut u = UpstreamConfig {
        name: name.to_string(),
        default: first,
        ..Default::default()
    };
    match target.strip_prefix("oci:") {
        Some(dir) => u.layout = Some(dir.into()),
        None => u.url = Some(target.to_string()),
    }
    Ok(u)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => ProxyConfig::load(path)?,
        None => ProxyConfig::default(),
    };
    if let Some(f) = cli.log_format {
        config.log_format = f;
    }
    if cli.log_json {
        config.log_format = LogFormat::Json;
    }
    imgd_core::logging::init(config.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(l) = cli.listen {
        config.listen = l;
    }
    if let Some(d) = cli.storage_dir {
        config.storage_dir = d;
    }
    if let Some(Command::Verify) = cli.command {
        return verify(&config.storage_dir);
    }
    let no_default = !config.upstreams.iter().any(|u| u.default);
    for (i, s) in cli.upstreams.iter().enumerate() {
        config
            .upstreams
            .push(parse_upstream(s, no_default && i == 0)?);
    }
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let listen = config.listen;
        let state = Arc::new(AppState::new(config)?);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve(state, listener, shutdown).await?;
        Ok(())
    })
}

fn verify(dir: &std::path::Path) -> anyhow::Result<()> {
    let storage = imgd_proxy::storage::Storage::open(dir)
        .with_context(|| format!("opening {} (is the proxy still running?)", dir.display()))?;
    let report = imgd_proxy::verify::verify(&storage)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.problems.is_empty() {
        bail!(
            "{} problem(s) found in {}",
            report.problems.len(),
            dir.display()
        );
    }
    Ok(())
}
