//! A chunk's transfer: from a peer (its uplink, the zone links when it crosses zones, the
//! receiver's downlink) or from the proxy (its serving rate, the zone's downlink, the
//! receiver's), each a FIFO [`Link`](crate::resources::Link); the sender's (and, on a
//! shared machine, the proxy's) CPU work queues beside it.

use super::{cpu_secs, CpuModel, Event, Job, Sim};

impl Sim<'_> {
    pub(super) fn start_peer(&mut self, h: u32, from: u32, chunk: u32, t: f64) {
        let bytes = self.chunk_sizes[chunk as usize];
        let sent = t + self.costs.rtt_s / 2.0;
        let mut end = self.hosts[from as usize].up.serve(sent, bytes);
        let (zf, zh) = (self.hosts[from as usize].zone, self.hosts[h as usize].zone);
        if zf != zh {
            end = end.max(self.zone_up[zf as usize].serve(sent, bytes));
            end = end.max(self.zone_down[zh as usize].serve(sent, bytes));
            self.cross_zone += bytes;
        }
        end = end.max(self.hosts[h as usize].down.serve(sent, bytes));
        let send_cpu = cpu_secs(bytes, self.costs.send_cpu_s_per_gib);
        self.compute(from, t, send_cpu, Job::Background);
        let at = end + self.costs.rtt_s / 2.0;
        self.queue.push(at, Event::Received { host: h, chunk });
    }

    pub(super) fn start_proxy(&mut self, h: u32, chunk: u32, t: f64) {
        let bytes = self.chunk_sizes[chunk as usize];
        let sent = t + self.costs.rtt_s / 2.0;
        let zone = self.hosts[h as usize].zone as usize;
        let mut end = self.proxy.serve(sent, bytes);
        end = end.max(self.zone_down[zone].serve(sent, bytes));
        end = end.max(self.hosts[h as usize].down.serve(sent, bytes));
        self.proxy_bytes_by_zone[zone] += bytes;
        if let CpuModel::Shared(_) = self.s.cpu {
            // The proxy runs on the machine the hosts share, its serving rate CPU-bound.
            let secs = bytes / self.costs.proxy_serve_bytes_s;
            self.compute(h, t, secs, Job::Background);
        }
        let scope = self.scope_of(h);
        self.scopes[scope].proxy_flight[chunk as usize] = Some(h);
        let at = end + self.costs.rtt_s / 2.0;
        self.queue.push(at, Event::Received { host: h, chunk });
    }
}
