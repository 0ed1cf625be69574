//! A private podman for tests: Debian's `podman` (4.3) run as root with its own storage
//! (`--root`/`--runroot`), `containers.conf` (`CONTAINERS_CONF`: cgroupfs, runc, ulimits
//! this machine allows, no network namespace setup), main `registries.conf`
//! (`CONTAINERS_REGISTRIES_CONF`) and `HOME`, whose `.config/containers/registries.conf.d`
//! is the drop-in directory it reads. Nothing under `/etc/containers` is touched.
//!
//! On drop, its containers are removed, mounts left under its directory are unmounted and
//! the directory is removed.

use crate::guards::run_capture;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"#;

const POLICY: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

/// A private podman setup.
pub struct Podman {
    dir: TempDir,
}

impl Podman {
    /// Writes the private configuration files.
    pub fn new() -> Result<Podman> {
        let dir = tempfile::Builder::new().prefix("imgd-podman-").tempdir()?;
        std::fs::write(dir.path().join("containers.conf"), CONTAINERS_CONF)?;
        std::fs::write(
            dir.path().join("registries.conf"),
            "unqualified-search-registries = []\n",
        )?;
        std::fs::write(dir.path().join("policy.json"), POLICY)?;
        let p = Podman { dir };
        std::fs::create_dir_all(p.drop_in_dir())?;
        Ok(p)
    }

    /// The `registries.conf.d` directory this podman reads drop-ins from.
    pub fn drop_in_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("home/.config/containers/registries.conf.d")
    }

    /// `podman` with the private storage and configuration, ready for more arguments.
    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("HOME", d.join("home"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--storage-driver")
            .arg("overlay");
        cmd
    }

    /// Runs `podman ARGS` within `timeout` and returns its stdout.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<String> {
        run_capture(self.cmd().args(args), &format!("podman {args:?}"), timeout)
    }

    /// The trust policy file accepting anything (for `--signature-policy`).
    pub fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.json")
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force"], Duration::from_secs(60));
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut targets: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|t| t.starts_with(&root))
            .collect();
        targets.reverse();
        for t in targets {
            let _ = Command::new("umount").arg("-l").arg(t).status();
        }
    }
}
