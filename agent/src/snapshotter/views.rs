//! Lazy views: one imgd mount per placeholder chain, shared by every snapshot on it.
//!
//! A chain's view lives at `ROOT/views/HEX`, HEX naming the chain's top placeholder, and
//! is mounted the first time a snapshot on the chain needs it (or again after a reboot).
//! It is unmounted when its top placeholder is removed, which containerd does only once
//! no snapshot is on it; the mount's layers are protected from eviction while mounted.

use super::error::SnapshotError;
use super::records::RemoteLayer;
use crate::agent::Agent;
use crate::mounts::MountSpec;
use crate::proxy_client::Repo;
use imgd_core::Digest;
use std::path::{Path, PathBuf};

/// The lazily mounted views of one snapshotter.
pub struct Views {
    root: PathBuf,
    /// Serialises mounting, so two containers starting at once mount a view once.
    mounting: tokio::sync::Mutex<()>,
}

impl Views {
    pub fn new(root: &Path) -> Views {
        Views {
            root: root.join("views"),
            mounting: tokio::sync::Mutex::new(()),
        }
    }

    /// Where the view of the chain topped by `top` is mounted.
    pub fn dir(&self, top: &str) -> PathBuf {
        self.root.join(Digest::of(top.as_bytes()).hex())
    }

    /// The view of the chain `layers` (bottom first) topped by `top`, mounted if needed.
    pub async fn ensure(
        &self,
        agent: &Agent,
        top: &str,
        layers: &[RemoteLayer],
    ) -> Result<PathBuf, SnapshotError> {
        let dir = self.dir(top);
        let _guard = self.mounting.lock().await;
        if agent.mounts.is_mounted(&dir) {
            return Ok(dir);
        }
        let Some(top_layer) = layers.last() else {
            return Err(SnapshotError::View(format!("chain {top} has no layers")));
        };
        let d = dir.clone();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(&d))
            .await
            .map_err(|e| SnapshotError::View(e.to_string()))?
            .map_err(SnapshotError::io(format!("creating {}", dir.display())))?;
        let spec = MountSpec {
            label: top_layer.image.clone(),
            repo: Repo {
                name: top_layer.repo.clone(),
                ns: top_layer.ns.clone(),
            },
            layers: layers.iter().map(|l| l.layer).collect(),
            manifest: None,
        };
        agent
            .mounts
            .mount_layers(spec, &dir)
            .await
            .map_err(|e| SnapshotError::View(format!("mounting the view of {top}: {e}")))?;
        tracing::info!(chain = top, image = %top_layer.image, layers = layers.len(), dir = %dir.display(), "lazy view mounted");
        Ok(dir)
    }

    /// Unmounts the view of the chain topped by `top`, if it is mounted.
    pub async fn release(&self, agent: &Agent, top: &str) -> Result<(), SnapshotError> {
        let dir = self.dir(top);
        let _guard = self.mounting.lock().await;
        if agent.mounts.is_mounted(&dir) {
            agent
                .mounts
                .umount(&dir)
                .await
                .map_err(|e| SnapshotError::View(format!("unmounting the view of {top}: {e}")))?;
            tracing::info!(chain = top, dir = %dir.display(), "lazy view unmounted");
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// Every view directory present (mounted or not).
    pub fn present(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    }
}
