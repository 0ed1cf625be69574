//! The daemons' command lines, run as the real binaries: a bad configuration stops them
//! at start with the key named, environment variables override the file, and every
//! binary answers `--version`.

use imgd_tests::daemons::workspace_bin;
use imgd_tests::process::{free_port, ChildGuard};
use imgd_tests::registry_client;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every variable the binaries read, so the caller's environment cannot leak in.
const ENV: &[&str] = &[
    "IMGD_PROXY_CONFIG",
    "IMGD_PROXY_LISTEN",
    "IMGD_PROXY_STORAGE_DIR",
    "IMGD_PROXY_UPSTREAMS",
    "IMGD_LOG_FORMAT",
    "IMGD_CONFIG",
    "IMGD_DATA_DIR",
    "IMGD_PROXY_URL",
    "IMGD_SOCKET",
    "IMGD_MIRROR_LISTEN",
    "IMGD_CACHE_QUOTA",
    "IMGD_NO_SWARM",
];

fn command(bin: &str, log: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin(bin).unwrap());
    for v in ENV {
        cmd.env_remove(v);
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// Runs `cmd` (whose stderr goes to `log`), which must exit within 20 s with a failure;
/// returns its stderr.
fn must_fail(mut cmd: Command, log: &Path) -> String {
    let mut child = ChildGuard::spawn(&mut cmd, "daemon").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} kept running with a bad configuration"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(log).unwrap();
    assert!(!status.success(), "{cmd:?} succeeded: {stderr}");
    stderr
}

/// Starts `bin --config FILE` with `toml` in FILE; it must fail naming `key`.
fn rejects(bin: &str, dir: &Path, toml: &str, key: &str) {
    let file = dir.join(format!("{bin}.toml"));
    std::fs::write(&file, toml).unwrap();
    let log = dir.join(format!("{bin}.log"));
    let mut cmd = command(bin, &log);
    cmd.arg("--config").arg(&file);
    let stderr = must_fail(cmd, &log);
    assert!(
        stderr.contains(key),
        "{bin} with {toml:?}: stderr does not name {key:?}:\n{stderr}"
    );
}

#[test]
fn a_bad_configuration_stops_each_daemon_at_start_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let storage = format!("storage_dir = {:?}\n", d.join("storage"));
    let upstream = "[[upstream]]\nname = \"local\"\nurl = \"http://127.0.0.1:1\"\n";
    for (toml, key) in [
        (
            format!("upstream_timeout_sec = 5\n{storage}"),
            "upstream_timeout_sec",
        ),
        (
            format!("max_manifest_bytes = \"big\"\n{storage}"),
            "max_manifest_bytes",
        ),
        (format!("log_format = \"xml\"\n{storage}"), "log_format"),
        (format!("listen = \"nowhere\"\n{storage}"), "listen"),
        (
            format!("{storage}[[upstream]]\nname = \"a\"\nurl = \"ftp://x\"\n"),
            "upstream[0].url",
        ),
        (
            format!("{storage}{upstream}[[upstream]]\nname = \"local\"\nlayout = \"/x\"\n"),
            "upstream[1].name",
        ),
    ] {
        rejects("imgd-proxy", d, &toml, key);
    }

    let base = format!(
        "data_dir = {:?}\nsocket = {:?}\nmirror_listen = \"127.0.0.1:0\"\n",
        d.join("agent"),
        d.join("agent.sock")
    );
    for (toml, key) in [
        (format!("{base}[swarm]\nmdsn = true\n"), "mdsn"),
        (
            format!("cache_quota_bytes = -1\n{base}"),
            "cache_quota_bytes",
        ),
        (format!("log_format = \"xml\"\n{base}"), "log_format"),
        (format!("{base}[mount]\nthreads = 0\n"), "mount.threads"),
        (format!("proxy_url = \"ftp://proxy\"\n{base}"), "proxy_url"),
        (format!("{base}[fetch]\npeer_timeout = 3\n"), "peer_timeout"),
    ] {
        rejects("imgd", d, &toml, key);
    }

    // A bad value in an environment variable is named too.
    for bin in ["imgd-proxy", "imgd"] {
        let log = d.join("env.log");
        let mut cmd = command(bin, &log);
        cmd.env("IMGD_LOG_FORMAT", "xml");
        let stderr = must_fail(cmd, &log);
        assert!(stderr.contains("--log-format"), "{bin}: {stderr}");
    }
}

fn get(url: &str) -> (u16, String) {
    let r = registry_client::get(url, &[]).unwrap();
    (r.status, String::from_utf8(r.body).unwrap())
}

/// Starts `cmd`, waiting for `url` to answer.
fn start(mut cmd: Command, url: &str) -> ChildGuard {
    let mut child = ChildGuard::spawn(&mut cmd, "daemon").unwrap();
    child.wait_for_http(url, Duration::from_secs(20)).unwrap();
    child
}

#[test]
fn environment_variables_configure_both_daemons() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let proxy_port = free_port().unwrap();
    let proxy_log = d.join("proxy.log");
    let mut cmd = command("imgd-proxy", &proxy_log);
    cmd.env("IMGD_PROXY_LISTEN", format!("127.0.0.1:{proxy_port}"))
        .env("IMGD_PROXY_STORAGE_DIR", d.join("storage"))
        .env(
            "IMGD_PROXY_UPSTREAMS",
            "local=http://127.0.0.1:1,other=oci:/nonexistent",
        )
        .env("IMGD_LOG_FORMAT", "json");
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    let _proxy = start(cmd, &format!("{proxy_url}/healthz"));
    assert_eq!(
        get(&format!("{proxy_url}/readyz")),
        (200, "ready\nstorage: ok\n".into())
    );
    assert!(d.join("storage/meta").is_dir(), "storage dir from the env");
    let log = std::fs::read_to_string(&proxy_log).unwrap();
    let first = log.lines().next().unwrap_or_default();
    let line: serde_json::Value = serde_json::from_str(first).expect("JSON log lines");
    assert_eq!(line["fields"]["message"], "imgd-proxy listening", "{log}");

    let mirror_port = free_port().unwrap();
    let agent_log = d.join("agent.log");
    let quota = 123 << 20;
    let mut cmd = command("imgd", &agent_log);
    cmd.env("IMGD_MIRROR_LISTEN", format!("127.0.0.1:{mirror_port}"))
        .env("IMGD_DATA_DIR", d.join("agent"))
        .env("IMGD_SOCKET", d.join("agent.sock"))
        .env("IMGD_PROXY_URL", &proxy_url)
        .env("IMGD_CACHE_QUOTA", quota.to_string())
        .env("IMGD_NO_SWARM", "true")
        .env("IMGD_LOG_FORMAT", "json");
    let agent_url = format!("http://127.0.0.1:{mirror_port}");
    let _agent = start(cmd, &format!("{agent_url}/healthz"));
    assert_eq!(
        get(&format!("{agent_url}/readyz")),
        (200, "ready\nstorage: ok\nswarm: disabled\n".into())
    );
    let (status, metrics) = get(&format!("{agent_url}/metrics"));
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("imgd_agent_cache_quota_bytes {quota}")),
        "{metrics}"
    );
    assert!(d.join("agent.sock").exists(), "socket from the env");
    assert!(d.join("agent/node.key").exists(), "data dir from the env");
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every line is JSON:\n{log}"
    );
}

#[test]
fn every_binary_answers_version_and_the_daemons_print_their_default_config() {
    for bin in ["imgd-proxy", "imgd", "imgctl"] {
        let out = Command::new(workspace_bin(bin).unwrap())
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{bin} --version");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{bin} {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
    for (bin, key) in [("imgd-proxy", "listen = "), ("imgd", "mirror_listen = ")] {
        let out = Command::new(workspace_bin(bin).unwrap())
            .arg("--print-default-config")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin}");
        assert!(text.contains(key), "{text}");
        assert!(text.contains("log_format = \"text\""), "{text}");
    }
}
