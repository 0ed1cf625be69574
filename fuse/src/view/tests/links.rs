//! Hard links, devices, ownership, modes, times, xattrs.

use super::*;

#[test]
fn hard_links_share_an_inode_and_count_names() {
    let v = view(vec![
        Layer::new()
            .file("a", 10)
            .hardlink("b", "a")
            .hardlink("c/d", "a"),
        Layer::new().wh(".wh.a"),
    ]);
    let (b, d) = (get(&v, "b"), get(&v, "c/d"));
    assert_eq!(b.ino, d.ino);
    assert_eq!((b.nlink, b.size(), b.st_mode()), (2, 10, 0o100644));
    assert_eq!(
        v.file_source(b.ino).map(|(l, e)| (l, e.path.clone())),
        Some((0, b"a".to_vec()))
    );
    let s = v.stats();
    assert_eq!((s.files, s.extra_links, s.total_file_bytes), (1, 1, 10));

    // All three names before the whiteout.
    let v = view(vec![Layer::new()
        .file("a", 10)
        .hardlink("b", "a")
        .hardlink("c/d", "a")]);
    assert_eq!(get(&v, "a").nlink, 3);
    assert_eq!(v.stats().extra_links, 2);

    // A later file at one name is a new inode; the others keep the old one.
    let v = view(vec![
        Layer::new().file("a", 10).hardlink("b", "a"),
        Layer::new().file("b", 3),
    ]);
    let (a, b) = (get(&v, "a"), get(&v, "b"));
    assert_ne!(a.ino, b.ino);
    assert_eq!((a.nlink, b.nlink, a.size(), b.size()), (1, 1, 10, 3));
}

#[test]
fn hard_link_to_a_lower_layer_file_takes_the_link_metadata() {
    let mut a = entry("a", EntryKind::File);
    a.size = 4;
    a.xattrs.insert("security.capability".into(), vec![1, 2, 3]);
    let mut b = entry("sub/b", EntryKind::Hardlink);
    b.link_target = Some(b"a".to_vec());
    (b.mode, b.uid, b.mtime) = (0o4750, 7, 99);
    b.xattrs.insert("user.x".into(), b"y".to_vec());
    let v = view(vec![Layer::new().add(a), Layer::new().add(b)]);
    let (a, b) = (get(&v, "a"), get(&v, "sub/b"));
    assert_eq!(a.ino, b.ino);
    assert_eq!((a.nlink, a.mode, a.uid, a.mtime), (2, 0o4750, 7, 99));
    assert_eq!(
        a.xattrs.keys().collect::<Vec<_>>(),
        ["security.capability", "user.x"]
    );
    assert_eq!(source(&v, "sub/b"), (0, 0));
}

#[test]
fn hard_link_names_the_latest_earlier_entry_of_its_target() {
    let v = view(vec![Layer::new()
        .file("a", 1)
        .file("a", 20)
        .hardlink("b", "a")
        .file("a", 300)]);
    assert_eq!(source(&v, "b"), (0, 1));
    assert_eq!(source(&v, "a"), (0, 3));
    assert_eq!((get(&v, "a").nlink, get(&v, "b").nlink), (1, 1));
}

#[test]
fn hard_links_to_missing_targets_or_directories_are_skipped() {
    let v = view(vec![
        Layer::new().file("gone", 1).dir("d").symlink("s", "gone"),
        Layer::new()
            .wh(".wh.gone")
            .hardlink("x", "gone")
            .hardlink("y", "d")
            .hardlink("z", "")
            .hardlink("w", "nothing/here")
            .hardlink("s2", "s"),
    ]);
    assert_eq!(names(&v, ""), ["d", "s", "s2"]);
    assert_eq!(v.stats().skipped_entries, 4);
    // A hard link to a symlink links the symlink itself (`link(2)`).
    let (s, s2) = (get(&v, "s"), get(&v, "s2"));
    assert_eq!((s.ino, s.nlink), (s2.ino, 2));
}

#[test]
fn devices_fifos_modes_owners_times_and_xattrs() {
    let dev = |path: &str, kind, major, minor| Entry {
        dev_major: major,
        dev_minor: minor,
        mode: 0o666,
        ..entry(path, kind)
    };
    let v = view(vec![Layer::new()
        .add(dev("null", EntryKind::CharDevice, 1, 3))
        .add(dev("sda1", EntryKind::BlockDevice, 8, 1))
        .add(dev("big", EntryKind::CharDevice, 0x12345, 0x0abc_def1))
        .add(entry("pipe", EntryKind::Fifo))
        .add(Entry {
            mode: 0o4755,
            uid: 1000,
            gid: 2000,
            mtime: -5,
            mtime_nsec: 123_456_789,
            xattrs: BTreeMap::from([(
                "security.capability".into(),
                vec![1, 0, 0, 2, 0, 0x20, 0, 0],
            )]),
            ..entry("suid", EntryKind::File)
        })
        .add(Entry {
            mode: 0o2755,
            uid: 1 << 40,
            gid: u64::from(u32::MAX),
            ..entry("sgid", EntryKind::File)
        })
        .add(Entry {
            mode: 0o1777,
            ..entry("tmp", EntryKind::Dir)
        })
        .add(Entry {
            mode: 0o177_644,
            mtime_nsec: 2_000_000_000,
            ..entry("masked", EntryKind::File)
        })]);
    let null = get(&v, "null");
    assert_eq!(null.kind, NodeKind::CharDevice { rdev: 0x103 });
    assert_eq!(
        (null.rdev(), null.st_mode(), null.size()),
        (0x103, 0o020666, 0)
    );
    assert_eq!(get(&v, "sda1").kind, NodeKind::BlockDevice { rdev: 0x801 });
    assert_eq!(get(&v, "sda1").st_mode(), 0o060666);
    let (major, minor) = (0x12345u64, 0x0abc_def1u64);
    let want = ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff);
    assert_eq!(get(&v, "big").rdev(), want);
    assert_eq!(makedev(259, 0x12345), 0x1231_0345);
    assert_eq!(get(&v, "pipe").st_mode(), 0o010644);
    let suid = get(&v, "suid");
    assert_eq!((suid.st_mode(), suid.uid, suid.gid), (0o104755, 1000, 2000));
    assert_eq!((suid.mtime, suid.mtime_nsec), (-5, 123_456_789));
    assert_eq!(
        suid.xattrs["security.capability"],
        [1, 0, 0, 2, 0, 0x20, 0, 0]
    );
    let sgid = get(&v, "sgid");
    assert_eq!((sgid.mode, sgid.uid, sgid.gid), (0o2755, 65534, u32::MAX));
    assert_eq!(get(&v, "tmp").st_mode(), 0o041777);
    let masked = get(&v, "masked");
    assert_eq!((masked.mode, masked.mtime_nsec), (0o7644, 999_999_999));
    let s = v.stats();
    assert_eq!((s.devices, s.fifos, s.files, s.dirs), (3, 1, 3, 2));
}

#[test]
fn empty_files_directories_and_large_sparse_files() {
    let sparse = Entry {
        size: 700 << 20,
        sparse: vec![
            SparseExtent {
                offset: 0,
                length: 4096,
            },
            SparseExtent {
                offset: (700 << 20) - 10,
                length: 10,
            },
        ],
        ..entry("disk.img", EntryKind::File)
    };
    let v = view(vec![Layer::new().add(sparse).file("empty", 0).dir("void")]);
    assert_eq!(get(&v, "disk.img").size(), 700 << 20);
    let (_, e) = v.file_source(get(&v, "disk.img").ino).expect("file");
    assert_eq!(e.stored_size(), 4106);
    assert_eq!(get(&v, "empty").size(), 0);
    let void = get(&v, "void");
    assert_eq!((void.nlink, v.children(void.ino).count()), (2, 0));
    assert_eq!(v.stats().total_file_bytes, 700 << 20);
    assert!(v.file_source(void.ino).is_none() && v.file_source(0).is_none());
}
