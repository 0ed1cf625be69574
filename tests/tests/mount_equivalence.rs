//! Mount equivalence: an image covering the merge rules
//! ([`imgd_tests::image::merge_cases`]) is mounted through `imgctl mount` and unpacked by
//! `umoci unpack` from the same OCI layout, and every path of the two trees is compared,
//! never following symlinks: type, permission bits with setuid/setgid/sticky, uid, gid,
//! size, mtime, symlink target, device number, link count and hard-link grouping (names
//! sharing an inode on one side share one on the other), xattrs (names and values), and
//! the sha256 of regular files (the 600 MiB one included: a real read test of the mount).
//!
//! One exclusion, a file-system fact rather than image content: the size of directories
//! (the mount reports 4096; ext4 reports its block use, which grows with the entries).
//! Directory mtimes are compared: umoci restores a directory's mtime after changing its
//! entries. The image therefore lists every directory it uses: umoci gives a directory it
//! creates implicitly (and the root, once changed) the time of the unpack, the view
//! mtime 0. Hard link entries carry their target's metadata, as tar writes them: umoci
//! ignores a link entry's own mode, owner, mtime and xattrs, containerd (and the view)
//! apply them to the shared inode.

use imgd_core::Sha256;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::image::{self, merge_cases};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use imgd_tests::umoci;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What is compared of one path (besides its inode grouping).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Info {
    kind: &'static str,
    /// Permission bits with setuid, setgid and sticky.
    mode: u32,
    uid: u32,
    gid: u32,
    /// `None` for directories (see the module docs).
    size: Option<u64>,
    /// Seconds and nanoseconds.
    mtime: (i64, i64),
    nlink: u64,
    rdev: u64,
    target: Option<std::ffi::OsString>,
    sha256: Option<String>,
    /// xattr name to hex value.
    xattrs: BTreeMap<String, String>,
}

/// A walked tree: relative path (bytes, `""` for the root) to its info and inode.
type Tree = BTreeMap<Vec<u8>, (Info, u64)>;

fn kind_of(ft: std::fs::FileType) -> &'static str {
    match () {
        _ if ft.is_dir() => "dir",
        _ if ft.is_file() => "file",
        _ if ft.is_symlink() => "symlink",
        _ if ft.is_char_device() => "char",
        _ if ft.is_block_device() => "block",
        _ if ft.is_fifo() => "fifo",
        _ => "other",
    }
}

fn sha256_file(path: &Path, buf: &mut [u8]) -> (String, u64) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut h, mut n) = (Sha256::new(), 0u64);
    loop {
        match f.read(buf) {
            Ok(0) => return (h.finish().hex(), n),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) => panic!("reading {}: {e}", path.display()),
        }
    }
}

/// Walks `root` with `symlink_metadata`, hashing regular files; returns the tree and the
/// bytes hashed.
fn walk(root: &Path) -> (Tree, u64) {
    let (mut tree, mut hashed) = (Tree::new(), 0);
    let mut buf = vec![0u8; 1 << 20];
    let mut todo = vec![Vec::<u8>::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(std::ffi::OsStr::from_bytes(&rel));
        let md = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let kind = kind_of(md.file_type());
        let (mut sha256, mut target) = (None, None);
        match kind {
            "dir" => {
                for entry in std::fs::read_dir(&path).unwrap() {
                    let name = entry.unwrap().file_name();
                    let sep: &[u8] = if rel.is_empty() { b"" } else { b"/" };
                    todo.push([&rel, sep, name.as_bytes()].concat());
                }
            }
            "file" => {
                let (hex, n) = sha256_file(&path, &mut buf);
                assert_eq!(n, md.size(), "{}: bytes read vs st_size", path.display());
                (sha256, hashed) = (Some(hex), hashed + n);
            }
            "symlink" => target = Some(std::fs::read_link(&path).unwrap().into_os_string()),
            _ => {}
        }
        let info = Info {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: (kind != "dir").then_some(md.size()),
            mtime: (md.mtime(), md.mtime_nsec()),
            nlink: md.nlink(),
            rdev: md.rdev(),
            target,
            sha256,
            xattrs: BTreeMap::new(),
        };
        tree.insert(rel, (info, md.ino()));
    }
    (tree, hashed)
}

/// Undoes getfattr's quoting: it writes `\\`, control and some other bytes as `\ooo`.
fn unquote(s: &str) -> Vec<u8> {
    let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        match b.get(i..i + 4) {
            Some([b'\\', d @ ..]) if d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                out.push(
                    d.iter()
                        .fold(0, |acc: u8, c| acc.wrapping_mul(8) + c - b'0'),
                );
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Every xattr of every path under `root` (not following symlinks), with one recursive
/// `getfattr` run: relative path to (name to hex value).
fn xattrs(root: &Path) -> BTreeMap<Vec<u8>, BTreeMap<String, String>> {
    let out = Command::new("getfattr")
        .args(["-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", "."])
        .current_dir(root)
        .output()
        .expect("getfattr (package attr) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "getfattr {}: {err}", root.display());
    let mut all = BTreeMap::new();
    let mut current: Option<Vec<u8>> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = line.strip_prefix("# file: ") {
            let p = unquote(p);
            // getfattr names paths under `.` without the `./`.
            let rel = match p.strip_prefix(b"./") {
                _ if p == b"." => &[][..],
                Some(rel) => rel,
                None => &p[..],
            };
            current = Some(rel.to_vec());
        } else if !line.is_empty() {
            let (name, value) = line.split_once('=').unwrap_or((line, "0x"));
            let name = String::from_utf8_lossy(&unquote(name)).into_owned();
            let path = current.clone().expect("an xattr before '# file:'");
            let attrs: &mut BTreeMap<_, _> = all.entry(path).or_default();
            attrs.insert(name, value.to_owned());
        }
    }
    all
}

/// Walks and reads xattrs of `root`; returns the tree, the bytes hashed and the seconds.
fn scan(root: &Path) -> (Tree, u64, f64) {
    let started = Instant::now();
    let (mut tree, hashed) = walk(root);
    for (path, x) in xattrs(root) {
        let shown = show(&path);
        let entry = tree
            .get_mut(&path)
            .unwrap_or_else(|| panic!("{shown}: not walked"));
        entry.0.xattrs = x;
    }
    (tree, hashed, started.elapsed().as_secs_f64())
}

/// For each non-directory path, the sorted names of its inode.
fn link_groups(tree: &Tree) -> BTreeMap<&[u8], Vec<&[u8]>> {
    let mut by_ino: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
    for (path, (_, ino)) in tree.iter().filter(|(_, (i, _))| i.kind != "dir") {
        by_ino.entry(*ino).or_default().push(path);
    }
    let mut groups = BTreeMap::new();
    for names in by_ino.values() {
        for name in names {
            groups.insert(*name, names.clone());
        }
    }
    groups
}

/// A path for messages: `/` and the relative path.
fn show(p: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(p))
}

/// Every difference between the mount's tree and the reference's, as readable lines.
fn differences(mount: &Tree, reference: &Tree) -> Vec<String> {
    let mut diffs = Vec::new();
    let (m, r): (BTreeSet<_>, BTreeSet<_>) = (mount.keys().collect(), reference.keys().collect());
    for p in m.difference(&r) {
        diffs.push(format!("{}: only in the mount", show(p)));
    }
    for p in r.difference(&m) {
        diffs.push(format!("{}: only in the reference", show(p)));
    }
    for (p, (mi, _)) in mount {
        if let Some((ri, _)) = reference.get(p).filter(|(ri, _)| ri != mi) {
            diffs.push(format!(
                "{}:\n    mount:     {mi:?}\n    reference: {ri:?}",
                show(p)
            ));
        }
    }
    let (mg, rg) = (link_groups(mount), link_groups(reference));
    for (p, names) in &mg {
        if let Some(other) = rg.get(p).filter(|o| *o != names) {
            let list = |v: &Vec<&[u8]>| v.iter().map(|n| show(n)).collect::<Vec<_>>();
            diffs.push(format!(
                "{}: inode shared with {:?} in the mount, {:?} in the reference",
                show(p),
                list(names),
                list(other)
            ));
        }
    }
    diffs
}

/// The merge cases' outcomes as the OCI spec has them (a few, so that both trees cannot be
/// equally wrong).
fn check_outcomes(mount: &Tree) {
    let has = |p: &&str| mount.contains_key(p.as_bytes());
    let gone = "wh/tree opq/old opq/olddir opq2/old links/gone absent many/entry-00007";
    let gone: Vec<_> = gone.split(' ').filter(has).collect();
    assert!(gone.is_empty(), "deleted, yet in the mount: {gone:?}");
    let kept = "wh/keep wh/file opq/new opq2/new real/via-alias swap/f2d/child links/survivor";
    let missing: Vec<_> = kept.split(' ').filter(|p| !has(p)).collect();
    assert!(missing.is_empty(), "missing from the mount: {missing:?}");
    let info = |p: &str| &mount[p.as_bytes()].0;
    assert_eq!(info("links/orig").nlink, 3, "orig, hard1 and late");
    assert_eq!(info("links/survivor").nlink, 1, "other name whited out");
    let kinds = (info("swap/d2f").kind, info("swap/dir2sym").kind);
    assert_eq!(kinds, ("file", "symlink"));
    let zeros = info("big/zeros.bin").size;
    assert_eq!(zeros, Some(merge_cases::ZERO_FILE_LEN));
    assert!(mount.len() > merge_cases::MANY_ENTRIES);
}

/// Unmounts on drop unless [`Mounted::umount`] did: `imgctl umount`, else `umount -l`.
struct Mounted<'a> {
    agent: &'a Agent,
    dir: PathBuf,
    mounted: bool,
}

impl Mounted<'_> {
    fn umount(&mut self) -> Result<(), String> {
        self.mounted = false;
        match self.agent.imgctl(&["umount", self.dir.to_str().unwrap()]) {
            Ok((true, _, _)) => Ok(()),
            Ok((false, out, err)) => Err(format!("{out}{err}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.mounted && self.umount().is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

#[test]
fn a_mount_equals_umoci_unpack_of_the_same_image() {
    let started = Instant::now();
    let mut timings = Vec::new();
    let mut lap = {
        let mut last = Instant::now();
        move |what: &'static str, timings: &mut Vec<String>| {
            timings.push(format!("{what} {:.1}s", last.elapsed().as_secs_f64()));
            last = Instant::now();
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let spec = merge_cases::merge_cases();
    let layout = image::build_layout(&tmp.path().join("layout"), &[spec]).unwrap();
    lap("build", &mut timings);
    let reg = Registry::start().unwrap();
    let target = reg.docker_ref("merge:1");
    skopeo::push_layout(&layout.dir, "merge", &target, Format::OciExact, false).unwrap();
    lap("push", &mut timings);
    let rootfs = umoci::unpack(&layout.dir, "merge", &tmp.path().join("bundle")).unwrap();
    lap("umoci unpack", &mut timings);

    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let agent = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent"))).unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let (ok, out, err) = agent
        .imgctl(&["mount", "local/merge:1", dir.to_str().unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}\n{}", agent.log());
    let mut mounted = Mounted {
        agent: &agent,
        dir: dir.clone(),
        mounted: true,
    };
    lap("mount", &mut timings);

    // Both trees at once: the mount's reads wait on the agent, the reference's on the disk.
    let ((mount, mount_bytes, mount_s), (reference, ref_bytes, ref_s)) = std::thread::scope(|s| {
        let m = s.spawn(|| scan(&dir));
        let r = s.spawn(|| scan(&rootfs));
        (m.join().unwrap(), r.join().unwrap())
    });
    lap("scans in parallel", &mut timings);
    timings.push(format!(
        "(mount scan {mount_s:.1}s, reference scan {ref_s:.1}s)"
    ));

    check_outcomes(&mount);
    let diffs = differences(&mount, &reference);
    let status = agent.status().unwrap();
    let eio = status["mounts"][0]["eio"].as_u64();
    let unmounted = mounted.umount();
    lap("compare and unmount", &mut timings);
    println!(
        "mount equivalence: {} paths compared, {} + {} bytes hashed (mount + reference), \
         {} differences, {:.1}s in all ({})",
        mount.len().max(reference.len()),
        mount_bytes,
        ref_bytes,
        diffs.len(),
        started.elapsed().as_secs_f64(),
        timings.join(", ")
    );
    let first: Vec<_> = diffs.iter().take(200).map(String::as_str).collect();
    let (n, first) = (diffs.len(), first.join("\n"));
    assert!(
        n == 0,
        "the mount differs from umoci's unpack ({n}):\n{first}"
    );
    assert_eq!(mount_bytes, ref_bytes);
    assert_eq!(eio, Some(0), "no read failed: {status}");
    unmounted.expect("imgctl umount");
    assert!(!dir.join("many").exists(), "unmounted");
}

#[test]
fn differences_names_each_kind_of_mismatch() {
    assert_eq!(unquote(r"a\040b\134c\303\251\9"), "a b\\cé\\9".as_bytes());
    let info = |kind| Info {
        kind,
        ..Info::default()
    };
    let entry = |p: &str, ino| (p.as_bytes().to_vec(), (info("file"), ino));
    let mount: Tree = [entry("a", 1), entry("b", 2), entry("c", 3)].into();
    assert!(differences(&mount, &mount).is_empty());
    let mut reference = mount.clone();
    reference.get_mut(b"a".as_slice()).unwrap().0.mode = 0o4644;
    reference.get_mut(b"c".as_slice()).unwrap().1 = 2;
    reference.insert(b"d".to_vec(), (info("fifo"), 4));
    let diffs = differences(&mount, &reference);
    assert_eq!(diffs.len(), 4, "{diffs:#?}");
    assert!(diffs[0].contains("/d: only in the reference"), "{diffs:#?}");
    assert!(diffs[1].starts_with("/a:") && diffs[1].contains("mode: 2468"));
    assert!(diffs[2].starts_with("/b: inode shared with [\"/b\"] in the mount"));
}
