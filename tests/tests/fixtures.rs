//! Proves the fixtures: images built on the spot are well-formed OCI layouts, skopeo pushes
//! them to a real registry (OCI, Docker v2s2, multi-arch index), and what the registry then
//! serves is what was built.
//!
//! Needs `docker-registry`, `skopeo`, `umoci` and `getfattr` (see `.ci/setup`), and root.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use flate2::read::GzDecoder;
use imgd_core::Digest;
use imgd_tests::image::{self, presets, Compression, LayoutInfo};
use imgd_tests::media_types as mt;
use imgd_tests::pull::{pull_verified, uncompressed_digest, PulledManifest};
use imgd_tests::registry::Registry;
use imgd_tests::registry_client::{self, RegistryClient};
use imgd_tests::skopeo::{self, Format};
use imgd_tests::umoci;

fn small_layout(dir: &Path) -> LayoutInfo {
    image::build_layout(&dir.join("layout"), &[presets::small_multi_layer()]).unwrap()
}

/// Entries of a layer blob: tar path -> (entry type, PAX xattrs).
fn layer_entries(
    blob: &[u8],
    compression: Compression,
) -> Vec<(String, tar::EntryType, BTreeMap<String, Vec<u8>>)> {
    let reader: Box<dyn std::io::Read> = match compression {
        Compression::Gzip => Box::new(GzDecoder::new(blob)),
        Compression::Uncompressed => Box::new(blob),
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = entry.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                if let Some(name) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_owned(), ext.value_bytes().to_vec());
                }
            }
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        out.push((path, entry.header().entry_type(), xattrs));
    }
    out
}

#[test]
fn layouts_are_deterministic_and_well_formed() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let la = small_layout(a.path());
    let lb = small_layout(b.path());
    assert_eq!(la.images, lb.images, "same spec, same digests");

    let spec = presets::small_multi_layer();
    let img = la.image("small").unwrap();
    let manifest_bytes = fs::read(la.blob_path(&img.manifest.digest)).unwrap();
    assert_eq!(Digest::of(&manifest_bytes), img.manifest.digest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["mediaType"], mt::OCI_MANIFEST);
    let types: Vec<_> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].clone())
        .collect();
    assert_eq!(
        types,
        [mt::OCI_LAYER_GZIP, mt::OCI_LAYER_TAR, mt::OCI_LAYER_GZIP]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(la.blob_path(&img.config.digest)).unwrap()).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"][0], "/bin/sh");

    for (i, (layer, layer_spec)) in img.layers.iter().zip(&spec.layers).enumerate() {
        let blob = fs::read(la.blob_path(&layer.blob.digest)).unwrap();
        assert_eq!(Digest::of(&blob), layer.blob.digest);
        assert_eq!(
            uncompressed_digest(&blob, &layer.blob.media_type).unwrap(),
            layer.diff_id
        );
        assert_eq!(config["rootfs"]["diff_ids"][i], layer.diff_id.to_string());
        let entries = layer_entries(&blob, layer.compression);
        let paths: Vec<_> = entries.iter().map(|e| e.0.clone()).collect();
        let expected: Vec<_> = layer_spec.files.iter().map(|f| f.tar_path()).collect();
        assert_eq!(paths, expected, "layer {i}");
    }
    let top = layer_entries(
        &fs::read(la.blob_path(&img.layers[2].blob.digest)).unwrap(),
        Compression::Gzip,
    );
    assert!(top.iter().any(|e| e.0 == "etc/.wh.old"));
    assert!(top.iter().any(|e| e.0 == "usr/share/doc/.wh..wh..opq"));
    let base = layer_entries(
        &fs::read(la.blob_path(&img.layers[0].blob.digest)).unwrap(),
        Compression::Gzip,
    );
    let config_entry = base.iter().find(|e| e.0 == "etc/config").unwrap();
    assert_eq!(config_entry.2["user.imgd"], b"test");
    let hard = base.iter().find(|e| e.0 == "bin/hello-hard").unwrap();
    assert_eq!(hard.1, tar::EntryType::Link);

    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(la.dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        img.manifest.digest.to_string()
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "small"
    );
}

#[test]
fn small_image_unpacks_with_umoci_as_specified() {
    let dir = tempfile::tempdir().unwrap();
    let layout = small_layout(dir.path());
    let root = umoci::unpack(&layout.dir, "small", &dir.path().join("bundle")).unwrap();
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert!(!root.join("etc/old").exists(), "whiteout applied");
    let doc: Vec<_> = fs::read_dir(root.join("usr/share/doc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(doc, ["new.txt"], "opaque whiteout applied");
    assert_eq!(
        fs::read_to_string(root.join("etc/os-release")).unwrap(),
        "ID=imgd-test\nVERSION_ID=2\n"
    );
    assert_eq!(meta("bin/hello").mode() & 0o7777, 0o755);
    assert_eq!(meta("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(meta("bin/hello").ino(), meta("bin/hello-hard").ino());
    assert_eq!(
        fs::read_link(root.join("bin/hi")).unwrap().to_str(),
        Some("hello")
    );
    assert!(meta("data/pipe").file_type().is_fifo());
    assert!(meta("dev/null").file_type().is_char_device());
    assert_eq!(meta("dev/null").rdev(), (1 << 8) | 3, "makedev(1, 3)");
    assert_eq!(
        (meta("home/user/notes").uid(), meta("home/user/notes").gid()),
        (1000, 1000)
    );
    assert_eq!(meta("home/user/notes").mtime(), 1_000_000_000);
    assert_eq!(meta("data/random.bin").len(), 256 * 1024);
    let out = Command::new("getfattr")
        .args(["--absolute-names", "-d"])
        .arg(root.join("etc/config"))
        .output()
        .unwrap();
    let xattrs = String::from_utf8_lossy(&out.stdout);
    assert!(xattrs.contains("user.imgd=\"test\""), "{xattrs}");
    assert!(
        xattrs.contains("user.other=\"value with spaces\""),
        "{xattrs}"
    );
}

#[test]
fn big_gzip_compresses_two_to_three_times() {
    let dir = tempfile::tempdir().unwrap();
    let layout = image::build_layout(dir.path(), &[presets::big_gzip(8)]).unwrap();
    let layer = &layout.image("big").unwrap().layers[0];
    assert!(layer.uncompressed_size > 8 * 1024 * 1024);
    let ratio = layer.uncompressed_size as f64 / layer.blob.size as f64;
    assert!((2.0..3.5).contains(&ratio), "ratio {ratio}");
    assert_eq!(presets::big_gzip(130).layers.len(), 3);
}

/// Checks skopeo's and the registry's view of `repo:tag` agree and everything verifies.
fn check_pushed(
    reg: &Registry,
    repo: &str,
    tag: &str,
    pushed: Digest,
    media_type: &str,
) -> PulledManifest {
    let raw = skopeo::inspect_raw(&reg.docker_ref(&format!("{repo}:{tag}")), false).unwrap();
    assert_eq!(
        Digest::of(&raw),
        pushed,
        "skopeo inspect --raw of {repo}:{tag}"
    );
    let pulled = pull_verified(&reg.client(), repo, tag).unwrap();
    assert_eq!(pulled.digest, pushed);
    assert_eq!(pulled.raw, raw);
    assert_eq!(pulled.media_type, media_type);
    // The exact Accept header alone is enough, and a manifest fetched by digest is identical.
    let resp = reg.client().manifest(repo, tag, &[media_type]).unwrap();
    assert_eq!((resp.status, resp.body.as_slice()), (200, raw.as_slice()));
    let by_digest = reg
        .client()
        .manifest(repo, &pushed.to_string(), &[])
        .unwrap();
    assert_eq!(by_digest.body, raw);
    pulled
}

#[test]
fn push_single_image_as_oci_and_v2s2() {
    let dir = tempfile::tempdir().unwrap();
    let layout = small_layout(dir.path());
    let img = layout.image("small").unwrap();
    let reg = Registry::start().unwrap();

    // Plain OCI push, first (skopeo would reuse an uncompressed blob already in the
    // registry): skopeo gzips the uncompressed layer; diff_ids stay.
    let d = skopeo::push_layout(
        &layout.dir,
        "small",
        &reg.docker_ref("small:oci"),
        Format::Oci,
        false,
    )
    .unwrap();
    assert_ne!(d, img.manifest.digest);
    let pulled = check_pushed(&reg, "small", "oci", d, mt::OCI_MANIFEST);
    assert_eq!(pulled.layers[1].media_type, mt::OCI_LAYER_GZIP);
    assert_ne!(pulled.layers[1].digest, img.layers[1].blob.digest);
    let expected: Vec<_> = img.layers.iter().map(|l| l.blob.digest).collect();
    let diff_ids: Vec<_> = pulled.layers.iter().map(|l| l.diff_id.unwrap()).collect();
    let expected_diff_ids: Vec<_> = img.layers.iter().map(|l| l.diff_id).collect();
    assert_eq!(diff_ids, expected_diff_ids);

    // Byte-exact OCI push: same digests as the layout, uncompressed layer kept.
    let dest = reg.docker_ref("small:exact");
    let d = skopeo::push_layout(&layout.dir, "small", &dest, Format::OciExact, false).unwrap();
    assert_eq!(d, img.manifest.digest);
    let pulled = check_pushed(&reg, "small", "exact", d, mt::OCI_MANIFEST);
    let digests: Vec<_> = pulled.layers.iter().map(|l| l.digest).collect();
    assert_eq!(digests, expected);
    assert_eq!(pulled.layers[1].media_type, mt::OCI_LAYER_TAR);

    // Docker v2s2: new manifest digest, same config and layer blobs.
    let d = skopeo::push_layout(
        &layout.dir,
        "small",
        &reg.docker_ref("small:v2s2"),
        Format::V2s2,
        false,
    )
    .unwrap();
    assert_ne!(d, img.manifest.digest);
    let pulled = check_pushed(&reg, "small", "v2s2", d, mt::DOCKER_MANIFEST);
    assert_eq!(pulled.config.as_ref().unwrap().digest, img.config.digest);
    assert_eq!(
        pulled.config.as_ref().unwrap().media_type,
        mt::DOCKER_CONFIG
    );
    let digests: Vec<_> = pulled.layers.iter().map(|l| l.digest).collect();
    assert_eq!(digests, expected);
    let types: Vec<_> = pulled
        .layers
        .iter()
        .map(|l| l.media_type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            mt::DOCKER_LAYER_GZIP,
            mt::DOCKER_LAYER_TAR,
            mt::DOCKER_LAYER_GZIP
        ]
    );

    // Refused: --preserve-digests would silently turn v2s2 back into OCI.
    let preserve = ["--preserve-digests"];
    assert!(
        skopeo::push_layout_with(&layout.dir, "small", &dest, Format::V2s2, false, &preserve)
            .is_err()
    );
    // Unknown things are 404 and failures carry skopeo's stderr.
    let missing = reg.client().manifest("small", "nope", &[]).unwrap();
    assert_eq!(missing.status, 404);
    let err = skopeo::inspect_raw(&reg.docker_ref("small:nope"), false).unwrap_err();
    assert!(format!("{err:#}").contains("manifest unknown"), "{err:#}");
}

#[test]
fn push_multi_arch_index_with_all() {
    let dir = tempfile::tempdir().unwrap();
    let layout = image::build_index_layout(dir.path(), "multi", &presets::multi_arch()).unwrap();
    let index = layout.index("multi").unwrap();
    assert_eq!(index.images.len(), 2);
    assert_eq!(
        index.images[0].layers[0], index.images[1].layers[0],
        "shared base layer"
    );
    assert_ne!(index.images[0].layers[1], index.images[1].layers[1]);
    let reg = Registry::start().unwrap();

    let d = skopeo::push_layout(
        &layout.dir,
        "multi",
        &reg.docker_ref("multi:oci"),
        Format::Oci,
        true,
    )
    .unwrap();
    assert_eq!(
        d, index.index.digest,
        "all-gzip images are pushed unchanged"
    );
    let pulled = check_pushed(&reg, "multi", "oci", d, mt::OCI_INDEX);
    let children: Vec<_> = pulled.children.iter().map(|c| c.digest).collect();
    let expected: Vec<_> = index.images.iter().map(|i| i.manifest.digest).collect();
    assert_eq!(children, expected);
    let archs: Vec<_> = pulled.json["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].clone())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);

    let d = skopeo::push_layout(
        &layout.dir,
        "multi",
        &reg.docker_ref("multi:v2s2"),
        Format::V2s2,
        true,
    )
    .unwrap();
    let pulled = check_pushed(&reg, "multi", "v2s2", d, mt::DOCKER_MANIFEST_LIST);
    assert!(pulled
        .images()
        .iter()
        .all(|i| i.media_type == mt::DOCKER_MANIFEST));
    let layers: Vec<_> = pulled
        .images()
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| l.digest))
        .collect();
    let expected: Vec<_> = index
        .images
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| l.blob.digest))
        .collect();
    assert_eq!(layers, expected);

    // Without --all skopeo copies only the host's platform (amd64) manifest.
    let d = skopeo::push_layout(
        &layout.dir,
        "multi",
        &reg.docker_ref("multi:one"),
        Format::Oci,
        false,
    )
    .unwrap();
    assert_eq!(d, index.images[0].manifest.digest);
}

#[test]
fn basic_auth_registry() {
    let reg = Registry::start_with_htpasswd("alice", "s3cret").unwrap();
    assert_eq!(reg.credentials(), Some(("alice", "s3cret")));
    let anonymous = RegistryClient::new(reg.url()).get("/v2/", &[]).unwrap();
    assert_eq!(anonymous.status, 401);
    assert!(anonymous
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic"));
    assert_eq!(reg.client().get("/v2/", &[]).unwrap().status, 200);
    let wrong = registry_client::basic_auth("alice", "wrong");
    assert_eq!(
        registry_client::get(&format!("{}/v2/", reg.url()), &[("Authorization", &wrong)])
            .unwrap()
            .status,
        401
    );

    let dir = tempfile::tempdir().unwrap();
    let layout = small_layout(dir.path());
    let dest = reg.docker_ref("private:v1");
    assert!(skopeo::push_layout(&layout.dir, "small", &dest, Format::OciExact, false).is_err());
    let creds = ["--dest-creds", "alice:s3cret"];
    let d = skopeo::push_layout_with(&layout.dir, "small", &dest, Format::OciExact, false, &creds)
        .unwrap();
    let raw = skopeo::inspect_raw_with(&dest, false, &["--creds", "alice:s3cret"]).unwrap();
    assert_eq!(Digest::of(&raw), d);
    assert_eq!(
        pull_verified(&reg.client(), "private", "v1")
            .unwrap()
            .digest,
        d
    );
}

/// A cache entry of the benchmarks' Debian image (written here from a small built image,
/// so no Debian mirror is needed) is used as is, and a damaged blob or `layers.json` is
/// refused, naming what is wrong.
#[test]
fn debian_image_cache_entry_is_verified() {
    use imgd_tests::debian_image::{self, Recipe};
    let tmp = tempfile::tempdir().unwrap();
    let recipe = Recipe::debian_numpy();
    let entry = tmp.path().join(debian_image::entry_name(&recipe));
    let spec = presets::small_multi_layer().named(debian_image::REF_NAME);
    // Only gzip layers: the cache holds the image as pushed (gzip).
    let spec = image::ImageSpec {
        layers: spec
            .layers
            .into_iter()
            .map(|l| image::LayerSpec::gzip(l.files))
            .collect(),
        ..spec
    };
    let built = image::build_layout(&entry.join("layout"), &[spec]).unwrap();
    let built = built.image(debian_image::REF_NAME).unwrap().clone();
    let sizes: Vec<_> = built
        .layers
        .iter()
        .map(|l| serde_json::json!({"diff_id": l.diff_id.to_string(), "size": l.uncompressed_size}))
        .collect();
    let layers_json = entry.join("layers.json");
    fs::write(&layers_json, serde_json::to_vec(&sizes).unwrap()).unwrap();

    let found = debian_image::cached(tmp.path(), &recipe).unwrap();
    let image = found.image().unwrap();
    assert_eq!(image.manifest, built.manifest);
    assert_eq!(image.layers, built.layers);
    assert_eq!(
        found.compressed_size().unwrap(),
        built.referenced_blobs().iter().map(|b| b.size).sum::<u64>()
    );

    // A layer blob with one byte flipped.
    let blob = found.layout.blob_path(&built.layers[1].blob.digest);
    let good = fs::read(&blob).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    fs::write(&blob, &bad).unwrap();
    let err = format!(
        "{:#}",
        debian_image::cached(tmp.path(), &recipe).unwrap_err()
    );
    assert!(
        err.contains(&built.layers[1].blob.digest.to_string()),
        "error does not name the damaged blob: {err}"
    );
    fs::write(&blob, &good).unwrap();
    debian_image::cached(tmp.path(), &recipe).unwrap();

    // layers.json disagreeing with the config.
    let mut wrong = sizes.clone();
    wrong[0]["diff_id"] = built.layers[1].diff_id.to_string().into();
    fs::write(&layers_json, serde_json::to_vec(&wrong).unwrap()).unwrap();
    let err = format!(
        "{:#}",
        debian_image::cached(tmp.path(), &recipe).unwrap_err()
    );
    assert!(err.contains("diff_ids"), "{err}");

    // Another recipe has another entry.
    let mut other = recipe.clone();
    other.apt_layers = &[&["python3"]];
    assert_ne!(
        debian_image::entry_name(&other),
        debian_image::entry_name(&recipe)
    );
    assert!(debian_image::cached(tmp.path(), &other).is_err());
}
