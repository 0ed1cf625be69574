//! Launchers for imgd's own daemons, run as the real binaries built by
//! `cargo build --workspace --bins` (found next to the test executable).

use crate::process::{free_port, ChildGuard};
use crate::registry_client::{self, HttpResponse};
use anyhow::{bail, Context, Result};
use imgd_core::wire::ProxyStats;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Path of a workspace binary: `target/<profile>/NAME`, beside the test's `deps/` dir.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "binary {name} not found near {}: run `cargo build --workspace --bins` first",
        exe.display()
    )
}

/// The swarm key of every test agent (and of the evil peer), so test agents form one
/// swarm. Agents started with `key_file` in their `extra_toml` use theirs instead.
pub const TEST_SWARM_KEY: [u8; 32] = *b"imgd-tests-swarm-key-32-bytes!!!";

/// [`TEST_SWARM_KEY`] as the 64 hex digits of a `swarm.key_file`.
pub fn test_swarm_key_hex() -> String {
    TEST_SWARM_KEY.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running `imgd-proxy` with its own storage directory.
pub struct Proxy {
    guard: ChildGuard,
    ip: String,
    port: u16,
    storage: PathBuf,
    _dir: Option<TempDir>,
    log: PathBuf,
    upstreams: Vec<String>,
    extra: Vec<String>,
}

/// How [`Proxy::spawn`] says that its port was answered by another process.
const ANOTHER_PROCESS: &str = "another imgd-proxy process";

/// Whether a proxy failed to start because another process had its port.
fn port_was_taken(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains(ANOTHER_PROCESS) || text.contains("in use")
}

impl Proxy {
    /// Starts a proxy with a fresh storage dir. `upstreams` are `NAME=URL` or `NAME=oci:DIR`;
    /// the first is the default.
    pub fn start(upstreams: &[String]) -> Result<Proxy> {
        let dir = tempfile::tempdir()?;
        let storage = dir.path().join("storage");
        let mut p = Proxy::start_in(&storage, upstreams, &[])?;
        p._dir = Some(dir);
        Ok(p)
    }

    /// Starts a proxy on an existing storage dir (e.g. to restart after a kill), with
    /// extra command-line arguments.
    pub fn start_in(storage: &Path, upstreams: &[String], extra: &[&str]) -> Result<Proxy> {
        Proxy::start_with("127.0.0.1", storage, upstreams, extra)
    }

    /// Starts a proxy listening on `ip` (e.g. a test LAN's gateway address).
    pub fn start_with(
        ip: &str,
        storage: &Path,
        upstreams: &[String],
        extra: &[&str],
    ) -> Result<Proxy> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A port free a moment ago may be taken by a server of a test running beside
        // this one (then our proxy cannot bind, and theirs answers): try another.
        let mut last = None;
        for _ in 0..3 {
            match Proxy::spawn(ip, free_port()?, storage, upstreams, &extra) {
                Err(e) if port_was_taken(&e) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("imgd-proxy did not start")))
    }

    /// Starts a proxy configured by the TOML `config_text` (written to `dir/proxy.toml`),
    /// storing under `dir/store`.
    pub fn start_with_config(dir: &Path, config_text: &str) -> Result<Proxy> {
        let config = dir.join("proxy.toml");
        std::fs::write(&config, config_text)?;
        let config = config.to_str().context("config path is not UTF-8")?;
        Proxy::start_in(&dir.join("store"), &[], &["--config", config])
    }

    /// Starts a proxy on the gateway of the test LAN `lan` (so its hosts reach it), storing
    /// under `storage`.
    pub fn start_on_lan(
        lan: &crate::netns::Lan,
        storage: &Path,
        upstreams: &[String],
    ) -> Result<Proxy> {
        Proxy::start_with(&lan.gateway, storage, upstreams, &[])
    }

    fn spawn(
        ip: &str,
        port: u16,
        storage: &Path,
        upstreams: &[String],
        extra: &[String],
    ) -> Result<Proxy> {
        std::fs::create_dir_all(storage)?;
        let log = storage.with_extension("log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(workspace_bin("imgd-proxy")?);
        cmd.arg("--listen")
            .arg(format!("{ip}:{port}"))
            .arg("--storage-dir")
            .arg(storage)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file);
        for u in upstreams {
            cmd.arg("--upstream").arg(u);
        }
        let mut guard = ChildGuard::spawn(&mut cmd, "imgd-proxy")?;
        let url = format!("http://{ip}:{port}/healthz");
        if let Err(e) = guard.wait_for_http(&url, Duration::from_secs(20)) {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("imgd-proxy did not start: {e:#}\n{log_text}");
        }
        let health = crate::registry_client::get_with_timeout(&url, &[], Duration::from_secs(5))?;
        let pid = health.header("x-imgd-pid").unwrap_or("").to_string();
        if pid != guard.id().to_string() {
            bail!("{ip}:{port} is answered by {ANOTHER_PROCESS} (pid {pid:?})");
        }
        Ok(Proxy {
            guard,
            ip: ip.to_string(),
            port,
            storage: storage.to_path_buf(),
            _dir: None,
            log,
            upstreams: upstreams.to_vec(),
            extra: extra.to_vec(),
        })
    }

    /// Starts the proxy again (after [`Proxy::kill`]) on the same address and storage.
    pub fn restart(&mut self) -> Result<()> {
        let _ = self.guard.kill();
        let fresh = Proxy::spawn(
            &self.ip,
            self.port,
            &self.storage,
            &self.upstreams,
            &self.extra,
        )?;
        self.guard = fresh.guard;
        Ok(())
    }

    /// `IP:PORT`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The storage directory.
    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Kills the proxy with SIGKILL.
    pub fn kill(&mut self) -> Result<()> {
        self.guard.kill().map(|_| ())
    }

    /// GET a path of the proxy.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        registry_client::get(&format!("{}{path}", self.url()), headers)
    }

    /// The proxy's counters.
    pub fn stats(&self) -> Result<ProxyStats> {
        let r = self.get("/imgd/v1/stats", &[])?;
        serde_json::from_slice(&r.body).context("decoding /imgd/v1/stats")
    }

    /// Number of chunk files in storage (committed ones only).
    pub fn stored_chunk_files(&self) -> usize {
        count_files(&self.storage.join("chunks"))
    }

    /// Number of files in storage's temp area (staged, uncommitted).
    pub fn temp_files(&self) -> usize {
        count_files(&self.storage.join("tmp"))
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

/// Where and how to run an `imgd` agent.
pub struct AgentOptions<'a> {
    /// Run inside this network namespace host (root namespace if `None`).
    pub host: Option<&'a crate::netns::Host>,
    pub proxy_url: String,
    /// Data directory (kept across restarts by the caller).
    pub data_dir: PathBuf,
    /// Extra TOML merged over the generated config (see [`agent_config`]): tables such as
    /// `[fetch]`, root keys such as `proxy_token`, and bare swarm keys such as
    /// `mdns = false`.
    pub extra_toml: String,
    pub swarm: bool,
}

impl AgentOptions<'static> {
    /// An agent in the root namespace with the swarm off and no extra config; set other
    /// fields with `AgentOptions { extra_toml, ..AgentOptions::local(url, dir) }`.
    pub fn local(proxy_url: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        AgentOptions {
            host: None,
            proxy_url: proxy_url.into(),
            data_dir: data_dir.into(),
            extra_toml: String::new(),
            swarm: false,
        }
    }
}

/// Root keys of the agent's config; other bare keys of `extra_toml` belong to `[swarm]`.
const AGENT_ROOT_KEYS: &[&str] = &[
    "data_dir",
    "cache_quota_bytes",
    "proxy_url",
    "proxy_urls",
    "proxy_token",
    "proxy_token_file",
    "socket",
    "mirror_listen",
    "log_format",
];

/// Merges `extra` over the generated agent config `base`: a table merges key by key into
/// the table of that name, a root key ([`AGENT_ROOT_KEYS`]) replaces it, and any other bare
/// key goes into `[swarm]` (so `mdns = false` or `allow_list = [...]` need no header).
pub fn agent_config(base: &str, extra: &str) -> Result<String> {
    let mut config: toml::Table = base.parse().context("generated agent config")?;
    let extra: toml::Table = extra.parse().context("extra_toml")?;
    for (key, value) in extra {
        let into = match value {
            toml::Value::Table(_) => config
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            _ if AGENT_ROOT_KEYS.contains(&key.as_str()) => {
                config.insert(key, value);
                continue;
            }
            _ => config
                .get_mut("swarm")
                .context("generated config has [swarm]")?,
        };
        let toml::Value::Table(into) = into else {
            bail!("extra_toml: {key} is a table over a plain key");
        };
        match value {
            toml::Value::Table(t) => into.extend(t),
            v => {
                into.insert(key, v);
            }
        }
    }
    Ok(toml::to_string(&config)?)
}

/// A running `imgd` agent.
pub struct Agent {
    guard: ChildGuard,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub mirror: String,
    log: PathBuf,
}

/// The agents' log filter: `IMGD_TEST_AGENT_LOG` if set (e.g.
/// `info,imgd_bytes=debug` for where a lazy start's bytes go), else info.
fn agent_log_filter() -> String {
    std::env::var("IMGD_TEST_AGENT_LOG").unwrap_or_else(|_| "info,libp2p_mdns=warn".into())
}

impl Agent {
    /// Starts an agent and waits until its local API answers.
    pub fn start(opts: AgentOptions<'_>) -> Result<Agent> {
        Agent::start_with_args(opts, &[])
    }

    /// Starts a swarm agent on the namespace host `host`, using `proxy`, with its data
    /// under `dir/NAMESPACE` and `extra_toml` merged over its config.
    pub fn start_on_host(
        host: &crate::netns::Host,
        proxy: &Proxy,
        dir: &Path,
        extra_toml: &str,
    ) -> Result<Agent> {
        Agent::start(AgentOptions {
            host: Some(host),
            proxy_url: proxy.url(),
            data_dir: dir.join(&host.ns),
            extra_toml: extra_toml.to_string(),
            swarm: true,
        })
    }

    /// [`Agent::start`] with extra `imgd` flags (e.g. `--cache-quota BYTES`).
    pub fn start_with_args(opts: AgentOptions<'_>, args: &[&str]) -> Result<Agent> {
        // In a namespace the host has its own loopback and ports.
        if opts.host.is_some() {
            return Agent::spawn(&opts, args, (5050, 7400, 7401));
        }
        // In the root namespace pick free ones. A port free a moment ago may be taken by
        // a server of a test running beside this one: the agent then fails to bind it
        // (before its socket appears) and is started again on others.
        let mut last = None;
        for _ in 0..3 {
            let ports = (free_port()?, free_port()?, free_port()?);
            match Agent::spawn(&opts, args, ports) {
                Err(e) if port_was_taken(&e) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("imgd did not start")))
    }

    /// Starts one agent on ports `(mirror, swarm listen, data plane)`.
    fn spawn(
        opts: &AgentOptions<'_>,
        args: &[&str],
        (mirror_port, listen, data): (u16, u16, u16),
    ) -> Result<Agent> {
        std::fs::create_dir_all(&opts.data_dir)?;
        let socket = opts.data_dir.join("imgd.sock");
        let mirror = format!("127.0.0.1:{mirror_port}");
        let key_file = opts.data_dir.join("swarm.key");
        std::fs::write(&key_file, test_swarm_key_hex())?;
        let base = format!(
            "data_dir = {:?}\nproxy_url = {:?}\nsocket = {:?}\nmirror_listen = {mirror:?}\ncache_quota_bytes = 4294967296\n\
             [swarm]\nenabled = {}\nlisten = \"0.0.0.0:{listen}\"\ndata_listen = \"0.0.0.0:{data}\"\nkey_file = {key_file:?}\n",
            opts.data_dir.join("data"),
            opts.proxy_url,
            socket,
            opts.swarm,
        );
        let config = agent_config(&base, &opts.extra_toml)?;
        let config_path = opts.data_dir.join("imgd.toml");
        std::fs::write(&config_path, config)?;
        let log = opts.data_dir.join(format!(
            "imgd-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        ));
        let bin = workspace_bin("imgd")?;
        let mut cmd = match opts.host {
            Some(h) => h.command(bin.to_str().context("binary path")?),
            None => Command::new(&bin),
        };
        cmd.arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RUST_LOG", agent_log_filter())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut guard = ChildGuard::spawn(&mut cmd, "imgd")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let agent_ready = |s: &Path| std::os::unix::net::UnixStream::connect(s).is_ok();
        while !agent_ready(&socket) {
            if std::time::Instant::now() > deadline || guard.ensure_running().is_err() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("imgd did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Agent {
            guard,
            data_dir: opts.data_dir.clone(),
            socket,
            mirror,
            log,
        })
    }

    /// Runs `imgctl ARGS` against this agent; returns (success, stdout, stderr).
    pub fn imgctl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new(workspace_bin("imgctl")?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Starts `imgctl ARGS` without waiting.
    pub fn spawn_imgctl(&self, args: &[&str]) -> Result<std::process::Child> {
        Ok(Command::new(workspace_bin("imgctl")?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// The agent's status as JSON (`imgctl status` data, from the local API).
    pub fn status(&self) -> Result<serde_json::Value> {
        self.api_get("/v1/status")
    }

    /// The agent's image list as JSON (`imgctl images` data: bytes cached and total).
    pub fn images(&self) -> Result<serde_json::Value> {
        self.api_get("/v1/images")
    }

    fn api_get(&self, path: &str) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sf", "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://imgd{path}"))
            .output()?;
        if !out.status.success() {
            bail!("GET {path} on the agent's API failed");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A scrape of the agent's `/metrics` (on its mirror listener).
    pub fn metrics(&self) -> Result<crate::scrape::Scrape> {
        crate::scrape::Scrape::get(&format!("http://{}", self.mirror))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until the agent knows at least `n` peers.
    pub fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let known = self.status()?["peers"].as_array().map_or(0, Vec::len);
            if known >= n {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("agent found {known} of {n} peers:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `imgctl verify`: fails unless every cached chunk re-hashes to its digest.
    pub fn verify_clean(&self) -> Result<()> {
        let (ok, out, err) = self.imgctl(&["verify"])?;
        if !ok {
            bail!("imgctl verify: {out}{err}");
        }
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Kills the agent with SIGKILL.
    pub fn kill(&mut self) -> Result<()> {
        self.guard.kill().map(|_| ())
    }
}

/// Lazy mounts outlive their agent (each is served by an `imgd-mount` process): when a
/// test is done with an agent, its mounts are detached, which ends their processes.
impl Drop for Agent {
    fn drop(&mut self) {
        let records = self.data_dir.join("data/mounts");
        for entry in std::fs::read_dir(&records).into_iter().flatten().flatten() {
            let record = std::fs::read(entry.path().join("record.json")).unwrap_or_default();
            let dir = serde_json::from_slice::<serde_json::Value>(&record)
                .ok()
                .and_then(|r| r["dir"].as_str().map(PathBuf::from));
            if let Some(dir) = dir {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&dir)
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // A detached mount whose files something still holds keeps its process serving:
        // end this agent's mount processes too (found by their mount directories, which
        // are under this agent's own data dir).
        for pid in mount_processes(&records) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// PIDs of the `imgd-mount` processes serving mounts recorded under `records`.
fn mount_processes(records: &Path) -> Vec<u32> {
    let Some(prefix) = records.to_str() else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_mount = args.first().is_some_and(|a| a.ends_with(b"imgd-mount"));
        if is_mount && args.iter().any(|a| a.starts_with(prefix.as_bytes())) {
            pids.push(pid);
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::agent_config;

    #[test]
    fn extra_toml_merges_tables_root_keys_and_bare_swarm_keys() {
        let base = "proxy_url = \"http://a\"\n[swarm]\nenabled = true\n";
        let extra = "mdns = false\nproxy_token = \"t\"\n[fetch]\npeer_timeout_ms = 5\n[swarm]\nbootstrap = []\n";
        let merged: toml::Table = agent_config(base, extra).unwrap().parse().unwrap();
        assert_eq!(merged["proxy_token"].as_str(), Some("t"));
        assert_eq!(merged["proxy_url"].as_str(), Some("http://a"));
        let swarm = merged["swarm"].as_table().unwrap();
        assert_eq!(swarm["mdns"].as_bool(), Some(false));
        assert_eq!(swarm["enabled"].as_bool(), Some(true));
        assert!(swarm["bootstrap"].as_array().unwrap().is_empty());
        assert_eq!(merged["fetch"]["peer_timeout_ms"].as_integer(), Some(5));
        assert!(merged.get("mdns").is_none());
    }
}
