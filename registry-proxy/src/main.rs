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
    /// Add a peer replica's base URL (see `peers`). In the environment variable, several
    /// are separated by commas.
    #[arg(
        long = "peer",
        value_name = "URL",
        env = "IMGD_PROXY_PEERS",
        value_delimiter = ','
    )]
    peers: Vec<String>,
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
    /// Pin IMAGE on the running proxy: fetch it whole and never evict it. IMAGE is
    /// UPSTREAM_PREFIX/REPO:TAG or .../REPO@DIGEST, as pulled through the proxy.
    Pin {
        image: String,
        /// The proxy's URL (default: http:// and the configured listen address).
        #[arg(long)]
        url: Option<String>,
    },
    /// Remove the pin of IMAGE on the running proxy (its content stays until evicted).
    Unpin {
        image: String,
        #[arg(long)]
        url: Option<String>,
    },
    /// List the pins of the running proxy as JSON.
    Pins {
        #[arg(long)]
        url: Option<String>,
    },
}

/// Sends one pin request to the running proxy; prints the JSON answer.
fn pin_request(
    config: &ProxyConfig,
    url: Option<String>,
    method: reqwest::Method,
    image: Option<&str>,
) -> anyhow::Result<()> {
    let base = url.unwrap_or_else(|| format!("http://{}", config.listen));
    let path = match image {
        Some(i) => format!("{}/imgd/v1/pins/{i}", base.trim_end_matches('/')),
        None => format!("{}/imgd/v1/pins", base.trim_end_matches('/')),
    };
    let token = config.chunk_api.required_token()?;
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let mut req = reqwest::Client::new().request(method, &path);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| format!("asking {path}"))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{path}: {status}: {}", body.trim());
        }
        if !body.is_empty() {
            println!("{body}");
        }
        Ok(())
    })
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
    match cli.command {
        Some(Command::Verify) => return verify(&config.storage_dir),
        Some(Command::Pin { image, url }) => {
            return pin_request(&config, url, reqwest::Method::PUT, Some(&image))
        }
        Some(Command::Unpin { image, url }) => {
            return pin_request(&config, url, reqwest::Method::DELETE, Some(&image))
        }
        Some(Command::Pins { url }) => {
            return pin_request(&config, url, reqwest::Method::GET, None)
        }
        None => {}
    }
    let no_default = !config.upstreams.iter().any(|u| u.default);
    for (i, s) in cli.upstreams.iter().enumerate() {
        config
            .upstreams
            .push(parse_upstream(s, no_default && i == 0)?);
    }
    config.peers.extend(cli.peers);
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
