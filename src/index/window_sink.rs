//! [`WindowSink`]: where an index builder puts the checkpoints' packed windows (the
//! index's windows part) as it makes them, so that a large layer's windows need not be
//! held in memory until the index is written.
//!
//! A `Vec<u8>` is the in-memory sink (tests, small callers: [`crate::index::index_blob`]
//! attaches it to the index). A daemon gives a sink that spools the windows to a file
//! (imgd-proxy writes them to a temp file in its staging area and appends them to the
//! stored index at commit).

/// Receives the packed windows of an index's checkpoints, in checkpoint order: window
/// `k` starts where window `k - 1` ended (the [`crate::index::WindowRef`] offsets assume
/// the sink stores them back to back from offset 0).
pub trait WindowSink {
    /// Appends one packed window. An error fails the index being built.
    fn append(&mut self, packed: &[u8]) -> std::io::Result<()>;
}

/// The in-memory sink: the windows part, back to back.
impl WindowSink for Vec<u8> {
    fn append(&mut self, packed: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(packed);
        Ok(())
    }
}

impl<W: WindowSink + ?Sized> WindowSink for &mut W {
    fn append(&mut self, packed: &[u8]) -> std::io::Result<()> {
        (**self).append(packed)
    }
}

impl<W: WindowSink + ?Sized> WindowSink for Box<W> {
    fn append(&mut self, packed: &[u8]) -> std::io::Result<()> {
        (**self).append(packed)
    }
}
