//! Consistency checks of a decoded [`LayerIndex`], so that an index from the network
//! (a proxy, a peer) cannot make a reader index out of bounds or overflow.

use crate::index::format::{Compression, LayerIndex};
use crate::index::gzip::MAX_PACKED_WINDOW;

impl LayerIndex {
    /// Checks what readers rely on: checkpoints ordered and inside the streams (the
    /// seekable copy's, if bound), their windows back to back in the windows part (none for zstd); every entry's stored bytes inside the uncompressed
    /// stream; sparse extents ordered, non-overlapping and inside the file. Every index
    /// the builder produces passes.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_copy()?;
        if self.toc.is_some() && (self.compression != Compression::Zstd || self.copy.is_some()) {
            return Err(
                "zstd:chunked TOC bound to a layer not read from its own zstd frames".into(),
            );
        }
        if self.compression != Compression::Gzip && self.windows_size != 0 {
            return Err("windows part in an index of a layer without windows".into());
        }
        match self.compression {
            Compression::Gzip => {
                self.validate_checkpoints()?;
                self.validate_windows()?;
            }
            Compression::Zstd if self.random_access => {
                if self.uncompressed_size > 0 || !self.checkpoints.is_empty() {
                    self.validate_checkpoints()?;
                }
                if self
                    .checkpoints
                    .iter()
                    .any(|c| c.bits != 0 || c.window.is_some())
                {
                    return Err("zstd frame checkpoint with bits or a window".into());
                }
            }
            Compression::None | Compression::Zstd if !self.checkpoints.is_empty() => {
                return Err(
                    "checkpoints in an index of a layer that is not randomly readable".into(),
                )
            }
            Compression::None if self.uncompressed_size != self.compressed_size => {
                return Err("plain tar layer whose sizes differ".into())
            }
            _ => {}
        }
        for (i, e) in self.entries.iter().enumerate() {
            let bad = |what: &str| Err(format!("entry {i} ({}): {what}", e.path_lossy()));
            let mut end = 0u64;
            let mut stored = 0u64;
            for x in &e.sparse {
                if x.offset < end {
                    return bad("sparse extents overlap or are out of order");
                }
                end = match x.offset.checked_add(x.length) {
                    Some(v) if v <= e.size => v,
                    _ => return bad("sparse extent ends past the file's size"),
                };
                stored += x.length;
            }
            if e.sparse.is_empty() {
                stored = e.stored_size();
            }
            match e.content_offset.checked_add(stored) {
                Some(v) if v <= self.uncompressed_size => {}
                _ => return bad("content ends past the uncompressed stream"),
            }
        }
        Ok(())
    }

    /// Windows lie back to back in checkpoint order and fill the windows part exactly,
    /// each 1..=[`MAX_PACKED_WINDOW`] bytes, and the blob start has none; so a window's
    /// location cannot point anywhere else, and the part is at most 32 KiB or so per
    /// checkpoint.
    fn validate_windows(&self) -> Result<(), String> {
        let mut at = 0u64;
        for (i, cp) in self.checkpoints.iter().enumerate() {
            let Some(w) = &cp.window else { continue };
            if i == 0 {
                return Err("checkpoint 0 (the blob start) with a window".into());
            }
            if w.offset != at || w.len == 0 || w.len as usize > MAX_PACKED_WINDOW {
                return Err(format!(
                    "checkpoint {i}: window at {}+{} (expected at {at}, 1..={MAX_PACKED_WINDOW} bytes)",
                    w.offset, w.len
                ));
            }
            at += u64::from(w.len);
        }
        if at != self.windows_size {
            return Err(format!(
                "windows fill {at} bytes, the windows part has {}",
                self.windows_size
            ));
        }
        Ok(())
    }

    fn validate_checkpoints(&self) -> Result<(), String> {
        let Some(first) = self.checkpoints.first() else {
            return Err("compressed index without checkpoints".into());
        };
        let readable = self.readable_blob().1;
        if first.compressed_offset != 0 || first.uncompressed_offset != 0 || first.bits != 0 {
            return Err("first checkpoint is not the start of the blob".into());
        }
        let mut prev = first;
        for (i, cp) in self.checkpoints.iter().enumerate() {
            let bad = |what: &str| Err(format!("checkpoint {i}: {what}"));
            if cp.bits > 7 {
                return bad("bad bit count");
            }
            if cp.compressed_offset > readable || cp.uncompressed_offset > self.uncompressed_size {
                return bad("past the end of the layer");
            }
            if i > 0
                && (cp.compressed_offset <= prev.compressed_offset
                    || cp.uncompressed_offset < prev.uncompressed_offset)
            {
                return bad("out of order");
            }
            if cp.bits > 0 && cp.compressed_offset == 0 {
                return bad("bits set at offset 0");
            }
            prev = cp;
        }
        Ok(())
    }
}
