//! Pointing container engines at the agent's registry mirror, undoably.
//!
//! [`configure`] writes the engine's mirror configuration for chosen registries:
//! containerd `hosts.toml` files ([`containerd`]) or a podman `registries.conf.d` drop-in
//! ([`podman`]). A file it replaces is renamed to `NAME.imgd-backup` first, and every step
//! is recorded in a journal in the configuration directory ([`journal`]), so [`undo`]
//! restores exactly the previous state: files it created are removed, backups are renamed
//! back (same bytes, same inode), directories it created are removed. Configuring again
//! first undoes the previous run, so a re-run is idempotent.

pub mod containerd;
pub mod containerd_snapshotter;
pub mod journal;
pub mod podman;

use std::path::{Path, PathBuf};

/// The container engines imgd can configure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// containerd's `config_path` registry hosts directory (`certs.d`).
    Containerd,
    /// podman (containers/image) `registries.conf.d` drop-ins.
    Podman,
    /// containerd's `config.toml`: imgd as its proxy snapshotter and CRI's snapshotter.
    ContainerdSnapshotter,
}

impl Engine {
    /// The engine's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Containerd => "containerd",
            Engine::Podman => "podman",
            Engine::ContainerdSnapshotter => "containerd-snapshotter",
        }
    }

    /// The default configuration directory.
    pub fn default_dir(self) -> &'static str {
        match self {
            Engine::Containerd => "/etc/containerd/certs.d",
            Engine::Podman => "/etc/containers/registries.conf.d",
            Engine::ContainerdSnapshotter => "/etc/containerd",
        }
    }
}

/// A registry to send through the mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrySpec {
    /// The registry host as image names spell it: `docker.io`, `ghcr.io`, `host:5000`.
    pub host: String,
    /// The imgd-proxy upstream serving it (default: the host). containerd names the
    /// registry in `?ns=HOST`, so for containerd it must equal the host; podman sends no
    /// `ns`, so its mirror location carries the upstream name as a path prefix.
    pub upstream: String,
}

impl std::str::FromStr for RegistrySpec {
    type Err = EngineConfigError;

    /// Parses `HOST` or `HOST=UPSTREAM`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, upstream) = s.split_once('=').unwrap_or((s, s));
        let valid = |h: &str| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
        };
        if !valid(host) || !valid(upstream) || host.starts_with('.') || host.contains("..") {
            return Err(EngineConfigError::InvalidRegistry(s.to_string()));
        }
        Ok(RegistrySpec {
            host: host.to_string(),
            upstream: upstream.to_string(),
        })
    }
}

/// What a configure or undo run did, for the user.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Files written (created or replaced).
    pub written: Vec<PathBuf>,
    /// Foreign files renamed to a backup before being replaced (the original paths).
    pub backed_up: Vec<PathBuf>,
    /// Files removed by an undo (they did not exist before).
    pub removed: Vec<PathBuf>,
    /// Files restored from their backup by an undo.
    pub restored: Vec<PathBuf>,
    /// Directories created (configure) or removed (undo).
    pub dirs: Vec<PathBuf>,
}

/// Errors of configuring an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid registry {0:?}: expected HOST or HOST=UPSTREAM (e.g. docker.io, ghcr.io, registry.lan:5000)")]
    InvalidRegistry(String),
    #[error("no registry given (use --registry HOST)")]
    NoRegistry,
    #[error("containerd's config.toml holds no mirror (configure it with configure_snapshotter)")]
    NotAMirror,
    #[error("containerd names the registry in ?ns={host}, so the proxy upstream must be named {host:?}, not {upstream:?}")]
    UpstreamNotHost { host: String, upstream: String },
    #[error("the podman mirror location needs the upstream name as a path component, and {0:?} is not one: name it with HOST=UPSTREAM (an imgd-proxy upstream name of lowercase letters, digits, '.', '_' and '-')")]
    UpstreamNotPathComponent(String),
    #[error("{path} is not valid TOML, not replacing it: {message}")]
    ExistingFileInvalid { path: PathBuf, message: String },
    #[error("{0} already exists; remove or restore it before configuring")]
    StaleBackup(PathBuf),
    #[error("{0} was changed after imgctl wrote it; restore or remove it by hand (its backup, if any, is next to it)")]
    ChangedSince(PathBuf),
    #[error("journal {path}: {message}")]
    Journal { path: PathBuf, message: String },
}

/// `Io` error constructor for `map_err`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineConfigError + '_ {
    move |source| EngineConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `parent[key]` as a table, created implicit (only its children print) if missing; an
/// error naming `path` if it is something else.
pub(crate) fn implicit_table<'a>(
    parent: &'a mut toml_edit::Table,
    key: &str,
    path: &Path,
) -> Result<&'a mut toml_edit::Table, EngineConfigError> {
    parent
        .entry(key)
        .or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        })
        .as_table_mut()
        .ok_or_else(|| EngineConfigError::ExistingFileInvalid {
            path: path.to_path_buf(),
            message: format!("`{key}` is not a table"),
        })
}

/// Makes a file's new content from its current content (`None`: no file).
pub type Render<'a> = Box<dyn Fn(Option<&str>) -> Result<String, EngineConfigError> + 'a>;

/// One file an engine configuration consists of: its path relative to the configuration
/// directory and how to make its content from what is there now (`None`: no file).
pub struct DesiredFile<'a> {
    pub rel_path: PathBuf,
    pub render: Render<'a>,
}

/// Writes `engine`'s mirror configuration for `registries` into `dir`, the mirror being
/// at `mirror` (`HOST:PORT`, plain http). Undoes an earlier run first.
pub fn configure(
    engine: Engine,
    dir: &Path,
    registries: &[RegistrySpec],
    mirror: &str,
) -> Result<Report, EngineConfigError> {
    if registries.is_empty() {
        return Err(EngineConfigError::NoRegistry);
    }
    let files = match engine {
        Engine::Containerd => containerd::desired_files(registries, mirror)?,
        Engine::Podman => podman::desired_files(registries, mirror)?,
        Engine::ContainerdSnapshotter => return Err(EngineConfigError::NotAMirror),
    };
    journal::undo(dir, engine)?;
    journal::apply(dir, engine, &files)
}

/// Writes containerd's `config.toml` in `dir` for imgd's snapshotter at `socket` (and CRI
/// registry hosts in `hosts_dir`, if given). Undoes an earlier run first.
pub fn configure_snapshotter(
    dir: &Path,
    socket: &Path,
    hosts_dir: Option<&Path>,
) -> Result<Report, EngineConfigError> {
    let engine = Engine::ContainerdSnapshotter;
    let files = containerd_snapshotter::desired_files(socket, hosts_dir);
    journal::undo(dir, engine)?;
    journal::apply(dir, engine, &files)
}

/// Restores what [`configure`] replaced in `dir` and removes what it created. Nothing to
/// undo is not an error (the report is empty).
pub fn undo(engine: Engine, dir: &Path) -> Result<Report, EngineConfigError> {
    journal::undo(dir, engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_specs_parse() {
        let r: RegistrySpec = "docker.io".parse().unwrap();
        assert_eq!(
            (r.host.as_str(), r.upstream.as_str()),
            ("docker.io", "docker.io")
        );
        let r: RegistrySpec = "127.0.0.1:5000=local".parse().unwrap();
        assert_eq!(
            (r.host.as_str(), r.upstream.as_str()),
            ("127.0.0.1:5000", "local")
        );
        for bad in ["", "a/b", "../etc", "x=", "a b"] {
            assert!(bad.parse::<RegistrySpec>().is_err(), "{bad}");
        }
    }
}
