//! A real upstream registry for tests: Debian's `docker-registry` (distribution 2.8) serving
//! from a temporary directory on a free 127.0.0.1 port.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::{free_port, ChildGuard};
use crate::registry_client::RegistryClient;

/// The registry binary; overridable with `IMGD_TEST_DOCKER_REGISTRY` (a path).
const DEFAULT_BINARY: &str = "docker-registry";
/// How long a registry gets to answer `GET /v2/` after it is spawned.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with a fresh port, in case another process grabbed the chosen port first.
const START_ATTEMPTS: usize = 3;
/// bcrypt cost for the htpasswd file: the minimum, to keep every request cheap.
const BCRYPT_COST: u32 = 4;

/// A running `docker-registry`. Dropping it kills the process (by PID) and then removes its
/// temporary directory (config, storage, log, htpasswd).
pub struct Registry {
    // Declared before `dir` so that the process dies before its directory is removed.
    child: ChildGuard,
    addr: String,
    credentials: Option<(String, String)>,
    dir: TempDir,
}

impl Registry {
    /// Starts an anonymous registry (pull and push need no credentials); storage deletion
    /// is enabled. Fails loudly if `docker-registry` is not installed.
    pub fn start() -> Result<Registry> {
        Registry::start_inner(None)
    }

    /// Starts a registry requiring HTTP basic auth for every `/v2/` request, with a single
    /// user `user`/`pass` (a bcrypt htpasswd file). Distribution 2.8 accepts basic auth over
    /// plain http, so no TLS is needed; it logs a warning for every request without valid
    /// credentials (the readiness probe included). Anonymous requests get 401 with
    /// `WWW-Authenticate: Basic realm="imgd-test"`.
    pub fn start_with_htpasswd(user: &str, pass: &str) -> Result<Registry> {
        Registry::start_inner(Some((user.to_owned(), pass.to_owned())))
    }

    /// Starts an anonymous registry inside the test host `host` (its network namespace),
    /// listening on the host's address, e.g. to put a shaped link between it and a proxy.
    pub fn start_on_host(host: &crate::netns::Host) -> Result<Registry> {
        let binary = registry_binary()?;
        Registry::try_start(&binary, None, Some(host))
    }

    fn start_inner(credentials: Option<(String, String)>) -> Result<Registry> {
        let binary = registry_binary()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match Registry::try_start(&binary, credentials.clone(), None) {
                Ok(r) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) => Err(e.context(format!(
                "starting {} failed {START_ATTEMPTS} times",
                binary.display()
            ))),
            None => bail!("no attempt to start the registry was made"),
        }
    }

    fn try_start(
        binary: &Path,
        credentials: Option<(String, String)>,
        host: Option<&crate::netns::Host>,
    ) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("imgd-test-registry-")
            .tempdir()
            .context("creating registry tempdir")?;
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).context("creating registry storage dir")?;
        let port = free_port()?;
        let ip = host.map_or("127.0.0.1", |h| h.addr.as_str());
        let addr = format!("{ip}:{port}");

        let auth = match &credentials {
            Some((user, pass)) => {
                let htpasswd = dir.path().join("htpasswd");
                write_htpasswd(&htpasswd, user, pass)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: imgd-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: imgd-test-secret\n\
             {auth}",
            storage = storage.display(),
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).context("writing registry config")?;

        let log_path = dir.path().join("registry.log");
        let log = File::create(&log_path).context("creating registry log")?;
        let log_err = log.try_clone().context("duplicating registry log handle")?;
        let mut cmd = match host {
            Some(h) => h.command(
                binary
                    .to_str()
                    .context("registry binary path is not UTF-8")?,
            ),
            None => Command::new(binary),
        };
        cmd.arg("serve")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // The registry reads every REGISTRY_* variable as a config override.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(&key);
            }
        }
        let mut child = ChildGuard::spawn(&mut cmd, format!("docker-registry on {addr}"))?;
        if let Err(e) = child.wait_for_http(&format!("http://{addr}/v2/"), STARTUP_TIMEOUT) {
            drop(child);
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            return Err(e.context(format!("registry did not come up; its log:\n{log}")));
        }
        Ok(Registry {
            child,
            addr,
            credentials,
            dir,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A skopeo/containers transport reference: `docker://127.0.0.1:PORT/<repo_ref>`, where
    /// `repo_ref` is `repo:tag` or `repo@sha256:...`.
    pub fn docker_ref(&self, repo_ref: &str) -> String {
        format!("docker://{}/{repo_ref}", self.addr)
    }

    /// The credentials given to [`Registry::start_with_htpasswd`], if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// A [`RegistryClient`] for this registry, sending its credentials if it has any.
    pub fn client(&self) -> RegistryClient {
        let client = RegistryClient::new(self.url());
        match self.credentials() {
            Some((u, p)) => client.with_basic_auth(u, p),
            None => client,
        }
    }

    /// The registry's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The storage root directory (`rootdirectory` of the filesystem driver).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything the registry wrote to stdout and stderr so far.
    pub fn log(&self) -> Result<String> {
        fs::read_to_string(self.dir.path().join("registry.log")).context("reading registry log")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Kill before the tempdir goes; `TempDir`'s own drop removes the directory after.
        let _ = self.child.kill();
    }
}

fn registry_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("IMGD_TEST_DOCKER_REGISTRY") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(DEFAULT_BINARY);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{DEFAULT_BINARY}` not found in PATH: install Debian's package (apt-get install docker-registry)")
}

fn write_htpasswd(path: &Path, user: &str, pass: &str) -> Result<()> {
    let hash = bcrypt::hash_with_result(pass, BCRYPT_COST)
        .context("bcrypt hashing the password")?
        .format_for_version(bcrypt::Version::TwoY);
    fs::write(path, format!("{user}:{hash}\n")).context("writing htpasswd")
}
