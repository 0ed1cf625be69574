//! The read-only FUSE filesystem of an [`ImageView`].
//!
//! Tuned for an immutable tree: entry and attribute timeouts of a day, the kernel page
//! cache kept across opens (`FOPEN_KEEP_CACHE`), cached readdir and symlinks, several
//! worker threads, read requests of up to 1 MiB. File bytes are read from the layer's tar
//! stream by a [`SpanReader`]: from the on-disk inflated cache when present, else through
//! the layer's seekable index: the compressed range from the nearest checkpoint is asked
//! of a [`BlobSource`] (the agent: cache, peers, proxy), which must answer within a
//! bounded time; a read that cannot be served returns `EIO`, never hangs.

use crate::spans::SpanReader;
use crate::view::{ImageView, Ino, Node, NodeKind};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry,
    ReplyOpen, ReplyXattr, Request,
};
use imgd_core::index::{read_file_via, EntryKind, WindowRef};
use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// How long the kernel may cache entries and attributes of this immutable tree.
const TTL: Duration = Duration::from_secs(86400);

/// Largest read request asked of the kernel (it caps it at its own maximum, 1 MiB).
const MAX_READ: u32 = 1 << 20;

/// Where the compressed bytes of layers come from.
pub trait BlobSource: Send + Sync + 'static {
    /// The bytes `range` of layer `layer`'s blob, or an error message. Must return within
    /// a bounded time.
    fn read(&self, layer: usize, range: Range<u64>) -> Result<Vec<u8>, String>;

    /// The packed window `window` of checkpoint `checkpoint` of layer `layer` (from the
    /// index's windows part, which a mount does not hold), or an error message. Must
    /// return within a bounded time; the reader checks it against `window.sha256` before
    /// use, so a wrong one fails the read (`EIO`).
    fn window(
        &self,
        layer: usize,
        checkpoint: usize,
        window: &WindowRef,
    ) -> Result<Vec<u8>, String>;
}

/// Counters of one mount.
#[derive(Default, Debug)]
pub struct MountStats {
    /// Read requests served.
    pub reads: AtomicU64,
    /// Bytes returned to readers.
    pub bytes_read: AtomicU64,
    /// Reads that failed with EIO.
    pub eio: AtomicU64,
    /// Spans inflated (from compressed chunks) and stored.
    pub spans_inflated: AtomicU64,
    /// Of those, spans inflated ahead of a sequential read.
    pub spans_read_ahead: AtomicU64,
    /// Stream reads served from the on-disk inflated cache.
    pub disk_reads: AtomicU64,
}

/// The filesystem.
pub struct ImageFs {
    view: Arc<ImageView>,
    stats: Arc<MountStats>,
    spans: SpanReader,
    /// Called with the path of each file opened, in order (the learned start-up trace).
    on_open: Option<Box<dyn Fn(Ino) + Send + Sync>>,
    /// Called with each read's file, offset and size (the trace's ranges).
    on_read: Option<ReadHook>,
}

/// A hook called with each read's file, offset and size.
type ReadHook = Box<dyn Fn(Ino, u64, u32) + Send + Sync>;

impl ImageFs {
    /// A filesystem over `view`, whose files are read through `spans`.
    pub fn new(view: Arc<ImageView>, spans: SpanReader, stats: Arc<MountStats>) -> Self {
        ImageFs {
            view,
            stats,
            spans,
            on_open: None,
            on_read: None,
        }
    }

    /// Sets a hook called with each regular file opened.
    pub fn on_open(mut self, hook: impl Fn(Ino) + Send + Sync + 'static) -> Self {
        self.on_open = Some(Box::new(hook));
        self
    }

    /// Sets a hook called with the file, offset and size of each read.
    pub fn on_read(mut self, hook: impl Fn(Ino, u64, u32) + Send + Sync + 'static) -> Self {
        self.on_read = Some(Box::new(hook));
        self
    }

    fn attr(&self, ino: Ino, node: &Node) -> FileAttr {
        let kind = match &node.kind {
            NodeKind::Dir { .. } => FileType::Directory,
            NodeKind::File { .. } => FileType::RegularFile,
            NodeKind::Symlink { .. } => FileType::Symlink,
            NodeKind::CharDevice { .. } => FileType::CharDevice,
            NodeKind::BlockDevice { .. } => FileType::BlockDevice,
            NodeKind::Fifo => FileType::NamedPipe,
        };
        let size = if node.is_dir() { 4096 } else { node.size() };
        // The kernel's 32-bit device encoding equals glibc's for major < 4096, minor < 2^20.
        let rdev = node.rdev();
        let mtime = if node.mtime >= 0 {
            UNIX_EPOCH + Duration::new(node.mtime as u64, node.mtime_nsec)
        } else {
            UNIX_EPOCH
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (node.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// A directory's entries as readdir offers them: `.`, `..`, then the children in order.
struct Listing<'a> {
    dir: Ino,
    parent: Ino,
    children: &'a [(Box<[u8]>, Ino)],
}

impl<'a> Listing<'a> {
    /// Entries from position `offset` on, with their positions.
    fn skip_to(&self, offset: u64) -> impl Iterator<Item = (u64, (Ino, &'a [u8]))> + '_ {
        let dots = [(self.dir, b".".as_slice()), (self.parent, b"..".as_slice())];
        let rest = self.children.iter().map(|(name, i)| (*i, &name[..]));
        (0u64..)
            .zip(dots.into_iter().chain(rest))
            .skip(offset as usize)
    }
}

impl ImageFs {
    fn dir_listing(&self, dir: Ino) -> Option<Listing<'_>> {
        let node = self.view.node(dir)?;
        Some(Listing {
            dir,
            parent: node.parent,
            children: self.view.dir_entries(dir)?,
        })
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_write(MAX_READ);
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .view
            .lookup(parent.0, name.as_bytes())
            .and_then(|i| self.view.node(i).map(|n| (i, n)))
        {
            Some((ino, node)) => reply.entry(&TTL, &self.attr(ino, node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.view.node(ino.0) {
            Some(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.view.node(ino.0).map(|n| &n.kind) {
            Some(NodeKind::Symlink { target }) => reply.data(target),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if let Some(hook) = &self.on_open {
            hook(ino.0);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some((layer, entry)) = self.view.file_source(ino.0) else {
            return reply.error(Errno::EISDIR);
        };
        let Some(index) = self.view.layer(layer) else {
            return reply.error(Errno::EIO);
        };
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.on_read {
            hook(ino.0, offset, size);
        }
        tracing::debug!(target: "imgd_bytes", path = %String::from_utf8_lossy(&entry.path), layer, offset, size, "read");
        let result = read_file_via(index, entry, offset, size as usize, |at, len| {
            self.spans.read(layer, at, len)
        });
        if result.is_ok() && entry.kind == EntryKind::File && entry.sparse.is_empty() {
            let file = entry.content_offset..entry.content_offset + entry.size;
            let read_start = file.start + offset;
            let read_end = read_start.saturating_add(u64::from(size));
            self.spans.read_ahead(layer, file, read_start..read_end);
        }
        match result {
            Ok(bytes) => {
                self.stats
                    .bytes_read
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                reply.data(&bytes)
            }
            Err(e) => {
                self.stats.eio.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(ino = ino.0, offset, size, error = %e, "read failed: EIO");
                reply.error(Errno::EIO)
            }
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.dir_listing(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (pos, (child, name)) in entries.skip_to(offset) {
            let kind = self
                .view
                .node(child)
                .map(|n| self.attr(child, n).kind)
                .unwrap_or(FileType::RegularFile);
            if reply.add(INodeNo(child), pos + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok()
    }

    /// Like readdir, with each entry's attributes, so a walk that stats every file needs
    /// no lookup per name.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.dir_listing(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (pos, (child, name)) in entries.skip_to(offset) {
            let Some(node) = self.view.node(child) else {
                continue;
            };
            let attr = self.attr(child, node);
            if reply.add(
                INodeNo(child),
                pos + 1,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(node) = self.view.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(value) = name.to_str().and_then(|n| node.xattrs.get(n)) else {
            return reply.error(Errno::NO_XATTR);
        };
        if size == 0 {
            reply.size(value.len() as u32)
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(value)
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(node) = self.view.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for k in node.xattrs.keys() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if (size as usize) < list.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }
}
