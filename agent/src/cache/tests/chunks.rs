//! Storing and reading chunks: verification, idempotence, healing, persistence.

use super::*;
use std::fs;
use std::sync::Arc;

#[test]
fn only_verified_chunks_of_at_most_4_mib_are_stored() {
    let (dir, c) = cache(1 << 30);
    let (d, _) = chunk(1, 1000);
    // Wrong bytes cannot even be offered: put_chunk takes a VerifiedChunk.
    assert!(VerifiedChunk::check(d, Bytes::from_static(b"not the chunk")).is_err());
    assert!(!c.has_chunk(&d));
    let big = vec![0u8; CHUNK_SIZE + 1];
    let err = c.put_bytes(&Digest::of(&big), &big).unwrap_err();
    assert!(matches!(err, CacheError::ChunkTooLarge { .. }), "{err}");
    assert_eq!(c.used_bytes(), 0);
    assert_eq!(
        fs::read_dir(dir.path().join("tmp/chunks")).unwrap().count(),
        0
    );
}

#[test]
fn put_get_round_trip_is_idempotent() {
    let (_dir, c) = cache(1 << 30);
    let (d, bytes) = chunk(1, 1000);
    assert_eq!(c.get_bytes(&d).unwrap(), None);
    c.put_bytes(&d, &bytes).unwrap();
    c.put_bytes(&d, &bytes).unwrap();
    assert!(c.has_chunk(&d));
    assert_eq!(c.get_bytes(&d).unwrap().unwrap(), bytes);
    assert_eq!((c.used_bytes(), c.chunk_count()), (1000, 1));
    assert_eq!(c.chunk_meta(&d).unwrap().size, 1000);
}

#[test]
fn a_corrupted_file_is_detected_on_read_and_removed() {
    let (_dir, c) = cache(1 << 30);
    let (d, bytes) = chunk(1, 1000);
    c.put_bytes(&d, &bytes).unwrap();
    let mut bad = bytes.clone();
    bad[500] ^= 1;
    fs::write(c.store.path(&d), &bad).unwrap();

    assert_eq!(c.get_bytes(&d).unwrap(), None);
    assert!(!c.has_chunk(&d));
    assert!(!c.store.contains(&d), "the bad file is deleted");
    assert!(c.meta.get::<Chunks>(&d).unwrap().is_none(), "and its row");
    assert_eq!(c.used_bytes(), 0);
    assert!(c.verify_all().unwrap().is_clean());

    // Storing the chunk again heals the cache.
    c.put_bytes(&d, &bytes).unwrap();
    assert_eq!(c.get_bytes(&d).unwrap().unwrap(), bytes);
}

#[test]
fn a_vanished_or_truncated_file_is_treated_as_absent() {
    let (_dir, c) = cache(1 << 30);
    let (d, bytes) = chunk(1, 1000);
    c.put_bytes(&d, &bytes).unwrap();
    fs::remove_file(c.store.path(&d)).unwrap();
    assert_eq!(c.get_bytes(&d).unwrap(), None);
    assert!(!c.has_chunk(&d) && c.meta.get::<Chunks>(&d).unwrap().is_none());

    // A recorded chunk whose file was truncated is rewritten by a put.
    c.put_bytes(&d, &bytes).unwrap();
    fs::write(c.store.path(&d), &bytes[..10]).unwrap();
    c.put_bytes(&d, &bytes).unwrap();
    assert_eq!(c.get_bytes(&d).unwrap().unwrap(), bytes);
    assert_eq!(c.used_bytes(), 1000);
}

#[test]
fn reopen_after_drop_keeps_chunks_metadata_and_recency() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..4).map(|i| chunk(i, 1000)).collect();
    let list = blob_of(chunks[0].0, &chunks[0].1);
    {
        let c = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        for (d, b) in &chunks {
            c.put_bytes(d, b).unwrap();
        }
        c.put_blob(&list).unwrap();
        c.put_image("app:1", &image(&[list.blob])).unwrap();
        c.pin("app:1", "test").unwrap();
        // Chunk 0 becomes the most recent; the tick is only in memory until drop.
        c.get_bytes(&chunks[0].0).unwrap().unwrap();
    }
    let c = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    assert!(c.open_report().is_clean());
    assert_eq!((c.chunk_count(), c.used_bytes()), (4, 4000));
    for (d, b) in &chunks {
        assert_eq!(c.get_bytes(d).unwrap().unwrap(), *b);
    }
    assert_eq!(c.blob(&list.blob).unwrap(), Some(list.clone()));
    assert_eq!(c.image("app:1").unwrap().unwrap().layers, vec![list.blob]);
    assert_eq!(c.pin_of("app:1").unwrap().unwrap().reason, "test");
    assert!(c.verify_all().unwrap().is_clean());
    drop(c);

    // Recency survives: chunk 0 (read last before the first close) outlives chunk 1.
    let dir2 = tempfile::tempdir().unwrap();
    {
        let c = ChunkCache::open(dir2.path(), 1 << 30).unwrap();
        for (d, b) in &chunks {
            c.put_bytes(d, b).unwrap();
        }
        c.get_bytes(&chunks[0].0).unwrap().unwrap();
    }
    let c = ChunkCache::open(dir2.path(), 1 << 30).unwrap();
    let r = c.evict_to(3000).unwrap();
    assert_eq!(r.evicted_chunks, 1);
    assert!(c.has_chunk(&chunks[0].0) && !c.has_chunk(&chunks[1].0));
}

#[test]
fn concurrent_puts_gets_and_evictions_stay_consistent() {
    // 64 distinct chunks of 1000 bytes, quota for 20: constant eviction under 4 threads.
    let (_dir, c) = cache(20_000);
    let c = Arc::new(c);
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                for round in 0..3u32 {
                    for i in 0..64u32 {
                        let (d, b) = chunk((i + t * 16 + round) % 64, 1000);
                        c.put_bytes(&d, &b).unwrap();
                        if let Some(got) = c.get_bytes(&d).unwrap() {
                            assert_eq!(got, b);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(c.used_bytes() <= 20_000 + 4 * 1000);
    let report = c.verify_all().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.checked as usize, c.chunk_count());
    assert_eq!(c.used_bytes(), c.chunk_count() as u64 * 1000);
}
