//! Real container engines pulling through the agent's mirror after `imgctl configure`:
//! a private containerd (`ctr images pull --hosts-dir`, then `ctr run` with runc) and a
//! private podman (a `registries.conf.d` drop-in, then `podman run`); and `--undo` leaves
//! the configuration directory as it was.

use imgd_tests::containerd::Containerd;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::FaultRelay;
use imgd_tests::guards::path_str;
use imgd_tests::image::{presets, FileSpec, ImageInfo, ImageSpec, LayerSpec};
use imgd_tests::podman::Podman;
use imgd_tests::registry::Registry;
use imgd_tests::scrape::Scrape;
use imgd_tests::skopeo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PULL_TIMEOUT: Duration = Duration::from_secs(180);
const BIG: u64 = 6 << 20;

/// Three layers (gzip with a static busybox, gzip with 6 MiB of random data, so two
/// chunks, and an uncompressed one), each contributing to the command's output.
fn image() -> ImageSpec {
    let base = presets::busybox_base("hello through the imgd mirror").unwrap();
    let data = LayerSpec::gzip(vec![
        FileSpec::dir("data"),
        FileSpec::random("data/big.bin", 5, BIG),
    ]);
    let top = LayerSpec::uncompressed(vec![FileSpec::file("etc/motd", "from the third layer\n")]);
    ImageSpec::new("app", vec![base, data, top])
}

const COMMAND: &str = "cat /etc/hello.txt /etc/motd; wc -c < /data/big.bin";

fn assert_command_output(out: &str) {
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        vec![
            "hello through the imgd mirror",
            "from the third layer",
            &BIG.to_string()
        ],
        "{out}"
    );
}

/// Every file and directory under `dir` with the bytes of files.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), None);
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).ok());
            }
        }
    }
    out
}

/// A registry holding the image behind a recording relay (the engines are given the
/// relay's address as the registry's, so every request reaching the registry is seen), a
/// proxy whose default upstream is dead (so only a request naming the registry's upstream
/// succeeds), and an agent without swarm.
struct Setup {
    _reg: Registry,
    relay: FaultRelay,
    _proxy: Proxy,
    agent: Agent,
    image: ImageInfo,
    /// The registry's address as the engines know it: the relay's.
    registry: String,
    tmp: tempfile::TempDir,
}

fn setup(upstream_name: Option<&str>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let (image, _) = skopeo::push_image(&reg, &tmp.path().join("img"), image(), "app:1").unwrap();
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let registry = relay.url().trim_start_matches("http://").to_string();
    let name = upstream_name.unwrap_or(&registry).to_string();
    let proxy = Proxy::start(&[
        "dead=http://127.0.0.1:9".to_string(),
        format!("{name}={}", relay.url()),
    ])
    .unwrap();
    let agent = Agent::start(AgentOptions::local(proxy.url(), tmp.path().join("agent"))).unwrap();
    Setup {
        registry,
        relay,
        _reg: reg,
        _proxy: proxy,
        agent,
        image,
        tmp,
    }
}

/// The user agents imgd-proxy sends upstream: its own HTTP client's, and oci-client's.
const PROXY_USER_AGENTS: [&str; 2] = ["imgd-proxy/", "oci-client/"];

/// The engine got the layers from the agent's mirror: the mirror served at least the
/// layers' bytes since `before`, and every request that reached the registry came from
/// the proxy (an engine falling back to the registry itself, as containerd does when a
/// mirror fails, would show up there with its own user agent).
fn assert_pulled_through_mirror(s: &Setup, before: &Scrape) {
    let layers: u64 = s.image.layers.iter().map(|l| l.blob.size).sum();
    let served = s
        .agent
        .metrics()
        .unwrap()
        .delta(before, "imgd_agent_served_bytes_total{to=\"mirror\"}");
    assert!(
        served >= layers as f64,
        "the mirror served {served} bytes, the layers are {layers}:\n{}",
        s.agent.log()
    );
    let seen = s.relay.seen();
    let not_proxy: Vec<String> = seen
        .iter()
        .filter(|r| {
            let agent = r.header("user-agent").unwrap_or("");
            !PROXY_USER_AGENTS.iter().any(|p| agent.starts_with(p))
        })
        .map(|r| format!("{} {} ({:?})", r.method, r.path, r.header("user-agent")))
        .collect();
    assert!(
        not_proxy.is_empty(),
        "the registry was asked by someone other than the proxy: {not_proxy:?}"
    );
    let blob_gets = s.relay.count("GET", "/blobs/");
    assert!(
        blob_gets >= s.image.layers.len(),
        "the proxy fetched {blob_gets} blobs from the registry"
    );
}

fn imgctl_ok(agent: &Agent, args: &[&str]) -> String {
    let (ok, out, err) = agent.imgctl(args).unwrap();
    assert!(ok, "imgctl {args:?}: {out}{err}");
    out
}

/// `imgctl configure ENGINE --config-dir CONFIG_DIR MORE...`; returns its output.
fn configure(agent: &Agent, engine: &str, config_dir: &str, more: &[&str]) -> String {
    let mut args = vec!["configure", engine, "--config-dir", config_dir];
    args.extend_from_slice(more);
    imgctl_ok(agent, &args)
}

#[test]
fn containerd_pulls_through_the_agent_and_runs_the_image_with_runc() {
    let s = setup(None);
    let certs = s.tmp.path().join("certs.d");
    // A configuration that was there before: a default host entry.
    std::fs::create_dir_all(certs.join("_default")).unwrap();
    std::fs::write(
        certs.join("_default/hosts.toml"),
        "[host.\"https://mirror.example\"]\n  capabilities = [\"pull\"]\n",
    )
    .unwrap();
    let before = snapshot(&certs);
    let certs_str = path_str(&certs).unwrap();

    let out = configure(
        &s.agent,
        "containerd",
        certs_str,
        &["--registry", &s.registry, "--mirror", &s.agent.mirror],
    );
    println!("{out}");
    let hosts = std::fs::read_to_string(certs.join(&s.registry).join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"http://{}\"]", s.agent.mirror)),
        "{hosts}"
    );

    let ctrd = Containerd::start().unwrap();
    let reference = format!("{}/app:1", s.registry);
    // containerd falls back to the registry itself (plain http on loopback) if the mirror
    // fails, so the proof is the relay's record and the mirror's counter; and as the
    // proxy's default upstream is dead, the agent got the blobs only by passing
    // containerd's ?ns= on.
    let scraped = s.agent.metrics().unwrap();
    ctrd.run_ctr(
        &["images", "pull", "--hosts-dir", certs_str, &reference],
        PULL_TIMEOUT,
    )
    .unwrap();
    assert_pulled_through_mirror(&s, &scraped);
    let listed = ctrd
        .run_ctr(&["images", "ls"], Duration::from_secs(30))
        .unwrap();
    assert!(
        listed.contains(&s.image.manifest.digest.to_string()),
        "containerd holds the manifest as pushed:\n{listed}"
    );

    let out = ctrd
        .run_ctr(
            &[
                "run",
                "--rm",
                &reference,
                "imgd-engines-ctr",
                "/bin/sh",
                "-c",
                COMMAND,
            ],
            PULL_TIMEOUT,
        )
        .unwrap();
    assert_command_output(&out);

    configure(&s.agent, "containerd", certs_str, &["--undo"]);
    assert_eq!(
        snapshot(&certs),
        before,
        "undo restores the hosts directory"
    );
}

#[test]
fn podman_pulls_through_the_agent_and_runs_the_image() {
    let s = setup(Some("local"));
    let podman = Podman::new().unwrap();
    let drop_ins = podman.drop_in_dir();
    let drop_ins_str = path_str(&drop_ins).unwrap();
    let registry = format!("{}=local", s.registry);
    configure(
        &s.agent,
        "podman",
        drop_ins_str,
        &["--registry", &registry, "--mirror", &s.agent.mirror],
    );
    let reference = format!("{}/app:1", s.registry);
    let policy = podman.policy();
    // The registry's own location would be tried with https, which it does not speak:
    // the pull succeeds only through the mirror.
    let scraped = s.agent.metrics().unwrap();
    podman
        .run(
            &[
                "pull",
                "--signature-policy",
                path_str(&policy).unwrap(),
                &reference,
            ],
            PULL_TIMEOUT,
        )
        .unwrap();
    assert_pulled_through_mirror(&s, &scraped);

    let out = podman
        .run(
            &[
                "run", "--rm", "--pull", "never", &reference, "/bin/sh", "-c", COMMAND,
            ],
            PULL_TIMEOUT,
        )
        .unwrap();
    assert_command_output(&out);

    configure(&s.agent, "podman", drop_ins_str, &["--undo"]);
    assert!(
        snapshot(&drop_ins).is_empty(),
        "undo leaves the drop-in directory empty"
    );
    assert!(podman.dir().exists());
}

#[test]
fn imgctl_prints_completions_naming_its_subcommands() {
    let imgctl = imgd_tests::daemons::workspace_bin("imgctl").unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(&imgctl)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in [
            "prefetch",
            "mount",
            "configure",
            "containerd",
            "podman",
            "--undo",
        ] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = std::process::Command::new(&imgctl)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}

/// The systemd units load without a warning (`systemd-analyze verify`, with `ExecStart`
/// pointed at the built binaries, as it checks that they exist).
#[test]
fn the_systemd_units_verify_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let bin_dir = imgd_tests::daemons::workspace_bin("imgd")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let mut paths = Vec::new();
    for name in ["imgd.service", "imgd-proxy.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/"), "{name}");
        let text = text.replace("/usr/bin/", &format!("{}/", bin_dir.display()));
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
