//! Mount processes from the agent's side: starting one (`imgd-mount`, in a session of its
//! own so that a kill of the agent or of its process group leaves it alone), waiting
//! for it to exit, and cleaning up after one that died.

use super::record::RecordDir;
use imgd_core::logging::LogFormat;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// The mount process binary's name; it is looked up next to the agent's executable.
pub const MOUNT_BINARY: &str = "imgd-mount";

/// How long a mount process may take to build its view and mount it.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the agent checks that a mount process it did not start is still there.
const POLL: Duration = Duration::from_millis(500);

/// A mount process the agent knows.
pub enum Process {
    /// Started by this agent: its exit is waited for (and reaped).
    Child(tokio::process::Child),
    /// Found running when this agent started (its parent is gone).
    Adopted { pid: u32, record: RecordDir },
}

impl Process {
    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Process::Child(c) => c.id(),
            Process::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Returns once the process has exited.
    pub async fn exited(self) {
        match self {
            Process::Child(mut c) => {
                let _ = c.wait().await;
            }
            Process::Adopted { pid, record } => {
                while serves(pid, &record) {
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }
}

/// True if process `pid` is alive and is the mount process of `record` (not a later
/// process that reuses the id).
pub fn serves(pid: u32, record: &RecordDir) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    let want = record.path().as_os_str().as_encoded_bytes();
    !zombie && cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// The mount process of `record`, if one runs (found by its command line in `/proc`).
pub fn find(record: &RecordDir) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| serves(*pid, record))
}

/// Where `imgd-mount` is: next to this executable.
fn mount_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating imgd: {e}"))?;
    let bin = exe.with_file_name(MOUNT_BINARY);
    if !bin.is_file() {
        return Err(format!(
            "{} not found: install it next to imgd",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Starts the mount process of `record` and waits until it serves the mount (it prints
/// `ready`) or fails (it prints `error: REASON` and exits).
pub async fn start(record: &RecordDir, log_format: LogFormat) -> Result<Process, String> {
    let mut cmd = tokio::process::Command::new(mount_binary()?);
    let format = match log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    cmd.arg(record.path())
        .args(["--log-format", format])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(false);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {MOUNT_BINARY}: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("no pipe to the mount process".into());
    };
    let mut line = String::new();
    let read = tokio::time::timeout(
        READY_TIMEOUT,
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    match read {
        Ok(Ok(_)) if line.trim_end() == "ready" => Ok(Process::Child(child)),
        Ok(Ok(_)) => {
            let _ = child.wait().await;
            let reason = line.trim_end().trim_start_matches("error: ");
            Err(if reason.is_empty() {
                format!("{MOUNT_BINARY} exited without mounting (see its log)")
            } else {
                reason.to_string()
            })
        }
        Ok(Err(e)) => {
            let _ = child.kill().await;
            Err(format!("reading from {MOUNT_BINARY}: {e}"))
        }
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "{MOUNT_BINARY} did not mount within {READY_TIMEOUT:?}"
            ))
        }
    }
}

/// True if an imgd FUSE filesystem is mounted at `dir` (per `/proc/self/mountinfo`: a
/// `fuse` or `fuse.imgd` filesystem whose source is `imgd:LABEL`).
pub fn is_imgd_mount(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines().any(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS... - FSTYPE SOURCE SUPER_OPTIONS
        let mount_point = line.split(' ').nth(4).map(unescape);
        let mut tail = line.split(" - ").nth(1).unwrap_or("").split(' ');
        let (fstype, source) = (tail.next().unwrap_or(""), tail.next().unwrap_or(""));
        mount_point.as_deref() == Some(&*want)
            && (fstype == "fuse" || fstype == "fuse.imgd")
            && unescape(source).starts_with("imgd:")
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches the imgd mount at `dir` if there is one (its process is gone, so it answers
/// `ENOTCONN`). True if one was detached.
pub fn detach_dead_mount(dir: &Path) -> std::io::Result<bool> {
    if !is_imgd_mount(dir) {
        return Ok(false);
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}
