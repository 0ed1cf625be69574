//! Starting `imgd-evil-peer` (a lying swarm member) on a test host.

use crate::daemons::{workspace_bin, Proxy};
use crate::guards::path_str;
use crate::netns::Host;
use crate::process::ChildGuard;
use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;

/// Starts the evil peer on `host`, lying in `mode` about `image`, keeping its key and log
/// under `dir`; waits for its "ready" line and returns it with its node id.
pub fn start_liar(
    host: &Host,
    proxy: &Proxy,
    dir: &Path,
    image: &str,
    mode: &str,
) -> (ChildGuard, String) {
    let bin = workspace_bin("imgd-evil-peer").unwrap();
    let log = dir.join("evil.log");
    let mut cmd = host.command(path_str(&bin).unwrap());
    cmd.args(["--proxy", &proxy.url(), "--image", image])
        .args(["--mode", mode, "--dir"])
        .arg(dir.join("evil"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut evil = ChildGuard::spawn(&mut cmd, "imgd-evil-peer").unwrap();
    let mut line = String::new();
    let stdout = evil.child_mut().stdout.take().unwrap();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(line.contains("ready"), "evil peer: {line}{log_text}");
    let id = line.split_whitespace().nth(2).unwrap().to_string();
    (evil, id)
}
