//! What `imgctl status` shows of each mount: the agent's view of it (phase, process)
//! and the counters its process reports.

use super::control::{ControlError, ProcessStatus};
use super::record::MountRecord;
use super::{lock, Mounts, Phase};
use std::path::Path;

/// What `imgctl status` shows of a mount.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MountStatus {
    pub image: String,
    pub dir: String,
    pub total_bytes: u64,
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub eio: u64,
    /// `serving`, `unmounting`, or `unresponsive: REASON`.
    #[serde(default)]
    pub state: String,
    /// The mount process.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Chunks read, spans inflated (ahead of reads, of those), stream reads served from
    /// the on-disk inflated cache (see [`imgd_fuse::spans`]).
    #[serde(default)]
    pub chunk_reads: u64,
    #[serde(default)]
    pub spans_inflated: u64,
    #[serde(default)]
    pub spans_read_ahead: u64,
    #[serde(default)]
    pub disk_reads: u64,
}

impl Mounts {
    /// Status of every mount, as its process reports it.
    pub async fn status(&self) -> Vec<MountStatus> {
        let entries: Vec<_> = lock(&self.state)
            .live
            .values()
            .map(|e| (e.record.clone(), e.control.clone(), e.phase, e.pid))
            .collect();
        let asks = entries
            .into_iter()
            .map(|(record, control, phase, pid)| async move {
                status_of(&record, control.status().await, phase, pid)
            });
        futures::future::join_all(asks).await
    }

    pub(super) async fn status_of(&self, dir: &Path) -> Option<MountStatus> {
        let (record, control, phase, pid) = {
            let st = lock(&self.state);
            let e = st.live.get(dir)?;
            (e.record.clone(), e.control.clone(), e.phase, e.pid)
        };
        Some(status_of(&record, control.status().await, phase, pid))
    }
}

fn status_of(
    record: &MountRecord,
    reported: Result<ProcessStatus, ControlError>,
    phase: Phase,
    pid: Option<u32>,
) -> MountStatus {
    let (state, s) = match (phase, reported) {
        (Phase::Unmounting, r) => ("unmounting".to_string(), r.ok()),
        (Phase::Serving, Ok(s)) => ("serving".to_string(), Some(s)),
        (Phase::Serving, Err(e)) => (format!("unresponsive: {e}"), None),
    };
    let get = |f: fn(&ProcessStatus) -> u64| s.as_ref().map_or(0, f);
    MountStatus {
        image: record.label.clone(),
        dir: record.dir.display().to_string(),
        total_bytes: record.lists.iter().map(|l| l.size).sum(),
        fetched_bytes: get(|s| s.fetched_bytes),
        fetched_chunks: get(|s| s.fetched_chunks),
        reads: get(|s| s.reads),
        bytes_read: get(|s| s.bytes_read),
        eio: get(|s| s.eio),
        state,
        pid,
        chunk_reads: get(|s| s.chunk_reads),
        spans_inflated: get(|s| s.spans_inflated),
        spans_read_ahead: get(|s| s.spans_read_ahead),
        disk_reads: get(|s| s.disk_reads),
    }
}
