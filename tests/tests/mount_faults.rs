//! Faults under lazy mounts: a running container keeps its cached files while the proxy
//! is down or hangs, an uncached read fails with EIO within the configured bound, and the
//! container recovers without a remount. Mounts outlive the agent: after `kill -9` of
//! it cached files still read, an uncached read fails with EIO at the bound, and a
//! restarted agent takes the mount back, which then reads everything; a mount whose
//! process died is cleaned up.

mod common;

use common::{agent, bundle, runnable_image, sh};
use imgd_tests::daemons::{Agent, Proxy};
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

/// The mount process serving `dir`, per the agent's status.
fn mount_pid(a: &Agent, dir: &Path) -> u32 {
    let s = a.status().unwrap();
    let m = s["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"].as_str() == dir.to_str())
        .unwrap_or_else(|| panic!("{} not in the status: {s}", dir.display()))
        .clone();
    m["pid"].as_u64().unwrap() as u32
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn proc_stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(n - 3).map(str::to_string)
}

/// Waits (bounded) until process `pid` is gone (or a zombie).
fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match proc_stat_field(pid, 3) {
            None => return true,
            Some(state) if state == "Z" => return true,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

/// Reads all of `file` within `within`: (success, stderr, time taken).
fn read_all(file: &Path, within: Duration) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg(format!("{}", within.as_secs()))
        .args(["dd", "bs=1M", "of=/dev/null", "status=none"])
        .arg(format!("if={}", file.display()))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Every agent log under `data` (the mount process logs to the first agent's).
fn all_logs(data: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(data).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".log") {
            out += &format!("== {}\n", e.path().display());
            out += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    out
}

fn sha256_of(file: &Path) -> String {
    let sum = run_capture(
        Command::new("sha256sum").arg(file),
        "sha256sum",
        Duration::from_secs(120),
    )
    .unwrap();
    sum.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn kill_9_of_the_agent_leaves_the_mount_serving_and_a_restarted_agent_takes_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let _ = skopeo::push_image(&reg, &tmp.path().join("img"), runnable_image(), "run:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let data = tmp.path().join("agent");
    let config = "[mount]\nread_timeout_ms = 2000\n";
    let mut a = agent(&data, &proxy.url(), config);
    let lower = tmp.path().join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    let _unmount = LazyUnmount(lower.clone());
    let (ok, out, err) = a
        .imgctl(&["mount", "local/run:1", path_str(&lower).unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    let pid = mount_pid(&a, &lower);
    assert_ne!(pid, a.pid(), "a process of its own");
    assert_ne!(
        proc_stat_field(pid, 6),
        proc_stat_field(a.pid(), 6),
        "the mount process is in a session of its own"
    );
    // big-0.bin's chunks into the cache through another mount, so this mount has none of
    // it in memory: read with the agent down below, they come from the chunk files.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (ok, out, err) = a
        .imgctl(&["mount", "local/run:1", path_str(&other).unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    assert_eq!(sha256_of(&other.join("data/big-0.bin")), big_sha(0));
    let (ok, out, err) = a.imgctl(&["umount", path_str(&other).unwrap()]).unwrap();
    assert!(ok, "{out}{err}");
    let cached = lower.join("data/big-0.bin");

    // A reader paced to take several seconds over the 24 MiB file, and a descriptor of
    // the file held open across everything that follows.
    let file = lower.join("data/big-1.bin");
    let held = std::fs::File::open(&file).unwrap();
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

    // The reader reaches data the agent had not fetched: EIO within the bound, not
    // ENOTCONN, and no hang.
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
    assert!(stderr.contains("Input/output error"), "EIO: {stderr}");
    // The paced reader first goes on through what was fetched before the kill (at least
    // 8 MiB, and what was read ahead: 16 or more of its 48 steps, 0.1 s apart plus a dd
    // each), then an unservable read fails at the 2 s read bound (one the kernel reads
    // ahead may fail first, unseen by dd). Both 8.1 s and 12.2 s were seen on this
    // machine; a hang is caught above at 30 s.
    assert!(took < Duration::from_secs(16), "within the bound: {took:?}");

    // With the agent down, the mount stays: cached files read whole (from the cache's
    // chunk files: the page cache is dropped), uncached ones fail at the bound.
    assert!(std::fs::metadata(&lower).is_ok(), "no ENOTCONN");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(sha256_of(&cached), big_sha(0), "cached data, agent down");
    std::thread::sleep(Duration::from_secs(1));
    let (ok, stderr, took) = read_all(&file, Duration::from_secs(60));
    println!("uncached read with the agent down: EIO after {took:?}");
    assert!(!ok && stderr.contains("Input/output error"), "{stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "EIO at the read bound (2 s): {took:?}"
    );

    // A new agent on the same data dir takes the mount back; the same mount, through
    // the descriptor opened before the kill, reads the whole file.
    let a = agent(&data, &proxy.url(), config);
    assert_eq!(mount_pid(&a, &lower), pid, "the same mount process");
    assert!(a.log().contains("mount taken over"), "{}", a.log());
    let m = &a.status().unwrap()["mounts"][0];
    assert_eq!(m["state"], "serving", "{m}");
    assert!(m["eio"].as_u64().unwrap() > 0, "its counters survived: {m}");
    let mut held = held;
    let mut h = imgd_core::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut held, &mut buf)
            .unwrap_or_else(|e| panic!("read after the restart: {e}\n{}", all_logs(&data)));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    assert_eq!(
        h.finish().hex(),
        big_sha(1),
        "read through the open descriptor"
    );
    assert_eq!(sha256_of(&file), big_sha(1));

    // Busy: umount refuses and the mount keeps serving; closed: it goes, and so does
    // its process.
    let (ok, _, err) = a.imgctl(&["umount", path_str(&lower).unwrap()]).unwrap();
    assert!(!ok, "a busy mount is not unmounted");
    println!("umount while a file is open: {err}");
    assert_eq!(a.status().unwrap()["mounts"][0]["state"], "serving");
    drop(held);
    let (ok, out, err) = a.imgctl(&["umount", path_str(&lower).unwrap()]).unwrap();
    assert!(ok, "{out}{err}");
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "the mount process exits"
    );
    assert!(
        std::fs::read_dir(&lower).unwrap().next().is_none(),
        "unmounted"
    );
    assert_eq!(a.status().unwrap()["mounts"], serde_json::json!([]));
    a.verify_clean().unwrap();
}

#[test]
fn a_dead_mount_process_is_cleaned_up_by_the_agent_running_or_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let _ = skopeo::push_image(&reg, &tmp.path().join("img"), runnable_image(), "run:1").unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let data = tmp.path().join("agent");
    let mut a = agent(&data, &proxy.url(), "");
    let records = data.join("data/mounts");
    let lower = tmp.path().join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    let _unmount = LazyUnmount(lower.clone());
    let mount = |a: &Agent| {
        let (ok, out, err) = a
            .imgctl(&["mount", "local/run:1", path_str(&lower).unwrap()])
            .unwrap();
        assert!(ok, "mount: {out}{err}");
        assert_eq!(
            std::fs::read_dir(&records).unwrap().count(),
            1,
            "one record"
        );
        mount_pid(a, &lower)
    };
    let enotconn = || {
        std::fs::metadata(&lower)
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(107)
    };

    // The mount process dies under a running agent: the agent notices and cleans up.
    let pid = mount(&a);
    sh("kill", &["-9", &pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.status().unwrap()["mounts"] != serde_json::json!([]) {
        assert!(Instant::now() < deadline, "still listed: {}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !enotconn(),
        "the dead mount was detached: {}\n{}",
        a.log(),
        std::fs::read_to_string("/proc/self/mountinfo").unwrap()
    );
    assert!(std::fs::read_dir(&lower).unwrap().next().is_none());
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    assert!(a.log().contains("mount process exited"), "{}", a.log());

    // Both die: the next agent finds the stale mount and cleans it up.
    let pid = mount(&a);
    a.kill().unwrap();
    sh("kill", &["-9", &pid.to_string()]);
    assert!(wait_gone(pid, Duration::from_secs(10)));
    // The kernel aborts the connection as the process's descriptors close; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !enotconn() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(enotconn(), "kill -9 of both leaves ENOTCONN");
    let a = agent(&data, &proxy.url(), "");
    assert_eq!(a.status().unwrap()["mounts"], serde_json::json!([]));
    assert!(!enotconn(), "detached at start");
    assert!(std::fs::read_dir(&lower).unwrap().next().is_none());
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    assert!(a.log().contains("stale mount cleaned up"), "{}", a.log());

    // And the directory can be mounted again.
    let pid = mount(&a);
    assert_eq!(
        std::fs::read_to_string(lower.join("etc/hello.txt")).unwrap(),
        "hello from a lazy mount\n"
    );
    let (ok, out, err) = a.imgctl(&["umount", path_str(&lower).unwrap()]).unwrap();
    assert!(ok, "{out}{err}");
    assert!(wait_gone(pid, Duration::from_secs(10)));
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
