//! The control socket of a mount process, as the agent uses it.
//!
//! | route | answer |
//! |---|---|
//! | `GET /status` | [`ProcessStatus`] |
//! | `POST /trace` | the startup trace recorded so far, as JSON `StartupTrace` or `null`; recording stops |
//! | `POST /stop` | unmounts and exits: `204`, or `409` with the reason (e.g. busy) and the mount stays |

use crate::unix_http::{self, UnixHttpError};
use bytes::Bytes;
use imgd_core::wire::StartupTrace;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a mount process reaches the agent, as it last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentLink {
    /// The agent answers: uncached chunks are fetched through it.
    Connected,
    /// The agent did not answer the last request: cached chunks are still read, reads
    /// of uncached ones retry the agent until the read bound, then fail with EIO.
    AgentLost,
}

/// What a mount process reports about itself.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ProcessStatus {
    pub id: String,
    pub dir: PathBuf,
    pub pid: u32,
    pub link: AgentLink,
    pub reads: u64,
    pub bytes_read: u64,
    pub eio: u64,
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    /// Chunks read (cached or fetched), spans inflated (ahead of reads, of those), and
    /// stream reads served from the on-disk inflated cache.
    #[serde(default)]
    pub chunk_reads: u64,
    #[serde(default)]
    pub spans_inflated: u64,
    #[serde(default)]
    pub spans_read_ahead: u64,
    #[serde(default)]
    pub disk_reads: u64,
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Unreachable(#[from] UnixHttpError),
    #[error("mount process refused: {0}")]
    Refused(String),
    #[error("mount process answered nonsense: {0}")]
    Garbled(String),
}

/// How long the agent waits for a control answer (`status` is asked for at every
/// `imgctl status` and scrape; `stop` unmounts first).
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The control socket of one mount process.
#[derive(Clone, Debug)]
pub struct Control {
    socket: PathBuf,
}

impl Control {
    pub fn new(socket: &Path) -> Control {
        Control {
            socket: socket.to_path_buf(),
        }
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        timeout: Duration,
    ) -> Result<Bytes, ControlError> {
        let reply = unix_http::request(&self.socket, method, path, None, timeout).await?;
        if !reply.status.is_success() {
            return Err(ControlError::Refused(
                String::from_utf8_lossy(&reply.body).into_owned(),
            ));
        }
        Ok(reply.body)
    }

    /// The process's status.
    pub async fn status(&self) -> Result<ProcessStatus, ControlError> {
        let body = self
            .call(http::Method::GET, "/status", STATUS_TIMEOUT)
            .await?;
        serde_json::from_slice(&body).map_err(|e| ControlError::Garbled(e.to_string()))
    }

    /// Takes the startup trace recorded so far (`None` if none is being recorded).
    pub async fn take_trace(&self) -> Result<Option<StartupTrace>, ControlError> {
        let body = self
            .call(http::Method::POST, "/trace", ANSWER_TIMEOUT)
            .await?;
        serde_json::from_slice(&body).map_err(|e| ControlError::Garbled(e.to_string()))
    }

    /// Asks the process to unmount and exit.
    pub async fn stop(&self) -> Result<(), ControlError> {
        self.call(http::Method::POST, "/stop", STOP_TIMEOUT)
            .await
            .map(drop)
    }
}
