//! A zstd:chunked copy of a built image, made by podman: the image is copied by skopeo
//! into a private containers-storage store (vfs driver) and pushed by podman to an OCI
//! layout with
//! `podman push --compression-format zstd:chunked`, as containers/storage writes them
//! (a frame per file and per rolling-checksum chunk, the TOC in a skippable frame at the
//! end, and the `…zstd-chunked.manifest-position` / `manifest-checksum` annotations).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Writes an OCI layout at `dst` holding image `name` of the layout `src` with every
/// layer in zstd:chunked, named `name`; `work` holds podman's store (removed after).
pub fn zstd_chunked_copy(src: &Path, name: &str, dst: &Path, work: &Path) -> Result<()> {
    let podman = |args: &[&str]| -> Result<String> {
        let out = Command::new("podman")
            .arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(work.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .context("running podman (Debian's podman, see .ci/setup)")?;
        if !out.status.success() {
            bail!(
                "podman {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // (`podman pull oci:DIR` names the image after DIR, which must be lowercase.)
    let id = "localhost/imgd-zstd-chunked:1";
    let store = format!(
        "containers-storage:[vfs@{}+{}]{id}",
        work.join("storage").display(),
        work.join("run").display()
    );
    let copied = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:{name}", src.display()))
        .arg(&store)
        .output()
        .context("running skopeo")?;
    if !copied.status.success() {
        bail!(
            "skopeo copy to {store}: {}",
            String::from_utf8_lossy(&copied.stderr).trim()
        );
    }
    let to = format!("oci:{}:{name}", dst.display());
    let pushed = podman(&[
        "push",
        "-q",
        "--compression-format",
        "zstd:chunked",
        id,
        &to,
    ]);
    // The store holds a copy of every layer; it is not needed once pushed.
    let _ = podman(&["rmi", "-f", id]);
    let _ = std::fs::remove_dir_all(work);
    pushed.map(|_| ())
}
