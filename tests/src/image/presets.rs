//! Ready-made images.

use super::{FileSpec, ImageSpec, LayerSpec, Platform};

/// Largest layer [`big_gzip`] makes, in MiB.
const BIG_LAYER_MAX_MIB: u64 = 64;
/// Largest file [`big_gzip`] makes, in MiB.
const BIG_FILE_MAX_MIB: u64 = 16;
const MIB: u64 = 1024 * 1024;

/// A gzip base layer for a runnable image: dirs `bin etc tmp proc dev sys`, a static
/// `bin/busybox` (from the host's busybox-static) with symlinks `bin/sh` and `bin/cat`,
/// and `etc/hello.txt` holding `greeting` and a newline.
pub fn busybox_base(greeting: &str) -> anyhow::Result<LayerSpec> {
    use anyhow::Context;
    let busybox = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (busybox-static, see .ci/setup)")?;
    Ok(LayerSpec::gzip(vec![
        FileSpec::dir("bin"),
        FileSpec::file("bin/busybox", busybox).mode(0o755),
        FileSpec::symlink("bin/sh", "busybox"),
        FileSpec::symlink("bin/cat", "busybox"),
        FileSpec::dir("etc"),
        FileSpec::file("etc/hello.txt", format!("{greeting}\n")),
        FileSpec::dir("tmp").mode(0o1777),
        FileSpec::dir("proc"),
        FileSpec::dir("dev"),
        FileSpec::dir("sys"),
    ]))
}

/// Three layers (gzip, uncompressed, gzip) exercising most entry kinds, named `small`:
///
/// 1. gzip: dirs `bin etc usr usr/share usr/share/doc home home/user`; executable
///    `bin/hello` (0755), hard link `bin/hello-hard` to it, symlink `bin/hi -> hello`;
///    `etc/os-release`; `etc/config` with xattrs `user.imgd=test` and
///    `user.other=value with spaces`; `etc/old` (deleted later); `usr/share/doc/readme.txt` (64 KiB
///    compressible); `home/user/notes` owned by 1000:1000 (0600), old mtime.
/// 2. uncompressed: dirs `data dev`; `data/random.bin` (256 KiB random); fifo `data/pipe`;
///    char device `dev/null` (1:3); `etc/os-release` replaced.
/// 3. gzip: whiteout of `etc/old`; opaque whiteout of `usr/share/doc` with a new
///    `usr/share/doc/new.txt`; setuid `bin/su` (04755); an empty file `empty`.
pub fn small_multi_layer() -> ImageSpec {
    let base = LayerSpec::gzip(vec![
        FileSpec::dir("bin"),
        FileSpec::file("bin/hello", "#!/bin/sh\necho hello from imgd\n").mode(0o755),
        FileSpec::hardlink("bin/hello-hard", "bin/hello"),
        FileSpec::symlink("bin/hi", "hello"),
        FileSpec::dir("etc"),
        FileSpec::file("etc/os-release", "ID=imgd-test\nVERSION_ID=1\n"),
        FileSpec::file("etc/config", "key = value\n")
            .xattr("user.imgd", "test")
            .xattr("user.other", "value with spaces"),
        FileSpec::file("etc/old", "to be deleted by a whiteout\n"),
        FileSpec::dir("usr"),
        FileSpec::dir("usr/share"),
        FileSpec::dir("usr/share/doc"),
        FileSpec::compressible("usr/share/doc/readme.txt", 11, 64 * 1024),
        FileSpec::dir("home").mode(0o755),
        FileSpec::dir("home/user").owner(1000, 1000).mode(0o700),
        FileSpec::file("home/user/notes", "private\n")
            .owner(1000, 1000)
            .mode(0o600)
            .mtime(1_000_000_000),
    ]);
    let middle = LayerSpec::uncompressed(vec![
        FileSpec::dir("data"),
        FileSpec::random("data/random.bin", 12, 256 * 1024),
        FileSpec::fifo("data/pipe"),
        FileSpec::dir("dev"),
        FileSpec::char_device("dev/null", 1, 3),
        FileSpec::file("etc/os-release", "ID=imgd-test\nVERSION_ID=2\n"),
    ]);
    let top = LayerSpec::gzip(vec![
        FileSpec::whiteout("etc/old"),
        FileSpec::dir("usr/share/doc"),
        FileSpec::opaque_whiteout("usr/share/doc"),
        FileSpec::file("usr/share/doc/new.txt", "replaces the whole directory\n"),
        FileSpec::file("bin/su", "#!/bin/sh\nexit 1\n").mode(0o4755),
        FileSpec::file("empty", ""),
    ]);
    ImageSpec::new("small", vec![base, middle, top])
}

/// gzip layers holding `megabytes` MiB of compressible pseudo-random data in total (gzip
/// shrinks it ~2-3x), named `big`: one layer per started 64 MiB, files of at most 16 MiB
/// (`big/L/fileN.bin`), plus a small `big/L/README` each. `big_gzip(60)` is one ~60 MiB
/// layer.
pub fn big_gzip(megabytes: u64) -> ImageSpec {
    let mut layers = Vec::new();
    let mut left = megabytes * MIB;
    let mut seed = 1000;
    let mut layer_no = 0;
    while left > 0 || layers.is_empty() {
        let layer_bytes = left.min(BIG_LAYER_MAX_MIB * MIB);
        left -= layer_bytes;
        let dir = format!("big/{layer_no}");
        let mut files = vec![FileSpec::dir("big"), FileSpec::dir(dir.clone())];
        files.push(FileSpec::file(
            format!("{dir}/README"),
            format!("layer {layer_no} of big_gzip({megabytes})\n"),
        ));
        let mut in_layer = layer_bytes;
        let mut file_no = 0;
        while in_layer > 0 {
            let len = in_layer.min(BIG_FILE_MAX_MIB * MIB);
            in_layer -= len;
            files.push(FileSpec::compressible(
                format!("{dir}/file{file_no}.bin"),
                seed,
                len,
            ));
            seed += 1;
            file_no += 1;
        }
        layers.push(LayerSpec::gzip(files));
        layer_no += 1;
    }
    ImageSpec::new("big", layers)
}

/// Two images for an image index (name them with [`super::build_index_layout`]): linux/amd64
/// and linux/arm64/v8, sharing a gzip base layer, each with its own gzip top layer
/// (`arch` and a different `bin/tool`).
pub fn multi_arch() -> Vec<ImageSpec> {
    let base = LayerSpec::gzip(vec![
        FileSpec::dir("etc"),
        FileSpec::file("etc/os-release", "ID=imgd-test-multi\n"),
        FileSpec::compressible("etc/shared.txt", 21, 32 * 1024),
    ]);
    [(Platform::linux_amd64(), 22), (Platform::linux_arm64(), 23)]
        .into_iter()
        .map(|(platform, seed)| {
            let arch = platform.architecture.clone();
            let top = LayerSpec::gzip(vec![
                FileSpec::file("arch", format!("{arch}\n")),
                FileSpec::dir("bin"),
                FileSpec::random("bin/tool", seed, 16 * 1024).mode(0o755),
            ]);
            ImageSpec::new(arch, vec![base.clone(), top]).with_platform(platform)
        })
        .collect()
}
