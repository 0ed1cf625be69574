//! Building the Debian image from scratch: `debootstrap` into a `umoci` bundle, `apt-get`
//! in a chroot, and `umoci repack` after each step, which diffs the rootfs against the
//! bundle's mtree and writes the changes as a gzip layer with OCI whiteouts.
//!
//! Every command runs with its output appended to one build log and within a time limit
//! (its whole process group is killed past it); a failure names the step and quotes the
//! log's tail.

use super::{Recipe, REF_NAME};
use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound of `debootstrap` (downloads and installs about 90 packages).
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Bound of one apt layer (update, download, install).
const APT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Bound of one umoci command (a repack hashes the whole rootfs).
const UMOCI_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Lines of the build log quoted in an error.
const LOG_TAIL_LINES: usize = 40;

/// Runs in a private mount and pid namespace (so the mounts vanish with it): `/dev` and
/// `/proc` for the chroot, the host's resolver only while apt runs, then the apt layer
/// the way a Dockerfile `RUN` does it (lists and archives removed in the same layer).
const APT_STEP: &str = r#"
root=$1; shift
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive /bin/sh -ec '
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@"
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  ' sh "$@"
rm -f "$root/etc/resolv.conf"
"#;

/// Builds the image of `recipe` as the OCI layout `work/layout` (reference [`REF_NAME`]),
/// using `work/bundle` as scratch and appending every command's output to `log`.
pub(super) fn build_layout(recipe: &Recipe, work: &Path, log: &Path) -> Result<()> {
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let rootfs = bundle.join("rootfs");
    let image = format!("{}:{REF_NAME}", path_str(&layout)?);
    let umoci = |args: &[&str], what: &str| {
        run_logged(Command::new("umoci").args(args), what, log, UMOCI_TIMEOUT)
    };
    umoci(&["init", "--layout", path_str(&layout)?], "umoci init")?;
    umoci(&["new", "--image", &image], "umoci new")?;
    umoci(
        &["unpack", "--image", &image, path_str(&bundle)?],
        "umoci unpack (empty image)",
    )?;
    let repack = |created_by: &str| {
        umoci(
            &[
                "repack",
                "--refresh-bundle",
                "--image",
                &image,
                "--history.created_by",
                created_by,
                path_str(&bundle)?,
            ],
            &format!("umoci repack ({created_by})"),
        )
    };

    run_logged(
        Command::new("debootstrap")
            .args(["--variant=minbase", recipe.suite])
            .arg(&rootfs)
            .arg(&recipe.mirror),
        "debootstrap (is the debootstrap package installed? see .ci/setup)",
        log,
        DEBOOTSTRAP_TIMEOUT,
    )?;
    tidy(&rootfs)?;
    repack(&format!("debootstrap --variant=minbase {}", recipe.suite))?;

    for packages in recipe.apt_layers {
        let what = format!(
            "apt-get install --no-install-recommends {}",
            packages.join(" ")
        );
        run_logged(
            Command::new("unshare")
                .args(["--mount", "--pid", "--fork", "--kill-child", "sh", "-ec"])
                .arg(APT_STEP)
                .arg("sh")
                .arg(&rootfs)
                .args(*packages),
            &what,
            log,
            APT_TIMEOUT,
        )?;
        tidy(&rootfs)?;
        repack(&what)?;
    }

    let mut config: Vec<String> = vec!["config".into(), "--image".into(), image.clone()];
    for arg in recipe.argv {
        config.push("--config.cmd".into());
        config.push((*arg).into());
    }
    config.push("--config.env".into());
    config.push(format!("PATH={}", recipe.path_env));
    config.push("--history.created_by".into());
    config.push(format!("CMD {:?}", recipe.argv));
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    umoci(&config, "umoci config")?;
    umoci(&["gc", "--layout", path_str(&layout)?], "umoci gc")?;
    Ok(())
}

/// Removes what a real base image does not ship and what must not land in a layer: device
/// nodes (runtimes mount `/dev`), apt's lists and downloaded archives, and the host's
/// resolver and host name that debootstrap copies in.
fn tidy(rootfs: &Path) -> Result<()> {
    empty_dir(&rootfs.join("dev"))?;
    empty_dir(&rootfs.join("var/lib/apt/lists"))?;
    for dir in ["var/cache/apt/archives", "var/cache/apt/archives/partial"] {
        let dir = rootfs.join(dir);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "deb") {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    for file in [
        "etc/resolv.conf",
        "etc/hostname",
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        match fs::remove_file(rootfs.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {file}")),
        }
    }
    Ok(())
}

/// Removes everything inside `dir` (kept, if it exists), refusing if something is mounted
/// there.
fn empty_dir(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    super::refuse_if_mounted(dir)?;
    for e in entries {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Runs `cmd` in its own process group with stdout and stderr appended to `log`; kills
/// the group past `timeout`. A failure names `what` and quotes the log's tail.
fn run_logged(cmd: &mut Command, what: &str, log: &Path, timeout: Duration) -> Result<()> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening build log {}", log.display()))?;
    let err = out.try_clone()?;
    {
        use std::io::Write;
        let mut header = &out;
        writeln!(header, "\n==> {what}: {cmd:?}")?;
    }
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("{what}: spawning {cmd:?}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            // The group we created for this child: the child and what it started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "{what} did not finish within {timeout:?}; build log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!(
            "{what} failed ({status}); build log {}:\n{}",
            log.display(),
            log_tail(log)
        );
    }
    Ok(())
}

fn log_tail(log: &Path) -> String {
    let text = File::open(log)
        .and_then(|mut f| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut f, &mut s).map(|_| s)
        })
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
