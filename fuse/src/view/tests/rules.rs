//! Whiteouts, opaque directories, replacement, implicit parents, symlinks.

use super::*;

#[test]
fn whiteout_removes_a_file_and_a_directory_subtree() {
    let v = view(vec![
        Layer::new()
            .dir("etc")
            .file("etc/a", 1)
            .file("etc/b", 2)
            .file("var/lib/x/y", 3)
            .file("keep", 4),
        Layer::new().wh("etc/.wh.a").wh(".wh.var"),
    ]);
    assert_eq!(names(&v, ""), ["etc", "keep"]);
    assert_eq!(names(&v, "etc"), ["b"]);
    assert!(!exists(&v, "var/lib/x/y"));
    let s = v.stats();
    assert_eq!((s.files, s.dirs, s.skipped_entries), (2, 2, 0));
    assert_eq!(s.total_file_bytes, 6);
}

#[test]
fn whiteouts_hide_lower_layers_only_and_create_nothing() {
    let v = view(vec![
        Layer::new().file("a", 1).file("b", 1),
        // `a` comes before its whiteout, `b` after it: both stay, from this layer.
        Layer::new()
            .file("a", 2)
            .wh(".wh.a")
            .wh(".wh.b")
            .file("b", 2)
            .wh(".wh.nothing")
            .wh("nodir/.wh.x")
            .wh("a/.wh.x"),
    ]);
    assert_eq!(names(&v, ""), ["a", "b"]);
    assert_eq!(source(&v, "a"), (1, 0));
    assert_eq!(source(&v, "b"), (1, 3));
    assert_eq!(v.stats().skipped_entries, 0);
}

#[test]
fn opaque_directory_keeps_its_own_layer_entries() {
    let v = view(vec![
        Layer::new()
            .file("d/old", 1)
            .file("d/sub/old2", 1)
            .file("e/keep", 1),
        Layer::new()
            .add(Entry {
                mode: 0o700,
                ..entry("d", EntryKind::Dir)
            })
            .file("d/new1", 1)
            .wh("d/.wh..wh..opq")
            .file("d/new2", 1)
            .wh("fresh/.wh..wh..opq"),
    ]);
    assert_eq!(names(&v, "d"), ["new1", "new2"]);
    assert_eq!(get(&v, "d").mode, 0o700);
    assert_eq!(names(&v, "e"), ["keep"]);
    // An opaque marker implies its directory.
    assert!(get(&v, "fresh").is_dir() && names(&v, "fresh").is_empty());
}

#[test]
fn opaque_root_hides_every_lower_entry() {
    let v = view(vec![
        Layer::new().file("a", 1).file("b/c", 1),
        Layer::new().wh(".wh..wh..opq").file("only", 1),
    ]);
    assert_eq!(names(&v, ""), ["only"]);
}

#[test]
fn files_and_directories_replace_each_other_across_layers() {
    let v = view(vec![
        Layer::new()
            .file("x", 1)
            .dir("y")
            .file("y/child", 1)
            .file("y/deep/er", 1)
            .file("z", 1),
        Layer::new()
            .dir("x")
            .file("x/inner", 1)
            .file("y", 7)
            // No `z` entry: the implied directory replaces the file.
            .file("z/inner2", 1),
    ]);
    assert!(get(&v, "x").is_dir());
    assert_eq!(names(&v, "x"), ["inner"]);
    assert_eq!(source(&v, "y"), (1, 2));
    assert_eq!(get(&v, "y").size(), 7);
    assert!(!exists(&v, "y/child"));
    assert_eq!(get(&v, "z").mode, 0o755);
    assert_eq!(names(&v, "z"), ["inner2"]);
    // Whiteout and re-creation in one layer: a file again.
    let v = view(vec![
        Layer::new().file("x/in", 1),
        Layer::new().wh(".wh.x").file("x", 3),
    ]);
    assert_eq!(get(&v, "x").size(), 3);
}

#[test]
fn later_entries_replace_metadata_and_directories_merge() {
    let mut d1 = entry("d", EntryKind::Dir);
    d1.xattrs.insert("user.a".into(), b"1".to_vec());
    let mut g1 = entry("g", EntryKind::File);
    g1.uid = 1;
    let v = view(vec![
        Layer::new().add(d1).file("d/f", 1).add(g1),
        Layer::new()
            .add(Entry {
                mode: 0o700,
                uid: 5,
                gid: 6,
                mtime: 42,
                mtime_nsec: 7,
                xattrs: BTreeMap::from([("user.b".into(), b"2".to_vec())]),
                ..entry("d", EntryKind::Dir)
            })
            .add(Entry {
                mode: 0o600,
                uid: 2,
                ..entry("g", EntryKind::File)
            }),
    ]);
    let d = get(&v, "d");
    assert_eq!(names(&v, "d"), ["f"]);
    assert_eq!(
        (d.mode, d.uid, d.gid, d.mtime, d.mtime_nsec),
        (0o700, 5, 6, 42, 7)
    );
    assert_eq!(d.xattrs.keys().collect::<Vec<_>>(), ["user.b"]);
    let g = get(&v, "g");
    assert_eq!((g.mode, g.uid), (0o600, 2));
    assert_eq!(source(&v, "g"), (1, 1));
}

#[test]
fn implicit_parents_are_root_owned_0755() {
    let v = view(vec![Layer::new().add(Entry {
        uid: 1000,
        gid: 1000,
        ..entry("a/b/c", EntryKind::File)
    })]);
    for p in ["a", "a/b"] {
        let n = get(&v, p);
        assert!(n.is_dir());
        assert_eq!((n.mode, n.uid, n.gid, n.mtime), (0o755, 0, 0, 0), "{p}");
    }
    assert_eq!(get(&v, "a/b/c").uid, 1000);
    assert_eq!(
        (get(&v, "").nlink, get(&v, "a").nlink, get(&v, "a/b").nlink),
        (3, 3, 2)
    );
    assert_eq!(get(&v, "a/b").parent, get(&v, "a").ino);
}

#[test]
fn root_entries_are_ignored() {
    let v = view(vec![Layer::new()
        .add(Entry {
            mode: 0o700,
            uid: 1000,
            ..entry("", EntryKind::Dir)
        })
        .file("f", 1)]);
    let root = get(&v, "");
    assert_eq!((root.mode, root.uid, root.st_mode()), (0o755, 0, 0o040755));
    assert_eq!(v.stats().skipped_entries, 0);
}

#[test]
fn symlinks_are_kept_verbatim() {
    let v = view(vec![Layer::new()
        .file("d/file", 1)
        .symlink("abs", "/etc/passwd")
        .symlink("rel", "../lib/x")
        .symlink("dangling", "nowhere")
        .symlink("todir", "d")
        .symlink("bytes", b"caf\xe9/\xff")
        .symlink("empty", "")]);
    for (p, t) in [
        ("abs", &b"/etc/passwd"[..]),
        ("rel", b"../lib/x"),
        ("dangling", b"nowhere"),
        ("todir", b"d"),
        ("bytes", b"caf\xe9/\xff"),
    ] {
        let n = get(&v, p);
        assert_eq!(n.kind, NodeKind::Symlink { target: t.to_vec() }, "{p}");
        assert_eq!((n.size(), n.st_mode()), (t.len() as u64, 0o120777));
    }
    // The view does not follow symlinks when it is read; an empty target is invalid.
    assert!(!exists(&v, "todir/file") && !exists(&v, "empty"));
    assert_eq!(v.stats().symlinks, 5);
    assert_eq!(v.stats().skipped_entries, 1);
}

#[test]
fn parent_symlinks_are_followed_inside_the_root() {
    let v = view(vec![
        Layer::new()
            .dir("usr/bin")
            .symlink("bin", "usr/bin")
            .symlink("lib", "/usr/lib")
            .symlink("up", "../../..")
            .symlink("loop", "loop")
            .symlink("dangling", "missing/deeper"),
        Layer::new()
            .file("bin/sh", 1)
            .file("lib/libc.so", 2)
            .file("up/top", 3)
            .file("up/usr/bin/env", 4)
            .file("loop/x", 5)
            .file("dangling/f", 6),
    ]);
    assert_eq!(names(&v, "usr/bin"), ["env", "sh"]);
    assert!(matches!(get(&v, "bin").kind, NodeKind::Symlink { .. }));
    assert_eq!(get(&v, "usr/lib/libc.so").size(), 2);
    assert_eq!(get(&v, "top").size(), 3);
    assert_eq!(get(&v, "missing/deeper/f").size(), 6);
    assert!(matches!(get(&v, "loop").kind, NodeKind::Symlink { .. }));
    assert_eq!(v.stats().skipped_entries, 1);
    // Whiteouts resolve their directory the same way.
    let v = view(vec![
        Layer::new()
            .file("usr/bin/sh", 1)
            .symlink("bin", "/usr/bin"),
        Layer::new().wh("bin/.wh.sh"),
    ]);
    assert!(names(&v, "usr/bin").is_empty());
}
