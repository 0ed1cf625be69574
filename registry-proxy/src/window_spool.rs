//! The windows part of a layer index being built, spooled to disk as the indexer makes
//! it, so that an ingest never holds it in memory (32 KiB a checkpoint on incompressible
//! data: 128 MiB for a 1 GiB layer at the default spacing).
//!
//! The indexer hands each packed window to a [`ChannelWindows`] sink, which sends it to
//! the spool thread; there [`WindowSpool::append`] reserves its bytes under the quota and
//! appends it to a temp file in the index store's temp area (`tmp/indexes`, emptied at
//! start: a crash leaves nothing). At commit, [`WindowSpool::stage_index`] writes the
//! stored index file, the main part then the spooled windows, hashing both on the way
//! (1 MiB at a time), and stages it: synced now, renamed into the store with the blob's
//! other files. The spool file is deleted then, or when the ingest is dropped.

use crate::ingest::IngestError;
use crate::ledger::FileKind;
use crate::space::{ClaimGuard, Space};
use crate::storage::StorageError;
use imgd_core::index::WindowSink;
use imgd_core::store::{ContentStore, Staging, StoreError};
use imgd_core::wire::IndexState;
use imgd_core::Sha256;
use std::io::{Read, Seek, SeekFrom, Write};

/// Bytes copied at a time from the spool into the index file.
const COPY_BUF: usize = 1 << 20;

/// The indexer's window sink: each packed window goes to the spool thread through `send`
/// (which blocks while the channel is full, and fails once the spool thread is gone).
pub struct ChannelWindows<F: FnMut(Vec<u8>) -> bool> {
    pub send: F,
}

impl<F: FnMut(Vec<u8>) -> bool> WindowSink for ChannelWindows<F> {
    fn append(&mut self, packed: &[u8]) -> std::io::Result<()> {
        if (self.send)(packed.to_vec()) {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the ingest's spool stopped",
            ))
        }
    }
}

/// The windows part spooled so far (no file until the first window).
#[derive(Default)]
pub struct WindowSpool {
    file: Option<tempfile::NamedTempFile>,
    len: u64,
}

impl WindowSpool {
    /// Bytes spooled.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before the first window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one packed window to the spool file of `store` (created on first use),
    /// reserving its bytes for `claim` first.
    pub fn append(
        &mut self,
        space: &Space,
        claim: &mut ClaimGuard,
        store: &ContentStore,
        packed: &[u8],
    ) -> Result<(), IngestError> {
        space.reserve(claim, packed.len() as u64)?;
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(store.temp_file()?),
        };
        file.write_all(packed)
            .map_err(|e| io("write", file.path(), e))?;
        self.len += packed.len() as u64;
        Ok(())
    }

    /// Writes and stages the stored index file: `main` (the index's main part), then the
    /// spooled windows, which must be `windows_size` bytes. Returns the index's state
    /// (its digest and size). The spool file is deleted and its reservation given back.
    pub fn stage_index(
        mut self,
        space: &Space,
        claim: &mut ClaimGuard,
        staging: &mut Staging<'_>,
        store: &ContentStore,
        main: &[u8],
        windows_size: u64,
    ) -> Result<IndexState, IngestError> {
        if self.len != windows_size {
            return Err(IngestError::Worker(format!(
                "{} bytes of windows spooled, the index says {windows_size}",
                self.len
            )));
        }
        let mut h = Sha256::new();
        h.update(main);
        let size = main.len() as u64 + self.len;
        let Some(mut spool) = self.file.take() else {
            let digest = h.finish();
            space.stage(claim, staging, FileKind::Index, digest, main)?;
            return Ok(IndexState::Indexed { digest, size });
        };
        // Both files exist until the copy is done: the index file is reserved too.
        space.reserve(claim, size)?;
        let mut out = store.temp_file()?;
        out.write_all(main)
            .map_err(|e| io("write", out.path(), e))?;
        spool
            .seek(SeekFrom::Start(0))
            .map_err(|e| io("seek", spool.path(), e))?;
        let mut buf = vec![0u8; COPY_BUF];
        let mut copied = 0u64;
        loop {
            let n = spool
                .read(&mut buf)
                .map_err(|e| io("read", spool.path(), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| io("write", out.path(), e))?;
            copied += n as u64;
        }
        if copied != self.len {
            return Err(IngestError::Worker(format!(
                "the window spool holds {copied} bytes, {} were written",
                self.len
            )));
        }
        drop(spool);
        space.release(claim, self.len);
        let digest = h.finish();
        space.stage_file(claim, staging, FileKind::Index, digest, out)?;
        Ok(IndexState::Indexed { digest, size })
    }
}

fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> IngestError {
    IngestError::Storage(StorageError::Store(StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }))
}
