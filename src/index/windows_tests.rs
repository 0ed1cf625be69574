//! The split index's windows part: what a hostile or damaged index cannot make a reader
//! do (windows out of place, too large, a part of the wrong size, a wrong window), and
//! reads through the main part alone with windows fetched on demand.

use crate::index::builder::{index_blob, test_options};
use crate::index::format::{IndexDecodeError, LayerIndex, WindowRef, INDEX_VERSION};
use crate::index::gzip::tests::{gzip_compress, test_data};
use crate::index::gzip::MAX_PACKED_WINDOW;
use crate::index::reader::{read_stored, read_stored_with, ReadError};
use crate::index::tar::tests::TestTar;
use crate::Digest;
use std::ops::Range;

/// A gzip layer of 3 MiB with checkpoints every 64 KiB of input, its index and tar.
fn layer() -> (Vec<u8>, LayerIndex, Vec<u8>) {
    let mut t = TestTar::default();
    t.file(b"a", &test_data(3 << 20, 5));
    let tar = t.end();
    let gz = gzip_compress(&tar, 6);
    let opts = crate::index::IndexOptions {
        checkpoint_compressed_span: 64 << 10,
        ..test_options()
    };
    (gz.clone(), index_blob(&gz, opts).unwrap(), tar)
}

fn fetch(gz: &[u8]) -> impl FnMut(Range<u64>) -> Result<Vec<u8>, std::io::Error> + '_ {
    |r| Ok(gz[r.start as usize..r.end as usize].to_vec())
}

/// Re-encodes `index` (main part) after `edit`, bypassing nothing: decode must refuse it.
fn refused(index: &LayerIndex, edit: impl FnOnce(&mut LayerIndex)) -> String {
    let mut bad = index.clone();
    edit(&mut bad);
    match LayerIndex::decode(&bad.encode_main()) {
        Err(IndexDecodeError::Invalid(why)) => why,
        other => panic!("accepted or wrong error: {other:?}"),
    }
}

#[test]
fn the_main_part_holds_no_window_and_reads_fetch_only_the_one_they_need() {
    let (gz, full, tar) = layer();
    let windows = full
        .checkpoints
        .iter()
        .filter(|c| c.window.is_some())
        .count();
    assert!(windows >= 8, "{windows}");
    let main = full.encode_main();
    assert!((main.len() as u64) < full.windows_size / 8);
    let both = full.encode();
    assert_eq!(both.len() as u64, main.len() as u64 + full.windows_size);
    assert_eq!(LayerIndex::main_len(&both).unwrap(), main.len());
    assert_eq!(LayerIndex::decode(&both).unwrap(), full);
    let lazy = LayerIndex::decode(&main).unwrap();
    assert!(lazy.windows.is_none());
    // Without windows and without a way to fetch them, a read says so.
    let at = lazy.checkpoints[3].uncompressed_offset + 10;
    assert!(matches!(
        read_stored(&lazy, at, 100, &mut fetch(&gz)),
        Err(ReadError::WindowMissing { checkpoint: 3 })
    ));
    // With one, a read asks for exactly its checkpoint's window.
    let part = full.windows.clone().unwrap();
    let mut asked = Vec::new();
    let got = read_stored_with(&lazy, at, 100, &mut fetch(&gz), &mut |i, w: &WindowRef| {
        asked.push(i);
        Ok(part[w.range().start as usize..w.range().end as usize].to_vec())
    })
    .unwrap();
    assert!(got == tar[at as usize..at as usize + 100]);
    assert_eq!(asked, vec![3]);
    // A wrong window (right length, one bit off) is refused before it is used.
    let err = read_stored_with(&lazy, at, 100, &mut fetch(&gz), &mut |_, w: &WindowRef| {
        let mut b = part[w.range().start as usize..w.range().end as usize].to_vec();
        b[0] ^= 1;
        Ok(b)
    })
    .unwrap_err();
    assert!(
        matches!(err, ReadError::WindowMismatch { checkpoint: 3 }),
        "{err}"
    );
    // Reads from the blob start need no window.
    let got = read_stored_with(&lazy, 0, 10, &mut fetch(&gz), &mut |i, _| {
        panic!("window {i} asked for a read from the blob start")
    })
    .unwrap();
    assert!(got == tar[..10]);
}

#[test]
fn hostile_windows_parts_are_refused() {
    let (_, full, _) = layer();
    let k = full
        .checkpoints
        .iter()
        .position(|c| c.window.is_some())
        .unwrap();
    let why = refused(&full, |x| {
        let w = x.checkpoints[k].window.as_mut().unwrap();
        w.offset += 1;
    });
    assert!(why.contains("window at"), "{why}");
    let why = refused(&full, |x| {
        let w = x.checkpoints[k + 1].window.as_mut().unwrap();
        w.offset = 0;
    });
    assert!(why.contains("window at"), "{why}");
    let why = refused(&full, |x| {
        x.checkpoints[k].window.as_mut().unwrap().len = (MAX_PACKED_WINDOW + 1) as u32;
    });
    assert!(why.contains("window at"), "{why}");
    let why = refused(&full, |x| x.checkpoints[k].window.as_mut().unwrap().len = 0);
    assert!(why.contains("window at"), "{why}");
    let why = refused(&full, |x| x.windows_size += 1);
    assert!(why.contains("windows fill"), "{why}");
    let why = refused(&full, |x| x.windows_size = u64::MAX);
    assert!(why.contains("windows fill"), "{why}");
    let why = refused(&full, |x| {
        x.checkpoints[0].window = Some(WindowRef {
            offset: 0,
            len: 1,
            sha256: Digest::of(b"x"),
        })
    });
    assert!(why.contains("blob start"), "{why}");
    // No windows part in an index of a layer that has none.
    let mut t = TestTar::default();
    t.file(b"f", b"data");
    let plain = index_blob(&t.end(), test_options()).unwrap();
    let why = refused(&plain, |x| x.windows_size = 10);
    assert!(why.contains("without windows"), "{why}");
    // A windows part of the wrong size, or with one window damaged, is refused whole.
    let mut both = full.encode();
    assert!(matches!(
        LayerIndex::decode(&both[..both.len() - 1]),
        Err(IndexDecodeError::WindowsSize { .. })
    ));
    let w = full.checkpoints[k].window.unwrap();
    let main = full.encode_main().len();
    both[main + w.offset as usize] ^= 1;
    assert!(matches!(
        LayerIndex::decode(&both),
        Err(IndexDecodeError::WindowDigest { checkpoint }) if checkpoint == k
    ));
}

#[test]
fn an_index_of_another_version_is_refused_clearly() {
    let (_, full, _) = layer();
    let mut old = full.encode_main();
    old[8..10].copy_from_slice(&4u16.to_le_bytes());
    let err = LayerIndex::decode(&old).unwrap_err();
    assert!(matches!(err, IndexDecodeError::Version(4)));
    let msg = err.to_string();
    assert!(
        msg.contains("version 4") && msg.contains(&format!("version {INDEX_VERSION}")),
        "{msg}"
    );
    // A main part whose header claims more than there is: truncated, not a panic.
    let mut long = full.encode_main();
    long[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        LayerIndex::decode(&long),
        Err(IndexDecodeError::Truncated)
    ));
    // A (correctly signed) main part whose body claims to inflate enormously is refused
    // before anything is allocated.
    let mut bomb = full.encode_main();
    bomb[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
    let n = bomb.len() - 32;
    let sig = Digest::of(&bomb[..n]);
    bomb[n..].copy_from_slice(sig.as_bytes());
    let err = LayerIndex::decode(&bomb).unwrap_err();
    assert!(err.to_string().contains("inflated"), "{err}");
}

/// A sink that counts what it gets (shared, so that a test sees it while the builder
/// owns the sink) and fails after `fail_after` windows.
struct CountingSink {
    bytes: Vec<u8>,
    calls: std::rc::Rc<std::cell::Cell<usize>>,
    fail_after: usize,
}

impl CountingSink {
    fn new(fail_after: usize) -> (Self, std::rc::Rc<std::cell::Cell<usize>>) {
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let sink = CountingSink {
            bytes: Vec::new(),
            calls: calls.clone(),
            fail_after,
        };
        (sink, calls)
    }
}

impl crate::index::WindowSink for CountingSink {
    fn append(&mut self, packed: &[u8]) -> std::io::Result<()> {
        if self.calls.get() == self.fail_after {
            return Err(std::io::Error::other("disk full"));
        }
        self.calls.set(self.calls.get() + 1);
        self.bytes.extend_from_slice(packed);
        Ok(())
    }
}

#[test]
fn a_window_sink_gets_the_windows_part_as_it_is_made_and_the_index_holds_none() {
    let (gz, full, _) = layer();
    let opts = crate::index::IndexOptions {
        checkpoint_compressed_span: 64 << 10,
        ..test_options()
    };
    let with_window = |upto: u64| {
        full.checkpoints
            .iter()
            .filter(|c| c.window.is_some() && c.compressed_offset <= upto)
            .count()
    };
    let (sink, calls) = CountingSink::new(usize::MAX);
    let mut b = crate::index::IndexBuilder::with_window_sink(opts, sink);
    // Windows go out while the blob streams, not at the end.
    let half = gz.len() / 2;
    b.push(&gz[..half]).unwrap();
    assert!(
        calls.get() > 2,
        "{} windows after half the blob",
        calls.get()
    );
    assert!(calls.get() <= with_window(half as u64));
    b.push(&gz[half..]).unwrap();
    let built = b.finish_parts(Digest::of(&gz)).unwrap();
    assert!(built.index.windows.is_none(), "no windows part in memory");
    assert_eq!(built.index.windows_size, full.windows_size);
    assert_eq!(calls.get(), with_window(u64::MAX));
    assert_eq!(
        built.index.encode_main(),
        full.encode_main(),
        "same main part"
    );
    // The sink's bytes are the windows part: every window checks against the main part.
    let mut lazy = LayerIndex::decode(&built.index.encode_main()).unwrap();
    lazy.attach_windows(built.windows.bytes.clone().into())
        .unwrap();
    assert_eq!(lazy, full);
    // A failing sink fails the index, with the sink's reason.
    let (sink, _) = CountingSink::new(3);
    let mut b = crate::index::IndexBuilder::with_window_sink(opts, sink);
    let err = b.push(&gz).unwrap_err();
    assert!(
        !err.is_hostile(),
        "a sink's failure is not the layer's fault"
    );
    assert!(err.to_string().contains("disk full"), "{err}");
}

#[test]
fn a_main_part_is_named_by_its_trailer_and_nothing_else_is() {
    let (_, full, _) = layer();
    let main = full.encode_main();
    let trailer: [u8; 32] = main[main.len() - 32..].try_into().unwrap();
    assert_eq!(
        LayerIndex::main_part_digest(&main),
        Some(Digest::from_bytes(trailer))
    );
    // The whole index is more than a main part; a cut one is less.
    assert_eq!(LayerIndex::main_part_digest(&full.encode()), None);
    assert_eq!(LayerIndex::main_part_digest(&main[..main.len() - 1]), None);
    // One flipped byte anywhere: the trailer no longer matches (or the header breaks).
    for at in [0, 20, main.len() / 2, main.len() - 1] {
        let mut bad = main.clone();
        bad[at] ^= 1;
        assert_eq!(LayerIndex::main_part_digest(&bad), None, "byte {at}");
    }
}
