//! Crash leftovers (orphans, rows without files, temp files) and full verification.

use super::*;
use std::fs;

/// Damage like a `kill -9` (or a disk fault) can leave, made behind the cache's back:
/// a whole file without a row, a bad file without a row, a row without a file and a row
/// whose file has the wrong length. Returns (adoptable orphan, bad orphan, row without
/// file, truncated) digests.
fn damage(dir: &Path, c: &ChunkCache) -> [Digest; 4] {
    let store = ContentStore::open(dir, "chunks").unwrap();
    let (orphan, orphan_bytes) = chunk(100, 1000);
    store.put(orphan, &orphan_bytes).unwrap();
    let (bad, _) = chunk(101, 1000);
    store.put(bad, b"garbage").unwrap();
    let (lost, lost_bytes) = chunk(102, 1000);
    c.put_bytes(&lost, &lost_bytes).unwrap();
    fs::remove_file(store.path(&lost)).unwrap();
    let (short, short_bytes) = chunk(103, 1000);
    c.put_bytes(&short, &short_bytes).unwrap();
    fs::write(store.path(&short), &short_bytes[..999]).unwrap();
    [orphan, bad, lost, short]
}

fn expected_repair() -> RepairReport {
    RepairReport {
        rows_without_file: 1,
        damaged_removed: 1,
        orphans_adopted: 1,
        orphans_removed: 1,
        staged_removed: 0,
    }
}

#[test]
fn open_repairs_what_a_crash_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, kept_bytes) = chunk(1, 1000);
    let [orphan, bad, lost, short] = {
        let c = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        c.put_bytes(&kept, &kept_bytes).unwrap();
        damage(dir.path(), &c)
    };
    let tmp = dir.path().join("tmp/chunks/leftover");
    fs::write(&tmp, b"half a chunk").unwrap();

    let c = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    let want = RepairReport {
        staged_removed: 1,
        ..expected_repair()
    };
    assert_eq!(*c.open_report(), want);
    assert!(!tmp.exists(), "temp files are removed at open");
    assert!(c.has_chunk(&orphan) && c.has_chunk(&kept));
    assert!(!c.has_chunk(&bad) && !c.store.contains(&bad));
    assert!(!c.has_chunk(&lost) && !c.has_chunk(&short) && !c.store.contains(&short));
    assert_eq!(c.used_bytes(), 2000);
    let v = c.verify_all().unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!(v.checked, 2);
    // An adopted orphan is the least recently used chunk.
    assert_eq!(c.chunk_meta(&orphan).unwrap().last_access, 0);
    assert_eq!(c.evict_to(1000).unwrap().evicted_chunks, 1);
    assert!(c.has_chunk(&kept) && !c.has_chunk(&orphan));
}

#[test]
fn gc_repairs_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    let [orphan, bad, lost, short] = damage(dir.path(), &c);
    let r = c.gc().unwrap();
    assert_eq!(r.repair, expected_repair());
    assert_eq!(r.evicted_chunks, 0);
    assert!(c.has_chunk(&orphan));
    assert!(![bad, lost, short]
        .iter()
        .any(|d| c.has_chunk(d) || c.store.contains(d)));
    assert!(c.verify_all().unwrap().is_clean());
    assert!(c.gc().unwrap().repair.is_clean());
}

#[test]
fn verify_all_reports_without_changing_and_verify_and_repair_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    let (good, good_bytes) = chunk(1, 1000);
    c.put_bytes(&good, &good_bytes).unwrap();
    let (flipped, mut flipped_bytes) = chunk(2, 1000);
    c.put_bytes(&flipped, &flipped_bytes).unwrap();
    flipped_bytes[0] ^= 0xff;
    fs::write(c.store.path(&flipped), &flipped_bytes).unwrap();
    let [orphan, bad, lost, short] = damage(dir.path(), &c);

    let v = c.verify_all().unwrap();
    let mut want_bad = vec![flipped, short];
    want_bad.sort();
    let mut want_orphans = vec![orphan, bad];
    want_orphans.sort();
    assert_eq!(v.checked, 3, "good, flipped, short");
    assert_eq!(v.bad, want_bad);
    assert_eq!(v.missing, vec![lost]);
    assert_eq!(v.orphans, want_orphans);
    assert_eq!(c.verify_all().unwrap(), v, "verify_all changes nothing");

    let (found, repaired) = c.verify_and_repair().unwrap();
    assert_eq!(found, v);
    assert_eq!(
        repaired,
        RepairReport {
            rows_without_file: 1,
            damaged_removed: 2,
            orphans_adopted: 1,
            orphans_removed: 1,
            staged_removed: 0,
        }
    );
    let after = c.verify_all().unwrap();
    assert!(after.is_clean(), "{after:?}");
    assert_eq!(after.checked, 2, "good and the adopted orphan");
    assert_eq!(c.used_bytes(), 2000);
}
