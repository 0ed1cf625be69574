//! Content-addressed files: `ROOT/<kind>/<hex[0..2]>/<hex>`, written atomically.
//!
//! A file enters the store only through [`Staging`]: bytes go to a temp file under
//! `ROOT/tmp`, are fsynced, and on [`Staging::commit`] renamed into place (an idempotent
//! rename: a file already present under its digest is left as is), then the directory is
//! fsynced. A staging area dropped without commit deletes its temp files, so a failed
//! fetch leaves nothing behind. Temp files left by a crash are removed at open.

use crate::digest::Digest;
use bytes::Bytes;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stored content {path} does not match its digest {digest}")]
    Corrupt { digest: Digest, path: PathBuf },
    #[error("{0} is not in the store")]
    Missing(Digest),
}

impl StoreError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the underlying error is "no space left on device".
    pub fn is_disk_full(&self) -> bool {
        // Errors wrapped with their path (tempfile's) keep only the kind.
        matches!(self, StoreError::Io { source, .. }
            if source.raw_os_error() == Some(28) || source.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// `dir/<hex[0..2]>/<hex>`.
fn shard_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join(&hex[..2]).join(hex)
}

/// A directory of content-addressed files of one kind (e.g. chunks or indexes).
#[derive(Clone, Debug)]
pub struct ContentStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl ContentStore {
    /// Opens (creating if needed) the store `kind` under `root`, and removes temp files a
    /// crash may have left.
    pub fn open(root: &Path, kind: &str) -> Result<ContentStore, StoreError> {
        let dir = root.join(kind);
        let tmp = root.join("tmp").join(kind);
        fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(StoreError::io("clean", &tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(StoreError::io("create", &tmp))?;
        Ok(ContentStore { root: dir, tmp })
    }

    /// Files staged in the temp directory of store `kind` under `root`: what a crash left
    /// there, that [`ContentStore::open`] removes. 0 if there is no such directory.
    pub fn staged_files(root: &Path, kind: &str) -> u64 {
        let tmp = root.join("tmp").join(kind);
        fs::read_dir(tmp).map_or(0, |rd| rd.flatten().count() as u64)
    }

    /// Where the content with `digest` lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        shard_path(&self.root, digest)
    }

    /// Where the content with `digest` lives in the store `kind` under `root`, for a
    /// reader that does not open the store (opening it cleans its temp files).
    pub fn path_in(root: &Path, kind: &str, digest: &Digest) -> PathBuf {
        shard_path(&root.join(kind), digest)
    }

    /// True if content with `digest` is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of the stored content, if present.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Reads the content without verifying it.
    pub fn read(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        let path = self.path(digest);
        match fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::Missing(*digest)),
            Err(e) => Err(StoreError::io("read", &path)(e)),
        }
    }

    /// Reads the content and checks it still hashes to `digest`.
    pub fn read_verified(&self, digest: &Digest) -> Result<Bytes, StoreError> {
        let bytes = self.read(digest)?;
        if Digest::of(&bytes) != *digest {
            return Err(StoreError::Corrupt {
                digest: *digest,
                path: self.path(digest),
            });
        }
        Ok(bytes)
    }

    /// Removes the content (absent content is not an error).
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io("remove", &path)(e))
            }
            _ => Ok(()),
        }
    }

    /// Every digest present, by walking the directory (for verification and GC).
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for shard in fs::read_dir(&self.root).map_err(StoreError::io("list", &self.root))? {
            let shard = shard.map_err(StoreError::io("list", &self.root))?.path();
            for f in fs::read_dir(&shard).map_err(StoreError::io("list", &shard))? {
                let f = f.map_err(StoreError::io("list", &shard))?;
                if let Some(d) = f
                    .file_name()
                    .to_str()
                    .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
                {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// A new empty temp file in the store's temp area, for content written piece by piece
    /// before it is staged with [`Staging::add_file`] (or scratch data that never is).
    /// Deleted when dropped; a crash leaves it to [`ContentStore::open`], which removes it.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, StoreError> {
        tempfile::NamedTempFile::new_in(&self.tmp)
            .map_err(StoreError::io("create temp in", &self.tmp))
    }

    /// Starts a staging area for new content.
    pub fn staging(&self) -> Staging<'_> {
        Staging {
            store: self,
            staged: Vec::new(),
        }
    }

    /// Stores one piece of content at once (staged and committed).
    pub fn put(&self, digest: Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut s = self.staging();
        s.add(digest, bytes)?;
        s.commit()
    }
}

/// Content written but not yet visible in the store. Dropping it discards the content.
pub struct Staging<'a> {
    store: &'a ContentStore,
    staged: Vec<(Digest, tempfile::TempPath)>,
}

impl Staging<'_> {
    /// Writes `bytes`, which the caller has hashed to `digest`, to a synced temp file.
    /// Content already in the store is skipped.
    pub fn add(&mut self, digest: Digest, bytes: &[u8]) -> Result<(), StoreError> {
        self.add_parts(digest, &[bytes])
    }

    /// [`Staging::add`] of the concatenation of `parts`, without concatenating them in
    /// memory.
    pub fn add_parts(&mut self, digest: Digest, parts: &[&[u8]]) -> Result<(), StoreError> {
        if self.store.contains(&digest) || self.staged.iter().any(|(d, _)| *d == digest) {
            return Ok(());
        }
        let tmp_dir = &self.store.tmp;
        let mut file = tempfile::NamedTempFile::new_in(tmp_dir)
            .map_err(StoreError::io("create temp in", tmp_dir))?;
        let path = file.path().to_path_buf();
        for part in parts {
            file.write_all(part)
                .map_err(StoreError::io("write", &path))?;
        }
        file.as_file()
            .sync_all()
            .map_err(StoreError::io("fsync", &path))?;
        self.staged.push((digest, file.into_temp_path()));
        Ok(())
    }

    /// Stages `file`, a [`ContentStore::temp_file`] of this store that the caller wrote
    /// and hashed to `digest`: it is synced now and renamed into place at commit (over
    /// any copy already there, which has the same bytes).
    pub fn add_file(
        &mut self,
        digest: Digest,
        file: tempfile::NamedTempFile,
    ) -> Result<(), StoreError> {
        if self.staged.iter().any(|(d, _)| *d == digest) {
            return Ok(());
        }
        let path = file.path().to_path_buf();
        if path.parent() != Some(self.store.tmp.as_path()) {
            return Err(StoreError::io("stage", &path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a temp file of this store",
            )));
        }
        file.as_file()
            .sync_all()
            .map_err(StoreError::io("fsync", &path))?;
        self.staged.push((digest, file.into_temp_path()));
        Ok(())
    }

    /// Number of pieces staged (not counting ones already present).
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// True when nothing new is staged.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Renames every staged file into place and fsyncs the directories touched.
    pub fn commit(self) -> Result<(), StoreError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (digest, tmp) in self.staged {
            let dest = self.store.path(&digest);
            let Some(dir) = dest.parent().map(Path::to_path_buf) else {
                continue;
            };
            fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
            tmp.persist(&dest)
                .map_err(|e| StoreError::io("rename into", &dest)(e.error))?;
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for dir in dirs {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(StoreError::io("fsync", &dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_content_is_invisible_until_commit_and_gone_if_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), "chunks").unwrap();
        let (a, b) = (b"alpha".as_slice(), b"beta".as_slice());
        let (da, db) = (Digest::of(a), Digest::of(b));
        {
            let mut s = store.staging();
            s.add(da, a).unwrap();
            assert!(!store.contains(&da));
        }
        assert!(!store.contains(&da));
        assert_eq!(
            fs::read_dir(dir.path().join("tmp/chunks")).unwrap().count(),
            0
        );

        let mut s = store.staging();
        s.add(da, a).unwrap();
        s.add(db, b).unwrap();
        s.commit().unwrap();
        assert_eq!(store.read_verified(&da).unwrap(), a);
        assert_eq!(store.list().unwrap().len(), 2);
        // Idempotent: re-adding present content stages nothing.
        let mut s = store.staging();
        s.add(da, a).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn a_file_written_in_the_temp_area_is_staged_and_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), "indexes").unwrap();
        let (head, tail) = (b"main part ".as_slice(), b"windows".as_slice());
        let d = Digest::of(b"main part windows");
        let tmp_files = || {
            fs::read_dir(dir.path().join("tmp/indexes"))
                .unwrap()
                .count()
        };
        {
            let mut f = store.temp_file().unwrap();
            f.write_all(head).unwrap();
            f.write_all(tail).unwrap();
            let mut s = store.staging();
            s.add_file(d, f).unwrap();
            assert_eq!(tmp_files(), 1);
            assert!(!store.contains(&d), "invisible until commit");
        }
        assert_eq!(tmp_files(), 0, "a dropped staging deletes the file");
        let mut f = store.temp_file().unwrap();
        f.write_all(b"main part windows").unwrap();
        let mut s = store.staging();
        s.add_file(d, f).unwrap();
        s.commit().unwrap();
        assert_eq!(store.read_verified(&d).unwrap(), &b"main part windows"[..]);
        assert_eq!(tmp_files(), 0);
        // A file from elsewhere is refused.
        let other = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        assert!(store.staging().add_file(d, other).is_err());
    }

    #[test]
    fn corruption_is_detected_and_missing_is_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), "chunks").unwrap();
        let d = Digest::of(b"x");
        assert!(matches!(store.read(&d), Err(StoreError::Missing(_))));
        store.put(d, b"x").unwrap();
        fs::write(store.path(&d), b"y").unwrap();
        assert!(matches!(
            store.read_verified(&d),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
