//! One chunk from its sources: peers that hold it (hedged, first verified answer wins),
//! then the proxy; timed and counted. Both clients verify what they receive and give a
//! [`VerifiedChunk`], which is what the cache stores, so nothing here hashes again.

use super::{FetchError, Fetcher, Source};
use crate::peers::Peer;
use imgd_core::{Digest, VerifiedChunk};
use std::time::Instant;
use tracing::Instrument;

impl Fetcher {
    /// One chunk from peers that hold it (hedged), else (with `then_proxy`) from the
    /// proxy; in a span, timed. `None`: the holders failed and the proxy was not asked.
    pub(super) async fn fetch_chunk(
        &self,
        blob: &Digest,
        digest: &Digest,
        holders: Vec<Peer>,
        then_proxy: bool,
    ) -> Result<Option<(VerifiedChunk, Source)>, FetchError> {
        let (started, span) = (Instant::now(), tracing::info_span!("chunk_fetch", %digest));
        let result = self
            .fetch_chunk_from(blob, digest, holders, then_proxy)
            .instrument(span)
            .await;
        if let Ok(Some(got)) = &result {
            crate::metrics::chunk_fetched(got.1.name(), started);
        }
        result
    }

    async fn fetch_chunk_from(
        &self,
        blob: &Digest,
        digest: &Digest,
        mut holders: Vec<Peer>,
        then_proxy: bool,
    ) -> Result<Option<(VerifiedChunk, Source)>, FetchError> {
        holders.truncate(2);
        let mut last = String::from("no peer holds it");
        if !holders.is_empty() {
            match self.ask_peers(digest, &holders).await {
                Ok(b) => return Ok(Some((b, Source::Peer))),
                Err(e) if !then_proxy => {
                    tracing::debug!(
                        why = e,
                        "the holders failed; the chunk waits for another round"
                    );
                    return Ok(None);
                }
                Err(e) => last = e,
            }
        }
        match self.proxy.chunk(digest).await {
            Ok(b) => Ok(Some((b, Source::Proxy))),
            Err(e) => Err(FetchError::Exhausted {
                blob: *blob,
                digest: *digest,
                last: format!("{last}; proxy: {e}"),
            }),
        }
    }

    /// Asks the first holder, and the second too if the first is slow; first verified wins.
    pub(super) async fn ask_peers(
        &self,
        digest: &Digest,
        holders: &[Peer],
    ) -> Result<VerifiedChunk, String> {
        let timeout = self.settings.peer_timeout;
        let ask = |p: &Peer| {
            let p = p.clone();
            async move {
                let r = self.pool.get_chunk(p.data_addr, digest, timeout).await;
                (p, r)
            }
        };
        let mut tries = futures::stream::FuturesUnordered::new();
        tries.push(futures::future::Either::Left(ask(&holders[0])));
        let hedge = tokio::time::sleep(timeout / 2);
        tokio::pin!(hedge);
        let mut hedged = holders.len() < 2;
        let mut last = String::new();
        let mut first_failed = false;
        loop {
            tokio::select! {
                _ = &mut hedge, if !hedged => {
                    hedged = true;
                    tries.push(futures::future::Either::Right(ask(&holders[1])));
                }
                r = futures::StreamExt::next(&mut tries) => match r {
                    None => return Err(last),
                    Some((p, Ok(Some(bytes)))) => {
                        if p.id != holders[0].id && !first_failed {
                            // Out-raced by the hedge: a slow first holder drifts back.
                            self.peers.slowed(&holders[0].id);
                        }
                        return Ok(bytes);
                    }
                    Some((p, r)) => {
                        if matches!(r, Err(crate::dataplane::DataPlaneError::Corrupt { .. })) {
                            crate::metrics::verification_failed("peer");
                        }
                        let (penalty, why) = crate::peers::penalty_for(r.err().as_ref());
                        self.peers.penalise(&p.id, penalty, &why);
                        first_failed |= p.id == holders[0].id;
                        last = format!("peer {}: {why}", p.id);
                        if !hedged {
                            // The first source failed outright: ask the second now.
                            hedged = true;
                            tries.push(futures::future::Either::Right(ask(&holders[1])));
                        }
                    }
                }
            }
            if tries.is_empty() && hedged {
                return Err(last);
            }
        }
    }
}
