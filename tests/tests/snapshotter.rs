//! imgd as containerd's proxy snapshotter, against a private containerd 1.6: images
//! pulled with `ctr-remote images rpull` or through the CRI plugin start from imgd's lazy
//! views without containerd downloading a layer (gzip and zstd images alike); an image
//! imgd cannot serve lazily (zstd layers with a window over the proxy's limit) takes the
//! ordinary overlayfs path and still runs; removing the image unmounts its view;
//! and a container keeps running through a `kill -9` of the agent.

use imgd_tests::containerd::{Containerd, ContainerdOptions, CriOptions};
use imgd_tests::cri::{self, Cri};
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::guards::path_str;
use imgd_tests::image::{presets, FileSpec, ImageInfo, ImageSpec, LayerSpec};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo::{self, Format};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;
/// Two files of the data layer; the command reads only the small one.
const BIG: u64 = 24 * MIB;
const SMALL: u64 = 64 * 1024;

/// Busybox base, a gzip layer with a big file nobody reads and a small one, and an
/// uncompressed top layer; `greeting` makes each image's base (and config) its own.
fn app_image(greeting: &str) -> ImageSpec {
    let base = presets::busybox_base(greeting).unwrap();
    let data = LayerSpec::gzip(vec![
        FileSpec::dir("data"),
        FileSpec::random("data/big.bin", 11, BIG),
        FileSpec::random("data/small.bin", 12, SMALL),
    ]);
    let top = LayerSpec::uncompressed(vec![FileSpec::file("etc/motd", "from the top layer\n")]);
    ImageSpec::new("app", vec![base, data, top])
}

const COMMAND: &str = "cat /etc/hello.txt /etc/motd; wc -c < /data/small.bin";

fn expected(greeting: &str) -> Vec<String> {
    vec![
        greeting.to_string(),
        "from the top layer".to_string(),
        SMALL.to_string(),
    ]
}

/// A registry, a proxy in front of it (upstream `local`), and an agent whose snapshotter
/// containerd loads as the proxy plugin `imgd`.
struct Setup {
    reg: Registry,
    proxy: Proxy,
    agent: Agent,
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::start().unwrap();
        let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
        let agent =
            Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent"))).unwrap();
        Setup {
            reg,
            proxy,
            agent,
            tmp,
        }
    }

    /// Pushes `spec` as `local/NAME` (digests preserved); returns the image and the
    /// reference containerd pulls it by (through the proxy).
    fn push(&self, spec: ImageSpec, name: &str) -> (ImageInfo, String) {
        let dir = self
            .tmp
            .path()
            .join(format!("img-{}", name.replace([':', '/'], "-")));
        let (info, _) = skopeo::push_image(&self.reg, &dir, spec, name).unwrap();
        (info, format!("{}/local/{name}", self.proxy.addr()))
    }

    fn snapshotter_socket(&self) -> PathBuf {
        self.agent.data_dir.join("snapshotter.sock")
    }

    /// Layer blob bytes the proxy served through its registry API so far.
    fn proxy_blob_bytes(&self) -> u64 {
        self.proxy.stats().unwrap().blob_bytes_served
    }
}

fn layer_bytes(image: &ImageInfo) -> u64 {
    image.layers.iter().map(|l| l.blob.size).sum()
}

/// Layer digests present in containerd's content store (namespace `ns`).
fn layers_in_content_store(ctrd: &Containerd, ns: &str, image: &ImageInfo) -> Vec<String> {
    let out = run_ctr_ns(ctrd, ns, &["content", "ls", "-q"]);
    image
        .layers
        .iter()
        .map(|l| l.blob.digest.to_string())
        .filter(|d| out.lines().any(|l| l.trim() == d))
        .collect()
}

fn run_ctr_ns(ctrd: &Containerd, ns: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("ctr");
    cmd.arg("--address")
        .arg(ctrd.socket())
        .args(["--namespace", ns])
        .args(args);
    imgd_tests::guards::run_capture(&mut cmd, &format!("ctr -n {ns} {args:?}"), STEP)
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", ctrd.log()))
}

/// containerd downloaded no layer of `image`: none is in its content store (namespace
/// `ns`), and the proxy served no layer blob since `served_before` (the config alone is
/// far smaller than any layer).
fn assert_no_layer_downloaded(
    s: &Setup,
    ctrd: &Containerd,
    ns: &str,
    image: &ImageInfo,
    served_before: u64,
) {
    let present = layers_in_content_store(ctrd, ns, image);
    assert!(
        present.is_empty(),
        "layers in containerd's content store: {present:?}"
    );
    let served = s.proxy_blob_bytes() - served_before;
    assert!(
        served <= image.config.size,
        "the proxy served {served} blob bytes to containerd (config {})",
        image.config.size
    );
}

/// The imgd mounts the agent reports (the snapshotter's views among them).
fn agent_mounts(agent: &Agent) -> Vec<serde_json::Value> {
    agent.status().unwrap()["mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn is_fuse_mount(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let d = dir.to_string_lossy().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(d.as_str()) && l.contains("fuse"))
}

#[test]
fn ctr_remote_rpull_runs_from_the_lazy_view_without_downloading_layers_and_gc_unmounts_it() {
    let s = Setup::new();
    let greeting = "hello from a lazy containerd start";
    let (image, reference) = s.push(app_image(greeting), "app:1");
    let ctrd = Containerd::start_with(&ContainerdOptions {
        imgd_snapshotter: Some(s.snapshotter_socket()),
        ..Default::default()
    })
    .unwrap();
    let served_before = s.proxy_blob_bytes();

    ctrd.rpull(&reference, "imgd", STEP)
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctrd.log(), s.agent.log()));

    let out = ctrd
        .run_ctr(
            &[
                "run",
                "--rm",
                "--snapshotter",
                "imgd",
                &reference,
                "lazy-1",
                "sh",
                "-c",
                COMMAND,
            ],
            STEP,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.agent.log()));
    let lines: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(lines, expected(greeting), "{out}");

    assert_no_layer_downloaded(
        &s,
        &ctrd,
        imgd_tests::containerd::NAMESPACE,
        &image,
        served_before,
    );
    // Every layer is a placeholder; the agent read far less than the image.
    let snaps = ctrd
        .run_ctr(&["snapshots", "--snapshotter", "imgd", "ls"], STEP)
        .unwrap();
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        3,
        "{snaps}"
    );
    let status = s.agent.status().unwrap();
    let fetched = status["bytes_from_proxy"].as_u64().unwrap();
    assert!(
        fetched * 4 < layer_bytes(&image),
        "the agent fetched {fetched} of {} layer bytes",
        layer_bytes(&image)
    );
    let mounts = agent_mounts(&s.agent);
    assert_eq!(mounts.len(), 1, "one view for the image: {mounts:?}");
    let view = PathBuf::from(mounts[0]["dir"].as_str().unwrap());
    assert!(is_fuse_mount(&view));

    // Removing the image frees its snapshots, and the last one unmounts the view.
    ctrd.run_ctr(&["images", "rm", "--sync", &reference], STEP)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snaps = ctrd
            .run_ctr(&["snapshots", "--snapshotter", "imgd", "ls"], STEP)
            .unwrap();
        if snaps.lines().count() <= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshots left after images rm: {snaps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent_mounts(&s.agent).is_empty(),
        "{:?}",
        agent_mounts(&s.agent)
    );
    assert!(!is_fuse_mount(&view), "the view is still mounted");
    s.agent.verify_clean().unwrap();
}

/// A tiny pod sandbox image: busybox sleeping until killed.
fn pause_image() -> ImageSpec {
    let base = presets::busybox_base("pause").unwrap();
    let mut spec = ImageSpec::new("pause", vec![base]);
    spec.cmd = vec!["/bin/busybox".into(), "sleep".into(), "86400".into()];
    spec
}

/// Writes containerd's hosts.toml for `host` (plain http) under `certs`.
fn plain_http_host(certs: &Path, host: &str) {
    let dir = certs.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
}

impl Setup {
    /// Pushes `app_image(greeting)` with its layers recompressed by `zstd ARGS` as `name`.
    fn push_zstd(&self, greeting: &str, zstd_args: &[&str], name: &str) -> (ImageInfo, String) {
        let dir = self
            .tmp
            .path()
            .join(format!("img-{}", name.replace([':', '/'], "-")));
        let built =
            imgd_tests::image::build_layout(&dir.join("src"), &[app_image(greeting)]).unwrap();
        let src = built.image("app").unwrap();
        let out = dir.join("zstd");
        let info = imgd_tests::image::zstd_copy_with(&built, src, &out, "app", zstd_args).unwrap();
        skopeo::push_layout(
            &out,
            "app",
            &self.reg.docker_ref(name),
            Format::OciExact,
            false,
        )
        .unwrap();
        (info, format!("{}/local/{name}", self.proxy.addr()))
    }
}

#[test]
fn cri_starts_pods_from_lazy_views_of_gzip_and_zstd_images_and_an_unindexable_layer_takes_the_full_path(
) {
    let s = Setup::new();
    let greeting = "hello from a lazy CRI start";
    let (image, reference) = s.push(app_image(greeting), "app:1");
    let (_, pause) = s.push(pause_image(), "pause:1");
    // The same kind of image with zstd layers (`zstd -3`): served lazily through the
    // proxy's seekable copies.
    let zstd_greeting = "hello from a zstd image";
    let (zimage, zstd_reference) = s.push_zstd(zstd_greeting, &["-3"], "zstd:1");
    // zstd layers with a 256 MiB window (`--long=28`), over the proxy's window limit:
    // stored and served, but not indexed, so they take the full path.
    let long_greeting = "hello from a long-window zstd image";
    let (_, long_reference) = s.push_zstd(long_greeting, &["-3", "--long=28"], "zstd-long:1");

    let certs = s.tmp.path().join("certs.d");
    plain_http_host(&certs, &s.proxy.addr());
    let ctrd = Containerd::start_with(&ContainerdOptions {
        imgd_snapshotter: Some(s.snapshotter_socket()),
        cri: Some(CriOptions {
            sandbox_image: pause.clone(),
            hosts_dir: certs.clone(),
            snapshotter: "imgd".into(),
        }),
        ..Default::default()
    })
    .unwrap();
    let mut cri = Cri::connect_when_ready(ctrd.socket(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctrd.log()));
    let logs = s.tmp.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    let mut pods = Vec::new();
    for (name, image, reference, greeting) in [
        ("lazy", &image, &reference, greeting),
        ("zstd", &zimage, &zstd_reference, zstd_greeting),
    ] {
        let served_before = s.proxy_blob_bytes();
        cri.pull(reference)
            .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctrd.log(), s.agent.log()));
        assert_no_layer_downloaded(&s, &ctrd, "k8s.io", image, served_before);
        let pod = cri
            .run_pod(name, reference, &["sh", "-c", COMMAND], &logs)
            .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctrd.log(), s.agent.log()));
        assert_eq!(cri.wait_exited(&pod.container_id, STEP).unwrap(), 0);
        assert_eq!(cri::log_lines(&pod.log_path), expected(greeting));
        pods.push(pod);
    }
    assert!(
        !s.agent.log().contains("layer takes the full path"),
        "no layer of the gzip and zstd images took the full path: {}",
        s.agent.log()
    );

    // The long-window image is unpacked by containerd on imgd's overlayfs path, and runs.
    let served_before = s.proxy_blob_bytes();
    cri.pull(&long_reference)
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctrd.log(), s.agent.log()));
    let log = s.agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("layer takes the full path") && l.contains("window larger than")),
        "the agent did not say why: {log}"
    );
    assert!(
        s.proxy_blob_bytes() - served_before > BIG,
        "containerd downloaded the layers"
    );
    let lpod = cri
        .run_pod("long", &long_reference, &["sh", "-c", COMMAND], &logs)
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctrd.log(), s.agent.log()));
    assert_eq!(cri.wait_exited(&lpod.container_id, STEP).unwrap(), 0);
    assert_eq!(cri::log_lines(&lpod.log_path), expected(long_greeting));
    pods.push(lpod);

    for pod in &pods {
        cri.remove_pod(pod).unwrap();
    }
    s.agent.verify_clean().unwrap();
}

/// Waits for `path` to exist; returns its content.
fn wait_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_container_on_a_lazy_snapshot_survives_kill_9_of_the_agent() {
    let mut s = Setup::new();
    let greeting = "hello before the crash";
    let (_, reference) = s.push(app_image(greeting), "app:1");
    let ctrd = Containerd::start_with(&ContainerdOptions {
        imgd_snapshotter: Some(s.snapshotter_socket()),
        ..Default::default()
    })
    .unwrap();
    ctrd.rpull(&reference, "imgd", STEP).unwrap();

    // The container reads a small file, then waits; on cue it reads it again (cached),
    // and on a second cue the big file it never read (uncached).
    let ctl = s.tmp.path().join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let script = "sha256sum /data/small.bin > /ctl/first; \
                  while [ ! -e /ctl/go1 ]; do sleep 0.05; done; sha256sum /data/small.bin > /ctl/cached; \
                  while [ ! -e /ctl/go2 ]; do sleep 0.05; done; sha256sum /data/big.bin > /ctl/uncached";
    let mount = format!(
        "type=bind,src={},dst=/ctl,options=rbind:rw",
        path_str(&ctl).unwrap()
    );
    ctrd.run_ctr(
        &[
            "run",
            "-d",
            "--snapshotter",
            "imgd",
            "--mount",
            &mount,
            &reference,
            "survivor",
            "sh",
            "-c",
            script,
        ],
        STEP,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", s.agent.log()));
    let first = wait_file(&ctl.join("first"), STEP);

    s.agent.kill().unwrap();
    std::fs::write(ctl.join("go1"), "").unwrap();
    let cached = wait_file(&ctl.join("cached"), Duration::from_secs(30));
    assert_eq!(
        cached, first,
        "the cached file read differently with the agent down"
    );
    let tasks = ctrd.run_ctr(&["tasks", "ls"], STEP).unwrap();
    assert!(
        tasks
            .lines()
            .any(|l| l.contains("survivor") && l.contains("RUNNING")),
        "{tasks}"
    );

    let restarted =
        Agent::start(AgentOptions::local(s.proxy.url(), s.agent.data_dir.clone())).unwrap();
    // The killed agent's handle is kept to the end: dropping it cleans up its mounts.
    let _killed = std::mem::replace(&mut s.agent, restarted);
    std::fs::write(ctl.join("go2"), "").unwrap();
    let uncached = wait_file(&ctl.join("uncached"), STEP);
    let want =
        imgd_core::Digest::of(&imgd_tests::image::Content::Random { seed: 11, len: BIG }.to_vec())
            .hex();
    assert!(
        uncached.starts_with(&want),
        "{uncached} (want {want})\n{}",
        s.agent.log()
    );
    // The restarted agent lists the snapshots and its view, and its cache verifies.
    // containerd's connection to the snapshotter socket reconnects with a backoff, so its
    // first calls after the restart may fail.
    let deadline = Instant::now() + Duration::from_secs(30);
    let snaps = loop {
        match ctrd.run_ctr(&["snapshots", "--snapshotter", "imgd", "ls"], STEP) {
            Ok(out) => break out,
            Err(e) if Instant::now() > deadline => panic!("{e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    assert!(snaps.lines().any(|l| l.contains("Active")), "{snaps}");
    assert_eq!(agent_mounts(&s.agent).len(), 1);
    s.agent.verify_clean().unwrap();
}
