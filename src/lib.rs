//! imgd core library: the formats and storage every imgd component shares.
//!
//! - [`digest`]: sha256 content digests in OCI form (`sha256:<hex>`).
//! - [`chunk`]: fixed 4 MiB chunking of layer blobs and the per-blob chunk list.
//! - [`index`]: the seekable layer index (file table + inflate checkpoints) and its reader.
//! - [`store`]: the content-addressed chunk store on disk and the RocksDB metadata.
//! - [`manifest`]: the manifest parser with size, count and nesting limits.
//! - [`endpoints`]: interchangeable HTTP endpoints tried in rendezvous order, with health.
//! - [`peer_wire`]: the frame codec of the agents' peer-to-peer data plane.
//! - [`single_flight`]: one cancel-safe piece of work per key, shared by concurrent callers.
//! - [`verified_chunk`], [`verified_pieces`]: chunk (and piece) bytes checked against
//!   their digests, made only by the code that hashed them, so no hop hashes twice.
//! - [`wire`]: JSON types of the proxy's chunk API.

pub mod chunk;
pub mod config_file;
pub mod digest;
pub mod endpoints;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod index;
#[cfg(feature = "logging")]
pub mod logging;
pub mod manifest;
pub mod peer_wire;
pub mod range;
pub mod registry_path;
pub mod rendezvous;
pub mod single_flight;
#[cfg(feature = "store")]
pub mod store;
pub mod verified_chunk;
pub mod verified_pieces;
pub mod wire;

pub use chunk::{ChunkList, ChunkRef, Chunker, PieceHasher, CHUNK_SIZE, PIECE_SIZE};
pub use digest::{Digest, DigestError, Sha256};
pub use single_flight::SingleFlight;
pub use verified_chunk::{ChunkMismatch, ChunkReceiver, VerifiedChunk};
pub use verified_pieces::{PieceMismatch, VerifiedPieces};
