//! The on-disk cache of inflated layer data: each layer's uncompressed tar stream as a
//! sparse file, plus a log of the spans it holds, so that a warm read is a `pread`.
//! Shared by every mount process of the agent (they read and add spans of the same
//! files), bounded by the agent's cache quota (see `imgd_agent::cache`); file layout in
//! [`layout`].
//!
//! # A span's life
//!
//! A *span* is the stretch of the stream from one inflate checkpoint to the next
//! ([`imgd_core::index::span_of`]): inflating it costs one pass from its checkpoint.
//! Presence is kept as uncompressed byte ranges ([`extents`]), so it does not depend on
//! how dense an index's checkpoints are.
//!
//! | state | meaning | next |
//! |---|---|---|
//! | *absent* | no record covers it; its bytes in `stream` mean nothing (a hole, or a half-written try) | *inflating*, when a read or the readahead needs it |
//! | *inflating* | one thread of this process inflates it ([`crate::flight`]); readers of the span wait for that one run | *present* once written; *absent* if it fails or its thread unwinds (waiters get the error; the next read tries again) |
//! | *present* | a record in `spans` covers it: its bytes are in `stream`, whole | *evicted* |
//! | *evicted* | the agent removed the layer's files (every span at once), which it does only while no process holds the layer's lease | *absent* |
//!
//! Two processes may inflate one span at the same time; they write the same bytes.
//!
//! # Crash safety
//!
//! A span becomes present only by [`layer::LayerFile::commit`]: write its bytes into
//! `stream`, `fdatasync` them, then append its record (one `write` of 24 bytes to an
//! `O_APPEND` file, with a check word).
//! - `kill -9` of a mount process at any point: the bytes it had written are in the page
//!   cache and reach the file anyway; a span whose record was not written stays absent
//!   and is inflated again. No record can precede its bytes.
//! - Power loss: the bytes were synced before the record was written, so a record that
//!   survives names synced bytes. A record being written may be torn; torn and zeroed
//!   records fail their check word and are skipped (the next append pads the log back to
//!   a record boundary). The log itself is not synced: a record lost with the power only
//!   makes its span absent again.
//! - Eviction: the agent renames a layer's directory away and then deletes it, under the
//!   exclusive lease (see [`layout::evict`]); a crash in between leaves a `.evicting-*`
//!   directory that the next scan removes.

pub mod extents;
pub mod layer;
pub mod layout;

pub use layer::{LayerFile, LayerFileError};
pub use layout::{evict, usage, Eviction, LayerUsage, DIR_NAME};
