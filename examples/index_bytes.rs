//! Where a lazy start's bytes go (issue 11, step 1): for each gzip layer blob given, the
//! encoded index split into file table and checkpoint windows at several checkpoint
//! spacings, and, for a read set (paths, one a line, e.g. the files a start opened),
//! the compressed bytes a span read fetches (whole spans touching each file, rounded to
//! 256 KiB pieces, union per layer) against the files' own compressed bytes.
//!
//! `cargo run --release --example index_bytes -- READ_SET LAYER_BLOB...` (base layer first)

use imgd_core::index::{index_blob, IndexOptions, LayerIndex};
use std::collections::{BTreeSet, HashMap};

fn piece() -> u64 {
    std::env::var("PIECE_KIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256)
        << 10
}

fn compressed_at(idx: &LayerIndex, u: u64) -> f64 {
    let cps = &idx.checkpoints;
    let i = cps
        .partition_point(|c| c.uncompressed_offset <= u)
        .saturating_sub(1);
    let (a, b) = (&cps[i], cps.get(i + 1));
    let (cu, cc) = b.map_or((idx.uncompressed_size, idx.compressed_size), |b| {
        (b.uncompressed_offset, b.compressed_offset)
    });
    let du = (cu - a.uncompressed_offset).max(1) as f64;
    a.compressed_offset as f64
        + (u - a.uncompressed_offset) as f64 * (cc - a.compressed_offset) as f64 / du
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let set: Vec<Vec<u8>> = std::fs::read_to_string(&args[0])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(|p| p.as_bytes().to_vec()))
        .collect();
    let blobs: Vec<Vec<u8>> = args[1..]
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;
    let image: u64 = blobs.iter().map(|b| b.len() as u64).sum();
    println!(
        "image: {} layers, {image} bytes compressed; read set: {} paths",
        blobs.len(),
        set.len()
    );
    for span in [1u64 << 20, 512 << 10, 256 << 10, 128 << 10, 64 << 10] {
        let opts = IndexOptions {
            checkpoint_compressed_span: span,
            ..IndexOptions::default()
        };
        let idxs: Vec<LayerIndex> = blobs
            .iter()
            .map(|b| index_blob(b, opts))
            .collect::<Result<_, _>>()?;
        // The owner layer of each path: the topmost that has it as a file.
        let mut owner: HashMap<&[u8], usize> = HashMap::new();
        for (l, idx) in idxs.iter().enumerate() {
            for e in &idx.entries {
                owner.insert(&e.path, l);
            }
        }
        let (mut enc, mut win, mut ncp) = (0u64, 0u64, 0usize);
        let (mut own, mut fetched, mut spans_touched, mut stored) = (0f64, 0u64, 0usize, 0u64);
        for (l, idx) in idxs.iter().enumerate() {
            enc += idx.encoded_len() + idx.windows_size;
            win += idx.windows_size;
            ncp += idx.checkpoints.len();
            let mut pieces = BTreeSet::new();
            let mut spans = BTreeSet::new();
            for p in &set {
                if owner.get(p.as_slice()) != Some(&l) {
                    continue;
                }
                let Some(e) = idx.find(p) else { continue };
                let Ok(e) = resolve(idx, e) else { continue };
                let (a, b) = (e.content_offset, e.content_offset + e.stored_size());
                if a == b {
                    continue;
                }
                stored += b - a;
                own += compressed_at(idx, b) - compressed_at(idx, a);
                let cps = &idx.checkpoints;
                let i = cps
                    .partition_point(|c| c.uncompressed_offset <= a)
                    .saturating_sub(1);
                let j = cps.partition_point(|c| c.uncompressed_offset < b);
                for k in i..j.max(i + 1) {
                    spans.insert(k);
                    let s = cps[k]
                        .compressed_offset
                        .saturating_sub(u64::from(cps[k].bits > 0));
                    let t = cps
                        .get(k + 1)
                        .map_or(idx.compressed_size, |c| c.compressed_offset);
                    for piece in s / piece()..t.div_ceil(piece()) {
                        pieces.insert(piece);
                    }
                }
            }
            spans_touched += spans.len();
            let last = idx.compressed_size.div_ceil(piece()) - 1;
            for p in pieces {
                fetched += if p == last {
                    idx.compressed_size - p * piece()
                } else {
                    piece()
                };
            }
        }
        let pct = |x: f64| 100.0 * x / image as f64;
        println!(
            "span {:>4} KiB: {ncp} checkpoints; index {enc} B ({:.2}%), windows {win} B ({:.2}%), main part {} B ({:.2}%); read set {stored} B stored, own compressed {:.0} B ({:.2}%), span reads fetch {fetched} B ({:.2}%) over {spans_touched} spans; windows needed ~{:.0} B",
            span >> 10,
            pct(enc as f64),
            pct(win as f64),
            enc - win,
            pct((enc - win) as f64),
            own,
            pct(own),
            pct(fetched as f64),
            spans_touched as f64 * win as f64 / ncp as f64,
        );
    }
    Ok(())
}

fn resolve<'a>(
    idx: &'a LayerIndex,
    e: &'a imgd_core::index::Entry,
) -> Result<&'a imgd_core::index::Entry, ()> {
    use imgd_core::index::EntryKind;
    match e.kind {
        EntryKind::File => Ok(e),
        EntryKind::Hardlink => idx
            .entries
            .iter()
            .find(|x| Some(&x.path) == e.link_target.as_ref() && x.kind == EntryKind::File)
            .ok_or(()),
        _ => Err(()),
    }
}
