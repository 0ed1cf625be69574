//! Test hosts in network namespaces on one bridge, addresses in 198.18.0.0/15 only.
//!
//! `Lan::new(n)` makes a bridge in the root namespace (address `198.18.S.1/24`) and `n`
//! namespaces, each with a veth into the bridge (address `198.18.S.(10+i)/24`) and a
//! default route via the bridge, so mDNS multicast flows. Links can be shaped with `tc`
//! tbf. Everything is deleted on drop.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// One host: a network namespace with its address.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub addr: String,
    veth_host: String,
    veth_ns: String,
}

impl Host {
    /// A command that runs `program` inside this host's network namespace (with
    /// `nsenter --net`, which keeps `/sys` as is, as runc needs).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(program);
        c
    }

    /// Bytes received on this host's links (all but loopback), from `ip -s link`.
    pub fn rx_bytes(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-j", "-s", "link", "show"])
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip -s link in {}: {}",
                self.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(links
            .as_array()
            .context("ip -j output")?
            .iter()
            .filter(|l| l["ifname"] != "lo")
            .filter_map(|l| l["stats64"]["rx"]["bytes"].as_u64())
            .sum())
    }

    /// Limits this host's link to `mbit` Mbit/s in both directions (tc tbf).
    pub fn shape(&self, mbit: u32) -> Result<()> {
        let rate = format!("{mbit}mbit");
        run(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &self.veth_host,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            ],
        )?;
        let status = self
            .command("tc")
            .args([
                "qdisc",
                "replace",
                "dev",
                &self.veth_ns,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            ])
            .status()?;
        if !status.success() {
            bail!("tc in {} failed", self.ns);
        }
        Ok(())
    }
}

/// A bridge with hosts in namespaces.
pub struct Lan {
    pub bridge: String,
    /// The root namespace's address on the bridge.
    pub gateway: String,
    pub hosts: Vec<Host>,
}

impl Lan {
    /// Makes a bridge and `n` hosts (at most 200).
    pub fn new(n: usize) -> Result<Lan> {
        if n > 200 {
            bail!("at most 200 hosts");
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = (pid.wrapping_mul(7).wrapping_add(id) % 250) + 1;
        let tag = format!("{:x}{id}", pid % 0xfffff);
        let bridge = format!("ibr{tag}");
        let gateway = format!("198.18.{subnet}.1");
        let mut lan = Lan {
            bridge: bridge.clone(),
            gateway: gateway.clone(),
            hosts: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let _ = std::fs::write(
            format!("/sys/class/net/{bridge}/bridge/multicast_snooping"),
            "0",
        );
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("imgd-{tag}-{i}");
            let veth_host = format!("ih{tag}x{i}");
            let veth_ns = format!("in{tag}x{i}");
            let addr = format!("198.18.{subnet}.{}", 10 + i);
            ip(&["netns", "add", &ns])?;
            lan.hosts.push(Host {
                ns: ns.clone(),
                addr: addr.clone(),
                veth_host: veth_host.clone(),
                veth_ns: veth_ns.clone(),
            });
            ip(&[
                "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
            ])?;
            ip(&["link", "set", &veth_ns, "netns", &ns])?;
            ip(&["link", "set", &veth_host, "master", &bridge])?;
            ip(&["link", "set", &veth_host, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &veth_ns,
            ])?;
            ip(&["-n", &ns, "link", "set", &veth_ns, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &gateway])?;
        }
        Ok(lan)
    }
}

impl Lan {
    /// Bytes the root namespace sent into the bridge (what the proxy, which listens on
    /// the gateway, sent the hosts, plus a little ARP and mDNS), counted by the kernel.
    /// Frames the bridge forwards between hosts do not count here.
    pub fn bridge_tx_bytes(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["-j", "-s", "link", "show", "dev", &self.bridge])
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip -s link show dev {}: {}",
                self.bridge,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        links[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .context("no tx bytes in ip -j -s link")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = ip(&["link", "del", &h.veth_host]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
