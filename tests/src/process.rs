//! Child processes that cannot outlive the test, free ports, and waiting for servers.

use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::registry_client;

/// Time limit of each request while polling a server that is starting.
const POLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Owns a child process; on drop it is killed (SIGKILL, addressed by its PID) and reaped.
///
/// Only the process this guard was given is signalled, never a process group or anything
/// found by name.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    /// Wraps an already spawned `child`; `name` is used in error messages.
    pub fn new(child: Child, name: impl Into<String>) -> Self {
        ChildGuard {
            child,
            name: name.into(),
        }
    }

    /// Spawns `cmd` and guards the resulting child.
    pub fn spawn(cmd: &mut Command, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} ({cmd:?})"))?;
        Ok(ChildGuard::new(child, name))
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Mutable access to the underlying [`Child`] (e.g. to take its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has already exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking whether {} exited", self.name))
    }

    /// Fails if the child has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            Some(status) => bail!("{} (pid {}) exited: {status}", self.name, self.id()),
            None => Ok(()),
        }
    }

    /// Kills the child (SIGKILL by PID) and waits for it; returns its exit status.
    /// Harmless if it already exited.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // `Child::kill` sends SIGKILL to this child's PID; it can only fail if the child
        // was already reaped, which `wait` below reports.
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("waiting for {} after kill", self.name))
    }

    /// Polls `url` until it answers with any HTTP status, failing early if the child exits
    /// or when `timeout` passes. Returns the status of the first answer.
    pub fn wait_for_http(&mut self, url: &str, timeout: Duration) -> Result<u16> {
        poll_http(url, timeout, || self.ensure_running())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound then released).
///
/// Another process may take it before it is used; callers that spawn a server on it should
/// be ready to retry with a new port if the server fails to bind.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local address")?.port())
}

/// Polls `url` with GET until it answers with any HTTP status (2xx, 401, 404, ... all count)
/// or `timeout` passes. Returns the status of the first answer.
pub fn wait_for_http(url: &str, timeout: Duration) -> Result<u16> {
    poll_http(url, timeout, || Ok(()))
}

fn poll_http(url: &str, timeout: Duration, mut alive: impl FnMut() -> Result<()>) -> Result<u16> {
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        let err = match registry_client::get_with_timeout(url, &[], POLL_REQUEST_TIMEOUT) {
            Ok(resp) => return Ok(resp.status),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("{url} did not answer within {timeout:?}: {err:#}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `program args` to completion; returns (success, stdout, stderr).
pub fn run_ok(program: &str, args: &[&str]) -> (bool, String, String) {
    match std::process::Command::new(program).args(args).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}
