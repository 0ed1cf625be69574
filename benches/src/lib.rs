//! Shared helpers of the imgd benchmarks: timing, synthetic data, reporting.

use std::time::{Duration, Instant};

/// Runs `f` `runs` times and returns the fastest wall time (the least disturbed run).
pub fn best_of<T>(
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Duration, T)> {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = f()?;
        let took = start.elapsed();
        if best.as_ref().is_none_or(|(b, _)| took < *b) {
            best = Some((took, out));
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no run"))
}

/// The `i`th command-line argument as a number, or `default` when absent.
pub fn numeric_arg(i: usize, default: u64) -> anyhow::Result<u64> {
    Ok(std::env::args()
        .nth(i)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default))
}

/// MB/s (10^6 bytes per second) for `bytes` processed in `took`.
pub fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Deterministic text-like bytes that gzip compresses about 3x, like typical layer content.
pub fn compressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "container",
        "image",
        "layer",
        "chunk",
        "digest",
        "sha256",
        "registry",
        "proxy",
        "agent",
        "mount",
        "fuse",
        "runc",
        "index",
        "checkpoint",
        "inflate",
        "window",
        "tar",
        "gzip",
        "zstd",
        "manifest",
        "config",
        "rootfs",
        "whiteout",
        "symlink",
        "hardlink",
        "xattr",
    ];
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        if r.is_multiple_of(11) {
            out.extend_from_slice(&r.to_le_bytes()); // some incompressible noise
        } else {
            out.extend_from_slice(WORDS[(r >> 33) as usize % WORDS.len()].as_bytes());
            out.push(if r.is_multiple_of(7) { b'\n' } else { b' ' });
        }
    }
    out.truncate(len);
    out
}

/// Prints one result line: `name: value unit`.
pub fn report(name: &str, value: f64, unit: &str) {
    println!("{name:<52} {value:>10.2} {unit}");
}
