//! Property tests against real archives: random file trees are written with GNU `tar`
//! (gnu and pax formats) and `gzip`, indexed by pushing the blob in random slices, and
//! every entry's metadata and every regular file's bytes are compared with the source
//! tree. Also: sparse files written by `tar -S` in every sparse format.

use crate::index::builder::{test_options, IndexBuilder};
use crate::index::format::{Compression, Entry, EntryKind, LayerIndex};
use crate::index::gzip::tests::gzip_compress;
use crate::index::reader::read_file;
use crate::index::zstd_layer::DIRECT_FRAME;
use crate::Digest;
use proptest::prelude::*;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Debug)]
enum Kind {
    File {
        size: usize,
        seed: u64,
    },
    Dir,
    Symlink(String),
    /// Hard link to the n-th (modulo) regular file created before it.
    Hardlink(usize),
    Fifo,
}

#[derive(Clone, Debug)]
struct Spec {
    dirs: Vec<String>,
    name: String,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z]{1,8}",
        1 => "[a-zA-Z0-9._]{100,140}",
        1 => "(ü|文件|ñ|é|ß|日本語| ){1,12}",
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    let size = prop_oneof![
        2 => Just(0usize),
        4 => 1usize..5_000,
        2 => 5_000usize..300_000,
        2 => (1usize << 20)..(5usize << 19),
    ];
    prop_oneof![
        8 => (size, any::<u64>()).prop_map(|(size, seed)| Kind::File { size, seed }),
        1 => Just(Kind::Dir),
        1 => "[a-z/.]{1,30}|/[a-z]{1,200}".prop_map(Kind::Symlink),
        1 => any::<usize>().prop_map(Kind::Hardlink),
        1 => Just(Kind::Fifo),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec("[a-z]{1,3}", 0..3),
        component(),
        kind(),
        prop::sample::select(vec![0o644u32, 0o755, 0o600, 0o4755, 0o2750, 0o1777, 0o444]),
        0u32..70_000,
        0u32..70_000,
        prop::collection::vec(
            ("[a-z]{1,10}", prop::collection::vec(any::<u8>(), 0..40)),
            0..3,
        ),
    )
        .prop_map(|(dirs, name, kind, mode, uid, gid, xattrs)| Spec {
            dirs,
            name,
            kind,
            mode,
            uid,
            gid,
            xattrs: xattrs
                .into_iter()
                .map(|(k, v)| (format!("user.{k}"), v))
                .collect(),
        })
}

/// File contents: 6 bits of entropy per byte, so compression is uniform.
fn contents(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'0' + (x % 64) as u8
        })
        .collect()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets user xattrs `(path, name, value)` with `setfattr`, or one python3 call; false
/// when neither works (the tests then skip xattr checks).
fn set_xattrs(list: &[(PathBuf, String, Vec<u8>)]) -> bool {
    let hex = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let setfattr = list.iter().all(|(p, k, v)| {
        Command::new("setfattr")
            .args(["-n", k, "-v", &format!("0x{}", hex(v))])
            .arg(p)
            .status()
            .is_ok_and(|s| s.success())
    });
    if setfattr {
        return true;
    }
    let script = "import os,sys\na=sys.argv[1:]\nfor i in range(0,len(a),3):\n  \
                  os.setxattr(a[i], a[i+1], bytes.fromhex(a[i+2]))";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]);
    for (p, k, v) in list {
        cmd.arg(p).arg(k).arg(hex(v));
    }
    cmd.status().is_ok_and(|s| s.success())
}

/// Creates the tree; returns the expected user xattrs by inode, or `None` when xattrs
/// could not be set.
fn create(root: &Path, specs: &[Spec]) -> Option<BTreeMap<u64, BTreeMap<String, Vec<u8>>>> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut xattrs = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let dir = s.dirs.iter().fold(root.to_path_buf(), |p, d| p.join(d));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-{i}", s.name));
        match &s.kind {
            Kind::File { size, seed } => {
                fs::write(&path, contents(*size, *seed)).unwrap();
                files.push(path.clone());
                for (k, v) in &s.xattrs {
                    xattrs.push((path.clone(), k.clone(), v.clone()));
                }
            }
            Kind::Dir => fs::create_dir(&path).unwrap(),
            Kind::Symlink(t) => std::os::unix::fs::symlink(t, &path).unwrap(),
            Kind::Hardlink(n) if !files.is_empty() => {
                fs::hard_link(&files[n % files.len()], &path).unwrap();
                continue;
            }
            Kind::Hardlink(_) => continue,
            Kind::Fifo => run(Command::new("mkfifo").arg(&path)),
        }
        if matches!(s.kind, Kind::Symlink(_)) {
            std::os::unix::fs::lchown(&path, Some(s.uid), Some(s.gid)).unwrap();
            continue;
        }
        std::os::unix::fs::chown(&path, Some(s.uid), Some(s.gid)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(s.mode)).unwrap();
    }
    if !set_xattrs(&xattrs) {
        return None;
    }
    let mut by_inode: BTreeMap<u64, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for (p, k, v) in xattrs {
        by_inode
            .entry(fs::metadata(&p).unwrap().ino())
            .or_default()
            .insert(k, v);
    }
    Some(by_inode)
}

fn build(blob: &[u8], slices: &[usize]) -> LayerIndex {
    build_with_copy(blob, slices).0
}

/// The index of `blob` pushed in `slices`, and the bytes of its seekable copy (zstd).
fn build_with_copy(blob: &[u8], slices: &[usize]) -> (LayerIndex, Vec<u8>) {
    let mut b = IndexBuilder::new(test_options());
    let (mut rest, mut k) = (blob, 0);
    let mut copy = Vec::new();
    while !rest.is_empty() {
        let n = slices[k % slices.len()].clamp(1, rest.len());
        b.push(&rest[..n]).unwrap();
        for c in b.take_copy_chunks() {
            copy.extend_from_slice(&c.bytes);
        }
        rest = &rest[n..];
        k += 1;
    }
    let (index, last) = b.finish_with_copy(Digest::of(blob)).unwrap();
    for c in last {
        copy.extend_from_slice(&c.bytes);
    }
    (index, copy)
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    compress_with("gzip", &[&format!("-{level}"), "-nc"], data)
}

/// `data` compressed by the `zstd` CLI with `args`.
fn zstd_cli(data: &[u8], args: &[&str]) -> Vec<u8> {
    let mut all = vec!["-q", "-c"];
    all.extend_from_slice(args);
    compress_with("zstd", &all, data)
}

fn compress_with(program: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Reads `e` whole (and a sub-range) through the index; returns the bytes fetched.
fn read_whole(
    idx: &LayerIndex,
    blob: &[u8],
    e: &Entry,
    sub: (u64, usize),
) -> (Vec<u8>, Vec<u8>, u64) {
    let asked = RefCell::new(0u64);
    let fetch = |r: Range<u64>| -> Result<Vec<u8>, std::io::Error> {
        *asked.borrow_mut() += r.end - r.start;
        Ok(blob[r.start as usize..r.end as usize].to_vec())
    };
    let whole = read_file(idx, e, 0, usize::MAX, fetch).unwrap();
    let fetched = *asked.borrow();
    let part = read_file(idx, e, sub.0, sub.1, fetch).unwrap();
    (whole, part, fetched)
}

/// Expected user xattrs by inode (`None`: unknown, not checked).
type Xattrs = Option<BTreeMap<u64, BTreeMap<String, Vec<u8>>>>;

fn check_index(idx: &LayerIndex, blob: &[u8], root: &Path, pax: bool, xattrs: &Xattrs) {
    check_index_reads(idx, blob, root, pax, xattrs, true)
}

/// [`check_index`]; `small_reads`: a small file's read must fetch at most half the blob
/// (when the layer is over 5 MiB).
fn check_index_reads(
    idx: &LayerIndex,
    blob: &[u8],
    root: &Path,
    pax: bool,
    xattrs: &Xattrs,
    small_reads: bool,
) {
    let mut seen = 0;
    for e in &idx.entries {
        let src = root.join(std::str::from_utf8(&e.path).unwrap());
        let md = fs::symlink_metadata(&src).unwrap();
        let ft = md.file_type();
        let what = e.path_lossy();
        assert_eq!(
            (e.uid, e.gid),
            (u64::from(md.uid()), u64::from(md.gid())),
            "{what}"
        );
        if !ft.is_symlink() {
            assert_eq!(e.mode, md.mode() & 0o7777, "{what}");
        }
        if !ft.is_dir() {
            let nsec = if pax { md.mtime_nsec() as u32 } else { 0 };
            assert_eq!((e.mtime, e.mtime_nsec), (md.mtime(), nsec), "{what}");
        }
        match e.kind {
            EntryKind::File | EntryKind::Hardlink => {
                assert!(ft.is_file(), "{what}");
                if let Some(t) = &e.link_target {
                    let target = idx.entries.iter().find(|x| &x.path == t).unwrap();
                    assert_eq!(target.kind, EntryKind::File);
                    let tmd = fs::metadata(root.join(std::str::from_utf8(t).unwrap())).unwrap();
                    assert_eq!(tmd.ino(), md.ino(), "{what} links to the same inode");
                } else {
                    assert_eq!(e.size, md.len(), "{what}");
                }
                let want = fs::read(&src).unwrap();
                let sub = (want.len() as u64 / 3, want.len() / 2 + 1);
                let (whole, part, fetched) = read_whole(idx, blob, e, sub);
                assert!(whole == want, "{what}: content differs");
                assert!(part == want[sub.0 as usize..(sub.0 as usize + sub.1).min(want.len())]);
                if small_reads && idx.uncompressed_size > 5 << 20 && want.len() < 64 << 10 {
                    assert!(
                        fetched <= blob.len() as u64 / 2,
                        "{what}: fetched {fetched} of {}",
                        blob.len()
                    );
                }
                if let (Some(x), true, EntryKind::File) = (xattrs, pax, e.kind) {
                    let want = x.get(&md.ino()).cloned().unwrap_or_default();
                    assert_eq!(e.xattrs, want, "{what}");
                }
            }
            EntryKind::Dir => assert!(ft.is_dir(), "{what}"),
            EntryKind::Symlink => {
                assert!(ft.is_symlink(), "{what}");
                let t = fs::read_link(&src).unwrap();
                assert_eq!(
                    e.link_target.as_deref(),
                    Some(t.as_os_str().as_encoded_bytes())
                );
            }
            EntryKind::Fifo => assert!(ft.is_fifo_like(), "{what}"),
            k => panic!("unexpected {k:?} for {what}"),
        }
        seen += 1;
    }
    // Every path of the source tree is in the index.
    let out = Command::new("find")
        .arg(root)
        .arg("-mindepth")
        .arg("1")
        .output()
        .unwrap();
    let count = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(seen, count);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn real_tar_archives_index_and_read_back(
        specs in prop::collection::vec(spec(), 1..12),
        slices in prop::collection::vec(1usize..300_000, 1..6),
        level in prop::sample::select(vec![1u32, 6, 9]),
        split in any::<prop::sample::Index>(),
        big in prop::option::of((5usize << 20)..(13usize << 19)),
        pax in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let xattrs = create(&root, &specs);
        if let Some(size) = big {
            // A big file so that small files must be read from a small part of the blob.
            fs::write(root.join("big.bin"), contents(size, size as u64)).unwrap();
        }
        let tar_path = dir.path().join("layer.tar");
        let mut cmd = Command::new("tar");
        cmd.arg("-C").arg(&root).args(["--sort=name", "--numeric-owner"]);
        if pax {
            cmd.args(["--xattrs", "--xattrs-include=user.*", "--format=pax"]);
        } else {
            cmd.arg("--format=gnu");
        }
        run(cmd.arg("-cf").arg(&tar_path).arg("."));
        let tar = fs::read(&tar_path).unwrap();
        let plain = build(&tar, &slices);
        prop_assert_eq!(plain.compression, Compression::None);
        check_index(&plain, &tar, &root, pax, &xattrs);
        // `gzip`, and a two-member gzip (zlib-rs) of the same stream split at a random point.
        let gz = gzip(&tar, level);
        let at = split.index(tar.len());
        let multi = [gzip_compress(&tar[..at], 6), gzip_compress(&tar[at..], 6)].concat();
        for blob in [gz, multi] {
            let idx = build(&blob, &slices);
            prop_assert_eq!(idx.compression, Compression::Gzip);
            prop_assert_eq!(&idx.entries, &plain.entries);
            prop_assert_eq!(idx.uncompressed_size, tar.len() as u64);
            prop_assert!(idx.checkpoints.len() as u64 >= tar.len() as u64 / (3 << 20));
            check_index(&idx, &blob, &root, pax, &xattrs);
        }
        // The `zstd` CLI (one frame; multi-threaded; two streams concatenated): read
        // through the seekable copy when a frame decodes to more than 4 MiB, else from
        // the layer's own frames.
        let zlevel = ["-1", "-3", "-9"][level as usize % 3];
        let zmulti = [zstd_cli(&tar[..at], &["-3"]), zstd_cli(&tar[at..], &["-1"])].concat();
        let single = tar.len() as u64 > DIRECT_FRAME;
        let two = if at == 0 { single } else { at as u64 > DIRECT_FRAME };
        for (blob, copied) in [
            (zstd_cli(&tar, &[zlevel]), single),
            (zstd_cli(&tar, &["-T2", "-5"]), single),
            (zmulti, two),
        ] {
            let (idx, copy) = build_with_copy(&blob, &slices);
            prop_assert_eq!(idx.compression, Compression::Zstd);
            prop_assert_eq!(&idx.entries, &plain.entries);
            prop_assert_eq!(idx.uncompressed_size, tar.len() as u64);
            prop_assert!(idx.toc.is_none());
            prop_assert_eq!(idx.copy.is_some(), copied);
            match idx.copy.clone() {
                Some(bound) => {
                    prop_assert_eq!((Digest::of(&copy), copy.len() as u64), (bound.digest, bound.size));
                    prop_assert_eq!(idx.checkpoints.len(), tar.len().div_ceil(1 << 20));
                    check_index(&idx, &copy, &root, pax, &xattrs);
                }
                None => {
                    prop_assert!(copy.is_empty());
                    check_index_reads(&idx, &blob, &root, pax, &xattrs, false);
                }
            }
        }
        // zstd:chunked as containers/storage describes it (the test's own writer), with
        // contents cut into frames at a random size: read from its own frames, its TOC
        // checked.
        let chunk = [4096, 65_536, 1 << 20][level as usize % 3];
        let (blob, _) = crate::index::zstd_chunked_tests::write(&tar, chunk);
        let (idx, copy) = build_with_copy(&blob, &slices);
        prop_assert!(idx.copy.is_none() && copy.is_empty() && idx.toc.is_some());
        prop_assert_eq!(&idx.entries, &plain.entries);
        check_index(&idx, &blob, &root, pax, &xattrs);
    }
}

/// The zstd:chunked blob of a layer tar made by `podman push --compression-format
/// zstd:chunked`, and the layer's annotations in the pushed manifest. `None` when
/// podman's compressor fails with "short write" (Debian's podman 4.3 does, now and then,
/// on trees it imported fine).
fn podman_zstd_chunked(dir: &Path, tar: &Path) -> Option<(Vec<u8>, serde_json::Value)> {
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.arg("--root").arg(dir.join("storage"));
        cmd.arg("--runroot").arg(dir.join("run"));
        cmd.args(["--storage-driver", "vfs"]).args(args);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() || err.contains("short write"),
            "podman {args:?}: {err}"
        );
        out.status.success()
    };
    podman(&["import", "-q", tar.to_str().unwrap(), "localhost/prop:1"]);
    let oci = dir.join("oci");
    let dest = format!("oci:{}", oci.display());
    if !podman(&[
        "push",
        "-q",
        "--compression-format",
        "zstd:chunked",
        "localhost/prop:1",
        &dest,
    ]) {
        return None;
    }
    let blob = |digest: &str| fs::read(oci.join("blobs/sha256").join(&digest[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(oci.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let layer = &manifest["layers"][0];
    Some((
        blob(layer["digest"].as_str().unwrap()),
        layer["annotations"].clone(),
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    /// zstd:chunked layers made by podman (Debian's 4.3: the first footer version, and
    /// `io.containers.zstd-chunked.*` annotations) index, check their TOC and read back
    /// from their own frames; the index's TOC is the one the annotations name.
    #[test]
    fn podman_zstd_chunked_layers_index_and_read_back(
        specs in prop::collection::vec(spec(), 1..12),
        slices in prop::collection::vec(1usize..300_000, 1..6),
        big in prop::option::of((1usize << 20)..(6usize << 20)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let xattrs = create(&root, &specs);
        if let Some(size) = big {
            fs::write(root.join("big.bin"), contents(size, size as u64)).unwrap();
        }
        let tar_path = dir.path().join("layer.tar");
        let mut cmd = Command::new("tar");
        cmd.arg("-C").arg(&root).args(["--sort=name", "--numeric-owner", "--format=pax"]);
        cmd.args(["--xattrs", "--xattrs-include=user.*"]);
        run(cmd.arg("-cf").arg(&tar_path).arg("."));
        let plain = build(&fs::read(&tar_path).unwrap(), &slices);
        let made = podman_zstd_chunked(dir.path(), &tar_path);
        prop_assume!(made.is_some(), "podman could not compress this tree");
        let (blob, notes) = made.unwrap();
        let (idx, copy) = build_with_copy(&blob, &slices);
        prop_assert!(idx.copy.is_none() && copy.is_empty());
        let toc = idx.toc.clone().expect("podman's TOC is found and checked");
        let key = |k: &str| ["io.github.containers", "io.containers"].iter()
            .find_map(|p| notes[format!("{p}.zstd-chunked.{k}")].as_str().map(str::to_string))
            .unwrap();
        prop_assert_eq!(key("manifest-checksum"), toc.digest.to_string());
        let position: Vec<u64> = key("manifest-position").split(':').map(|n| n.parse().unwrap()).collect();
        prop_assert_eq!((position[0], position[1]), (toc.offset, toc.size));
        // podman re-packs the tar (Go's archive/tar): same files, maybe other headers.
        let paths = |i: &LayerIndex| i.entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        prop_assert_eq!(paths(&idx), paths(&plain));
        check_index_reads(&idx, &blob, &root, true, &xattrs, true);
    }
}

#[test]
fn sparse_files_from_gnu_tar() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let f = fs::File::create(root.join("disk.img")).unwrap();
    f.set_len(20 << 20).unwrap();
    let data = contents(300_000, 5);
    for (i, off) in [0u64, 3 << 20, (7 << 20) + 12_345, (19 << 20) + 5]
        .iter()
        .enumerate()
    {
        f.write_all_at(&data[..(i + 1) * 50_000], *off).unwrap();
    }
    drop(f);
    fs::File::create(root.join("holes-only"))
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    let want = fs::read(root.join("disk.img")).unwrap();
    let variants: [&[&str]; 4] = [
        &["--format=gnu"],
        &["--format=pax", "--sparse-version=0.0"],
        &["--format=pax", "--sparse-version=0.1"],
        &["--format=pax", "--sparse-version=1.0"],
    ];
    for v in variants {
        let tar_path = dir.path().join("sparse.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-S")
            .args(v)
            .arg("-cf")
            .arg(&tar_path)
            .arg("."));
        let tar = fs::read(&tar_path).unwrap();
        for blob in [tar.clone(), gzip(&tar, 6)] {
            let idx = build(&blob, &[65_536, 7]);
            let e = idx.find(b"disk.img").unwrap();
            assert!(e.sparse.len() >= 4, "{v:?}: {:?}", e.sparse);
            assert_eq!(e.size, 20 << 20, "{v:?}");
            let (whole, part, _) = read_whole(&idx, &blob, e, ((3 << 20) - 10, 100_020));
            assert!(whole == want, "{v:?}: sparse content differs");
            assert!(part == want[(3 << 20) - 10..(3 << 20) + 100_010]);
            let h = idx.find(b"holes-only").unwrap();
            assert_eq!((h.size, h.stored_size()), (5 << 20, 0), "{v:?}");
            let (whole, _, fetched) = read_whole(&idx, &blob, h, (0, 10));
            assert!(whole == vec![0; 5 << 20] && fetched == 0, "{v:?}");
        }
    }
}
