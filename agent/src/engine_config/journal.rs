//! The record of what a configure run changed, and undoing it.
//!
//! The journal is `DIR/.imgd-configure-ENGINE.json` (engines ignore dot files there). It
//! is rewritten after every step, so even a run that fails half-way can be undone. Every
//! file written is recorded with the sha256 of its content: an undo refuses to touch a
//! file changed since, so it never destroys someone's later edit.

use super::{io_err, DesiredFile, Engine, EngineConfigError, Report};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Suffix of the backup of a replaced file.
pub const BACKUP_SUFFIX: &str = ".imgd-backup";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    /// Directories created, outermost first (relative to the config dir's parent for the
    /// config dir itself, i.e. stored as given: absolute or relative to the cwd).
    dirs: Vec<PathBuf>,
    files: Vec<FileRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileRecord {
    /// Path of the file written.
    path: PathBuf,
    /// Where the file it replaced was moved, if there was one.
    backup: Option<PathBuf>,
    /// sha256 (hex) of what was written.
    sha256: String,
}

/// The journal file of `engine` in `dir`.
pub fn journal_path(dir: &Path, engine: Engine) -> PathBuf {
    dir.join(format!(".imgd-configure-{}.json", engine.name()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `bytes` to `path` through a temporary file in the same directory (mode 0644),
/// so a reader never sees a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineConfigError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".imgd-tmp-")
        .tempfile_in(parent)
        .map_err(io_err(parent))?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(path))?;
    }
    tmp.persist(path).map_err(|e| EngineConfigError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

fn save(dir: &Path, engine: Engine, journal: &Journal) -> Result<(), EngineConfigError> {
    let path = journal_path(dir, engine);
    let bytes = serde_json::to_vec_pretty(journal).map_err(|e| EngineConfigError::Journal {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_atomic(&path, &bytes)
}

fn load(dir: &Path, engine: Engine) -> Result<Option<Journal>, EngineConfigError> {
    let path = journal_path(dir, engine);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| EngineConfigError::Journal {
            path,
            message: e.to_string(),
        })
}

/// Creates `dir` and its missing ancestors, recording each one created.
fn create_dirs(dir: &Path, created: &mut Vec<PathBuf>) -> Result<(), EngineConfigError> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    for p in missing.into_iter().rev() {
        std::fs::create_dir(&p).map_err(io_err(&p))?;
        created.push(p);
    }
    Ok(())
}

/// Writes `files` into `dir`, backing up what they replace, recording every step.
pub fn apply(
    dir: &Path,
    engine: Engine,
    files: &[DesiredFile<'_>],
) -> Result<Report, EngineConfigError> {
    let mut journal = Journal::default();
    let mut report = Report::default();
    create_dirs(dir, &mut journal.dirs)?;
    save(dir, engine, &journal)?;
    for f in files {
        let path = dir.join(&f.rel_path);
        if let Some(parent) = path.parent() {
            create_dirs(parent, &mut journal.dirs)?;
        }
        let existing = match std::fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let existing_text = existing
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let content = (f.render)(existing_text.as_deref())?;
        let backup = match existing {
            Some(_) => {
                let mut name = path.clone().into_os_string();
                name.push(BACKUP_SUFFIX);
                let backup = PathBuf::from(name);
                if backup.exists() {
                    return Err(EngineConfigError::StaleBackup(backup));
                }
                std::fs::rename(&path, &backup).map_err(io_err(&path))?;
                report.backed_up.push(path.clone());
                Some(backup)
            }
            None => None,
        };
        journal.files.push(FileRecord {
            path: path.clone(),
            backup,
            sha256: sha256_hex(content.as_bytes()),
        });
        save(dir, engine, &journal)?;
        write_atomic(&path, content.as_bytes())?;
        report.written.push(path);
    }
    report.dirs = journal.dirs.clone();
    Ok(report)
}

/// Undoes what the journal of `engine` in `dir` records, then removes the journal.
pub fn undo(dir: &Path, engine: Engine) -> Result<Report, EngineConfigError> {
    let mut report = Report::default();
    let Some(journal) = load(dir, engine)? else {
        return Ok(report);
    };
    // Check everything before changing anything.
    for f in &journal.files {
        if let Ok(now) = std::fs::read(&f.path) {
            if sha256_hex(&now) != f.sha256 {
                return Err(EngineConfigError::ChangedSince(f.path.clone()));
            }
        }
    }
    for f in journal.files.iter().rev() {
        match &f.backup {
            Some(backup) => {
                std::fs::rename(backup, &f.path).map_err(io_err(backup))?;
                report.restored.push(f.path.clone());
            }
            None => match std::fs::remove_file(&f.path) {
                Ok(()) => report.removed.push(f.path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&f.path)(e)),
            },
        }
    }
    let path = journal_path(dir, engine);
    std::fs::remove_file(&path).map_err(io_err(&path))?;
    for d in journal.dirs.iter().rev() {
        // A directory someone has put other files into since stays.
        if std::fs::remove_dir(d).is_ok() {
            report.dirs.push(d.clone());
        }
    }
    Ok(report)
}
