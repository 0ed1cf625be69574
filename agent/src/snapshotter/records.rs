//! What the snapshotter stores of each snapshot: one RocksDB row per snapshot name, in the
//! agent's metadata database (column family `snapshots`).

use imgd_core::store::Table;
use imgd_core::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// containerd's snapshot kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, made by `View`.
    View,
    /// Writable, made by `Prepare`; becomes committed by `Commit`.
    Active,
    /// Immutable; a parent for others.
    Committed,
}

/// A layer containerd did not download: the snapshot is a committed placeholder, and its
/// contents are read lazily through an imgd view of its chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The layer blob's digest.
    pub layer: Digest,
    /// The repository the proxy routes the layer's blob by.
    pub repo: String,
    /// containerd's `ns` (the registry host) for the proxy, when the image is not named
    /// by the proxy's own address.
    pub ns: Option<String>,
    /// The image reference the labels named (for logs and the view's name).
    pub image: String,
}

/// Disk use of a snapshot's own directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Names its directory `snapshots/ID` (stable across Commit, which renames).
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Unix nanoseconds.
    pub created_ns: i64,
    pub updated_ns: i64,
    /// Set for lazily served layers (always committed).
    pub remote: Option<RemoteLayer>,
    /// Measured at commit (committed snapshots only).
    pub usage: Usage,
}

/// Snapshots, by the name containerd gave them (its key, or the committed name).
pub struct Snapshots;
impl Table for Snapshots {
    const NAME: &'static str = crate::cache::tables::SNAPSHOTS;
    type Key = String;
    type Value = SnapshotRecord;
}

/// Unix time in nanoseconds (0 before 1970).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
