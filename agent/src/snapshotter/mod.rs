//! imgd as a containerd proxy snapshotter (`[proxy_plugins.imgd] type = "snapshot"`).
//!
//! containerd asks a snapshotter to `Prepare` an extract snapshot for each layer it
//! unpacks. When the labels name the layer's image (CRI with
//! `disable_snapshot_annotations = false`, or `ctr-remote images rpull`) and the proxy has
//! a seekable index of the layer, imgd commits a placeholder under the name containerd
//! wants and answers `AlreadyExists`: containerd then neither downloads nor unpacks the
//! layer. A container's snapshot on such a chain is an overlay whose lowerdir is imgd's
//! merged lazy view of the chain ([`views`]), one per chain on the host. Everything else
//! is an ordinary overlayfs snapshot ([`overlay`]), so imgd never makes a pull fail.
//!
//! - [`records`]: what is stored of a snapshot, in the agent's RocksDB (`snapshots`).
//! - [`store`]: containerd's snapshot rules over those records and their directories.
//! - [`labels`]: which labels identify a layer, and how an image routes to the proxy.
//! - [`filters`]: containerd's filter expressions, for `List`.
//! - [`service`]: the operations; [`grpc`]: the `snapshots.v1` service on a unix socket.

pub mod error;
pub mod filters;
pub mod grpc;
pub mod labels;
pub mod overlay;
pub mod records;
pub mod service;
pub mod store;
pub mod views;

pub use error::SnapshotError;
pub use service::Snapshotter;
