//! The proxy's HTTP server: shared state and routes.

use crate::config::{ConfigError, ProxyConfig};
use crate::ingest::Ingestor;
use crate::routing::Upstreams;
use crate::space::Space;
use crate::storage::Tags;
use crate::storage::{Storage, StorageError};
use crate::upstream::Upstream;
use crate::{chunk_api, registry_api, Stats};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening storage: {0}")]
    Storage(#[from] StorageError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Test hook: milliseconds each eviction pauses between deleting a blob's records and
/// its files (to kill the proxy mid-eviction). Not for production use.
pub const EVICTION_PAUSE_ENV: &str = "IMGD_PROXY_TEST_EVICTION_PAUSE_MS";

/// State shared by every request.
pub struct AppState {
    pub config: ProxyConfig,
    pub upstreams: Upstreams,
    pub storage: Arc<Storage>,
    pub ingestor: Ingestor,
    /// Quota, eviction, pins and leases of the storage.
    pub space: Arc<Space>,
    pub stats: Arc<Stats>,
    /// sha256 of the token the chunk API requires (`None`: open).
    pub chunk_api_token: Option<imgd_core::Digest>,
}

impl AppState {
    /// Validates the configuration, opens storage and builds the upstreams.
    pub fn new(config: ProxyConfig) -> Result<AppState, StartError> {
        config.validate()?;
        let storage = Arc::new(Storage::open(&config.storage_dir)?);
        let mut entries = Vec::new();
        for u in &config.upstreams {
            entries.push((
                u.name.clone(),
                Arc::new(Upstream::from_config(
                    u,
                    config.upstream_timeout(),
                    &config.retry,
                )?),
            ));
        }
        let default = config.upstreams.iter().position(|u| u.default);
        let stats = Arc::new(Stats::default());
        let quota = (config.storage_quota_bytes > 0).then_some(config.storage_quota_bytes);
        let pause = std::env::var(EVICTION_PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis);
        let space = Arc::new(Space::open(storage.clone(), quota, pause)?);
        let chunk_api_token = config.chunk_api.required_token()?;
        let state = AppState {
            chunk_api_token: chunk_api_token
                .as_ref()
                .map(|t| imgd_core::Digest::of(t.as_bytes())),
            upstreams: Upstreams::new(entries, default),
            ingestor: Ingestor::new(
                space.clone(),
                stats.clone(),
                config.index,
                crate::refusals::Refusals::new(std::time::Duration::from_secs(
                    config.refused_layer_ttl_secs,
                )),
                crate::peers::Peers::new(
                    &config.peers,
                    chunk_api_token.clone(),
                    config.upstream_timeout(),
                )?,
            ),
            storage,
            space,
            stats,
            config,
        };
        crate::pins::refresh(&state)?;
        Ok(state)
    }
}

/// The proxy's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/", get(registry_api::version_check))
        .route("/imgd/v1/blobs/{digest}", get(chunk_api::blob_info))
        .route("/imgd/v1/blobs/{digest}/data", get(chunk_api::blob_data))
        .route(
            "/imgd/v1/blobs/{digest}/arrived",
            get(crate::arrived_api::arrived),
        )
        .route("/imgd/v1/chunks/{digest}", get(chunk_api::chunk))
        .route("/imgd/v1/indexes/{digest}", get(crate::index_api::index))
        .route(
            "/imgd/v1/layers/{digest}/parts",
            get(crate::index_api::parts),
        )
        .route(
            "/imgd/v1/indexes/{digest}/windows",
            get(crate::index_api::windows),
        )
        .route("/imgd/v1/stats", get(chunk_api::stats))
        .route("/imgd/v1/verify", get(chunk_api::verify))
        .route("/imgd/v1/pins", get(crate::pins::get_pins))
        .route(
            "/imgd/v1/pins/{*image}",
            axum::routing::put(crate::pins::put_pin).delete(crate::pins::delete_pin),
        )
        .route(
            "/imgd/v1/traces/{digest}",
            get(chunk_api::get_trace).put(chunk_api::put_trace),
        )
        // The pid lets a supervisor (or a test) tell this process from another one that
        // holds the address it asked for.
        .route(
            "/healthz",
            get(|| async { ([("x-imgd-pid", std::process::id().to_string())], "ok\n") }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(registry_api::dispatch)
        .with_state(state)
}

/// `GET /metrics`: every metric as OpenMetrics text.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let rendered = tokio::task::spawn_blocking(move || crate::metrics::render(&state)).await;
    match rendered {
        Ok(Ok(text)) => {
            ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /readyz`: 200 `ready` once storage answers a read, else 503 naming what failed.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.storage.meta.get::<Tags>(&String::new()) {
        Ok(_) => "ready\nstorage: ok\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\nstorage: {e}\n"),
        )
            .into_response(),
    }
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    tracing::info!(addr = ?listener.local_addr().ok(), "imgd-proxy listening");
    if !state.config.pins.is_empty() {
        tokio::spawn(crate::pins::pin_configured(state.clone()));
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
