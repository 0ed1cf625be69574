//! The proxy's peers: the other imgd-proxy replicas of a fleet (`peers` in the config).
//!
//! An uncached blob that a peer already stores is ingested from that peer instead of from
//! upstream, so that a fleet of replicas costs the upstream each blob about once. The
//! peer's `GET /imgd/v1/blobs/{digest}/data` serves stored blobs only and never fetches,
//! so two replicas that name each other cannot loop.
//!
//! A peer is trusted with nothing: its bytes go through the same ingest as upstream's
//! (hashed against the digest, chunked, indexed, committed only when whole), and who may
//! see the blob is still upstream's call (`HEAD` under the client's repository, unless
//! the route is on record). Peers are asked in rendezvous order of the blob digest
//! ([`Endpoints`]); a peer that fails or sends a bad blob is not asked for a while.

use crate::config::ConfigError;
use crate::upstream::{BlobStream, UpstreamError};
use futures::StreamExt;
use imgd_core::endpoints::Endpoints;
use imgd_core::Digest;
use reqwest::StatusCode;
use std::time::Duration;

/// Time limit for connecting to a peer: a dead one must cost little before upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The peer replicas and the client that asks them.
pub struct Peers {
    endpoints: Endpoints,
    http: reqwest::Client,
    /// The chunk API token the peers require (the fleet shares one), if any.
    token: Option<String>,
}

/// A blob stream opened from a peer.
pub struct PeerBlob {
    /// Which peer ([`Peers::base`]).
    pub peer: usize,
    pub stream: BlobStream,
}

impl Peers {
    /// The peers at `urls`, asked with `token` and `read_timeout` per read.
    pub fn new(
        urls: &[String],
        token: Option<String>,
        read_timeout: Duration,
    ) -> Result<Peers, ConfigError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("imgd-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Invalid(format!("peer http client: {e}")))?;
        Ok(Peers {
            endpoints: Endpoints::new(urls, "proxy peer"),
            http,
            token,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The base URL of peer `i`.
    pub fn base(&self, i: usize) -> &str {
        self.endpoints.base(i)
    }

    /// Peer `i` failed or sent a bad blob: it is asked last for a while.
    pub fn mark_down(&self, i: usize, why: &str) {
        self.endpoints.mark_down(i, why);
    }

    /// The blob's stream from the first peer, in rendezvous order of its digest, that
    /// stores it; `None` if none does (or none answers). Peers that failed lately are
    /// not asked: upstream is the fallback.
    pub async fn blob(&self, digest: &Digest) -> Option<PeerBlob> {
        let order = self.endpoints.order(digest.as_bytes(), None);
        for i in order.into_iter().filter(|&i| self.endpoints.is_up(i)) {
            let url = format!("{}/imgd/v1/blobs/{digest}/data", self.base(i));
            let mut req = self.http.get(&url);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(resp) if resp.status() == StatusCode::OK => {
                    self.endpoints.mark_up(i);
                    tracing::info!(%digest, peer = self.base(i), "ingesting the blob from a peer replica");
                    let size = resp.content_length();
                    let body = resp
                        .bytes_stream()
                        .map(|r| r.map_err(|e| UpstreamError::Interrupted(format!("peer: {e}"))))
                        .boxed();
                    return Some(PeerBlob {
                        peer: i,
                        stream: BlobStream { size, body },
                    });
                }
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                    self.endpoints.mark_up(i);
                }
                Ok(resp) => self.mark_down(i, &format!("answered {}", resp.status())),
                Err(e) => self.mark_down(i, &e.to_string()),
            }
        }
        None
    }
}
