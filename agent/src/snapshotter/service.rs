//! The snapshotter's operations: containerd's snapshot calls over the store, with lazily
//! served layers committed as placeholders and their chains read through imgd views.

use super::error::SnapshotError;
use super::filters::{any_matches, Fields, Filter};
use super::labels::{self, LayerRequest};
use super::overlay::{self, ContainerdMount};
use super::records::{Kind, RemoteLayer, SnapshotRecord, Usage};
use super::store::{Lower, SnapshotStore};
use super::views::Views;
use crate::agent::Agent;
use crate::proxy_client::Repo;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// imgd's containerd snapshotter.
pub struct Snapshotter {
    agent: Arc<Agent>,
    store: Arc<SnapshotStore>,
    views: Views,
    /// Registry hosts that name the proxy itself (its address and this agent's mirror).
    local_hosts: Vec<String>,
}

/// Why a layer was not served lazily (it then takes containerd's ordinary path).
struct FullPath(String);

/// Runs blocking store or filesystem work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SnapshotError::View(format!("snapshotter task failed: {e}")))?
}

impl Snapshotter {
    /// Opens the snapshotter rooted at `root` (snapshot directories and views).
    pub fn open(agent: Arc<Agent>, root: &Path) -> Result<Snapshotter, SnapshotError> {
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(SnapshotError::io(format!("creating {}", root.display())))?;
        let store = Arc::new(SnapshotStore::open(agent.fetcher.cache.clone(), root)?);
        let mut local_hosts = vec![agent.config.mirror_listen.to_string()];
        if let Some(host) = host_of(agent.fetcher.proxy.base()) {
            local_hosts.push(host);
        }
        Ok(Snapshotter {
            views: Views::new(root),
            agent,
            store,
            local_hosts,
        })
    }

    /// `Prepare`: a placeholder (answered `AlreadyExists`) for a layer imgd can serve
    /// lazily, else an active snapshot and its mounts.
    pub async fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        passed: HashMap<String, String>,
    ) -> Result<Vec<ContainerdMount>, SnapshotError> {
        match labels::layer_request(&passed) {
            Some(Ok(req)) => match self.placeholder(&req, parent, &passed).await {
                Ok(()) => {
                    tracing::info!(layer = %req.layer, image = %req.image, target = %req.target, "layer served lazily: not unpacked");
                    return Err(SnapshotError::AlreadyExists(req.target));
                }
                Err(Ok(FullPath(why))) => {
                    tracing::info!(layer = %req.layer, image = %req.image, reason = %why, "layer takes the full path (containerd unpacks it)");
                }
                Err(Err(e)) => return Err(e),
            },
            Some(Err(why)) => {
                tracing::warn!(key, reason = %why, "layer labels unusable: full path")
            }
            None => {}
        }
        self.create(key, parent, Kind::Active, passed).await
    }

    /// `View`: a read-only snapshot on `parent`.
    pub async fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        passed: HashMap<String, String>,
    ) -> Result<Vec<ContainerdMount>, SnapshotError> {
        self.create(key, parent, Kind::View, passed).await
    }

    async fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        passed: HashMap<String, String>,
    ) -> Result<Vec<ContainerdMount>, SnapshotError> {
        let store = self.store.clone();
        let (k, p) = (key.to_string(), parent.map(str::to_string));
        let labels: BTreeMap<String, String> = passed.into_iter().collect();
        let record = blocking(move || store.create(&k, p.as_deref(), kind, labels)).await?;
        match self.mounts_of(&record).await {
            Ok(m) => Ok(m),
            Err(e) => {
                // A snapshot whose view cannot be mounted is of no use: undo it.
                let _ = self.remove(key).await;
                Err(e)
            }
        }
    }

    /// Commits a placeholder for `req` if imgd can serve the layer lazily. `Err(Ok(_))`
    /// says why not; `Err(Err(_))` is a failure to report.
    async fn placeholder(
        &self,
        req: &LayerRequest,
        parent: Option<&str>,
        passed: &HashMap<String, String>,
    ) -> Result<(), Result<FullPath, SnapshotError>> {
        let full = |why: String| Err(Ok(FullPath(why)));
        match self.store.is_remote_or_root(parent) {
            Ok(true) => {}
            Ok(false) => return full("its parent layer was unpacked, not served lazily".into()),
            Err(e) => return Err(Err(e)),
        }
        let route = match labels::proxy_route(&req.image, &self.local_hosts) {
            Ok(r) => r,
            Err(why) => return full(why),
        };
        let repo = Repo {
            name: route.name.clone(),
            ns: route.ns.clone(),
        };
        let agent = &self.agent;
        match agent.parts.index(&repo, &req.layer).await {
            Ok(index) if index.random_access => {}
            Ok(index) => {
                return full(format!(
                    "{:?} layers are not randomly readable yet",
                    index.compression
                ))
            }
            Err(e) => return full(e.to_string()),
        }
        let remote = RemoteLayer {
            layer: req.layer,
            repo: route.name,
            ns: route.ns,
            image: req.image.clone(),
        };
        let store = self.store.clone();
        let (target, parent) = (req.target.clone(), parent.map(str::to_string));
        let labels = labels::placeholder_labels(passed, &req.layer);
        blocking(move || store.create_placeholder(&target, parent.as_deref(), labels, remote))
            .await
            .map_err(Err)
    }

    /// The mounts of an active or view snapshot, mounting its chain's view if needed.
    async fn mounts_of(
        &self,
        record: &SnapshotRecord,
    ) -> Result<Vec<ContainerdMount>, SnapshotError> {
        let store = self.store.clone();
        let parent = record.parent.clone();
        let lowers = blocking(move || store.lowers(parent.as_deref())).await?;
        let mut dirs: Vec<PathBuf> = Vec::with_capacity(lowers.len());
        for lower in lowers {
            dirs.push(match lower {
                Lower::Dir(d) => d,
                Lower::View(top) => {
                    let chain = self.store.chain(&top)?;
                    self.views.ensure(&self.agent, &top, &chain).await?
                }
            });
        }
        let fs = self.store.fs_dir(record.id);
        let work = self.store.work_dir(record.id);
        Ok(overlay::mounts(record.kind, &fs, &work, &dirs))
    }

    /// `Mounts` of an active or view snapshot.
    pub async fn mounts(&self, key: &str) -> Result<Vec<ContainerdMount>, SnapshotError> {
        let record = self.store.get(key)?;
        if record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed: it has no mounts"
            )));
        }
        self.mounts_of(&record).await
    }

    /// `Commit` of active snapshot `key` as `name`.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        passed: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let store = self.store.clone();
        let (name, key) = (name.to_string(), key.to_string());
        blocking(move || {
            let record = store.get(&key)?;
            let usage = disk_usage(&store.fs_dir(record.id));
            store.commit(&name, &key, passed.into_iter().collect(), usage)
        })
        .await
    }

    /// `Remove`: the snapshot, and its directory or (for a placeholder) its view.
    pub async fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let store = self.store.clone();
        let k = key.to_string();
        let record = blocking(move || store.remove(&k)).await?;
        if record.remote.is_some() {
            return self.views.release(&self.agent, key).await;
        }
        let dir = self.store.dir(record.id);
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(SnapshotError::io(format!("removing {}", dir.display()))(e))
            }
            _ => Ok(()),
        })
        .await
    }

    /// `Stat`.
    pub fn stat(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        self.store.get(key)
    }

    /// `Update` of labels.
    pub async fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        mask: Vec<String>,
    ) -> Result<SnapshotRecord, SnapshotError> {
        let store = self.store.clone();
        let key = key.to_string();
        blocking(move || store.update_labels(&key, labels, &mask)).await
    }

    /// `List` (containerd's `Walk`) of the snapshots matching any of `filters`.
    pub async fn list(
        &self,
        filters: &[String],
    ) -> Result<Vec<(String, SnapshotRecord)>, SnapshotError> {
        let filters = filters
            .iter()
            .map(|f| Filter::parse(f).map_err(SnapshotError::InvalidArgument))
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.store.clone();
        let all = blocking(move || store.list()).await?;
        Ok(all
            .into_iter()
            .filter(|(name, r)| any_matches(&filters, &Named(name, r)))
            .collect())
    }

    /// `Usage`: measured now for active snapshots, as committed otherwise.
    pub async fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.store.get(key)?;
        if record.kind == Kind::Committed {
            return Ok(record.usage);
        }
        let fs = self.store.fs_dir(record.id);
        blocking(move || Ok(disk_usage(&fs))).await
    }

    /// `Cleanup`: directories of no snapshot, and views of no placeholder.
    pub async fn cleanup(&self) -> Result<(), SnapshotError> {
        let store = self.store.clone();
        let records = blocking(move || store.list()).await?;
        let live: std::collections::HashSet<String> = records
            .iter()
            .filter(|(_, r)| r.remote.is_none())
            .map(|(_, r)| r.id.to_string())
            .collect();
        let root = self.store.root().join("snapshots");
        blocking(move || {
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !live.contains(&name) {
                    tracing::info!(dir = %entry.path().display(), "removing an orphaned snapshot directory");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            Ok(())
        })
        .await?;
        let wanted: Vec<PathBuf> = records
            .iter()
            .filter(|(_, r)| r.remote.is_some())
            .map(|(name, _)| self.views.dir(name))
            .collect();
        for dir in self.views.present() {
            if !wanted.contains(&dir) && self.agent.mounts.is_mounted(&dir) {
                tracing::info!(dir = %dir.display(), "unmounting a view of no snapshot");
                if let Err(e) = self.agent.mounts.umount(&dir).await {
                    tracing::warn!(error = %e, "unmounting an orphaned view failed");
                }
            }
        }
        Ok(())
    }

    /// Mounts again the views that active and view snapshots stand on and that are not
    /// mounted (after a reboot; a restarted agent keeps its running mounts).
    pub async fn restore(&self) {
        let Ok(records) = self.store.list() else {
            return;
        };
        for (name, record) in records.iter().filter(|(_, r)| r.kind != Kind::Committed) {
            if let Err(e) = self.mounts_of(record).await {
                tracing::warn!(snapshot = %name, error = %e, "restoring the snapshot's view failed");
            }
        }
    }
}

/// A record with its name, as filters see it.
struct Named<'a>(&'a str, &'a SnapshotRecord);

impl Fields for Named<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.0.to_string()),
            [f] if f == "parent" => Some(self.1.parent.clone().unwrap_or_default()),
            [f] if f == "kind" => Some(
                match self.1.kind {
                    Kind::View => "view",
                    Kind::Active => "active",
                    Kind::Committed => "committed",
                }
                .to_string(),
            ),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
                self.1.labels.get(&rest.join(".")).cloned()
            }
            _ => None,
        }
    }
}

/// `host:port` of a URL.
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    Some(rest.split('/').next()?.to_string())
}

/// Bytes and inodes under `dir`, hard links counted once.
fn disk_usage(dir: &Path) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.inodes += 1;
            usage.bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    usage
}
