//! The negative cache: layers refused by the index rules, remembered by digest.
//!
//! A layer that breaks an `[index]` limit or safety rule is downloaded whole before it is
//! refused, and nothing of it is stored. Without memory of the verdict, every request for
//! it would download it again to refuse it again. The refusal is recorded in the
//! [`Refused`] table with its reason and an expiry (`refused_layer_ttl_secs`); until then
//! requests are answered 422 with the same reason at once. An expired record is dropped
//! when next looked up, and the layer is fetched and judged again (the limits may have
//! changed in between).

use crate::storage::{Storage, StorageError};
use imgd_core::store::Table;
use imgd_core::Digest;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why and until when a layer is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The index error the layer was refused with.
    pub reason: String,
    /// When it was refused, in seconds since the Unix epoch.
    pub refused_at: u64,
    /// Until when the refusal is remembered, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Refused layers by blob digest.
pub struct Refused;
impl Table for Refused {
    const NAME: &'static str = "refused";
    type Key = Digest;
    type Value = Refusal;
}

/// One remembered refusal, as `verify` lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedLayer {
    pub digest: Digest,
    #[serde(flatten)]
    pub refusal: Refusal,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The negative cache over the proxy's storage.
pub struct Refusals {
    ttl: Duration,
}

impl Refusals {
    /// Refusals remembered for `ttl` (zero: not remembered at all).
    pub fn new(ttl: Duration) -> Self {
        Refusals { ttl }
    }

    /// Records that `digest` was refused for `reason`.
    pub fn remember(
        &self,
        storage: &Storage,
        digest: &Digest,
        reason: &str,
    ) -> Result<(), StorageError> {
        if self.ttl.is_zero() {
            return Ok(());
        }
        let refused_at = now_secs();
        let refusal = Refusal {
            reason: reason.to_string(),
            refused_at,
            expires_at: refused_at.saturating_add(self.ttl.as_secs().max(1)),
        };
        storage.meta.put::<Refused>(digest, &refusal)?;
        crate::metrics::refusal_remembered();
        Ok(())
    }

    /// The live refusal of `digest`, if any; an expired one is deleted.
    pub fn lookup(
        &self,
        storage: &Storage,
        digest: &Digest,
    ) -> Result<Option<Refusal>, StorageError> {
        let Some(refusal) = storage.meta.get::<Refused>(digest)? else {
            return Ok(None);
        };
        if refusal.expires_at <= now_secs() || self.ttl.is_zero() {
            storage.meta.delete::<Refused>(digest)?;
            return Ok(None);
        }
        crate::metrics::refusal_hit();
        Ok(Some(refusal))
    }
}

/// Every refusal on record, expired ones included (they go at their next lookup).
pub fn list(storage: &Storage) -> Result<Vec<RefusedLayer>, StorageError> {
    Ok(storage
        .meta
        .scan::<Refused>()?
        .into_iter()
        .map(|(digest, refusal)| RefusedLayer { digest, refusal })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_remembered_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let d = Digest::of(b"layer");
        let cache = Refusals::new(Duration::from_secs(60));
        assert_eq!(cache.lookup(&storage, &d).unwrap(), None);
        cache.remember(&storage, &d, "'..' components").unwrap();
        let got = cache.lookup(&storage, &d).unwrap().unwrap();
        assert_eq!(got.reason, "'..' components");
        assert_eq!(got.expires_at, got.refused_at + 60);
        assert_eq!(list(&storage).unwrap().len(), 1);
        // Expired: forgotten at lookup.
        let mut old = got;
        old.expires_at = old.refused_at - 1;
        storage.meta.put::<Refused>(&d, &old).unwrap();
        assert_eq!(cache.lookup(&storage, &d).unwrap(), None);
        assert!(list(&storage).unwrap().is_empty());
        // A zero TTL remembers nothing.
        Refusals::new(Duration::ZERO)
            .remember(&storage, &d, "x")
            .unwrap();
        assert!(list(&storage).unwrap().is_empty());
    }
}
