//! One blob being ingested, readable while it arrives.
//!
//! A [`Flight`] is the single flight of one uncached blob. Its ingest writes each 4 MiB
//! chunk to a temp file as the bytes come ([`crate::spool`]) and publishes how many have
//! arrived; every client of the blob reads those files at its own pace ([`flight_body`]),
//! the first one and any that join later alike, so the first byte goes out as soon as it
//! came in. Life cycle ([`FlightState`]): `Connecting` until upstream answers, then
//! `Receiving` with the announced size, then `Done` with the verified chunk list (the
//! chunks are now in the store) or `Failed`.
//!
//! No response is ever completed with unverified bytes: the last byte of every response
//! is held back until the whole blob matched its digest. If it did not, every response
//! is cut off (the connection closes short of its `Content-Length`), and nothing is kept.

use crate::ingest::IngestError;
use crate::space::Space;
use crate::Stats;
use axum::body::Body;
use bytes::Bytes;
use imgd_core::{ChunkList, ChunkRef, Digest, CHUNK_SIZE};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;

/// Largest piece a reader sends at once.
const READ_PIECE: u64 = 1 << 20;

/// Where a flight is in its life.
#[derive(Clone, Debug)]
pub enum FlightState {
    /// Waiting for upstream's answer.
    Connecting,
    /// Bytes are arriving; `size` is what upstream announced (`None`: unknown).
    Receiving { size: Option<u64>, received: u64 },
    /// Verified and stored.
    Done(ChunkList),
    /// Failed; nothing was stored.
    Failed(Arc<IngestError>),
}

/// The single flight of one blob.
pub struct Flight {
    pub digest: Digest,
    /// The [`crate::storage::Access`] key of the route that started it.
    pub access_key: String,
    spool_dir: PathBuf,
    state: watch::Sender<FlightState>,
    /// The chunks whole, hashed and synced so far (their files are `chunk_path(i)`).
    arrived: std::sync::Mutex<Vec<ChunkRef>>,
}

impl Flight {
    /// A flight of `digest` spooling its chunks under `spool_dir`.
    pub fn new(digest: Digest, access_key: String, spool_dir: PathBuf) -> Flight {
        Flight {
            digest,
            access_key,
            spool_dir,
            state: watch::Sender::new(FlightState::Connecting),
            arrived: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The temp file of chunk `i` while the flight runs.
    pub fn chunk_path(&self, i: u64) -> PathBuf {
        self.spool_dir
            .join(format!("flight-{}-{i}", self.digest.hex()))
    }

    /// Records that the next chunk is whole, hashed and synced (readers are told with
    /// the next published state).
    pub fn publish_chunk(&self, c: ChunkRef) {
        self.arrived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
    }

    /// The chunks arrived so far, in blob order.
    pub fn arrived(&self) -> Vec<ChunkRef> {
        self.arrived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The temp file of an arrived chunk with `digest`, if there is one.
    pub fn arrived_chunk_path(&self, digest: &Digest) -> Option<PathBuf> {
        let arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        let i = arrived.iter().position(|c| c.digest == *digest)?;
        Some(self.chunk_path(i as u64))
    }

    /// Publishes a new state (callable from any thread).
    pub fn publish(&self, state: FlightState) {
        self.state.send_replace(state);
    }

    /// Publishes that `received` bytes are readable.
    pub fn publish_received(&self, size: Option<u64>, received: u64) {
        self.state
            .send_replace(FlightState::Receiving { size, received });
    }

    /// Watches the state.
    pub fn subscribe(&self) -> watch::Receiver<FlightState> {
        self.state.subscribe()
    }

    /// Waits for upstream's answer: the announced size (`Some`), or the end.
    pub async fn started(&self) -> FlightState {
        let mut rx = self.subscribe();
        loop {
            let s = rx.borrow_and_update().clone();
            if !matches!(s, FlightState::Connecting) {
                return s;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    }

    /// Waits for the end: the chunk list, or the error.
    pub async fn finished(&self) -> Result<ChunkList, Arc<IngestError>> {
        let mut rx = self.subscribe();
        loop {
            match rx.borrow_and_update().clone() {
                FlightState::Done(list) => return Ok(list),
                FlightState::Failed(e) => return Err(e),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(IngestError::Worker("ingest vanished".into())));
            }
        }
    }
}

/// A reader's position in one response.
struct Reader {
    flight: Arc<Flight>,
    space: Arc<Space>,
    stats: Arc<Stats>,
    rx: watch::Receiver<FlightState>,
    pos: u64,
    end: u64,
    /// The open temp file of the chunk being read, by index.
    file: Option<(u64, Arc<File>)>,
    /// Held once the blob is stored, so it is not evicted under the response.
    lease: Option<crate::space::Lease>,
}

fn cut(reason: String) -> std::io::Error {
    std::io::Error::other(reason)
}

impl Reader {
    /// The next piece of the response, waiting for its bytes; `None` at the end.
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.pos >= self.end {
            return None;
        }
        loop {
            let state = self.rx.borrow_and_update().clone();
            let piece = match state {
                FlightState::Failed(e) => {
                    self.pos = self.end;
                    return Some(Err(cut(format!("blob {} failed: {e}", self.flight.digest))));
                }
                FlightState::Done(list) => self.read_store(list).await,
                FlightState::Receiving { received, .. } => {
                    // The response's last byte waits for the verdict.
                    let upto = received.min(self.end - 1);
                    if self.pos < upto {
                        self.read_spool(upto).await
                    } else {
                        Ok(None)
                    }
                }
                FlightState::Connecting => Ok(None),
            };
            match piece {
                Ok(Some(bytes)) => {
                    self.pos += bytes.len() as u64;
                    self.stats
                        .blob_bytes_served
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Some(Ok(bytes));
                }
                Ok(None) => {
                    if self.rx.changed().await.is_err() {
                        // The flight is gone without a verdict we saw: read it once more.
                        if !matches!(
                            &*self.rx.borrow(),
                            FlightState::Done(_) | FlightState::Failed(_)
                        ) {
                            self.pos = self.end;
                            return Some(Err(cut("ingest vanished".into())));
                        }
                    }
                }
                Err(e) => {
                    self.pos = self.end;
                    return Some(Err(e));
                }
            }
        }
    }

    /// Reads from the chunk's temp file, up to `upto`. `Ok(None)`: not readable yet (the
    /// file was just renamed or removed: the state will say why).
    async fn read_spool(&mut self, upto: u64) -> Result<Option<Bytes>, std::io::Error> {
        let chunk = CHUNK_SIZE as u64;
        let i = self.pos / chunk;
        let file = match &self.file {
            Some((j, f)) if *j == i => f.clone(),
            _ => match File::open(self.flight.chunk_path(i)) {
                Ok(f) => {
                    let f = Arc::new(f);
                    self.file = Some((i, f.clone()));
                    f
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        let offset = self.pos - i * chunk;
        let len = (upto - self.pos)
            .min((i + 1) * chunk - self.pos)
            .min(READ_PIECE) as usize;
        let bytes = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                let n = file.read_at(&mut buf[got..], offset + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            buf.truncate(got);
            Ok::<_, std::io::Error>(Bytes::from(buf))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok((!bytes.is_empty()).then_some(bytes))
    }

    /// Reads from the stored chunks once the blob is verified.
    async fn read_store(&mut self, list: ChunkList) -> Result<Option<Bytes>, std::io::Error> {
        self.file = None;
        if self.lease.is_none() {
            self.lease = Some(
                self.space
                    .lease(&list.blob)
                    .ok_or_else(|| cut(format!("blob {} was evicted while served", list.blob)))?,
            );
        }
        let chunk = CHUNK_SIZE as u64;
        let i = (self.pos / chunk) as usize;
        let Some(c) = list.chunks.get(i).copied() else {
            return Err(cut(format!("blob {}: no chunk {i}", list.blob)));
        };
        let space = self.space.clone();
        let bytes = tokio::task::spawn_blocking(move || space.storage().chunks.read(&c.digest))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        let from = (self.pos - i as u64 * chunk) as usize;
        let to = ((self.end - i as u64 * chunk) as usize).min(bytes.len());
        Ok(Some(bytes.slice(from.min(to)..to)))
    }
}

/// A body streaming `range` of the blob in flight: bytes go out as they arrive, the
/// last one only once the blob verified; a failed blob cuts the body off.
pub fn flight_body(
    flight: Arc<Flight>,
    space: Arc<Space>,
    stats: Arc<Stats>,
    range: Range<u64>,
) -> Body {
    let reader = Reader {
        rx: flight.subscribe(),
        flight,
        space,
        stats,
        pos: range.start,
        end: range.end,
        file: None,
        lease: None,
    };
    let stream = futures::stream::unfold(reader, |mut r| async move {
        r.next().await.map(|piece| (piece, r))
    });
    Body::from_stream(stream)
}
