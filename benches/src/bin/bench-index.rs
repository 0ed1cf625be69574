//! Indexing throughput: chunk + index a gzip layer of 100+ MB, against `gzip -dc` of the
//! same file and against a plain inflate with the same inflate library (zlib-rs); then the
//! same tar as plain zstd (`zstd -3`, indexed with its seekable copy written) and as
//! zstd:chunked (made by `podman push --compression-format zstd:chunked`, read from its
//! own frames, TOC checked), each against `zstd -dc` of the same blob; all measured in
//! this run.
//!
//! `cargo run --release -p imgd-benches --bin bench-index [-- MB]` (MB of tar, default 320)

use anyhow::bail;
use imgd_benches::{best_of, compressible_bytes, mb_per_s, report};
use imgd_core::index::{IndexBuilder, IndexOptions};
use imgd_core::store::ContentStore;
use imgd_core::{Chunker, Digest};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

const PIECE: usize = 256 << 10;

/// Writes `dir/layer.tar` from `tar_mb` MiB of files, and `dir/layer.tar.gz` (gzip -6);
/// returns the gzip blob.
fn make_layer(dir: &Path, tar_mb: usize) -> anyhow::Result<Vec<u8>> {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("usr/share/data"))?;
    let mut left = tar_mb << 20;
    let mut i = 0u64;
    while left > 0 {
        // Files from 1 KiB to 8 MiB, as in a real image.
        let size = (1usize << (10 + (i % 14))).min(left);
        std::fs::write(
            root.join(format!("usr/share/data/f{i:05}")),
            compressible_bytes(size, i),
        )?;
        left -= size;
        i += 1;
    }
    let layer = dir.join("layer.tar.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {root} -cf {dir}/layer.tar . && gzip -6 -c {dir}/layer.tar > {layer}",
            root = root.display(),
            dir = dir.display(),
            layer = layer.display()
        ))
        .status()?;
    if !status.success() {
        bail!("tar | gzip failed");
    }
    std::fs::remove_dir_all(&root)?;
    Ok(std::fs::read(&layer)?)
}

/// `dir/layer.tar` as `dir/layer.tar.zst` (`zstd -3`).
fn make_zstd(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let st = Command::new("zstd")
        .args(["-q", "-3", "-f", "-o"])
        .arg(dir.join("layer.tar.zst"))
        .arg(dir.join("layer.tar"))
        .status()?;
    if !st.success() {
        bail!("zstd failed");
    }
    Ok(std::fs::read(dir.join("layer.tar.zst"))?)
}

/// `dir/layer.tar` as a zstd:chunked blob made by podman (private store under `dir`),
/// written to `dir/layer.zstd-chunked`.
fn make_zstd_chunked(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let podman = |args: &[&str]| -> anyhow::Result<()> {
        let st = Command::new("podman")
            .arg("--root")
            .arg(dir.join("podman/storage"))
            .arg("--runroot")
            .arg(dir.join("podman/run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("podman {args:?} failed");
        }
        Ok(())
    };
    let tar = dir.join("layer.tar");
    podman(&[
        "import",
        "-q",
        &tar.to_string_lossy(),
        "localhost/bench-index:1",
    ])?;
    let oci = dir.join("oci");
    let dest = format!("oci:{}", oci.display());
    podman(&[
        "push",
        "-q",
        "--compression-format",
        "zstd:chunked",
        "localhost/bench-index:1",
        &dest,
    ])?;
    let read = |d: &str| {
        std::fs::read(
            oci.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(oci.join("index.json"))?)?;
    let digest = |v: &serde_json::Value| v["digest"].as_str().map(str::to_string);
    let manifest_digest =
        digest(&index["manifests"][0]).ok_or_else(|| anyhow::anyhow!("no manifest"))?;
    let manifest: serde_json::Value = serde_json::from_slice(&read(&manifest_digest)?)?;
    let layer = digest(&manifest["layers"][0]).ok_or_else(|| anyhow::anyhow!("no layer"))?;
    let blob = read(&layer)?;
    std::fs::remove_dir_all(dir.join("podman"))?;
    std::fs::remove_dir_all(&oci)?;
    std::fs::write(dir.join("layer.zstd-chunked"), &blob)?;
    Ok(blob)
}

fn zstd_dc(path: &Path) -> anyhow::Result<()> {
    let st = Command::new("zstd")
        .arg("-qdc")
        .arg(path)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("zstd -dc failed");
    }
    Ok(())
}

/// Indexes `blob` in one thread (the copy's chunks of a plain zstd layer are dropped as
/// they fill, where the proxy stores them); returns the entry count and whether the
/// layer is read from its own frames with a checked TOC.
fn index_only(blob: &[u8]) -> anyhow::Result<(usize, bool)> {
    let mut b = IndexBuilder::new(IndexOptions::default());
    for piece in blob.chunks(PIECE) {
        b.push(piece)?;
        drop(b.take_copy_chunks());
    }
    let index = b.finish(Digest::of(b""))?;
    Ok((index.entries.len(), index.toc.is_some()))
}

fn gzip_dc(path: &Path) -> anyhow::Result<()> {
    let st = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("gzip -dc failed");
    }
    Ok(())
}

/// Plain streaming inflate with zlib-rs, output discarded: the floor for any indexer.
fn plain_inflate(blob: &[u8]) -> anyhow::Result<u64> {
    use libz_rs_sys::*;
    let mut out = vec![0u8; PIECE];
    // SAFETY: z_stream is a plain C struct for which all-zero is the documented initial
    // state before inflateInit2_; the buffers outlive every inflate call below.
    unsafe {
        let mut strm: z_stream = std::mem::zeroed();
        let ver = zlibVersion();
        if inflateInit2_(
            &mut strm,
            15 + 32,
            ver,
            std::mem::size_of::<z_stream>() as i32,
        ) != Z_OK
        {
            bail!("inflateInit2 failed");
        }
        strm.next_in = blob.as_ptr() as *mut _;
        strm.avail_in = blob.len() as u32;
        let mut total = 0u64;
        loop {
            strm.next_out = out.as_mut_ptr();
            strm.avail_out = out.len() as u32;
            let rc = inflate(&mut strm, Z_NO_FLUSH);
            total += (out.len() - strm.avail_out as usize) as u64;
            if rc == Z_STREAM_END {
                break;
            }
            if rc != Z_OK {
                inflateEnd(&mut strm);
                bail!("inflate failed: {rc}");
            }
        }
        inflateEnd(&mut strm);
        Ok(total)
    }
}

/// The proxy's ingest work: one thread chunks (sha256 of chunks and blob, staged files
/// when `store` is given), another inflates and indexes; fed in 256 KiB pieces.
fn chunk_and_index(blob: &[u8], store: Option<&ContentStore>) -> anyhow::Result<usize> {
    let digest = Digest::of(blob);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<&[u8]>(16);
        let indexer = s.spawn(move || -> anyhow::Result<usize> {
            let mut b = IndexBuilder::new(IndexOptions::default());
            for piece in rx {
                b.push(piece)?;
                drop(b.take_copy_chunks());
            }
            Ok(b.finish(digest)?.entries.len())
        });
        let mut chunker = Chunker::new();
        let mut staging = store.map(|s| s.staging());
        let mut emit = |_, c: imgd_core::ChunkRef, bytes: bytes::Bytes| match staging.as_mut() {
            Some(st) => st.add(c.digest, &bytes),
            None => Ok(()),
        };
        for piece in blob.chunks(PIECE) {
            tx.send(piece)
                .map_err(|_| anyhow::anyhow!("indexer stopped"))?;
            chunker.push(piece, &mut emit)?;
        }
        drop(tx);
        let list = chunker.finish(&mut emit)?;
        if list.blob != digest {
            bail!("chunker digest differs");
        }
        if let Some(st) = staging {
            st.commit()?;
        }
        indexer
            .join()
            .map_err(|_| anyhow::anyhow!("indexer panicked"))?
    })
}

fn main() -> anyhow::Result<()> {
    let tar_mb: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(320);
    let dir = tempfile::tempdir()?;
    eprintln!("building a gzip layer from {tar_mb} MiB of files ...");
    let blob = make_layer(dir.path(), tar_mb)?;
    let layer = dir.path().join("layer.tar.gz");
    let n = blob.len() as u64;
    println!("layer: {:.1} MB gzip, {} MiB tar", n as f64 / 1e6, tar_mb);

    let runs = 3;
    let (t_gzip, _) = best_of(runs, || gzip_dc(&layer))?;
    let (t_plain, out) = best_of(runs, || plain_inflate(&blob))?;
    let (t_index_only, _) = best_of(runs, || index_only(&blob))?;
    let (t_index, entries) = best_of(runs, || chunk_and_index(&blob, None))?;
    let (t_store, _) = best_of(runs, || {
        let store_dir = tempfile::tempdir_in(dir.path())?;
        let store = ContentStore::open(store_dir.path(), "chunks")?;
        chunk_and_index(&blob, Some(&store))
    })?;
    println!(
        "uncompressed {:.1} MB, {entries} entries; best of {runs} runs; MB/s of compressed input",
        out as f64 / 1e6
    );
    report("gzip -dc (baseline)", mb_per_s(n, t_gzip), "MB/s");
    report(
        "plain inflate, zlib-rs (baseline)",
        mb_per_s(n, t_plain),
        "MB/s",
    );
    report("index only, one thread", mb_per_s(n, t_index_only), "MB/s");
    report("chunk + index", mb_per_s(n, t_index), "MB/s");
    report(
        "chunk + index + store chunks (fsync)",
        mb_per_s(n, t_store),
        "MB/s",
    );
    let ratio = |base: std::time::Duration, ours: std::time::Duration| {
        base.as_secs_f64() / ours.as_secs_f64()
    };
    report(
        "ratio chunk+index / gzip -dc (target >= 0.9)",
        ratio(t_gzip, t_index),
        "x",
    );
    report(
        "ratio chunk+index / plain inflate (target >= 0.9)",
        ratio(t_plain, t_index),
        "x",
    );
    report(
        "ratio chunk+index+store / gzip -dc",
        ratio(t_gzip, t_store),
        "x",
    );

    eprintln!("compressing the same tar with zstd -3 and as zstd:chunked (podman) ...");
    for (name, blob, path) in [
        (
            "zstd",
            make_zstd(dir.path())?,
            dir.path().join("layer.tar.zst"),
        ),
        (
            "zstd:chunked",
            make_zstd_chunked(dir.path())?,
            dir.path().join("layer.zstd-chunked"),
        ),
    ] {
        let n = blob.len() as u64;
        let (t_dc, _) = best_of(runs, || zstd_dc(&path))?;
        let (t_only, (_, toc)) = best_of(runs, || index_only(&blob))?;
        let (t_both, _) = best_of(runs, || chunk_and_index(&blob, None))?;
        let how = if toc {
            "own frames, TOC checked"
        } else {
            "seekable copy written"
        };
        println!(
            "{name}: {:.1} MB ({how}); MB/s of compressed input",
            n as f64 / 1e6
        );
        report(
            &format!("{name}: zstd -dc (baseline)"),
            mb_per_s(n, t_dc),
            "MB/s",
        );
        report(
            &format!("{name}: index only, one thread"),
            mb_per_s(n, t_only),
            "MB/s",
        );
        report(
            &format!("{name}: chunk + index"),
            mb_per_s(n, t_both),
            "MB/s",
        );
        report(
            &format!("ratio {name} chunk+index / zstd -dc"),
            ratio(t_dc, t_both),
            "x",
        );
    }
    Ok(())
}
