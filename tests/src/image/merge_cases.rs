//! An image covering the layer merge rules, to compare a mount with a reference unpack.
//!
//! [`merge_cases`] has four layers (gzip, gzip, uncompressed, gzip) with whiteouts of
//! files and subtrees, opaque directories (the marker before and after the layer's own
//! entries), files and directories replacing each other, hard links (across layers, one
//! whose other name is whited out, one replaced), absolute, relative, dangling, long and
//! directory symlinks (and an entry landing through one), devices, fifos, setuid, setgid
//! and sticky bits, non-root and large (base-256) owners, extreme mtimes, `user.*` and
//! `security.capability` xattrs, empty files and directories, long and non-ASCII names,
//! a directory of [`MANY_ENTRIES`] files and a file of [`ZERO_FILE_LEN`] zero bytes.
//!
//! Two things are left out on purpose, because appliers disagree on them (see
//! `tests/tests/mount_equivalence.rs`): directories not listed before their entries (umoci
//! gives them the time of the unpack), and hard link entries whose mode, owner, mtime or
//! xattrs differ from their target's (umoci ignores them; containerd applies them).

use super::{FileSpec, ImageSpec, LayerSpec};

/// Size of `big/zeros.bin`: 600 MiB and a little more, so the last read is a partial one.
pub const ZERO_FILE_LEN: u64 = (600 << 20) + 12_345;
/// Files in the directory `many` before the top layers change it.
pub const MANY_ENTRIES: usize = 10_240;

/// A regular file of `len` zero bytes. The buffer comes from `alloc_zeroed` (fresh,
/// lazily mapped pages), so even a huge one costs no memory until it is written to.
pub fn zeros(path: impl Into<String>, len: u64) -> FileSpec {
    let len = usize::try_from(len).expect("zero file fits in memory");
    FileSpec::file(path, vec![0u8; len])
}

/// `security.capability` granting `cap_net_bind_service+ep` (VFS_CAP_REVISION_2).
pub fn capability_v2() -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted: CAP_NET_BIND_SERVICE
    v.extend_from_slice(&[0; 12]); // inheritable, and the high words
    v
}

/// A 254-byte name (NAME_MAX is 255): needs GNU long-name records in the tar.
pub fn long_name() -> String {
    format!("{}-end", "abcdefghij".repeat(25))
}

/// A 240-byte name of two-byte UTF-8 characters.
pub fn long_utf8_name() -> String {
    "é".repeat(120)
}

/// The image, named `merge`, with a `big/zeros.bin` of `zero_len` bytes.
pub fn merge_cases_with(zero_len: u64) -> ImageSpec {
    let layers = vec![
        LayerSpec::gzip(base_layer()),
        LayerSpec::gzip(vec![
            FileSpec::dir("big"),
            zeros("big/zeros.bin", zero_len).mtime(1_650_000_000),
            FileSpec::file("big/after", "an entry after the big one\n"),
        ]),
        LayerSpec::uncompressed(third_layer()),
        LayerSpec::gzip(top_layer()),
    ];
    ImageSpec::new("merge", layers)
}

/// [`merge_cases_with`] a [`ZERO_FILE_LEN`] zero file.
pub fn merge_cases() -> ImageSpec {
    merge_cases_with(ZERO_FILE_LEN)
}

fn base_layer() -> Vec<FileSpec> {
    let (long, utf8) = (long_name(), long_utf8_name());
    let long_dir = format!("names/{}", "d".repeat(200));
    let long_target = format!("../{long_dir}/{long}");
    let orig = |f: FileSpec| f.mode(0o640).owner(1000, 1000).mtime(1_500_000_000);
    let mut files = vec![
        // Whiteouts: a file, a subtree, and a neighbour that stays.
        FileSpec::dir("wh"),
        FileSpec::file("wh/file", "whited out, then written again\n"),
        FileSpec::dir("wh/tree"),
        FileSpec::file("wh/tree/a", "a\n"),
        FileSpec::dir("wh/tree/sub"),
        FileSpec::file("wh/tree/sub/b", "b\n"),
        FileSpec::file("wh/keep", "kept\n"),
        // Opaque directories (made opaque by the upper layers).
        FileSpec::dir("opq").xattr("user.layer", "lower"),
        FileSpec::file("opq/old", "hidden by the opaque marker\n"),
        FileSpec::dir("opq/olddir"),
        FileSpec::file("opq/olddir/x", "x\n"),
        FileSpec::dir("opq2"),
        FileSpec::file("opq2/old", "hidden too\n"),
        // Replacements.
        FileSpec::dir("swap"),
        FileSpec::file("swap/f2d", "a file that becomes a directory\n"),
        FileSpec::dir("swap/d2f"),
        FileSpec::file("swap/d2f/child", "gone with its directory\n"),
        FileSpec::dir("swap/d2f/sub"),
        FileSpec::dir("swap/dir2sym"),
        FileSpec::file("swap/dir2sym/x", "x\n"),
        FileSpec::symlink("swap/sym2file", "../real"),
        FileSpec::dir("replace"),
        FileSpec::file("replace/file", "version 1\n"),
        FileSpec::dir("meta"),
        FileSpec::dir("meta/dir").xattr("user.a", "1"),
        // Hard links: entries carry their target's metadata, as tar writes them.
        FileSpec::dir("links"),
        orig(FileSpec::file("links/orig", "shared content\n")).xattr("user.orig", "yes"),
        orig(FileSpec::hardlink("links/hard1", "links/orig")),
        orig(FileSpec::hardlink("links/hard2", "links/orig")),
        FileSpec::file("links/gone", "the other name survives\n"),
        FileSpec::hardlink("links/survivor", "links/gone"),
        // Symlinks.
        FileSpec::dir("real"),
        FileSpec::file("real/inner", "inside real\n"),
        FileSpec::symlink("alias", "real"),
        FileSpec::dir("sym"),
        FileSpec::symlink("sym/abs", "/etc/passwd"),
        FileSpec::symlink("sym/abs-in-image", "/links/orig"),
        FileSpec::symlink("sym/rel", "../links/orig"),
        FileSpec::symlink("sym/dangling", "does/not/exist"),
        FileSpec::symlink("sym/dir", "../real"),
        FileSpec::symlink("sym/dot", "."),
        FileSpec::symlink("sym/long", long_target),
        FileSpec::symlink("sym/owned", "x")
            .owner(1000, 1000)
            .mtime(1_234_567_890),
        // Devices and fifos.
        FileSpec::dir("dev"),
        FileSpec::char_device("dev/null", 1, 3),
        FileSpec::char_device("dev/tty5", 4, 5)
            .mode(0o620)
            .owner(0, 5),
        FileSpec::char_device("dev/bigminor", 10, 70_000),
        FileSpec::block_device("dev/sda1", 8, 1)
            .mode(0o660)
            .owner(0, 6),
        FileSpec::block_device("dev/nvme0n1p300", 259, 300),
        FileSpec::fifo("dev/fifo").mode(0o600),
        FileSpec::fifo("dev/fifo-user")
            .mode(0o640)
            .owner(1000, 1000),
        // Special bits (chown clears setuid/setgid: owners are set before modes).
        FileSpec::dir("modes"),
        FileSpec::file("modes/suid", "suid\n").mode(0o4755),
        FileSpec::file("modes/sgid", "sgid\n").mode(0o2755),
        FileSpec::file("modes/suid-user", "suid\n")
            .mode(0o4750)
            .owner(1000, 1000),
        FileSpec::file("modes/sgid-user", "sgid\n")
            .mode(0o2750)
            .owner(1000, 100),
        FileSpec::file("modes/all", "all bits\n").mode(0o7777),
        FileSpec::file("modes/none", "no bits\n").mode(0),
        FileSpec::dir("modes/sticky").mode(0o1777),
        FileSpec::dir("modes/sgid-dir").mode(0o2775).owner(0, 100),
        FileSpec::dir("modes/locked").mode(0),
        FileSpec::file("modes/locked/inside", "behind a 0000 directory\n"),
        // Owners (2e9 needs the base-256 number encoding) and mtimes.
        FileSpec::dir("own").owner(1234, 5678).mtime(1_600_000_000),
        FileSpec::file("own/user", "user\n")
            .owner(1000, 1000)
            .mode(0o600),
        FileSpec::file("own/high", "high\n").owner(100_000, 200_000),
        FileSpec::file("own/huge", "huge\n").owner(2_000_000_000, 2_000_000_001),
        FileSpec::dir("mtimes"),
        FileSpec::file("mtimes/epoch", "0\n").mtime(0),
        FileSpec::file("mtimes/one", "1\n").mtime(1),
        FileSpec::file("mtimes/y2038", "2^31\n").mtime(1 << 31),
        FileSpec::file("mtimes/y2100", "2100\n").mtime(4_102_444_800),
        // Extended attributes.
        FileSpec::dir("xattr").xattr("user.dir", "on a directory"),
        FileSpec::file("xattr/caps", "cap\n")
            .mode(0o755)
            .xattr("security.capability", capability_v2()),
        FileSpec::file("xattr/caps-user", "cap\n")
            .mode(0o750)
            .owner(1000, 1000)
            .xattr("security.capability", capability_v2()),
        FileSpec::file("xattr/user", "user xattrs\n")
            .xattr("user.text", "hello")
            .xattr("user.binary", [0u8, 1, 2, 0xff, 0, b'=', b'\n'])
            .xattr("user.long", "v".repeat(1000)),
        // Empty things.
        FileSpec::dir("empty"),
        FileSpec::file("empty/file", ""),
        FileSpec::dir("empty/dir"),
        // Names.
        FileSpec::dir("names"),
        FileSpec::file(format!("names/{long}"), "long name\n"),
        FileSpec::file(format!("names/{utf8}"), "long utf-8 name\n"),
        FileSpec::file("names/日本語のファイル名.txt", "日本語\n"),
        FileSpec::file("names/emoji 🦀 crab", "crab\n").xattr("user.é", "ü"),
        FileSpec::file("names/with space and 'quotes'", "q\n"),
        FileSpec::file("names/back\\slash = sign", "b\n").xattr("user.k", "v"),
        FileSpec::file("names/.hidden", "h\n"),
        FileSpec::dir(long_dir.clone()),
        FileSpec::file(format!("{long_dir}/{long}"), "a path of 460 bytes\n"),
        // A big directory.
        FileSpec::dir("many"),
    ];
    files.extend((0..MANY_ENTRIES).map(|i| {
        FileSpec::file(format!("many/entry-{i:05}"), format!("{i}\n"))
            .mtime(1_700_000_000 + i as u64)
    }));
    files
}

fn third_layer() -> Vec<FileSpec> {
    let orig = |f: FileSpec| f.mode(0o640).owner(1000, 1000).mtime(1_500_000_000);
    vec![
        FileSpec::whiteout("wh/file"),
        FileSpec::whiteout("wh/tree"),
        FileSpec::dir("opq")
            .mode(0o750)
            .xattr("user.layer", "upper"),
        FileSpec::opaque_whiteout("opq"),
        FileSpec::file("opq/new", "new in the opaque directory\n"),
        FileSpec::dir("opq/newdir"),
        FileSpec::file("opq/newdir/y", "y\n"),
        FileSpec::dir("swap/f2d").mode(0o700),
        FileSpec::file("swap/f2d/child", "child of the new directory\n"),
        FileSpec::file("swap/d2f", "a directory that became a file\n"),
        FileSpec::whiteout("links/gone"),
        orig(FileSpec::hardlink("links/late", "links/orig")),
        FileSpec::whiteout("many/entry-00007"),
        FileSpec::file(format!("many/entry-{MANY_ENTRIES:05}"), "added on top\n"),
        FileSpec::dir("meta/dir")
            .mode(0o700)
            .owner(42, 42)
            .mtime(1_650_000_000)
            .xattr("user.b", "2"),
        FileSpec::file("replace/file", "version 2, longer\n")
            .mode(0o600)
            .owner(7, 7),
        FileSpec::file("alias/via-alias", "landed in real through the symlink\n"),
    ]
}

fn top_layer() -> Vec<FileSpec> {
    vec![
        FileSpec::dir("opq2"),
        FileSpec::file("opq2/new", "written before the opaque marker\n"),
        FileSpec::opaque_whiteout("opq2"),
        FileSpec::symlink("swap/dir2sym", "../real"),
        FileSpec::file("swap/sym2file", "a symlink that became a file\n"),
        FileSpec::whiteout("absent"),
        FileSpec::file("wh/file", "back again\n").mode(0o444),
        FileSpec::file("links/hard2", "no longer a link\n"),
    ]
}
