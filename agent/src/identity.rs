//! The agent's persistent libp2p identity (an ed25519 key in `DATA_DIR/node.key`).

use libp2p::identity::Keypair;
use std::path::Path;

/// Errors loading or creating the node key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("node key {path}: {message}")]
    Key { path: String, message: String },
}

/// Loads the key at `path`, or creates and saves a new one (mode 0600).
pub fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    let err = |m: String| IdentityError::Key {
        path: path.display().to_string(),
        message: m,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes).map_err(|e| err(e.to_string()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}
