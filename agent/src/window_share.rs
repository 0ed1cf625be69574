//! Inflate checkpoint windows of layer indexes shared in the swarm, so that hosts reading
//! one layer take each window from the proxy once (the main parts: [`crate::layer_parts`]).
//!
//! A lazy read that starts inflating at a checkpoint needs that checkpoint's window (about
//! 15 KiB packed, named by its sha256 in the layer index's main part). Every window has one
//! owner among the hosts reading the layer, by rendezvous hashing of its sha256 and the
//! node ids ([`crate::fetch::Fetcher::window_from_peers`]). A host that needs a window it
//! does not hold:
//! - owns it: fetches it from the proxy ([`crate::layer_indexes::LayerIndexes::window`]);
//! - else asks the owner over the data plane (`GetWindow`). The owner answers with the
//!   window if it holds it, or starts fetching it from the proxy on the asker's behalf and
//!   answers `Pending` meanwhile ([`WindowShare::serve_window`]); the asker asks again shortly, at
//!   most `peer_timeout`, then fetches it from the proxy itself.
//!
//! Windows from a peer are checked against their sha256 (by the data plane client) before
//! use and stored like the proxy's. One fetch per window runs at a time on a host, whoever
//! asked for it (a read here or a peer).

use crate::dataplane::PiecesAnswer;
use crate::fetch::Fetcher;
use crate::layer_indexes::{LayerIndexError, LayerIndexes};
use crate::proxy_client::Repo;
use bytes::Bytes;
use imgd_core::index::WindowRef;
use imgd_core::{Digest, SingleFlight};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The result of one window fetch, shared by everyone waiting for it.
type Fetched = Result<Bytes, Arc<LayerIndexError>>;

/// This host's windows: the store, the fetches in flight and what it needs to fetch a
/// window for a peer.
pub struct WindowShare {
    indexes: Arc<LayerIndexes>,
    fetcher: Arc<Fetcher>,
    /// The repository each layer read here came from (the proxy routes by it), so that a
    /// peer's request for a window of the layer can be fetched.
    repos: Mutex<HashMap<Digest, Repo>>,
    flights: SingleFlight<Digest, Fetched>,
    runtime: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WindowShare {
    /// Windows of `indexes`, fetched through `fetcher`'s peers and proxy, on the current
    /// tokio runtime.
    pub fn new(indexes: Arc<LayerIndexes>, fetcher: Arc<Fetcher>) -> Self {
        WindowShare {
            indexes,
            fetcher,
            repos: Mutex::default(),
            flights: SingleFlight::new(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Layer `layer` is read here, from `repo`: its windows may be fetched for peers.
    pub fn reading(&self, layer: Digest, repo: &Repo) {
        lock(&self.repos)
            .entry(layer)
            .or_insert_with(|| repo.clone());
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
