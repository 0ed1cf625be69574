//! Layer indexes kept on local disk, so a layer's index crosses the network once per
//! host: the snapshotter's check of a layer and every later mount of it read it here.
//!
//! One file per layer, `DIR/LAYER_HEX`, holding the encoded index as the proxy served it
//! (written to a temp file, synced, renamed). An index is decoded on every read, which
//! checks its trailing sha256, and must name its layer; a file that fails either is
//! removed and fetched again. They are small (a few % of their layer) and not counted
//! against the chunk quota.

use crate::proxy_client::{ProxyClient, ProxyClientError, Repo};
use imgd_core::index::LayerIndex;
use imgd_core::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors getting a layer's index.
#[derive(Debug, thiserror::Error)]
pub enum LayerIndexError {
    #[error("index of layer {layer}: {source}")]
    Proxy {
        layer: Digest,
        #[source]
        source: ProxyClientError,
    },
    #[error("index of layer {layer} is invalid: {message}")]
    Invalid { layer: Digest, message: String },
    #[error("storing the index of layer {layer}: {source}")]
    Store {
        layer: Digest,
        #[source]
        source: std::io::Error,
    },
}

/// The local store of layer indexes.
pub struct LayerIndexes {
    dir: PathBuf,
}

impl LayerIndexes {
    /// Opens (creating) the store in `dir`, removing temp files a crash left.
    pub fn open(dir: &Path) -> std::io::Result<LayerIndexes> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(LayerIndexes {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the index of `layer` is stored (a mount process reads it there).
    pub fn path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(layer.hex())
    }

    /// The stored index of `layer`, if one is stored and sound (blocking).
    pub fn get(&self, layer: &Digest) -> Option<LayerIndex> {
        let path = self.path(layer);
        let bytes = std::fs::read(&path).ok()?;
        match LayerIndex::decode(&bytes) {
            Ok(index) if index.layer == *layer => Some(index),
            other => {
                let why = other
                    .err()
                    .map_or("it names another layer".to_string(), |e| e.to_string());
                tracing::warn!(%layer, reason = %why, "removing a damaged stored layer index");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the encoded index of `layer` atomically (blocking).
    pub fn put(&self, layer: &Digest, encoded: &[u8]) -> std::io::Result<()> {
        let path = self.path(layer);
        let tmp = self.dir.join(format!("{}.tmp", layer.hex()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(encoded)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The index of `layer`: stored, else fetched from the proxy, checked and stored.
    pub async fn get_or_fetch(
        self: &Arc<Self>,
        proxy: &ProxyClient,
        repo: &Repo,
        layer: &Digest,
    ) -> Result<LayerIndex, LayerIndexError> {
        let (me, l) = (self.clone(), *layer);
        if let Ok(Some(index)) = tokio::task::spawn_blocking(move || me.get(&l)).await {
            return Ok(index);
        }
        let bytes = proxy
            .index(repo, layer)
            .await
            .map_err(|source| LayerIndexError::Proxy {
                layer: *layer,
                source,
            })?;
        let invalid = |message: String| LayerIndexError::Invalid {
            layer: *layer,
            message,
        };
        let index = LayerIndex::decode(&bytes).map_err(|e| invalid(e.to_string()))?;
        if index.layer != *layer {
            return Err(invalid(format!("it names layer {}", index.layer)));
        }
        let (me, l) = (self.clone(), *layer);
        tokio::task::spawn_blocking(move || me.put(&l, &bytes))
            .await
            .map_err(|e| LayerIndexError::Store {
                layer: *layer,
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| LayerIndexError::Store {
                layer: *layer,
                source,
            })?;
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_indexes_read_back_and_damaged_ones_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LayerIndexes::open(tmp.path()).unwrap();
        let layer = Digest::of(b"layer");
        let index = LayerIndex {
            layer,
            compression: imgd_core::index::Compression::None,
            compressed_size: 0,
            uncompressed_size: 0,
            random_access: true,
            entries: Vec::new(),
            checkpoints: Vec::new(),
            copy: None,
            toc: None,
        };
        store.put(&layer, &index.encode()).unwrap();
        assert_eq!(store.get(&layer), Some(index.clone()));
        // Stored under another layer's name: refused and removed.
        let other = Digest::of(b"other");
        store.put(&other, &index.encode()).unwrap();
        assert_eq!(store.get(&other), None);
        assert!(!store.path(&other).exists());
        // Flipped bytes: refused and removed.
        let mut bytes = index.encode();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        store.put(&layer, &bytes).unwrap();
        assert_eq!(store.get(&layer), None);
        std::fs::write(tmp.path().join("x.tmp"), b"partial").unwrap();
        LayerIndexes::open(tmp.path()).unwrap();
        assert!(!tmp.path().join("x.tmp").exists());
    }
}
