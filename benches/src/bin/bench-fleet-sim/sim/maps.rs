//! What hosts see of each other's have-maps: under the provider policy a host pushes its
//! map's changes (chunks in flight, chunks held) to its subscribers at once, or one push
//! interval after its last push (`server.rs`, `PUSH_INTERVAL_MS`), and they arrive half a
//! round trip later; under polling, a chunk a host holds shows after half a poll interval
//! on average. Each change a subscriber sees counts as news (it looks again for chunks)
//! and as movement of its view (for `owner_wait`).

use super::{Event, Policy, Sim};

/// A host's have-map pushes: at most one per interval, carrying every change since.
#[derive(Default)]
pub(super) struct Push {
    last: f64,
    scheduled: bool,
    /// (chunk, held): `false` is in flight.
    queued: Vec<(u32, bool)>,
}

impl Sim<'_> {
    /// Host `h`'s map changed (chunk in flight, or held): its subscribers see it when it
    /// next pushes (provider policy), or at their next poll.
    pub(super) fn changed(&mut self, h: u32, chunk: u32, held: bool, t: f64) {
        match self.s.policy {
            Policy::PollAll { refresh_s } => {
                if held {
                    let lag = self.rng.unit() * refresh_s + self.costs.rtt_s / 2.0;
                    self.queue.push(t + lag, Event::Visible { host: h, chunk });
                }
            }
            Policy::Providers { push_batch_s, .. } => {
                let push = &mut self.hosts[h as usize].push;
                push.queued.push((chunk, held));
                if !push.scheduled {
                    push.scheduled = true;
                    let at = t.max(push.last + push_batch_s);
                    self.queue.push(at, Event::Push(h));
                }
            }
        }
    }

    fn tell_subscribers(&mut self, host: u32, t: f64) {
        for i in 0..self.subscribers[host as usize].len() {
            let s = self.subscribers[host as usize][i] as usize;
            self.hosts[s].news += 1;
            self.hosts[s].last_news = t;
        }
    }

    pub(super) fn visible(&mut self, host: u32, chunk: u32, t: f64) {
        let scope = self.scope_of(host);
        let sc = &mut self.scopes[scope];
        sc.holders[chunk as usize].push(host);
        sc.last_moved = t;
        if sc.proxy_flight[chunk as usize] == Some(host) {
            sc.proxy_flight[chunk as usize] = None;
        }
        sc.version += 1;
        let i = host as usize * self.chunks + chunk as usize;
        self.held[i] = true;
        self.flight[i] = false;
        self.tell_subscribers(host, t);
        if !self.s.policy.home_zones() {
            return;
        }
        let home = self.home[chunk as usize] as usize;
        if scope == home && self.owner[home][chunk as usize] == host {
            // The other zones' owners of the chunk wait for this copy.
            for z in 0..self.owner.len() {
                let o = self.owner[z][chunk as usize];
                self.hosts[o as usize].news += 1;
            }
        }
        if self.owner[scope][chunk as usize] == host {
            // Every host of the zone knows the chunk's owner.
            let zone = self.hosts[host as usize].zone as usize;
            for i in 0..self.zone_members[zone].len() {
                let m = self.zone_members[zone][i];
                self.hosts[m as usize].news += 1;
            }
        }
    }

    /// Subscribers see `host` fetching `chunk` (unless they see it held already).
    pub(super) fn in_flight(&mut self, host: u32, chunk: u32, t: f64) {
        let i = host as usize * self.chunks + chunk as usize;
        if !self.held[i] {
            self.flight[i] = true;
            self.tell_subscribers(host, t);
        }
    }

    /// Host `h` pushes the changes of its map since its last push.
    pub(super) fn push(&mut self, h: u32, t: f64) {
        let push = &mut self.hosts[h as usize].push;
        push.last = t;
        push.scheduled = false;
        let delivered = t + self.costs.rtt_s / 2.0;
        for (chunk, held) in std::mem::take(&mut push.queued) {
            let host = h;
            let e = if held {
                Event::Visible { host, chunk }
            } else {
                Event::InFlight { host, chunk }
            };
            self.queue.push(delivered, e);
        }
    }
}
