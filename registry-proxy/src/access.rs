//! Per-repository authorization of cached content.
//!
//! A blob or manifest is cached once, by digest, but an upstream may let only some
//! repositories (or some credentials) see it. The proxy records each `(upstream,
//! repository)` it fetched or confirmed content for; a request naming another one is
//! first confirmed by that upstream (`HEAD` under that repository, with that upstream's
//! credentials) and gets the upstream's refusal (401, 403, 404) if it is not.

use crate::errors::ProxyError;
use crate::routing::Route;
use crate::storage::{Access, Storage, StorageError};
use imgd_core::Digest;

/// What is being authorized.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Blob,
    Manifest,
}

/// The [`Access`] key saying that `route` may see `digest`.
pub fn key(route: &Route, digest: &Digest) -> String {
    format!("{digest}@{}/{}", route.upstream_name, route.repo)
}

/// True if `route` is on record for `digest`.
pub fn is_recorded(
    storage: &Storage,
    route: &Route,
    digest: &Digest,
) -> Result<bool, StorageError> {
    Ok(storage.meta.contains::<Access>(&key(route, digest))?)
}

/// Succeeds if `route` may see the cached `digest`: on record, or confirmed by its
/// upstream now (and then recorded). Otherwise the upstream's answer is the error.
pub async fn authorize(
    storage: &Storage,
    route: &Route,
    digest: &Digest,
    kind: Kind,
) -> Result<(), ProxyError> {
    if is_recorded(storage, route, digest)? {
        return Ok(());
    }
    let checked = match kind {
        Kind::Blob => route.upstream.check_blob(&route.repo, digest).await,
        Kind::Manifest => route.upstream.check_manifest(&route.repo, digest).await,
    };
    if let Err(e) = checked {
        tracing::info!(%digest, upstream = route.upstream_name, repo = route.repo, error = %e, "cached content not confirmed for this repository");
        return Err(e.into());
    }
    storage
        .meta
        .put::<Access>(&key(route, digest), &true)
        .map_err(StorageError::from)?;
    Ok(())
}
