//! Push-based streaming tar scanner: turns a tar stream fed in arbitrary slices into
//! [`Entry`] values without buffering file contents.
//!
//! Supported: v7, ustar (with the 155-byte prefix) and old GNU headers; base-256 numeric
//! fields; GNU long names (`L`) and long link names (`K`); PAX extended headers (`x`) with
//! `path`, `linkpath`, `size`, `uid`, `gid`, `mtime` (fractional), `SCHILY.xattr.*`;
//! GNU sparse files in the old GNU format (`S`) and the PAX formats 0.0, 0.1 and 1.0.
//!
//! Choices:
//! - PAX global headers (`g`) are parsed; their `uid`, `gid` and `mtime` apply to later
//!   entries that do not override them; other global keys (`path`, `comment`, ...) are
//!   ignored. `uname`, `gname`, `atime`, `ctime` and `LIBARCHIVE.*` keys are ignored.
//! - The first all-zero block ends the archive (GNU tar's behaviour); everything after it
//!   is ignored. End of input at a header boundary is also accepted.
//! - `Entry::size` is the logical size for files (and the header size for hard links); 0
//!   for directories, symlinks, devices and fifos (any stored content is skipped).
//! - Volume labels (`V`) are skipped; GNU dump directories (`D`) are directories; other
//!   unknown type flags are an error.
//! - A regular-file entry whose name ends in `/` is a directory (old tar convention).
//!
//! Hostile input (see [`TarOptions`] for the limits):
//! - Paths are normalised: a leading `/` (absolute path) and `.` components are stripped;
//!   a `..` component is an error ([`TarError::UnsafePath`]), in paths and hard link
//!   targets. Symlink targets are kept verbatim (the image view resolves them inside its
//!   root).
//! - A hard link must not name a directory or an entry that only comes later in the same
//!   archive ([`TarError::BadHardlink`]). A target absent from the archive is kept: it may
//!   name a file of a lower layer (the image view skips it when it names nothing).
//! - Duplicate paths are kept in archive order; the later entry wins (as when extracting).
//! - Device nodes are kept unless [`TarOptions::allow_devices`] is off.

mod header;
mod options;
mod paths;

use crate::index::format::{Entry, EntryKind};
use header::{self as th, Header, Meta, SparseMapParser};
pub use options::{
    TarError, TarOptions, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_META_SIZE, DEFAULT_MAX_PATH_LEN,
};
use paths::bad_link;
pub use paths::normalize;
use std::collections::HashMap;

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// Kind of metadata whose content is being collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetaKind {
    LongName,
    LongLink,
    Pax,
    GlobalPax,
}

enum State {
    /// Collecting the next 512-byte header block.
    Header,
    /// Skipping `remaining` bytes of content and padding.
    Skip { remaining: u64 },
    /// Collecting a metadata entry's content; `padding` follows it.
    Collect {
        kind: MetaKind,
        offset: u64,
        remaining: u64,
        padding: u64,
        buf: Vec<u8>,
    },
    /// Old GNU sparse extension blocks follow the header.
    SparseExt { entry: Box<Entry>, stored: u64 },
    /// A PAX 1.0 sparse map at the start of the data area (`stored` = whole data size).
    SparseMap {
        entry: Box<Entry>,
        stored: u64,
        map_len: u64,
        parser: SparseMapParser,
    },
    /// After the end-of-archive marker.
    End,
}

/// Streaming tar scanner; see the module documentation.
pub struct TarScanner {
    opts: TarOptions,
    /// Stream offset of the next byte fed.
    pos: u64,
    state: State,
    block: [u8; BLOCK],
    block_len: usize,
    pending: Meta,
    global: Meta,
    entries: Vec<Entry>,
    /// Paths seen so far, and whether the latest entry of each is a directory.
    seen: HashMap<Vec<u8>, bool>,
    /// Hard links whose target was not seen before them: (entry index, header offset).
    unresolved_links: Vec<(usize, u64)>,
}

impl TarScanner {
    /// A scanner at the start of a tar stream.
    pub fn new(opts: TarOptions) -> Self {
        TarScanner {
            opts,
            pos: 0,
            state: State::Header,
            block: [0; BLOCK],
            block_len: 0,
            pending: Meta::default(),
            global: Meta::default(),
            entries: Vec::new(),
            seen: HashMap::new(),
            unresolved_links: Vec::new(),
        }
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether the end-of-archive marker was seen.
    pub fn ended(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Entries found so far.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Feeds the next bytes of the tar stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TarError> {
        while !data.is_empty() {
            match &mut self.state {
                State::End => {
                    self.pos += data.len() as u64;
                    return Ok(());
                }
                State::Skip { remaining } => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                    self.advance(&mut data, n as usize);
                }
                State::Collect { remaining, buf, .. } => {
                    let n = (*remaining).min(data.len() as u64) as usize;
                    buf.extend_from_slice(&data[..n]);
                    *remaining -= n as u64;
                    let done = *remaining == 0;
                    self.advance(&mut data, n);
                    if done {
                        self.finish_collect()?;
                    }
                }
                State::Header | State::SparseExt { .. } | State::SparseMap { .. } => {
                    let n = (BLOCK - self.block_len).min(data.len());
                    self.block[self.block_len..self.block_len + n].copy_from_slice(&data[..n]);
                    self.block_len += n;
                    self.advance(&mut data, n);
                    if self.block_len == BLOCK {
                        self.block_len = 0;
                        self.on_block()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn advance(&mut self, data: &mut &[u8], n: usize) {
        *data = &data[n..];
        self.pos += n as u64;
    }

    /// Checks the stream ended properly and returns the entries.
    pub fn finish(self) -> Result<Vec<Entry>, TarError> {
        let what = match &self.state {
            State::End => return self.check_links(),
            State::Header if self.block_len == 0 && self.pending.is_empty() => {
                return self.check_links()
            }
            State::Header if self.block_len == 0 => "an extended header's entry",
            State::Header => "a header block",
            State::Skip { .. } => "an entry's content",
            State::Collect { .. } => "an extended header or long name",
            State::SparseExt { .. } => "a sparse header extension",
            State::SparseMap { .. } => "a sparse map",
        };
        Err(TarError::Truncated {
            offset: self.pos,
            what,
        })
    }

    /// Rejects hard links whose target only came after them; returns the entries.
    fn check_links(self) -> Result<Vec<Entry>, TarError> {
        for &(i, offset) in &self.unresolved_links {
            let link = &self.entries[i];
            let target = link.link_target.as_deref().unwrap_or_default();
            if self.seen.contains_key(target) {
                return Err(bad_link(
                    offset,
                    link,
                    "which only comes later in the archive",
                ));
            }
        }
        Ok(self.entries)
    }

    /// Handles a complete 512-byte block (it ended at `self.pos`).
    fn on_block(&mut self) -> Result<(), TarError> {
        let offset = self.pos - BLOCK as u64;
        match std::mem::replace(&mut self.state, State::Header) {
            State::Header => self.on_header(offset),
            State::SparseExt { mut entry, stored } => {
                let more = th::parse_sparse_ext(&self.block, offset, &mut entry.sparse)?;
                if entry.sparse.len() * 24 > self.opts.max_meta_size {
                    return Err(TarError::MetaTooLarge {
                        offset,
                        size: entry.sparse.len() as u64 * 24,
                        limit: self.opts.max_meta_size,
                    });
                }
                if more {
                    self.state = State::SparseExt { entry, stored };
                    Ok(())
                } else {
                    entry.content_offset = self.pos;
                    self.emit(*entry, stored, padding(stored), true, offset)
                }
            }
            State::SparseMap {
                mut entry,
                stored,
                mut map_len,
                mut parser,
            } => {
                map_len += BLOCK as u64;
                if map_len > self.opts.max_meta_size as u64 {
                    return Err(TarError::MetaTooLarge {
                        offset,
                        size: map_len,
                        limit: self.opts.max_meta_size,
                    });
                }
                if map_len > stored.saturating_add(padding(stored)) {
                    return Err(sparse_err(offset, "sparse map runs past the entry's data"));
                }
                match parser.block(&self.block, offset)? {
                    Some(extents) => {
                        entry.sparse = extents;
                        entry.content_offset = self.pos;
                        let data = stored.saturating_sub(map_len);
                        let rest = stored
                            .saturating_add(padding(stored))
                            .saturating_sub(map_len);
                        self.emit(*entry, data, rest - data, true, offset)
                    }
                    None => {
                        self.state = State::SparseMap {
                            entry,
                            stored,
                            map_len,
                            parser,
                        };
                        Ok(())
                    }
                }
            }
            other => {
                self.state = other;
                Ok(())
            }
        }
    }

    fn on_header(&mut self, offset: u64) -> Result<(), TarError> {
        if self.block.iter().all(|&b| b == 0) {
            if !self.pending.is_empty() {
                return Err(TarError::Truncated {
                    offset,
                    what: "an extended header's entry (end marker found)",
                });
            }
            self.state = State::End;
            return Ok(());
        }
        let h = Header::parse(&self.block, offset)?;
        let meta_kind = match h.typeflag {
            b'L' => Some(MetaKind::LongName),
            b'K' => Some(MetaKind::LongLink),
            b'x' | b'X' => Some(MetaKind::Pax),
            b'g' => Some(MetaKind::GlobalPax),
            _ => None,
        };
        if let Some(kind) = meta_kind {
            if h.size > self.opts.max_meta_size as u64 {
                return Err(TarError::MetaTooLarge {
                    offset,
                    size: h.size,
                    limit: self.opts.max_meta_size,
                });
            }
            self.state = State::Collect {
                kind,
                offset,
                remaining: h.size,
                padding: padding(h.size),
                buf: Vec::with_capacity(h.size as usize),
            };
            if h.size == 0 {
                self.finish_collect()?;
            }
            return Ok(());
        }
        let meta = std::mem::take(&mut self.pending);
        let size = meta.size.unwrap_or(h.size);
        let kind = match h.typeflag {
            b'V' => return self.skip(size, offset),
            b'0' | b'\0' | b'7' | b'S' => EntryKind::File,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDevice,
            b'4' => EntryKind::BlockDevice,
            b'5' | b'D' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            t => {
                return Err(TarError::UnsupportedType {
                    offset,
                    typeflag: t as char,
                })
            }
        };
        let sparse_v0 = meta.is_sparse_v0();
        let raw_path = meta
            .sparse_name
            .or(meta.path)
            .or(meta.long_name)
            .unwrap_or(h.name);
        let kind = match kind {
            EntryKind::File if h.typeflag != b'S' && raw_path.ends_with(b"/") => EntryKind::Dir,
            k => k,
        };
        let raw_link = meta.linkpath.or(meta.long_link).unwrap_or(h.linkname);
        let link_target = match kind {
            EntryKind::Symlink => Some(raw_link),
            EntryKind::Hardlink => {
                let t = normalize(&raw_link, offset)?;
                if t.is_empty() {
                    return Err(malformed(offset, "hard link with an empty target"));
                }
                Some(t)
            }
            _ => None,
        };
        let path = normalize(&raw_path, offset)?;
        let limit = self.opts.max_path_len;
        let too_long = |what, len| TarError::PathTooLong {
            offset,
            what,
            len,
            limit,
        };
        if path.len() > limit {
            return Err(too_long("path", path.len()));
        }
        if let Some(t) = link_target.as_ref().filter(|t| t.len() > limit) {
            return Err(too_long("link target", t.len()));
        }
        if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice)
            && !self.opts.allow_devices
        {
            return Err(TarError::DeviceNode {
                offset,
                path: String::from_utf8_lossy(&path).into_owned(),
            });
        }
        let (mtime, mtime_nsec) = meta.mtime.or(self.global.mtime).unwrap_or((h.mtime, 0));
        let mut entry = Entry {
            path,
            kind,
            mode: (h.mode & 0o7777) as u32,
            uid: meta.uid.or(self.global.uid).unwrap_or(h.uid),
            gid: meta.gid.or(self.global.gid).unwrap_or(h.gid),
            size: match kind {
                EntryKind::File | EntryKind::Hardlink => size,
                _ => 0,
            },
            mtime,
            mtime_nsec,
            link_target,
            dev_major: h.dev_major,
            dev_minor: h.dev_minor,
            xattrs: meta.xattrs,
            content_offset: offset + BLOCK as u64,
            sparse: Vec::new(),
        };
        if kind != EntryKind::File {
            return self.emit(entry, size, padding(size), false, offset);
        }
        let missing = |what| sparse_err(offset, what);
        if h.typeflag == b'S' {
            entry.size = h.real_size;
            entry.sparse = h.sparse;
            if h.is_extended {
                self.state = State::SparseExt {
                    entry: Box::new(entry),
                    stored: size,
                };
                return Ok(());
            }
            self.emit(entry, size, padding(size), true, offset)
        } else if meta.sparse_major == Some(1) {
            entry.size = meta
                .sparse_real_size
                .ok_or_else(|| missing("GNU.sparse.realsize missing (sparse format 1.0)"))?;
            if size == 0 {
                return Err(missing("sparse 1.0 entry without a data area"));
            }
            self.state = State::SparseMap {
                entry: Box::new(entry),
                stored: size,
                map_len: 0,
                parser: SparseMapParser::default(),
            };
            Ok(())
        } else if sparse_v0 {
            entry.size = meta
                .sparse_real_size
                .ok_or_else(|| missing("GNU.sparse.size/realsize missing"))?;
            entry.sparse = th::pairs_to_extents(&meta.sparse_map, offset)?;
            self.emit(entry, size, padding(size), true, offset)
        } else if meta.sparse_major.is_some_and(|m| m > 1) {
            Err(missing("unsupported GNU sparse format version"))
        } else {
            self.emit(entry, size, padding(size), false, offset)
        }
    }

    /// Pushes `entry` (unless it is the root), then skips its `data` remaining stored
    /// bytes and `pad` bytes after them. Sparse entries are validated first.
    fn emit(
        &mut self,
        mut entry: Entry,
        data: u64,
        pad: u64,
        sparse: bool,
        offset: u64,
    ) -> Result<(), TarError> {
        if sparse {
            th::check_sparse(&mut entry, data, offset)?;
        }
        let skip = data.checked_add(pad).ok_or(TarError::BadNumber {
            offset,
            field: "size",
        })?;
        entry
            .content_offset
            .checked_add(skip)
            .ok_or(TarError::BadNumber {
                offset,
                field: "size",
            })?;
        if !entry.path.is_empty() {
            if self.entries.len() >= self.opts.max_entries {
                return Err(TarError::TooManyEntries {
                    limit: self.opts.max_entries,
                });
            }
            if let Some(target) = entry.link_target.as_deref() {
                if entry.kind == EntryKind::Hardlink {
                    match self.seen.get(target) {
                        Some(true) => return Err(bad_link(offset, &entry, "a directory")),
                        Some(false) => {}
                        None => self.unresolved_links.push((self.entries.len(), offset)),
                    }
                }
            }
            self.seen
                .insert(entry.path.clone(), entry.kind == EntryKind::Dir);
            self.entries.push(entry);
        }
        self.skip_raw(skip);
        Ok(())
    }

    fn skip(&mut self, size: u64, offset: u64) -> Result<(), TarError> {
        let n = size.checked_add(padding(size)).ok_or(TarError::BadNumber {
            offset,
            field: "size",
        })?;
        self.skip_raw(n);
        Ok(())
    }

    fn skip_raw(&mut self, n: u64) {
        self.state = if n == 0 {
            State::Header
        } else {
            State::Skip { remaining: n }
        };
    }

    /// A metadata entry's content is complete: apply it, then skip its padding.
    fn finish_collect(&mut self) -> Result<(), TarError> {
        let State::Collect {
            kind,
            offset,
            padding,
            buf,
            ..
        } = std::mem::replace(&mut self.state, State::Header)
        else {
            return Ok(());
        };
        match kind {
            MetaKind::LongName => self.pending.long_name = Some(th::until_nul(&buf).to_vec()),
            MetaKind::LongLink => self.pending.long_link = Some(th::until_nul(&buf).to_vec()),
            MetaKind::Pax => th::apply_pax(&mut self.pending, &buf, offset)?,
            MetaKind::GlobalPax => th::apply_pax(&mut self.global, &buf, offset)?,
        }
        self.skip_raw(padding);
        Ok(())
    }
}

/// Padding after `size` bytes of content up to the next block boundary.
pub fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

pub(crate) fn sparse_err(offset: u64, reason: &str) -> TarError {
    TarError::BadSparse {
        offset,
        reason: reason.to_string(),
    }
}

pub(crate) fn malformed(offset: u64, reason: &str) -> TarError {
    TarError::Malformed {
        offset,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
