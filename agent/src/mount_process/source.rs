//! Where a mount process gets chunk bytes: a chunk the cache holds is read from its
//! content-addressed file (and its sha256 checked), whether or not the agent is up. Of
//! any other, a read needs only the 64 KiB pieces covering it (when the chunk list has
//! piece digests): stored pieces are read from their files (and checked), the missing
//! ones asked of the agent (`GET /v1/pieces/ID/LAYER/CHUNK/FIRST/COUNT`), which fetches
//! and verifies them; each piece it returns is checked here again. Without piece digests
//! the whole chunk is asked of the agent (`GET /v1/chunks/ID/LAYER/CHUNK`: cache, peers,
//! proxy).
//! A checkpoint window (not in the index's main part, which is all the mount holds) is
//! read from the agent's index store (`DIR/indexes/windows/HEX`) if there, else asked of
//! the agent (`GET /v1/windows/ID/LAYER/OFFSET/LEN/SHA256`), which fetches it from the
//! proxy; either way it is checked against its sha256 here.
//! While the agent does not answer, such a read retries it until the read bound, then
//! fails (EIO), so a read never hangs, and the first answer of a new agent ends the wait.

use crate::layer_indexes::LayerIndexes;
use crate::mounts::control::AgentLink;
use crate::mounts::record::MountRecord;
use crate::pieces::store::{piece_path, read_piece};
use crate::unix_http::{self, UnixHttpError};
use bytes::Bytes;
use imgd_core::index::WindowRef;
use imgd_core::store::ContentStore;
use imgd_core::{ChunkList, Digest, PIECE_SIZE};
use imgd_fuse::fs::BlobSource;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often an unreachable agent is tried again during a read.
const RETRY: Duration = Duration::from_millis(200);

/// How long after a chunk could not be had reads needing it fail at once. The kernel
/// retries a failed page read right away (twice, with readahead); without this each
/// retry would wait the whole read bound again. Later reads try the sources again, and
/// so does any read once a chunk that failed for want of the agent can reach it again.
const FAIL_FAST: Duration = Duration::from_millis(300);

/// Why a chunk could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Nothing listened on the agent's socket until the read bound.
    NoAgent,
    /// The agent answered that no source delivered it, or did not answer in time.
    NoSource,
}

/// Chunks and bytes this mount had fetched into the cache (cache hits not counted), and
/// every chunk it read (cache hits included).
#[derive(Default, Debug)]
pub struct Fetched {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub reads: AtomicU64,
}

/// The mount's chunk source.
pub struct ChunkSource {
    record: Arc<MountRecord>,
    rt: tokio::runtime::Handle,
    bound: Duration,
    link: Mutex<AgentLink>,
    pub fetched: Fetched,
    failed: Mutex<HashMap<Digest, (Instant, Failure)>>,
}

impl ChunkSource {
    pub fn new(record: Arc<MountRecord>, rt: tokio::runtime::Handle) -> ChunkSource {
        ChunkSource {
            bound: Duration::from_millis(record.read_timeout_ms),
            record,
            rt,
            link: Mutex::new(AgentLink::Connected),
            fetched: Fetched::default(),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The read bound.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// How the agent answered last.
    pub fn link(&self) -> AgentLink {
        *self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_link(&self, new: AgentLink, why: Option<&UnixHttpError>) {
        let old = std::mem::replace(
            &mut *self.link.lock().unwrap_or_else(|p| p.into_inner()),
            new,
        );
        match (old, new) {
            (AgentLink::Connected, AgentLink::AgentLost) => tracing::warn!(
                dir = %self.record.dir.display(),
                error = why.map(|e| e.to_string()).unwrap_or_default(),
                "agent lost: serving cached chunks, retrying it for the others"
            ),
            (AgentLink::AgentLost, AgentLink::Connected) => {
                tracing::info!(dir = %self.record.dir.display(), "agent back")
            }
            _ => {}
        }
    }

    fn list(&self, layer: usize) -> Result<&ChunkList, String> {
        self.record
            .lists
            .get(layer)
            .ok_or_else(|| format!("no layer {layer}"))
    }

    /// The chunk from the cache's file, if there and intact.
    fn cached(&self, digest: &Digest) -> Option<Bytes> {
        let path = ContentStore::path_in(&self.record.cache_dir, "chunks", digest);
        let bytes = std::fs::read(path).ok()?;
        (Digest::of(&bytes) == *digest).then(|| Bytes::from(bytes))
    }

    /// Chunk `i` of layer `layer`, by `deadline`. Blocks.
    pub fn chunk(&self, layer: usize, i: usize, deadline: Instant) -> Result<Bytes, String> {
        self.chunk_or_why(layer, i, deadline).map_err(|(e, _)| e)
    }

    fn chunk_or_why(
        &self,
        layer: usize,
        i: usize,
        deadline: Instant,
    ) -> Result<Bytes, (String, Failure)> {
        let source = |e: String| (e, Failure::NoSource);
        let list = self.list(layer).map_err(source)?;
        let digest = list
            .chunks
            .get(i)
            .ok_or_else(|| source(format!("no chunk {i} in layer {layer}")))?
            .digest;
        self.fetched.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(bytes) = self.cached(&digest) {
            return Ok(bytes);
        }
        let path = format!("/v1/chunks/{}/{layer}/{i}", self.record.id);
        let reply = self.ask_agent(&path, &digest, deadline)?;
        if Digest::of(&reply.body) != digest {
            return Err(source(format!(
                "the agent sent wrong bytes for chunk {digest}"
            )));
        }
        tracing::debug!(target: "imgd_bytes", layer, chunk = i, len = reply.body.len(), thread = std::thread::current().name().unwrap_or(""), "whole chunk");
        if reply.headers.get(FETCHED_HEADER).is_some_and(|v| v == "1") {
            self.fetched.chunks.fetch_add(1, Ordering::Relaxed);
            self.fetched
                .bytes
                .fetch_add(reply.body.len() as u64, Ordering::Relaxed);
        }
        Ok(reply.body)
    }

    /// Pieces `pieces` of chunk `i` of layer `layer`, concatenated, by `deadline`: the
    /// stored ones from their files, the others from the agent; every one checked against
    /// its digest. Blocks.
    fn pieces_or_why(
        &self,
        layer: usize,
        i: usize,
        pieces: Range<usize>,
        deadline: Instant,
    ) -> Result<Vec<u8>, (String, Failure)> {
        let source = |e: String| (e, Failure::NoSource);
        let list = self.list(layer).map_err(source)?;
        let (Some(chunk), Some(digests)) = (list.chunks.get(i), list.pieces_of(i)) else {
            return Err(source(format!("no pieces of chunk {i} in layer {layer}")));
        };
        // A read of part of a chunk is a chunk read.
        self.fetched.reads.fetch_add(1, Ordering::Relaxed);
        let digests = digests
            .get(pieces.clone())
            .ok_or_else(|| source(format!("no pieces {pieces:?} in chunk {}", chunk.digest)))?;
        let mut have: Vec<Option<Bytes>> = digests
            .iter()
            .map(|d| read_piece(&piece_path(&self.record.cache_dir, d), d))
            .collect();
        if let (Some(a), Some(b)) = (
            have.iter().position(Option::is_none),
            have.iter().rposition(Option::is_none),
        ) {
            let (first, count) = (pieces.start + a, b + 1 - a);
            let path = format!("/v1/pieces/{}/{layer}/{i}/{first}/{count}", self.record.id);
            let reply = self.ask_agent(&path, &chunk.digest, deadline)?;
            let mut at = 0usize;
            for k in a..=b {
                let len = piece_len(chunk.size, pieces.start + k);
                let part = reply.body.get(at..at + len).ok_or_else(|| {
                    source(format!(
                        "the agent sent too few bytes for chunk {}",
                        chunk.digest
                    ))
                })?;
                if Digest::of(part) != digests[k] {
                    return Err(source(format!(
                        "the agent sent a wrong piece {} of chunk {}",
                        pieces.start + k,
                        chunk.digest
                    )));
                }
                have[k] = Some(reply.body.slice(at..at + len));
                at += len;
            }
            let fetched: u64 = reply
                .headers
                .get(FETCHED_BYTES_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if fetched > 0 {
                self.fetched.bytes.fetch_add(fetched, Ordering::Relaxed);
            }
            tracing::debug!(target: "imgd_bytes", layer, chunk = i, first, count, fetched, thread = std::thread::current().name().unwrap_or(""), "pieces");
        }
        let mut out = Vec::with_capacity(have.iter().flatten().map(|b| b.len()).sum());
        for piece in have.into_iter().flatten() {
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// Asks the agent for `path` (about `digest`) until it answers or `deadline`.
    fn ask_agent(
        &self,
        path: &str,
        digest: &Digest,
        deadline: Instant,
    ) -> Result<unix_http::Reply, (String, Failure)> {
        let source = |e: String| (e, Failure::NoSource);
        let socket = &self.record.agent_socket;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err((
                    format!(
                        "chunk {digest}: the agent did not answer within {:?}",
                        self.bound
                    ),
                    Failure::NoAgent,
                ));
            }
            let asked = self.rt.block_on(unix_http::request(
                socket,
                http::Method::GET,
                path,
                None,
                left,
            ));
            match asked {
                Ok(reply) if reply.status.is_success() => {
                    self.set_link(AgentLink::Connected, None);
                    return Ok(reply);
                }
                Ok(reply) => {
                    self.set_link(AgentLink::Connected, None);
                    return Err(source(format!(
                        "chunk {digest}: agent answered {}: {}",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    )));
                }
                // The agent took the request but no source delivered within the bound
                // (or the agent hangs, which a connection attempt cannot tell apart).
                Err(e @ UnixHttpError::Timeout { .. }) => return Err(source(e.to_string())),
                Err(e) => {
                    self.set_link(AgentLink::AgentLost, Some(&e));
                    std::thread::sleep(RETRY.min(left));
                }
            }
        }
    }

    /// The first chunk of `range` that failed within [`FAIL_FAST`], if any (forgetting
    /// the chunks that failed for want of the agent if it is back).
    fn recently_failed(&self, list: &ChunkList, range: &Range<u64>) -> Option<Digest> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|_, (at, _)| at.elapsed() < FAIL_FAST);
        let hit = list
            .chunks_covering(range.clone())
            .map(|i| list.chunks[i].digest)
            .find_map(|d| failed.get(&d).map(|(_, why)| (d, *why)))?;
        if hit.1 == Failure::NoAgent
            && std::os::unix::net::UnixStream::connect(&self.record.agent_socket).is_ok()
        {
            failed.retain(|_, (_, why)| *why != Failure::NoAgent);
            return None;
        }
        Some(hit.0)
    }

    /// The bytes `range` of a layer blob, every chunk by one deadline.
    fn read_range(&self, layer: usize, range: Range<u64>) -> Result<Vec<u8>, (String, Failure)> {
        let list = self.list(layer).map_err(|e| (e, Failure::NoSource))?;
        let deadline = Instant::now() + self.bound;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for i in list.chunks_covering(range.clone()) {
            let start = list.chunk_offset(i);
            let size = list.chunks[i].size as usize;
            let from = range.start.saturating_sub(start) as usize;
            let to = ((range.end - start) as usize).min(size);
            let whole =
                ContentStore::path_in(&self.record.cache_dir, "chunks", &list.chunks[i].digest);
            if list.pieces_of(i).is_some() && !whole.is_file() && from < to {
                let pieces = from / PIECE_SIZE..(to - 1) / PIECE_SIZE + 1;
                let base = pieces.start * PIECE_SIZE;
                let bytes = self.pieces_or_why(layer, i, pieces, deadline)?;
                let slice = bytes.get(from - base..to - base).ok_or_else(|| {
                    (
                        "pieces shorter than their chunk".to_string(),
                        Failure::NoSource,
                    )
                })?;
                out.extend_from_slice(slice);
                continue;
            }
            let bytes = self.chunk_or_why(layer, i, deadline)?;
            let to = to.min(bytes.len());
            out.extend_from_slice(&bytes[from.min(to)..to]);
        }
        Ok(out)
    }
}

/// Length of piece `p` of a chunk of `size` bytes.
fn piece_len(size: u32, p: usize) -> usize {
    (size as usize)
        .saturating_sub(p * PIECE_SIZE)
        .min(PIECE_SIZE)
}

/// The header with which the agent says how many bytes it had to fetch for pieces.
pub const FETCHED_BYTES_HEADER: &str = "x-imgd-fetched-bytes";

/// The header with which the agent says a chunk had to be fetched (`1`) or was cached.
pub const FETCHED_HEADER: &str = "x-imgd-fetched";

impl BlobSource for ChunkSource {
    fn window(&self, layer: usize, checkpoint: usize, w: &WindowRef) -> Result<Vec<u8>, String> {
        let dir = self
            .record
            .index_files
            .get(layer)
            .and_then(|f| f.parent())
            .ok_or_else(|| format!("no index of layer {layer}"))?;
        if let Some(bytes) = LayerIndexes::stored_window(dir, w) {
            return Ok(bytes);
        }
        let path = format!(
            "/v1/windows/{}/{layer}/{}/{}/{}",
            self.record.id,
            w.offset,
            w.len,
            w.sha256.hex()
        );
        let deadline = Instant::now() + self.bound;
        let reply = self
            .ask_agent(&path, &w.sha256, deadline)
            .map_err(|(e, _)| format!("window of checkpoint {checkpoint}: {e}"))?;
        if !w.matches(&reply.body) {
            return Err(format!(
                "the agent sent a wrong window for checkpoint {checkpoint} of layer {layer}"
            ));
        }
        self.fetched
            .bytes
            .fetch_add(reply.body.len() as u64, Ordering::Relaxed);
        tracing::debug!(target: "imgd_bytes", layer, checkpoint, len = reply.body.len(), thread = std::thread::current().name().unwrap_or(""), "window");
        Ok(reply.body.to_vec())
    }

    fn read(&self, layer: usize, range: Range<u64>) -> Result<Vec<u8>, String> {
        let list = self.list(layer)?;
        if let Some(d) = self.recently_failed(list, &range) {
            return Err(format!("chunk {d} could not be had just now"));
        }
        let result = self.read_range(layer, range.clone());
        if let Err((_, why)) = &result {
            let missing: Vec<Digest> = list
                .chunks_covering(range)
                .map(|i| list.chunks[i].digest)
                .filter(|d| !ContentStore::path_in(&self.record.cache_dir, "chunks", d).is_file())
                .collect();
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            failed.extend(missing.into_iter().map(|d| (d, (now, *why))));
        }
        result.map_err(|(e, _)| e)
    }
}
