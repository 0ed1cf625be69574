//! imgd-proxy in front of a real registry: real clients pull through it and get exactly
//! upstream's bytes; every layer is chunked and indexed; ranges and single flight hold.

use imgd_core::index::{read_file, EntryKind, LayerIndex};
use imgd_core::wire::{BlobInfo, IndexState};
use imgd_core::{Digest, CHUNK_SIZE};
use imgd_tests::daemons::Proxy;
use imgd_tests::image::{self, presets, Compression, LayoutInfo};
use imgd_tests::pull::pull_verified;
use imgd_tests::registry::Registry;
use imgd_tests::registry_client::RegistryClient;
use imgd_tests::skopeo::{self, Format};
use std::collections::BTreeSet;
use std::path::Path;

/// A registry holding `small` as OCI (digests preserved, so one layer stays uncompressed)
/// and as Docker schema2, and the multi-arch index.
fn registry_with_images(dir: &Path) -> (Registry, LayoutInfo) {
    let reg = Registry::start().unwrap();
    let small = image::build_layout(&dir.join("small"), &[presets::small_multi_layer()]).unwrap();
    skopeo::push_layout(
        &small.dir,
        "small",
        &reg.docker_ref("app:oci"),
        Format::OciExact,
        false,
    )
    .unwrap();
    skopeo::push_layout(
        &small.dir,
        "small",
        &reg.docker_ref("app:v2s2"),
        Format::V2s2,
        false,
    )
    .unwrap();
    let multi =
        image::build_index_layout(&dir.join("multi"), "multi", &presets::multi_arch()).unwrap();
    skopeo::push_layout(
        &multi.dir,
        "multi",
        &reg.docker_ref("multi:latest"),
        Format::Oci,
        true,
    )
    .unwrap();
    (reg, small)
}

/// Blob digests named by the files of a skopeo `dir:` copy (the blobs, not manifests).
fn dir_blobs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64)
        .inspect(|n| {
            let bytes = std::fs::read(dir.join(n)).unwrap();
            assert_eq!(
                Digest::of(&bytes).hex(),
                *n,
                "blob file content matches its name"
            );
        })
        .collect()
}

#[test]
fn skopeo_copies_through_the_proxy_with_upstream_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _) = registry_with_images(tmp.path());
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    for (repo_tag, all) in [
        ("app:oci", false),
        ("app:v2s2", false),
        ("multi:latest", true),
    ] {
        let upstream_raw = skopeo::inspect_raw(&reg.docker_ref(repo_tag), false).unwrap();
        let via_proxy_raw = skopeo::inspect_raw(
            &format!("docker://{}/local/{repo_tag}", proxy.addr()),
            false,
        )
        .unwrap();
        assert_eq!(
            via_proxy_raw, upstream_raw,
            "{repo_tag}: manifest bytes through the proxy"
        );

        let out = tmp
            .path()
            .join(format!("out-{}", repo_tag.replace(':', "-")));
        let mut args = vec!["--src-tls-verify=false"];
        if all {
            args.push("--all");
        }
        let src = format!("docker://{}/local/{repo_tag}", proxy.addr());
        skopeo::copy(&src, &format!("dir:{}", out.display()), &args).unwrap();
        assert_eq!(
            std::fs::read(out.join("manifest.json")).unwrap(),
            upstream_raw,
            "{repo_tag}"
        );

        // The same image straight from upstream holds exactly the same blobs.
        let direct = tmp
            .path()
            .join(format!("direct-{}", repo_tag.replace(':', "-")));
        skopeo::copy(
            &reg.docker_ref(repo_tag),
            &format!("dir:{}", direct.display()),
            &args,
        )
        .unwrap();
        let blobs = dir_blobs(&out);
        assert!(blobs.len() >= 3, "{repo_tag}: {blobs:?}");
        assert_eq!(
            blobs,
            dir_blobs(&direct),
            "{repo_tag}: blob set equals upstream's"
        );

        // Our own verifying client: Content-Type, Docker-Content-Digest, sizes, diff_ids.
        let client = RegistryClient::new(proxy.url());
        let (repo, tag) = repo_tag.split_once(':').unwrap();
        let pulled = pull_verified(&client, &format!("local/{repo}"), tag).unwrap();
        assert_eq!(pulled.digest, Digest::of(&upstream_raw));
    }
    // Manifests answer HEAD with the right headers, by tag and by digest.
    let m = proxy
        .get(
            "/v2/local/app/manifests/v2s2",
            &[(
                "Accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            )],
        )
        .unwrap();
    assert_eq!(
        m.header("content-type"),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );
    let digest = Digest::of(&m.body).to_string();
    assert_eq!(m.header("docker-content-digest"), Some(digest.as_str()));
    let h = imgd_tests::registry_client::head(
        &format!("{}/v2/local/app/manifests/{digest}", proxy.url()),
        &[],
    )
    .unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        h.header("content-length"),
        Some(m.body.len().to_string().as_str())
    );
}

#[test]
fn every_layer_is_chunked_and_indexed_and_files_read_back_through_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, small) = registry_with_images(tmp.path());
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    let img = small.image("small").unwrap();
    for layer in &img.layers {
        let d = layer.blob.digest;
        let info: BlobInfo = proxy
            .get(&format!("/imgd/v1/blobs/{d}?repo=local/app"), &[])
            .unwrap()
            .json_as()
            .unwrap();
        info.chunks.validate().unwrap();
        assert_eq!(info.chunks.blob, d);
        let mut blob = Vec::new();
        for c in &info.chunks.chunks {
            let r = proxy
                .get(&format!("/imgd/v1/chunks/{}", c.digest), &[])
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(Digest::of(&r.body), c.digest);
            blob.extend_from_slice(&r.body);
        }
        assert_eq!(
            blob,
            std::fs::read(small.blob_path(&d)).unwrap(),
            "chunks concatenate to the blob"
        );

        let IndexState::Indexed {
            digest: idx_digest, ..
        } = info.index
        else {
            panic!("layer {d} not indexed: {:?}", info.index)
        };
        // The two parts of the index, served apart, are the stored index together.
        let r = proxy.get(&format!("/imgd/v1/indexes/{d}"), &[]).unwrap();
        let w = proxy
            .get(&format!("/imgd/v1/indexes/{d}/windows"), &[])
            .unwrap();
        assert_eq!(w.status, 200, "{}", w.text());
        let whole = [r.body.clone(), w.body.clone()].concat();
        assert_eq!(Digest::of(&whole), idx_digest);
        let main = LayerIndex::decode(&r.body).unwrap();
        assert_eq!(main.windows_size, w.body.len() as u64);
        let index = LayerIndex::decode(&whole).unwrap();
        assert_eq!(index.layer, d);
        match layer.compression {
            Compression::Gzip => assert!(!index.checkpoints.is_empty()),
            Compression::Uncompressed => assert!(index.checkpoints.is_empty()),
        }
        // Every regular file reads back, through chunks fetched from the proxy, equal to
        // what the tar holds.
        let mut tar = tar::Archive::new(
            imgd_tests::pull::layer_reader(&blob, &layer.blob.media_type).unwrap(),
        );
        let mut files = 0;
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let mut want = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut want).unwrap();
            let e = index
                .find(path.as_bytes())
                .unwrap_or_else(|| panic!("{path} in index"));
            assert_eq!(e.kind, EntryKind::File);
            let got = read_file(&index, e, 0, e.size as usize, |range| {
                Ok::<_, std::convert::Infallible>(
                    blob[range.start as usize..range.end as usize].to_vec(),
                )
            })
            .unwrap();
            assert_eq!(got, want, "{path}");
            files += 1;
        }
        assert!(files > 0);
    }
    let cfg = img.config.digest;
    let info: BlobInfo = proxy
        .get(&format!("/imgd/v1/blobs/{cfg}?repo=local/app"), &[])
        .unwrap()
        .json_as()
        .unwrap();
    assert!(
        matches!(info.index, IndexState::Unavailable { .. }),
        "a config blob is no layer"
    );
}

#[test]
fn ranges_span_chunks_and_concurrent_pulls_fetch_upstream_once() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let big = image::build_layout(&tmp.path().join("big"), &[presets::big_gzip(30)]).unwrap();
    skopeo::push_layout(
        &big.dir,
        "big",
        &reg.docker_ref("big:1"),
        Format::Oci,
        false,
    )
    .unwrap();
    let layer = big.image("big").unwrap().layers[0].blob.clone();
    assert!(
        layer.size > CHUNK_SIZE as u64 + 1000,
        "layer spans chunks: {}",
        layer.size
    );
    let blob = std::fs::read(big.blob_path(&layer.digest)).unwrap();
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();

    let path = format!("/v2/local/big/blobs/{}", layer.digest);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| proxy.get(&path, &[]).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.status, 200);
        assert_eq!(r.body, blob);
    }
    let stats = proxy.stats().unwrap();
    assert_eq!(stats.upstream_blob_fetches, 1, "single flight: {stats:?}");
    assert_eq!(stats.upstream_blob_bytes, layer.size, "{stats:?}");

    let c = CHUNK_SIZE as u64;
    for (a, b) in [
        (0, 0),
        (c - 10, c + 10),
        (c, c),
        (layer.size - 5, layer.size - 1),
        (17, c * 2),
    ] {
        let b = b.min(layer.size - 1);
        let r = proxy
            .get(&path, &[("Range", &format!("bytes={a}-{b}"))])
            .unwrap();
        assert_eq!(r.status, 206);
        assert_eq!(r.body, blob[a as usize..=b as usize]);
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {a}-{b}/{}", layer.size).as_str())
        );
    }
    let r = proxy
        .get(&path, &[("Range", &format!("bytes={}-", layer.size))])
        .unwrap();
    assert_eq!(r.status, 416);
}
