//! The few peers a host asks about one blob while it fetches it, and what they have.
//!
//! Instead of asking every peer for a have-map every 100 ms, a fetching host:
//! 1. finds the blob's other hosts through Kademlia provider records (every host
//!    announces a blob when it starts fetching it): at most [`MAX_PROVIDER_LOOKUPS`]
//!    lookups per fetch, the first at once and then at doubling gaps from
//!    [`FIRST_LOOKUP_GAP`]; a peer that subscribes to this host's map of the blob is
//!    counted among its hosts too;
//! 2. subscribes to the have-maps of at most `max_asked_peers` of them
//!    ([`PeerSet::choose`]: same zone first, then lowest penalty and measured round
//!    trip), which then push every change (data plane `Subscribe`); a subscription that
//!    ends is replaced, at most [`SUBSCRIBE_BUDGET`] × `max_asked_peers` subscriptions
//!    per fetch in all.
//!
//! [`Holders::fetchers`] are the hosts among which chunk owners are chosen: the blob's
//! known providers in this host's zone. Until [`SETTLING_LOOKUPS`] lookups finished,
//! every found provider is identified (zone and address known) and every subscription
//! started delivered its first map (or ended), or [`GATHER_MAX`] passed, it is `None`
//! and the fetch waits, so a host does not take chunks from the proxy that a host it
//! has not heard of yet owns. (Two lookups, because hosts that start together announce
//! the blob while their first lookups run: the second, 0.25 s later, finds them.)

use crate::control_counts::{ControlCounts, ControlKind};
use crate::dataplane::{HaveMap, PeerPool};
use crate::peers::{Peer, PeerSet, FAILURE_PENALTY};
use crate::swarm::SwarmCommand;
use imgd_core::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// Most provider lookups per blob fetch.
pub const MAX_PROVIDER_LOOKUPS: u32 = 8;
/// Gap between the first and the second lookup; later gaps double (0.25, 0.5, 1 s, ...).
pub const FIRST_LOOKUP_GAP: Duration = Duration::from_millis(250);
/// Subscriptions per fetch, in all, as a multiple of `max_asked_peers`.
pub const SUBSCRIBE_BUDGET: usize = 2;
/// Longest wait for the first lookup and the identification of the providers it found
/// before choosing chunk owners among the hosts known by then.
pub const GATHER_MAX: Duration = Duration::from_secs(2);
/// Lookups that must have finished before owners are chosen (unless [`GATHER_MAX`]).
pub const SETTLING_LOOKUPS: u32 = 2;
/// A peer whose subscription ended is not asked again for this long.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(5);
/// How often the manager looks at the providers found (local work only).
const TICK: Duration = Duration::from_millis(100);
/// A subscription silent for this long (three heartbeats) is dead.
const SILENT: Duration = Duration::from_secs(15);

/// What the holder managers of all blobs share.
pub struct HolderContext {
    pub peers: Arc<PeerSet>,
    pub pool: Arc<PeerPool>,
    /// The swarm, for provider lookups; `None` without a swarm.
    pub swarm: Option<mpsc::Sender<SwarmCommand>>,
    pub counts: Arc<ControlCounts>,
    pub zone: Option<String>,
    pub max_asked: usize,
    /// Time limit to set up a subscription and get its first map.
    pub timeout: Duration,
}

/// The have-maps the subscriptions of one blob keep fresh, and when each last moved.
#[derive(Default)]
pub struct View {
    maps: Mutex<Maps>,
    changed: Notify,
    /// Subscriptions started that have not delivered their first map nor ended.
    awaiting: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Maps {
    by_peer: HashMap<String, HaveMap>,
    /// When each watched peer's map last changed (its first map counts as a change).
    moved: HashMap<String, Instant>,
    /// When any watched map last changed.
    any_moved: Option<Instant>,
}

/// A subscription's wait for its first map: counted in [`View`] until done or dropped.
struct Awaiting<'a>(Option<&'a View>);

impl Awaiting<'_> {
    fn done(&mut self) {
        if let Some(v) = self.0.take() {
            v.awaiting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            v.changed.notify_one();
        }
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

impl View {
    /// A copy of the current maps, by peer id.
    pub fn maps(&self) -> HashMap<String, HaveMap> {
        self.lock().by_peer.clone()
    }

    /// Resolves at the next change after the last one waited for.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Whether `peer` is watched and its map has not changed for `quiet` (a host that
    /// fetches shows chunks starting and arriving; one that does not, for that long, is
    /// stalled or dead, and the chunks it owns go to the next owner).
    pub fn is_stalled(&self, peer: &str, quiet: Duration) -> bool {
        self.lock()
            .moved
            .get(peer)
            .is_some_and(|at| at.elapsed() >= quiet)
    }

    /// Whether no watched map changed for `quiet` (none since the first, or none at all).
    pub fn all_quiet(&self, quiet: Duration) -> bool {
        self.lock().any_moved.is_none_or(|at| at.elapsed() >= quiet)
    }

    fn set(&self, peer: &str, map: Option<HaveMap>) {
        {
            let mut maps = self.lock();
            match map {
                Some(m) => {
                    if maps.by_peer.get(peer) != Some(&m) {
                        let now = Instant::now();
                        maps.moved.insert(peer.to_string(), now);
                        maps.any_moved = Some(now);
                    }
                    maps.by_peer.insert(peer.to_string(), m);
                }
                None => {
                    maps.by_peer.remove(peer);
                    maps.moved.remove(peer);
                }
            }
        }
        self.changed.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One blob's holder manager: runs while the value lives.
pub struct Holders {
    blob: Digest,
    ctx: Arc<HolderContext>,
    view: Arc<View>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
    /// Whether the settled owner set was logged.
    logged: std::sync::atomic::AtomicBool,
}

impl Holders {
    /// Starts looking for `blob`'s holders and subscribing to them.
    pub fn start(ctx: Arc<HolderContext>, blob: Digest) -> Holders {
        let view = Arc::new(View::default());
        let task = tokio::spawn(manage(ctx.clone(), view.clone(), blob));
        Holders {
            blob,
            ctx,
            view,
            started: Instant::now(),
            task,
            logged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The maps, kept fresh by the subscriptions.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// The hosts (other than this one) among which chunk owners are chosen, or `None`
    /// while still gathering them.
    pub fn fetchers(&self) -> Option<Vec<String>> {
        let (ids, lookups_done) = self.ctx.peers.providers(&self.blob);
        let known: Vec<Option<Peer>> = ids.iter().map(|id| self.ctx.peers.get(id)).collect();
        let settled = self.ctx.swarm.is_none()
            || self.started.elapsed() >= GATHER_MAX
            || (lookups_done >= SETTLING_LOOKUPS
                && known.iter().all(Option::is_some)
                && self
                    .view
                    .awaiting
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0);
        if !settled {
            return None;
        }
        let zone = self.ctx.zone.as_deref();
        let fetchers: Vec<String> = known
            .into_iter()
            .flatten()
            .filter(|p| p.in_zone(zone))
            .map(|p| p.id)
            .collect();
        if !self.logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(
                blob = %self.blob,
                providers = ids.len(),
                in_zone = fetchers.len(),
                lookups_done,
                after_ms = self.started.elapsed().as_millis() as u64,
                "chunk owners chosen among the hosts known"
            );
        }
        Some(fetchers)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        // Ends every subscription (their tasks live in the manager's JoinSet).
        self.task.abort();
        self.ctx.peers.forget_providers(&self.blob);
    }
}

/// Looks providers up on schedule and keeps up to `max_asked` subscriptions.
async fn manage(ctx: Arc<HolderContext>, view: Arc<View>, blob: Digest) {
    let mut subs = tokio::task::JoinSet::new();
    let mut live: HashSet<String> = HashSet::new();
    let mut ended: HashMap<String, Instant> = HashMap::new();
    let budget = SUBSCRIBE_BUDGET * ctx.max_asked;
    let (mut subscribed, mut lookups) = (0usize, 0u32);
    let mut next_lookup = Instant::now();
    loop {
        let now = Instant::now();
        if let Some(tx) = &ctx.swarm {
            if lookups < MAX_PROVIDER_LOOKUPS
                && now >= next_lookup
                && tx.try_send(SwarmCommand::FindProviders(blob)).is_ok()
            {
                ctx.counts.count(&blob, ControlKind::ProviderLookup);
                next_lookup = now + FIRST_LOOKUP_GAP * 2u32.pow(lookups);
                lookups += 1;
            }
        }
        ended.retain(|_, at| now.duration_since(*at) < RESUBSCRIBE_AFTER);
        let want = ctx.max_asked.saturating_sub(live.len());
        if want > 0 && subscribed < budget {
            let (ids, _) = ctx.peers.providers(&blob);
            let exclude: HashSet<String> = live.iter().chain(ended.keys()).cloned().collect();
            let zone = ctx.zone.as_deref();
            for peer in ctx
                .peers
                .choose(&ids, zone, want.min(budget - subscribed), &exclude)
            {
                ctx.counts.count(&blob, ControlKind::Subscribe);
                subscribed += 1;
                live.insert(peer.id.clone());
                view.awaiting
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (ctx, view) = (ctx.clone(), view.clone());
                subs.spawn(async move {
                    let result = subscription(&ctx, &view, &blob, &peer).await;
                    (peer.id, result)
                });
            }
        }
        tokio::select! {
            Some(done) = subs.join_next(), if !subs.is_empty() => {
                let Ok((id, result)) = done else { continue };
                live.remove(&id);
                ended.insert(id.clone(), Instant::now());
                view.set(&id, None);
                if let Err(e) = result {
                    ctx.peers.penalise(&id, FAILURE_PENALTY / 4, &format!("have-map subscription: {e}"));
                }
            }
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// One subscription, until the peer ends it or fails; its maps go into `view`.
async fn subscription(
    ctx: &HolderContext,
    view: &View,
    blob: &Digest,
    peer: &Peer,
) -> Result<(), crate::dataplane::DataPlaneError> {
    let mut first = Awaiting(Some(view));
    let asked = Instant::now();
    let mut sub = ctx
        .pool
        .subscribe(peer.data_addr, blob, ctx.timeout)
        .await?;
    let mut next = sub.next(ctx.timeout).await?;
    ctx.peers.record_rtt(&peer.id, asked.elapsed());
    loop {
        let Some(map) = next else {
            return Ok(()); // the peer no longer knows the blob
        };
        ctx.counts.count(blob, ControlKind::Pushed);
        view.set(&peer.id, Some(map));
        first.done();
        next = sub.next(SILENT).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_whose_map_stands_still_is_stalled_and_a_change_revives_it() {
        let quiet = Duration::from_millis(60);
        let view = View::default();
        assert!(
            !view.is_stalled("a", quiet),
            "an unwatched peer is not judged"
        );
        assert!(view.all_quiet(quiet), "nothing watched moves");
        let mut map = HaveMap::new(4);
        view.set("a", Some(map.clone()));
        assert!(!view.is_stalled("a", quiet) && !view.all_quiet(quiet));
        std::thread::sleep(quiet);
        // The same map again (a heartbeat) is no progress.
        view.set("a", Some(map.clone()));
        assert!(view.is_stalled("a", quiet) && view.all_quiet(quiet));
        map.set_in_flight(2, true);
        view.set("b", Some(HaveMap::new(4)));
        assert!(view.is_stalled("a", quiet) && !view.all_quiet(quiet));
        view.set("a", Some(map));
        assert!(!view.is_stalled("a", quiet));
        view.set("a", None);
        assert!(!view.is_stalled("a", quiet) && view.maps().len() == 1);
    }
}
