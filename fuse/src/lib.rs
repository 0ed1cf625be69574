//! imgd lazy mounts.
//!
//! - [`fs`]: the read-only FUSE filesystem of a view, reading through a [`fs::BlobSource`].
//!
//! - [`view`]: the merged image view: an image's layer indexes merged into one tree the
//!   way an OCI runtime's unpack would lay it out (whiteouts, opaque directories, hard
//!   links, devices, ownership, xattrs), with inode numbers ready for a FUSE filesystem.

pub mod fs;
pub mod span_cache;
pub mod view;
