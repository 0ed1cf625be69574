//! Lazy mounts: an image's merged rootfs as a read-only FUSE filesystem whose file bytes
//! are fetched chunk by chunk (cache, then peers, then proxy) as they are read.

use crate::agent::{Agent, AgentError};
use crate::fetch::Fetcher;
use bytes::Bytes;
use imgd_core::index::LayerIndex;
use imgd_core::{ChunkList, Digest};
use imgd_fuse::fs::{BlobSource, ImageFs, MountStats};
use imgd_fuse::view::{ImageView, ViewLimits};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One live mount.
pub struct Mount {
    pub image: String,
    pub dir: PathBuf,
    pub layers: Vec<Digest>,
    pub total_bytes: u64,
    pub stats: Arc<MountStats>,
    pub fetched: Arc<FetchedStats>,
    session: fuser::BackgroundSession,
}

/// Chunks and bytes a mount fetched into the cache (cache hits not counted).
#[derive(Default, Debug)]
pub struct FetchedStats {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
}

/// What `imgctl status` shows of a mount.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MountStatus {
    pub image: String,
    pub dir: String,
    pub total_bytes: u64,
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub eio: u64,
}

/// The mounts of this agent, by directory.
#[derive(Default)]
pub struct Mounts {
    live: Mutex<HashMap<PathBuf, Mount>>,
}

/// Serves a mount's reads from chunks through the fetcher, within a time bound.
struct ChunkReader {
    fetcher: Arc<Fetcher>,
    lists: Vec<ChunkList>,
    rt: tokio::runtime::Handle,
    timeout: Duration,
    fetched: Arc<FetchedStats>,
}

impl BlobSource for ChunkReader {
    fn read(&self, layer: usize, range: Range<u64>) -> Result<Vec<u8>, String> {
        let list = self.lists.get(layer).ok_or("no such layer")?;
        let work = async {
            let mut out = Vec::with_capacity((range.end - range.start) as usize);
            for i in list.chunks_covering(range.clone()) {
                let (bytes, fetched): (Bytes, bool) = self
                    .fetcher
                    .chunk(list, i)
                    .await
                    .map_err(|e| e.to_string())?;
                if fetched {
                    self.fetched.chunks.fetch_add(1, Ordering::Relaxed);
                    self.fetched
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                let start = list.chunk_offset(i);
                let from = range.start.saturating_sub(start) as usize;
                let to = (range.end - start).min(bytes.len() as u64) as usize;
                out.extend_from_slice(&bytes[from.min(to)..to]);
            }
            Ok(out)
        };
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, work).await })
            .map_err(|_| format!("no source delivered the chunks within {:?}", self.timeout))?
    }
}

impl Mounts {
    /// Mounts `image` at `dir` (which must exist).
    pub async fn mount(
        &self,
        agent: &Agent,
        image: &str,
        dir: &Path,
    ) -> Result<MountStatus, AgentError> {
        let fail = |m: String| AgentError::Mount(m);
        if self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(dir)
        {
            return Err(fail(format!("{} is already an imgd mount", dir.display())));
        }
        let (r, record) = agent.resolve(image).await?;
        let repo = r.proxy_repo();
        let fetcher = agent.fetcher.clone();
        let mut lists = Vec::new();
        let mut indexes = Vec::new();
        for layer in &record.layers {
            lists.push(fetcher.chunk_list(&repo, layer).await?);
            let bytes = fetcher
                .proxy
                .index(&repo, layer)
                .await
                .map_err(|e| fail(format!("index of layer {layer}: {e}")))?;
            let index = LayerIndex::decode(&bytes)
                .map_err(|e| fail(format!("index of layer {layer}: {e}")))?;
            if index.layer != *layer || !index.random_access {
                return Err(fail(format!("layer {layer} has no random-access index")));
            }
            indexes.push(index);
        }
        let view = ImageView::build(Arc::new(indexes), ViewLimits::default())
            .map_err(|e| fail(e.to_string()))?;
        fetcher.cache.protect(&record.layers);
        let stats = Arc::new(MountStats::default());
        let fetched = Arc::new(FetchedStats::default());
        let reader = ChunkReader {
            fetcher: fetcher.clone(),
            lists,
            rt: tokio::runtime::Handle::current(),
            timeout: agent.config.mount.read_timeout(),
            fetched: fetched.clone(),
        };
        let fs = ImageFs::new(Arc::new(view), Arc::new(reader), stats.clone());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName(format!("imgd:{r}")),
            fuser::MountOption::Subtype("imgd".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::Dev,
            fuser::MountOption::Suid,
            fuser::MountOption::Exec,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(agent.config.mount.threads);
        let dir_owned = dir.to_path_buf();
        let session =
            tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &dir_owned, &config))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| {
                    fetcher.cache.unprotect(&record.layers);
                    fail(format!("mounting at {}: {e}", dir.display()))
                })?;
        let mount = Mount {
            image: r.to_string(),
            dir: dir.to_path_buf(),
            layers: record.layers.clone(),
            total_bytes: record.total_size,
            stats,
            fetched,
            session,
        };
        let status = status_of(&mount);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_path_buf(), mount);
        tracing::info!(image = %r, dir = %dir.display(), "mounted");
        Ok(status)
    }

    /// Unmounts `dir`.
    pub fn umount(&self, agent: &Agent, dir: &Path) -> Result<(), AgentError> {
        let mount = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(dir)
            .ok_or_else(|| AgentError::Mount(format!("{} is not an imgd mount", dir.display())))?;
        let layers = mount.layers.clone();
        if let Err(e) = mount.session.umount_and_join() {
            return Err(AgentError::Mount(format!(
                "unmounting {}: {e}",
                dir.display()
            )));
        }
        agent.fetcher.cache.unprotect(&layers);
        tracing::info!(dir = %dir.display(), "unmounted");
        Ok(())
    }

    /// Status of every mount.
    pub fn status(&self) -> Vec<MountStatus> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(status_of)
            .collect()
    }
}

fn status_of(m: &Mount) -> MountStatus {
    MountStatus {
        image: m.image.clone(),
        dir: m.dir.display().to_string(),
        total_bytes: m.total_bytes,
        fetched_bytes: m.fetched.bytes.load(Ordering::Relaxed),
        fetched_chunks: m.fetched.chunks.load(Ordering::Relaxed),
        reads: m.stats.reads.load(Ordering::Relaxed),
        bytes_read: m.stats.bytes_read.load(Ordering::Relaxed),
        eio: m.stats.eio.load(Ordering::Relaxed),
    }
}
