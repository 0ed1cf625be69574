//! Where inflated layers live on disk, and what the agent's quota needs of them: their
//! size, when they were last used, and eviction of those no mount holds.
//!
//! Under the cache directory `DIR` (the agent's, shared with its mount processes):
//! - `DIR/inflated/<layer hex>/stream`: the layer's uncompressed tar stream, a sparse
//!   file of the stream's length whose present spans hold their bytes;
//! - `DIR/inflated/<layer hex>/spans`: the append-only log of present ranges
//!   ([`super::extents`] records);
//! - `DIR/inflated/<layer hex>/lease`: an empty file on which every process using the
//!   layer holds a shared `flock`. Eviction takes it exclusively without waiting: if that
//!   fails a mount holds the layer and it stays. The lock dies with its process, so a
//!   killed mount holds nothing.
//! - `DIR/inflated/.evicting-*`: a layer being removed (renamed out of the way first, so
//!   no process opens it again); leftovers of an interrupted removal are removed next time.

use imgd_core::Digest;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The directory under the cache directory that holds inflated layers.
pub const DIR_NAME: &str = "inflated";
pub(super) const STREAM: &str = "stream";
pub(super) const SPANS: &str = "spans";
pub(super) const LEASE: &str = "lease";
const EVICTING: &str = ".evicting-";

/// `CACHE_DIR/inflated`.
pub fn root(cache_dir: &Path) -> PathBuf {
    cache_dir.join(DIR_NAME)
}

/// The directory of `layer`'s inflated stream under `root`.
pub fn layer_dir(root: &Path, layer: &Digest) -> PathBuf {
    root.join(layer.hex())
}

/// One inflated layer on disk.
#[derive(Clone, Debug)]
pub struct LayerUsage {
    pub layer: Digest,
    pub dir: PathBuf,
    /// Bytes of disk it takes (allocated blocks of its files).
    pub bytes: u64,
    /// When a process last opened it or added a span.
    pub last_used: SystemTime,
}

fn disk_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Every inflated layer under `root`, least recently used first. Leftovers of an
/// interrupted eviction are removed on the way.
pub fn usage(root: &Path) -> std::io::Result<Vec<LayerUsage>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let dir = entry.path();
        if name.starts_with(EVICTING) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove an evicted layer");
            }
            continue;
        }
        let Ok(layer) = format!("sha256:{name}").parse::<Digest>() else {
            continue;
        };
        let bytes = disk_bytes(&dir.join(STREAM)) + disk_bytes(&dir.join(SPANS));
        let last_used = modified(&dir.join(LEASE)).max(modified(&dir.join(SPANS)));
        out.push(LayerUsage {
            layer,
            dir,
            bytes,
            last_used,
        });
    }
    out.sort_by_key(|u| u.last_used);
    Ok(out)
}

/// What [`evict`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// The layer's files are gone.
    Removed,
    /// A process holds its lease: it stays.
    InUse,
}

/// Removes an inflated layer unless a process holds its lease. The directory is renamed
/// away while the lease is held exclusively, so a process that opens the layer meanwhile
/// finds its lease file gone and makes a new one.
pub fn evict(dir: &Path) -> std::io::Result<Eviction> {
    let lease = match File::open(dir.join(LEASE)) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if let Some(f) = &lease {
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(Eviction::InUse),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let away = dir.with_file_name(format!(
        "{EVICTING}{}-{:08x}",
        name.unwrap_or_default(),
        rand_word()
    ));
    std::fs::rename(dir, &away)?;
    drop(lease);
    std::fs::remove_dir_all(&away)?;
    Ok(Eviction::Removed)
}

fn rand_word() -> u32 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id().rotate_left(16)
}
