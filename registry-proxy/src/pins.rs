//! Pinned images: kept whole in storage whatever the quota.
//!
//! Pinning an image (`imgd-proxy pin IMAGE`, `PUT /imgd/v1/pins/IMAGE`, or the `pins`
//! config list) resolves it to its manifests (an index and every manifest it lists) and
//! their blobs, records them in the [`Pins`] table, and fetches whatever is not stored.
//! The pinned set is recorded before the fetches, so the image's first blobs cannot be
//! evicted to make room for its last. A tag is resolved once, when pinned: pin it again
//! to follow it.

use crate::chunk_api::Authorized;
use crate::errors::ProxyError;
use crate::server::AppState;
use crate::storage::StorageError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use imgd_core::manifest::{Manifest, ManifestLimits};
use imgd_core::store::Table;
use imgd_core::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// What one pinned image holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The manifest the reference resolved to, and for an index those it lists.
    pub manifests: Vec<Digest>,
    /// Every config and layer blob of those manifests.
    pub blobs: Vec<Digest>,
}

/// Pins by image reference, as given.
pub struct Pins;
impl Table for Pins {
    const NAME: &'static str = "pins";
    type Key = String;
    type Value = Pin;
}

/// Splits `NAME:TAG`, `NAME@DIGEST` (or `NAME`, meaning `:latest`).
pub fn split_reference(image: &str) -> Result<(&str, &str), ProxyError> {
    let bad = || {
        ProxyError::BadRequest(format!(
            "image reference {image:?}: expected NAME:TAG or NAME@DIGEST"
        ))
    };
    let (name, reference) = match image.split_once('@') {
        Some((n, d)) => (n, d),
        None => {
            let slash = image.rfind('/').map_or(0, |i| i + 1);
            match image[slash..].rfind(':') {
                Some(i) => (&image[..slash + i], &image[slash + i + 1..]),
                None => (image, "latest"),
            }
        }
    };
    if name.is_empty() || reference.is_empty() || name.starts_with('/') {
        return Err(bad());
    }
    Ok((name, reference))
}

/// Every pinned digest (manifests and blobs), for the space manager.
fn pinned_set(state: &AppState) -> Result<HashSet<Digest>, StorageError> {
    let mut set = HashSet::new();
    for (_, pin) in state.storage.meta.scan::<Pins>()? {
        set.extend(pin.manifests);
        set.extend(pin.blobs);
    }
    Ok(set)
}

/// Loads the pinned set into the space manager (at start and after each change).
pub fn refresh(state: &AppState) -> Result<(), StorageError> {
    state.space.set_pinned(pinned_set(state)?);
    Ok(())
}

/// Pins `image`: resolves it, records the pin, and fetches every blob not stored. If a
/// fetch fails the pin is removed again and the error returned.
pub async fn pin(state: &AppState, image: &str) -> Result<Pin, ProxyError> {
    let (name, reference) = split_reference(image)?;
    let route = state.upstreams.route(name, None)?;
    let accept: Vec<String> = imgd_core::wire::MANIFEST_MEDIA_TYPES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (top, m, _) =
        crate::registry_api::resolve_manifest(state, &route, reference, &accept).await?;
    let limits = ManifestLimits {
        max_bytes: state.config.max_manifest_bytes,
        ..Default::default()
    };
    let parse = |bytes: &[u8], mt: &str| {
        imgd_core::manifest::parse(bytes, Some(mt), &limits)
            .map_err(|e| ProxyError::BadRequest(format!("manifest of {image}: {e}")))
    };
    let mut pin = Pin {
        manifests: vec![top],
        blobs: Vec::new(),
    };
    let mut images = Vec::new();
    match parse(&m.bytes, &m.media_type)? {
        Manifest::Image(i) => images.push(i),
        Manifest::Index(index) => {
            for child in index.manifests {
                let (d, cm, _) = crate::registry_api::resolve_manifest(
                    state,
                    &route,
                    &child.digest.to_string(),
                    &accept,
                )
                .await?;
                pin.manifests.push(d);
                match parse(&cm.bytes, &cm.media_type)? {
                    Manifest::Image(i) => images.push(i),
                    Manifest::Index(_) => {
                        return Err(ProxyError::BadRequest(format!(
                            "{image}: an index listing an index is not supported"
                        )))
                    }
                }
            }
        }
    }
    for i in &images {
        for d in std::iter::once(&i.config).chain(&i.layers) {
            if !pin.blobs.contains(&d.digest) {
                pin.blobs.push(d.digest);
            }
        }
    }
    let key = image.to_string();
    state
        .storage
        .meta
        .put::<Pins>(&key, &pin)
        .map_err(StorageError::from)?;
    refresh(state)?;
    for blob in &pin.blobs {
        let fetched = match state.storage.blob(blob)? {
            Some(_) => Ok(()),
            None => state.ingestor.ensure(&route, *blob).await.map(|_| ()),
        };
        if let Err(e) = fetched {
            tracing::warn!(image, %blob, error = %e, "pinning failed, pin removed");
            let _ = unpin(state, image);
            return Err(e.into());
        }
    }
    tracing::info!(
        image,
        manifests = pin.manifests.len(),
        blobs = pin.blobs.len(),
        "image pinned"
    );
    Ok(pin)
}

/// Removes a pin; true if there was one. Its content stays until evicted.
pub fn unpin(state: &AppState, image: &str) -> Result<bool, StorageError> {
    let key = image.to_string();
    let had = state.storage.meta.contains::<Pins>(&key)?;
    state.storage.meta.delete::<Pins>(&key)?;
    refresh(state)?;
    Ok(had)
}

/// Every pin, by image.
pub fn list(state: &AppState) -> Result<BTreeMap<String, Pin>, StorageError> {
    Ok(state.storage.meta.scan::<Pins>()?.into_iter().collect())
}

/// Pins the images of the `pins` config list, one after the other (run at start).
pub async fn pin_configured(state: std::sync::Arc<AppState>) {
    for image in state.config.pins.clone() {
        match pin(&state, &image).await {
            Ok(p) => tracing::info!(image, blobs = p.blobs.len(), "configured pin in place"),
            Err(e) => tracing::error!(image, error = %e, "configured pin failed"),
        }
    }
}

/// `PUT /imgd/v1/pins/{image}`: pins the image (fetching it); answers the [`Pin`].
pub async fn put_pin(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(image): Path<String>,
) -> Result<Json<Pin>, ProxyError> {
    Ok(Json(pin(&state, &image).await?))
}

/// `DELETE /imgd/v1/pins/{image}`: 204, or 404 if it was not pinned.
pub async fn delete_pin(
    _: Authorized,
    State(state): State<Arc<AppState>>,
    Path(image): Path<String>,
) -> Result<StatusCode, ProxyError> {
    match unpin(&state, &image)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ProxyError::BlobUnknown(format!("pin of {image}"))),
    }
}

/// `GET /imgd/v1/pins`: every pin, by image.
pub async fn get_pins(
    _: Authorized,
    State(state): State<Arc<AppState>>,
) -> Result<Json<BTreeMap<String, Pin>>, ProxyError> {
    Ok(Json(list(&state)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_name_and_tag_or_digest() {
        assert_eq!(split_reference("local/app:1").unwrap(), ("local/app", "1"));
        assert_eq!(
            split_reference("host:5000/app").unwrap(),
            ("host:5000/app", "latest")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            split_reference(&format!("local/app@{d}")).unwrap(),
            ("local/app", d.as_str())
        );
        assert!(split_reference(":1").is_err());
        assert!(split_reference("app:").is_err());
    }
}
