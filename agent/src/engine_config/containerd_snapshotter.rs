//! containerd's `config.toml` (version 2, containerd 1.6 and 1.7) set up for imgd as its
//! proxy snapshotter and as the snapshotter of the CRI plugin:
//!
//! ```toml
//! [proxy_plugins.imgd]
//!   type = "snapshot"
//!   address = "/run/imgd/snapshotter.sock"
//!
//! [plugins."io.containerd.grpc.v1.cri".containerd]
//!   snapshotter = "imgd"
//!   disable_snapshot_annotations = false
//! ```
//!
//! `disable_snapshot_annotations = false` makes CRI pass each layer's image and digest to
//! `Prepare`, which is how imgd knows which layers it can serve lazily. With a registry
//! hosts directory, CRI's `registry.config_path` is pointed at it too. Everything else in
//! an existing file is kept; containerd must be restarted to read it.

use super::{implicit_table, DesiredFile, EngineConfigError};
use std::path::{Path, PathBuf};
use toml_edit::{value, DocumentMut, Item, Table};

const CRI: &str = "io.containerd.grpc.v1.cri";

/// The `config.toml` edit for a snapshotter at `socket`, and CRI registry hosts in
/// `hosts_dir` if given.
pub fn desired_files(socket: &Path, hosts_dir: Option<&Path>) -> Vec<DesiredFile<'static>> {
    let socket = socket.display().to_string();
    let hosts = hosts_dir.map(|p| p.display().to_string());
    vec![DesiredFile {
        rel_path: PathBuf::from("config.toml"),
        render: Box::new(move |existing| config_toml(existing, &socket, hosts.as_deref())),
    }]
}

fn config_toml(
    existing: Option<&str>,
    socket: &str,
    hosts_dir: Option<&str>,
) -> Result<String, EngineConfigError> {
    let invalid = |message: String| EngineConfigError::ExistingFileInvalid {
        path: PathBuf::from("config.toml"),
        message,
    };
    let mut doc: DocumentMut = match existing {
        Some(text) => text
            .parse()
            .map_err(|e: toml_edit::TomlError| invalid(e.to_string()))?,
        None => {
            let mut d = DocumentMut::new();
            d["version"] = value(2);
            d
        }
    };
    match doc.get("version").and_then(Item::as_integer) {
        Some(2) => {}
        other => {
            return Err(invalid(format!(
                "only containerd config version 2 is supported, this file has {other:?}"
            )))
        }
    }
    let file = Path::new("config.toml");
    let root = doc.as_table_mut();
    let plugins = implicit_table(root, "proxy_plugins", file)?;
    let mut imgd = Table::new();
    imgd["type"] = value("snapshot");
    imgd["address"] = value(socket);
    imgd.decor_mut().set_prefix(
        "\n# imgd's lazy snapshotter, added by `imgctl configure containerd --snapshotter`.\n",
    );
    plugins.insert("imgd", Item::Table(imgd));
    let cri = implicit_table(implicit_table(root, "plugins", file)?, CRI, file)?;
    let containerd = implicit_table(cri, "containerd", file)?;
    containerd["snapshotter"] = value("imgd");
    containerd["disable_snapshot_annotations"] = value(false);
    if let Some(dir) = hosts_dir {
        implicit_table(cri, "registry", file)?["config_path"] = value(dir);
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_config::{journal, Engine};

    fn parse(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn a_new_config_loads_the_snapshotter_for_cri() {
        let text = config_toml(
            None,
            "/run/imgd/snapshotter.sock",
            Some("/etc/containerd/certs.d"),
        )
        .unwrap();
        let t = parse(&text);
        assert_eq!(t["version"].as_integer(), Some(2));
        let imgd = &t["proxy_plugins"]["imgd"];
        assert_eq!(imgd["type"].as_str(), Some("snapshot"));
        assert_eq!(imgd["address"].as_str(), Some("/run/imgd/snapshotter.sock"));
        let cri = &t["plugins"][CRI];
        assert_eq!(cri["containerd"]["snapshotter"].as_str(), Some("imgd"));
        assert_eq!(
            cri["containerd"]["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
        assert_eq!(
            cri["registry"]["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
    }

    #[test]
    fn an_existing_config_keeps_its_settings_and_undo_restores_it_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mine = "# my containerd\nversion = 2\nroot = \"/data/containerd\"\n\n\
                    [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.9\"\n\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"\n";
        std::fs::write(dir.join("config.toml"), mine).unwrap();
        let files = desired_files(Path::new("/run/imgd/snapshotter.sock"), None);
        journal::undo(dir, Engine::ContainerdSnapshotter).unwrap();
        journal::apply(dir, Engine::ContainerdSnapshotter, &files).unwrap();
        let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        let t = parse(&text);
        assert_eq!(t["root"].as_str(), Some("/data/containerd"));
        let cri = &t["plugins"][CRI];
        assert_eq!(cri["sandbox_image"].as_str(), Some("pause:3.9"));
        assert_eq!(cri["containerd"]["snapshotter"].as_str(), Some("imgd"));
        assert_eq!(
            cri["containerd"]["default_runtime_name"].as_str(),
            Some("runc")
        );
        assert!(cri.get("registry").is_none());
        assert!(text.contains("# my containerd"), "{text}");
        journal::undo(dir, Engine::ContainerdSnapshotter).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("config.toml")).unwrap(),
            mine
        );
    }

    #[test]
    fn other_config_versions_are_refused() {
        let err = config_toml(Some("version = 3\n"), "/s", None).unwrap_err();
        assert!(
            matches!(err, EngineConfigError::ExistingFileInvalid { .. }),
            "{err}"
        );
        assert!(config_toml(Some("[proxy_plugins]\n"), "/s", None).is_err());
    }
}
