//! Cleanup guards and bounded commands for tests and benchmarks that start containers,
//! mounts and child processes: everything they start is undone on drop, and every command
//! has a time limit.

use crate::daemons::Agent;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child killed (by its pid) and reaped on drop.
pub struct KillOnDrop(pub Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` within `timeout` (killed by pid past it) and returns its stdout (`None`:
/// sent to /dev/null) and how long it ran; fails on a non-zero exit.
pub fn run_bounded(
    cmd: &mut Command,
    what: &str,
    capture: bool,
    timeout: Duration,
) -> Result<(String, Duration)> {
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let mut guard = KillOnDrop(Some(child));
    let c = guard.0.as_mut().context("child")?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            s
        })
    };
    let out = drain(c.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(c.stderr.take().map(|r| Box::new(r) as _));
    let deadline = started + timeout;
    let status = loop {
        if let Some(s) = guard.0.as_mut().context("child")?.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            drop(guard); // kills; the pipes close and the readers end
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    if !status.success() {
        bail!("{what} failed ({status}): {err}");
    }
    Ok((out, took))
}

/// An `imgctl mount`, unmounted through the agent on drop (lazily by the kernel if the
/// agent cannot).
pub struct ImgdMount<'a> {
    agent: &'a Agent,
    dir: PathBuf,
}

impl<'a> ImgdMount<'a> {
    /// Mounts `image` at `dir` (created if needed) through the agent.
    pub fn mount(agent: &'a Agent, image: &str, dir: &Path) -> Result<ImgdMount<'a>> {
        std::fs::create_dir_all(dir)?;
        let (ok, out, err) = agent.imgctl(&["mount", image, path_str(dir)?])?;
        if !ok {
            bail!("imgctl mount: {out}{err}\n{}", agent.log());
        }
        Ok(ImgdMount {
            agent,
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for ImgdMount<'_> {
    fn drop(&mut self) {
        let ok = self
            .dir
            .to_str()
            .and_then(|d| self.agent.imgctl(&["umount", d]).ok())
            .is_some_and(|(ok, _, _)| ok);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// The path as UTF-8 text, for command lines.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// [`run_bounded`] capturing stdout, which it returns.
pub fn run_capture(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String> {
    run_bounded(cmd, what, true, timeout).map(|(out, _)| out)
}

impl ImgdMount<'_> {
    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An overlayfs mount at `merged`, unmounted on drop.
pub struct Overlay {
    merged: PathBuf,
}

impl Overlay {
    /// Mounts an overlay of `lower` with upper, work and merged dirs under `scratch`.
    pub fn mount(lower: &Path, scratch: &Path) -> Result<Overlay> {
        let (upper, work, merged) = (
            scratch.join("upper"),
            scratch.join("work"),
            scratch.join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d)?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        run_capture(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&merged),
            "mount -t overlay",
            Duration::from_secs(60),
        )?;
        Ok(Overlay { merged })
    }
}

impl Overlay {
    /// The merged directory (a container's rootfs).
    pub fn merged(&self) -> &Path {
        &self.merged
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.merged)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
        }
    }
}
