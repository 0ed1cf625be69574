//! The agent's pieces wired together: cache, proxy client, peers, fetcher, swarm.

use crate::cache::{ChunkCache, ImageRecord};
use crate::config::AgentConfig;
use crate::dataplane::{self, DataPlaneConfig, PeerPool};
use crate::fetch::{FetchSettings, Fetcher, Progress};
use crate::image::{self, ImageRef};
use crate::peers::PeerSet;
use crate::proxy_client::ProxyClient;
use std::sync::Arc;

pub use crate::error::AgentError;

/// The running agent.
pub struct Agent {
    pub config: AgentConfig,
    pub node_id: String,
    pub fetcher: Arc<Fetcher>,
    pub peers: Arc<PeerSet>,
    pub mounts: crate::mounts::Mounts,
    /// Layer indexes fetched before, on local disk.
    pub indexes: Arc<crate::layer_indexes::LayerIndexes>,
    /// Partial chunks: the pieces lazy reads fetched.
    pub pieces: Arc<crate::pieces::Pieces>,
    /// The layer indexes' checkpoint windows, shared with the peers reading a layer.
    pub windows: Arc<crate::window_share::WindowShare>,
    /// What mounts need of each layer (index main parts, chunk lists), shared with peers.
    pub parts: Arc<crate::layer_parts::PartShare>,
    /// Where the chunk data plane listens (the bound address, so a `:0` port is real).
    pub data_addr: Option<std::net::SocketAddr>,
}

/// What a prefetch did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PrefetchSummary {
    pub image: String,
    pub manifest_digest: imgd_core::Digest,
    pub total_bytes: u64,
}

impl Agent {
    /// Resolves `image` and stores its record (manifest and blob list).
    pub async fn resolve(&self, image: &str) -> Result<(ImageRef, ImageRecord), AgentError> {
        Ok(image::resolve_and_keep(&self.fetcher.proxy, &self.fetcher.cache, image).await?)
    }

    /// Brings every blob of `image` into the cache.
    #[tracing::instrument(name = "prefetch", skip_all, fields(image = %r))]
    pub async fn prefetch(
        &self,
        r: &ImageRef,
        record: &ImageRecord,
        progress: &Progress,
    ) -> Result<PrefetchSummary, AgentError> {
        // All blobs at once: more chunks in flight hides peer and proxy latency.
        let repo = r.proxy_repo();
        let fetches = record.blobs().map(|blob| {
            let repo = repo.clone();
            async move { self.fetcher.fetch_blob(&repo, &blob, progress).await }
        });
        for result in futures::future::join_all(fetches).await {
            result?;
        }
        Ok(PrefetchSummary {
            image: r.to_string(),
            manifest_digest: record.manifest_digest,
            total_bytes: record.total_size,
        })
    }
}

/// Opens the cache, starts the swarm and the data plane, and returns the agent.
pub async fn start(mut config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
    let start_err =
        |what: &str, e: &dyn std::fmt::Display| AgentError::Start(format!("{what}: {e}"));
    config.validate().map_err(|e| start_err("config", &e))?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| start_err("creating data_dir", &e))?;
    let cache = Arc::new(ChunkCache::open(
        &config.data_dir.join("cache"),
        config.cache_quota_bytes,
    )?);
    let proxy = ProxyClient::with_replicas(&config.proxies(), config.fetch.proxy_timeout())
        .map_err(|e| start_err("proxy client", &e))?
        .with_token(
            config
                .proxy_token()
                .map_err(|e| start_err("proxy token", &e))?,
        );
    let keypair = crate::identity::load_or_create(&config.data_dir.join("node.key"))
        .map_err(|e| start_err("node key", &e))?;
    let node_id = keypair.public().to_peer_id().to_string();
    let swarm_key = config.swarm_key().map_err(|e| start_err("swarm key", &e))?;
    if config.swarm.enabled && swarm_key.is_none() {
        // The safe default: without a key of its own a host would share its cache with
        // any host on the network, so it joins no swarm at all.
        tracing::warn!(
            "NO SWARM: swarm.key_file is not set, so this agent joins no swarm and serves \
             no peer (cache and proxy only). Give every host of the swarm the same key \
             (`openssl rand -hex 32 > /etc/imgd/swarm.key`, then swarm.key_file), or set \
             swarm.enabled = false to silence this"
        );
        config.swarm.enabled = false;
    }
    // Unused without a swarm (no data plane serves and no peer is known).
    let swarm_key = swarm_key.unwrap_or_else(rand::random);
    let peers = Arc::new(PeerSet::default());
    let mut dp_cfg = DataPlaneConfig::new(swarm_key, node_id.as_bytes().to_vec());
    dp_cfg.allow_list = config
        .swarm
        .allow_list
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let pool = Arc::new(PeerPool::new(dp_cfg.clone(), 4));
    let mut provide = None;
    let mut data_listener = None;
    let mut data_addr = None;
    if config.swarm.enabled {
        let listener = tokio::net::TcpListener::bind(config.swarm.data_listen)
            .await
            .map_err(|e| start_err("binding swarm.data_listen", &e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| start_err("data plane", &e))?;
        data_addr = Some(bound);
        let data_port = bound.port();
        let settings = crate::swarm::SwarmSettings {
            keypair,
            listen: config.swarm.listen,
            data_port,
            swarm_key,
            allow_list: config.swarm.allow_list.clone(),
            bootstrap: config.swarm.bootstrap.clone(),
            mdns: config.swarm.mdns,
            zone: config.swarm.zone.clone(),
        };
        let (_, tx) =
            crate::swarm::start(settings, peers.clone()).map_err(|e| start_err("swarm", &e))?;
        provide = Some(tx);
        data_listener = Some(listener);
    }
    let settings = FetchSettings {
        peer_timeout: config.fetch.peer_timeout(),
        parallel_chunks: config.fetch.parallel_chunks,
        owner_wait: config.fetch.owner_wait(),
        read_owner_wait: config.fetch.read_owner_wait(),
        max_asked_peers: config.fetch.max_asked_peers,
        zone: config.swarm.zone.clone(),
    };
    let fetcher = Arc::new(Fetcher::new(
        cache,
        proxy,
        peers.clone(),
        pool,
        node_id.clone(),
        settings,
        provide,
    ));
    let indexes = crate::layer_indexes::LayerIndexes::open(&config.data_dir.join("indexes"))
        .map_err(|e| start_err("opening the layer index store", &e))?;
    let f = fetcher.clone();
    let pieces = tokio::task::spawn_blocking(move || {
        crate::pieces::Pieces::open(f, crate::pieces::COMPLETE_AFTER)
    })
    .await
    .map_err(|e| start_err("opening the piece store", &e))?
    .map_err(|e| start_err("opening the piece store", &e))?;
    let pieces = Arc::new(pieces);
    let indexes = Arc::new(indexes);
    let windows = Arc::new(crate::window_share::WindowShare::new(
        indexes.clone(),
        fetcher.clone(),
    ));
    let parts = Arc::new(crate::layer_parts::PartShare::new(
        indexes.clone(),
        fetcher.clone(),
    ));
    if let Some(listener) = data_listener {
        let source = Arc::new(crate::chunk_source::CacheSource {
            fetcher: fetcher.clone(),
            pieces: pieces.clone(),
            windows: windows.clone(),
            parts: parts.clone(),
        });
        tokio::spawn(async move {
            if let Err(e) = dataplane::serve(listener, dp_cfg, source).await {
                tracing::error!(error = %e, "data plane stopped");
            }
        });
    }
    tokio::spawn(pieces.clone().run_completer());
    let mounts = crate::mounts::Mounts::new(crate::mounts::MountContext {
        fetcher: fetcher.clone(),
        pieces: pieces.clone(),
        indexes: indexes.clone(),
        windows: windows.clone(),
        parts: parts.clone(),
        records: config.data_dir.join("mounts"),
        agent_socket: config.socket.clone(),
        log_format: config.log_format,
        config: config.mount.clone(),
    });
    let agent = Arc::new(Agent {
        pieces,
        indexes,
        windows,
        parts,
        config,
        node_id,
        fetcher,
        peers,
        mounts,
        data_addr,
    });
    // Before the API is up: the mount processes a previous agent left ask it for chunks.
    agent.mounts.recover().await?;
    tokio::spawn(enforce_quota(agent.fetcher.clone()));
    Ok(agent)
}

/// How often the quota is checked apart from chunk puts: mount processes add inflated
/// layer data on their own.
const QUOTA_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps chunks and inflated layers under the quota (see [`ChunkCache::enforce_quota`]),
/// and withdraws the provider records of blobs an eviction broke up.
async fn enforce_quota(fetcher: Arc<Fetcher>) {
    let cache = fetcher.cache.clone();
    let mut tick = tokio::time::interval(QUOTA_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = cache.clone();
        match tokio::task::spawn_blocking(move || c.enforce_quota()).await {
            Ok(Ok(true)) => {
                let f = fetcher.clone();
                let _ = tokio::task::spawn_blocking(move || f.withdraw_evicted()).await;
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "enforcing the cache quota"),
            Err(e) => tracing::warn!(error = %e, "enforcing the cache quota"),
        }
    }
}
