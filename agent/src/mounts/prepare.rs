//! What a mount needs before it can be served: the layers' chunk lists and their indexes,
//! fetched from the proxy and checked.
//!
//! A layer's reads fetch chunks of the blob its index names ([`LayerIndex::readable_blob`]):
//! the layer itself, or for a plain zstd layer its seekable copy, whose chunk list comes
//! from the index (checked by its digest), not from the proxy.

use super::{MountContext, MountSpec};
use crate::error::AgentError;
use crate::image;
use crate::layer_parts::PartError;
use crate::proxy_client::Repo;
use crate::startup;
use imgd_core::index::LayerIndex;
use imgd_core::{ChunkList, Digest};
use imgd_fuse::view::{ImageView, ViewLimits};
use std::path::PathBuf;
use std::sync::Arc;

/// The layers of a view with their chunk lists and checked indexes, bottom first.
pub struct Layers {
    pub lists: Vec<ChunkList>,
    /// Where each index is stored on local disk (see [`crate::layer_indexes`]).
    pub index_files: Vec<PathBuf>,
    pub indexes: Vec<LayerIndex>,
}

/// Gets the index and the readable chunk list of each layer (indexes from local disk, else
/// from the proxy, checked) and checks that every index allows random access.
pub async fn fetch_layers(
    ctx: &MountContext,
    repo: &Repo,
    layers: &[Digest],
) -> Result<Layers, AgentError> {
    let fail = |m: String| AgentError::Mount(m);
    let fetcher = &ctx.fetcher;
    let mut out = Layers {
        lists: Vec::new(),
        index_files: Vec::new(),
        indexes: Vec::new(),
    };
    for layer in layers {
        ctx.windows.reading(*layer, repo);
        let index = ctx
            .parts
            .index(repo, layer)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !index.random_access {
            return Err(fail(format!("layer {layer} has no random-access index")));
        }
        let list = match &index.copy {
            Some(copy) => {
                let list = copy.chunk_list();
                // Recorded so that peers can ask this agent which chunks of it it holds.
                fetcher
                    .cache
                    .put_blob(&list)
                    .map_err(|e| fail(format!("seekable copy of layer {layer}: {e}")))?;
                list
            }
            None => ctx
                .parts
                .chunk_list(repo, layer)
                .await
                .map_err(|e| match e {
                    PartError::Fetch(e) => AgentError::from(e),
                    other => fail(other.to_string()),
                })?,
        };
        ctx.pieces.reading(&list);
        // A layer whose chunks are all here (prefetched or pinned) gets its windows now,
        // so that its mount reads without the proxy.
        if index.windows_size > 0 && fetcher.cache.missing_chunks(&list).is_empty() {
            if let Err(e) = ctx
                .indexes
                .fetch_all_windows(&fetcher.proxy, repo, &index)
                .await
            {
                tracing::warn!(%layer, error = %e, "could not store the windows of a cached layer");
            }
        }
        out.lists.push(list);
        out.index_files.push(ctx.indexes.path(layer));
        out.indexes.push(index);
    }
    Ok(out)
}

/// The merged tree of `layers`, from their indexes.
pub fn build_view(indexes: Vec<LayerIndex>) -> Result<ImageView, AgentError> {
    ImageView::build(Arc::new(indexes), ViewLimits::default())
        .map_err(|e| AgentError::Mount(e.to_string()))
}

/// The mount spec of `image`: its layers, labelled with its reference.
pub async fn image_spec(ctx: &MountContext, image: &str) -> Result<MountSpec, AgentError> {
    let (r, record) = resolve(ctx, image).await?;
    Ok(MountSpec {
        label: r.to_string(),
        repo: r.proxy_repo(),
        layers: record.layers,
        manifest: Some(record.manifest_digest),
    })
}

/// `imgctl prefetch --startup`: warms only the files the image's startup trace names.
pub async fn startup_prefetch(ctx: &MountContext, image: &str) -> Result<u64, AgentError> {
    let (r, record) = resolve(ctx, image).await?;
    let layers = fetch_layers(ctx, &r.proxy_repo(), &record.layers).await?;
    let view = build_view(layers.indexes)?;
    let trace = ctx
        .fetcher
        .proxy
        .trace(&record.manifest_digest)
        .await
        .map_err(|e| AgentError::Mount(e.to_string()))?
        .ok_or_else(|| {
            AgentError::Mount(format!(
                "no startup trace recorded for {r} yet: mount it and start a container first"
            ))
        })?;
    Ok(startup::warm(&ctx.fetcher, &view, &layers.lists, &trace).await?)
}

/// [`image::resolve_and_keep`] with the mounts' fetcher.
async fn resolve(
    ctx: &MountContext,
    image: &str,
) -> Result<(image::ImageRef, crate::cache::ImageRecord), AgentError> {
    let (proxy, cache) = (&ctx.fetcher.proxy, &ctx.fetcher.cache);
    Ok(image::resolve_and_keep(proxy, cache, image).await?)
}
