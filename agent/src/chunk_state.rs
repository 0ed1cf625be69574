//! The life of one chunk in this agent, as an explicit state machine.
//!
//! ```text
//!             start(by)               verified
//!   Absent ─────────────▶ InFlight{by} ─────────▶ Present ──evict──▶ Evicted
//!     ▲  │                    │                     ▲                  │
//!     │  └──── found ─────────┼─────────────────────┘                  │
//!     └────── failed ─────────┘                                        │
//!     ▲                                                                │
//!     └───────────────────────────── start(by) (fetched again) ◀───────┘
//! ```
//!
//! - **Absent**: not in the cache, nobody here fetches it.
//! - **InFlight { by }**: one fetch of this agent is getting it (`by` says which kind);
//!   peers see it as in flight in this host's have-map, so they wait for it rather than
//!   ask the proxy for it too.
//! - **Present**: in the cache, verified (every source's bytes are checked against the
//!   chunk's sha256 before they get here).
//! - **Evicted**: was present, the cache evicted it (quota); it may be fetched again.
//! - **Partial**: a lazy read's fetch ended with some of its verified 64 KiB pieces
//!   stored ([`crate::pieces`]), not the whole chunk. Peers see it as in flight (it is
//!   completed in the background) and may ask for its pieces. A further read of other
//!   pieces starts a fetch again (Partial → InFlight); its completion, or the whole chunk
//!   found in the cache, makes it Present.
//!
//! Transitions ([`Transition`]): `Start` (Absent or Evicted → InFlight), `Verified`
//! (InFlight → Present), `Failed` (InFlight → Absent: the fetch failed or was
//! cancelled, so another may start), `Found` (Absent or Evicted → Present: it was in the
//! cache after all; also Partial → Present), `Evict` (Present → Evicted) and `Pieces`
//! (InFlight → Partial: the fetch got pieces, not the whole chunk). Anything else is refused
//! ([`IllegalTransition`]): a second `Start` of a chunk in flight (two fetches of one
//! chunk), `Verified` of a chunk nobody fetched, or evicting a chunk that is not there.

/// Who fetches a chunk in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetcher {
    /// A whole-blob fetch (prefetch, a mirror pull).
    Blob,
    /// A read of that chunk alone (a lazy mount's read).
    Read,
}

/// Where one chunk is in its life here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    Absent,
    InFlight { by: Fetcher },
    Present,
    Evicted,
    Partial,
}

/// What happens to a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A fetch of it starts.
    Start(Fetcher),
    /// Its fetch delivered bytes that matched its digest, now in the cache.
    Verified,
    /// Its fetch failed or was cancelled.
    Failed,
    /// It was found in the cache.
    Found,
    /// The cache evicted it.
    Evict,
    /// Its fetch ended with verified pieces stored, not the whole chunk.
    Pieces,
}

/// A transition the chunk's state does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("chunk state {from:?} does not allow {transition:?}")]
pub struct IllegalTransition {
    pub from: ChunkState,
    pub transition: Transition,
}

impl ChunkState {
    /// The state after `t`, or why `t` is not allowed here.
    pub fn apply(self, t: Transition) -> Result<ChunkState, IllegalTransition> {
        use ChunkState::*;
        use Transition::*;
        match (self, t) {
            (Absent | Evicted | Partial, Start(by)) => Ok(InFlight { by }),
            (InFlight { .. }, Verified) => Ok(Present),
            (InFlight { .. }, Failed) => Ok(Absent),
            (InFlight { .. }, Pieces) => Ok(Partial),
            (Absent | Evicted | Partial, Found) => Ok(Present),
            (Present, Evict) => Ok(Evicted),
            (from, transition) => Err(IllegalTransition { from, transition }),
        }
    }

    /// Whether a fetch of this agent is getting the chunk now.
    pub fn is_in_flight(self) -> bool {
        matches!(self, ChunkState::InFlight { .. })
    }

    /// Whether peers should see the chunk as coming here: in flight, or partial (being
    /// completed, and its pieces can be asked for).
    pub fn shows_in_flight(self) -> bool {
        matches!(self, ChunkState::InFlight { .. } | ChunkState::Partial)
    }
}

/// The states of every chunk of one blob.
#[derive(Debug)]
pub struct ChunkStates(Vec<ChunkState>);

impl ChunkStates {
    /// `n` chunks, all absent.
    pub fn new(n: usize) -> Self {
        ChunkStates(vec![ChunkState::Absent; n])
    }

    /// Applies `t` to chunk `i`; an index out of range is refused like an illegal move.
    pub fn apply(&mut self, i: usize, t: Transition) -> Result<ChunkState, IllegalTransition> {
        let Some(s) = self.0.get_mut(i) else {
            return Err(IllegalTransition {
                from: ChunkState::Absent,
                transition: t,
            });
        };
        *s = s.apply(t)?;
        Ok(*s)
    }

    /// The state of chunk `i` (`None`: no such chunk).
    pub fn get(&self, i: usize) -> Option<ChunkState> {
        self.0.get(i).copied()
    }

    /// How many chunks are in flight.
    pub fn in_flight(&self) -> usize {
        self.0.iter().filter(|s| s.is_in_flight()).count()
    }

    /// Every chunk's state, in order.
    pub fn iter(&self) -> impl Iterator<Item = ChunkState> + '_ {
        self.0.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkState::*;
    use super::Fetcher::*;
    use super::Transition::*;
    use super::*;

    const ALL_STATES: [ChunkState; 6] = [
        Absent,
        InFlight { by: Blob },
        InFlight { by: Read },
        Present,
        Evicted,
        Partial,
    ];
    const ALL_TRANSITIONS: [Transition; 7] = [
        Start(Blob),
        Start(Read),
        Verified,
        Failed,
        Found,
        Evict,
        Pieces,
    ];

    /// The whole table, written out: every (state, transition) and its outcome.
    fn expected(s: ChunkState, t: Transition) -> Option<ChunkState> {
        match (s, t) {
            (Absent, Start(by)) => Some(InFlight { by }),
            (Evicted, Start(by)) => Some(InFlight { by }),
            (InFlight { .. }, Verified) => Some(Present),
            (InFlight { .. }, Failed) => Some(Absent),
            (InFlight { .. }, Pieces) => Some(Partial),
            (Partial, Start(by)) => Some(InFlight { by }),
            (Absent, Found) => Some(Present),
            (Evicted, Found) => Some(Present),
            (Partial, Found) => Some(Present),
            (Present, Evict) => Some(Evicted),
            _ => None,
        }
    }

    #[test]
    fn every_transition_of_every_state_is_as_written() {
        let mut allowed = 0;
        for s in ALL_STATES {
            for t in ALL_TRANSITIONS {
                match (s.apply(t), expected(s, t)) {
                    (Ok(next), Some(want)) => {
                        assert_eq!(next, want, "{s:?} + {t:?}");
                        allowed += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(
                            e,
                            IllegalTransition {
                                from: s,
                                transition: t
                            }
                        )
                    }
                    (got, want) => panic!("{s:?} + {t:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        // Absent: 2 starts + found; Evicted and Partial: the same; each InFlight:
        // verified, failed, pieces; Present: evict.
        assert_eq!(allowed, 3 + 3 + 3 + 2 * 3 + 1);
    }

    #[test]
    fn a_chunk_in_flight_cannot_be_started_twice_and_a_failed_one_can_restart() {
        let s = Absent.apply(Start(Blob)).unwrap();
        assert!(s.is_in_flight());
        assert!(s.apply(Start(Read)).is_err(), "one fetch per chunk");
        let s = s.apply(Failed).unwrap();
        assert_eq!(s, Absent);
        assert_eq!(s.apply(Start(Read)).unwrap(), InFlight { by: Read });
    }

    #[test]
    fn a_full_life_and_a_refetch_after_eviction() {
        let mut s = Absent;
        for t in [Start(Blob), Verified, Evict, Start(Read), Verified] {
            s = s.apply(t).unwrap();
        }
        assert_eq!(s, Present);
        assert!(Present.apply(Verified).is_err(), "no second verification");
        assert!(Absent.apply(Evict).is_err(), "nothing to evict");
    }

    #[test]
    fn a_read_that_got_pieces_leaves_the_chunk_partial_until_it_is_completed() {
        let mut s = Absent;
        for t in [Start(Read), Pieces, Start(Read), Pieces] {
            s = s.apply(t).unwrap();
        }
        assert_eq!(s, Partial);
        assert!(s.shows_in_flight() && !s.is_in_flight());
        assert!(s.apply(Verified).is_err(), "only a fetch verifies");
        assert!(
            s.apply(Evict).is_err(),
            "a partial chunk is not in the cache"
        );
        assert_eq!(s.apply(Start(Read)).unwrap().apply(Verified), Ok(Present));
        assert_eq!(s.apply(Found), Ok(Present));
    }

    #[test]
    fn a_blobs_table_counts_chunks_in_flight_and_refuses_bad_indexes() {
        let mut t = ChunkStates::new(3);
        t.apply(0, Start(Blob)).unwrap();
        t.apply(2, Found).unwrap();
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.get(2), Some(Present));
        assert!(t.apply(3, Start(Blob)).is_err());
        assert!(t.apply(0, Start(Blob)).is_err());
        t.apply(0, Verified).unwrap();
        assert_eq!(t.in_flight(), 0);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            [Present, Absent, Present],
            "chunk 1 untouched"
        );
    }
}
