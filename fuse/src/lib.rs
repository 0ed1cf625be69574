//! imgd lazy mounts.
//!
//! - [`fs`]: the read-only FUSE filesystem of a view, reading through a [`fs::BlobSource`].
//! - [`spans`]: reads of layers' tar streams span by span, from the on-disk inflated
//!   cache ([`inflated`]) or inflated once ([`flight`]) and stored; readahead.
//!
//! - [`view`]: the merged image view: an image's layer indexes merged into one tree the
//!   way an OCI runtime's unpack would lay it out (whiteouts, opaque directories, hard
//!   links, devices, ownership, xattrs), with inode numbers ready for a FUSE filesystem.

pub mod flight;
pub mod fs;
pub mod inflated;
pub mod span_cache;
pub mod spans;
pub mod view;
