//! The storage ledger: what each stored file costs, who refers to it, and which blob to
//! evict next. Pure bookkeeping, no I/O: [`crate::space::Space`] keeps the files in
//! step with it under one lock.
//!
//! Use is counted in bytes of chunk and index files. A chunk shared by several blobs is
//! counted once and its file is deleted only when the last blob using it goes. Bytes
//! staged by ingests in flight are counted as well, from the moment they are reserved,
//! so the files on disk never outgrow the quota.

use imgd_core::Digest;
use std::collections::{HashMap, HashSet};

/// A content file (chunk or index) and the number of blobs (and claims) using it.
#[derive(Clone, Copy, Debug)]
struct FileUse {
    size: u64,
    refs: u32,
}

/// A stored blob as the ledger sees it.
#[derive(Clone, Debug)]
struct BlobUse {
    chunks: Vec<Digest>,
    index: Option<Digest>,
    /// Milliseconds since the Unix epoch of the last request for it.
    last_used: u64,
    /// Responses being served from it right now.
    leases: u32,
}

/// What one ingest holds while in flight: bytes staged for it, and stored files it reuses
/// (each holding a reference, so they are not deleted under it).
#[derive(Debug, Default)]
pub struct Claim {
    staged: u64,
    staged_files: HashSet<Digest>,
    reused: HashSet<Digest>,
}

impl Claim {
    /// Bytes reserved for staged files.
    pub fn staged(&self) -> u64 {
        self.staged
    }
}

/// Which store a content file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Chunk,
    Index,
}

/// Files freed by removing a blob (or abandoning a claim), to delete from disk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Freed {
    pub chunks: Vec<Digest>,
    pub indexes: Vec<Digest>,
    pub bytes: u64,
}

/// Use, quota and eviction counts, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceUse {
    pub quota: Option<u64>,
    pub committed: u64,
    pub staged: u64,
    pub blobs: u64,
    pub pinned: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

/// The ledger.
#[derive(Debug, Default)]
pub struct Ledger {
    quota: Option<u64>,
    committed: u64,
    staged: u64,
    chunks: HashMap<Digest, FileUse>,
    indexes: HashMap<Digest, FileUse>,
    blobs: HashMap<Digest, BlobUse>,
    pinned: HashSet<Digest>,
    evictions: u64,
    evicted_bytes: u64,
}

impl Ledger {
    /// An empty ledger with this quota (`None`: unlimited).
    pub fn new(quota: Option<u64>) -> Self {
        Ledger {
            quota,
            ..Ledger::default()
        }
    }

    fn files(&mut self, kind: FileKind) -> &mut HashMap<Digest, FileUse> {
        match kind {
            FileKind::Chunk => &mut self.chunks,
            FileKind::Index => &mut self.indexes,
        }
    }

    /// Takes one more reference on a stored file; its size is counted if it is new.
    fn add_ref(&mut self, kind: FileKind, digest: Digest, size: u64) {
        let mut added = 0;
        self.files(kind)
            .entry(digest)
            .and_modify(|f| f.refs += 1)
            .or_insert_with(|| {
                added = size;
                FileUse { size, refs: 1 }
            });
        self.committed += added;
    }

    /// Drops one reference; a file left without any is removed and returned.
    fn drop_ref(&mut self, kind: FileKind, digest: &Digest, freed: &mut Freed) {
        let files = self.files(kind);
        let Some(f) = files.get_mut(digest) else {
            return;
        };
        f.refs -= 1;
        if f.refs > 0 {
            return;
        }
        let size = f.size;
        files.remove(digest);
        self.committed -= size;
        freed.bytes += size;
        match kind {
            FileKind::Chunk => freed.chunks.push(*digest),
            FileKind::Index => freed.indexes.push(*digest),
        }
    }

    /// Records a stored blob (at load or commit). `chunks` are `(digest, size)`; a chunk
    /// repeated within the blob is counted once. A blob already recorded is left as is.
    pub fn add_blob(
        &mut self,
        digest: Digest,
        chunks: &[(Digest, u64)],
        index: Option<(Digest, u64)>,
        last_used: u64,
    ) {
        if self.blobs.contains_key(&digest) {
            return;
        }
        let mut seen = HashSet::new();
        for (c, size) in chunks {
            if seen.insert(*c) {
                self.add_ref(FileKind::Chunk, *c, *size);
            }
        }
        if let Some((i, size)) = index {
            self.add_ref(FileKind::Index, i, size);
        }
        self.blobs.insert(
            digest,
            BlobUse {
                chunks: seen.into_iter().collect(),
                index: index.map(|(i, _)| i),
                last_used,
                leases: 0,
            },
        );
    }

    /// True if the blob is recorded (stored and not being evicted).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blobs.contains_key(digest)
    }

    /// Removes a blob; returns the files no longer used by anything.
    pub fn remove_blob(&mut self, digest: &Digest) -> Freed {
        let mut freed = Freed::default();
        if let Some(b) = self.blobs.remove(digest) {
            for c in &b.chunks {
                self.drop_ref(FileKind::Chunk, c, &mut freed);
            }
            if let Some(i) = &b.index {
                self.drop_ref(FileKind::Index, i, &mut freed);
            }
        }
        freed
    }

    /// Counts an eviction of `bytes`.
    pub fn count_eviction(&mut self, bytes: u64) {
        self.evictions += 1;
        self.evicted_bytes += bytes;
    }

    /// True if `bytes` more fit under the quota.
    pub fn fits(&self, bytes: u64) -> bool {
        self.quota
            .is_none_or(|q| self.committed + self.staged + bytes <= q)
    }

    /// Reserves `bytes` for a file `digest` the claim is about to stage. False if the
    /// claim already staged it (nothing to reserve).
    pub fn reserve(&mut self, claim: &mut Claim, digest: Digest, bytes: u64) -> bool {
        if !claim.staged_files.insert(digest) {
            return false;
        }
        self.staged += bytes;
        claim.staged += bytes;
        true
    }

    /// Reserves `bytes` for a file the claim is about to write (a spooled chunk).
    pub fn reserve_bytes(&mut self, claim: &mut Claim, bytes: u64) {
        self.staged += bytes;
        claim.staged += bytes;
    }

    /// Gives back `bytes` reserved with [`Ledger::reserve_bytes`] for a file the claim
    /// has deleted (a scratch file).
    pub fn unreserve_bytes(&mut self, claim: &mut Claim, bytes: u64) {
        let bytes = bytes.min(claim.staged);
        self.staged -= bytes;
        claim.staged -= bytes;
    }

    /// Gives back the reservation of a staged file that turned out not to be needed.
    pub fn unreserve(&mut self, claim: &mut Claim, digest: &Digest, bytes: u64) {
        if claim.staged_files.remove(digest) {
            self.staged -= bytes;
            claim.staged -= bytes;
        }
    }

    /// Takes a reference on a stored file for the claim, if it is stored. True if it is
    /// (then it needs no staging).
    pub fn reuse(&mut self, claim: &mut Claim, kind: FileKind, digest: Digest) -> bool {
        if claim.reused.contains(&digest) {
            return true;
        }
        match self.files(kind).get_mut(&digest) {
            Some(f) => {
                f.refs += 1;
                claim.reused.insert(digest);
                true
            }
            None => false,
        }
    }

    /// Turns a claim into a stored blob: staged files are now committed, reused ones are
    /// held by the blob instead of the claim. Returns files left without users (only if
    /// the blob was recorded already), to delete.
    pub fn commit(
        &mut self,
        mut claim: Claim,
        blob: Digest,
        chunks: &[(Digest, u64)],
        index: Option<(Digest, u64)>,
        now: u64,
    ) -> Freed {
        self.staged -= claim.staged;
        claim.staged = 0;
        let mut freed = Freed::default();
        let reused: Vec<Digest> = claim.reused.drain().collect();
        let kinds: Vec<(Digest, FileKind)> = reused
            .iter()
            .map(|d| {
                let kind = if index.is_some_and(|(i, _)| i == *d) {
                    FileKind::Index
                } else {
                    FileKind::Chunk
                };
                (*d, kind)
            })
            .collect();
        // Re-adding first keeps every reused file alive throughout.
        self.add_blob(blob, chunks, index, now);
        for (d, kind) in kinds {
            self.drop_ref(kind, &d, &mut freed);
        }
        freed
    }

    /// Abandons a claim: its reservation is released and the references it took dropped;
    /// returns files that no longer have any user (to delete).
    pub fn abort(&mut self, mut claim: Claim) -> Freed {
        self.staged -= claim.staged;
        let mut freed = Freed::default();
        for d in claim.reused.drain() {
            let kind = if self.indexes.contains_key(&d) {
                FileKind::Index
            } else {
                FileKind::Chunk
            };
            self.drop_ref(kind, &d, &mut freed);
        }
        freed
    }

    /// The least recently used blob that may be evicted: not pinned, not being served.
    pub fn victim(&self) -> Option<Digest> {
        self.blobs
            .iter()
            .filter(|(d, b)| b.leases == 0 && !self.pinned.contains(d))
            .min_by_key(|(d, b)| (b.last_used, **d))
            .map(|(d, _)| *d)
    }

    /// Marks a response served from the blob; false if it is not stored.
    pub fn lease(&mut self, digest: &Digest, now: u64) -> bool {
        match self.blobs.get_mut(digest) {
            Some(b) => {
                b.leases += 1;
                b.last_used = b.last_used.max(now);
                true
            }
            None => false,
        }
    }

    /// When the blob was last used, if it is stored.
    pub fn last_used(&self, digest: &Digest) -> Option<u64> {
        self.blobs.get(digest).map(|b| b.last_used)
    }

    /// Ends a lease taken with [`Ledger::lease`].
    pub fn release(&mut self, digest: &Digest) {
        if let Some(b) = self.blobs.get_mut(digest) {
            b.leases = b.leases.saturating_sub(1);
        }
    }

    /// Replaces the set of pinned digests (blobs and manifests).
    pub fn set_pinned(&mut self, pinned: HashSet<Digest>) {
        self.pinned = pinned;
    }

    /// True if `digest` is pinned.
    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.pinned.contains(digest)
    }

    /// Current use, for metrics.
    pub fn usage(&self) -> SpaceUse {
        SpaceUse {
            quota: self.quota,
            committed: self.committed,
            staged: self.staged,
            blobs: self.blobs.len() as u64,
            pinned: self.pinned.len() as u64,
            evictions: self.evictions,
            evicted_bytes: self.evicted_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn shared_chunks_are_counted_once_and_freed_with_their_last_blob() {
        let mut l = Ledger::new(Some(100));
        l.add_blob(d("a"), &[(d("x"), 10), (d("y"), 20), (d("x"), 10)], None, 1);
        l.add_blob(d("b"), &[(d("y"), 20), (d("z"), 30)], Some((d("ib"), 5)), 2);
        assert_eq!(l.usage().committed, 65);
        assert_eq!(l.victim(), Some(d("a")));
        let freed = l.remove_blob(&d("a"));
        assert_eq!((freed.chunks, freed.bytes), (vec![d("x")], 10));
        assert_eq!(l.usage().committed, 55);
        let mut freed = l.remove_blob(&d("b"));
        freed.chunks.sort();
        let mut want = vec![d("y"), d("z")];
        want.sort();
        assert_eq!((freed.chunks, freed.indexes), (want, vec![d("ib")]));
        assert_eq!(l.usage().committed, 0);
    }

    #[test]
    fn leased_and_pinned_blobs_are_never_victims() {
        let mut l = Ledger::new(Some(100));
        l.add_blob(d("old"), &[(d("1"), 10)], None, 1);
        l.add_blob(d("mid"), &[(d("2"), 10)], None, 2);
        l.add_blob(d("new"), &[(d("3"), 10)], None, 3);
        assert!(l.lease(&d("old"), 0));
        l.set_pinned([d("mid")].into());
        assert_eq!(l.victim(), Some(d("new")));
        l.release(&d("old"));
        assert_eq!(l.victim(), Some(d("old")));
        assert!(!l.lease(&d("gone"), 5));
    }

    #[test]
    fn claims_reserve_staged_bytes_and_hold_reused_files() {
        let mut l = Ledger::new(Some(50));
        l.add_blob(d("a"), &[(d("x"), 20)], None, 1);
        let mut c = Claim::default();
        assert!(l.reuse(&mut c, FileKind::Chunk, d("x")));
        assert!(!l.reuse(&mut c, FileKind::Chunk, d("new")));
        assert!(l.fits(30) && !l.fits(31));
        assert!(l.reserve(&mut c, d("new"), 25));
        assert!(!l.reserve(&mut c, d("new"), 25), "reserved once per file");
        assert_eq!(l.usage().staged, 25);
        // Evicting `a` while the claim reuses x keeps x's file.
        let freed = l.remove_blob(&d("a"));
        assert_eq!(freed, Freed::default());
        l.commit(c, d("b"), &[(d("x"), 20), (d("new"), 25)], None, 2);
        assert_eq!((l.usage().committed, l.usage().staged), (45, 0));
        let freed = l.remove_blob(&d("b"));
        assert_eq!(freed.bytes, 45);

        // An abandoned claim gives everything back and frees what only it held.
        l.add_blob(d("c"), &[(d("y"), 10)], None, 1);
        let mut c = Claim::default();
        assert!(l.reuse(&mut c, FileKind::Chunk, d("y")));
        l.reserve(&mut c, d("z"), 5);
        l.remove_blob(&d("c"));
        let freed = l.abort(c);
        assert_eq!((freed.chunks, freed.bytes), (vec![d("y")], 10));
        assert_eq!(
            l.usage(),
            SpaceUse {
                quota: Some(50),
                ..SpaceUse::default()
            }
        );
    }
}
