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

/// A running `imgd-proxy` with its own storage directory.
pub struct Proxy {
    guard: ChildGuard,
    port: u16,
    storage: PathBuf,
    _dir: Option<TempDir>,
    log: PathBuf,
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
        let port = free_port()?;
        std::fs::create_dir_all(storage)?;
        let log = storage.with_extension("log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(workspace_bin("imgd-proxy")?);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
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
        let url = format!("http://127.0.0.1:{port}/healthz");
        if let Err(e) = guard.wait_for_http(&url, Duration::from_secs(20)) {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("imgd-proxy did not start: {e:#}\n{log_text}");
        }
        Ok(Proxy {
            guard,
            port,
            storage: storage.to_path_buf(),
            _dir: None,
            log,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
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
