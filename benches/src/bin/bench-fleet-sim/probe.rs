//! `--probe-cpu N`: measures what the namespace runs cost in CPU, for the model's shared
//! cores. Run it next to `swarm_zones` (or any run of `imgctl prefetch` on every host):
//! it samples `/proc` every [`EVERY`], and for each of the next `N` *windows* (while at
//! least one `imgctl prefetch` process lives: the test's `prefetch_all`) prints the CPU seconds
//! (utime + stime) the agents (`imgd`), the `imgctl` clients and the proxy spent in it,
//! against the machine's busy time (`/proc/stat`), so the load of anything else shows.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often `/proc` is read.
const EVERY: Duration = Duration::from_millis(50);
/// The longest the probe waits for its windows.
const LONGEST: Duration = Duration::from_secs(1800);
/// The processes counted, by `comm`.
const AGENT: &str = "imgd";
const CLIENT: &str = "imgctl";
const PROXY: &str = "imgd-proxy";

/// Every counted process, by pid: its name, its utime + stime, and when it started
/// (seconds since boot).
type Sample = HashMap<u32, (String, f64, f64)>;

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn sample(tick: f64) -> Sample {
    let mut out = Sample::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ...`: comm may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if ![AGENT, CLIENT, PROXY].contains(&comm) {
            continue;
        }
        // Only `imgctl prefetch` clients make a window (not `imgctl verify`, say).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if comm == CLIENT && !cmdline.split(|&b| b == 0).any(|a| a == b"prefetch") {
            continue;
        }
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14 and 15 of stat(5), utime and stime: 12th and 13th after the comm.
        let cpu: f64 = [11, 12]
            .iter()
            .filter_map(|&i| rest.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        // Field 22, starttime.
        let started = rest.get(19).and_then(|v| v.parse::<f64>().ok());
        out.insert(
            pid,
            (comm.to_string(), cpu / tick, started.unwrap_or(0.0) / tick),
        );
    }
    out
}

/// Busy and total CPU seconds of the machine since boot (`/proc/stat`, all cores).
fn machine(tick: f64) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    let total: f64 = v.iter().take(8).sum();
    Ok(((total - idle) / tick, total / tick))
}

/// One window: CPU seconds per process kind, from its first sample to its last.
struct Window {
    started: Instant,
    first: Sample,
    last: Sample,
    machine_first: (f64, f64),
    /// Busy cores per second of the window.
    busy: Vec<f64>,
}

impl Window {
    fn report(&self, n: usize, machine_last: (f64, f64)) {
        let secs = self.started.elapsed().as_secs_f64();
        let mut by_kind: HashMap<&str, (usize, f64, f64, f64)> = HashMap::new();
        for (pid, (comm, cpu, _)) in &self.last {
            // A process that started in the window counts from zero.
            let before = self.first.get(pid).map_or(0.0, |(_, c, _)| *c);
            let used = cpu - before;
            let e = by_kind
                .entry(comm.as_str())
                .or_insert((0, 0.0, f64::MAX, 0.0));
            e.0 += 1;
            e.1 += used;
            e.2 = e.2.min(used);
            e.3 = e.3.max(used);
        }
        let busy = machine_last.0 - self.machine_first.0;
        let all = machine_last.1 - self.machine_first.1;
        println!(
            "window {n}: {secs:.2} s, machine busy {busy:.2} of {all:.2} CPU s ({:.2} cores)",
            busy / secs
        );
        for kind in [AGENT, CLIENT, PROXY] {
            if let Some((count, sum, min, max)) = by_kind.get(kind) {
                println!(
                    "  {kind}: {count} processes, {sum:.2} CPU s in all, {:.3} each (min {min:.2}, max {max:.2})",
                    sum / *count as f64
                );
            }
        }
        let mut starts: Vec<f64> = (self.last.values())
            .filter(|(c, _, _)| c == CLIENT)
            .map(|(_, _, at)| *at)
            .collect();
        starts.sort_by(f64::total_cmp);
        if let (Some(first), Some(last)) = (starts.first(), starts.last()) {
            println!(
                "  {CLIENT} processes started over {:.2} s (clock ticks of {:.0} ms)",
                last - first,
                1000.0 / ticks_per_s()
            );
        }
        let series: Vec<String> = self.busy.iter().map(|b| format!("{b:.1}")).collect();
        println!("  busy cores, second by second: {}", series.join(" "));
    }
}

/// Samples until `windows` windows ended (or [`LONGEST`]), printing each.
pub fn run(windows: usize) -> Result<()> {
    let tick = ticks_per_s();
    let began = Instant::now();
    let mut open: Option<Window> = None;
    let mut done = 0;
    let mut last_machine = machine(tick)?;
    let mut second = (Instant::now(), last_machine.0);
    println!("probing /proc every {EVERY:?} for {windows} window(s) of imgctl processes");
    while done < windows && began.elapsed() < LONGEST {
        let s = sample(tick);
        let m = machine(tick)?;
        let clients = s.values().filter(|(c, _, _)| c == CLIENT).count();
        match (&mut open, clients > 0) {
            (None, true) => {
                open = Some(Window {
                    started: Instant::now(),
                    first: last_sample_or(&s),
                    last: s,
                    machine_first: last_machine,
                    busy: Vec::new(),
                });
                second = (Instant::now(), m.0);
            }
            (Some(w), true) => {
                // Keep the exited clients' last figures.
                for (pid, v) in s {
                    w.last.insert(pid, v);
                }
                if second.0.elapsed() >= Duration::from_secs(1) {
                    w.busy
                        .push((m.0 - second.1) / second.0.elapsed().as_secs_f64());
                    second = (Instant::now(), m.0);
                }
            }
            (Some(_), false) => {
                if let Some(mut w) = open.take() {
                    for (pid, v) in s {
                        w.last.insert(pid, v);
                    }
                    done += 1;
                    w.report(done, m);
                }
            }
            (None, false) => {}
        }
        last_machine = m;
        std::thread::sleep(EVERY);
    }
    Ok(())
}

/// The window's baseline: the agents and the proxy as they were; clients start at zero.
fn last_sample_or(s: &Sample) -> Sample {
    s.iter()
        .filter(|(_, (c, _, _))| c != CLIENT)
        .map(|(p, v)| (*p, v.clone()))
        .collect()
}
