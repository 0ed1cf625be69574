//! Unpacking OCI layouts with `umoci`, an independent reference implementation of layer
//! application (whiteouts, hard links, xattrs, devices), to compare imgd's results against.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Unpacks reference `ref_name` of the OCI layout `layout_dir` into the runtime bundle
/// `bundle_dir` (which must not exist) and returns the root filesystem path
/// (`bundle_dir/rootfs`). Needs root for device nodes and ownership.
pub fn unpack(layout_dir: &Path, ref_name: &str, bundle_dir: &Path) -> Result<PathBuf> {
    let image = format!("{}:{ref_name}", layout_dir.display());
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(&image)
        .arg(bundle_dir)
        .stdin(Stdio::null())
        .output()
        .context("running umoci (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "umoci unpack {image} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bundle_dir.join("rootfs"))
}
