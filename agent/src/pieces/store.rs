//! Where partial chunks live on disk, under the chunk cache's directory:
//!
//! - `pieces/ab/<hex>`: one verified piece, content-addressed by its sha256, written
//!   through a temp file and renamed ([`ContentStore`]), so a piece file exists only once
//!   its bytes were checked; temp files a crash left are removed at open. Not fsynced: a
//!   read waits for its pieces to be stored, and two fsyncs a 64 KiB piece (about 8 ms
//!   here) would be most of a lazy read's time. Every use checks a piece file against its
//!   digest again (the mount process, [`PieceStore::get`], a restart), so a file that a
//!   power loss left short or empty is dropped and fetched again, never used;
//! - `partial/<chunk hex>`: a [`PartialMark`] (JSON, same atomic write) naming the blob,
//!   position, size and piece digests of a chunk that has pieces but is not complete, so
//!   that a restarted agent knows its partial chunks, checks their pieces again and
//!   completes them.
//!
//! The mount process reads piece files directly ([`piece_path`]) and checks each one's
//! digest, as it does for chunk files.

use bytes::Bytes;
use imgd_core::store::{ContentStore, StoreError};
use imgd_core::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a restarted agent needs to know of a partial chunk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartialMark {
    pub blob: Digest,
    pub index: usize,
    pub size: u32,
    pub pieces: Vec<Digest>,
}

/// Where the piece with `digest` lives under the cache directory `cache_dir`.
pub fn piece_path(cache_dir: &Path, digest: &Digest) -> PathBuf {
    ContentStore::path_in(cache_dir, "pieces", digest)
}

/// Reads a piece file and checks it hashes to `digest` (`None`: absent or damaged).
pub fn read_piece(path: &Path, digest: &Digest) -> Option<Bytes> {
    let bytes = std::fs::read(path).ok()?;
    (Digest::of(&bytes) == *digest).then(|| Bytes::from(bytes))
}

/// The piece files and partial-chunk marks.
pub struct PieceStore {
    dir: PathBuf,
    files: ContentStore,
    marks: PathBuf,
}

impl PieceStore {
    /// Opens (creating) the store under the cache directory `cache_dir`.
    pub fn open(cache_dir: &Path) -> Result<PieceStore, StoreError> {
        let files = ContentStore::open(cache_dir, "pieces")?;
        let marks = cache_dir.join("partial");
        std::fs::create_dir_all(&marks).map_err(|source| StoreError::Io {
            op: "create",
            path: marks.clone(),
            source,
        })?;
        for entry in std::fs::read_dir(&marks).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(PieceStore {
            dir: cache_dir.to_path_buf(),
            files,
            marks,
        })
    }

    /// The piece, if stored and intact; a damaged piece file is removed.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let path = piece_path(&self.dir, digest);
        if !path.is_file() {
            return None;
        }
        let got = read_piece(&path, digest);
        if got.is_none() {
            crate::metrics::verification_failed("cache");
            tracing::warn!(%digest, "removing a damaged piece file");
            let _ = self.files.remove(digest);
        }
        got
    }

    /// Stores a piece whose bytes the caller checked against `digest` (temp file and
    /// rename, no fsync: see the module's doc).
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if self.files.contains(digest) {
            return Ok(());
        }
        let dest = self.files.path(digest);
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let mut tmp = self.files.temp_file()?;
        let tmp_path = tmp.path().to_path_buf();
        tmp.write_all(bytes).map_err(io("write", &tmp_path))?;
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        tmp.persist(&dest)
            .map_err(|e| io("rename into", &dest)(e.error))?;
        Ok(())
    }

    /// Removes a piece file (absent is fine).
    pub fn remove(&self, digest: &Digest) {
        if let Err(e) = self.files.remove(digest) {
            tracing::warn!(%digest, error = %e, "could not remove a piece file");
        }
    }

    fn mark_path(&self, chunk: &Digest) -> PathBuf {
        self.marks.join(chunk.hex())
    }

    /// Records `chunk` as partial (atomically; idempotent, and safe to call concurrently).
    pub fn mark(&self, chunk: &Digest, mark: &PartialMark) -> std::io::Result<()> {
        let path = self.mark_path(chunk);
        if path.is_file() {
            return Ok(());
        }
        // A temp file of its own: a read and a fetch for a peer may mark one chunk at once.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.marks.join(format!("{}.{n}.tmp", chunk.hex()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(mark).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.marks)?.sync_all()
    }

    /// Forgets that `chunk` is partial.
    pub fn unmark(&self, chunk: &Digest) {
        let _ = std::fs::remove_file(self.mark_path(chunk));
    }

    /// Every partial chunk recorded; unreadable marks are removed.
    pub fn marks(&self) -> Vec<(Digest, PartialMark)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.marks)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let chunk = format!("sha256:{name}").parse::<Digest>().ok();
            let mark = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<PartialMark>(&b).ok());
            match (chunk, mark) {
                (Some(c), Some(m)) => out.push((c, m)),
                _ => {
                    tracing::warn!(file = %entry.path().display(), "removing an unreadable partial-chunk mark");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        out
    }
}
