//! A private containerd for tests: Debian's `containerd` (1.6) with its own config file,
//! root, state directory and socket in a temporary directory. By default the CRI plugin is
//! disabled; [`ContainerdOptions`] can add imgd as a proxy snapshotter and enable CRI (with
//! a sandbox image, registry hosts and a snapshotter). `ctr` talks to it through
//! [`Containerd::ctr`] in the namespace `imgd-test`; CRI uses `k8s.io`.
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

/// The CRI plugin's settings.
#[derive(Clone, Debug)]
pub struct CriOptions {
    /// The pod sandbox ("pause") image, pullable from a local registry.
    pub sandbox_image: String,
    /// containerd's registry hosts directory (`certs.d`, one `hosts.toml` per host).
    pub hosts_dir: PathBuf,
    /// The snapshotter CRI pulls and runs with (e.g. `imgd` or `overlayfs`).
    pub snapshotter: String,
}

/// What the private containerd runs beyond its defaults.
#[derive(Clone, Debug, Default)]
pub struct ContainerdOptions {
    /// Loads imgd's snapshotter at this socket as the proxy plugin `imgd`.
    pub imgd_snapshotter: Option<PathBuf>,
    /// Enables the CRI plugin.
    pub cri: Option<CriOptions>,
    /// Runs containerd (and so its pulls and containers) in this host's network namespace.
    pub host: Option<crate::netns::Host>,
}

/// The containerd config for `opts` with everything under `dir`.
fn config_text(dir: &Path, socket: &Path, opts: &ContainerdOptions) -> Result<String> {
    let mut disabled = vec![
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.internal.v1.tracing",
        "io.containerd.tracing.processor.v1.otlp",
    ];
    if opts.cri.is_none() {
        disabled.push("io.containerd.grpc.v1.cri");
    }
    let mut text = format!(
        "version = 2\n\
         root = {root:?}\n\
         state = {state:?}\n\
         disabled_plugins = {disabled:?}\n\
         [grpc]\n  address = {sock:?}\n\
         [ttrpc]\n  address = {ttrpc:?}\n\
         [debug]\n  address = \"\"\n\
         [metrics]\n  address = \"\"\n",
        root = dir.join("root"),
        state = dir.join("state"),
        sock = socket,
        ttrpc = dir.join("containerd.sock.ttrpc"),
    );
    if let Some(sock) = &opts.imgd_snapshotter {
        text += &format!(
            "[proxy_plugins]\n  [proxy_plugins.imgd]\n    type = \"snapshot\"\n    address = {sock:?}\n"
        );
    }
    // This machine has no CAP_SYS_RESOURCE, so the sandbox's default oom_score_adj of -998
    // cannot be set: CRI clamps it to containerd's own with restrict_oom_score_adj.
    if let Some(cri) = &opts.cri {
        let cni = dir.join("cni");
        std::fs::create_dir_all(cni.join("bin"))?;
        std::fs::create_dir_all(cni.join("conf"))?;
        let stream_port = crate::process::free_port()?;
        text += &format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             sandbox_image = {sandbox:?}\n\
             stream_server_address = \"127.0.0.1\"\n\
             stream_server_port = \"{stream_port}\"\n\
             disable_apparmor = true\n\
             restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             snapshotter = {snap:?}\n\
             disable_snapshot_annotations = false\n\
             default_runtime_name = \"runc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
             runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             bin_dir = {bin:?}\n\
             conf_dir = {conf:?}\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
             config_path = {hosts:?}\n",
            sandbox = cri.sandbox_image,
            snap = cri.snapshotter,
            bin = cni.join("bin"),
            conf = cni.join("conf"),
            hosts = cri.hosts_dir,
        );
    }
    Ok(text)
}

/// A running private containerd.
pub struct Containerd {
    guard: ChildGuard,
    dir: TempDir,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd with its defaults and waits until `ctr version` reaches it.
    pub fn start() -> Result<Containerd> {
        Containerd::start_with(&ContainerdOptions::default())
    }

    /// Starts containerd with `opts` and waits until `ctr version` reaches it.
    pub fn start_with(opts: &ContainerdOptions) -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("imgd-ctrd-").tempdir()?;
        let socket = dir.path().join("containerd.sock");
        let config = config_text(dir.path(), &socket, opts)?;
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let mut cmd = match &opts.host {
            Some(host) => host.command("containerd"),
            None => Command::new("containerd"),
        };
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

    /// `ctr-remote images rpull --plain-http --snapshotter SNAPSHOTTER REFERENCE`: a pull
    /// that labels each layer's extract snapshot with its image and digest.
    pub fn rpull(&self, reference: &str, snapshotter: &str, timeout: Duration) -> Result<String> {
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args([
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                reference,
            ]);
        run_capture(&mut cmd, "ctr-remote images rpull", timeout)
            .with_context(|| format!("containerd log:\n{}", self.log()))
    }

    /// The root directory (content store, metadata, snapshotters' data).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
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
        let tasks = self.dir.path().join("state/io.containerd.runtime.v2.task");
        let mut pids = Vec::new();
        let namespaces = std::fs::read_dir(tasks).into_iter().flatten().flatten();
        let task_dirs =
            namespaces.flat_map(|ns| std::fs::read_dir(ns.path()).into_iter().flatten().flatten());
        for entry in task_dirs {
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
