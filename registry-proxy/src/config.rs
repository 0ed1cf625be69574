//! Proxy configuration: a TOML file, overridden by command-line flags.
//!
//! `imgd-proxy --print-default-config` prints [`DEFAULT_CONFIG`], which documents every
//! key next to its default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The documented default configuration file.
pub const DEFAULT_CONFIG: &str = r#"# imgd-proxy configuration. Every key is optional; the value shown is the default.

# Address the OCI registry API, the chunk API and the operations endpoints (/metrics,
# /healthz, /readyz) listen on. Env: IMGD_PROXY_LISTEN.
listen = "127.0.0.1:5000"

# Directory for chunks, indexes and metadata (RocksDB). Created if missing.
# Env: IMGD_PROXY_STORAGE_DIR.
storage_dir = "/var/lib/imgd-proxy"

# Most bytes of chunk and index files (committed or being staged) kept in storage_dir;
# 0: no quota. Over it, the least recently used blobs are evicted with their chunks
# (a chunk shared by several blobs goes with the last of them) and index, and so are the
# manifests listing them and the tags naming those. Pinned images, blobs being ingested
# and blobs being served are never evicted. The metadata database is not counted.
storage_quota_bytes = 0

# Images kept whole whatever the quota: fetched at start and never evicted, like
# `imgd-proxy pin IMAGE`. Each is UPSTREAM_PREFIX/REPO:TAG or .../REPO@DIGEST as a
# client would pull it through this proxy, e.g. "docker.io/library/alpine:3".
pins = []

# Other imgd-proxy replicas of the fleet (base URLs, e.g. "http://proxy-b:5000"). An
# uncached blob that one of them stores is ingested from it instead of from upstream,
# after upstream confirmed the client's repository holds it. The peers must accept this
# proxy's own [chunk_api] token (a fleet shares one). Env: IMGD_PROXY_PEERS (commas).
peers = []

# Log format on stderr: "text" (human-readable) or "json" (one JSON object a line).
# The level filter comes from RUST_LOG (default "info"). Env: IMGD_LOG_FORMAT.
log_format = "text"

# Time limit for connecting to an upstream and for each read from it, in seconds.
upstream_timeout_secs = 60

# Largest manifest accepted from an upstream, in bytes.
max_manifest_bytes = 4194304

# A layer refused by the [index] rules is remembered by digest, with the reason, for this
# many seconds: requests for it are answered 422 at once instead of downloading it again.
# 0: refusals are not remembered.
refused_layer_ttl_secs = 3600

# Upstream registries. A client picks one with a path prefix equal to its `name`
# (GET /v2/NAME/library/alpine/manifests/3), or with containerd's `?ns=NAME`; requests
# with neither go to the upstream marked `default` (or the only one).
#
# [[upstream]]
# name = "docker.io"                      # prefix and ns name
# url = "https://registry-1.docker.io"    # http:// is allowed for local registries
# default = true
# username = ""                           # basic credentials, also used for the
# password = ""                           # bearer-token flow; omit for anonymous
# token = ""                              # a static bearer token instead
#
# An OCI image layout directory can also serve as an upstream:
# [[upstream]]
# name = "local"
# layout = "/srv/images"

# Retries of upstream requests answered 429, 500, 502, 503 or 504 (a failed connection or
# a timeout is not retried).
# Waits double from `initial_backoff_ms` up to `max_backoff_ms`; a `Retry-After` of at most
# `max_retry_after_secs` is honoured instead (a longer one is passed to the client at once).
# A retry whose wait would bring the total past `max_total_wait_secs` is not made.
[retry]
max_attempts = 4
initial_backoff_ms = 250
max_backoff_ms = 4000
max_retry_after_secs = 10
max_total_wait_secs = 20

# The chunk API (/imgd/v1/*, except stats) can require `Authorization: Bearer TOKEN`.
# Set `token` or `token_file` (a file holding the token); neither: the API is open.
[chunk_api]
# token = ""
# token_file = "/etc/imgd/proxy-token"

# Limits on the layers the proxy indexes. A layer that breaks one (or has a '..' path,
# a hard link to a directory or to a later entry) is refused with 422 and not stored.
[index]
max_entries = 500000               # tar entries per layer
max_path_len = 4096                # bytes of an entry path or link target
max_meta_size = 1048576            # bytes of one PAX header or GNU long name
allow_devices = true               # accept device nodes
max_index_bytes = 268435456        # encoded index size
max_inflate_ratio = 500            # uncompressed / compressed size of a gzip or zstd layer...
inflate_ratio_slack = 4294967296   # ...checked once this many bytes came out
checkpoint_span = 4194304          # at most this many uncompressed bytes between gzip checkpoints
checkpoint_compressed_span = 262144   # and at most this many compressed bytes (windows are fetched lazily)
max_zstd_frames = 2000000          # frames of a zstd layer
# A zstd frame needing a larger window (2^N bytes) is not decoded: the layer is stored
# and served for full pulls, but not indexed (no lazy mount).
max_zstd_window_log = 27
# A zstd:chunked TOC larger than this (compressed or not), or one that disagrees with the
# layer's stream, is an error: the layer is stored and served, but not indexed.
max_zstd_toc_bytes = 67108864
"#;

pub use imgd_core::config_file::ConfigError;
pub use imgd_core::logging::LogFormat;

/// The whole proxy configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub storage_dir: PathBuf,
    /// Storage quota in bytes (0: none).
    pub storage_quota_bytes: u64,
    /// Images pinned by configuration.
    pub pins: Vec<String>,
    /// Peer replicas' base URLs ([`crate::peers`]).
    pub peers: Vec<String>,
    pub upstream_timeout_secs: u64,
    pub max_manifest_bytes: usize,
    /// How long a refused layer is remembered (the negative cache), in seconds.
    pub refused_layer_ttl_secs: u64,
    pub log_format: LogFormat,
    /// Limits of the layer index builder (`[index]`).
    pub index: imgd_core::index::IndexOptions,
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    pub retry: RetryConfig,
    pub chunk_api: ChunkApiConfig,
}

/// Retries of failed upstream requests (`[retry]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1: no retry).
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Largest `Retry-After` waited for; a longer one is passed to the client.
    pub max_retry_after_secs: u64,
    /// Largest sum of the waits of one request.
    pub max_total_wait_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 4,
            initial_backoff_ms: 250,
            max_backoff_ms: 4000,
            max_retry_after_secs: 10,
            max_total_wait_secs: 20,
        }
    }
}

/// Access to the chunk API (`[chunk_api]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkApiConfig {
    /// Bearer token clients must send.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
}

impl ChunkApiConfig {
    /// The required token, read from `token_file` if set; `None`: the API is open.
    pub fn required_token(&self) -> Result<Option<String>, ConfigError> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "chunk_api: `token` excludes `token_file`".into(),
                ))
            }
            (Some(t), None) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError::Invalid(format!("chunk_api.token_file {}: {e}", path.display()))
                })?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        if token.is_empty() {
            return Err(ConfigError::Invalid("chunk_api token is empty".into()));
        }
        Ok(Some(token))
    }
}

/// One upstream registry (or OCI layout directory).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Registry base URL, `https://host[:port]` or `http://host[:port]`.
    pub url: Option<String>,
    /// An OCI image layout directory, instead of a registry.
    pub layout: Option<PathBuf>,
    #[serde(default)]
    pub default: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            storage_dir: PathBuf::from("/var/lib/imgd-proxy"),
            storage_quota_bytes: 0,
            pins: Vec::new(),
            peers: Vec::new(),
            upstream_timeout_secs: 60,
            max_manifest_bytes: 4 << 20,
            refused_layer_ttl_secs: 3600,
            log_format: LogFormat::Text,
            index: imgd_core::index::IndexOptions::default(),
            upstreams: Vec::new(),
            retry: RetryConfig::default(),
            chunk_api: ChunkApiConfig::default(),
        }
    }
}

impl ProxyConfig {
    /// Reads a TOML configuration file.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        imgd_core::config_file::load_toml(path)
    }

    /// Upstream timeout as a duration.
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream_timeout_secs)
    }

    /// Checks cross-field rules, naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.upstreams.is_empty() {
            return bad("no [[upstream]] configured (or pass --upstream NAME=URL)".into());
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = format!("upstream[{i}]");
            if u.name.is_empty() || u.name.contains('/') {
                return bad(format!("{key}.name must be non-empty and contain no '/'"));
            }
            match (&u.url, &u.layout) {
                (Some(url), None) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return bad(format!(
                            "{key}.url must start with http:// or https://, got {url:?}"
                        ));
                    }
                }
                (None, Some(_)) => {}
                _ => return bad(format!("{key} needs exactly one of `url` or `layout`")),
            }
            if u.token.is_some() && (u.username.is_some() || u.password.is_some()) {
                return bad(format!("{key}: `token` excludes `username`/`password`"));
            }
            if u.username.is_some() != u.password.is_some() {
                return bad(format!("{key}: `username` and `password` go together"));
            }
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return bad(format!("{key}.name {:?} is used twice", u.name));
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !(p.starts_with("http://") || p.starts_with("https://")) {
                return bad(format!(
                    "peers[{i}] must start with http:// or https://, got {p:?}"
                ));
            }
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts must be at least 1".into());
        }
        if self.upstreams.iter().filter(|u| u.default).count() > 1 {
            return bad("more than one upstream has `default = true`".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_text_parses_to_the_defaults() {
        let parsed: ProxyConfig = toml::from_str(DEFAULT_CONFIG).unwrap();
        let d = ProxyConfig::default();
        assert_eq!(parsed.listen, d.listen);
        assert_eq!(parsed.storage_dir, d.storage_dir);
        assert_eq!(parsed.storage_quota_bytes, d.storage_quota_bytes);
        assert_eq!(parsed.pins, d.pins);
        assert_eq!(parsed.peers, d.peers);
        assert_eq!(parsed.upstream_timeout_secs, d.upstream_timeout_secs);
        assert_eq!(parsed.max_manifest_bytes, d.max_manifest_bytes);
        assert_eq!(parsed.refused_layer_ttl_secs, d.refused_layer_ttl_secs);
        assert_eq!(parsed.log_format, d.log_format);
        assert_eq!(parsed.retry, d.retry);
        assert!(parsed.chunk_api.token.is_none() && parsed.chunk_api.token_file.is_none());
        assert_eq!(parsed.index, d.index);
        let custom: ProxyConfig = toml::from_str("[index]\nmax_entries = 7").unwrap();
        assert_eq!(custom.index.max_entries, 7);
        assert!(toml::from_str::<ProxyConfig>("[index]\nmax_entrys = 7").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_upstreams_are_named() {
        let err = toml::from_str::<ProxyConfig>("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        let cfg: ProxyConfig =
            toml::from_str("[[upstream]]\nname = \"a\"\nurl = \"ftp://x\"").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("upstream[0].url"), "{err}");
    }
}
