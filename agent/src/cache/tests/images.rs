//! Blob layouts, image records and pins.

use super::*;

#[test]
fn blob_layouts_are_validated_and_report_what_is_cached() {
    let (_dir, c) = cache(1 << 30);
    let big = vec![7u8; CHUNK_SIZE];
    let (d0, d1) = (Digest::of(&big), Digest::of(b"tail"));
    let list = ChunkList {
        blob: Digest::of(&[big.as_slice(), b"tail"].concat()),
        size: CHUNK_SIZE as u64 + 4,
        chunks: vec![
            ChunkRef {
                digest: d0,
                size: CHUNK_SIZE as u32,
            },
            ChunkRef {
                digest: d1,
                size: 4,
            },
        ],
        pieces: vec![],
    };
    let mut bad = list.clone();
    bad.size += 1;
    assert!(matches!(
        c.put_blob(&bad),
        Err(CacheError::InvalidChunkList(_))
    ));
    assert_eq!(c.blob(&list.blob).unwrap(), None);

    c.put_blob(&list).unwrap();
    assert_eq!(c.blob(&list.blob).unwrap(), Some(list.clone()));
    assert_eq!(c.blob_cached_bytes(&list), 0);
    assert_eq!(c.missing_chunks(&list), vec![0, 1]);
    c.put_bytes(&d1, b"tail").unwrap();
    assert_eq!(c.blob_cached_bytes(&list), 4);
    assert_eq!(c.missing_chunks(&list), vec![0]);
    c.put_bytes(&d0, &big).unwrap();
    assert_eq!(c.blob_cached_bytes(&list), list.size);
    assert!(c.missing_chunks(&list).is_empty());
}

#[test]
fn images_and_pins_round_trip() {
    let (_dir, c) = cache(1 << 30);
    let img = image(&[Digest::of(b"layer")]);
    assert!(matches!(
        c.put_image(" ", &img),
        Err(CacheError::InvalidReference(_))
    ));
    assert!(matches!(
        c.pin("", "x"),
        Err(CacheError::InvalidReference(_))
    ));
    c.put_image("b:1", &img).unwrap();
    c.put_image("a:1", &img).unwrap();
    assert_eq!(c.image("a:1").unwrap(), Some(img.clone()));
    assert_eq!(c.image("c:1").unwrap(), None);
    let refs: Vec<String> = c.images().unwrap().into_iter().map(|(r, _)| r).collect();
    assert_eq!(refs, vec!["a:1", "b:1"]);
    assert_eq!(
        img.blobs().collect::<Vec<_>>(),
        vec![img.config, Digest::of(b"layer")]
    );

    // A reference can be pinned before its image is recorded.
    c.pin("c:1", "preload").unwrap();
    assert_eq!(c.pins().unwrap().len(), 1);
    assert!(c.unpin("c:1").unwrap());
    assert!(!c.unpin("c:1").unwrap());
    assert!(c.pin_of("c:1").unwrap().is_none());

    assert!(c.remove_image("a:1").unwrap());
    assert!(!c.remove_image("a:1").unwrap());
    assert_eq!(c.images().unwrap().len(), 1);
}
