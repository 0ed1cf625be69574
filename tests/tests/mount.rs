//! Lazy mounts: runc starts a container on an image mounted through imgd (overlayfs with
//! the FUSE mount as lower layer), reading only a small part of the image; a running
//! container keeps its cached files while the proxy is down, and a read no source can
//! serve fails with EIO within the configured bound; a reader gets an error, not a hang,
//! when the agent is killed, and a restarted agent serves the file whole.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::{path_str, run_capture, ImgdMount, KillOnDrop, Overlay};
use imgd_tests::image::{FileSpec, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// An image with a static busybox, a greeting, and 48 MiB of data nobody reads at start.
fn runnable_image() -> ImageSpec {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static is installed (see .ci/setup)");
    let base = LayerSpec::gzip(vec![
        FileSpec::dir("bin"),
        FileSpec::file("bin/busybox", busybox).mode(0o755),
        FileSpec::symlink("bin/sh", "busybox"),
        FileSpec::symlink("bin/cat", "busybox"),
        FileSpec::dir("etc"),
        FileSpec::file("etc/hello.txt", "hello from a lazy mount\n"),
        FileSpec::dir("tmp").mode(0o1777),
        FileSpec::dir("proc"),
        FileSpec::dir("dev"),
        FileSpec::dir("sys"),
    ]);
    let data = LayerSpec::gzip(vec![
        FileSpec::dir("data"),
        FileSpec::random("data/big-0.bin", 7, 24 << 20),
        FileSpec::random("data/big-1.bin", 8, 24 << 20),
    ]);
    ImageSpec::new("run", vec![base, data])
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn agent(dir: &Path, proxy_url: &str, extra: &str) -> Agent {
    Agent::start(AgentOptions {
        host: None,
        proxy_url: proxy_url.to_string(),
        data_dir: dir.to_path_buf(),
        extra_toml: extra.to_string(),
        swarm: false,
    })
    .unwrap()
}

/// A runc bundle whose rootfs is `rootfs`, running `args`.
fn bundle(dir: &Path, rootfs: &Path, args: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    sh("runc", &["spec", "--bundle", dir.to_str().unwrap()]);
    let path = dir.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(args);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
}

#[test]
fn runc_starts_a_container_on_a_lazy_mount_reading_a_small_part_of_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (_, image_size) =
        skopeo::push_image(&reg, &tmp.path().join("img"), runnable_image(), "run:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let a = agent(&tmp.path().join("agent"), &proxy.url(), "");

    let (lower, stdout) = run_container(
        tmp.path(),
        &a,
        "local/run:1",
        "runc",
        &[
            "/bin/sh",
            "-c",
            "cat /etc/hello.txt && echo written > /tmp/w && cat /tmp/w",
        ],
    );
    assert_eq!(stdout, "hello from a lazy mount\nwritten\n");
    assert!(
        tmp.path().join("runc-up/tmp/w").exists(),
        "writes land in the overlay's upper dir"
    );
    assert_eq!(
        std::fs::read_to_string(lower.join("etc/hello.txt")).unwrap(),
        "hello from a lazy mount\n"
    );
    assert_eq!(
        std::fs::read_link(lower.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );

    let s = a.status().unwrap();
    let m = &s["mounts"][0];
    let fetched = m["fetched_bytes"].as_u64().unwrap();
    println!("image {image_size} bytes; fetched {fetched} bytes to start the container");
    assert!(
        fetched > 0 && fetched * 4 < image_size,
        "well under the image size: {m}"
    );
    assert_eq!(m["eio"].as_u64().unwrap(), 0);

    let (ok, out, err) = a.imgctl(&["umount", lower.to_str().unwrap()]).unwrap();
    assert!(ok, "{out}{err}");
    assert!(!lower.join("etc").exists(), "unmounted");
}

/// Mounts `image` at a new dir under `tmp`, runs `args` in a runc container on an
/// overlay over it, unmounts the overlay, and returns the container's stdout.
fn run_container(
    tmp: &Path,
    a: &Agent,
    image: &str,
    name: &str,
    args: &[&str],
) -> (std::path::PathBuf, String) {
    let lower = tmp.join(format!("{name}-lower"));
    let (upper, work, merged) = (
        tmp.join(format!("{name}-up")),
        tmp.join(format!("{name}-work")),
        tmp.join(format!("{name}-merged")),
    );
    for d in [&lower, &upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (ok, out, err) = a
        .imgctl(&["mount", image, lower.to_str().unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    sh(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            merged.to_str().unwrap(),
        ],
    );
    let b = tmp.join(format!("{name}-bundle"));
    bundle(&b, &merged, args);
    let id = format!("imgd-{name}-{}", std::process::id());
    let run = Command::new("runc")
        .args(["run", "--bundle", b.to_str().unwrap(), &id])
        .output()
        .unwrap();
    let _ = Command::new("runc")
        .args(["delete", "--force", &id])
        .output();
    sh("umount", &[merged.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "runc: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    (lower, String::from_utf8_lossy(&run.stdout).into_owned())
}

#[test]
fn the_first_start_is_learned_and_later_mounts_prefetch_it() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (img, image_size) =
        skopeo::push_image(&reg, &tmp.path().join("img"), runnable_image(), "run:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();

    // First start: recorded, and stored at the proxy when the mount goes away.
    let first = agent(&tmp.path().join("first"), &proxy.url(), "");
    let (lower, out) = run_container(
        tmp.path(),
        &first,
        "local/run:1",
        "first",
        &["/bin/sh", "-c", "cat /etc/hello.txt"],
    );
    assert_eq!(out, "hello from a lazy mount\n");
    let (ok, o, e) = first.imgctl(&["umount", lower.to_str().unwrap()]).unwrap();
    assert!(ok, "{o}{e}");
    let trace: imgd_core::wire::StartupTrace = proxy
        .get(&format!("/imgd/v1/traces/{}", img.manifest.digest), &[])
        .unwrap()
        .json_as()
        .unwrap();
    let paths: Vec<String> = trace
        .paths
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        paths.contains(&"bin/busybox".to_string()) && paths.contains(&"etc/hello.txt".to_string()),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.starts_with("data/")),
        "only what the start read: {paths:?}"
    );

    // Another host mounts the image: the startup files arrive before anything reads them.
    let second = agent(&tmp.path().join("second"), &proxy.url(), "");
    let lower2 = tmp.path().join("second-lower");
    std::fs::create_dir_all(&lower2).unwrap();
    let (ok, o, e) = second
        .imgctl(&["mount", "local/run:1", lower2.to_str().unwrap()])
        .unwrap();
    assert!(ok, "{o}{e}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let warmed = loop {
        let m = second.status().unwrap()["mounts"][0].clone();
        if m["fetched_bytes"].as_u64().unwrap() > 0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no startup prefetch:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        warmed["reads"].as_u64().unwrap(),
        0,
        "fetched before any read: {warmed}"
    );
    assert!(std::fs::read(lower2.join("bin/busybox")).is_ok());
    let after = second.status().unwrap()["mounts"][0]["fetched_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after,
        warmed["fetched_bytes"].as_u64().unwrap(),
        "busybox was already there"
    );
    let (ok, o, e) = second
        .imgctl(&["umount", lower2.to_str().unwrap()])
        .unwrap();
    assert!(ok, "{o}{e}");

    // `imgctl prefetch --startup` warms just that set.
    let third = agent(&tmp.path().join("third"), &proxy.url(), "");
    let (ok, o, e) = third
        .imgctl(&["prefetch", "--startup", "local/run:1"])
        .unwrap();
    assert!(ok, "{o}{e}");
    let used = third.status().unwrap()["cache_used_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        used > 0 && used * 4 < image_size,
        "only the startup set: {used} of {image_size}"
    );
}

/// The sha256 (hex) of the image's `data/big-N.bin` (seeds as in [`runnable_image`]).
fn big_sha(n: u64) -> String {
    let content = imgd_tests::image::Content::Random {
        seed: 7 + n,
        len: 24 << 20,
    };
    imgd_core::Digest::of(&content.to_vec()).hex()
}

/// Detaches a FUSE mount on drop (after its daemon died, or if a test fails early).
struct LazyUnmount(PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn kill_9_of_the_agent_during_mount_reads_fails_the_reader_and_a_restart_reads_correctly() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let _ = skopeo::push_image(&reg, &tmp.path().join("img"), runnable_image(), "run:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let data = tmp.path().join("agent");
    let mut a = agent(&data, &proxy.url(), "");
    let lower = tmp.path().join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    let _unmount = LazyUnmount(lower.clone());
    let (ok, out, err) = a
        .imgctl(&["mount", "local/run:1", path_str(&lower).unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");

    // A reader paced to take several seconds over the 24 MiB file.
    let file = lower.join("data/big-1.bin");
    let script = format!(
        "set -o pipefail; for i in $(seq 0 47); do dd if={} bs=512k skip=$i count=1 status=none || exit 1; sleep 0.1; done | sha256sum",
        file.display()
    );
    let reader = Command::new("bash")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = KillOnDrop(Some(reader));
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.status().unwrap()["mounts"][0]["fetched_bytes"]
        .as_u64()
        .unwrap()
        < 8 << 20
    {
        assert!(Instant::now() < deadline, "the reader made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill().unwrap();
    let killed = Instant::now();

    // The reader fails, within a bound, instead of hanging.
    let child = reader.0.as_mut().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the reader hangs after the agent died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = killed.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    println!("reader ended {took:?} after kill -9: {status}, {stderr}");
    assert!(!status.success(), "the reader got an error");
    assert!(
        stderr.contains("Transport endpoint is not connected")
            || stderr.contains("Input/output error"),
        "ENOTCONN or EIO: {stderr}"
    );
    let stale = std::fs::metadata(&lower).unwrap_err();
    assert_eq!(stale.raw_os_error(), Some(107), "ENOTCONN: {stale}");
    sh("fusermount3", &["-u", "-z", path_str(&lower).unwrap()]);
    assert!(
        std::fs::read_dir(&lower).unwrap().next().is_none(),
        "cleaned"
    );

    // Restarted: no partial chunk in the cache, and a new mount reads the whole file.
    let a = agent(&data, &proxy.url(), "");
    a.verify_clean().unwrap();
    let (ok, out, err) = a
        .imgctl(&["mount", "local/run:1", path_str(&lower).unwrap()])
        .unwrap();
    assert!(ok, "mount again: {out}{err}");
    let sum = run_capture(
        Command::new("sha256sum").arg(&file),
        "sha256sum",
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(sum.split_whitespace().next(), Some(big_sha(1).as_str()));
    let (ok, out, err) = a.imgctl(&["umount", path_str(&lower).unwrap()]).unwrap();
    assert!(ok, "{out}{err}");
    a.verify_clean().unwrap();
}

/// A running `runc` container, killed and deleted on drop.
struct Container {
    id: String,
    child: KillOnDrop,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["kill", &self.id, "KILL"])
            .output();
        self.child = KillOnDrop(None);
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .output();
    }
}

/// The container's script: runs the commands the test drops into `/ctl/cmd`, one at a
/// time (`stop`, or a path to sha256sum), printing one line per command. Bounded.
const CONTAINER_LOOP: &str = r#"n=0
while [ $n -lt 6000 ]; do
  n=$((n+1))
  if [ -e /ctl/cmd ]; then
    c=$(cat /ctl/cmd); busybox rm -f /ctl/cmd
    if [ "$c" = stop ]; then echo stopped; exit 0; fi
    if s=$(busybox sha256sum "/$c" 2>&1); then echo "ok $s"; else echo "err $s"; fi
  fi
  busybox usleep 50000
done
echo "no stop command"; exit 1"#;

/// Asks the container to run `cmd` and returns its answer line and how long it took.
fn ask(ctl: &Path, lines: &mpsc::Receiver<String>, cmd: &str) -> (String, Duration) {
    let started = Instant::now();
    std::fs::write(ctl.join("cmd.tmp"), cmd).unwrap();
    std::fs::rename(ctl.join("cmd.tmp"), ctl.join("cmd")).unwrap();
    let line = lines
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("no answer to {cmd}: {e}"));
    (line, started.elapsed())
}

#[test]
fn a_running_container_keeps_its_cached_files_gets_eio_while_the_proxy_is_down_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let _ = skopeo::push_image(&reg, &tmp.path().join("img"), runnable_image(), "run:1").unwrap();
    let mut proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let a = agent(
        &tmp.path().join("agent"),
        &proxy.url(),
        "[mount]\nread_timeout_ms = 2000\n",
    );
    let mount = ImgdMount::mount(&a, "local/run:1", &tmp.path().join("lower")).unwrap();
    let overlay = Overlay::mount(mount.dir(), &tmp.path().join("ovl")).unwrap();
    let ctl = tmp.path().join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let b = tmp.path().join("bundle");
    bundle(&b, overlay.merged(), &["/bin/sh", "-c", CONTAINER_LOOP]);
    let spec_path = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"destination": "/ctl", "type": "bind", "source": ctl, "options": ["rbind", "rw"]}
        ));
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let id = format!("imgd-down-{}", std::process::id());
    let mut child = Command::new("runc")
        .args(["run", "--bundle", path_str(&b).unwrap(), &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut container = Container {
        id,
        child: KillOnDrop(Some(child)),
    };
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let (line, _) = ask(&ctl, &lines, "etc/hello.txt");
    assert!(line.starts_with("ok "), "{line}");
    let (line, _) = ask(&ctl, &lines, "data/big-0.bin");
    assert!(line.starts_with(&format!("ok {}", big_sha(0))), "{line}");

    // The proxy hangs: an uncached read fails once the read bound (2 s) has passed.
    let signal = |sig: &str| sh("kill", &[sig, &proxy.pid().to_string()]);
    signal("-STOP");
    let (line, took) = ask(&ctl, &lines, "data/big-1.bin");
    signal("-CONT");
    let eio = line.contains("I/O error") || line.contains("Input/output error");
    assert!(line.starts_with("err ") && eio, "{line}");
    assert!(
        // Not a multiple of it: the kernel's immediate retries of the page fail at once.
        took >= Duration::from_secs(2) && took < Duration::from_millis(4500),
        "EIO at the bound: {took:?}"
    );
    println!("uncached read with the proxy hanging: EIO after {took:?}");

    // The proxy goes away, and the page cache with it: the container reads through the
    // mount, and the agent serves what it cached.
    proxy.kill().unwrap();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let (line, _) = ask(&ctl, &lines, "data/big-0.bin");
    assert!(line.starts_with(&format!("ok {}", big_sha(0))), "{line}");
    let (line, took) = ask(&ctl, &lines, "data/big-1.bin");
    let eio = line.contains("I/O error") || line.contains("Input/output error");
    assert!(line.starts_with("err ") && eio, "{line}");
    assert!(
        took < Duration::from_secs(10),
        "EIO within the bound: {took:?}"
    );
    println!("uncached read with the proxy down: EIO after {took:?}");
    let (line, _) = ask(&ctl, &lines, "etc/hello.txt");
    assert!(line.starts_with("ok "), "{line}");

    // The proxy returns: the same container reads the file, without a remount (once
    // the moment in which reads of a just-failed chunk fail at once has passed).
    proxy.restart().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (line, _) = ask(&ctl, &lines, "data/big-1.bin");
    assert!(line.starts_with(&format!("ok {}", big_sha(1))), "{line}");
    let (line, _) = ask(&ctl, &lines, "stop");
    assert_eq!(line, "stopped");
    let exited = container.child.0.as_mut().unwrap().wait().unwrap();
    assert!(exited.success(), "container exit: {exited}");
    let m = &a.status().unwrap()["mounts"][0];
    assert!(m["eio"].as_u64().unwrap() > 0, "{m}");
    drop(container);
    drop(overlay);
}
