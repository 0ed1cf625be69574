//! Reading a daemon's TOML configuration file, with errors that name the file and key.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Errors reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The causes are part of the message (not `source`), so they print once.
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config {path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Reads and parses a TOML file (unknown keys are rejected by the type's serde attributes).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_path_buf(),
        error,
    })
}
