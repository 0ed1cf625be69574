//! Running `skopeo`: pushing layouts to a registry, copying, and reading raw manifests.
//!
//! Every run gets its own trust policy (`insecureAcceptAnything`, written to a temporary
//! file and passed with `--policy`), so nothing depends on `/etc/containers/policy.json`.
//! Failures carry skopeo's stderr.
//!
//! skopeo reuses blobs the destination registry already has (also across repositories of
//! it, remembered in its blob-info cache, `/var/lib/containers/cache` for root, shared by
//! all runs), so what a push writes can depend on earlier pushes to the same registry.

use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use imgd_core::Digest;

const POLICY: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

/// The manifest format skopeo writes to the destination (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `--format oci`: OCI manifests and indexes. skopeo gzips uncompressed layers on the
    /// way to a registry (new blob digest, same diff_id) and re-serialises the manifest of
    /// such an image, so its digest differs from the layout's -- unless the registry already
    /// has the uncompressed blob, which skopeo then reuses as is. Gzip layers and images
    /// without uncompressed layers are pushed unchanged.
    Oci,
    /// `--format oci --preserve-digests`: the layout's manifests, indexes and blobs
    /// byte for byte (uncompressed layers stay uncompressed); pushed digests equal the
    /// layout's.
    OciExact,
    /// `--format v2s2`: Docker schema 2 manifests (and manifest lists with `--all`). The
    /// manifests are rewritten, so their digests differ from the layout's; config and layer
    /// blobs keep their digests, and uncompressed layers stay uncompressed (as
    /// `application/vnd.docker.image.rootfs.diff.tar`).
    ///
    /// Never combine with `--preserve-digests`: skopeo 1.9 then silently ignores the format
    /// and pushes the OCI manifest ([`push_layout_with`] refuses the combination).
    V2s2,
}

impl Format {
    fn args(self) -> &'static [&'static str] {
        match self {
            Format::Oci => &["--format", "oci"],
            Format::OciExact => &["--format", "oci", "--preserve-digests"],
            Format::V2s2 => &["--format", "v2s2"],
        }
    }
}

/// Runs `skopeo --policy <permissive policy> ARGS...` and returns its stdout; fails with
/// the exit status and stderr if skopeo fails.
pub fn run(args: &[&str]) -> Result<Vec<u8>> {
    let policy = tempfile::Builder::new()
        .prefix("imgd-test-policy-")
        .suffix(".json")
        .tempfile()
        .context("creating skopeo policy file")?;
    std::fs::write(policy.path(), POLICY).context("writing skopeo policy file")?;
    let mut cmd = Command::new("skopeo");
    cmd.arg("--policy")
        .arg(policy.path())
        .args(args)
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("running skopeo {args:?} (is skopeo installed?)"))?;
    if !out.status.success() {
        bail!(
            "skopeo {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// `skopeo copy [EXTRA_ARGS...] SRC DST`, e.g. `copy("oci:/l:small",
/// "docker://127.0.0.1:5000/r:t", &["--dest-tls-verify=false"])`.
pub fn copy(src: &str, dst: &str, extra_args: &[&str]) -> Result<()> {
    let mut args = vec!["copy", "--quiet"];
    args.extend_from_slice(extra_args);
    args.push(src);
    args.push(dst);
    run(&args).map(drop)
}

/// Pulls `docker_ref` (`HOST/repo:tag`, plain http) into the skopeo `dir:` directory `out`
/// (the manifest as `manifest.json`, each blob named by its hex digest).
pub fn pull_to_dir(docker_ref: &str, out: &Path) -> Result<()> {
    copy(
        &format!("docker://{docker_ref}"),
        &format!("dir:{}", path_str(out)?),
        &["--src-tls-verify=false"],
    )
}

/// Pushes reference `ref_name` of the OCI layout `layout_dir` to `dest`
/// (`docker://127.0.0.1:PORT/repo:tag`, plain http) with `--format`, and with `--all` if
/// `all` (needed to push an image index whole: without it skopeo picks the host's platform
/// manifest). Returns the digest of the manifest (or index) as pushed.
pub fn push_layout(
    layout_dir: &Path,
    ref_name: &str,
    dest: &str,
    format: Format,
    all: bool,
) -> Result<Digest> {
    push_layout_with(layout_dir, ref_name, dest, format, all, &[])
}

/// [`push_layout`] with extra `skopeo copy` arguments, e.g. `["--dest-creds", "u:p"]` or
/// `["--preserve-digests"]`.
pub fn push_layout_with(
    layout_dir: &Path,
    ref_name: &str,
    dest: &str,
    format: Format,
    all: bool,
    extra_args: &[&str],
) -> Result<Digest> {
    let digest_file = tempfile::NamedTempFile::new().context("creating digest file")?;
    let digest_path = path_str(digest_file.path())?;
    let src = format!("oci:{}:{ref_name}", path_str(layout_dir)?);
    if format == Format::V2s2 && extra_args.contains(&"--preserve-digests") {
        bail!("--preserve-digests makes skopeo ignore --format v2s2");
    }
    let mut args = vec!["--dest-tls-verify=false", "--digestfile", digest_path];
    args.extend_from_slice(format.args());
    if all {
        args.push("--all");
    }
    args.extend_from_slice(extra_args);
    copy(&src, dest, &args).with_context(|| format!("pushing {src} to {dest}"))?;
    let digest = std::fs::read_to_string(digest_file.path()).context("reading digest file")?;
    Digest::from_str(digest.trim())
        .map_err(|e| anyhow::anyhow!("skopeo wrote digest {digest:?}: {e:?}"))
}

/// The raw manifest (or index / manifest list) of `docker_ref`
/// (`docker://HOST/repo:tag`), as `skopeo inspect --raw` returns it.
pub fn inspect_raw(docker_ref: &str, tls_verify: bool) -> Result<Vec<u8>> {
    inspect_raw_with(docker_ref, tls_verify, &[])
}

/// [`inspect_raw`] with extra `skopeo inspect` arguments, e.g. `["--creds", "u:p"]`.
pub fn inspect_raw_with(
    docker_ref: &str,
    tls_verify: bool,
    extra_args: &[&str],
) -> Result<Vec<u8>> {
    let tls = format!("--tls-verify={tls_verify}");
    let mut args = vec!["inspect", "--raw", tls.as_str()];
    args.extend_from_slice(extra_args);
    args.push(docker_ref);
    run(&args)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// Builds `spec` as an OCI layout under `dir` and pushes it to `registry` as `repo_tag`
/// byte for byte (digests preserved). Returns the image and the sum of its blob sizes.
pub fn push_image(
    registry: &crate::registry::Registry,
    dir: &Path,
    spec: crate::image::ImageSpec,
    repo_tag: &str,
) -> Result<(crate::image::ImageInfo, u64)> {
    let name = spec.name.clone();
    let layout = crate::image::build_layout(dir, &[spec])?;
    push_layout(
        &layout.dir,
        &name,
        &registry.docker_ref(repo_tag),
        Format::OciExact,
        false,
    )?;
    let image = layout.image(&name).context("built image")?.clone();
    let size = image.referenced_blobs().iter().map(|b| b.size).sum();
    Ok((image, size))
}

/// Pulls every image of `images` (`REPO:TAG` as the proxy names them) through the proxy at
/// `proxy_addr` into one scratch layout under `scratch`, which is removed after: the proxy
/// then holds every blob (each fetched once), so a benchmark times proxy -> host only.
pub fn warm_proxy(proxy_addr: &str, images: &[String], scratch: &Path) -> Result<()> {
    let warm = scratch.join("warm");
    for image in images {
        // Into one layout: blobs already there are not fetched again.
        copy(
            &format!("docker://{proxy_addr}/{image}"),
            &format!(
                "oci:{}:{}",
                path_str(&warm)?,
                image.replace(['/', ':'], "-")
            ),
            &["--src-tls-verify=false"],
        )
        .with_context(|| format!("warming the proxy with {image}"))?;
    }
    let _ = std::fs::remove_dir_all(&warm);
    Ok(())
}
