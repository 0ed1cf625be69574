//! What a mount needs of each layer before it serves, shared in the swarm: the main part
//! of the layer's index (file table and checkpoints, about 0.2% of the layer) and its chunk
//! list (every chunk's and piece's sha256, about 0.1%), so that hosts mounting one image
//! take each from the proxy once.
//!
//! A host that holds neither asks the proxy only for their names, [`LayerParts`] (`GET
//! /imgd/v1/layers/{layer}/parts`, a few hundred bytes): each part's sha256 and length.
//! Each part has one owner among this host and all its usable peers (rendezvous of its
//! sha256; hosts that mount at one moment do not know yet which of them read the layer).
//! The owner fetches it from the proxy; the others ask the owner (`GetIndexMain`,
//! `GetChunkList`, with their repository, so that an owner that does not mount the image
//! fetches the part on their behalf, answering `Pending` meanwhile), at most
//! `peer_timeout` ([`Fetcher::layer_part_from_peers`]), then the proxy.
//!
//! A part from a peer is checked against the proxy's sha256 and length by the data plane
//! client, then decoded and checked again (an index names its layer and verifies its
//! trailer; a chunk list must be valid and name the layer) before it is stored and used.
//! One fetch of a part runs at a time on a host, whoever asked for it (a mount here or a
//! peer), and it ends once the part is stored, so that the next ask finds it.

use crate::dataplane::{LayerPart, PiecesAnswer};
use crate::fetch::{FetchError, Fetcher};
use crate::layer_indexes::{LayerIndexError, LayerIndexes};
use crate::proxy_client::Repo;
use bytes::Bytes;
use imgd_core::index::LayerIndex;
use imgd_core::peer_wire::PartAsk;
use imgd_core::wire::{LayerParts, PartRef};
use imgd_core::{ChunkList, Digest, SingleFlight};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Errors getting a layer part.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error(transparent)]
    Index(#[from] LayerIndexError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("the chunk list of layer {layer}: {message}")]
    ChunkList { layer: Digest, message: String },
    /// The error of a concurrent fetch of the same part that this call waited for.
    #[error(transparent)]
    Shared(Arc<PartError>),
}

/// One fetch of a part: it ends once the part is stored.
type Stored = Result<(), Arc<PartError>>;

/// This host's layer parts: what it needs to fetch them, the names the proxy gave, and
/// the fetches in flight.
pub struct PartShare {
    indexes: Arc<LayerIndexes>,
    fetcher: Arc<Fetcher>,
    named: Mutex<HashMap<Digest, LayerParts>>,
    flights: SingleFlight<(LayerPart, Digest), Stored>,
    runtime: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PartShare {
    /// Parts kept in `indexes` and `fetcher`'s cache, fetched through its peers and
    /// proxy, on the current tokio runtime.
    pub fn new(indexes: Arc<LayerIndexes>, fetcher: Arc<Fetcher>) -> Self {
        PartShare {
            indexes,
            fetcher,
            named: Mutex::default(),
            flights: SingleFlight::new(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The index of `layer` (its main part): stored, else from its owner among this host
    /// and its peers, else from the proxy; checked and stored.
    pub async fn index(&self, repo: &Repo, layer: &Digest) -> Result<LayerIndex, PartError> {
        if let Some(index) = self.indexes.stored(layer).await {
            return Ok(index);
        }
        let Some(names) = self.names(repo, layer).await else {
            let bytes = LayerIndexes::main_from_proxy(&self.fetcher.proxy, repo, layer).await?;
            return Ok(self.indexes.keep_main(layer, bytes).await?);
        };
        self.fetch(LayerPart::IndexMain, repo, layer, &names.index_main, true)
            .await?;
        let stored = self.indexes.stored(layer).await;
        stored.ok_or_else(|| PartError::Index(Self::vanished(layer)))
    }

    /// The chunk list of `layer`: cached, else from its owner among this host and its
    /// peers, else from the proxy; checked and cached.
    pub async fn chunk_list(&self, repo: &Repo, layer: &Digest) -> Result<ChunkList, PartError> {
        if let Some(list) = self.fetcher.cache.blob(layer).map_err(FetchError::from)? {
            return Ok(list);
        }
        let Some(names) = self.names(repo, layer).await else {
            return Ok(self.fetcher.chunk_list(repo, layer).await?);
        };
        self.fetch(LayerPart::ChunkList, repo, layer, &names.chunk_list, true)
            .await?;
        match self.fetcher.cache.blob(layer).map_err(FetchError::from)? {
            Some(list) => Ok(list),
            None => Ok(self.fetcher.chunk_list(repo, layer).await?),
        }
    }

    /// A peer's request for part `which` of `ask.layer` that `ask.sha256` names
    /// (blocking: called on the data plane's blocking pool). Here if stored with that
    /// sha256; `Pending` while a fetch of it runs, or after starting one from the proxy
    /// by the peer's repository (the peer found this host to be the part's owner).
    pub fn serve(self: &Arc<Self>, which: LayerPart, ask: &PartAsk) -> PiecesAnswer {
        if let Some(bytes) = self.stored(which, &ask.layer, &ask.sha256) {
            crate::metrics::served("peer", bytes.len() as u64);
            return PiecesAnswer::Here(bytes);
        }
        if self.flights.contains(&(which, ask.sha256)) {
            return PiecesAnswer::Pending;
        }
        let repo = Repo {
            name: ask.repo.clone(),
            ns: ask.ns.clone(),
        };
        let part = PartRef {
            sha256: ask.sha256,
            len: u64::from(ask.len),
        };
        let (me, layer) = (self.clone(), ask.layer);
        self.runtime.spawn(async move {
            if let Err(e) = me.fetch(which, &repo, &layer, &part, false).await {
                tracing::warn!(%layer, ?which, error = %e, "could not fetch a layer part a peer asked for");
            }
        });
        PiecesAnswer::Pending
    }

    /// The proxy's names of `layer`'s parts (asked once per layer); `None` if it could
    /// not give them (a proxy without the route): the caller fetches the parts from it.
    async fn names(&self, repo: &Repo, layer: &Digest) -> Option<LayerParts> {
        if let Some(names) = lock(&self.named).get(layer).copied() {
            return Some(names);
        }
        match self.fetcher.proxy.layer_parts(repo, layer).await {
            Ok(names) => {
                lock(&self.named).insert(*layer, names);
                Some(names)
            }
            Err(e) => {
                tracing::debug!(%layer, error = %e, "no names of the layer's parts: from the proxy");
                None
            }
        }
    }

    /// Fetches part `which` of `layer` named `part` (from its owner if `from_peers`, else
    /// or then from the proxy), checks and stores it; one fetch per part at a time.
    async fn fetch(
        &self,
        which: LayerPart,
        repo: &Repo,
        layer: &Digest,
        part: &PartRef,
        from_peers: bool,
    ) -> Result<(), PartError> {
        self.flights
            .run((which, part.sha256), || async {
                let from_peer = match from_peers {
                    true => {
                        self.fetcher
                            .layer_part_from_peers(which, layer, part, repo)
                            .await
                    }
                    false => None,
                };
                self.keep(which, repo, layer, from_peer)
                    .await
                    .map_err(Arc::new)
            })
            .await
            .map_err(PartError::Shared)
    }

    /// Stores part `which` of `layer`: the peer's bytes (checked against the proxy's
    /// sha256 by the data plane) once decoded and checked, else the proxy's.
    async fn keep(
        &self,
        which: LayerPart,
        repo: &Repo,
        layer: &Digest,
        from_peer: Option<Bytes>,
    ) -> Result<(), PartError> {
        let proxy = &self.fetcher.proxy;
        match which {
            LayerPart::IndexMain => {
                let bytes = match from_peer {
                    Some(bytes) => bytes,
                    None => LayerIndexes::main_from_proxy(proxy, repo, layer).await?,
                };
                self.indexes.keep_main(layer, bytes).await?;
            }
            LayerPart::ChunkList => {
                let Some(bytes) = from_peer else {
                    self.fetcher.chunk_list(repo, layer).await?;
                    return Ok(());
                };
                let bad = |message: String| PartError::ChunkList {
                    layer: *layer,
                    message,
                };
                let list =
                    ChunkList::from_canonical_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
                if list.blob != *layer {
                    return Err(bad(format!("a peer sent the list of {}", list.blob)));
                }
                self.fetcher
                    .cache
                    .put_blob(&list)
                    .map_err(FetchError::from)?;
            }
        }
        Ok(())
    }

    /// Part `which` of `layer` as stored here, if its sha256 is `sha256` (blocking).
    fn stored(&self, which: LayerPart, layer: &Digest, sha256: &Digest) -> Option<Bytes> {
        match which {
            LayerPart::IndexMain => self.indexes.stored_main(layer, sha256).map(Bytes::from),
            LayerPart::ChunkList => {
                let list = self.fetcher.cache.blob(layer).ok().flatten()?;
                let bytes = list.canonical_bytes();
                (Digest::of(&bytes) == *sha256).then(|| bytes.into())
            }
        }
    }

    fn vanished(layer: &Digest) -> LayerIndexError {
        LayerIndexError::Invalid {
            layer: *layer,
            message: "stored, then not found".into(),
        }
    }
}
