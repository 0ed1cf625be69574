//! One computation per key at a time, shared by every thread that asks for it meanwhile
//! (for blocking code: FUSE worker threads and readahead threads).
//!
//! Cancel-safe in the only way a blocking call is cancelled: if the thread running the
//! computation unwinds, the waiters are woken with an error and the key is free again.
//! A finished computation is forgotten: callers keep its result elsewhere (on disk).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a waiter gets when the computation it joined failed: the leader's error, as text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Joined(pub String);

enum Outcome<V> {
    Running,
    Done(Result<V, String>),
}

struct Slot<V> {
    outcome: Mutex<Outcome<V>>,
    ready: Condvar,
}

/// In-flight computations by key.
pub struct Flights<K, V> {
    running: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            running: Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the leader's flight on every path out of it, unwinding included.
struct Lead<'a, K: Hash + Eq + Clone, V: Clone> {
    flights: &'a Flights<K, V>,
    key: K,
    slot: Arc<Slot<V>>,
    result: Option<Result<V, String>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Lead<'_, K, V> {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err("the computation was abandoned".into()));
        lock(&self.flights.running).remove(&self.key);
        *lock(&self.slot.outcome) = Outcome::Done(result);
        self.slot.ready.notify_all();
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    /// True if a computation of `key` is running.
    pub fn is_running(&self, key: &K) -> bool {
        lock(&self.running).contains_key(key)
    }

    /// Runs `f` for `key`, or waits for the run already going on and shares its result.
    /// The leader gets its own error; a waiter gets it as [`Joined`].
    pub fn run<E: std::fmt::Display>(
        &self,
        key: K,
        f: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, Result<E, Joined>> {
        let (slot, leads) = {
            let mut running = lock(&self.running);
            match running.get(&key) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new(Slot {
                        outcome: Mutex::new(Outcome::Running),
                        ready: Condvar::new(),
                    });
                    running.insert(key.clone(), s.clone());
                    (s, true)
                }
            }
        };
        if !leads {
            let mut outcome = lock(&slot.outcome);
            loop {
                match &*outcome {
                    Outcome::Done(r) => return r.clone().map_err(|e| Err(Joined(e))),
                    Outcome::Running => {
                        outcome = slot.ready.wait(outcome).unwrap_or_else(|p| p.into_inner())
                    }
                }
            }
        }
        let mut lead = Lead {
            flights: self,
            key,
            slot,
            result: None,
        };
        let result = f();
        lead.result = Some(match &result {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(e.to_string()),
        });
        drop(lead);
        result.map_err(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn concurrent_callers_share_one_run() {
        let flights = Arc::new(Flights::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (flights, runs) = (flights.clone(), runs.clone());
                std::thread::spawn(move || {
                    flights.run(1, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Ok::<_, String>(7)
                    })
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().ok(), Some(7));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!flights.is_running(&1), "forgotten once done");
    }

    #[test]
    fn a_leader_that_unwinds_frees_the_key_and_wakes_waiters() {
        let flights = Arc::new(Flights::<u32, u32>::default());
        let f2 = flights.clone();
        let leader = std::thread::spawn(move || {
            let _ = f2.run(1, || -> Result<u32, String> {
                std::thread::sleep(Duration::from_millis(100));
                panic!("inflater died")
            });
        });
        std::thread::sleep(Duration::from_millis(30));
        let waited = flights.run(1, || Ok::<_, String>(1));
        assert!(leader.join().is_err());
        match waited {
            Err(Err(Joined(e))) => assert!(e.contains("abandoned"), "{e}"),
            other => panic!("the waiter joined the dead run: {other:?}"),
        }
        assert_eq!(flights.run(1, || Ok::<_, String>(2)).ok(), Some(2));
    }
}
