//! Mount equivalence: an image covering the merge rules
//! ([`imgd_tests::image::merge_cases`]) is mounted through `imgctl mount` and unpacked by
//! `umoci unpack` from the same OCI layout, and every path of the two trees is compared,
//! never following symlinks: type, permission bits with setuid/setgid/sticky, uid, gid,
//! size, mtime, symlink target, device number, link count and hard-link grouping (names
//! sharing an inode on one side share one on the other), xattrs (names and values), and
//! the sha256 of regular files (the 600 MiB one included: a real read test of the mount).
//!
//! Exclusions, both file-system facts rather than image content:
//! - the size of directories (FUSE reports 4096; ext4 reports its block use, which grows
//!   with the entries);
//! - the mtime of directories: umoci sets a directory's mtime from its tar entry, but then
//!   creating or removing an entry in it (a later layer's files, whiteouts) updates it to
//!   the time of the unpack, while the view keeps the entry's mtime (the OCI spec leaves
//!   directory mtimes after changes unspecified; containerd also keeps them only where
//!   nothing changed later).

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
#[derive(Debug, Clone, PartialEq, Eq)]
struct Info {
    kind: &'static str,
    /// Permission bits with setuid, setgid and sticky.
    mode: u32,
    uid: u32,
    gid: u32,
    /// `None` for directories (see the module docs).
    size: Option<u64>,
    /// `None` for directories (see the module docs).
    mtime: Option<(i64, i64)>,
    nlink: u64,
    rdev: u64,
    target: Option<Vec<u8>>,
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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
                    let mut child = rel.clone();
                    if !child.is_empty() {
                        child.push(b'/');
                    }
                    child.extend_from_slice(name.as_bytes());
                    todo.push(child);
                }
            }
            "file" => {
                let (hex, n) = sha256_file(&path, &mut buf);
                assert_eq!(n, md.size(), "{}: bytes read vs st_size", path.display());
                (sha256, hashed) = (Some(hex), hashed + n);
            }
            "symlink" => {
                target = Some(
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            }
            _ => {}
        }
        let dir = kind == "dir";
        let info = Info {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: (!dir).then_some(md.size()),
            mtime: (!dir || std::env::var_os("EQ_DIR_MTIME").is_some())
                .then_some((md.mtime(), md.mtime_nsec())),
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

/// Undoes getfattr's quoting: `\ooo` octal escapes and `\\`.
fn unquote(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(b.len()), 0);
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')),
                );
                i += 4;
            }
            (b'\\', None) if b.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            (c, _) => {
                out.push(c);
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "getfattr in {}: {stderr}",
        root.display()
    );
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
            let path = current
                .clone()
                .expect("getfattr: an xattr before '# file:'");
            all.entry(path)
                .or_insert_with(BTreeMap::new)
                .insert(name, value.to_owned());
        }
    }
    all
}

/// Walks and reads xattrs of `root`; returns the tree and the bytes hashed.
fn scan(root: &Path) -> (Tree, u64) {
    let (mut tree, hashed) = walk(root);
    for (path, x) in xattrs(root) {
        let entry = tree.get_mut(&path);
        let shown = String::from_utf8_lossy(&path).into_owned();
        entry
            .unwrap_or_else(|| panic!("getfattr names {shown:?}, not walked"))
            .0
            .xattrs = x;
    }
    (tree, hashed)
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

fn show(p: &[u8]) -> String {
    if p.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
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
    let agent = Agent::start(AgentOptions {
        host: None,
        proxy_url: proxy.url(),
        data_dir: tmp.path().join("agent"),
        extra_toml: String::new(),
        swarm: false,
    })
    .unwrap();
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
    let ((mount, mount_bytes), (reference, ref_bytes)) = std::thread::scope(|s| {
        let m = s.spawn(|| scan(&dir));
        let r = s.spawn(|| scan(&rootfs));
        (m.join().unwrap(), r.join().unwrap())
    });
    lap("walk, hash and getfattr of both", &mut timings);

    // The merge cases' outcomes, as the OCI spec has them (a few, to know both trees are
    // not equally wrong).
    for gone in [
        "wh/tree",
        "opq/old",
        "opq/olddir",
        "opq2/old",
        "links/gone",
        "absent",
        "many/entry-00007",
    ] {
        assert!(
            !mount.contains_key(gone.as_bytes()),
            "{gone} is in the mount"
        );
    }
    for kept in [
        "wh/keep",
        "opq/new",
        "opq2/new",
        "real/via-alias",
        "swap/f2d/child",
        "links/survivor",
    ] {
        assert!(
            mount.contains_key(kept.as_bytes()),
            "{kept} is not in the mount"
        );
    }
    assert_eq!(
        mount[b"links/orig".as_slice()].0.nlink,
        3,
        "orig, hard1 and late"
    );
    assert_eq!(mount[b"links/survivor".as_slice()].0.nlink, 1);
    assert_eq!(
        mount[b"big/zeros.bin".as_slice()].0.size,
        Some(merge_cases::ZERO_FILE_LEN)
    );
    assert!(mount.len() > merge_cases::MANY_ENTRIES);

    if std::env::var_os("EQ_DEBUG").is_some() {
        for p in [
            "",
            "xattr/caps",
            "xattr/caps-user",
            "xattr/user",
            "xattr",
            "opq",
            "meta/dir",
            "own/huge",
            "dev/bigminor",
            "dev/nvme0n1p300",
            "modes/suid-user",
            "links/orig",
            "sym/long",
            "names/back\\slash = sign",
            "names/emoji 🦀 crab",
            "wh",
            "many",
            "mtimes/epoch",
            "sym/owned",
        ] {
            eprintln!(
                "{p:?}\n  M {:?}\n  R {:?}",
                mount.get(p.as_bytes()),
                reference.get(p.as_bytes())
            );
        }
    }
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
    assert!(
        diffs.is_empty(),
        "the mount differs from umoci's unpack:\n{}",
        diffs.join("\n")
    );
    assert_eq!(mount_bytes, ref_bytes);
    assert_eq!(eio, Some(0), "no read failed: {status}");
    unmounted.expect("imgctl umount");
    assert!(!dir.join("many").exists(), "unmounted");
}
