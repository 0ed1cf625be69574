//! A fleet in several subnets: one bridge per subnet (each a [`Lan`] in 198.18.0.0/15),
//! routed through the root namespace (IPv4 forwarding on while it lives), with no
//! multicast between them (the kernel routes no multicast; the agents run with
//! `mdns = false` anyway) and bootstrap peers only. The proxy listens on the first
//! subnet's gateway; what it sends into each subnet is counted by the kernel, with an
//! iptables rule per bridge (`OUTPUT -o BRIDGE -p tcp --sport PROXY_PORT`).
//!
//! [`ZonedLan::prefetch_all`] starts every host's prefetch of one image at once and
//! reports per subnet proxy egress, every host's control requests per blob and times.

use crate::daemons::{Agent, Proxy};
use crate::image::{presets, ImageInfo};
use crate::netns::Lan;
use crate::registry::Registry;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// IPv4 forwarding in the root namespace, restored on drop.
struct Forwarding {
    before: String,
}

const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Forwarding {
    fn on() -> Result<Forwarding> {
        let before = std::fs::read_to_string(FORWARD)?.trim().to_string();
        std::fs::write(FORWARD, "1").context("enabling IPv4 forwarding")?;
        Ok(Forwarding { before })
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if self.before != "1" {
            let _ = std::fs::write(FORWARD, &self.before);
        }
    }
}

/// An iptables rule counting the proxy's bytes into one bridge; deleted on drop.
struct EgressCounter {
    spec: Vec<String>,
}

impl EgressCounter {
    fn new(bridge: &str, proxy_port: u16) -> Result<EgressCounter> {
        let spec: Vec<String> = [
            "OUTPUT",
            "-o",
            bridge,
            "-p",
            "tcp",
            "--sport",
            &proxy_port.to_string(),
            "-m",
            "comment",
            "--comment",
            &format!("imgd-egress-{bridge}"),
            "-j",
            "ACCEPT",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        iptables(&["-I"], &spec)?;
        Ok(EgressCounter { spec })
    }

    /// Bytes (IP packets, headers included) the rule counted so far.
    fn bytes(&self) -> Result<u64> {
        let out = Command::new("iptables")
            .args(["-w", "-n", "-v", "-x", "-L", "OUTPUT"])
            .output()
            .context("running iptables")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tag = format!("/* {} */", self.spec[10]);
        let line = text
            .lines()
            .find(|l| l.contains(&tag))
            .with_context(|| format!("no iptables rule {tag}"))?;
        line.split_whitespace()
            .nth(1)
            .context("iptables line")?
            .parse()
            .context("iptables byte count")
    }
}

impl Drop for EgressCounter {
    fn drop(&mut self) {
        let _ = iptables(&["-D"], &self.spec);
    }
}

fn iptables(op: &[&str], spec: &[String]) -> Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(op)
        .args(spec)
        .output()
        .context("running iptables")?;
    if !out.status.success() {
        bail!("iptables: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The subnets, the proxy, the registry and one agent per host. Fields drop in order:
/// agents first, then the counters, the proxy, the subnets, forwarding, the registry.
pub struct ZonedLan {
    pub agents: Vec<Vec<Agent>>,
    counters: Vec<EgressCounter>,
    pub proxy: Proxy,
    pub lans: Vec<Lan>,
    _forwarding: Forwarding,
    pub registry: Registry,
    pub image: ImageInfo,
    pub image_size: u64,
}

/// What one prefetch of the image by every host cost and took.
#[derive(Debug)]
pub struct FleetRun {
    pub image_size: u64,
    /// Proxy bytes sent into each subnet (kernel counters, IP headers included).
    pub egress: Vec<u64>,
    /// Per host (subnet-major): its largest count of control requests for one blob.
    pub control_per_blob: Vec<u64>,
    /// Per host: seconds from the common start to its prefetch's end.
    pub seconds: Vec<f64>,
}

impl ZonedLan {
    /// `subnets` bridges of `hosts_per_subnet` hosts each, zone `zN` on subnet N, every
    /// agent with `mdns = false` and the first host of every subnet as bootstrap peers.
    /// The registry holds [`presets::big_gzip`]`(mib)` as `big:1`; the proxy is warmed.
    pub fn start(dir: &Path, subnets: usize, hosts_per_subnet: usize, mib: u64) -> Result<Self> {
        let registry = Registry::start()?;
        let (image, image_size) = crate::skopeo::push_image(
            &registry,
            &dir.join("big"),
            presets::big_gzip(mib),
            "big:1",
        )?;
        let forwarding = Forwarding::on()?;
        let lans = (0..subnets)
            .map(|_| Lan::new(hosts_per_subnet))
            .collect::<Result<Vec<_>>>()?;
        let proxy = Proxy::start_on_lan(
            &lans[0],
            &dir.join("proxy"),
            &[format!("local={}", registry.url())],
        )?;
        let (ok, _, err) = crate::process::run_ok(
            "curl",
            &["-sf", &format!("{}/v2/local/big/manifests/1", proxy.url())],
        );
        if !ok {
            bail!("warming the proxy: {err}");
        }
        let port: u16 = proxy
            .addr()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("proxy port")?;
        let counters = lans
            .iter()
            .map(|l| EgressCounter::new(&l.bridge, port))
            .collect::<Result<Vec<_>>>()?;
        // The first host of each subnet first, then everyone with those as bootstrap.
        let zone_toml = |z: usize, bootstrap: &[String]| {
            let list: Vec<String> = bootstrap.iter().map(|b| format!("{b:?}")).collect();
            format!(
                "mdns = false\nzone = \"z{z}\"\nbootstrap = [{}]\n",
                list.join(", ")
            )
        };
        let mut agents: Vec<Vec<Agent>> = (0..subnets).map(|_| Vec::new()).collect();
        let mut bootstrap = Vec::new();
        for (z, lan) in lans.iter().enumerate() {
            let a = Agent::start_on_host(&lan.hosts[0], &proxy, dir, &zone_toml(z, &bootstrap))?;
            let id = a.status()?["node_id"]
                .as_str()
                .context("node_id")?
                .to_string();
            bootstrap.push(format!("/ip4/{}/tcp/7400/p2p/{id}", lan.hosts[0].addr));
            agents[z].push(a);
        }
        for (z, lan) in lans.iter().enumerate() {
            for h in &lan.hosts[1..] {
                let a = Agent::start_on_host(h, &proxy, dir, &zone_toml(z, &bootstrap))?;
                agents[z].push(a);
            }
        }
        Ok(ZonedLan {
            agents,
            counters,
            proxy,
            lans,
            _forwarding: forwarding,
            registry,
            image,
            image_size,
        })
    }

    /// Every agent, subnet-major.
    pub fn all(&self) -> impl Iterator<Item = &Agent> {
        self.agents.iter().flatten()
    }

    /// Waits until every agent knows at least `n` peers (bounded by `timeout`).
    pub fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<()> {
        for a in self.all() {
            a.wait_for_peers(n, timeout)?;
        }
        Ok(())
    }

    /// Starts `imgctl prefetch local/big:1` on every host at once and waits for all
    /// (each bounded by `timeout`); fails if one fails.
    pub fn prefetch_all(&self, timeout: Duration) -> Result<FleetRun> {
        let before: Vec<u64> = self
            .counters
            .iter()
            .map(EgressCounter::bytes)
            .collect::<Result<_>>()?;
        let started = Instant::now();
        let agents: Vec<&Agent> = self.all().collect();
        let mut children = Vec::new();
        for a in &agents {
            let child = a.spawn_imgctl(&["prefetch", "local/big:1"])?;
            children.push(crate::process::ChildGuard::new(child, "imgctl prefetch"));
        }
        let mut seconds = vec![0.0; agents.len()];
        let mut left: Vec<usize> = (0..agents.len()).collect();
        while !left.is_empty() {
            if started.elapsed() > timeout {
                bail!(
                    "{} prefetches did not end within {timeout:?}; one agent's log:\n{}",
                    left.len(),
                    agents[left[0]].log()
                );
            }
            let mut still = Vec::new();
            for i in left {
                match children[i].try_wait()? {
                    Some(status) if !status.success() => {
                        bail!("prefetch failed on host {i}:\n{}", agents[i].log())
                    }
                    Some(_) => seconds[i] = started.elapsed().as_secs_f64(),
                    None => still.push(i),
                }
            }
            left = still;
            std::thread::sleep(Duration::from_millis(20));
        }
        let egress = self
            .counters
            .iter()
            .zip(before)
            .map(|(c, b)| Ok(c.bytes()? - b))
            .collect::<Result<Vec<u64>>>()?;
        let mut control_per_blob = Vec::new();
        for a in self.all() {
            let s = a.status()?;
            let mut most = 0;
            if let Some(blobs) = s["control_requests_by_blob"].as_object() {
                for kinds in blobs.values() {
                    let requests: u64 = kinds
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| k.as_str() != "pushed")
                        .filter_map(|(_, n)| n.as_u64())
                        .sum();
                    most = most.max(requests);
                }
            }
            control_per_blob.push(most);
        }
        Ok(FleetRun {
            image_size: self.image_size,
            egress,
            control_per_blob,
            seconds,
        })
    }
}
