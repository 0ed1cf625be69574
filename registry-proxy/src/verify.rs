//! A full verification pass over the proxy's storage: every stored blob is re-hashed
//! from its chunks (each chunk against its own digest too), every chunk list and layer
//! index is checked, every manifest against its digest, and every chunk file on disk.
//!
//! Served as `GET /imgd/v1/verify` and run by `imgd-proxy verify --storage-dir DIR`.

use crate::storage::{BlobIndexes, Blobs, Manifests, Storage, StorageError};
use imgd_core::index::LayerIndex;
use imgd_core::store::StoreError;
use imgd_core::wire::IndexState;
use imgd_core::{Digest, Sha256};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// What a verification pass found. `problems` is empty when storage is sound.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Blobs whose chunk list is stored.
    pub blobs: u64,
    /// Chunk files on disk.
    pub chunk_files: u64,
    /// Chunk files no stored blob refers to (left by an ingest cut short between
    /// committing chunks and recording the blob; harmless, content-addressed).
    pub unreferenced_chunks: u64,
    /// Layer indexes recorded.
    pub indexes: u64,
    /// Manifests stored.
    pub manifests: u64,
    /// Files staged by ingests in progress (removed at start if left by a crash).
    pub staged_files: u64,
    /// Layers refused by the index rules and remembered (the negative cache), with the
    /// reason and until when (expired ones go at their next request).
    pub refused_layers: Vec<crate::refusals::RefusedLayer>,
    /// Every inconsistency found, one line each.
    pub problems: Vec<String>,
}

/// Runs the pass (blocking: reads every stored byte).
pub fn verify(storage: &Storage) -> Result<VerifyReport, StorageError> {
    let mut report = VerifyReport::default();
    let mut referenced = HashSet::new();
    for (digest, list) in storage.meta.scan::<Blobs>()? {
        report.blobs += 1;
        referenced.extend(list.chunks.iter().map(|c| c.digest));
        if let Some(p) = check_blob(storage, &digest, &list) {
            report.problems.push(p);
        }
        match storage.meta.get::<BlobIndexes>(&digest)? {
            None => report
                .problems
                .push(format!("blob {digest}: no index state recorded")),
            Some(IndexState::Unavailable { .. }) => {}
            Some(IndexState::Indexed { digest: idx, size }) => {
                report.indexes += 1;
                if let Some(p) = check_index(storage, &digest, &idx, size) {
                    report.problems.push(p);
                }
            }
        }
    }
    for (digest, _) in storage.meta.scan::<BlobIndexes>()? {
        if storage.blob(&digest)?.is_none() {
            report
                .problems
                .push(format!("index state of {digest} without its chunk list"));
        }
    }
    for chunk in storage.chunks.list()? {
        report.chunk_files += 1;
        if referenced.contains(&chunk) {
            continue; // re-hashed with its blob
        }
        report.unreferenced_chunks += 1;
        if let Err(e) = storage.chunks.read_verified(&chunk) {
            report.problems.push(format!("chunk {chunk}: {e}"));
        }
    }
    for (digest, m) in storage.meta.scan::<Manifests>()? {
        report.manifests += 1;
        if Digest::of(&m.bytes) != digest {
            report
                .problems
                .push(format!("manifest {digest}: stored bytes do not match"));
        }
    }
    report.staged_files = count_files(&storage.dir.join("tmp"));
    report.refused_layers = crate::refusals::list(storage)?;
    for r in &report.refused_layers {
        if storage.blob(&r.digest)?.is_some() {
            report
                .problems
                .push(format!("refused layer {} is stored", r.digest));
        }
    }
    Ok(report)
}

/// Re-hashes a blob from its chunks; `None` if sound.
fn check_blob(storage: &Storage, digest: &Digest, list: &imgd_core::ChunkList) -> Option<String> {
    if list.blob != *digest {
        return Some(format!("blob {digest}: chunk list names {}", list.blob));
    }
    if let Err(e) = list.validate() {
        return Some(format!("blob {digest}: chunk list invalid: {e}"));
    }
    let mut whole = Sha256::new();
    for c in &list.chunks {
        match storage.chunks.read_verified(&c.digest) {
            Ok(bytes) if bytes.len() == c.size as usize => whole.update(&bytes),
            Ok(bytes) => {
                return Some(format!(
                    "blob {digest}: chunk {} has {} bytes, list says {}",
                    c.digest,
                    bytes.len(),
                    c.size
                ))
            }
            Err(StoreError::Missing(d)) => {
                return Some(format!("blob {digest}: chunk {d} missing"))
            }
            Err(e) => return Some(format!("blob {digest}: {e}")),
        }
    }
    let actual = whole.finish();
    (actual != *digest).then(|| format!("blob {digest}: chunks hash to {actual}"))
}

/// Checks a layer index file: present, its digest, size and encoding; `None` if sound.
fn check_index(storage: &Storage, blob: &Digest, idx: &Digest, size: u64) -> Option<String> {
    let bytes = match storage.indexes.read_verified(idx) {
        Ok(b) => b,
        Err(e) => return Some(format!("index of {blob}: {e}")),
    };
    if bytes.len() as u64 != size {
        return Some(format!(
            "index of {blob}: {} bytes, recorded {size}",
            bytes.len()
        ));
    }
    LayerIndex::decode(&bytes)
        .err()
        .map(|e| format!("index of {blob}: does not decode: {e}"))
}

fn count_files(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}
