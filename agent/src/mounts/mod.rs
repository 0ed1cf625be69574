//! Lazy mounts: an image's merged rootfs as a read-only FUSE filesystem whose file bytes
//! are fetched chunk by chunk (cache, then peers, then proxy) as they are read.
//!
//! Each mount is served by its own mount process (`imgd-mount`, see
//! [`crate::mount_process`]), started in a session of its own, so mounts outlive the
//! agent: a crash, `kill -9` or upgrade of `imgd` leaves them serving. The process reads
//! cached chunks straight from the cache's chunk files and asks the agent's local API
//! for the others (`GET /v1/chunks/ID/LAYER/CHUNK`), reconnecting when a new agent is
//! up. The agent keeps a record of each mount under `DATA_DIR/mounts/ID/` ([`record`]);
//! an agent that starts takes back the mounts whose process is alive and cleans up the
//! others.
//!
//! A mount's life, as the agent sees it: *starting* (the dir is reserved, the record
//! written, the process starting) → *serving* → *unmounting* (asked to stop; back to
//! *serving* if the kernel refuses, e.g. busy) → gone, when its process has exited and
//! the agent removed its record and its layers' protection from eviction. A process that
//! exits without being asked (killed, or unmounted behind the agent's back) goes the same
//! way, and a mount it left dead (`ENOTCONN`) is detached.

pub mod control;
pub mod prepare;
pub mod process;
mod reads;
pub mod record;
mod status;

use crate::cache::ChunkCache;
use crate::config::{LogFormat, MountConfig};
use crate::error::AgentError;
use crate::fetch::Fetcher;
use crate::layer_indexes::LayerIndexes;
use crate::layer_parts::PartShare;
use crate::pieces::Pieces;
use crate::proxy_client::Repo;
use crate::window_share::WindowShare;

use control::{Control, ControlError};
use imgd_core::Digest;
pub use prepare::{image_spec, startup_prefetch};
use process::Process;
use record::{MountRecord, RecordDir};
pub use status::MountStatus;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// What to mount: the layers of a view, bottom first, routed to the proxy through `repo`.
#[derive(Clone, Debug)]
pub struct MountSpec {
    /// What `imgctl status` calls the mount (e.g. the image reference).
    pub label: String,
    pub repo: Repo,
    pub layers: Vec<Digest>,
    /// The image's manifest, under which its startup trace is kept (`None`: no trace is
    /// learned or prefetched for this mount).
    pub manifest: Option<Digest>,
}

/// Where a mount is in its life (see the module docs; *starting* mounts are only
/// reserved directories).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    Unmounting,
}

/// A mount with a live process.
struct Entry {
    record: Arc<MountRecord>,
    control: Control,
    phase: Phase,
    pid: Option<u32>,
    /// Becomes true once the process has exited and the mount is cleaned up.
    gone: watch::Receiver<bool>,
}

#[derive(Default)]
struct State {
    live: HashMap<PathBuf, Entry>,
    /// Directories being mounted, with their record once it exists: its mount process
    /// may ask for chunks before it is registered as live.
    starting: HashMap<PathBuf, Option<Arc<MountRecord>>>,
}

/// What mounts need of the agent, handed to them at start: the fetcher (cache and
/// proxy), the piece store, the layer indexes, windows and parts, and where things are. Mounts
/// depend on these, not on [`crate::agent::Agent`] (which holds the [`Mounts`]).
pub struct MountContext {
    pub fetcher: Arc<Fetcher>,
    pub pieces: Arc<Pieces>,
    pub indexes: Arc<LayerIndexes>,
    pub windows: Arc<WindowShare>,
    pub parts: Arc<PartShare>,
    /// `DATA_DIR/mounts`: a record per mount.
    pub records: PathBuf,
    /// The agent's local API socket, which mount processes ask for chunks.
    pub agent_socket: PathBuf,
    pub log_format: LogFormat,
    pub config: MountConfig,
}

/// The mounts of this agent, by directory.
pub struct Mounts {
    state: Arc<Mutex<State>>,
    ctx: MountContext,
}

/// Fault injection for tests: milliseconds to wait between a mount process serving and
/// its registration as live (the window in which its first requests used to find no
/// mount).
pub const REGISTER_PAUSE_ENV: &str = "IMGD_FAULT_MOUNT_REGISTER_PAUSE_MS";

/// How long `umount` waits for the process to exit after it unmounted.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory reserved for a mount being started; released on drop.
struct Reservation {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
}

impl Reservation {
    /// The mount's record, served to its process from now on (until it is live).
    fn set_record(&self, record: Arc<MountRecord>) {
        if let Some(r) = lock(&self.state).starting.get_mut(&self.dir) {
            *r = Some(record);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.state).starting.remove(&self.dir);
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mounts {
    /// No mounts yet ([`Mounts::recover`] takes back a previous agent's).
    pub fn new(ctx: MountContext) -> Self {
        Mounts {
            state: Arc::default(),
            ctx,
        }
    }

    /// What the mounts use of the agent.
    pub fn context(&self) -> &MountContext {
        &self.ctx
    }

    /// Resolves `image` and mounts its layers at `dir` (which must exist).
    pub async fn mount(&self, image: &str, dir: &Path) -> Result<MountStatus, AgentError> {
        let spec = image_spec(&self.ctx, image).await?;
        self.mount_layers(spec, dir).await
    }

    /// True if `dir` is a mount of this agent (or one being made).
    pub fn is_mounted(&self, dir: &Path) -> bool {
        let st = lock(&self.state);
        st.live.contains_key(dir) || st.starting.contains_key(dir)
    }

    fn reserve(&self, dir: &Path) -> Result<Reservation, AgentError> {
        let mut st = lock(&self.state);
        if st.live.contains_key(dir) || st.starting.contains_key(dir) {
            return Err(AgentError::Mount(format!(
                "{} is already an imgd mount",
                dir.display()
            )));
        }
        st.starting.insert(dir.to_path_buf(), None);
        Ok(Reservation {
            state: self.state.clone(),
            dir: dir.to_path_buf(),
        })
    }

    /// Mounts the view of `spec.layers` at `dir` (which must exist), served by a new
    /// mount process.
    pub async fn mount_layers(
        &self,
        spec: MountSpec,
        dir: &Path,
    ) -> Result<MountStatus, AgentError> {
        let fail = |m: String| AgentError::Mount(m);
        let reserved = self.reserve(dir)?;
        if !dir.is_dir() {
            return Err(fail(format!("{} is not a directory", dir.display())));
        }
        let layers = prepare::fetch_layers(&self.ctx, &spec.repo, &spec.layers).await?;
        let fetcher = &self.ctx.fetcher;
        let known_trace = match &spec.manifest {
            Some(m) => fetcher.proxy.trace(m).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "startup trace unavailable");
                None
            }),
            None => None,
        };
        let id = record::new_id();
        let rdir = RecordDir::new(&self.ctx.records, &id);
        let record = MountRecord {
            id,
            dir: dir.to_path_buf(),
            label: spec.label.clone(),
            repo: spec.repo.name.clone(),
            repo_ns: spec.repo.ns.clone(),
            layers: spec.layers.clone(),
            lists: layers.lists,
            index_files: layers.index_files,
            manifest: spec.manifest,
            record_trace: spec.manifest.is_some() && known_trace.is_none(),
            warm: known_trace,
            agent_socket: self.ctx.agent_socket.clone(),
            cache_dir: fetcher.cache.dir().to_path_buf(),
            read_timeout_ms: self.ctx.config.read_timeout_ms,
            threads: self.ctx.config.threads,
            trace_secs: self.ctx.config.trace_secs,
            created_unix: record::unix_now(),
        };
        let record = Arc::new(record);
        let (r, w) = (rdir.clone(), record.clone());
        tokio::task::spawn_blocking(move || r.write(&w))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("writing the mount record: {e}")))?;
        fetcher.cache.protect(&spec.layers);
        reserved.set_record(record.clone());
        let process = match process::start(&rdir, self.ctx.log_format).await {
            Ok(p) => p,
            Err(msg) => {
                fetcher.cache.unprotect(&spec.layers);
                if let Err(e) = rdir.remove() {
                    tracing::warn!(error = %e, "removing the record of a failed mount");
                }
                return Err(fail(format!("mounting at {}: {msg}", dir.display())));
            }
        };
        if let Some(ms) = std::env::var(REGISTER_PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.serve(record, rdir, process);
        tracing::info!(label = %spec.label, dir = %dir.display(), "mounted");
        self.status_of(dir)
            .await
            .ok_or_else(|| fail(format!("the mount process of {} exited", dir.display())))
    }

    /// Registers a mount whose process runs, and watches for the process's exit.
    fn serve(&self, record: Arc<MountRecord>, rdir: RecordDir, process: Process) {
        let (gone_tx, gone) = watch::channel(false);
        let control = Control::new(&rdir.control_socket());
        let dir = record.dir.clone();
        lock(&self.state).live.insert(
            dir.clone(),
            Entry {
                record: record.clone(),
                control: control.clone(),
                phase: Phase::Serving,
                pid: process.pid(),
                gone,
            },
        );
        if let (true, Some(manifest)) = (record.record_trace, record.manifest) {
            let ends = record.created_unix + record.trace_secs;
            let wait = Duration::from_secs(ends.saturating_sub(record::unix_now()));
            let (fetcher, control) = (self.ctx.fetcher.clone(), control.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                store_trace(&control, &fetcher, &manifest).await;
            });
        }
        let (state, cache) = (self.state.clone(), self.ctx.fetcher.cache.clone());
        tokio::spawn(async move {
            process.exited().await;
            let ours = |e: &Entry| e.record.id == record.id;
            let phase = lock(&state)
                .live
                .get(&dir)
                .filter(|e| ours(e))
                .map(|e| e.phase);
            let end = match phase {
                Some(Phase::Unmounting) => End::Unmounted,
                _ => End::Died,
            };
            // Listed until cleaned up, so a mount that is no longer listed is gone.
            clean_up(&cache, &record, &rdir, end).await;
            {
                let mut st = lock(&state);
                if st.live.get(&dir).is_some_and(ours) {
                    st.live.remove(&dir);
                }
            }
            let _ = gone_tx.send(true);
        });
    }

    /// Unmounts `dir`, storing the startup trace if it is still being recorded. Fails,
    /// and the mount stays, if the kernel refuses (e.g. it is busy).
    pub async fn umount(&self, dir: &Path) -> Result<(), AgentError> {
        let fail = |m: String| AgentError::Mount(m);
        let (record, control, mut gone) = {
            let mut st = lock(&self.state);
            let entry = st
                .live
                .get_mut(dir)
                .ok_or_else(|| fail(format!("{} is not an imgd mount", dir.display())))?;
            if entry.phase == Phase::Unmounting {
                return Err(fail(format!("{} is being unmounted", dir.display())));
            }
            entry.phase = Phase::Unmounting;
            (
                entry.record.clone(),
                entry.control.clone(),
                entry.gone.clone(),
            )
        };
        if let (true, Some(manifest)) = (record.record_trace, record.manifest) {
            store_trace(&control, &self.ctx.fetcher, &manifest).await;
        }
        match control.stop().await {
            Ok(()) => {}
            // Its process is gone already: the watcher cleans up.
            Err(ControlError::Unreachable(e)) if e.nobody_listens() => {}
            Err(e) => {
                if let Some(entry) = lock(&self.state).live.get_mut(dir) {
                    entry.phase = Phase::Serving;
                }
                return Err(fail(format!("unmounting {}: {e}", dir.display())));
            }
        }
        tokio::time::timeout(EXIT_TIMEOUT, gone.wait_for(|g| *g))
            .await
            .map_err(|_| {
                fail(format!(
                    "the mount process of {} did not exit within {EXIT_TIMEOUT:?}",
                    dir.display()
                ))
            })?
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// Takes back the mounts a previous agent left: those whose process is alive are
    /// served again (their layers protected from eviction); the others are cleaned up.
    /// Called once at start, before the local API is up.
    pub async fn recover(&self) -> Result<(), AgentError> {
        let root = self.ctx.records.clone();
        let dirs = tokio::task::spawn_blocking(move || record::list(&root))
            .await
            .map_err(|e| AgentError::Start(e.to_string()))?
            .map_err(|e| AgentError::Start(format!("listing mount records: {e}")))?;
        for rdir in dirs {
            let record = match rdir.read() {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    // The agent stopped while writing it: the process never started.
                    tracing::warn!(record = %rdir.path().display(), error = %e, "removing an unfinished mount record");
                    let _ = rdir.remove();
                    continue;
                }
            };
            let control = Control::new(&rdir.control_socket());
            let pid = match control.status().await {
                Ok(s) if s.id == record.id => Some(s.pid),
                Ok(_) | Err(_) => process::find(&rdir),
            };
            let Some(pid) = pid else {
                clean_up(&self.ctx.fetcher.cache, &record, &rdir, End::Stale).await;
                continue;
            };
            self.ctx.fetcher.cache.protect(&record.layers);
            tracing::info!(dir = %record.dir.display(), label = %record.label, pid, "mount taken over from the previous agent");
            let process = Process::Adopted {
                pid,
                record: rdir.clone(),
            };
            self.serve(record, rdir, process);
        }
        Ok(())
    }

    /// The record of mount `id`: live, or being started (its process serves already).
    pub fn live_record(&self, id: &str) -> Option<Arc<MountRecord>> {
        let st = lock(&self.state);
        st.live
            .values()
            .map(|e| &e.record)
            .chain(st.starting.values().flatten())
            .find(|r| r.id == id)
            .cloned()
    }
}

/// Takes the startup trace a mount recorded and stores it at the proxy (once: the
/// process hands it out only the first time).
async fn store_trace(control: &Control, fetcher: &Fetcher, manifest: &Digest) {
    let trace = match control.take_trace().await {
        Ok(Some(t)) if !t.paths.is_empty() => t,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(error = %e, "could not get the startup trace from the mount process");
            return;
        }
    };
    match fetcher.proxy.put_trace(manifest, &trace).await {
        Ok(()) => tracing::info!(files = trace.paths.len(), %manifest, "startup trace stored"),
        Err(e) => tracing::warn!(error = %e, "storing the startup trace failed"),
    }
}

/// How a mount's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// It unmounted when asked.
    Unmounted,
    /// It exited without being asked, while this agent served the mount.
    Died,
    /// It was gone before this agent started (its layers were never protected here).
    Stale,
}

/// After a mount's process exited: detaches the mount if the process left it dead,
/// lifts the layers' protection and removes the record.
async fn clean_up(cache: &ChunkCache, record: &MountRecord, rdir: &RecordDir, end: End) {
    let (dir, rd) = (record.dir.clone(), rdir.clone());
    let done =
        tokio::task::spawn_blocking(move || (process::detach_dead_mount(&dir), rd.remove())).await;
    let dir = record.dir.display();
    match done {
        Ok((detached, removed)) => {
            match detached {
                Ok(true) => tracing::warn!(%dir, "detached a dead mount (ENOTCONN)"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%dir, error = %e, "could not detach a dead mount"),
            }
            if let Err(e) = removed {
                tracing::warn!(%dir, error = %e, "could not remove the mount record");
            }
        }
        Err(e) => tracing::warn!(%dir, error = %e, "cleaning up a mount"),
    }
    match end {
        End::Unmounted => tracing::info!(%dir, "unmounted"),
        End::Died => {
            tracing::warn!(%dir, label = %record.label, "mount process exited: mount removed")
        }
        End::Stale => {
            tracing::warn!(%dir, label = %record.label, "stale mount cleaned up: its process was gone")
        }
    }
    if end != End::Stale {
        cache.unprotect(&record.layers);
    }
}
