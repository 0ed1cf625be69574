//! Real archives: layers written by GNU tar (PAX, `./` names, directory entries), indexed
//! by `imgd_core::index::index_blob`, merged, and read back through `read_file`.

use super::*;
use imgd_core::index::{index_blob, read_file, IndexOptions};
use std::ffi::OsStr;
use std::fs;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Archives `dir` like an image builder would (GNU tar, PAX, holes detected, names
/// `./...`), optionally gzipped, and indexes it.
fn layer(dir: &Path, gzip: bool) -> (LayerIndex, Vec<u8>) {
    let tar = dir.with_extension("tar");
    run(Command::new("tar")
        .args(["--format=pax", "--numeric-owner", "--sort=name", "-S", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    let mut blob = fs::read(&tar).expect("tar written");
    if gzip {
        let out = Command::new("gzip")
            .arg("-c")
            .arg(&tar)
            .output()
            .expect("gzip");
        assert!(out.status.success());
        blob = out.stdout;
    }
    (
        index_blob(&blob, IndexOptions::default()).expect("indexed"),
        blob,
    )
}

/// Reads `len` bytes at `offset` of the regular file `path` of the view.
fn read(
    v: &ImageView,
    blobs: &[Vec<u8>],
    path: impl AsRef<[u8]>,
    offset: u64,
    len: usize,
) -> Vec<u8> {
    let (layer, entry) = v.file_source(get(v, path).ino).expect("a regular file");
    let index = v.layer(layer).expect("its layer");
    let fetch = |r: Range<u64>| {
        blobs[layer]
            .get(r.start as usize..r.end as usize)
            .map(<[u8]>::to_vec)
            .ok_or("range past the blob")
    };
    read_file(index, entry, offset, len, fetch).expect("read")
}

#[test]
fn gnu_tar_layers_merge_like_an_unpack() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (l1, l2) = (tmp.path().join("l1"), tmp.path().join("l2"));
    let write = |p: &Path, data: &[u8]| {
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, data).expect("write");
    };
    // Layer 1: a small root filesystem.
    write(&l1.join("etc/passwd"), b"root:x:0:0\n");
    write(&l1.join("etc/group"), b"root:x:0:\n");
    write(&l1.join("bin/sh"), b"#!shell");
    fs::set_permissions(l1.join("bin/sh"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    fs::hard_link(l1.join("bin/sh"), l1.join("bin/sh2")).expect("link");
    symlink("passwd", l1.join("etc/link")).expect("symlink");
    symlink("/etc/passwd", l1.join("abs")).expect("symlink");
    write(&l1.join("opt/app/sub/old"), b"old");
    write(&l1.join(OsStr::from_bytes(b"caf\xe9")), b"latin1");
    let long = "L".repeat(200);
    write(&l1.join(&long), b"long");
    fs::create_dir(l1.join("empty")).expect("mkdir");
    run(Command::new("mkfifo").arg(l1.join("pipe")));
    let disk = fs::File::create(l1.join("disk.img")).expect("create");
    disk.set_len(600 << 20).expect("truncate");
    disk.write_all_at(b"tail", (600 << 20) - 4).expect("write");
    drop(disk);
    // Device nodes need root; the rest of the test runs without.
    let have_dev = Command::new("mknod")
        .arg(l1.join("null"))
        .args(["c", "1", "3"])
        .output()
        .is_ok_and(|o| o.status.success());
    // The archive's `./` entry must not make `/` 0700.
    fs::set_permissions(&l1, fs::Permissions::from_mode(0o700)).expect("chmod");

    // Layer 2: a whiteout, an opaque directory, a changed file.
    write(&l2.join("etc/.wh.group"), b"");
    write(&l2.join("etc/passwd"), b"root:x:0:0\nuser:x:1000:1000\n");
    write(&l2.join("opt/app/.wh..wh..opq"), b"");
    write(&l2.join("opt/app/new"), b"new");

    let (i1, b1) = layer(&l1, false);
    let (i2, b2) = layer(&l2, true);
    // The index leaves the archive's `./` out; the view would ignore it anyway.
    assert!(i1.entries.iter().all(|e| !e.path.is_empty()));
    assert!(i1
        .entries
        .iter()
        .any(|e| e.path == b"etc" && e.kind == EntryKind::Dir));
    let v = ImageView::build(Arc::new(vec![i1, i2]), ViewLimits::default()).expect("view");
    check_invariants(&v);
    let blobs = [b1, b2];

    assert_eq!(get(&v, "").mode, 0o755);
    assert_eq!(names(&v, "etc"), ["link", "passwd"]);
    assert_eq!(
        read(&v, &blobs, "etc/passwd", 0, 100),
        b"root:x:0:0\nuser:x:1000:1000\n"
    );
    let meta = fs::metadata(l2.join("etc/passwd")).expect("stat");
    let passwd = get(&v, "etc/passwd");
    assert_eq!(
        (passwd.mtime, passwd.mtime_nsec),
        (meta.mtime(), meta.mtime_nsec() as u32)
    );
    assert_eq!(names(&v, "opt/app"), ["new"]);
    assert_eq!(read(&v, &blobs, "opt/app/new", 0, 100), b"new");

    let (sh, sh2) = (get(&v, "bin/sh"), get(&v, "bin/sh2"));
    assert_eq!((sh.ino, sh.nlink, sh.st_mode()), (sh2.ino, 2, 0o104755));
    assert_eq!(read(&v, &blobs, "bin/sh2", 0, 100), b"#!shell");
    let target = |p| match &get(&v, p).kind {
        NodeKind::Symlink { target } => target.clone(),
        k => panic!("{p}: {k:?}"),
    };
    assert_eq!(
        (target("etc/link"), target("abs")),
        (b"passwd".to_vec(), b"/etc/passwd".to_vec())
    );
    assert_eq!(read(&v, &blobs, b"caf\xe9", 0, 100), b"latin1");
    assert_eq!(read(&v, &blobs, &long, 0, 100), b"long");
    assert_eq!(get(&v, "pipe").kind, NodeKind::Fifo);
    assert!(names(&v, "empty").is_empty());

    let disk = get(&v, "disk.img");
    assert_eq!(disk.size(), 600 << 20);
    assert_eq!(read(&v, &blobs, "disk.img", (600 << 20) - 4, 100), b"tail");
    assert_eq!(read(&v, &blobs, "disk.img", 1 << 20, 8), [0; 8]);
    if have_dev {
        assert_eq!(get(&v, "null").kind, NodeKind::CharDevice { rdev: 0x103 });
    }
    let s = v.stats();
    assert_eq!((s.skipped_entries, s.extra_links, s.fifos), (0, 1, 1));
    // passwd, sh, new, caf\xe9, the long name, the sparse disk.
    assert_eq!(s.total_file_bytes, 28 + 7 + 3 + 6 + 4 + (600 << 20));
}
