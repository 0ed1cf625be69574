//! The snapshots' metadata and directories: containerd's snapshot rules (kinds, parents,
//! commit, remove) over the `snapshots` table, with one directory per snapshot id.
//!
//! ```text
//! ROOT/snapshots/ID/fs     the snapshot's files (an active snapshot's upperdir)
//! ROOT/snapshots/ID/work   overlayfs workdir of an active snapshot
//! ```
//!
//! Placeholders (committed snapshots of lazily served layers) have no directory: their
//! chain is read through one imgd view (see [`super::views`]).

use super::error::SnapshotError;
use super::records::{now_ns, Kind, RemoteLayer, SnapshotRecord, Snapshots, Usage};
use crate::cache::ChunkCache;
use imgd_core::store::MetaDb;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One layer of what an active or view snapshot mounts below its own directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lower {
    /// An ordinary committed snapshot's files.
    Dir(PathBuf),
    /// The lazily served chain whose top placeholder has this name.
    View(String),
}

/// The snapshot metadata store, in the agent's metadata database. Every change is one
/// synced RocksDB write under one lock (containerd's own metadata store serialises its
/// transactions the same way).
pub struct SnapshotStore {
    cache: Arc<ChunkCache>,
    root: PathBuf,
    /// The next snapshot id; held for every change.
    next_id: Mutex<u64>,
}

impl SnapshotStore {
    /// Opens the store of the snapshots under `root`.
    pub fn open(cache: Arc<ChunkCache>, root: &Path) -> Result<SnapshotStore, SnapshotError> {
        let next = cache
            .meta()
            .scan::<Snapshots>()?
            .iter()
            .map(|(_, r)| r.id + 1)
            .max()
            .unwrap_or(1);
        Ok(SnapshotStore {
            cache,
            root: root.to_path_buf(),
            next_id: Mutex::new(next),
        })
    }

    fn db(&self) -> &MetaDb {
        self.cache.meta()
    }

    fn locked(&self) -> MutexGuard<'_, u64> {
        self.next_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshotter's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// The snapshot named `key`.
    pub fn get(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        self.db()
            .get::<Snapshots>(&key.to_string())?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))
    }

    /// Every snapshot, by name.
    pub fn list(&self) -> Result<Vec<(String, SnapshotRecord)>, SnapshotError> {
        Ok(self.db().scan::<Snapshots>()?)
    }

    /// Checks `parent` may be a parent: it exists and is committed.
    fn check_parent(&self, parent: Option<&str>) -> Result<(), SnapshotError> {
        if let Some(p) = parent {
            if self.get(p)?.kind != Kind::Committed {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "parent {p} is not committed"
                )));
            }
        }
        Ok(())
    }

    /// Creates an active or view snapshot `key` with its directories.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, SnapshotError> {
        if kind == Kind::Committed {
            return Err(SnapshotError::InvalidArgument(
                "only active and view snapshots are created".into(),
            ));
        }
        let mut next = self.locked();
        if self.db().contains::<Snapshots>(&key.to_string())? {
            return Err(SnapshotError::AlreadyExists(key.to_string()));
        }
        self.check_parent(parent)?;
        let id = *next;
        let fs = self.fs_dir(id);
        std::fs::create_dir_all(&fs)
            .map_err(SnapshotError::io(format!("creating {}", fs.display())))?;
        if kind == Kind::Active {
            let work = self.work_dir(id);
            std::fs::create_dir_all(&work)
                .map_err(SnapshotError::io(format!("creating {}", work.display())))?;
        }
        let now = now_ns();
        let record = SnapshotRecord {
            id,
            kind,
            parent: parent.map(str::to_string),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: None,
            usage: Usage::default(),
        };
        self.db().put::<Snapshots>(&key.to_string(), &record)?;
        *next += 1;
        Ok(record)
    }

    /// Commits a placeholder `target` for a lazily served layer on `parent`, which must be
    /// absent or a placeholder itself. Fails with `AlreadyExists` if `target` exists.
    pub fn create_placeholder(
        &self,
        target: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> Result<(), SnapshotError> {
        let mut next = self.locked();
        if self.db().contains::<Snapshots>(&target.to_string())? {
            return Err(SnapshotError::AlreadyExists(target.to_string()));
        }
        self.check_parent(parent)?;
        let now = now_ns();
        let record = SnapshotRecord {
            id: *next,
            kind: Kind::Committed,
            parent: parent.map(str::to_string),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: Some(remote),
            usage: Usage::default(),
        };
        self.db().put::<Snapshots>(&target.to_string(), &record)?;
        *next += 1;
        Ok(())
    }

    /// True if `name` is absent (no parent) or a placeholder.
    pub fn is_remote_or_root(&self, name: Option<&str>) -> Result<bool, SnapshotError> {
        match name {
            None => Ok(true),
            Some(n) => Ok(self.get(n)?.remote.is_some()),
        }
    }

    /// Commits active snapshot `key` as `name`, with the disk use measured by the caller.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<(), SnapshotError> {
        let _guard = self.locked();
        let mut record = self.get(key)?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        if self.db().contains::<Snapshots>(&name.to_string())? {
            return Err(SnapshotError::AlreadyExists(name.to_string()));
        }
        record.kind = Kind::Committed;
        record.labels.extend(labels);
        record.updated_ns = now_ns();
        record.usage = usage;
        let mut batch = self.db().batch();
        batch.delete::<Snapshots>(&key.to_string())?;
        batch.put::<Snapshots>(&name.to_string(), &record)?;
        self.db().write(batch)?;
        Ok(())
    }

    /// Removes snapshot `key` (it must have no children) and returns its record; the
    /// caller removes its directory or view.
    pub fn remove(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        let _guard = self.locked();
        let record = self.get(key)?;
        let child = self
            .list()?
            .into_iter()
            .find(|(_, r)| r.parent.as_deref() == Some(key));
        if let Some((child, _)) = child {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} has a child ({child})"
            )));
        }
        self.db().delete::<Snapshots>(&key.to_string())?;
        Ok(record)
    }

    /// Sets labels: `mask` empty or `labels` replaces them all; `labels.KEY` sets or
    /// clears one.
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        mask: &[String],
    ) -> Result<SnapshotRecord, SnapshotError> {
        let _guard = self.locked();
        let mut record = self.get(key)?;
        if mask.is_empty() || mask.iter().any(|m| m == "labels") {
            record.labels = labels;
        } else {
            for path in mask {
                let Some(k) = path.strip_prefix("labels.") else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {path:?} of a snapshot"
                    )));
                };
                match labels.get(k) {
                    Some(v) => record.labels.insert(k.to_string(), v.clone()),
                    None => record.labels.remove(k),
                };
            }
        }
        record.updated_ns = now_ns();
        self.db().put::<Snapshots>(&key.to_string(), &record)?;
        Ok(record)
    }

    /// What a snapshot on `parent` mounts below itself, nearest first: ordinary parents'
    /// directories down to the first placeholder, which stands for its whole chain.
    pub fn lowers(&self, parent: Option<&str>) -> Result<Vec<Lower>, SnapshotError> {
        let mut out = Vec::new();
        let mut cur = parent.map(str::to_string);
        while let Some(name) = cur {
            let record = self.get(&name)?;
            if record.remote.is_some() {
                out.push(Lower::View(name));
                break;
            }
            out.push(Lower::Dir(self.fs_dir(record.id)));
            cur = record.parent;
        }
        Ok(out)
    }

    /// The layers of the placeholder chain topped by `top`, bottom first.
    pub fn chain(&self, top: &str) -> Result<Vec<RemoteLayer>, SnapshotError> {
        let mut layers = Vec::new();
        let mut cur = Some(top.to_string());
        while let Some(name) = cur {
            let record = self.get(&name)?;
            let remote = record.remote.ok_or_else(|| {
                SnapshotError::FailedPrecondition(format!("{name} is not a lazily served layer"))
            })?;
            layers.push(remote);
            cur = record.parent;
        }
        layers.reverse();
        Ok(layers)
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
