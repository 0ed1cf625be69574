//! Lazy mounts: an image's merged rootfs as a read-only FUSE filesystem whose file bytes
//! are fetched chunk by chunk (cache, then peers, then proxy) as they are read.

use crate::agent::{Agent, AgentError};
use crate::fetch::Fetcher;
use crate::proxy_client::Repo;
use crate::startup::{self, TraceRecorder};
use bytes::Bytes;
use imgd_core::{ChunkList, Digest};
use imgd_fuse::fs::{BlobSource, ImageFs, MountStats};
use imgd_fuse::view::{ImageView, ViewLimits};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One live mount.
pub struct Mount {
    pub image: String,
    pub dir: PathBuf,
    pub layers: Vec<Digest>,
    pub total_bytes: u64,
    pub stats: Arc<MountStats>,
    pub fetched: Arc<FetchedStats>,
    /// The startup trace being recorded, and the manifest it is for.
    recorder: Option<(Arc<TraceRecorder>, Digest)>,
    view: Arc<ImageView>,
    session: fuser::BackgroundSession,
}

/// Stores what `rec` recorded as the image's startup trace, once.
async fn save_trace(rec: &TraceRecorder, view: &ImageView, fetcher: &Fetcher, manifest: &Digest) {
    let Some(trace) = rec.finish(view) else {
        return;
    };
    if trace.paths.is_empty() {
        return;
    }
    match fetcher.proxy.put_trace(manifest, &trace).await {
        Ok(()) => tracing::info!(files = trace.paths.len(), %manifest, "startup trace stored"),
        Err(e) => tracing::warn!(error = %e, "storing the startup trace failed"),
    }
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
    lists: Arc<Vec<ChunkList>>,
    rt: tokio::runtime::Handle,
    timeout: Duration,
    fetched: Arc<FetchedStats>,
    /// Chunks no source delivered, and when: reads of them fail at once for
    /// [`FAIL_FAST`].
    failed: Mutex<HashMap<Digest, Instant>>,
}

/// How long after a chunk could not be had reads needing it fail at once. The kernel
/// retries a failed page read right away (twice, with readahead); without this each
/// retry would wait the whole read bound again. Later reads try the sources again.
const FAIL_FAST: Duration = Duration::from_millis(300);

impl ChunkReader {
    /// The first chunk of `range` that failed within [`FAIL_FAST`], if any.
    fn recently_failed(&self, list: &ChunkList, range: &Range<u64>) -> Option<Digest> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|_, at| at.elapsed() < FAIL_FAST);
        list.chunks_covering(range.clone())
            .map(|i| list.chunks[i].digest)
            .find(|d| failed.contains_key(d))
    }
}

impl BlobSource for ChunkReader {
    fn read(&self, layer: usize, range: Range<u64>) -> Result<Vec<u8>, String> {
        let list = self.lists.get(layer).ok_or("no such layer")?;
        if let Some(d) = self.recently_failed(list, &range) {
            return Err(format!("chunk {d} could not be fetched just now"));
        }
        let result = self.read_chunks(list, range.clone());
        if result.is_err() {
            let missing = list
                .chunks_covering(range)
                .map(|i| list.chunks[i].digest)
                .filter(|d| !self.fetcher.cache.has_chunk(d));
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            failed.extend(missing.map(|d| (d, now)));
        }
        result
    }
}

impl ChunkReader {
    /// The bytes of `range` of a layer blob, fetching its chunks within the read bound.
    fn read_chunks(&self, list: &ChunkList, range: Range<u64>) -> Result<Vec<u8>, String> {
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

/// A view ready to mount: the layers' chunk lists and their merged tree.
pub struct PreparedView {
    pub lists: Arc<Vec<ChunkList>>,
    pub view: Arc<ImageView>,
}

/// Builds the merged view of `layers` from their indexes (fetched from the proxy and
/// verified).
pub async fn prepare_view(
    agent: &Agent,
    repo: &Repo,
    layers: &[Digest],
) -> Result<PreparedView, AgentError> {
    let fail = |m: String| AgentError::Mount(m);
    let fetcher = &agent.fetcher;
    let mut lists = Vec::new();
    let mut indexes = Vec::new();
    for layer in layers {
        lists.push(fetcher.chunk_list(repo, layer).await?);
        let index = agent
            .indexes
            .get_or_fetch(&fetcher.proxy, repo, layer)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !index.random_access {
            return Err(fail(format!("layer {layer} has no random-access index")));
        }
        indexes.push(index);
    }
    let view = ImageView::build(Arc::new(indexes), ViewLimits::default())
        .map_err(|e| fail(e.to_string()))?;
    Ok(PreparedView {
        lists: Arc::new(lists),
        view: Arc::new(view),
    })
}

/// The mount spec of `image`: its layers, labelled with its reference.
pub async fn image_spec(agent: &Agent, image: &str) -> Result<MountSpec, AgentError> {
    let (r, record) = agent.resolve(image).await?;
    Ok(MountSpec {
        label: r.to_string(),
        repo: r.proxy_repo(),
        layers: record.layers,
        manifest: Some(record.manifest_digest),
    })
}

/// `imgctl prefetch --startup`: warms only the files the image's startup trace names.
pub async fn startup_prefetch(agent: &Agent, image: &str) -> Result<u64, AgentError> {
    let (r, record) = agent.resolve(image).await?;
    let p = prepare_view(agent, &r.proxy_repo(), &record.layers).await?;
    let manifest = record.manifest_digest;
    let trace = agent
        .fetcher
        .proxy
        .trace(&manifest)
        .await
        .map_err(|e| AgentError::Mount(e.to_string()))?
        .ok_or_else(|| {
            AgentError::Mount(format!(
                "no startup trace recorded for {} yet: mount it and start a container first",
                r
            ))
        })?;
    Ok(startup::warm(&agent.fetcher, &p.view, &p.lists, &trace).await?)
}

impl Mounts {
    /// Resolves `image` and mounts its layers at `dir` (which must exist).
    pub async fn mount(
        &self,
        agent: &Agent,
        image: &str,
        dir: &Path,
    ) -> Result<MountStatus, AgentError> {
        let spec = image_spec(agent, image).await?;
        self.mount_layers(agent, spec, dir).await
    }

    /// True if `dir` is a mount of this agent.
    pub fn is_mounted(&self, dir: &Path) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(dir)
    }

    /// Mounts the view of `spec.layers` at `dir` (which must exist).
    pub async fn mount_layers(
        &self,
        agent: &Agent,
        spec: MountSpec,
        dir: &Path,
    ) -> Result<MountStatus, AgentError> {
        let fail = |m: String| AgentError::Mount(m);
        if self.is_mounted(dir) {
            return Err(fail(format!("{} is already an imgd mount", dir.display())));
        }
        let PreparedView { lists, view } = prepare_view(agent, &spec.repo, &spec.layers).await?;
        let fetcher = agent.fetcher.clone();
        fetcher.cache.protect(&spec.layers);
        let stats = Arc::new(MountStats::default());
        let fetched = Arc::new(FetchedStats::default());
        let reader = ChunkReader {
            fetcher: fetcher.clone(),
            lists: lists.clone(),
            rt: tokio::runtime::Handle::current(),
            timeout: agent.config.mount.read_timeout(),
            fetched: fetched.clone(),
            failed: Mutex::new(HashMap::new()),
        };
        let mut fs = ImageFs::new(view.clone(), Arc::new(reader), stats.clone());
        let trace = match &spec.manifest {
            Some(m) => fetcher.proxy.trace(m).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "startup trace unavailable");
                None
            }),
            None => None,
        };
        let recorder = match (spec.manifest, trace) {
            (None, _) => None,
            (Some(_), Some(trace)) => {
                // A learned start: fetch what the first start read, before it is asked for.
                let (f, v, l, fetched) = (
                    fetcher.clone(),
                    view.clone(),
                    lists.clone(),
                    fetched.clone(),
                );
                tokio::spawn(async move {
                    match startup::warm(&f, &v, &l, &trace).await {
                        Ok(n) => {
                            fetched.bytes.fetch_add(n, Ordering::Relaxed);
                            tracing::info!(
                                bytes = n,
                                files = trace.paths.len(),
                                "startup files prefetched"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "startup prefetch failed"),
                    }
                });
                None
            }
            (Some(manifest), None) => {
                let rec = TraceRecorder::recording();
                let hook = rec.clone();
                fs = fs.on_open(move |ino| hook.opened(ino));
                let (rec2, v, f) = (rec.clone(), view.clone(), fetcher.clone());
                let window = agent.config.mount.trace_window();
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    save_trace(&rec2, &v, &f, &manifest).await;
                });
                Some((rec, manifest))
            }
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName(format!("imgd:{}", spec.label)),
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
                    fetcher.cache.unprotect(&spec.layers);
                    fail(format!("mounting at {}: {e}", dir.display()))
                })?;
        let total_bytes = lists.iter().map(|l| l.size).sum();
        let mount = Mount {
            image: spec.label.clone(),
            dir: dir.to_path_buf(),
            layers: spec.layers,
            total_bytes,
            stats,
            fetched,
            recorder,
            view,
            session,
        };
        let status = status_of(&mount);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_path_buf(), mount);
        tracing::info!(label = %spec.label, dir = %dir.display(), "mounted");
        Ok(status)
    }

    /// Unmounts `dir`, storing the startup trace if it is still being recorded.
    pub async fn umount(&self, agent: &Agent, dir: &Path) -> Result<(), AgentError> {
        let mount = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(dir)
            .ok_or_else(|| AgentError::Mount(format!("{} is not an imgd mount", dir.display())))?;
        let layers = mount.layers.clone();
        if let Some((rec, manifest)) = &mount.recorder {
            save_trace(rec, &mount.view, &agent.fetcher, manifest).await;
        }
        let session = mount.session;
        let unmounted = tokio::task::spawn_blocking(move || session.umount_and_join())
            .await
            .map_err(|e| AgentError::Mount(e.to_string()))?;
        if let Err(e) = unmounted {
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
