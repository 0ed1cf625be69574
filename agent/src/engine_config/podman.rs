//! podman (and buildah, skopeo, CRI-O: everything on containers/image): one drop-in,
//! `DIR/50-imgd.conf` in `registries.conf.d`, with a `[[registry]]` per registry whose
//! first mirror is the agent:
//!
//! ```toml
//! [[registry]]
//! prefix = "docker.io"
//! location = "docker.io"
//! [[registry.mirror]]
//! location = "127.0.0.1:5050/docker.io"
//! insecure = true
//! ```
//!
//! containers/image sends no `ns` parameter, so the mirror location carries the
//! imgd-proxy upstream name as its first path component, which the proxy routes by. A
//! drop-in's `[[registry]]` replaces the entry of the same prefix in `registries.conf`.

use super::{DesiredFile, EngineConfigError, RegistrySpec};
use std::path::PathBuf;
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

/// The drop-in's file name; drop-ins are read in lexical order, later ones win.
pub const DROP_IN: &str = "50-imgd.conf";

const HEADER: &str = "# The imgd agent's registry mirror, written by `imgctl configure podman`.\n\
# `imgctl configure podman --undo` restores the previous state.\n";

/// Whether `s` is a valid repository path component (`[a-z0-9]+([._-][a-z0-9]+)*`,
/// simplified: lowercase alphanumerics separated by single `.`, `_` or `-`).
fn is_path_component(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let sep = |c: char| matches!(c, '.' | '_' | '-');
    let mut prev_sep = true;
    for c in s.chars() {
        if sep(c) {
            if prev_sep {
                return false;
            }
            prev_sep = true;
        } else if alnum(c) {
            prev_sep = false;
        } else {
            return false;
        }
    }
    !prev_sep
}

/// The drop-in for `registries`, mirrored at `mirror` (`HOST:PORT`).
pub fn desired_files(
    registries: &[RegistrySpec],
    mirror: &str,
) -> Result<Vec<DesiredFile<'static>>, EngineConfigError> {
    for r in registries {
        if !is_path_component(&r.upstream) {
            return Err(EngineConfigError::UpstreamNotPathComponent(
                r.upstream.clone(),
            ));
        }
    }
    let text = drop_in(registries, mirror);
    Ok(vec![DesiredFile {
        rel_path: PathBuf::from(DROP_IN),
        render: Box::new(move |_| Ok(text.clone())),
    }])
}

fn drop_in(registries: &[RegistrySpec], mirror: &str) -> String {
    let mut doc = DocumentMut::new();
    let mut list = ArrayOfTables::new();
    for r in registries {
        let mut reg = Table::new();
        reg["prefix"] = value(&r.host);
        reg["location"] = value(&r.host);
        let mut m = Table::new();
        m["location"] = value(format!("{mirror}/{}", r.upstream));
        m["insecure"] = value(true);
        let mut mirrors = ArrayOfTables::new();
        mirrors.push(m);
        reg.insert("mirror", Item::ArrayOfTables(mirrors));
        list.push(reg);
    }
    doc.insert("registry", Item::ArrayOfTables(list));
    format!("{HEADER}\n{doc}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_config::{configure, undo, Engine};

    fn regs(list: &[&str]) -> Vec<RegistrySpec> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_drop_in_names_a_mirror_per_registry() {
        let text = drop_in(
            &regs(&["docker.io", "127.0.0.1:5001=local"]),
            "127.0.0.1:5050",
        );
        let parsed: toml::Table = text.parse().unwrap();
        let list = parsed["registry"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1]["prefix"].as_str(), Some("127.0.0.1:5001"));
        assert_eq!(list[1]["location"].as_str(), Some("127.0.0.1:5001"));
        let m = &list[1]["mirror"].as_array().unwrap()[0];
        assert_eq!(m["location"].as_str(), Some("127.0.0.1:5050/local"));
        assert_eq!(m["insecure"].as_bool(), Some(true));
        let m0 = &list[0]["mirror"].as_array().unwrap()[0];
        assert_eq!(m0["location"].as_str(), Some("127.0.0.1:5050/docker.io"));
    }

    #[test]
    fn an_upstream_that_is_no_path_component_is_refused() {
        assert!(desired_files(&regs(&["127.0.0.1:5001"]), "127.0.0.1:5050").is_err());
        assert!(!is_path_component("a..b") && !is_path_component("-a") && !is_path_component(""));
        assert!(is_path_component("ghcr.io") && is_path_component("my-hub_2"));
    }

    #[test]
    fn a_foreign_drop_in_is_backed_up_and_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let foreign = b"[[registry]]\nlocation = \"other\"\n";
        std::fs::write(dir.join(DROP_IN), foreign).unwrap();
        let r = regs(&["docker.io"]);
        let report = configure(Engine::Podman, dir, &r, "127.0.0.1:5050").unwrap();
        assert_eq!(report.backed_up, vec![dir.join(DROP_IN)]);
        let written = std::fs::read(dir.join(DROP_IN)).unwrap();
        configure(Engine::Podman, dir, &r, "127.0.0.1:5050").unwrap();
        assert_eq!(std::fs::read(dir.join(DROP_IN)).unwrap(), written);
        assert_eq!(
            std::fs::read(dir.join("50-imgd.conf.imgd-backup")).unwrap(),
            foreign
        );
        undo(Engine::Podman, dir).unwrap();
        assert_eq!(std::fs::read(dir.join(DROP_IN)).unwrap(), foreign);
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(DROP_IN)]);
    }
}
