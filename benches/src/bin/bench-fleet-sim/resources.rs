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

/// A pool of cores: a job runs on the core that frees first.
#[derive(Clone, Debug)]
pub struct Cpu {
    free_at: Vec<f64>,
}

impl Cpu {
    pub fn new(cores: usize) -> Cpu {
        Cpu {
            free_at: vec![0.0; cores.max(1)],
        }
    }

    /// Runs a job of `secs` CPU seconds ready at `now`; returns when it ends.
    pub fn run(&mut self, now: f64, secs: f64) -> f64 {
        let core = self
            .free_at
            .iter_mut()
            .min_by(|a, b| a.total_cmp(b))
            .expect("a Cpu has at least one core");
        *core = core.max(now) + secs;
        *core
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

    #[test]
    fn cores_run_jobs_side_by_side() {
        let mut c = Cpu::new(2);
        assert_eq!(c.run(0.0, 1.0), 1.0);
        assert_eq!(c.run(0.0, 1.0), 1.0);
        assert_eq!(c.run(0.0, 1.0), 2.0);
    }
}
