//! A private containerd for tests: Debian's `containerd` (1.6) with its own config file,
//! root, state directory and socket in a temporary directory, the CRI plugin disabled.
//! `ctr` talks to it through [`Containerd::ctr`] in the namespace `imgd-test`.
//!
//! On drop, every task it still runs is killed through `ctr`, the shims and container
//! processes left are killed by the PIDs containerd recorded for them, then containerd
//! itself (by PID), and the directory is removed.

use crate::guards::run_capture;
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "imgd-test";

/// A running private containerd.
pub struct Containerd {
    guard: ChildGuard,
    dir: TempDir,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` reaches it.
    pub fn start() -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("imgd-ctrd-").tempdir()?;
        let socket = dir.path().join("containerd.sock");
        let config = format!(
            "version = 2\n\
             root = {root:?}\n\
             state = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \
             \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \
             \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.internal.v1.tracing\", \
             \"io.containerd.tracing.processor.v1.otlp\"]\n\
             [grpc]\n  address = {sock:?}\n\
             [ttrpc]\n  address = {ttrpc:?}\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n",
            root = dir.path().join("root"),
            state = dir.path().join("state"),
            sock = socket,
            ttrpc = dir.path().join("containerd.sock.ttrpc"),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let guard = ChildGuard::spawn(&mut cmd, "containerd")?;
        let mut c = Containerd { guard, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = c
                .ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(c);
            }
            if Instant::now() > deadline || c.guard.ensure_running().is_err() {
                bail!("containerd did not start:\n{}", c.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr --address SOCKET --namespace imgd-test`, ready for more arguments.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(NAMESPACE);
        cmd
    }

    /// Runs `ctr ARGS` within `timeout`; returns its stdout, fails with its stderr.
    pub fn run_ctr(&self, args: &[&str], timeout: Duration) -> Result<String> {
        run_capture(self.ctr().args(args), &format!("ctr {args:?}"), timeout)
            .with_context(|| format!("containerd log:\n{}", self.log()))
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// PIDs of shims and container processes containerd recorded in its state directory.
    fn recorded_pids(&self) -> Vec<u32> {
        let tasks = self
            .dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(NAMESPACE);
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            for name in ["init.pid", "shim.pid"] {
                if let Some(pid) = std::fs::read_to_string(entry.path().join(name))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let short = Duration::from_secs(20);
        if let Ok(list) = self.run_ctr(&["tasks", "ls", "-q"], short) {
            for id in list.lines().filter(|l| !l.is_empty()) {
                let _ = self.run_ctr(&["tasks", "kill", "-s", "SIGKILL", id], short);
                let _ = self.run_ctr(&["tasks", "delete", "-f", id], short);
            }
        }
        for pid in self.recorded_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.guard.kill();
        // Snapshot mounts of containers that did not finish cleanly.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.dir.path().to_string_lossy().into_owned();
        for line in mounts.lines() {
            if let Some(target) = line.split(' ').nth(1).filter(|t| t.starts_with(&root)) {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
    }
}
