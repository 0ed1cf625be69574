//! Single flight: one piece of work per key at a time, shared by every caller that asks
//! for the same key meanwhile, and safe against cancellation.
//!
//! The first caller of a key becomes its *leader* and holds a [`Leader`] guard; callers
//! that come while it runs are *followers* ([`Follower`]) and wait for the leader's value.
//! An entry has two ways out of the map, and both remove it:
//!
//! - the leader calls [`Leader::finish`]: the entry is removed, then the value goes to
//!   every follower;
//! - the guard is dropped unfinished (the leader's future was cancelled, it panicked, its
//!   task was aborted): the entry is removed and every follower learns the flight was
//!   [`Abandoned`], so it can retry ([`SingleFlight::run`] does) or report a clear error.
//!
//! So no entry outlives its leader, and a key never stays "in flight" with nobody working
//! on it. A leader may also publish something its followers use while it works (the
//! *shared* part `S`, e.g. a progress channel), given when it joins.
//!
//! The map is a `std` mutex held only for map operations, never across an `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// The leader of a flight went away without a value (cancelled, panicked or aborted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the single flight was abandoned by its leader (cancelled or failed) before it ended")]
pub struct Abandoned;

struct Entry<V, S> {
    /// Tells this leader's entry from a later one of the same key.
    id: u64,
    shared: Arc<S>,
    /// `None` while the leader works, then its value.
    rx: watch::Receiver<Option<V>>,
}

struct Entries<K, V, S> {
    next_id: u64,
    map: HashMap<K, Entry<V, S>>,
}

type Shared<K, V, S> = Arc<Mutex<Entries<K, V, S>>>;

fn lock<K, V, S>(m: &Shared<K, V, S>) -> MutexGuard<'_, Entries<K, V, S>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Single flights keyed by `K`, each ending with a `V`, each sharing an `S` while it runs.
pub struct SingleFlight<K, V, S = ()> {
    entries: Shared<K, V, S>,
}

impl<K, V, S> Default for SingleFlight<K, V, S> {
    fn default() -> Self {
        SingleFlight {
            entries: Arc::new(Mutex::new(Entries {
                next_id: 0,
                map: HashMap::new(),
            })),
        }
    }
}

/// What [`SingleFlight::join`] made of the caller.
pub enum Join<K: Eq + Hash, V, S> {
    /// Nobody was working on the key: the caller must, and finish or drop the guard.
    Leader(Leader<K, V, S>),
    /// Somebody is: wait for their value.
    Follower(Follower<V, S>),
}

impl<K: Eq + Hash + Clone, V: Clone, S> SingleFlight<K, V, S> {
    /// An empty set of flights.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins the flight of `key`, leading it (with the shared part `shared()`) if there
    /// is none.
    pub fn join(&self, key: K, shared: impl FnOnce() -> S) -> Join<K, V, S> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.map.get(&key) {
            return Join::Follower(Follower {
                shared: e.shared.clone(),
                rx: e.rx.clone(),
            });
        }
        let id = entries.next_id;
        entries.next_id += 1;
        let shared = Arc::new(shared());
        let (tx, rx) = watch::channel(None);
        entries.map.insert(
            key.clone(),
            Entry {
                id,
                shared: shared.clone(),
                rx,
            },
        );
        Join::Leader(Leader {
            entries: self.entries.clone(),
            key: Some(key),
            id,
            shared,
            tx,
        })
    }

    /// `work()`'s value for `key`, running it here unless a flight of `key` runs already,
    /// whose value is then taken instead. If that flight's leader is cancelled, this
    /// caller tries again (and may lead). Cancelling this call is safe: if it led, its
    /// followers see [`Abandoned`] and retry themselves.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
        S: Default,
    {
        loop {
            match self.join(key.clone(), S::default) {
                Join::Leader(leader) => {
                    let value = work().await;
                    leader.finish(value.clone());
                    return value;
                }
                Join::Follower(f) => match f.wait().await {
                    Ok(v) => return v,
                    Err(Abandoned) => continue,
                },
            }
        }
    }

    /// Whether a flight of `key` runs now.
    pub fn contains(&self, key: &K) -> bool {
        lock(&self.entries).map.contains_key(key)
    }

    /// The shared part of the flight of `key`, if one runs.
    pub fn shared(&self, key: &K) -> Option<Arc<S>> {
        lock(&self.entries).map.get(key).map(|e| e.shared.clone())
    }

    /// The shared parts of every running flight.
    pub fn all_shared(&self) -> Vec<Arc<S>> {
        lock(&self.entries)
            .map
            .values()
            .map(|e| e.shared.clone())
            .collect()
    }

    /// How many flights run now.
    pub fn len(&self) -> usize {
        lock(&self.entries).map.len()
    }

    /// Whether no flight runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The guard of the caller doing a flight's work. Dropping it unfinished abandons the
/// flight: its entry is removed and its followers are told.
pub struct Leader<K: Eq + Hash, V, S> {
    entries: Shared<K, V, S>,
    /// `None` once the entry was removed.
    key: Option<K>,
    id: u64,
    shared: Arc<S>,
    tx: watch::Sender<Option<V>>,
}

impl<K: Eq + Hash, V, S> Leader<K, V, S> {
    /// The shared part given when the flight started.
    pub fn shared(&self) -> &Arc<S> {
        &self.shared
    }

    /// Ends the flight with `value`: the entry leaves the map first, so a caller coming
    /// after this sees no flight (and finds whatever the work left behind, e.g. a cached
    /// chunk), then every follower gets `value`.
    pub fn finish(mut self, value: V) {
        self.remove();
        self.tx.send_replace(Some(value));
    }

    fn remove(&mut self) {
        if let Some(key) = self.key.take() {
            let mut entries = lock(&self.entries);
            if entries.map.get(&key).is_some_and(|e| e.id == self.id) {
                entries.map.remove(&key);
            }
        }
    }
}

impl<K: Eq + Hash, V, S> Drop for Leader<K, V, S> {
    fn drop(&mut self) {
        // Unfinished: the sender drops with the guard, so followers see `Abandoned`.
        self.remove();
    }
}

/// A caller waiting for somebody else's flight.
pub struct Follower<V, S> {
    shared: Arc<S>,
    rx: watch::Receiver<Option<V>>,
}

impl<V: Clone, S> Follower<V, S> {
    /// The shared part of the flight.
    pub fn shared(&self) -> &Arc<S> {
        &self.shared
    }

    /// The leader's value, or [`Abandoned`] if the leader went away without one.
    pub async fn wait(mut self) -> Result<V, Abandoned> {
        loop {
            if let Some(v) = self.rx.borrow_and_update().clone() {
                return Ok(v);
            }
            if self.rx.changed().await.is_err() {
                // The sender is gone: a value sent just before still counts.
                return self.rx.borrow().clone().ok_or(Abandoned);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<SingleFlight<u32, u64>> = Arc::new(SingleFlight::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (flights, runs, gate) = (flights.clone(), runs.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(7, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        42
                    })
                    .await
            }));
        }
        // Bounded wait until the leader runs, then let it finish.
        for _ in 0..200 {
            if runs.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 42);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for all callers");
        assert!(flights.is_empty(), "the finished flight left the map");
    }

    #[tokio::test]
    async fn cancelled_leader_leaves_no_entry_and_followers_retry() {
        let flights: Arc<SingleFlight<&'static str, u64>> = Arc::new(SingleFlight::new());
        let started = Arc::new(tokio::sync::Notify::new());
        let leader = {
            let (flights, started) = (flights.clone(), started.clone());
            tokio::spawn(async move {
                flights
                    .run("k", || async move {
                        started.notify_one();
                        std::future::pending::<u64>().await
                    })
                    .await
            })
        };
        started.notified().await;
        assert!(flights.contains(&"k"));
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", || async { 5 }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!follower.is_finished(), "the follower waits for the leader");
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        // The follower retried, led and ran its own work.
        let got = tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("the follower did not hang")
            .unwrap();
        assert_eq!(got, 5);
        assert!(flights.is_empty(), "no entry leaked: {}", flights.len());
    }

    #[tokio::test]
    async fn leader_dropped_by_a_timeout_leaves_no_entry() {
        let flights: SingleFlight<u8, ()> = SingleFlight::new();
        let r = tokio::time::timeout(
            Duration::from_millis(10),
            flights.run(1, std::future::pending),
        )
        .await;
        assert!(r.is_err(), "timed out");
        assert!(flights.is_empty(), "no entry leaked");
        // The key can be led again.
        assert!(matches!(flights.join(1, || ()), Join::Leader(_)));
    }

    #[tokio::test]
    async fn follower_of_a_dropped_guard_sees_abandoned() {
        let flights: SingleFlight<u8, u8, String> = SingleFlight::new();
        let Join::Leader(leader) = flights.join(1, || "progress".to_string()) else {
            panic!("first caller leads");
        };
        let Join::Follower(f) = flights.join(1, || unreachable!()) else {
            panic!("second caller follows");
        };
        assert_eq!(f.shared().as_str(), "progress");
        assert_eq!(
            flights.shared(&1).as_deref().map(String::as_str),
            Some("progress")
        );
        drop(leader);
        assert!(flights.is_empty());
        assert_eq!(f.wait().await, Err(Abandoned));
    }

    #[tokio::test]
    async fn finish_reaches_followers_and_empties_the_map() {
        let flights: SingleFlight<u8, u8> = SingleFlight::new();
        let Join::Leader(leader) = flights.join(1, || ()) else {
            panic!("first caller leads");
        };
        let Join::Follower(f) = flights.join(1, || ()) else {
            panic!("second caller follows");
        };
        leader.finish(9);
        assert!(flights.is_empty());
        assert_eq!(f.wait().await, Ok(9));
    }

    #[tokio::test]
    async fn a_stale_guard_does_not_remove_a_newer_flight() {
        let flights: SingleFlight<u8, u8> = SingleFlight::new();
        let Join::Leader(mut old) = flights.join(1, || ()) else {
            panic!("leads");
        };
        old.remove();
        let Join::Leader(_new) = flights.join(1, || ()) else {
            panic!("leads anew");
        };
        // A guard whose entry is gone never touches the key again.
        old.key = Some(1);
        drop(old);
        assert!(flights.contains(&1), "the newer flight is still there");
    }
}
