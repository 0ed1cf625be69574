//! Snapshotter errors, each mapped to the gRPC code containerd's `errdefs` expects.

/// What a snapshot operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    /// containerd reads this code as "the target exists", and for a placeholder as "no
    /// need to unpack".
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshot metadata: {0}")]
    Meta(#[from] imgd_core::store::MetaError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lazy view: {0}")]
    View(String),
}

impl SnapshotError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let what = what.into();
        move |source| SnapshotError::Io { what, source }
    }
}

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            SnapshotError::NotFound(_) => tonic::Status::not_found(msg),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            SnapshotError::Meta(_) | SnapshotError::Io { .. } | SnapshotError::View(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}
