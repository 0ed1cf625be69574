//! Running the image's command with runc on a prepared rootfs, until its first line.

use anyhow::{bail, Context, Result};
use imgd_tests::guards::{path_str, KillOnDrop};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound on the container's first line and on its exit.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The capabilities Docker and containerd give a container by default.
const ENGINE_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// What the container runs and how its first line is recognised.
#[derive(Clone)]
pub struct Workload {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// The first line must start with this.
    pub first_line_prefix: String,
}

/// A runc container, force-deleted on drop.
struct Container {
    id: String,
    child: KillOnDrop,
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(c) = self.child.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Writes a runc bundle at `dir` from `template` (a `runc spec` config) whose rootfs is
/// `rootfs` and whose process is the workload, with the engines' default capabilities
/// and a tmpfs `/tmp` besides runc's `/proc`, `/dev` and `/sys`.
pub fn write_bundle(
    template: &serde_json::Value,
    dir: &Path,
    rootfs: &Path,
    work: &Workload,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut spec = template.clone();
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(work.argv);
    spec["process"]["env"] = serde_json::json!(work.env);
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = serde_json::json!(ENGINE_CAPS);
    }
    spec["mounts"]
        .as_array_mut()
        .context("runc spec without mounts")?
        .push(serde_json::json!({
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777"],
        }));
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// Starts the bundle with runc and, once the container's first line arrives, stops the
/// clock and calls `at_first_line`; then waits for the container to exit and deletes it.
/// Returns the time from `started` to the first line, the line, and `at_first_line`'s value.
pub fn run_until_first_line<T>(
    bundle: &Path,
    id: &str,
    work: &Workload,
    started: Instant,
    at_first_line: impl FnOnce() -> Result<T>,
) -> Result<(Duration, String, T)> {
    let child = Command::new("runc")
        .args(["run", "--bundle", path_str(bundle)?, id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning runc")?;
    let mut container = Container {
        id: id.to_string(),
        child: KillOnDrop(Some(child)),
    };
    let c = container.child.0.as_mut().context("runc child")?;
    let stdout = c.stdout.take().context("runc stdout")?;
    let stderr = c.stderr.take().context("runc stderr")?;
    // Drained all along, so a chatty container never blocks on a full pipe.
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(r) => r?,
        Err(_) => bail!("no output from the container within {RUN_TIMEOUT:?}"),
    };
    let took = started.elapsed();
    let sampled = at_first_line()?;
    let fail = |container: Container, what: String| -> Result<(Duration, String, T)> {
        drop(container); // kills runc, so stderr ends
        let err = err_reader.join().unwrap_or_default();
        bail!("{what}; container stderr: {err}");
    };
    if !line.starts_with(&work.first_line_prefix) {
        return fail(
            container,
            format!(
                "container printed {line:?}, expected a line starting with {:?}",
                work.first_line_prefix
            ),
        );
    }
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let c = container.child.0.as_mut().context("runc child")?;
        if let Some(status) = c.try_wait()? {
            if !status.success() {
                return fail(container, format!("runc exited with {status}"));
            }
            break;
        }
        if Instant::now() > deadline {
            return fail(
                container,
                format!("container did not exit within {RUN_TIMEOUT:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(container);
    Ok((took, line.trim_end().to_string(), sampled))
}
