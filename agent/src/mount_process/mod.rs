//! The mount process (`imgd-mount RECORD_DIR`): serves one lazy mount, and outlives the
//! agent that started it.
//!
//! It builds the view from the layer indexes the agent checked and left in the mount's
//! record ([`crate::mounts::record`]), mounts it, and serves FUSE with
//! [`imgd_fuse::fs::ImageFs`] over a [`source::ChunkSource`]: cached chunks from the
//! cache's files, others through the agent's local API, retried across an agent restart.
//! It answers the agent on its control socket ([`server`]), records the startup trace the
//! agent collects, and prefetches a known one.
//!
//! Its life: *mounting* (prints `ready`, or `error: REASON` and exits, on stdout, which
//! the agent reads) → *serving* (the agent link, connected or lost, is
//! [`crate::mounts::control::AgentLink`]) → *unmounting*, on `POST /stop` or SIGTERM (a
//! busy mount refuses and keeps serving) → exit. It also exits when the kernel ends the
//! session (someone unmounted it).

pub mod server;
pub mod source;

use crate::mounts::record::{MountRecord, RecordDir};
use crate::startup::{self, TraceRecorder};
use futures::StreamExt;
use imgd_core::index::LayerIndex;
use imgd_fuse::fs::{ImageFs, MountStats};
use imgd_fuse::spans::{SpanReader, SpanStore};
use imgd_fuse::view::{ImageView, ViewLimits};
use source::ChunkSource;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// How long the process waits for the kernel to end the session after an unmount.
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(10);

/// Fault injection for crash tests: milliseconds to pause halfway through writing each
/// inflated span to disk.
pub const SPAN_WRITE_PAUSE_ENV: &str = "IMGD_FAULT_SPAN_WRITE_PAUSE_MS";

/// Why the mount process could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the mount record {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("index of layer {layer}: {reason}")]
    Index { layer: usize, reason: String },
    #[error("building the view: {0}")]
    View(String),
    #[error("mounting at {dir}: {source}")]
    Mount {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the record and view of the mount in `dir`.
fn load(rdir: &RecordDir) -> Result<(MountRecord, ImageView), ServeError> {
    let record = rdir.read().map_err(|source| ServeError::Record {
        path: rdir.record().display().to_string(),
        source,
    })?;
    let mut indexes = Vec::new();
    if record.index_files.len() != record.layers.len() {
        return Err(ServeError::View("an index file per layer".into()));
    }
    for (n, (layer, file)) in record.layers.iter().zip(&record.index_files).enumerate() {
        let bad = |reason: String| ServeError::Index { layer: n, reason };
        let bytes = std::fs::read(file).map_err(|e| bad(format!("{}: {e}", file.display())))?;
        let index = LayerIndex::decode(&bytes).map_err(|e| bad(e.to_string()))?;
        if index.layer != *layer {
            return Err(bad(format!("is for {}, not {layer}", index.layer)));
        }
        indexes.push(index);
    }
    let view = ImageView::build(Arc::new(indexes), ViewLimits::default())
        .map_err(|e| ServeError::View(e.to_string()))?;
    Ok((record, view))
}

fn fuse_config(record: &MountRecord) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(format!("imgd:{}", record.label)),
        fuser::MountOption::Subtype("imgd".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::Exec,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(record.threads.max(1));
    config
}

/// Tells the agent how mounting went (one line on stdout, which is then left alone).
fn report(outcome: &Result<(), String>) {
    let mut out = std::io::stdout().lock();
    let _ = match outcome {
        Ok(()) => writeln!(out, "ready"),
        Err(e) => writeln!(out, "error: {}", e.replace('\n', " ")),
    };
    let _ = out.flush();
}

/// Serves the mount whose record is in `dir` until it is unmounted.
pub async fn run(dir: &Path) -> Result<(), ServeError> {
    let result = mount_and_serve(RecordDir(dir.to_path_buf())).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "mount process failed");
    }
    result
}

async fn mount_and_serve(rdir: RecordDir) -> Result<(), ServeError> {
    let mounted = mount(&rdir).await;
    let (session, shared, stop_rx) = match mounted {
        Ok(m) => m,
        Err(e) => {
            report(&Err(e.to_string()));
            return Err(e);
        }
    };
    let socket = rdir.control_socket();
    let _ = std::fs::remove_file(&socket);
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(source) => {
            let e = ServeError::Control {
                path: socket.display().to_string(),
                source,
            };
            report(&Err(e.to_string()));
            return Err(e);
        }
    };
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _ = ended_tx.send(session.run());
        })
        .map_err(|source| ServeError::Mount {
            dir: shared.record.dir.display().to_string(),
            source,
        })?;
    let (quit_tx, quit) = tokio::sync::oneshot::channel::<()>();
    let router = server::router(shared.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = quit.await;
            })
            .await
    });
    report(&Ok(()));
    tracing::info!(dir = %shared.record.dir.display(), label = %shared.record.label, pid = std::process::id(), "mount process serving");
    if let Some(trace) = shared.record.warm.clone() {
        tokio::spawn(warm(shared.clone(), trace));
    }
    serve_until_unmounted(&shared, stop_rx, ended).await;
    let _ = quit_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!(dir = %shared.record.dir.display(), "mount process exits");
    Ok(())
}

type Mounted = (
    fuser::Session<ImageFs>,
    Arc<server::Shared>,
    mpsc::Receiver<server::StopRequest>,
);

/// Builds the view and mounts it (the session is not yet served).
async fn mount(rdir: &RecordDir) -> Result<Mounted, ServeError> {
    let r = rdir.clone();
    let (record, view) = tokio::task::spawn_blocking(move || load(&r))
        .await
        .map_err(|e| ServeError::View(e.to_string()))??;
    let (record, view) = (Arc::new(record), Arc::new(view));
    let source = Arc::new(ChunkSource::new(
        record.clone(),
        tokio::runtime::Handle::current(),
    ));
    let stats = Arc::new(MountStats::default());
    let root = imgd_fuse::inflated::layout::root(&record.cache_dir);
    let write_pause = std::env::var(SPAN_WRITE_PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let (v, src, st) = (view.clone(), source.clone(), stats.clone());
    let spans = tokio::task::spawn_blocking(move || {
        let store = SpanStore {
            root: Some(&root),
            write_pause,
        };
        SpanReader::new(v, src, st, store)
    })
    .await
    .map_err(|e| ServeError::View(e.to_string()))?;
    let mut fs = ImageFs::new(view.clone(), spans.clone(), stats.clone());
    let recorder = record.record_trace.then(TraceRecorder::recording);
    if let Some(rec) = &recorder {
        let hook = rec.clone();
        fs = fs.on_open(move |ino| hook.opened(ino));
        let hook = rec.clone();
        fs = fs.on_read(move |ino, offset, size| hook.read(ino, offset, size));
    }
    let config = fuse_config(&record);
    let dir = record.dir.clone();
    let session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &dir, &config))
        .await
        .map_err(|e| ServeError::View(e.to_string()))?
        .map_err(|source| ServeError::Mount {
            dir: record.dir.display().to_string(),
            source,
        })?;
    let (stop, stop_rx) = mpsc::channel(1);
    let shared = Arc::new(server::Shared {
        record,
        view,
        stats,
        source,
        spans,
        recorder,
        stop,
    });
    Ok((session, shared, stop_rx))
}

/// Serves until the mount is gone: unmounted on request (`POST /stop`, SIGTERM), or by
/// someone else (the kernel ends the session).
async fn serve_until_unmounted(
    shared: &server::Shared,
    mut stop: mpsc::Receiver<server::StopRequest>,
    mut ended: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
) {
    let dir = shared.record.dir.clone();
    let mut sigterm = signal(SignalKind::terminate()).ok();
    loop {
        let reply = tokio::select! {
            r = &mut ended => {
                match r {
                    Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session failed"),
                    _ => tracing::info!(dir = %dir.display(), "the mount was unmounted"),
                }
                return;
            }
            req = stop.recv() => req,
            _ = async { match sigterm.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => None,
        };
        let d = dir.clone();
        let unmounted = tokio::task::spawn_blocking(move || unmount(&d))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let ok = unmounted.is_ok();
        if let Err(e) = &unmounted {
            tracing::warn!(dir = %dir.display(), error = %e, "unmount refused; still serving");
        }
        if let Some(reply) = reply {
            let _ = reply.send(unmounted);
        }
        if ok {
            if tokio::time::timeout(SESSION_END_TIMEOUT, &mut ended)
                .await
                .is_err()
            {
                tracing::warn!(dir = %dir.display(), "the FUSE session did not end after unmount");
            }
            return;
        }
    }
}

/// `umount(2)` of the mount point (not lazy: a busy mount stays and says so).
fn unmount(dir: &Path) -> Result<(), String> {
    let c =
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(format!(
            "umount {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Prefetches what reads of a known startup trace's files need (the pieces from each
/// file's checkpoint to its end), before they are read, in trace order a few at once,
/// through the same source as reads (so the bytes count as this mount's). Files already
/// inflated on disk need no chunk and are skipped.
async fn warm(shared: Arc<server::Shared>, trace: imgd_core::wire::StartupTrace) {
    use imgd_core::index::gzip::input_start;
    use imgd_fuse::fs::BlobSource;
    let s = shared.clone();
    let files = trace.paths.len();
    let wanted = tokio::task::spawn_blocking(move || {
        startup::ranges_of(&s.view, &trace, |l, r| s.spans.is_present(l, r))
    })
    .await
    .unwrap_or_default();
    tracing::info!(
        files = wanted.len(),
        "prefetching what the startup files need"
    );
    let before = shared.source.fetched.bytes.load(Ordering::Relaxed);
    let mut jobs = futures::stream::iter(wanted)
        .map(|(layer, range)| {
            let source = shared.source.clone();
            // The windows of the checkpoints in the range too (gzip): reads inflate span
            // by span, each from its own checkpoint. Up to the end of the range's last
            // piece, whose bytes arrive with it: a readahead of the next span then
            // needs nothing more.
            let piece = imgd_core::PIECE_SIZE as u64;
            let end = range.end.div_ceil(piece) * piece;
            let windows: Vec<_> = shared.view.layer(layer).map_or_else(Vec::new, |index| {
                let cps = &index.checkpoints;
                let first = cps.partition_point(|c| input_start(c) < range.start);
                (first..cps.len())
                    .take_while(|&i| cps[i].compressed_offset < end)
                    .filter_map(|i| Some((i, cps[i].window?)))
                    .collect()
            });
            tokio::task::spawn_blocking(move || {
                for (i, w) in &windows {
                    source.window(layer, *i, w)?;
                }
                source.read(layer, range).map(drop)
            })
        })
        .buffered(startup::WARM_PARALLEL);
    let mut failed = None;
    while let Some(r) = jobs.next().await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    let bytes = shared.source.fetched.bytes.load(Ordering::Relaxed) - before;
    match failed {
        None => tracing::info!(bytes, files, "startup files prefetched"),
        Some(e) => tracing::warn!(error = %e, "startup prefetch failed"),
    }
}
