//! Faults under lazy mounts: a running container keeps its cached files while the proxy
//! is down or hangs, an uncached read fails with EIO within the configured bound, and the
//! container recovers without a remount; a reader gets an error, not a hang, when the
//! agent is killed with `kill -9`, and a restarted agent serves the file whole.

mod common;

use common::{agent, bundle, runnable_image, sh};
use imgd_tests::daemons::Proxy;
use imgd_tests::guards::{path_str, run_capture, ImgdMount, KillOnDrop, Overlay};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
