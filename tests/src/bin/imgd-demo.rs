//! `imgd-demo`: imgd's main job on embedded defaults, with no service to set up.
//!
//! Builds an OCI image layout on the spot (four layers: gzip, plain tar, gzip, and a
//! 24 MiB gzip layer), starts the real `imgd-proxy` with that layout as its upstream, pulls
//! the image through the proxy's registry API verifying every digest, then shows each
//! layer's chunks and seekable index, and reads one file from the middle of a layer by
//! fetching only the chunks that cover it.
//!
//! Run: `cargo build --workspace --bins && cargo run -p imgd-tests --bin imgd-demo`

use anyhow::{bail, Context, Result};
use imgd_core::index::{plan_read, read_file, EntryKind, LayerIndex};
use imgd_core::wire::{BlobInfo, IndexState};
use imgd_core::Digest;
use imgd_tests::daemons::Proxy;
use imgd_tests::image::{self, presets, ImageSpec};
use imgd_tests::pull::pull_verified;
use imgd_tests::registry_client::RegistryClient;

fn kind_char(k: EntryKind) -> char {
    match k {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Hardlink => 'h',
        EntryKind::CharDevice => 'c',
        EntryKind::BlockDevice => 'b',
        EntryKind::Fifo => 'p',
    }
}

fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut layers = presets::small_multi_layer().layers;
    layers.extend(presets::big_gzip(24).layers);
    let spec = ImageSpec::new("v1", layers);
    let layout = image::build_layout(&tmp.path().join("layout"), &[spec])?;
    println!(
        "== built OCI layout {} (upstream 'demo')",
        layout.dir.display()
    );

    let proxy = Proxy::start_in(
        &tmp.path().join("proxy-storage"),
        &[format!("demo=oci:{}", layout.dir.display())],
        &[],
    )?;
    println!(
        "== imgd-proxy listening on {} (pid {})\n",
        proxy.url(),
        proxy.pid()
    );

    let client = RegistryClient::new(proxy.url());
    let pulled = pull_verified(&client, "demo/app", "v1").context("pulling through the proxy")?;
    println!("pulled demo/app:v1 through the proxy, every digest verified");
    println!("  manifest {} ({})", pulled.digest, pulled.media_type);

    let img = layout.image("v1").context("image v1")?;
    let mut last = None;
    for (n, layer) in img.layers.iter().enumerate() {
        let d = layer.blob.digest;
        let info: BlobInfo = proxy.get(&format!("/imgd/v1/blobs/{d}"), &[])?.json_as()?;
        println!(
            "\nlayer {n}: {d}  {} bytes, {}",
            info.chunks.size, layer.blob.media_type
        );
        for (i, c) in info.chunks.chunks.iter().enumerate() {
            println!("  chunk {i}: {} {:>8} bytes", c.digest, c.size);
        }
        let IndexState::Indexed { digest: idx, size } = info.index else {
            bail!("layer {d} has no index: {:?}", info.index);
        };
        let bytes = proxy.get(&format!("/imgd/v1/indexes/{d}"), &[])?.body;
        let index = LayerIndex::decode(&bytes)?;
        if Digest::of(&bytes) != idx {
            bail!("index digest mismatch");
        }
        println!(
            "  index {idx}: {size} bytes, {:?}, {} entries, {} checkpoints, {} bytes uncompressed",
            index.compression,
            index.entries.len(),
            index.checkpoints.len(),
            index.uncompressed_size
        );
        for e in index.entries.iter().take(6) {
            let link = e
                .link_target
                .as_ref()
                .map(|t| format!(" -> {}", String::from_utf8_lossy(t)));
            println!(
                "    {}{:04o} {:>5}:{:<5} {:>9} {}{}",
                kind_char(e.kind),
                e.mode,
                e.uid,
                e.gid,
                e.size,
                e.path_lossy(),
                link.unwrap_or_default()
            );
        }
        if index.entries.len() > 6 {
            println!("    ... {} more", index.entries.len() - 6);
        }
        last = Some((info, index));
    }

    // Random access: 64 bytes from the middle of the last layer's largest file.
    let (info, index) = last.context("no layers")?;
    let file = index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .max_by_key(|e| e.size)
        .context("no file")?;
    let at = file.size / 2;
    let plan = plan_read(&index, file.content_offset + at, 64)?;
    let chunks = info.chunks.chunks_covering(plan.compressed.clone());
    let mut fetched = 0usize;
    let got = read_file(&index, file, at, 64, |range| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for i in info.chunks.chunks_covering(range.clone()) {
            let c = info.chunks.chunks[i];
            let body = proxy
                .get(&format!("/imgd/v1/chunks/{}", c.digest), &[])?
                .body;
            if Digest::of(&body) != c.digest {
                bail!("chunk {} failed verification", c.digest);
            }
            fetched += body.len();
            let start = info.chunks.chunk_offset(i);
            let from = range.start.saturating_sub(start) as usize;
            let to = (range.end - start).min(body.len() as u64) as usize;
            out.extend_from_slice(&body[from..to]);
        }
        Ok(out)
    })?;
    println!(
        "\nread 64 bytes at offset {at} of {} ({} bytes) from chunk(s) {:?} of {}: fetched {fetched} of {} compressed bytes",
        file.path_lossy(),
        file.size,
        chunks,
        info.chunks.chunks.len(),
        info.chunks.size
    );
    println!("  {:?}", String::from_utf8_lossy(&got[..32.min(got.len())]));
    println!("\nproxy stats: {:?}", proxy.stats()?);
    Ok(())
}
