//! The benchmark's report: one block per link rate.

use crate::{LazyRun, RateResult};
use imgd_benches::report;

/// Prints the figures at one rate; percentages are of the compressed image (`size`, and
/// `zsize` for the zstd variant).
pub fn print_rate(r: &RateResult, size: u64, zsize: u64) {
    let base = r.full[0].as_secs_f64();
    let pct = |x: f64| 100.0 * x;
    let of_image = |b: u64| pct(b as f64 / size as f64);
    println!("== host link tbf {} Mbit/s ==", r.mbit);
    report("full pull + unpack + start (baseline)", base, "s");
    report("  of which skopeo copy", r.full[1].as_secs_f64(), "s");
    report("  of which umoci unpack", r.full[2].as_secs_f64(), "s");
    report(
        "  of which runc until the first line",
        r.full[3].as_secs_f64(),
        "s",
    );
    let lazy = |name: &str, l: &LazyRun| {
        report(name, l.took.as_secs_f64(), "s");
        report(
            "  / baseline (target <= 10%)",
            pct(l.took.as_secs_f64() / base),
            "%",
        );
        report("  of which imgctl mount", l.mount.as_secs_f64(), "s");
        report(
            "  link bytes by the first line",
            l.by_first_line as f64 / 1e6,
            "MB",
        );
        report(
            "  / compressed image (target <= 15%)",
            of_image(l.by_first_line),
            "%",
        );
        report(
            "  link bytes by the end of imgctl mount",
            l.at_mount as f64 / 1e6,
            "MB",
        );
        report(
            "  / compressed image (target <= 1%)",
            of_image(l.at_mount),
            "%",
        );
        report("  link bytes in all", l.total as f64 / 1e6, "MB");
        report(
            "  agent's chunk bytes (fetched_bytes)",
            l.fetched as f64 / 1e6,
            "MB",
        );
    };
    lazy("lazy first start (no startup trace yet)", &r.first);
    let (z, g) = (&r.zstd, &r.first);
    report("zstd variant: lazy first start", z.took.as_secs_f64(), "s");
    report(
        "  / gzip lazy first start",
        z.took.as_secs_f64() / g.took.as_secs_f64(),
        "x",
    );
    report(
        "  link bytes by the first line",
        z.by_first_line as f64 / 1e6,
        "MB",
    );
    report(
        "  / gzip link bytes by the first line",
        z.by_first_line as f64 / g.by_first_line.max(1) as f64,
        "x",
    );
    report(
        "  / compressed zstd image",
        pct(z.by_first_line as f64 / zsize as f64),
        "%",
    );
    report(
        "  agent's chunk bytes (fetched_bytes)",
        z.fetched as f64 / 1e6,
        "MB",
    );
    match &r.learned {
        Some((l, p)) => {
            lazy("learned start (trace warmed at mount)", l);
            let (pre, pre_bytes) = p.prewarm.unwrap_or_default();
            report(
                "imgctl prefetch --startup (before the mount)",
                pre.as_secs_f64(),
                "s",
            );
            report("  link bytes of the prefetch", pre_bytes as f64 / 1e6, "MB");
            report("  / compressed image", of_image(pre_bytes), "%");
            lazy("then start (bytes counted from the mount)", p);
        }
        None => println!("learned prefetch: not available yet"),
    }
}

/// The lazy starts of a quick run (`IMGD_BENCH_QUICK`) at one rate: no baseline here.
pub fn print_quick(mbit: u32, first: &LazyRun, learned: Option<&LazyRun>, size: u64) {
    println!("== host link tbf {mbit} Mbit/s (quick: no baseline) ==");
    let runs = std::iter::once(("lazy first start", first))
        .chain(learned.map(|l| ("lazy start with the learned trace", l)));
    for (name, l) in runs {
        report(name, l.took.as_secs_f64(), "s");
        report(
            "  link bytes at the end of imgctl mount",
            l.at_mount as f64 / 1e6,
            "MB",
        );
        report(
            "  link bytes by the first line",
            l.by_first_line as f64 / 1e6,
            "MB",
        );
        report(
            "  / compressed image (target <= 15%)",
            100.0 * l.by_first_line as f64 / size as f64,
            "%",
        );
    }
}
