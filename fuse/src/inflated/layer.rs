//! One layer's inflated stream on disk, as a mount process uses it: the sparse `stream`
//! file, the `spans` log of what it holds, and the shared lease that keeps the agent
//! from evicting it while this process lives.

use super::extents::{self, Extents, RECORD_LEN};
use super::layout::{layer_dir, LEASE, SPANS, STREAM};
use imgd_core::Digest;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;

/// Attempts at taking a lease on a layer that is being evicted at the same moment.
const LEASE_ATTEMPTS: usize = 8;

/// Why an inflated layer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayerFileError {
    #[error("inflated layer {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("inflated layer {dir} holds {found} bytes, its index says {expected}")]
    Size {
        dir: String,
        found: u64,
        expected: u64,
    },
    #[error("inflated layer {dir}: evicted again and again while being opened")]
    Contended { dir: String },
}

/// What the log says is present, and how far it was read.
struct Log {
    file: File,
    read_to: u64,
    present: Extents,
}

impl Log {
    /// Reads the records appended since the last read (by this or another process).
    /// Records are aligned on [`RECORD_LEN`]; torn or zeroed ones are skipped.
    fn refresh(&mut self) -> std::io::Result<()> {
        let len = self.file.metadata()?.len();
        let aligned = len - len % RECORD_LEN as u64;
        if aligned <= self.read_to {
            return Ok(());
        }
        let mut buf = vec![0u8; (aligned - self.read_to) as usize];
        self.file.read_exact_at(&mut buf, self.read_to)?;
        for rec in buf.chunks_exact(RECORD_LEN) {
            if let Some(r) = extents::decode(rec) {
                self.present.insert(r);
            }
        }
        self.read_to = aligned;
        Ok(())
    }

    /// Appends the record of `r` in one `write` (the file is `O_APPEND`, so records of
    /// processes appending at once do not interleave), first padding a torn tail left by
    /// a power loss back to a record boundary. Holds the file's `flock` meanwhile.
    fn append(&mut self, r: &Range<u64>) -> std::io::Result<()> {
        self.file.lock()?;
        let result = (|| {
            let len = self.file.metadata()?.len();
            let torn = (len % RECORD_LEN as u64) as usize;
            if torn != 0 {
                (&self.file).write_all(&[0u8; RECORD_LEN][torn..])?;
            }
            (&self.file).write_all(&extents::encode(r))
        })();
        let _ = self.file.unlock();
        result
    }
}

/// A layer's inflated stream, opened and leased by this process.
pub struct LayerFile {
    dir: String,
    size: u64,
    stream: File,
    log: Mutex<Log>,
    /// Fault injection for crash tests: a pause in the middle of writing a span.
    write_pause: Option<std::time::Duration>,
    /// Held with a shared `flock` for as long as this value lives.
    _lease: File,
}

impl LayerFile {
    /// Opens (creating) the inflated stream of `layer`, `size` bytes long, under `root`,
    /// and takes its lease.
    pub fn open(root: &Path, layer: &Digest, size: u64) -> Result<LayerFile, LayerFileError> {
        let dir = layer_dir(root, layer);
        let name = dir.display().to_string();
        let io = |source| LayerFileError::Io {
            dir: name.clone(),
            source,
        };
        let lease = Self::lease(&dir)
            .map_err(io)?
            .ok_or(LayerFileError::Contended { dir: name.clone() })?;
        let _ = lease.set_modified(std::time::SystemTime::now());
        let stream = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(STREAM))
            .map_err(io)?;
        let found = stream.metadata().map_err(io)?.len();
        if found == 0 && size > 0 {
            stream.set_len(size).map_err(io)?;
        } else if found != size {
            return Err(LayerFileError::Size {
                dir: name,
                found,
                expected: size,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(dir.join(SPANS))
            .map_err(io)?;
        let mut log = Log {
            file,
            read_to: 0,
            present: Extents::default(),
        };
        log.refresh().map_err(io)?;
        Ok(LayerFile {
            dir: name,
            size,
            stream,
            log: Mutex::new(log),
            write_pause: None,
            _lease: lease,
        })
    }

    /// Pauses for `pause` halfway through writing each span (so a test can kill the
    /// process while a span is half written).
    pub fn with_write_pause(mut self, pause: Option<std::time::Duration>) -> LayerFile {
        self.write_pause = pause;
        self
    }

    /// The lease file of `dir`, locked shared, once it is the one at its path (an
    /// eviction renames the directory away while it holds the lock exclusively).
    fn lease(dir: &Path) -> std::io::Result<Option<File>> {
        for _ in 0..LEASE_ATTEMPTS {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(LEASE);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            f.lock_shared()?;
            match std::fs::metadata(&path) {
                Ok(m) if m.ino() == f.metadata()?.ino() => return Ok(Some(f)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if all of `r` is present (reading the log again if it is not known to be:
    /// another process may have added it).
    pub fn present(&self, r: &Range<u64>) -> bool {
        let mut log = self.log();
        if log.present.contains(r) {
            return true;
        }
        if let Err(e) = log.refresh() {
            tracing::warn!(dir = %self.dir, error = %e, "reading the span log");
        }
        log.present.contains(r)
    }

    /// Bytes present.
    pub fn present_bytes(&self) -> u64 {
        self.log().present.bytes()
    }

    /// The `len` bytes at `at` (which the caller found present).
    pub fn read_at(&self, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.stream.read_exact_at(&mut buf, at)?;
        Ok(buf)
    }

    /// Stores `bytes` at `at` and marks them present: the bytes are written and synced
    /// (`fdatasync`) before their record is appended, so no record names bytes that a
    /// crash, even a power loss, could have left unwritten.
    pub fn commit(&self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        let r = at..at + bytes.len() as u64;
        if r.end > self.size {
            return Err(std::io::Error::other(format!(
                "span {r:?} past the stream's end ({})",
                self.size
            )));
        }
        match self.write_pause {
            None => self.stream.write_all_at(bytes, at)?,
            Some(pause) => {
                let half = bytes.len() / 2;
                self.stream.write_all_at(&bytes[..half], at)?;
                std::thread::sleep(pause);
                self.stream.write_all_at(&bytes[half..], at + half as u64)?;
            }
        }
        self.stream.sync_data()?;
        let mut log = self.log();
        log.append(&r)?;
        log.present.insert(r);
        Ok(())
    }
}
