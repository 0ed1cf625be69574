//! Fixtures shared by the mount tests: a runnable image, runc bundles, an agent.

use imgd_tests::daemons::{Agent, AgentOptions};
use imgd_tests::image::{presets, FileSpec, ImageSpec, LayerSpec};
use std::path::Path;
use std::process::Command;

/// An image with a static busybox, a greeting, and 48 MiB of data nobody reads at start.
pub fn runnable_image() -> ImageSpec {
    let base = presets::busybox_base("hello from a lazy mount").unwrap();
    let data = LayerSpec::gzip(vec![
        FileSpec::dir("data"),
        FileSpec::random("data/big-0.bin", 7, 24 << 20),
        FileSpec::random("data/big-1.bin", 8, 24 << 20),
    ]);
    ImageSpec::new("run", vec![base, data])
}

pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn agent(dir: &Path, proxy_url: &str, extra: &str) -> Agent {
    Agent::start(AgentOptions {
        extra_toml: extra.to_string(),
        ..AgentOptions::local(proxy_url, dir)
    })
    .unwrap()
}

/// A runc bundle whose rootfs is `rootfs`, running `args`.
pub fn bundle(dir: &Path, rootfs: &Path, args: &[&str]) {
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
