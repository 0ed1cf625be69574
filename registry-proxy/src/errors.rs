//! Errors answered to registry clients, as OCI error bodies with honest status codes.

use crate::ingest::IngestError;
use crate::space::SpaceError;
use crate::storage::StorageError;
use crate::upstream::UpstreamError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// An error for a registry or chunk-API client.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no upstream serves {0:?}")]
    NameUnknown(String),
    #[error("{0} is not known")]
    BlobUnknown(String),
    #[error("this route needs the chunk API token (Authorization: Bearer)")]
    Unauthorized,
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("requested range not satisfiable for a blob of {0} bytes")]
    Range(u64),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Ingest(Arc<IngestError>),
}

impl From<Arc<IngestError>> for ProxyError {
    fn from(e: Arc<IngestError>) -> Self {
        ProxyError::Ingest(e)
    }
}

/// An OCI error body with one error.
pub fn oci_error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string()
}

fn respond(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        oci_error_body(code, message),
    )
        .into_response()
}

fn upstream_response(e: &UpstreamError) -> Response {
    let msg = e.to_string();
    match e {
        UpstreamError::Status {
            status,
            body,
            content_type,
            retry_after,
        } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            let is_oci_json = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .is_some_and(|v| v.get("errors").is_some());
            let mut resp = if is_oci_json {
                let ct = content_type.as_deref().unwrap_or("application/json");
                (
                    status,
                    [(header::CONTENT_TYPE, ct.to_string())],
                    body.clone(),
                )
                    .into_response()
            } else {
                let code = match status.as_u16() {
                    401 => "UNAUTHORIZED",
                    403 => "DENIED",
                    404 => "NAME_UNKNOWN",
                    429 => "TOOMANYREQUESTS",
                    _ => "UNKNOWN",
                };
                respond(
                    status,
                    code,
                    &format!("{msg}: {}", String::from_utf8_lossy(body).trim()),
                )
            };
            if let Some(v) = retry_after
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
        UpstreamError::NotFound(_) => respond(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", &msg),
        UpstreamError::DigestMismatch { .. } => {
            respond(StatusCode::BAD_GATEWAY, "DIGEST_INVALID", &msg)
        }
        UpstreamError::MalformedManifest(_) => {
            respond(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", &msg)
        }
        UpstreamError::Timeout(_) => respond(StatusCode::GATEWAY_TIMEOUT, "UNKNOWN", &msg),
        UpstreamError::Auth(_)
        | UpstreamError::Unreachable(_)
        | UpstreamError::Interrupted(_)
        | UpstreamError::Truncated { .. } => respond(StatusCode::BAD_GATEWAY, "UNKNOWN", &msg),
    }
}

fn storage_response(e: &StorageError) -> Response {
    let full = matches!(e, StorageError::Store(s) if s.is_disk_full());
    let status = if full {
        StatusCode::INSUFFICIENT_STORAGE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    respond(status, "UNKNOWN", &e.to_string())
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match &self {
            ProxyError::NameUnknown(_) => respond(StatusCode::NOT_FOUND, "NAME_UNKNOWN", &msg),
            ProxyError::BlobUnknown(_) => respond(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", &msg),
            ProxyError::BadRequest(_) => respond(StatusCode::BAD_REQUEST, "UNSUPPORTED", &msg),
            ProxyError::Unauthorized => {
                let mut r = respond(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", &msg);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"imgd-proxy chunk API\""),
                );
                r
            }
            ProxyError::Range(size) => {
                let mut r = respond(StatusCode::RANGE_NOT_SATISFIABLE, "UNSUPPORTED", &msg);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                r
            }
            ProxyError::Upstream(e) => upstream_response(e),
            ProxyError::Storage(e) => storage_response(e),
            ProxyError::Ingest(e) => match e.as_ref() {
                IngestError::Upstream(u) => upstream_response(u),
                IngestError::Storage(s) => storage_response(s),
                IngestError::Space(SpaceError::Storage(s)) => storage_response(s),
                IngestError::Space(SpaceError::QuotaExceeded { .. }) => {
                    respond(StatusCode::INSUFFICIENT_STORAGE, "UNKNOWN", &msg)
                }
                IngestError::Worker(_) => {
                    respond(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &msg)
                }
                IngestError::Refused { .. } | IngestError::RememberedRefusal { .. } => {
                    respond(StatusCode::UNPROCESSABLE_ENTITY, "BLOB_INVALID", &msg)
                }
            },
        }
    }
}
