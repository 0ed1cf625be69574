//! Agent configuration: one TOML file, overridden by flags; `imgd --print-default-config`
//! prints [`DEFAULT_CONFIG`], every key documented next to its default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The documented default configuration.
pub const DEFAULT_CONFIG: &str = r#"# imgd agent configuration. Every key is optional; the value shown is the default.

# Environment variables (IMGD_*) override the keys they name; flags override both.

# Cache and metadata directory (chunk files + RocksDB). Env: IMGD_DATA_DIR.
data_dir = "/var/lib/imgd"

# Largest size of the chunk cache, in bytes. Least recently used chunks are evicted
# beyond it; chunks of pinned or mounted images never are. Env: IMGD_CACHE_QUOTA.
cache_quota_bytes = 21474836480

# Base URL of imgd-proxy (its registry API and chunk API). Env: IMGD_PROXY_URL.
proxy_url = "http://127.0.0.1:5000"

# Several proxy replicas instead of proxy_url. Each blob, chunk and manifest goes to the
# replica chosen by rendezvous hashing of its digest, so the fleet spreads over them, and
# a request fails over to the others when its replica is down, failing or sends bad data.
# proxy_urls = ["http://proxy-a:5000", "http://proxy-b:5000"]

# Token for a proxy whose chunk API requires one (its `[chunk_api] token`), or a file
# holding it. Sent as `Authorization: Bearer` with every chunk API request.
# proxy_token = ""
# proxy_token_file = "/etc/imgd/proxy-token"

# Unix socket of the local API that imgctl talks to. Env: IMGD_SOCKET (imgctl too).
socket = "/run/imgd/imgd.sock"

# Registry mirror endpoint for containerd (hosts.toml) and podman (registries.conf).
# The operations endpoints are served here too: GET /metrics (Prometheus), /healthz
# (the process answers) and /readyz (storage open, swarm listening). Loopback only by
# default; binding it wider exposes them as well. Env: IMGD_MIRROR_LISTEN.
mirror_listen = "127.0.0.1:5050"

# Log format on stderr: "text" (human-readable) or "json" (one JSON object a line).
# The level filter comes from RUST_LOG (default "info"). Env: IMGD_LOG_FORMAT.
log_format = "text"

[swarm]
# Set false to run without peers (cache and proxy only). Flag: --no-swarm
# (env IMGD_NO_SWARM=true).
enabled = true
# libp2p listen address (TCP, a private network under the swarm key), used for
# discovery and membership. The old name quic_listen is still accepted.
listen = "0.0.0.0:7400"
# Chunk data plane listen address (TCP), authenticated with the swarm key.
data_listen = "0.0.0.0:7401"
# File holding the 32-byte swarm key as 64 hex digits (make one with
# `openssl rand -hex 32`). Only agents with the same key see each other: a host without
# it cannot connect, join Kademlia or fetch. Unset: the agent joins no swarm (cache and
# proxy only) and says so at start.
# key_file = "/etc/imgd/swarm.key"
# If non-empty, only these node ids (libp2p peer ids) may fetch from this agent.
allow_list = []
# Multiaddrs of bootstrap peers for networks without multicast, e.g.
# "/ip4/198.18.0.2/tcp/7400/p2p/12D3Koo...".
bootstrap = []
# mDNS discovery on the LAN.
mdns = true
# This host's zone (subnet, rack, availability zone): letters, digits, '.', '_', '-', at
# most 63. Hosts prefer peers of their own zone and split the proxy's work within it,
# so the proxy sends about one copy per zone. Unset: no zone (all peers are equal).
# zone = "rack-a"

[mount]
# A read on a lazy mount whose chunks no source delivers within this time fails with
# EIO instead of hanging, in milliseconds. While the agent is down (mounts outlive it),
# reads of uncached data retry it for this long.
read_timeout_ms = 10000
# FUSE worker threads per mount.
threads = 4
# How long after a mount (of an image without a startup trace yet) the files opened are
# recorded as the image's startup trace, in seconds. The trace is also stored at umount.
trace_secs = 30

[snapshotter]
# Serve containerd's snapshots API (a proxy snapshotter, `[proxy_plugins.imgd]`) on a
# unix socket; `imgctl configure containerd --snapshotter` points containerd at it.
enabled = true
# Its socket. Empty: `snapshotter.sock` next to `socket` (/run/imgd/snapshotter.sock).
socket = ""

[fetch]
# Time limit for a peer's answer to start, and for each gap in its body, before trying
# another source, in milliseconds (an answer that keeps coming may take 4 times this).
peer_timeout_ms = 3000
# Time limit for one request to the proxy, in milliseconds.
proxy_timeout_ms = 30000
# Chunks fetched at once per blob.
parallel_chunks = 4
# How long a watched host's have-map may stay unchanged before the chunks it owns pass
# to the next host in line, and how long the whole swarm view may stay unchanged before
# this host fetches any chunk from the proxy itself, in milliseconds.
owner_wait_ms = 4000
# How long a lazy read waits for the chunk's owner among the hosts reading the image to
# start fetching it before asking the proxy itself, in milliseconds.
read_owner_wait_ms = 400
# Most peers a host asks about one blob (subscribes to their have-maps), chosen among
# the blob's providers: same zone first, then lowest measured round trip.
max_asked_peers = 16
"#;

pub use imgd_core::config_file::ConfigError;
pub use imgd_core::logging::LogFormat;

/// The whole agent configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub cache_quota_bytes: u64,
    pub proxy_url: String,
    /// Several proxy replicas; when set, used instead of `proxy_url`.
    pub proxy_urls: Vec<String>,
    pub proxy_token: Option<String>,
    pub proxy_token_file: Option<PathBuf>,
    pub socket: PathBuf,
    pub mirror_listen: SocketAddr,
    pub log_format: LogFormat,
    pub swarm: SwarmConfig,
    pub fetch: FetchConfig,
    pub mount: MountConfig,
    pub snapshotter: SnapshotterConfig,
}

/// containerd snapshotter settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    pub enabled: bool,
    pub socket: Option<PathBuf>,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            enabled: true,
            socket: None,
        }
    }
}

/// Lazy mount settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountConfig {
    pub read_timeout_ms: u64,
    pub threads: usize,
    pub trace_secs: u64,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            read_timeout_ms: 10_000,
            threads: 4,
            trace_secs: 30,
        }
    }
}

impl MountConfig {
    /// The startup trace window as a duration.
    pub fn trace_window(&self) -> Duration {
        Duration::from_secs(self.trace_secs)
    }

    /// The read time bound as a duration.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

/// Peer-to-peer settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmConfig {
    pub enabled: bool,
    #[serde(alias = "quic_listen")]
    pub listen: SocketAddr,
    pub data_listen: SocketAddr,
    pub key_file: Option<PathBuf>,
    pub allow_list: Vec<String>,
    pub bootstrap: Vec<String>,
    pub mdns: bool,
    pub zone: Option<String>,
}

/// Fetch policy settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    pub peer_timeout_ms: u64,
    pub proxy_timeout_ms: u64,
    pub parallel_chunks: usize,
    pub owner_wait_ms: u64,
    pub read_owner_wait_ms: u64,
    pub max_asked_peers: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: "/var/lib/imgd".into(),
            cache_quota_bytes: 20 << 30,
            proxy_url: "http://127.0.0.1:5000".into(),
            proxy_urls: Vec::new(),
            proxy_token: None,
            proxy_token_file: None,
            socket: "/run/imgd/imgd.sock".into(),
            mirror_listen: SocketAddr::from(([127, 0, 0, 1], 5050)),
            log_format: LogFormat::Text,
            swarm: SwarmConfig::default(),
            fetch: FetchConfig::default(),
            mount: MountConfig::default(),
            snapshotter: SnapshotterConfig::default(),
        }
    }
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            data_listen: SocketAddr::from(([0, 0, 0, 0], 7401)),
            key_file: None,
            allow_list: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            zone: None,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            peer_timeout_ms: 3000,
            proxy_timeout_ms: 30000,
            parallel_chunks: 4,
            owner_wait_ms: 4000,
            read_owner_wait_ms: 400,
            max_asked_peers: 16,
        }
    }
}

impl FetchConfig {
    /// Peer timeout as a duration.
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }
    /// Proxy timeout as a duration.
    pub fn proxy_timeout(&self) -> Duration {
        Duration::from_millis(self.proxy_timeout_ms)
    }
    /// Owner wait as a duration.
    pub fn owner_wait(&self) -> Duration {
        Duration::from_millis(self.owner_wait_ms)
    }
    /// Read owner wait as a duration.
    pub fn read_owner_wait(&self) -> Duration {
        Duration::from_millis(self.read_owner_wait_ms)
    }
}

impl AgentConfig {
    /// Where the snapshotter listens: `snapshotter.socket`, or `snapshotter.sock` next to
    /// the local API's socket.
    pub fn snapshotter_socket(&self) -> PathBuf {
        match &self.snapshotter.socket {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => self
                .socket
                .parent()
                .unwrap_or(Path::new("/run/imgd"))
                .join("snapshotter.sock"),
        }
    }

    /// The proxy replicas to use: `proxy_urls` if set, else `proxy_url`.
    pub fn proxies(&self) -> Vec<String> {
        if self.proxy_urls.is_empty() {
            vec![self.proxy_url.clone()]
        } else {
            self.proxy_urls.clone()
        }
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        imgd_core::config_file::load_toml(path)
    }

    /// Checks values that parse but make no sense, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        for url in self.proxies() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad("proxy_url and proxy_urls must start with http:// or https://");
            }
        }
        if self.cache_quota_bytes < imgd_core::CHUNK_SIZE as u64 {
            return bad("cache_quota_bytes must hold at least one 4 MiB chunk");
        }
        if self.mount.threads == 0 {
            return bad("mount.threads must be at least 1");
        }
        if self.fetch.parallel_chunks == 0 {
            return bad("fetch.parallel_chunks must be at least 1");
        }
        if !(1..=1024).contains(&self.fetch.max_asked_peers) {
            return bad("fetch.max_asked_peers must be between 1 and 1024");
        }
        if let Some(z) = &self.swarm.zone {
            let ok = (1..=63).contains(&z.len())
                && z.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !ok {
                return bad("swarm.zone: 1 to 63 letters, digits, '.', '_' or '-'");
            }
        }
        Ok(())
    }

    /// The chunk API token for the proxy: `proxy_token`, or read from `proxy_token_file`.
    pub fn proxy_token(&self) -> Result<Option<String>, ConfigError> {
        match (&self.proxy_token, &self.proxy_token_file) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "proxy_token excludes proxy_token_file".into(),
            )),
            (Some(t), None) => Ok(Some(t.trim().to_string())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                }),
            (None, None) => Ok(None),
        }
    }

    /// The swarm key from `swarm.key_file` (64 hex digits); `None` when it is unset (then
    /// the agent joins no swarm).
    pub fn swarm_key(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let Some(path) = &self.swarm.key_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        let hex = text.trim();
        let mut key = [0u8; 32];
        let ok = hex.len() == 64
            && key.iter_mut().enumerate().all(|(i, b)| {
                u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)
                    .map(|v| *b = v)
                    .is_ok()
            });
        if !ok {
            return Err(ConfigError::Invalid(format!(
                "swarm.key_file {}: expected 64 hex digits",
                path.display()
            )));
        }
        Ok(Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_text_matches_defaults_and_unknown_keys_are_named() {
        let parsed: AgentConfig = toml::from_str(DEFAULT_CONFIG).unwrap();
        let d = AgentConfig::default();
        assert_eq!(parsed.cache_quota_bytes, d.cache_quota_bytes);
        assert_eq!(parsed.mirror_listen, d.mirror_listen);
        assert_eq!(parsed.log_format, d.log_format);
        assert_eq!(parsed.swarm.data_listen, d.swarm.data_listen);
        assert_eq!(parsed.fetch.owner_wait_ms, d.fetch.owner_wait_ms);
        let err = toml::from_str::<AgentConfig>("[swarm]\nmdsn = true").unwrap_err();
        assert!(err.to_string().contains("mdsn"), "{err}");
    }

    #[test]
    fn no_key_file_means_no_swarm_key_and_the_old_listen_name_still_parses() {
        assert_eq!(AgentConfig::default().swarm_key().unwrap(), None);
        let c: AgentConfig = toml::from_str("[swarm]\nquic_listen = \"0.0.0.0:9\"").unwrap();
        assert_eq!(c.swarm.listen.port(), 9);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        std::fs::write(&path, format!("{}\n", "0f".repeat(32))).unwrap();
        let mut c = AgentConfig::default();
        c.swarm.key_file = Some(path.clone());
        assert_eq!(c.swarm_key().unwrap(), Some([0x0f; 32]));
        std::fs::write(&path, "short").unwrap();
        assert!(c
            .swarm_key()
            .unwrap_err()
            .to_string()
            .contains("64 hex digits"));
    }
}
