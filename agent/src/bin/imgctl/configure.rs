//! `imgctl configure containerd|podman`: point an engine at the agent's mirror, or undo it.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use imgd_agent::config::AgentConfig;
use imgd_agent::engine_config::{self, Engine, RegistrySpec, Report};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum EngineCommand {
    /// Write containerd hosts.toml files (config_path layout) sending pulls through the
    /// mirror; --undo restores what was there.
    Containerd(EngineArgs),
    /// Write a registries.conf.d drop-in (50-imgd.conf) sending pulls through the mirror;
    /// --undo restores what was there.
    Podman(EngineArgs),
}

#[derive(Args)]
pub struct EngineArgs {
    /// A registry to pull through the mirror: HOST (docker.io, ghcr.io, registry.lan:5000),
    /// or HOST=UPSTREAM when imgd-proxy names its upstream differently (podman only;
    /// containerd sends ?ns=HOST, so its upstream must be named HOST). Repeatable.
    #[arg(
        long = "registry",
        value_name = "HOST[=UPSTREAM]",
        required_unless_present_any = ["undo", "snapshotter"]
    )]
    registries: Vec<RegistrySpec>,
    /// The configuration directory [default: /etc/containerd/certs.d for containerd,
    /// /etc/containers/registries.conf.d for podman].
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// The agent's mirror address HOST:PORT [default: mirror_listen of the agent's
    /// configuration file, else 127.0.0.1:5050].
    #[arg(long)]
    mirror: Option<String>,
    /// The agent's configuration file, read for the mirror address.
    #[arg(long, env = "IMGD_CONFIG", default_value = "/etc/imgd/imgd.toml")]
    agent_config: PathBuf,
    /// Restore the state before the last configure run.
    #[arg(long, conflicts_with_all = ["registries", "mirror"])]
    undo: bool,
    /// containerd only: also make imgd containerd's proxy snapshotter and CRI's
    /// snapshotter in its config.toml (restart containerd afterwards).
    #[arg(long)]
    snapshotter: bool,
    /// The directory of containerd's config.toml (with --snapshotter).
    #[arg(long, default_value = "/etc/containerd")]
    containerd_dir: PathBuf,
    /// The snapshotter's socket [default: the agent configuration's, else
    /// /run/imgd/snapshotter.sock].
    #[arg(long)]
    snapshotter_socket: Option<PathBuf>,
}

/// The snapshotter socket: the flag, else the agent's configured one.
fn snapshotter_socket(args: &EngineArgs) -> Result<PathBuf> {
    if let Some(s) = &args.snapshotter_socket {
        return Ok(s.clone());
    }
    if !args.agent_config.exists() {
        return Ok(AgentConfig::default().snapshotter_socket());
    }
    let config = AgentConfig::load(&args.agent_config)
        .with_context(|| format!("reading {}", args.agent_config.display()))?;
    Ok(config.snapshotter_socket())
}

/// The mirror address: the flag, else the agent's configured `mirror_listen` (a wildcard
/// address becomes loopback), else the default.
fn mirror_addr(args: &EngineArgs) -> Result<String> {
    if let Some(m) = &args.mirror {
        return Ok(m.clone());
    }
    if !args.agent_config.exists() {
        return Ok("127.0.0.1:5050".into());
    }
    let config = AgentConfig::load(&args.agent_config)
        .with_context(|| format!("reading {}", args.agent_config.display()))?;
    let mut addr = config.mirror_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr.to_string())
}

fn print_report(report: &Report) {
    let show = |what: &str, list: &[PathBuf]| {
        for p in list {
            println!("{what} {}", p.display());
        }
    };
    show("backed up", &report.backed_up);
    show("wrote    ", &report.written);
    show("restored ", &report.restored);
    show("removed  ", &report.removed);
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Runs one `imgctl configure ENGINE` command.
pub fn run(cmd: EngineCommand) -> Result<()> {
    let (engine, args) = match cmd {
        EngineCommand::Containerd(a) => (Engine::Containerd, a),
        EngineCommand::Podman(a) => (Engine::Podman, a),
    };
    let dir = absolute(
        &args
            .config_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(engine.default_dir())),
    )?;
    if args.snapshotter && engine != Engine::Containerd {
        anyhow::bail!("--snapshotter is for containerd");
    }
    let containerd_dir = absolute(&args.containerd_dir)?;
    if args.undo {
        let mut undone = vec![(engine, dir.clone())];
        if args.snapshotter {
            undone.push((Engine::ContainerdSnapshotter, containerd_dir));
        }
        for (engine, dir) in undone {
            let report = engine_config::undo(engine, &dir)?;
            if report == Report::default() {
                println!("nothing to undo in {}", dir.display());
            }
            print_report(&report);
        }
        return Ok(());
    }
    if !args.registries.is_empty() {
        let mirror = mirror_addr(&args)?;
        let report = engine_config::configure(engine, &dir, &args.registries, &mirror)?;
        print_report(&report);
        match engine {
            Engine::Containerd => println!(
                "containerd reads these when its CRI registry config_path is {} \
                 (ctr: --hosts-dir {}); no restart is needed",
                dir.display(),
                dir.display()
            ),
            Engine::Podman => println!("podman reads the drop-in at its next pull"),
            Engine::ContainerdSnapshotter => {}
        }
    }
    if args.snapshotter {
        let socket = snapshotter_socket(&args)?;
        let hosts = (!args.registries.is_empty()).then_some(dir.as_path());
        let report = engine_config::configure_snapshotter(&containerd_dir, &socket, hosts)?;
        print_report(&report);
        println!(
            "restart containerd to load the imgd snapshotter ({}); CRI then pulls and runs \
             with snapshotter \"imgd\"",
            socket.display()
        );
    }
    Ok(())
}
