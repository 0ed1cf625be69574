//! Hostile layers pushed to a real registry and pulled through the proxy: the ones that
//! break a limit or a safety rule are refused with 422 and a message naming the problem,
//! and nothing of them is stored; malformed ones are served as blobs without an index;
//! sanitised ones mount, and the FUSE mount never resolves a path outside its root.

use flate2::{write::GzEncoder, Compression};
use imgd_core::Digest;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::media_types::{OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_MANIFEST};
use imgd_tests::registry::Registry;
use imgd_tests::registry_client::HttpResponse;
use imgd_tests::skopeo::{self, Format};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use tar::{EntryType, Header};

/// Appends one raw entry (the name is written as is: no `tar` crate path checks).
fn entry(tar: &mut Vec<u8>, name: &str, kind: EntryType, link: &str, data: &[u8]) {
    let mut h = Header::new_gnu();
    let old = h.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

fn file(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
    entry(tar, name, EntryType::Regular, "", data);
}

fn end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0; 1024]);
    tar
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A layer blob: the bytes and their media type.
struct Blob(Vec<u8>, &'static str);

/// Writes an OCI layout holding one image `name` with `layers`, pushes it byte for byte
/// as `hostile-NAME:1` and returns the layer digests.
fn push(reg: &Registry, dir: &Path, name: &str, layers: &[Blob]) -> Vec<Digest> {
    let layout = dir.join(name);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let write = |bytes: &[u8], media_type: &str| {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        json!({"mediaType": media_type, "digest": d.to_string(), "size": bytes.len()})
    };
    let layer_descs: Vec<_> = layers.iter().map(|b| write(&b.0, b.1)).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|b| Digest::of(&b.0).to_string()).collect::<Vec<_>>()},
    });
    let config = write(&serde_json::to_vec(&config).unwrap(), OCI_CONFIG);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": layer_descs,
    });
    let mut manifest = write(&serde_json::to_vec(&manifest).unwrap(), OCI_MANIFEST);
    manifest["annotations"] = json!({"org.opencontainers.image.ref.name": "t"});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let dest = reg.docker_ref(&format!("hostile-{name}:1"));
    skopeo::push_layout(&layout, "t", &dest, Format::OciExact, false).unwrap();
    layers.iter().map(|b| Digest::of(&b.0)).collect()
}

fn oci_error(r: &HttpResponse) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let e = &v["errors"][0];
    (
        e["code"].as_str().unwrap_or_default().to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn hostile_layers_are_refused_malformed_ones_unindexed_and_mounts_stay_in_their_root() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();

    let mut t = Vec::new();
    file(&mut t, "ok", b"fine\n");
    file(&mut t, "../../etc/passwd", b"pwned\n");
    let dotdot = gzip(&end(t));
    let mut t = Vec::new();
    file(&mut t, "zeros", &vec![0; 64 << 20]);
    let bomb = gzip(&end(t));
    let mut t = Vec::new();
    for i in 0..2000 {
        file(&mut t, &format!("f{i}"), b"");
    }
    let many = gzip(&end(t));
    let mut t = Vec::new();
    entry(&mut t, "h", EntryType::Link, "f", b"");
    file(&mut t, "f", b"target\n");
    let forward = gzip(&end(t));
    let refused: [(&str, Vec<u8>, &str); 4] = [
        ("dotdot", dotdot, "'..' components are not allowed"),
        ("bomb", bomb, "more than 100 times its compressed size"),
        ("many", many, "more than 1000 entries"),
        ("forward", forward, "which only comes later in the archive"),
    ];

    let mut t = Vec::new();
    file(&mut t, "f", b"data\n");
    let mut badsum = end(t);
    badsum[0] = b'g'; // the name changes, the checksum does not
    let mut t = Vec::new();
    file(&mut t, "f", b"data\n");
    let mut garbage = gzip(&end(t));
    garbage.extend_from_slice(b"garbage");
    let unindexed: [(&str, Blob, &str); 2] = [
        (
            "badsum",
            Blob(badsum, OCI_LAYER_TAR),
            "tar header checksum mismatch at offset 0",
        ),
        (
            "garbage",
            Blob(garbage, OCI_LAYER_GZIP),
            "trailing garbage after the last gzip member",
        ),
    ];

    // Sanitised: an absolute path, a symlink pointing out of the tree, a later layer
    // writing through it, a hard link to nothing.
    let mut t = Vec::new();
    entry(&mut t, "etc", EntryType::Directory, "", b"");
    file(&mut t, "etc/passwd", b"image passwd\n");
    file(&mut t, "/abs/file", b"absolute\n");
    entry(&mut t, "esc", EntryType::Symlink, "../../../../etc", b"");
    entry(&mut t, "h", EntryType::Link, "no/such/file", b"");
    let base = gzip(&end(t));
    let mut t = Vec::new();
    file(&mut t, "esc/passwd", b"written through the symlink\n");
    file(&mut t, "esc/new", b"new\n");
    let upper = gzip(&end(t));

    let mut refused_digests = Vec::new();
    for (name, blob, _) in &refused {
        let d = push(
            &reg,
            tmp.path(),
            name,
            &[Blob(blob.clone(), OCI_LAYER_GZIP)],
        );
        refused_digests.push(d[0]);
    }
    let mut unindexed_digests = Vec::new();
    for (name, blob, _) in &unindexed {
        let d = push(&reg, tmp.path(), name, &[Blob(blob.0.clone(), blob.1)]);
        unindexed_digests.push(d[0]);
    }
    let layers = [Blob(base, OCI_LAYER_GZIP), Blob(upper, OCI_LAYER_GZIP)];
    push(&reg, tmp.path(), "escape", &layers);

    let config = tmp.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[index]\nmax_entries = 1000\nmax_inflate_ratio = 100\ninflate_ratio_slack = 8388608\n",
    )
    .unwrap();
    let proxy = Proxy::start_in(
        &tmp.path().join("proxy"),
        &[format!("local={}", reg.url())],
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();

    // Refused: 422 with the reason, through both APIs, and nothing stored.
    for ((name, _, reason), d) in refused.iter().zip(&refused_digests) {
        let blob = proxy
            .get(&format!("/v2/local/hostile-{name}/blobs/{d}"), &[])
            .unwrap();
        let index = proxy
            .get(
                &format!("/imgd/v1/indexes/{d}?repo=local/hostile-{name}"),
                &[],
            )
            .unwrap();
        for r in [&blob, &index] {
            let (code, message) = oci_error(r);
            assert_eq!(
                (r.status, code.as_str()),
                (422, "BLOB_INVALID"),
                "{name}: {message}"
            );
            assert!(
                message.contains("refused") && message.contains(reason),
                "{name}: {message}"
            );
        }
    }
    assert_eq!(proxy.stored_chunk_files(), 0, "refused layers left chunks");
    assert_eq!(proxy.temp_files(), 0, "refused layers left staged files");
    assert_eq!(proxy.stats().unwrap().upstream_blob_fetches, 0);

    // Malformed: the blob is served as is, its index is unavailable with the reason.
    for ((name, blob, reason), d) in unindexed.iter().zip(&unindexed_digests) {
        let r = proxy
            .get(&format!("/v2/local/hostile-{name}/blobs/{d}"), &[])
            .unwrap();
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.body, blob.0, "{name}");
        let r = proxy
            .get(
                &format!("/imgd/v1/indexes/{d}?repo=local/hostile-{name}"),
                &[],
            )
            .unwrap();
        let (code, message) = oci_error(&r);
        assert_eq!(
            (r.status, code.as_str()),
            (404, "BLOB_UNKNOWN"),
            "{message}"
        );
        assert!(message.contains(reason), "{name}: {message}");
    }

    // A mount of a refused image fails with the proxy's reason; the sanitised one mounts.
    let a = Agent::start(AgentOptions {
        host: None,
        proxy_url: proxy.url(),
        data_dir: tmp.path().join("agent"),
        extra_toml: String::new(),
        swarm: false,
    })
    .unwrap();
    let refused_mount = tmp.path().join("refused");
    std::fs::create_dir_all(&refused_mount).unwrap();
    let (ok, out, err) = a
        .imgctl(&[
            "mount",
            "local/hostile-dotdot:1",
            refused_mount.to_str().unwrap(),
        ])
        .unwrap();
    assert!(!ok, "mounted a refused image: {out}");
    let said = format!("{out}{err}");
    assert!(said.contains("'..' components are not allowed"), "{said}");

    let root = tmp.path().join("mnt");
    std::fs::create_dir_all(&root).unwrap();
    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    let (ok, out, err) = a
        .imgctl(&["mount", "local/hostile-escape:1", root.to_str().unwrap()])
        .unwrap();
    assert!(ok, "mount: {out}{err}");
    let read = |p: &str| std::fs::read_to_string(root.join(p));
    // The later layer's `esc/...` entries went through the symlink into the image's own
    // /etc, as a runtime unpacking into a root would put them.
    assert_eq!(read("etc/passwd").unwrap(), "written through the symlink\n");
    assert_eq!(read("etc/new").unwrap(), "new\n");
    assert_eq!(read("abs/file").unwrap(), "absolute\n");
    // The symlink itself is kept verbatim (a container resolves it in its own root).
    assert_eq!(
        std::fs::read_link(root.join("esc")).unwrap(),
        Path::new("../../../../etc")
    );
    // The dangling hard link is skipped; nothing else appeared at the root.
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["abs", "esc", "etc"]);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), host_passwd);
    let (ok, out, err) = a.imgctl(&["umount", root.to_str().unwrap()]).unwrap();
    assert!(ok, "{out}{err}");
}

/// The negative cache: a refused layer asked for five times, through both APIs, is
/// downloaded from upstream once; each answer is the 422 with the reason; `verify` lists
/// the refusal; once it expires the layer is fetched and judged again.
#[test]
fn a_refused_layer_is_downloaded_once_while_its_refusal_is_remembered() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let mut t = Vec::new();
    file(&mut t, "ok", b"fine\n");
    file(&mut t, "../../etc/passwd", b"pwned\n");
    let d = push(
        &reg,
        tmp.path(),
        "dotdot",
        &[Blob(gzip(&end(t)), OCI_LAYER_GZIP)],
    )[0];
    let relay = imgd_tests::fault_relay::FaultRelay::start(reg.addr()).unwrap();
    let ttl = 6;
    let proxy = Proxy::start_with_config(
        tmp.path(),
        &format!(
            "refused_layer_ttl_secs = {ttl}\n[[upstream]]\nname = \"local\"\nurl = \"{}\"\n",
            relay.url()
        ),
    )
    .unwrap();
    let downloads = || relay.count("GET", &format!("/blobs/{d}"));
    let ask = |i: usize| {
        let path = if i.is_multiple_of(2) {
            format!("/v2/local/hostile-dotdot/blobs/{d}")
        } else {
            format!("/imgd/v1/indexes/{d}?repo=local/hostile-dotdot")
        };
        let r = proxy.get(&path, &[]).unwrap();
        let (code, message) = oci_error(&r);
        assert_eq!(
            (r.status, code.as_str()),
            (422, "BLOB_INVALID"),
            "{message}"
        );
        assert!(
            message.contains("refused") && message.contains("'..' components are not allowed"),
            "{message}"
        );
        message
    };
    let started = std::time::Instant::now();
    let first = ask(0);
    assert!(!first.contains("remembered"), "{first}");
    for i in 1..5 {
        let again = ask(i);
        assert!(again.contains("remembered"), "{again}");
    }
    assert!(
        started.elapsed().as_secs() < ttl,
        "the five requests outlasted the refusal's lifetime; the count below means nothing"
    );
    assert_eq!(downloads(), 1, "five requests, one download");
    assert_eq!(proxy.stored_chunk_files(), 0);

    let report = proxy.get("/imgd/v1/verify", &[]).unwrap().json().unwrap();
    assert_eq!(report["problems"], json!([]), "{report}");
    let refused = report["refused_layers"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{report}");
    assert_eq!(refused[0]["digest"], d.to_string());
    assert!(refused[0]["reason"]
        .as_str()
        .unwrap()
        .contains("'..' components are not allowed"));
    let metrics = proxy.get("/metrics", &[]).unwrap().text();
    assert!(
        metrics.contains("imgd_proxy_refused_layers_total{answer=\"remembered\"} 4"),
        "{metrics}"
    );

    // Expired: judged again, which takes one more download, and remembered again.
    std::thread::sleep(std::time::Duration::from_secs(ttl + 1));
    let after = ask(0);
    assert!(!after.contains("remembered"), "{after}");
    assert_eq!(downloads(), 2);
    ask(1);
    assert_eq!(downloads(), 2);
}
