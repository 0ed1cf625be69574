//! A small HTTP/1.1 client over a unix socket, bounded in time: how a mount process
//! reaches the agent's local API, and the agent a mount process's control socket.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest answer body read (a chunk is 4 MiB; a startup trace is at most 16 MiB).
const MAX_BODY: usize = 32 << 20;

/// An answer.
#[derive(Debug)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Why no answer came. Every variant means the other side could not be talked to, as
/// opposed to a [`Reply`] with an error status, which it sent.
#[derive(Debug, thiserror::Error)]
pub enum UnixHttpError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {path}: {message}")]
    Broken { path: PathBuf, message: String },
    #[error("no answer from {path} within {after:?}")]
    Timeout { path: PathBuf, after: Duration },
}

impl UnixHttpError {
    /// True if nothing listens on the socket (no file, or the connection was refused):
    /// its server is gone, as opposed to slow.
    pub fn nobody_listens(&self) -> bool {
        matches!(self, UnixHttpError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// Sends `method path` (with a JSON `body`, if any) to the server on `socket` and reads
/// the whole answer, all within `timeout`.
pub async fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Reply, UnixHttpError> {
    let broken = |e: &dyn std::fmt::Display| UnixHttpError::Broken {
        path: socket.to_path_buf(),
        message: e.to_string(),
    };
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| UnixHttpError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| broken(&e))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "imgd")
            .header("content-type", "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| broken(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| broken(&e))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| broken(&e))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| UnixHttpError::Timeout {
            path: socket.to_path_buf(),
            after: timeout,
        })?
}
