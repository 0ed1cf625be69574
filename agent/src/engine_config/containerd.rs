//! containerd: `DIR/HOST/hosts.toml` per registry, in the `config_path` layout containerd
//! (and `ctr images pull --hosts-dir DIR`) reads, with the agent's mirror as the first
//! host tried:
//!
//! ```toml
//! [host."http://127.0.0.1:5050"]
//!   capabilities = ["pull", "resolve"]
//! ```
//!
//! containerd adds `?ns=HOST` to every request it sends to a mirror; the agent passes it
//! on, and imgd-proxy picks the upstream named HOST. Without a `server` key containerd
//! falls back to the registry itself (`https://HOST`, `registry-1.docker.io` for
//! docker.io) when the mirror fails. An existing `hosts.toml` keeps its content and
//! gets the mirror added before its other hosts.

use super::{DesiredFile, EngineConfigError, RegistrySpec};
use std::path::PathBuf;
use toml_edit::{value, Array, DocumentMut, Item, Table};

const HEADER: &str =
    "# The imgd agent's registry mirror, written by `imgctl configure containerd`.\n\
# `imgctl configure containerd --undo` restores the previous state.\n";

/// The `hosts.toml` files for `registries`, mirrored at `mirror` (`HOST:PORT`).
pub fn desired_files(
    registries: &[RegistrySpec],
    mirror: &str,
) -> Result<Vec<DesiredFile<'static>>, EngineConfigError> {
    registries
        .iter()
        .map(|r| {
            if r.upstream != r.host {
                return Err(EngineConfigError::UpstreamNotHost {
                    host: r.host.clone(),
                    upstream: r.upstream.clone(),
                });
            }
            let mirror = mirror.to_string();
            let rel_path = PathBuf::from(&r.host).join("hosts.toml");
            let path = rel_path.clone();
            Ok(DesiredFile {
                rel_path,
                render: Box::new(move |existing| hosts_toml(existing, &mirror, &path)),
            })
        })
        .collect()
}

fn mirror_table() -> Table {
    let mut t = Table::new();
    let mut caps = Array::new();
    caps.push("pull");
    caps.push("resolve");
    t["capabilities"] = value(caps);
    t
}

/// `existing` (or an empty file) with the mirror as its first host.
fn hosts_toml(
    existing: Option<&str>,
    mirror: &str,
    path: &std::path::Path,
) -> Result<String, EngineConfigError> {
    let key = format!("http://{mirror}");
    let Some(existing) = existing else {
        let mut doc = DocumentMut::new();
        let mut hosts = Table::new();
        hosts.set_implicit(true);
        hosts.insert(&key, Item::Table(mirror_table()));
        doc.insert("host", Item::Table(hosts));
        return Ok(format!("{HEADER}\n{doc}"));
    };
    let mut doc: DocumentMut = existing.parse().map_err(|e: toml_edit::TomlError| {
        EngineConfigError::ExistingFileInvalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let hosts = super::implicit_table(doc.as_table_mut(), "host", path)?;
    hosts.remove(&key);
    // Tables print in document position order: put the mirror before the other hosts.
    let first = hosts
        .iter()
        .filter_map(|(_, item)| item.as_table().and_then(Table::position))
        .min();
    let mut ours = mirror_table();
    ours.set_position(first.map(|p| p - 1));
    ours.decor_mut().set_prefix(
        "\n# The imgd agent's registry mirror, added by `imgctl configure containerd`.\n",
    );
    hosts.insert(&key, Item::Table(ours));
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_config::{configure, undo, Engine, Report};
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every file under `dir` with its bytes (directories as `None`).
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.insert(p.clone(), None);
                    stack.push(p);
                } else {
                    out.insert(p.clone(), Some(std::fs::read(&p).unwrap()));
                }
            }
        }
        out
    }

    fn regs(list: &[&str]) -> Vec<RegistrySpec> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn writes_mirror_entries_reruns_idempotently_and_undoes_to_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs.d");
        let r = regs(&["docker.io", "127.0.0.1:5001"]);
        configure(Engine::Containerd, &dir, &r, "127.0.0.1:5050").unwrap();
        let text = std::fs::read_to_string(dir.join("docker.io/hosts.toml")).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        let host = &parsed["host"]["http://127.0.0.1:5050"];
        assert_eq!(
            host["capabilities"].as_array().unwrap(),
            &vec![toml::Value::from("pull"), toml::Value::from("resolve")]
        );
        assert!(dir.join("127.0.0.1:5001/hosts.toml").is_file());
        let first = snapshot(&dir);

        configure(Engine::Containerd, &dir, &r, "127.0.0.1:5050").unwrap();
        assert_eq!(snapshot(&dir), first, "a re-run changes nothing");

        let report = undo(Engine::Containerd, &dir).unwrap();
        assert_eq!(report.removed.len(), 2);
        assert!(!dir.exists(), "the directory it created is gone too");
        assert_eq!(
            undo(Engine::Containerd, &dir).unwrap(),
            Report::default(),
            "nothing left to undo"
        );
    }

    #[test]
    fn a_foreign_file_is_backed_up_extended_and_restored_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let foreign = "# mine\nserver = \"https://registry-1.docker.io\"\n\n\
                       [host.\"https://mirror.corp\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n";
        std::fs::create_dir(dir.join("docker.io")).unwrap();
        std::fs::write(dir.join("docker.io/hosts.toml"), foreign).unwrap();
        std::fs::write(dir.join("unrelated"), "x").unwrap();
        let before = snapshot(&dir);

        let report = configure(
            Engine::Containerd,
            &dir,
            &regs(&["docker.io"]),
            "10.0.0.1:5050",
        )
        .unwrap();
        assert_eq!(report.backed_up, vec![dir.join("docker.io/hosts.toml")]);
        assert_eq!(
            std::fs::read_to_string(dir.join("docker.io/hosts.toml.imgd-backup")).unwrap(),
            foreign
        );
        let text = std::fs::read_to_string(dir.join("docker.io/hosts.toml")).unwrap();
        let ours = text.find("[host.\"http://10.0.0.1:5050\"]").unwrap();
        let theirs = text.find("[host.\"https://mirror.corp\"]").unwrap();
        assert!(ours < theirs, "the mirror is tried first:\n{text}");
        assert!(
            text.contains("# mine") && text.contains("skip_verify = true"),
            "{text}"
        );
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry-1.docker.io")
        );
        let after = snapshot(&dir);

        configure(
            Engine::Containerd,
            &dir,
            &regs(&["docker.io"]),
            "10.0.0.1:5050",
        )
        .unwrap();
        assert_eq!(
            snapshot(&dir),
            after,
            "a re-run does not back up its own file"
        );
        undo(Engine::Containerd, &dir).unwrap();
        assert_eq!(snapshot(&dir), before, "undo restores byte for byte");
    }

    #[test]
    fn undo_refuses_to_destroy_a_later_edit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        configure(
            Engine::Containerd,
            &dir,
            &regs(&["ghcr.io"]),
            "127.0.0.1:5050",
        )
        .unwrap();
        std::fs::write(dir.join("ghcr.io/hosts.toml"), "# edited\n").unwrap();
        let err = undo(Engine::Containerd, &dir).unwrap_err();
        assert!(matches!(err, EngineConfigError::ChangedSince(_)), "{err}");
        assert!(dir.join("ghcr.io/hosts.toml").exists());
    }

    #[test]
    fn an_upstream_other_than_the_host_is_refused() {
        let err = desired_files(&regs(&["docker.io=hub"]), "127.0.0.1:5050").err();
        assert!(matches!(
            err,
            Some(EngineConfigError::UpstreamNotHost { .. })
        ));
    }
}
