//! Links and CPUs as FIFO servers.
//!
//! A transfer crosses several links (sender's uplink, zone links, receiver's downlink).
//! Each link serves the bytes handed to it in order at its own rate, independently of the
//! others, as packets do when they are small against a 4 MiB chunk; the transfer is whole
//! when its last link has served it. This keeps a link from idling while a transfer waits
//! on another one, at the price of ignoring TCP's ramp-up (a chunk is many windows long).

/// One direction of a link: `rate` bytes per second, busy until `free_at`.
#[derive(Clone, Debug)]
pub struct Link {
    pub rate: f64,
    free_at: f64,
}

impl Link {
    pub fn new(rate: f64) -> Link {
        Link { rate, free_at: 0.0 }
    }

    /// Queues `bytes` handed over at `now`; returns when the last of them has left.
    pub fn serve(&mut self, now: f64, bytes: f64) -> f64 {
        if !self.rate.is_finite() {
            return now;
        }
        self.free_at = self.free_at.max(now) + bytes / self.rate;
        self.free_at
    }

    /// When this link would be done with what it has been given.
    pub fn free_at(&self) -> f64 {
        self.free_at
    }
}

/// A pool of cores shared by the jobs on it as the kernel shares them (processor sharing):
/// each of `n` jobs runs at `min(1, cores / n)` of a core, so `n` equal jobs on `c < n`
/// cores all end after `n / c` times their work. A job carries what follows it (`T`).
///
/// The engine asks for the next completion after each change ([`Cpu::submit`],
/// [`Cpu::complete`]) and queues it with the returned epoch; a completion whose epoch is
/// no longer current was superseded by a later change and is dropped.
#[derive(Clone, Debug)]
pub struct Cpu<T> {
    cores: f64,
    jobs: Vec<(f64, T)>,
    at: f64,
    epoch: u64,
}

/// When a CPU's next job ends and the epoch to queue that under; `None` when idle.
pub type Next = Option<(f64, u64)>;

/// CPU work below this (seconds) is done: what float rounding leaves of a finished job.
const DONE: f64 = 1e-9;

impl<T> Cpu<T> {
    pub fn new(cores: usize) -> Cpu<T> {
        Cpu {
            cores: cores.max(1) as f64,
            jobs: Vec::new(),
            at: 0.0,
            epoch: 0,
        }
    }

    fn rate(&self) -> f64 {
        (self.cores / self.jobs.len().max(1) as f64).min(1.0)
    }

    fn advance(&mut self, now: f64) {
        let dt = now - self.at;
        if dt > 0.0 {
            let done = dt * self.rate();
            for j in &mut self.jobs {
                j.0 -= done;
            }
            self.at = now;
        }
    }

    /// When the next job ends as things stand, with the epoch to queue it under.
    fn next(&mut self) -> Next {
        self.epoch += 1;
        let least = self.jobs.iter().map(|j| j.0).min_by(f64::total_cmp)?;
        Some((self.at + least.max(0.0) / self.rate(), self.epoch))
    }

    /// Adds a job of `secs` CPU seconds ready at `now`; returns the next completion.
    pub fn submit(&mut self, now: f64, secs: f64, then: T) -> Next {
        self.advance(now);
        self.jobs.push((secs, then));
        self.next()
    }

    /// At a queued completion: the jobs done by `now` and the next completion; `None`
    /// for a superseded one.
    pub fn complete(&mut self, now: f64, epoch: u64) -> Option<(Vec<T>, Next)> {
        if epoch != self.epoch {
            return None;
        }
        self.advance(now);
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.jobs.len() {
            if self.jobs[i].0 <= DONE {
                done.push(self.jobs.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        Some((done, self.next()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_queues_what_it_is_given_in_order() {
        let mut l = Link::new(100.0);
        assert_eq!(l.serve(0.0, 100.0), 1.0);
        assert_eq!(l.serve(0.5, 100.0), 2.0);
        assert_eq!(l.serve(5.0, 50.0), 5.5);
        assert_eq!(Link::new(f64::INFINITY).serve(3.0, 1e9), 3.0);
    }

    /// Runs `jobs` (ready time, CPU seconds) to the end; returns when each ended.
    fn ends(cores: usize, jobs: &[(f64, f64)]) -> Vec<f64> {
        let mut cpu = Cpu::new(cores);
        let mut ends = vec![f64::NAN; jobs.len()];
        let mut next = None;
        let mut arrivals = jobs.iter().enumerate().peekable();
        loop {
            let arrival = arrivals.peek().map(|(_, j)| j.0);
            match (arrival, next) {
                (Some(a), n) if n.is_none_or(|(t, _)| a <= t) => {
                    let (i, &(at, secs)) = arrivals.next().unwrap();
                    next = cpu.submit(at, secs, i);
                }
                (_, Some((t, epoch))) => {
                    let (done, n) = cpu.complete(t, epoch).unwrap();
                    for i in done {
                        ends[i] = t;
                    }
                    next = n;
                }
                (None, None) => return ends,
                (Some(_), None) => unreachable!(),
            }
        }
    }

    #[test]
    fn jobs_share_the_cores_and_end_in_proportion_to_their_number() {
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
        // Fewer jobs than cores: each at full speed.
        assert!(close(&ends(2, &[(0.0, 1.0), (0.0, 1.0)]), &[1.0, 1.0]));
        // Three equal jobs on two cores: all end at 1.5 s, not 1, 1 and 2.
        assert!(close(&ends(2, &[(0.0, 1.0); 3]), &[1.5; 3]));
        // 32 hosts' start-ups of 0.1 s on 2 cores end after 1.6 s.
        let many = ends(2, &[(0.0, 0.1); 32]);
        assert!(many.iter().all(|t| (t - 1.6).abs() < 1e-9), "{many:?}");
        // A short job arriving later shares with the long one: the long one slows down.
        assert!(close(&ends(1, &[(0.0, 2.0), (1.0, 0.5)]), &[2.5, 2.0]));
    }
}
