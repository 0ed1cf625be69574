//! containerd's `snapshots.v1` gRPC service over [`Snapshotter`], on a unix socket.

use super::overlay::ContainerdMount;
use super::records::{Kind, SnapshotRecord};
use super::service::Snapshotter;
use super::SnapshotError;
use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types::Mount;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC face of the snapshotter.
pub struct SnapshotsService(pub Arc<Snapshotter>);

fn parent(p: &str) -> Option<&str> {
    (!p.is_empty()).then_some(p)
}

fn to_mounts(m: Vec<ContainerdMount>) -> Vec<Mount> {
    m.into_iter()
        .map(|m| Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

fn info(name: String, r: SnapshotRecord) -> pb::Info {
    let kind = match r.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name,
        parent: r.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(timestamp(r.created_ns)),
        updated_at: Some(timestamp(r.updated_ns)),
        labels: r.labels.into_iter().collect(),
    }
}

/// Logs a failure (but the `AlreadyExists` containerd asks for) and converts it.
fn status(op: &str, key: &str, e: SnapshotError) -> Status {
    if !matches!(
        e,
        SnapshotError::AlreadyExists(_) | SnapshotError::NotFound(_)
    ) {
        tracing::warn!(op, key, error = %e, "snapshot operation failed");
    }
    e.into()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .0
            .prepare(&r.key, parent(&r.parent), r.labels)
            .await
            .map_err(|e| status("prepare", &r.key, e))?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: to_mounts(mounts),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .0
            .view(&r.key, parent(&r.parent), r.labels)
            .await
            .map_err(|e| status("view", &r.key, e))?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: to_mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .0
            .mounts(&r.key)
            .await
            .map_err(|e| status("mounts", &r.key, e))?;
        Ok(Response::new(pb::MountsResponse {
            mounts: to_mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.0
            .commit(&r.name, &r.key, r.labels)
            .await
            .map_err(|e| status("commit", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.0
            .remove(&r.key)
            .await
            .map_err(|e| status("remove", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let record = self.0.stat(&r.key).map_err(|e| status("stat", &r.key, e))?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(r.key, record)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let given = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without an info"))?;
        let mask = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let record = self
            .0
            .update(&given.name, given.labels.into_iter().collect(), mask)
            .await
            .map_err(|e| status("update", &given.name, e))?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(given.name, record)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let r = req.into_inner();
        let all = self
            .0
            .list(&r.filters)
            .await
            .map_err(|e| status("list", "", e))?;
        let infos: Vec<pb::Info> = all.into_iter().map(|(n, r)| info(n, r)).collect();
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self
            .0
            .usage(&r.key)
            .await
            .map_err(|e| status("usage", &r.key, e))?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(u.bytes).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.0
            .cleanup()
            .await
            .map_err(|e| status("cleanup", "", e))?;
        Ok(Response::new(()))
    }
}

/// Serves the snapshotter on the unix socket `listener` until the process ends.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    listener: tokio::net::UnixListener,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(pb::snapshots_server::SnapshotsServer::new(
            SnapshotsService(snapshotter),
        ))
        .serve_with_incoming(incoming)
        .await
}
