//! Layer indexes shared in the swarm, so that hosts mounting one layer take its index's
//! main part, and each of its checkpoint windows, from the proxy once.
//!
//! **Main parts.** A mount needs each layer's main part (file table and checkpoints, about
//! 0.2% of the layer) before it can serve. Not stored here, its sha256 and length come
//! from the proxy (`GET /imgd/v1/indexes/{layer}/main`, a few dozen bytes), and the part
//! has one owner among this host and all its usable peers (rendezvous of the sha256):
//! hosts that mount together do not know yet which of them read the layer. The owner
//! fetches it from the proxy; the others ask the owner (`GetIndexMain`, with their
//! repository, so that an owner that does not mount the image fetches it on their
//! behalf, answering `Pending` meanwhile), at most `peer_timeout`, then the proxy. A
//! main part from a peer is checked against the proxy's sha256 and length (by the data
//! plane client) and decoded, which checks it again, before it is used and stored.
//!
//! **Windows.**
//! A lazy read that starts inflating at a checkpoint needs that checkpoint's window (about
//! 15 KiB packed, named by its sha256 in the layer index's main part). Every window has one
//! owner among the hosts reading the layer, by rendezvous hashing of its sha256 and the
//! node ids ([`crate::fetch::Fetcher::window_from_peers`]). A host that needs a window it
//! does not hold:
//! - owns it: fetches it from the proxy ([`crate::layer_indexes::LayerIndexes::window`]);
//! - else asks the owner over the data plane (`GetWindow`). The owner answers with the
//!   window if it holds it, or starts fetching it from the proxy on the asker's behalf and
//!   answers `Pending` meanwhile ([`IndexShare::serve`]); the asker asks again shortly, at
//!   most `peer_timeout`, then fetches it from the proxy itself.
//!
//! Windows from a peer are checked against their sha256 (by the data plane client) before
//! use and stored like the proxy's. One fetch per window, and per main part, runs at a
//! time on a host, whoever asked for it (a mount or a read here, or a peer).

use crate::dataplane::PiecesAnswer;
use crate::fetch::Fetcher;
use crate::layer_indexes::{LayerIndexError, LayerIndexes};
use crate::proxy_client::Repo;
use bytes::Bytes;
use imgd_core::index::{LayerIndex, WindowRef};
use imgd_core::{Digest, SingleFlight};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The result of one window fetch, shared by everyone waiting for it.
type Fetched = Result<Bytes, Arc<LayerIndexError>>;
/// The result of one main part fetch: the checked and stored index.
type MainFetched = Result<LayerIndex, Arc<LayerIndexError>>;

/// This host's windows: the store, the fetches in flight and what it needs to fetch a
/// window for a peer.
pub struct IndexShare {
    indexes: Arc<LayerIndexes>,
    fetcher: Arc<Fetcher>,
    /// The repository each layer read here came from (the proxy routes by it), so that a
    /// peer's request for a window of the layer can be fetched.
    repos: Mutex<HashMap<Digest, Repo>>,
    flights: SingleFlight<Digest, Fetched>,
    /// Fetches of main parts, by their sha256; each ends once the part is stored.
    main_flights: SingleFlight<Digest, MainFetched>,
    runtime: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IndexShare {
    /// Windows of `indexes`, fetched through `fetcher`'s peers and proxy, on the current
    /// tokio runtime.
    pub fn new(indexes: Arc<LayerIndexes>, fetcher: Arc<Fetcher>) -> Self {
        IndexShare {
            indexes,
            fetcher,
            repos: Mutex::default(),
            flights: SingleFlight::new(),
            main_flights: SingleFlight::new(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Layer `layer` is read here, from `repo`: its windows may be fetched for peers.
    pub fn reading(&self, layer: Digest, repo: &Repo) {
        lock(&self.repos)
            .entry(layer)
            .or_insert_with(|| repo.clone());
    }

    /// The index of `layer` (its main part): stored, else from its owner among this host
    /// and its peers, else from the proxy; checked and stored.
    pub async fn main(&self, repo: &Repo, layer: &Digest) -> Result<LayerIndex, LayerIndexError> {
        self.reading(*layer, repo);
        if let Some(index) = self.indexes.stored(layer).await {
            return Ok(index);
        }
        let proxy = &self.fetcher.proxy;
        let main = match proxy.index_main_ref(repo, layer).await {
            Ok(main) => main,
            Err(e) => {
                // A proxy without the route, or one that fails it: the part itself then.
                tracing::debug!(%layer, error = %e, "no index main part reference: from the proxy");
                let bytes = LayerIndexes::main_from_proxy(proxy, repo, layer).await?;
                return self.indexes.keep_main(layer, bytes).await;
            }
        };
        self.main_flights
            .run(main.sha256, || async {
                let bytes = match self.fetcher.index_main_from_peers(layer, &main, repo).await {
                    Some(bytes) => bytes,
                    None => LayerIndexes::main_from_proxy(proxy, repo, layer)
                        .await
                        .map_err(Arc::new)?,
                };
                self.indexes.keep_main(layer, bytes).await.map_err(Arc::new)
            })
            .await
            .map_err(LayerIndexError::Shared)
    }

    /// A peer's request for the main part of `layer`'s index that `sha256` names
    /// (blocking: called on the data plane's blocking pool). Here if stored with that
    /// sha256; `Pending` while a fetch of it runs, or after starting one from the proxy
    /// by the peer's repository `repo` (the peer found this host to be the part's owner).
    pub fn serve_main(
        self: &Arc<Self>,
        layer: &Digest,
        sha256: &Digest,
        repo: Repo,
    ) -> PiecesAnswer {
        if let Some(bytes) = self.indexes.stored_main(layer, sha256) {
            crate::metrics::served("peer", bytes.len() as u64);
            return PiecesAnswer::Here(bytes.into());
        }
        if self.main_flights.contains(sha256) {
            return PiecesAnswer::Pending;
        }
        let (me, layer, sha256) = (self.clone(), *layer, *sha256);
        self.runtime.spawn(async move {
            // Stored before the flight ends, so that the peer's next ask finds it.
            let fetched = me
                .main_flights
                .run(sha256, || async {
                    let bytes = LayerIndexes::main_from_proxy(&me.fetcher.proxy, &repo, &layer)
                        .await
                        .map_err(Arc::new)?;
                    me.indexes.keep_main(&layer, bytes).await.map_err(Arc::new)
                })
                .await;
            if let Err(e) = fetched {
                tracing::warn!(%layer, error = %e, "could not fetch an index main part a peer asked for");
            }
        });
        PiecesAnswer::Pending
    }

    /// Window `w` of layer `layer`: stored, else from its owner among the peers reading
    /// the layer, else from the proxy; checked against its sha256 and stored.
    pub async fn window(&self, repo: &Repo, layer: &Digest, w: WindowRef) -> Fetched {
        self.reading(*layer, repo);
        self.flights
            .run(w.sha256, || async {
                if let Some(bytes) = self.fetcher.window_from_peers(layer, &w).await {
                    self.indexes.store_window(layer, &w, bytes.clone()).await;
                    return Ok(bytes);
                }
                self.fetch_from_proxy(repo, layer, w).await
            })
            .await
    }

    async fn fetch_from_proxy(&self, repo: &Repo, layer: &Digest, w: WindowRef) -> Fetched {
        self.indexes
            .window(&self.fetcher.proxy, repo, layer, w)
            .await
            .map_err(Arc::new)
    }

    /// A peer's request for window `w` of `layer` (blocking: called on the data plane's
    /// blocking pool). Here if stored; `Pending` while a fetch of it runs, or after
    /// starting one from the proxy when this host reads the layer (the asker found this
    /// host to be the window's owner); else not here.
    pub fn serve_window(self: &Arc<Self>, layer: &Digest, w: &WindowRef) -> PiecesAnswer {
        if let Some(bytes) = LayerIndexes::stored_window(self.indexes.dir(), w) {
            crate::metrics::served("peer", bytes.len() as u64);
            return PiecesAnswer::Here(bytes.into());
        }
        if self.flights.contains(&w.sha256) {
            return PiecesAnswer::Pending;
        }
        let Some(repo) = lock(&self.repos).get(layer).cloned() else {
            return PiecesAnswer::NotHere;
        };
        let (me, layer, w) = (self.clone(), *layer, *w);
        self.runtime.spawn(async move {
            let fetched = me
                .flights
                .run(w.sha256, || me.fetch_from_proxy(&repo, &layer, w))
                .await;
            if let Err(e) = fetched {
                tracing::warn!(%layer, window = %w.sha256, error = %e, "could not fetch a window a peer asked for");
            }
        });
        PiecesAnswer::Pending
    }
}
