//! Unit tests of the tar scanner with hand-built archives.

use super::*;
use crate::index::format::SparseExtent;

/// Minimal tar writer for tests: headers are built field by field.
#[derive(Default)]
pub(crate) struct TestTar {
    pub out: Vec<u8>,
}

/// A header block with the common fields set (ustar magic unless `gnu`).
pub(crate) fn header(name: &[u8], typeflag: u8, size: u64, gnu: bool) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 1000);
    octal(&mut h[116..124], 1001);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = typeflag;
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
    }
    h
}

/// Writes `v` as zero-padded octal with a NUL terminator.
pub(crate) fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}\0", v, width = field.len() - 1);
    assert!(s.len() == field.len(), "{v} does not fit");
    field.copy_from_slice(s.as_bytes());
}

/// Sets the checksum field (unsigned sum).
pub(crate) fn seal(h: &mut [u8; BLOCK]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// PAX records for `pairs`.
pub(crate) fn pax(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        let body = k.len() + v.len() + 3;
        let mut len = body + 1;
        while format!("{len}").len() + body != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

impl TestTar {
    /// Appends a sealed header and `content` padded to a block.
    pub fn entry(&mut self, mut h: [u8; BLOCK], content: &[u8]) -> u64 {
        seal(&mut h);
        self.out.extend_from_slice(&h);
        let at = self.out.len() as u64;
        self.out.extend_from_slice(content);
        self.out
            .resize(self.out.len() + padding(content.len() as u64) as usize, 0);
        at
    }

    /// A regular file; returns its content offset.
    pub fn file(&mut self, name: &[u8], content: &[u8]) -> u64 {
        self.entry(header(name, b'0', content.len() as u64, false), content)
    }

    /// A metadata entry (`x`, `g`, `L`, `K`) with `content`.
    pub fn meta(&mut self, typeflag: u8, content: &[u8]) {
        let h = header(
            b"././@meta",
            typeflag,
            content.len() as u64,
            typeflag == b'L' || typeflag == b'K',
        );
        self.entry(h, content);
    }

    /// The end marker.
    pub fn end(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 2 * BLOCK]);
        self.out
    }
}

/// Scans `data` fed in slices of `step` bytes.
pub(crate) fn scan_with(
    data: &[u8],
    step: usize,
    opts: TarOptions,
) -> Result<Vec<Entry>, TarError> {
    let mut s = TarScanner::new(opts);
    for piece in data.chunks(step.max(1)) {
        s.feed(piece)?;
    }
    s.finish()
}

fn scan(data: &[u8]) -> Result<Vec<Entry>, TarError> {
    let a = scan_with(data, data.len().max(1), TarOptions::default());
    for step in [1, 511, 513, 4096] {
        assert_eq!(
            scan_with(data, step, TarOptions::default()),
            a,
            "step {step}"
        );
    }
    a
}

#[test]
fn basic_types_and_fields() {
    let mut t = TestTar::default();
    let off = t.file(b"./etc/passwd", b"root:x:0:0\n");
    let mut d = header(b"etc/", b'5', 0, false);
    octal(&mut d[100..108], 0o41777);
    t.entry(d, b"");
    let mut l = header(b"etc/link", b'2', 0, false);
    l[157..169].copy_from_slice(b"../x//y/./z/");
    t.entry(l, b"");
    let mut hl = header(b"etc/hard", b'1', 0, false);
    hl[157..170].copy_from_slice(b"/./etc/passwd");
    t.entry(hl, b"");
    for (name, ty) in [(&b"dev/null"[..], b'3'), (b"dev/sda", b'4')] {
        let mut h = header(name, ty, 0, false);
        octal(&mut h[329..337], 8);
        octal(&mut h[337..345], 259);
        t.entry(h, b"");
    }
    t.entry(header(b"run/fifo", b'6', 0, false), b"");
    t.entry(header(b"old/dir/", b'0', 0, false), b"");
    t.entry(header(b"c7", b'7', 3, false), b"abc");
    t.entry(header(b"./", b'5', 0, false), b"");
    let e = scan(&t.end()).unwrap();
    let names: Vec<_> = e.iter().map(|e| e.path_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "etc/passwd",
            "etc",
            "etc/link",
            "etc/hard",
            "dev/null",
            "dev/sda",
            "run/fifo",
            "old/dir",
            "c7"
        ]
    );
    assert_eq!(e[0].kind, EntryKind::File);
    assert_eq!((e[0].size, e[0].content_offset), (11, off));
    assert_eq!(
        (e[0].uid, e[0].gid, e[0].mode, e[0].mtime),
        (1000, 1001, 0o644, 1_700_000_000)
    );
    assert_eq!((e[1].kind, e[1].mode), (EntryKind::Dir, 0o1777));
    assert_eq!(e[2].link_target.as_deref(), Some(&b"../x//y/./z/"[..]));
    assert_eq!(e[3].kind, EntryKind::Hardlink);
    assert_eq!(e[3].link_target.as_deref(), Some(&b"etc/passwd"[..]));
    assert_eq!(
        (e[4].kind, e[4].dev_major, e[4].dev_minor),
        (EntryKind::CharDevice, 8, 259)
    );
    assert_eq!(e[5].kind, EntryKind::BlockDevice);
    assert_eq!(e[6].kind, EntryKind::Fifo);
    assert_eq!(e[7].kind, EntryKind::Dir);
    assert_eq!((e[8].kind, e[8].size), (EntryKind::File, 3));
}

#[test]
fn base256_numbers_and_signed_checksums() {
    let mut t = TestTar::default();
    let mut h = header(b"big", b'0', 0, true);
    h[124..136].fill(0);
    h[124] = 0x80;
    h[131..136].copy_from_slice(&[0, 0, 0, 0, 5]);
    h[108..116].copy_from_slice(&[0x80, 0, 0, 1, 0, 0, 0, 0]); // uid 2^32
    h[136..148].copy_from_slice(&[0xff; 12]); // mtime -1
    t.entry(h, b"hello");
    // A header whose checksum only matches as a signed sum.
    let mut s = header("é".as_bytes(), b'0', 0, false);
    s[148..156].copy_from_slice(b"        ");
    let signed: i64 = s.iter().map(|&b| i64::from(b as i8)).sum();
    s[148..156].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
    t.out.extend_from_slice(&s);
    let e = scan(&t.end()).unwrap();
    assert_eq!((e[0].size, e[0].uid, e[0].mtime), (5, 1 << 32, -1));
    assert_eq!(e[1].path, "é".as_bytes());
}

#[test]
fn bad_checksum_is_an_error() {
    let mut t = TestTar::default();
    t.file(b"a", b"x");
    let mut data = t.end();
    data[10] ^= 1;
    assert_eq!(scan(&data), Err(TarError::BadChecksum { offset: 0 }));
}

#[test]
fn long_names_prefix_gnu_and_pax() {
    let dir = "d".repeat(120);
    let file = "ünïcødé-文件-".repeat(6);
    let mut t = TestTar::default();
    // ustar prefix (name <= 255).
    let short: String = file.chars().take(30).collect();
    assert!(short.len() < 100);
    let mut h = header(short.as_bytes(), b'0', 0, false);
    h[345..345 + dir.len()].copy_from_slice(dir.as_bytes());
    t.entry(h, b"");
    // GNU long name and long link (> 255 bytes).
    let long = format!("{dir}/{dir}/{file}");
    let mut name = long.clone().into_bytes();
    name.push(0);
    t.meta(b'L', &name);
    t.meta(b'K', b"/some/where/very/long\0");
    t.entry(header(b"truncated", b'2', 0, true), b"");
    // PAX path with non-UTF-8 bytes.
    t.meta(b'x', &pax(&[("path", b"raw/\xff\xfe/name")]));
    t.file(b"short", b"");
    // The old GNU header has no prefix: bytes at 345 are atime.
    let mut g = header(b"gnu-name", b'0', 0, true);
    g[345..350].copy_from_slice(b"00000");
    t.entry(g, b"");
    let e = scan(&t.end()).unwrap();
    let prefix_name = format!("{dir}/{short}");
    assert_eq!(e[0].path, prefix_name.as_bytes());
    assert_eq!(e[1].path, long.as_bytes());
    assert_eq!(
        e[1].link_target.as_deref(),
        Some(&b"/some/where/very/long"[..])
    );
    assert_eq!(e[2].path, b"raw/\xff\xfe/name");
    assert_eq!(e[3].path, b"gnu-name");
}

#[test]
fn pax_keys_xattrs_and_global_headers() {
    let cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\n=\x00".to_vec();
    let mut t = TestTar::default();
    t.meta(
        b'g',
        &pax(&[("uid", b"7"), ("comment", b"git sha"), ("path", b"ignored")]),
    );
    t.meta(
        b'x',
        &pax(&[
            ("path", b"bin/ping"),
            ("size", b"4"),
            ("gid", b"123456789012"),
            ("mtime", b"1700000000.25"),
            ("uname", b"root"),
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.empty", b""),
            ("atime", b"1.5"),
        ]),
    );
    let mut h = header(b"bin/pi", b'0', 99, false);
    octal(&mut h[100..108], 0o104755);
    let off = t.entry(h, b"ping");
    t.meta(b'x', &pax(&[("linkpath", b"bin/ping"), ("uid", b"")]));
    t.entry(header(b"bin/ping6", b'1', 0, false), b"");
    let e = scan(&t.end()).unwrap();
    assert_eq!(e[0].path, b"bin/ping");
    assert_eq!(
        (e[0].size, e[0].content_offset, e[0].mode),
        (4, off, 0o4755)
    );
    assert_eq!((e[0].uid, e[0].gid), (7, 123_456_789_012));
    assert_eq!((e[0].mtime, e[0].mtime_nsec), (1_700_000_000, 250_000_000));
    assert_eq!(e[0].xattrs.get("security.capability"), Some(&cap));
    assert_eq!(e[0].xattrs.get("user.empty"), Some(&Vec::new()));
    assert_eq!(e[0].xattrs.len(), 2);
    assert_eq!(e[1].link_target.as_deref(), Some(&b"bin/ping"[..]));
    assert_eq!(e[1].uid, 7, "global uid applies; empty local value unsets");
    assert!(e[1].xattrs.is_empty(), "PAX keys apply to one entry only");
}

#[test]
fn malformed_pax_is_an_error() {
    let mut t = TestTar::default();
    t.meta(b'x', b"99 path=x\n");
    t.file(b"a", b"");
    assert!(matches!(
        scan(&t.end()),
        Err(TarError::BadPax { offset: 0, .. })
    ));
    let mut t = TestTar::default();
    t.meta(b'x', &pax(&[("mtime", b"soon")]));
    t.file(b"a", b"");
    assert!(matches!(scan(&t.end()), Err(TarError::BadPax { .. })));
}

#[test]
fn dotdot_is_rejected_and_paths_are_normalised() {
    assert_eq!(normalize(b"/a//b/./c/", 0).unwrap(), b"a/b/c");
    assert_eq!(normalize(b"./", 0).unwrap(), b"");
    assert_eq!(normalize(b"..foo/.bar", 0).unwrap(), b"..foo/.bar");
    for bad in [&b"../etc"[..], b"a/../../b", b"a/.."] {
        let mut t = TestTar::default();
        t.file(bad, b"x");
        let err = scan(&t.end()).unwrap_err();
        assert!(
            matches!(err, TarError::UnsafePath { offset: 0, .. }),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains(&String::from_utf8_lossy(bad).into_owned()));
    }
    let mut t = TestTar::default();
    let mut h = header(b"evil", b'1', 0, false);
    h[157..166].copy_from_slice(b"../passwd");
    t.entry(h, b"");
    assert!(matches!(scan(&t.end()), Err(TarError::UnsafePath { .. })));
}

/// An old GNU sparse header with `extents` (some in an extension block).
fn gnu_sparse(name: &[u8], real: u64, extents: &[(u64, u64)]) -> Vec<u8> {
    let stored: u64 = extents.iter().map(|e| e.1).sum();
    let mut h = header(name, b'S', stored, true);
    let put = |area: &mut [u8], i: usize, (o, l): (u64, u64)| {
        octal(&mut area[i * 24..i * 24 + 12], o);
        octal(&mut area[i * 24 + 12..i * 24 + 24], l);
    };
    for (i, &e) in extents.iter().take(4).enumerate() {
        put(&mut h[386..482], i, e);
    }
    octal(&mut h[483..495], real);
    let mut out = Vec::new();
    let rest: Vec<_> = extents.iter().skip(4).copied().collect();
    h[482] = u8::from(!rest.is_empty());
    seal(&mut h);
    out.extend_from_slice(&h);
    let blocks: Vec<_> = rest.chunks(21).collect();
    for (k, chunk) in blocks.iter().enumerate() {
        let mut b = [0u8; BLOCK];
        for (i, &e) in chunk.iter().enumerate() {
            put(&mut b[..504], i, e);
        }
        b[504] = u8::from(k + 1 < blocks.len());
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn gnu_old_sparse_with_extension_blocks() {
    let extents: Vec<(u64, u64)> = (0..30).map(|i| (i * 10_000, 100 + i)).collect();
    let stored: u64 = extents.iter().map(|e| e.1).sum();
    let mut t = TestTar {
        out: gnu_sparse(b"sparse.img", 1 << 20, &extents),
    };
    let off = t.out.len() as u64;
    t.out.extend(vec![7u8; stored as usize]);
    t.out.resize(t.out.len() + padding(stored) as usize, 0);
    t.file(b"after", b"z");
    let e = scan(&t.end()).unwrap();
    assert_eq!(e[0].size, 1 << 20);
    assert_eq!(e[0].content_offset, off);
    assert_eq!(off, 3 * BLOCK as u64, "header + 2 extension blocks");
    let want: Vec<_> = extents
        .iter()
        .map(|&(offset, length)| SparseExtent { offset, length })
        .collect();
    assert_eq!(e[0].sparse, want);
    assert_eq!(e[0].stored_size(), stored);
    assert_eq!(e[1].path, b"after");
    // Extents past the real size are rejected.
    let mut t = TestTar {
        out: gnu_sparse(b"bad", 10, &[(5, 10)]),
    };
    t.out.extend([0u8; BLOCK]);
    assert!(matches!(scan(&t.end()), Err(TarError::BadSparse { .. })));
}

#[test]
fn pax_sparse_formats() {
    // 1.0: map in the data area.
    let map = b"2\n0\n3\n4096\n2\n";
    let mut data = map.to_vec();
    data.resize(BLOCK, 0);
    data.extend_from_slice(b"abcde");
    let mut t = TestTar::default();
    t.meta(
        b'x',
        &pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"dir/sparse"),
            ("GNU.sparse.realsize", b"8192"),
        ]),
    );
    let off = t.entry(
        header(
            b"dir/GNUSparseFile.1/sparse",
            b'0',
            data.len() as u64,
            false,
        ),
        &data,
    );
    // 0.1: map in the PAX header.
    t.meta(
        b'x',
        &pax(&[
            ("GNU.sparse.size", b"100"),
            ("GNU.sparse.map", b"10,2,50,0"),
            ("path", b"s01"),
        ]),
    );
    let off01 = t.file(b"GNUSparseFile.0/s01", b"xy");
    // 0.0: repeated offset/numbytes; a file made only of a hole.
    t.meta(
        b'x',
        &pax(&[("GNU.sparse.size", b"77"), ("GNU.sparse.numblocks", b"0")]),
    );
    t.file(b"hole", b"");
    let e = scan(&t.end()).unwrap();
    assert_eq!(e[0].path, b"dir/sparse");
    assert_eq!(e[0].size, 8192);
    assert_eq!(e[0].content_offset, off + BLOCK as u64);
    assert_eq!(
        e[0].sparse,
        vec![
            SparseExtent {
                offset: 0,
                length: 3
            },
            SparseExtent {
                offset: 4096,
                length: 2
            }
        ]
    );
    assert_eq!(
        (e[1].path.as_slice(), e[1].size, e[1].content_offset),
        (&b"s01"[..], 100, off01)
    );
    assert_eq!(
        e[1].sparse,
        vec![SparseExtent {
            offset: 10,
            length: 2
        }]
    );
    assert_eq!(e[2].size, 77);
    assert_eq!(
        e[2].sparse,
        vec![SparseExtent {
            offset: 77,
            length: 0
        }]
    );
    assert_eq!(e[2].stored_size(), 0);
}

#[test]
fn end_of_archive_variants() {
    let mut t = TestTar::default();
    t.file(b"a", b"1");
    let body = t.out.clone();
    assert_eq!(scan(&body).unwrap().len(), 1, "EOF at a header boundary");
    let mut one = body.clone();
    one.extend([0u8; BLOCK]);
    assert_eq!(scan(&one).unwrap().len(), 1, "EOF after one zero block");
    let mut trailing = t.end();
    trailing.extend(b"trailing junk that is not a header");
    assert_eq!(scan(&trailing).unwrap().len(), 1);
    assert!(matches!(
        scan(&body[..700]),
        Err(TarError::Truncated { offset: 700, .. })
    ));
    assert!(matches!(
        scan(&body[..300]),
        Err(TarError::Truncated { .. })
    ));
    let mut orphan = TestTar::default();
    orphan.meta(b'x', &pax(&[("path", b"x")]));
    let orphan = orphan.out;
    assert!(matches!(scan(&orphan), Err(TarError::Truncated { .. })));
    let mut v = TestTar::default();
    v.entry(header(b"volume", b'V', 0, true), b"");
    v.entry(header(b"weird", b'Q', 0, false), b"");
    assert!(matches!(
        scan(&v.end()),
        Err(TarError::UnsupportedType {
            offset: 512,
            typeflag: 'Q'
        })
    ));
    assert_eq!(scan(b"").unwrap(), vec![]);
}

#[test]
fn limits_are_enforced() {
    let mut t = TestTar::default();
    for i in 0..5 {
        t.file(format!("f{i}").as_bytes(), b"");
    }
    let data = t.end();
    let opts = TarOptions {
        max_entries: 4,
        max_meta_size: 1000,
        ..TarOptions::default()
    };
    assert_eq!(
        scan_with(&data, 512, opts),
        Err(TarError::TooManyEntries { limit: 4 })
    );
    let mut t = TestTar::default();
    t.meta(b'L', &vec![b'a'; 2000]);
    t.file(b"x", b"");
    assert!(matches!(
        scan_with(&t.end(), 512, opts),
        Err(TarError::MetaTooLarge { size: 2000, .. })
    ));
}
