//! The errors of agent operations ([`AgentError`]), in a module of their own so that the
//! parts of the agent (mounts, the API) can use them without depending on
//! [`crate::agent::Agent`].

use crate::cache::CacheError;
use crate::fetch::FetchError;
use crate::image::ImageError;

/// Errors of agent operations, as reported to imgctl.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Start(String),
    #[error("{0}")]
    Mount(String),
}
