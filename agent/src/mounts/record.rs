//! A mount's record: everything its mount process serves, under `DATA_DIR/mounts/ID/`.
//!
//! - `record.json`: the [`MountRecord`] (temp file, fsync, rename), so a directory
//!   without it is an interrupted mount;
//! - `control.sock`: the mount process's control socket (see [`super::control`]).
//!
//! The agent writes the record before it starts the process, the process reads it once,
//! and an agent that starts again reads every record to take its mounts back.

use imgd_core::wire::StartupTrace;
use imgd_core::{ChunkList, Digest};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What one mount process serves, and how.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MountRecord {
    pub id: String,
    /// The mount point.
    pub dir: PathBuf,
    pub label: String,
    pub repo: String,
    pub repo_ns: Option<String>,
    /// Layers, bottom first, with their chunk lists and where their indexes are stored.
    pub layers: Vec<Digest>,
    pub lists: Vec<ChunkList>,
    pub index_files: Vec<PathBuf>,
    /// The manifest whose startup trace this mount records or prefetched.
    pub manifest: Option<Digest>,
    /// True while the files opened are to be recorded as the startup trace.
    pub record_trace: bool,
    /// A startup trace to prefetch now.
    pub warm: Option<StartupTrace>,
    /// The agent's local API, for chunks the cache does not hold.
    pub agent_socket: PathBuf,
    /// The chunk cache's directory, whose chunk files are read directly.
    pub cache_dir: PathBuf,
    pub read_timeout_ms: u64,
    pub threads: usize,
    pub trace_secs: u64,
    /// When the mount was made (seconds since the epoch).
    pub created_unix: u64,
}

/// The directory of one mount's record.
#[derive(Clone, Debug)]
pub struct RecordDir(pub PathBuf);

impl RecordDir {
    /// The record directory of mount `id` under `root` (`DATA_DIR/mounts`).
    pub fn new(root: &Path, id: &str) -> RecordDir {
        RecordDir(root.join(id))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn record(&self) -> PathBuf {
        self.0.join("record.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }

    /// Writes the record (atomically).
    pub fn write(&self, record: &MountRecord) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_synced(&self.record(), &json)?;
        std::fs::File::open(&self.0)?.sync_all()
    }

    /// Reads the record.
    pub fn read(&self) -> std::io::Result<MountRecord> {
        let bytes = std::fs::read(self.record())?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Every record directory under `root`.
pub fn list(root: &Path) -> std::io::Result<Vec<RecordDir>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push(RecordDir(entry.path()));
        }
    }
    Ok(out)
}

/// A new mount id: 16 random hex digits.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Writes `bytes` to `path` through a temp file in the same directory: fsync, rename.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
