//! The mount process's control socket (routes in [`crate::mounts::control`]).

use super::source::ChunkSource;
use crate::mounts::control::ProcessStatus;
use crate::mounts::record::MountRecord;
use crate::startup::TraceRecorder;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imgd_fuse::fs::MountStats;
use imgd_fuse::view::ImageView;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A request to unmount, answered with the outcome.
pub type StopRequest = oneshot::Sender<Result<(), String>>;

/// What the control routes see.
pub struct Shared {
    pub record: Arc<MountRecord>,
    pub view: Arc<ImageView>,
    pub stats: Arc<MountStats>,
    pub source: Arc<ChunkSource>,
    pub spans: imgd_fuse::spans::SpanReader,
    pub recorder: Option<Arc<TraceRecorder>>,
    pub stop: mpsc::Sender<StopRequest>,
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/trace", post(trace))
        .route("/stop", post(stop))
        .with_state(shared)
}

async fn status(State(s): State<Arc<Shared>>) -> Json<ProcessStatus> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Json(ProcessStatus {
        id: s.record.id.clone(),
        dir: s.record.dir.clone(),
        pid: std::process::id(),
        link: s.source.link(),
        reads: get(&s.stats.reads),
        bytes_read: get(&s.stats.bytes_read),
        eio: get(&s.stats.eio),
        fetched_bytes: get(&s.source.fetched.bytes),
        fetched_chunks: get(&s.source.fetched.chunks),
        chunk_reads: get(&s.source.fetched.reads),
        spans_inflated: get(&s.stats.spans_inflated),
        spans_read_ahead: get(&s.stats.spans_read_ahead),
        disk_reads: get(&s.stats.disk_reads),
    })
}

async fn trace(State(s): State<Arc<Shared>>) -> Response {
    let trace = s.recorder.as_ref().and_then(|r| r.finish(&s.view));
    Json(trace).into_response()
}

async fn stop(State(s): State<Arc<Shared>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if s.stop.send(tx).await.is_err() {
        return (StatusCode::CONFLICT, "already stopping").into_response();
    }
    match rx.await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => (StatusCode::CONFLICT, e).into_response(),
        Err(_) => (StatusCode::CONFLICT, "already stopping").into_response(),
    }
}
