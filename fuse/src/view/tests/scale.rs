//! Big directories, odd names, hostile paths, limits.

use super::*;
use std::time::{Duration, Instant};

#[test]
fn ten_thousand_entries_in_one_directory() {
    let mut layer = Layer::new().dir("big");
    // Archive order unrelated to name order (7919 is prime: a permutation).
    for i in 0..10_000u32 {
        let k = (i * 7919) % 10_000;
        layer = layer.file(format!("big/f{k:05}"), u64::from(k));
    }
    let v = view(vec![layer]);
    let big = get(&v, "big").ino;
    assert_eq!(v.children(big).count(), 10_000);
    let start = Instant::now();
    for k in 0..10_000u64 {
        let ino = v.lookup(big, format!("f{k:05}").as_bytes());
        assert_eq!(ino.and_then(|i| v.node(i)).map(Node::size), Some(k));
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(v.lookup(big, b"f10000").is_none() && v.lookup(big, b"").is_none());
    let entries = v.dir_entries(big).expect("a directory");
    assert_eq!(
        (&*entries[0].0, &*entries[9_999].0),
        (&b"f00000"[..], &b"f09999"[..])
    );
    assert_eq!(v.stats().files, 10_000);
}

#[test]
fn non_utf8_long_and_deep_names() {
    let long = "n".repeat(255);
    let deep: String = (0..300).map(|i| format!("d{i}/")).collect::<String>() + "leaf";
    let v = view(vec![Layer::new()
        .file(b"caf\xe9", 1)
        .file(b"\xff\xfe/\x80x", 2)
        .file(&long, 3)
        .file(&deep, 4)
        .file("日本語/ファイル", 5)]);
    assert_eq!(get(&v, b"caf\xe9").size(), 1);
    assert_eq!(get(&v, b"\xff\xfe/\x80x").size(), 2);
    let root: Vec<&[u8]> = v.children(ROOT_INO).map(|(n, _)| n).collect();
    assert!(root.contains(&&b"\xff\xfe"[..]) && root.contains(&long.as_bytes()));
    assert_eq!(get(&v, &long).size(), 3);
    assert_eq!(get(&v, &deep).size(), 4);
    assert_eq!(get(&v, "日本語/ファイル").size(), 5);
    assert_eq!(
        v.resolve_path(b"/d0/./d1//../d1/d2"),
        v.resolve_path(b"d0/d1/d2")
    );
    assert_eq!(v.resolve_path(b"../.."), Some(ROOT_INO));
}

#[test]
fn hostile_paths_never_enter_the_view() {
    let bad: [&[u8]; 13] = [
        b"a/../b",
        b"../x",
        b"a/./b",
        b"a//b",
        b"/abs",
        b"x\0y",
        b".wh..wh.plnk/1",
        b".wh..wh.aufs",
        b"d/.",
        b".",
        b"..",
        b".wh.",
        b"f/",
    ];
    let mut layer = Layer::new().file("ok", 1);
    for p in bad {
        layer = layer.file(p, 0);
    }
    let v = view(vec![
        layer
            .hardlink("h", "../ok")
            .symlink("esc", "../../../etc")
            .symlink("nul", b"x\0y"),
        Layer::new()
            .file("esc/passwd", 2)
            .file("nul/z", 3)
            .hardlink("h2", "esc/passwd"),
    ]);
    // `..` stops at the root: `esc/passwd` is the view's own `etc/passwd`.
    assert_eq!(names(&v, ""), ["esc", "etc", "h2", "nul", "ok"]);
    assert_eq!(get(&v, "h2").ino, get(&v, "etc/passwd").ino);
    assert_eq!(v.stats().skipped_entries, bad.len() as u64 + 2);
}

#[test]
fn entry_limit_is_a_clear_error() {
    let flat = |n: usize| {
        let layer = (0..n).fold(Layer::new(), |l, i| l.file(format!("f{i}"), 0));
        Arc::new(vec![layer.index()])
    };
    let max = |n| ViewLimits {
        max_entries: n,
        ..ViewLimits::default()
    };
    let limits = max(5);
    let err = ImageView::build(flat(6), limits).err();
    assert_eq!(err, Some(ViewError::TooManyEntries { limit: 5 }));
    assert!(err.is_some_and(|e| e.to_string().contains("more than 5 entries")));
    assert!(ImageView::build(flat(4), limits).is_ok());
    // Few entries, but implicit directories past the limit.
    let deep = || Arc::new(vec![Layer::new().file("a/b/c/d/e/f", 0).index()]);
    let err = ImageView::build(deep(), max(6)).err();
    assert_eq!(err, Some(ViewError::TooManyEntries { limit: 6 }));
    let v = ImageView::build(deep(), max(7)).expect("fits");
    assert_eq!(v.inode_count(), 7);
    assert_eq!(ViewLimits::default().max_entries, 4_000_000);
}

#[test]
fn symlink_resolution_work_is_bounded() {
    let through_link = |n: usize| {
        let lower = Layer::new()
            .dir("usr/bin")
            .symlink("bin", "usr/bin")
            .index();
        let upper = (0..n).fold(Layer::new(), |l, i| l.file(format!("bin/f{i}"), 0));
        Arc::new(vec![lower, upper.index()])
    };
    // Each entry under `bin` costs the two components of `usr/bin`.
    let max = |n| ViewLimits {
        max_symlink_steps: n,
        ..ViewLimits::default()
    };
    let err = ImageView::build(through_link(10), max(19)).err();
    assert_eq!(err, Some(ViewError::TooManySymlinkSteps { limit: 19 }));
    let v = ImageView::build(through_link(10), max(20)).expect("within the limit");
    assert_eq!(v.children(get(&v, "usr/bin").ino).count(), 10);
    // A target longer than PATH_MAX is never followed.
    let v = view(vec![
        Layer::new().symlink("long", "x/".repeat(2048)),
        Layer::new().file("long/f", 1),
    ]);
    assert_eq!(names(&v, ""), ["long"]);
    assert_eq!(v.stats().skipped_entries, 1);
}
