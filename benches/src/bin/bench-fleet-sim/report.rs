//! The simulator's tables.

use crate::params::Scenario;
use crate::sim::Outcome;
use std::time::Duration;

/// A namespace run measured on this machine, for the model to be checked against.
pub struct Measured {
    pub label: String,
    pub slowest_s: f64,
    /// Proxy egress / image: in all, or (with `per_zone`) the most into one zone.
    pub egress: f64,
    pub per_zone: bool,
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// The `p`th percentile (0..=100) of `v`, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn egress(out: &Outcome, image_bytes: u64) -> f64 {
    out.proxy_bytes_by_zone.iter().sum::<f64>() / image_bytes as f64
}

/// The model against a measured run: its error on the slowest host and on egress. With
/// several runs of the model (seeds), their mean is compared, and their range shown.
pub fn check(outs: &[Outcome], m: &Measured, image_bytes: u64) {
    let egress: Vec<f64> = (outs.iter())
        .map(|out| {
            if m.per_zone {
                max(&out.proxy_bytes_by_zone) / image_bytes as f64
            } else {
                egress(out, image_bytes)
            }
        })
        .collect();
    let slowest: Vec<f64> = outs.iter().map(|out| max(&out.finish)).collect();
    println!("Check against {}:", m.label);
    println!();
    if outs.len() > 1 {
        println!(
            "| | measured | model, mean of {} seeds (min-max) | model / measured |",
            outs.len()
        );
    } else {
        println!("| | measured | model | model / measured |");
    }
    println!("|---|---|---|---|");
    let row = |what: &str, unit: &str, measured: f64, model: &[f64]| {
        let mean = model.iter().sum::<f64>() / model.len() as f64;
        let range = if model.len() > 1 {
            let lo = model.iter().copied().fold(f64::INFINITY, f64::min);
            format!(" ({lo:.2}-{:.2})", max(model))
        } else {
            String::new()
        };
        println!(
            "| {what} | {measured:.2}{unit} | {mean:.2}{unit}{range} | {:.2} |",
            mean / measured
        );
    };
    row("slowest host's prefetch", " s", m.slowest_s, &slowest);
    let what = if m.per_zone {
        "proxy chunk egress / image, most into one zone"
    } else {
        "proxy chunk egress / image"
    };
    row(what, "", m.egress, &egress);
}

pub fn prediction(label: &str, out: &Outcome, image_bytes: u64) {
    println!(
        "Prediction, {label}: slowest host {:.2} s, proxy egress {:.2}x the image.",
        max(&out.finish),
        egress(out, image_bytes)
    );
}

pub fn fleet_header() {
    println!("Fleets pulling a 3 GB image at once (start within 1 s), 300 MB/s per host, zones of 250 hosts on 40 Gbit/s links to the core, one proxy with a 10 Gbit/s uplink:");
    println!();
    fleet_header_columns();
}

pub fn fleet_header_columns() {
    println!("| hosts | zones | policy | proxy egress (images): all / most into one zone | peer bytes across zones (images) | p50 | p99 | control messages per host, mean / max | simulated in |");
    println!("|---|---|---|---|---|---|---|---|---|");
}

pub fn fleet_row(s: &Scenario, out: &Outcome, took: Duration) {
    let image = s.image_bytes() as f64;
    let per_zone: Vec<f64> = out.proxy_bytes_by_zone.iter().map(|b| b / image).collect();
    let all = per_zone.iter().sum::<f64>();
    let control: Vec<f64> = out.control_per_host.iter().map(|&c| c as f64).collect();
    let control_mean = control.iter().sum::<f64>() / control.len().max(1) as f64;
    println!(
        "| {} | {} | {} | {:.2} / {:.2} | {:.2} | {:.1} s | {:.1} s | {:.0} / {:.0} | {:.1} s |",
        s.hosts,
        s.zones,
        s.policy.name(),
        all,
        max(&per_zone),
        out.cross_zone_peer_bytes / image,
        percentile(&out.finish, 50.0),
        percentile(&out.finish, 99.0),
        control_mean,
        max(&control),
        took.as_secs_f64()
    );
}

pub fn kraken() {
    println!();
    println!("Kraken's published benchmark (uber/kraken README): a 3 GB image of 2 layers to 2,600 hosts at once, 300 MB/s limit per agent, 5 trackers and 5 origins: p50 10 s (at the speed limit), p99 18 s, p99.9 22 s.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
