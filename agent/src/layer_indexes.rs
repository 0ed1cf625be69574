//! Layer indexes kept on local disk, so a layer's index crosses the network once per
//! host: the snapshotter's check of a layer and every later mount of it read it here.
//!
//! One file per layer, `DIR/LAYER_HEX`, holding the main part of the encoded index as the
//! proxy served it (written to a temp file, synced, renamed). An index is decoded on every
//! read, which checks its trailing sha256 (and its version: an index of an earlier
//! version is refused, removed and fetched again), and must name its layer; a file that
//! fails either is removed and fetched again. They are small (about 1% of their layer)
//! and not counted against the chunk quota.
//!
//! Checkpoint windows are not in the main part: each is fetched when a read first needs
//! it ([`LayerIndexes::window`], a `Range` of the proxy's windows part), checked against
//! its sha256 from the main part, and stored under that digest, `DIR/windows/HEX`; one
//! that fails the check is an error and is not stored.

use crate::proxy_client::{ProxyClient, ProxyClientError, Repo};
use bytes::Bytes;
use imgd_core::index::{LayerIndex, WindowRef};
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
    #[error("window {window} of the index of layer {layer}: {source}")]
    WindowProxy {
        layer: Digest,
        window: Digest,
        #[source]
        source: ProxyClientError,
    },
    #[error("window {window} of the index of layer {layer}: the proxy sent other bytes (not used, not stored)")]
    WindowMismatch { layer: Digest, window: Digest },
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
        std::fs::create_dir_all(dir.join("windows"))?;
        for d in [dir.to_path_buf(), dir.join("windows")] {
            for entry in std::fs::read_dir(d)?.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
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
        write_atomic(&self.path(layer), encoded)
    }

    /// Where a window with sha256 `digest` is stored (a mount process reads it there).
    pub fn window_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join("windows").join(digest.hex())
    }

    /// The stored window `w`, if stored and intact (blocking).
    pub fn stored_window(dir: &Path, w: &WindowRef) -> Option<Vec<u8>> {
        let bytes = std::fs::read(Self::window_path(dir, &w.sha256)).ok()?;
        w.matches(&bytes).then_some(bytes)
    }

    /// Window `w` of the index of `layer`: stored, else fetched from the proxy (a `Range`
    /// of the index's windows part), checked against its sha256 and stored. A window that
    /// fails the check is an error and is not stored.
    pub async fn window(
        self: &Arc<Self>,
        proxy: &ProxyClient,
        repo: &Repo,
        layer: &Digest,
        w: WindowRef,
    ) -> Result<Bytes, LayerIndexError> {
        let dir = self.dir.clone();
        if let Ok(Some(b)) =
            tokio::task::spawn_blocking(move || Self::stored_window(&dir, &w)).await
        {
            return Ok(b.into());
        }
        let bytes = proxy
            .index_windows(repo, layer, w.range())
            .await
            .map_err(|source| LayerIndexError::WindowProxy {
                layer: *layer,
                window: w.sha256,
                source,
            })?;
        if !w.matches(&bytes) {
            tracing::warn!(%layer, window = %w.sha256, "the proxy sent a wrong index window");
            return Err(LayerIndexError::WindowMismatch {
                layer: *layer,
                window: w.sha256,
            });
        }
        self.store_window(layer, &w, bytes.clone()).await;
        Ok(bytes)
    }

    /// Stores window `w` (of `layer`), whose bytes the caller checked against it. Not
    /// fatal if it fails: the window is verified and used, and fetched again next time.
    pub async fn store_window(&self, layer: &Digest, w: &WindowRef, bytes: Bytes) {
        let path = Self::window_path(&self.dir, &w.sha256);
        let put = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes)).await;
        if let Err(e) = put
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
        {
            tracing::warn!(%layer, error = %e, "could not store an index window");
        }
    }

    /// The store's directory (windows are under `windows/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores every window of `index` (of `layer`) that is not stored yet, fetched from
    /// the proxy in one request of the whole windows part and each checked against its
    /// sha256; for a layer whose chunks are all cached, so that its mount reads with the
    /// proxy down. Returns the bytes fetched (0 if all were stored).
    pub async fn fetch_all_windows(
        self: &Arc<Self>,
        proxy: &ProxyClient,
        repo: &Repo,
        index: &LayerIndex,
    ) -> Result<u64, LayerIndexError> {
        let layer = index.layer;
        let refs: Vec<WindowRef> = index.checkpoints.iter().filter_map(|c| c.window).collect();
        let dir = self.dir.clone();
        let wanted = refs.clone();
        let missing = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .filter(|w| Self::stored_window(&dir, w).is_none())
                .count()
        })
        .await
        .unwrap_or(refs.len());
        if missing == 0 || index.windows_size == 0 {
            return Ok(0);
        }
        let part = proxy
            .index_windows(repo, &layer, 0..index.windows_size)
            .await
            .map_err(|source| LayerIndexError::WindowProxy {
                layer,
                window: refs.first().map(|w| w.sha256).unwrap_or(layer),
                source,
            })?;
        let fetched = part.len() as u64;
        let dir = self.dir.clone();
        let stored = tokio::task::spawn_blocking(move || {
            for w in &refs {
                let r = w.range();
                let bytes = usize::try_from(r.start)
                    .ok()
                    .zip(usize::try_from(r.end).ok())
                    .and_then(|(a, b)| part.get(a..b));
                match bytes {
                    Some(b) if w.matches(b) => {
                        write_atomic(&Self::window_path(&dir, &w.sha256), b)?;
                    }
                    _ => return Ok(Err(w.sha256)),
                }
            }
            Ok(Ok(()))
        })
        .await
        .map_err(|e| LayerIndexError::Store {
            layer,
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|source| LayerIndexError::Store { layer, source })?;
        if let Err(window) = stored {
            tracing::warn!(%layer, %window, "the proxy sent a wrong index window");
            return Err(LayerIndexError::WindowMismatch { layer, window });
        }
        Ok(fetched)
    }

    /// The stored index of `layer`, if sound ([`LayerIndexes::get`] off the runtime).
    pub async fn stored(self: &Arc<Self>, layer: &Digest) -> Option<LayerIndex> {
        let (me, l) = (self.clone(), *layer);
        tokio::task::spawn_blocking(move || me.get(&l))
            .await
            .ok()
            .flatten()
    }

    /// The main part of the index of `layer`, from the proxy (not checked yet).
    pub async fn main_from_proxy(
        proxy: &ProxyClient,
        repo: &Repo,
        layer: &Digest,
    ) -> Result<Bytes, LayerIndexError> {
        proxy
            .index(repo, layer)
            .await
            .map_err(|source| LayerIndexError::Proxy {
                layer: *layer,
                source,
            })
    }

    /// Decodes the main part `bytes` of the index of `layer` (which checks its trailer),
    /// checks that it names the layer, and stores it.
    pub async fn keep_main(
        self: &Arc<Self>,
        layer: &Digest,
        bytes: Bytes,
    ) -> Result<LayerIndex, LayerIndexError> {
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

    /// The stored main part of the index of `layer`, if its sha256 is `sha256` (blocking;
    /// for a peer, which checks it again).
    pub fn stored_main(&self, layer: &Digest, sha256: &Digest) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(layer)).ok()?;
        (LayerIndex::main_part_digest(&bytes).as_ref() == Some(sha256)).then_some(bytes)
    }
}

/// Writes `bytes` to `path` through a synced temp file (of its own, so that two writers
/// of one file do not share one) and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{n}.tmp"));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
            windows_size: 0,
            windows: None,
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
