//! The mounts containerd gets for a snapshot, as containerd's overlayfs snapshotter
//! makes them: a bind of the snapshot's own directory when nothing is below it, else an
//! overlay of its directory (upper) on the lowers.

use super::records::Kind;
use std::path::{Path, PathBuf};

/// One mount in containerd's form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerdMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The mounts of an active or view snapshot whose files are `fs` (and `work`), on
/// `lowers` (nearest first, already resolved to directories).
pub fn mounts(kind: Kind, fs: &Path, work: &Path, lowers: &[PathBuf]) -> Vec<ContainerdMount> {
    let bind = |dir: &Path, mode: &str| ContainerdMount {
        kind: "bind".into(),
        source: dir.display().to_string(),
        options: vec![mode.into(), "rbind".into()],
    };
    let lowerdir = || {
        let dirs: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        format!("lowerdir={}", dirs.join(":"))
    };
    match (kind, lowers) {
        (Kind::Active, []) => vec![bind(fs, "rw")],
        (Kind::Active, _) => vec![ContainerdMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", work.display()),
                format!("upperdir={}", fs.display()),
                lowerdir(),
            ],
        }],
        (_, []) => vec![bind(fs, "ro")],
        (_, [one]) => vec![bind(one, "ro")],
        (_, _) => vec![ContainerdMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["index=off".into(), lowerdir()],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_alone_and_overlays_on_lowers() {
        let (fs, work) = (Path::new("/s/1/fs"), Path::new("/s/1/work"));
        let m = mounts(Kind::Active, fs, work, &[]);
        assert_eq!(m[0].kind, "bind");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);
        let lowers = vec![PathBuf::from("/s/2/fs"), PathBuf::from("/v/chain")];
        let m = mounts(Kind::Active, fs, work, &lowers);
        assert_eq!(m[0].kind, "overlay");
        assert!(m[0].options.contains(&"upperdir=/s/1/fs".to_string()));
        assert!(m[0].options.contains(&"workdir=/s/1/work".to_string()));
        assert!(m[0]
            .options
            .contains(&"lowerdir=/s/2/fs:/v/chain".to_string()));
        let m = mounts(Kind::View, fs, work, &lowers[1..]);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/v/chain")
        );
        assert_eq!(m[0].options, vec!["ro", "rbind"]);
        let m = mounts(Kind::View, fs, work, &lowers);
        assert!(!m[0].options.iter().any(|o| o.starts_with("upperdir")));
        assert_eq!(mounts(Kind::View, fs, work, &[])[0].options[0], "ro");
    }
}
