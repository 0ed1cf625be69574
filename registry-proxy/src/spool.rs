//! The chunk spool of one flight: the blob written chunk by chunk to temp files as it
//! arrives, hashed on the way, each chunk's bytes reserved under the quota before the
//! first of them is written.
//!
//! The files live in the chunk store's temp area (`tmp/chunks/flight-<blob>-<i>`), which
//! is emptied at start: a crash leaves nothing. Readers of the flight open them by path
//! ([`crate::flight`]). At commit each file is renamed into the store under its digest
//! (or dropped if the store has that chunk already); a spool dropped uncommitted deletes
//! its files.

use crate::flight::Flight;
use crate::ingest::IngestError;
use crate::space::{ClaimGuard, Space};
use crate::upstream::UpstreamError;
use imgd_core::{ChunkList, ChunkRef, Digest, PieceHasher, Sha256, CHUNK_SIZE};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// A chunk being written.
struct Open {
    file: File,
    hasher: Sha256,
    len: u64,
}

/// The spool of one flight.
pub struct Spool {
    flight: Arc<Flight>,
    space: Arc<Space>,
    size: Option<u64>,
    received: u64,
    blob: Sha256,
    /// The pieces of the chunks, hashed as they are written.
    pieces: PieceHasher,
    open: Option<Open>,
    /// Finished chunks: temp file and reference.
    done: Vec<(PathBuf, ChunkRef)>,
    committed: bool,
}

impl Spool {
    /// A spool for `flight`, whose upstream announced `size` bytes (if it did).
    pub fn new(flight: Arc<Flight>, space: Arc<Space>, size: Option<u64>) -> Spool {
        Spool {
            flight,
            space,
            size,
            received: 0,
            blob: Sha256::new(),
            pieces: PieceHasher::default(),
            open: None,
            done: Vec::new(),
            committed: false,
        }
    }

    /// Writes `data`, reserving room for each new chunk first, and publishes it as
    /// readable.
    pub fn push(&mut self, claim: &mut ClaimGuard, mut data: &[u8]) -> Result<(), IngestError> {
        let chunk = CHUNK_SIZE as u64;
        while !data.is_empty() {
            if let Some(size) = self.size.filter(|s| self.received >= *s) {
                return Err(UpstreamError::Interrupted(format!(
                    "upstream sent more than the {size} bytes it announced"
                ))
                .into());
            }
            let path = self.flight.chunk_path(self.done.len() as u64);
            if self.open.is_none() {
                let want = self
                    .size
                    .map_or(chunk, |size| (size - self.received).min(chunk));
                self.space.reserve(claim, want)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| store_io("create", &path, e))?;
                self.open = Some(Open {
                    file,
                    hasher: Sha256::new(),
                    len: 0,
                });
            }
            let Some(open) = self.open.as_mut() else {
                continue;
            };
            let mut take = data.len().min((chunk - open.len) as usize);
            if let Some(size) = self.size {
                take = take.min((size - self.received) as usize);
            }
            let piece = &data[..take];
            open.file
                .write_all(piece)
                .map_err(|e| store_io("write", &path, e))?;
            open.hasher.update(piece);
            self.pieces.update(piece);
            self.blob.update(piece);
            open.len += take as u64;
            self.received += take as u64;
            data = &data[take..];
            if open.len == chunk {
                self.finish_chunk()?;
            }
        }
        self.flight.publish_received(self.size, self.received);
        Ok(())
    }

    fn finish_chunk(&mut self) -> Result<(), IngestError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let path = self.flight.chunk_path(self.done.len() as u64);
        open.file
            .sync_all()
            .map_err(|e| store_io("fsync", &path, e))?;
        let c = ChunkRef {
            digest: open.hasher.finish(),
            size: open.len as u32,
        };
        self.pieces.end_chunk();
        self.done.push((path, c));
        self.flight.publish_chunk(c);
        Ok(())
    }

    /// Ends the blob: the chunk list, checked against `digest`.
    pub fn finish(&mut self, digest: Digest) -> Result<ChunkList, IngestError> {
        self.finish_chunk()?;
        let blob = std::mem::replace(&mut self.blob, Sha256::new()).finish();
        if blob != digest {
            return Err(UpstreamError::DigestMismatch {
                expected: digest,
                actual: blob,
            }
            .into());
        }
        Ok(ChunkList {
            blob,
            size: self.received,
            chunks: self.done.iter().map(|(_, c)| *c).collect(),
            pieces: std::mem::take(&mut self.pieces).finish(),
        })
    }

    /// The finished chunk files, for [`Space::commit`]; the spool no longer deletes them.
    pub fn take_files(&mut self) -> Vec<(PathBuf, Digest)> {
        self.committed = true;
        self.done
            .iter()
            .map(|(p, c)| (p.clone(), c.digest))
            .collect()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let open = self
            .open
            .take()
            .map(|_| self.flight.chunk_path(self.done.len() as u64));
        for p in self.done.iter().map(|(p, _)| p.clone()).chain(open) {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn store_io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> IngestError {
    IngestError::Storage(
        imgd_core::store::StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
        .into(),
    )
}
