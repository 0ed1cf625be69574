//! Quota enforcement: LRU order, pins, protection, the soft-quota policy.

use super::*;

/// Puts chunks with seeds `seeds`, 1000 bytes each, in order.
fn put_all(c: &ChunkCache, seeds: std::ops::Range<u32>) -> Vec<(Digest, Vec<u8>)> {
    seeds
        .map(|i| {
            let (d, b) = chunk(i, 1000);
            c.put_bytes(&d, &b).unwrap();
            (d, b)
        })
        .collect()
}

#[test]
fn eviction_is_lru_down_to_the_low_water_mark() {
    let (_dir, c) = cache(10_000);
    assert_eq!(c.low_water(), 9_000);
    let chunks = put_all(&c, 0..10);
    assert_eq!(c.used_bytes(), 10_000, "at the quota nothing is evicted");
    // Reading chunk 0 makes chunk 1 the least recently used.
    c.get_bytes(&chunks[0].0).unwrap().unwrap();
    put_all(&c, 10..11);
    assert_eq!(c.used_bytes(), 9_000);
    let gone: Vec<usize> = (0..10).filter(|&i| !c.has_chunk(&chunks[i].0)).collect();
    assert_eq!(gone, vec![1, 2]);
    assert!(!c.store.contains(&chunks[1].0), "evicted files are deleted");
    assert!(c.meta.get::<Chunks>(&chunks[1].0).unwrap().is_none());
    assert!(c.verify_all().unwrap().is_clean());
}

#[test]
fn chunks_of_pinned_images_and_protected_blobs_are_spared() {
    let (_dir, c) = cache(10_000);
    let chunks = put_all(&c, 0..10);
    // Chunk 0 is a layer of a pinned image, chunk 1 of a protected (mounted) blob.
    let pinned = blob_of(chunks[0].0, &chunks[0].1);
    let mounted = blob_of(chunks[1].0, &chunks[1].1);
    c.put_blob(&pinned).unwrap();
    c.put_blob(&mounted).unwrap();
    c.put_image("app:1", &image(&[pinned.blob])).unwrap();
    c.pin("app:1", "test").unwrap();
    c.protect(&[mounted.blob]);
    assert_eq!(c.protected_blobs(), vec![mounted.blob]);

    let r = c.evict_to(5_000).unwrap();
    assert_eq!(
        (r.evicted_chunks, r.freed_bytes, r.used_bytes),
        (5, 5_000, 5_000)
    );
    assert_eq!(r.unevictable_excess, 0);
    assert!(c.has_chunk(&chunks[0].0) && c.has_chunk(&chunks[1].0));
    let gone: Vec<usize> = (0..10).filter(|&i| !c.has_chunk(&chunks[i].0)).collect();
    assert_eq!(gone, vec![2, 3, 4, 5, 6]);

    // Nothing but pinned and protected chunks left: the run stops and says so.
    let r = c.evict_to(0).unwrap();
    assert_eq!((r.used_bytes, r.unevictable_excess), (2_000, 2_000));
    assert!(c.has_chunk(&chunks[0].0) && c.has_chunk(&chunks[1].0));

    // Protection is counted; unpinning and unprotecting make them evictable again.
    c.protect(&[mounted.blob]);
    c.unprotect(&[mounted.blob]);
    assert!(c.unpin("app:1").unwrap());
    assert_eq!(c.evict_to(0).unwrap().used_bytes, 1_000);
    assert!(c.has_chunk(&chunks[1].0));
    c.unprotect(&[mounted.blob]);
    assert!(c.protected_blobs().is_empty());
    assert_eq!(c.evict_to(0).unwrap().used_bytes, 0);
}

#[test]
fn a_put_above_the_quota_succeeds_and_keeps_the_new_chunk() {
    let (_dir, c) = cache(2_500);
    let chunks = put_all(&c, 0..2);
    let blobs: Vec<ChunkList> = chunks.iter().map(|(d, b)| blob_of(*d, b)).collect();
    for b in &blobs {
        c.put_blob(b).unwrap();
    }
    c.protect(&[blobs[0].blob, blobs[1].blob]);
    // 3000 > 2500 with everything else protected: stored anyway, cache stays above quota.
    let (d, b) = chunk(2, 1000);
    c.put_bytes(&d, &b).unwrap();
    assert!(c.has_chunk(&d));
    assert_eq!(c.used_bytes(), 3_000);
    // Once unprotected, the next put brings it down to the low-water mark (2250).
    c.unprotect(&[blobs[0].blob, blobs[1].blob]);
    let (d4, b4) = chunk(3, 1000);
    c.put_bytes(&d4, &b4).unwrap();
    assert_eq!(c.used_bytes(), 2_000);
    assert!(c.has_chunk(&d4) && c.has_chunk(&d));
}

#[test]
fn gc_evicts_to_the_low_water_mark() {
    let (_dir, c) = cache(10_000);
    put_all(&c, 0..10);
    let r = c.gc().unwrap();
    assert_eq!(
        (r.evicted_chunks, r.freed_bytes, r.used_bytes),
        (1, 1_000, 9_000)
    );
    assert!(r.repair.is_clean());
}
