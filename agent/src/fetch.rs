//! Getting a blob's chunks: local cache, then peers, then the proxy.
//!
//! Every chunk is verified by sha256 before it enters the cache, whatever its source.
//! When several hosts fetch the same blob at once they split the proxy's work: every
//! chunk has one *owner* among the hosts fetching the blob in this host's zone
//! (rendezvous hashing of chunk digest and node id, so hosts that know the same hosts
//! agree without talking). The fetching hosts find each other through provider records
//! and watch a bounded number of each other's have-maps, pushed ([`crate::holders`]).
//! A host fetches the chunks it owns from the proxy first, then takes the others from
//! whichever watched peer has them. A watched owner whose have-map has not moved for
//! `owner_wait` is passed over (its chunks go to the next host in rendezvous order); if
//! no watched map moved for that long, the host fetches what it lacks from the proxy
//! itself, so partial knowledge of the fleet costs time or a duplicate, never
//! correctness. Peer requests are
//! hedged: a chunk a peer has not delivered within half the peer timeout is also asked of
//! another source, and the first verified answer wins.
//!
//! A mount's reads join the same scheme chunk by chunk ([`read_swarm`]): their chunks in
//! flight show in have-maps, owners are split among the hosts reading the blob, and a
//! read waits boundedly for a peer fetching its chunk rather than asking the proxy too.

mod arriving;
mod providing;
mod read_swarm;
mod sources;
pub use read_swarm::{Got, ReadFlight, ReadStates, Want};

use crate::cache::ChunkCache;
use crate::chunk_state::{ChunkStates, Fetcher as By, Transition};
use crate::control_counts::{ControlCounts, ControlKind};
use crate::dataplane::{HaveMap, PeerPool};
use crate::holders::{HolderContext, Holders, View};
use crate::peers::{Peer, PeerSet, FAILURE_PENALTY};
use crate::proxy_client::{ProxyClient, ProxyClientError, Repo};
use imgd_core::single_flight::{Abandoned, Join};
use imgd_core::{ChunkList, Digest, SingleFlight, VerifiedChunk};
use rand::seq::SliceRandom;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Cache,
    Peer,
    Proxy,
}

impl Source {
    /// Its name in metrics and status (`cache`, `peer`, `proxy`).
    pub fn name(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Peer => "peer",
            Source::Proxy => "proxy",
        }
    }
}

/// Errors fetching a blob.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Proxy(#[from] ProxyClientError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The error of a concurrent fetch of the same chunk that this call waited for.
    #[error(transparent)]
    Shared(Arc<FetchError>),
    #[error("chunk {digest} of blob {blob} could not be fetched from any source: {last}")]
    Exhausted {
        blob: Digest,
        digest: Digest,
        last: String,
    },
}

/// Bytes received by source since start.
#[derive(Default)]
pub struct FetchStats {
    pub from_cache: AtomicU64,
    pub from_peers: AtomicU64,
    pub from_proxy: AtomicU64,
}

impl FetchStats {
    pub(crate) fn add(&self, source: Source, n: u64) {
        let c = match source {
            Source::Cache => &self.from_cache,
            Source::Peer => &self.from_peers,
            Source::Proxy => &self.from_proxy,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Fetch policy settings.
#[derive(Clone, Debug)]
pub struct FetchSettings {
    pub peer_timeout: Duration,
    pub parallel_chunks: usize,
    /// How long a watched owner's map, or the whole view, may stand still (see `pick`).
    pub owner_wait: Duration,
    /// How long a read waits for a chunk's owner to start fetching it before asking the
    /// proxy itself.
    pub read_owner_wait: Duration,
    /// Most peers asked about one blob (`fetch.max_asked_peers`).
    pub max_asked_peers: usize,
    /// This host's zone (`swarm.zone`).
    pub zone: Option<String>,
}

/// Progress reports: `(bytes, source)` per chunk that became available.
pub type Progress = mpsc::UnboundedSender<(u64, Source)>;

/// State of a blob being fetched here, visible to peers through have-maps: the life of
/// each of its chunks ([`crate::chunk_state`]).
struct Job {
    states: Mutex<ChunkStates>,
}

impl Job {
    fn states(&self) -> std::sync::MutexGuard<'_, ChunkStates> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves chunk `i` on (and tells subscribers); a move the state machine refuses is a
    /// bug here, logged.
    fn mark(&self, i: usize, t: Transition, changes: &Changes) {
        if let Err(e) = self.states().apply(i, t) {
            tracing::error!(chunk = i, error = %e, "chunk state machine refused a transition");
        }
        changes.bump();
    }
}

/// A counter that moves whenever a have-map of this host may have changed, so the data
/// plane pushes it to subscribers at once.
pub struct Changes(tokio::sync::watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Self {
        Changes(tokio::sync::watch::channel(0).0)
    }
}

impl Changes {
    pub(crate) fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver for the data plane.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// What waiters of a chunk fetched for a read get from the fetch they joined.
type ChunkOutcome = Result<VerifiedChunk, Arc<FetchError>>;

/// Fetches blobs into the cache.
pub struct Fetcher {
    pub cache: Arc<ChunkCache>,
    pub proxy: ProxyClient,
    pub peers: Arc<PeerSet>,
    pub pool: Arc<PeerPool>,
    pub stats: FetchStats,
    node_id: String,
    settings: FetchSettings,
    /// One fetch per blob at a time; its job is what have-maps show as in flight.
    jobs: SingleFlight<Digest, (), Job>,
    /// One fetch per chunk read on its own (mount reads), shared by concurrent readers.
    chunk_flights: SingleFlight<Digest, ChunkOutcome>,
    /// What reads are fetching, and the have-maps they use ([`read_swarm`]).
    pub reads: read_swarm::Reads,
    provide: Option<mpsc::Sender<crate::swarm::SwarmCommand>>,
    holder_ctx: Arc<HolderContext>,
    /// Control requests sent, by blob and kind.
    pub control: Arc<ControlCounts>,
    /// Moves when a have-map may have changed.
    pub changes: Arc<Changes>,
    /// Blobs announced as provided (withdrawn when evicted).
    provided: Mutex<HashSet<Digest>>,
}

/// Longest local wait in a blob fetch between looks at the watched maps (no network).
const LOOK_AGAIN: Duration = Duration::from_millis(100);
/// Rounds of failed holders after which a chunk peers hold is fetched from the proxy.
const PEER_ROUNDS: u32 = 3;

/// Rendezvous weight of `node` for `chunk`: the node with the highest weight owns it.
fn weight(chunk: &Digest, node: &str) -> u64 {
    imgd_core::rendezvous::weight(chunk.as_bytes(), node.as_bytes())
}

impl Fetcher {
    /// A fetcher; `provide` announces completed blobs to the swarm.
    pub fn new(
        cache: Arc<ChunkCache>,
        proxy: ProxyClient,
        peers: Arc<PeerSet>,
        pool: Arc<PeerPool>,
        node_id: String,
        settings: FetchSettings,
        provide: Option<mpsc::Sender<crate::swarm::SwarmCommand>>,
    ) -> Fetcher {
        let control = Arc::new(ControlCounts::default());
        let holder_ctx = Arc::new(HolderContext {
            peers: peers.clone(),
            pool: pool.clone(),
            swarm: provide.clone(),
            counts: control.clone(),
            zone: settings.zone.clone(),
            max_asked: settings.max_asked_peers.max(1),
            timeout: settings.peer_timeout,
        });
        let changes = Arc::new(Changes::default());
        Fetcher {
            cache,
            proxy,
            peers,
            pool,
            stats: FetchStats::default(),
            node_id,
            settings,
            jobs: SingleFlight::new(),
            chunk_flights: SingleFlight::new(),
            reads: read_swarm::Reads::new(changes.clone()),
            provide,
            holder_ctx,
            control,
            changes,
            provided: Mutex::new(HashSet::new()),
        }
    }

    /// Blobs being fetched now and chunks in flight across them.
    pub fn in_flight(&self) -> (usize, usize) {
        let jobs = self.jobs.all_shared();
        let chunks: usize = jobs.iter().map(|j| j.states().in_flight()).sum();
        (jobs.len(), chunks + self.reads.states.in_flight())
    }

    /// The chunk list of `blob`: from the cache, else from the proxy (then cached).
    pub async fn chunk_list(&self, repo: &Repo, blob: &Digest) -> Result<ChunkList, FetchError> {
        if let Some(list) = self.cache.blob(blob)? {
            return Ok(list);
        }
        let info = self.proxy.blob_info(repo, blob).await?;
        self.cache.put_blob(&info.chunks)?;
        Ok(info.chunks)
    }

    /// Chunk `i` of a blob, for a read: from the cache, else from a peer holding it (or
    /// fetching or owning it, waited for boundedly: [`read_swarm`]), else from the proxy
    /// (then cached), in flight for peers to see meanwhile. Concurrent calls for one
    /// chunk make one fetch, and cancelling any of them (a read's time bound) leaves the
    /// others a working fetch. The flag says whether this call fetched it.
    pub async fn chunk(
        &self,
        list: &ChunkList,
        i: usize,
    ) -> Result<(VerifiedChunk, bool), FetchError> {
        let Some(c) = list.chunks.get(i).copied() else {
            return Err(FetchError::Exhausted {
                blob: list.blob,
                digest: list.blob,
                last: format!("no chunk {i}"),
            });
        };
        loop {
            if let Some(b) = self.cache.get_chunk(&c.digest)? {
                return Ok((b, false));
            }
            match self.chunk_flights.join(c.digest, || ()) {
                Join::Leader(lead) => {
                    let result = async {
                        if let Some(Got::Chunk(chunk)) = self
                            .read_from_peers(&list.blob, i, c.digest, Want::Chunk)
                            .await
                        {
                            self.cache.put_chunk(&chunk)?;
                            return Ok(chunk);
                        }
                        let flight = self.reads.states.begin(c.digest);
                        // No holders: the proxy is asked, so `None` does not come back.
                        let fetched = self.fetch_chunk(&list.blob, &c.digest, Vec::new(), true);
                        let (bytes, source) =
                            fetched.await?.ok_or_else(|| FetchError::Exhausted {
                                blob: list.blob,
                                digest: c.digest,
                                last: "no source answered".into(),
                            })?;
                        self.cache.put_chunk(&bytes)?;
                        if let Some(f) = flight {
                            f.end(Transition::Verified);
                        }
                        self.changes.bump();
                        self.stats.add(source, bytes.len() as u64);
                        Ok(bytes)
                    }
                    .await
                    .map_err(Arc::new);
                    lead.finish(result.clone());
                    return result.map(|b| (b, true)).map_err(FetchError::Shared);
                }
                Join::Follower(f) => match f.wait().await {
                    Ok(result) => return result.map(|b| (b, false)).map_err(FetchError::Shared),
                    // Its reader was cancelled: look again, and fetch here if need be.
                    Err(Abandoned) => continue,
                },
            }
        }
    }

    /// Brings every chunk of `blob` into the cache, reporting progress.
    ///
    /// One fetch of a blob runs at a time: a second caller waits for the first to end
    /// (or be cancelled), then finds the chunks cached (reported as from the cache) and
    /// fetches whatever is still missing itself.
    pub async fn fetch_blob(
        &self,
        repo: &Repo,
        blob: &Digest,
        progress: &Progress,
    ) -> Result<ChunkList, FetchError> {
        // Not known here: take its chunks as they arrive at the proxy ([`arriving`]).
        let arrived = match self.cache.blob(blob)? {
            Some(_) => HashSet::new(),
            None => self.fetch_arriving(repo, blob).await,
        };
        let list = self.chunk_list(repo, blob).await?;
        let lead = loop {
            let job = || Job {
                states: Mutex::new(ChunkStates::new(list.chunks.len())),
            };
            match self.jobs.join(*blob, job) {
                Join::Leader(lead) => break lead,
                Join::Follower(f) => {
                    let _ = f.wait().await;
                }
            }
        };
        let mut pending = Vec::new();
        for (i, c) in list.chunks.iter().enumerate() {
            if self.cache.has_chunk(&c.digest) {
                lead.shared().mark(i, Transition::Found, &self.changes);
                // A chunk taken while the proxy ingested was counted when it came.
                let source = if arrived.contains(&c.digest) {
                    Source::Proxy
                } else {
                    self.stats.add(Source::Cache, u64::from(c.size));
                    Source::Cache
                };
                let _ = progress.send((u64::from(c.size), source));
            } else {
                pending.push(i);
            }
        }
        // Other hosts find this one as a holder from now on (its chunks as they come).
        self.announce(blob);
        let result = if pending.is_empty() {
            Ok(())
        } else {
            pending.shuffle(&mut rand::rng());
            let holders = Holders::start(self.holder_ctx.clone(), *blob);
            self.run_job(&list, lead.shared(), &holders, pending, progress)
                .await
        };
        lead.finish(());
        result?;
        Ok(list)
    }

    async fn run_job(
        &self,
        list: &ChunkList,
        job: &Job,
        watched: &Holders,
        mut pending: Vec<usize>,
        progress: &Progress,
    ) -> Result<(), FetchError> {
        let blob = &list.blob;
        let started = Instant::now();
        let mut from_proxy = 0usize;
        // Rounds of peers that failed each chunk (a held chunk goes back to pending).
        let mut peer_rounds = vec![0u32; list.chunks.len()];
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            // The watched peers' maps, as their subscriptions last pushed them.
            let fetchers = watched.fetchers();
            // Start work up to the parallelism limit.
            while running.len() < self.settings.parallel_chunks {
                let view = watched.view();
                let Some(pos) = self.pick(&pending, list, view, fetchers.as_deref(), started)
                else {
                    break;
                };
                let i = pending.swap_remove(pos);
                let chunk = list.chunks[i];
                let holders = self.holders(&view.maps(), i);
                // A chunk peers hold goes to the proxy only after PEER_ROUNDS rounds of
                // its holders failed: a loaded swarm is slow, and the proxy is shared.
                let peers_only = !holders.is_empty() && peer_rounds[i] < PEER_ROUNDS;
                job.mark(i, Transition::Start(By::Blob), &self.changes);
                running.push(async move {
                    let got = self.fetch_chunk(blob, &chunk.digest, holders, !peers_only);
                    (i, got.await)
                });
            }
            if running.is_empty() && pending.is_empty() {
                tracing::info!(
                    %blob,
                    chunks = list.chunks.len(),
                    from_proxy,
                    fetchers = fetchers.as_ref().map_or(0, Vec::len),
                    watched = watched.view().maps().len(),
                    "blob fetched"
                );
                return Ok(());
            }
            // Until a chunk arrives, a watched map changes, or a while passed (for
            // `owner_wait` and the end of gathering).
            let next = tokio::select! {
                next = futures::StreamExt::next(&mut running), if !running.is_empty() => next,
                _ = watched.view().changed() => None,
                _ = tokio::time::sleep(LOOK_AGAIN) => None,
            };
            let Some((i, result)) = next else { continue };
            match result {
                Ok(None) => {
                    job.mark(i, Transition::Failed, &self.changes);
                    peer_rounds[i] += 1;
                    pending.push(i);
                }
                Ok(Some((bytes, source))) => {
                    if let Err(e) = self.cache.put_chunk(&bytes) {
                        job.mark(i, Transition::Failed, &self.changes);
                        return Err(e.into());
                    }
                    job.mark(i, Transition::Verified, &self.changes);
                    from_proxy += usize::from(source == Source::Proxy);
                    self.stats.add(source, bytes.len() as u64);
                    let _ = progress.send((bytes.len() as u64, source));
                }
                Err(e) => {
                    job.mark(i, Transition::Failed, &self.changes);
                    return Err(e);
                }
            }
        }
    }

    /// Usable peers whose have-map shows chunk `i`: those in this host's zone first,
    /// then least penalised, shuffled among equals, so requests spread over equally good
    /// holders instead of one hot peer.
    fn holders(&self, maps: &HashMap<String, HaveMap>, i: usize) -> Vec<Peer> {
        let mut holders: Vec<Peer> = self
            .peers
            .usable()
            .into_iter()
            .filter(|p| maps.get(&p.id).is_some_and(|m| m.is_present(i as u32)))
            .collect();
        holders.shuffle(&mut rand::rng());
        let zone = self.settings.zone.as_deref();
        holders.sort_by_key(|p| (!p.in_zone(zone), p.penalty));
        holders
    }

    /// What the peers have of `blob`, for a read: the answers of at most
    /// `max_asked_peers` peers, chosen as [`PeerSet::choose`] does. (Not a running
    /// fetch's watched maps: those are empty while it gathers, and reads must not wait.)
    async fn refresh_maps(&self, blob: &Digest) -> HashMap<String, HaveMap> {
        let (mut among, _) = self.peers.providers(blob);
        among.extend(self.peers.usable().into_iter().map(|p| p.id));
        among.sort();
        among.dedup();
        let zone = self.settings.zone.as_deref();
        let peers = self
            .peers
            .choose(&among, zone, self.settings.max_asked_peers, &HashSet::new());
        let timeout = self.settings.peer_timeout / 4;
        let asks = peers.iter().map(|p| async move {
            self.control.count(blob, ControlKind::Have);
            (
                p.id.clone(),
                self.pool.have(p.data_addr, blob, timeout).await,
            )
        });
        let mut out = HashMap::new();
        for (id, r) in futures::future::join_all(asks).await {
            match r {
                Ok(Some(map)) => {
                    out.insert(id, map);
                }
                Ok(None) => {}
                Err(e) => {
                    self.peers
                        .penalise(&id, FAILURE_PENALTY / 4, &format!("have query: {e}"))
                }
            }
        }
        out
    }

    /// Index into `pending` of the chunk to fetch next, or `None` to wait.
    ///
    /// In order: a chunk this host owns that no watched peer holds or has in flight
    /// (fetched from the proxy: the others wait for it, so owners go first); a chunk some
    /// watched peer holds, rarest first (fetched from it); once `owner_wait` has passed
    /// and no watched map moved for that long, any chunk. Owners are chosen among this
    /// host and the `fetchers` not stalled: a watched host whose map has not moved for
    /// `owner_wait` hands the chunks it owns to the next in rendezvous order, which all
    /// watchers see alike, so one host takes them over rather than all. A slow swarm
    /// (a loaded proxy, slow links) keeps moving and is waited for: a fixed time-out
    /// there made every host fetch from the proxy at once. `None` from `fetchers` means
    /// they and their first maps are still being gathered, so nothing starts yet (at most
    /// [`crate::holders::GATHER_MAX`]).
    fn pick(
        &self,
        pending: &[usize],
        list: &ChunkList,
        view: &View,
        fetchers: Option<&[String]>,
        started: Instant,
    ) -> Option<usize> {
        let maps = view.maps();
        let holders = |i: usize| maps.values().filter(|m| m.is_present(i as u32)).count();
        let in_flight_elsewhere = |i: usize| maps.values().any(|m| m.is_in_flight(i as u32));
        let quiet = self.settings.owner_wait;
        let owners: Vec<&String> = fetchers?
            .iter()
            .filter(|p| !view.is_stalled(p, quiet))
            .collect();
        let owner_is_me = |i: usize| {
            let d = &list.chunks[i].digest;
            let mine = weight(d, &self.node_id);
            owners.iter().all(|peer| weight(d, peer) < mine)
        };
        if let Some(pos) = pending
            .iter()
            .position(|&i| owner_is_me(i) && holders(i) == 0 && !in_flight_elsewhere(i))
        {
            return Some(pos);
        }
        // Rarest first among chunks peers hold, so copies spread over the swarm.
        let rarest = (0..pending.len())
            .filter(|&pos| holders(pending[pos]) > 0)
            .min_by_key(|&pos| holders(pending[pos]));
        if rarest.is_some() {
            return rarest;
        }
        if started.elapsed() < quiet || !view.all_quiet(quiet) {
            return None;
        }
        // Nothing moved for `owner_wait`: the owners are gone or unseen. Take what nobody
        // is fetching first.
        pending
            .iter()
            .position(|&i| !in_flight_elsewhere(i))
            .or(if pending.is_empty() { None } else { Some(0) })
    }
}
