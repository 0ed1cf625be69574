//! End-to-end tests of the data plane over 127.0.0.1.

use super::wire::{self, kind, FrameLimits, Message, HEADER_LEN};
use super::*;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: [u8; 32] = [42; 32];
const T: Duration = Duration::from_secs(5);

#[derive(Default)]
struct MemSource {
    chunks: HashMap<Digest, Bytes>,
    maps: HashMap<Digest, HaveMap>,
    /// Checkpoint windows by sha256.
    windows: HashMap<Digest, Bytes>,
    /// Index main parts by sha256, and the repositories they were asked by.
    mains: HashMap<Digest, Bytes>,
    /// Chunk lists' canonical bytes by sha256.
    lists: HashMap<Digest, Bytes>,
    asked_repos: std::sync::Mutex<Vec<(String, Option<String>)>>,
    /// Serve every chunk, window and main part with its first byte flipped.
    corrupt: bool,
}

impl MemSource {
    fn flipped(&self, b: Bytes) -> Bytes {
        if !self.corrupt {
            return b;
        }
        let mut v = b.to_vec();
        v[0] ^= 1;
        v.into()
    }
}

impl ChunkSource for MemSource {
    fn chunk(&self, digest: &Digest) -> Option<Bytes> {
        Some(self.flipped(self.chunks.get(digest)?.clone()))
    }
    fn window(&self, _layer: &Digest, w: &imgd_core::index::WindowRef) -> PiecesAnswer {
        match self.windows.get(&w.sha256) {
            Some(b) => PiecesAnswer::Here(self.flipped(b.clone())),
            None => PiecesAnswer::NotHere,
        }
    }
    fn layer_part(&self, which: LayerPart, ask: &wire::PartAsk) -> PiecesAnswer {
        self.asked_repos
            .lock()
            .unwrap()
            .push((ask.repo.clone(), ask.ns.clone()));
        let parts = match which {
            LayerPart::IndexMain => &self.mains,
            LayerPart::ChunkList => &self.lists,
        };
        match parts.get(&ask.sha256) {
            Some(b) => PiecesAnswer::Here(self.flipped(b.clone())),
            None => PiecesAnswer::NotHere,
        }
    }
    fn have(&self, blob: &Digest) -> Option<HaveMap> {
        self.maps.get(blob).cloned()
    }
}

fn chunk(i: usize, len: usize) -> Bytes {
    (0..len).map(|j| (i * 31 + j * 7 % 251) as u8).collect()
}

fn source(n: usize, len: usize) -> (MemSource, Vec<Digest>) {
    let mut s = MemSource::default();
    let mut digests = Vec::new();
    for i in 0..n {
        let b = chunk(i, len + i);
        let d = Digest::of(&b);
        s.chunks.insert(d, b);
        digests.push(d);
    }
    let mut map = HaveMap::new(10);
    map.set_present(3, true);
    map.set_in_flight(9, true);
    s.maps.insert(Digest::of(b"blob"), map);
    (s, digests)
}

struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(cfg: DataPlaneConfig, src: impl Into<Arc<MemSource>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(serve(listener, cfg, src.into()));
    Server { addr, task }
}

fn cfg(id: &str) -> DataPlaneConfig {
    DataPlaneConfig::new(KEY, id.as_bytes())
}

#[tokio::test]
async fn chunks_and_have_maps_round_trip() {
    let (src, digests) = source(3, 100_000);
    let expected: Vec<Bytes> = digests.iter().map(|d| src.chunks[d].clone()).collect();
    let server = start(cfg("server"), src).await;
    let mut c = PeerClient::connect(server.addr, &cfg("client"))
        .await
        .unwrap();
    assert_eq!(c.peer_id(), b"server");
    for (d, want) in digests.iter().zip(&expected) {
        let got = c.get_chunk(d, T).await.unwrap().unwrap();
        assert_eq!((got.digest(), got.bytes()), (d, want));
    }
    assert_eq!(c.get_chunk(&Digest::of(b"nope"), T).await.unwrap(), None);
    let map = c.have(&Digest::of(b"blob"), T).await.unwrap().unwrap();
    assert_eq!(map.chunk_count(), 10);
    assert!(map.is_present(3) && !map.is_present(4) && map.is_in_flight(9));
    assert_eq!(c.have(&Digest::of(b"other"), T).await.unwrap(), None);
    assert!(c.is_usable());
}

#[tokio::test]
async fn wrong_key_gets_nothing() {
    let (src, digests) = source(1, 1000);
    let server = start(cfg("server"), src).await;
    let mut bad = cfg("client");
    bad.key = SwarmKey([7; 32]);
    let err = PeerClient::connect(server.addr, &bad).await.err().unwrap();
    assert!(matches!(err, DataPlaneError::Unauthorized(_)), "{err}");

    // By hand: a wrong MAC followed by requests yields the server hello, then EOF.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut hello = handshake::MAGIC.to_vec();
    hello.extend_from_slice(&[1; 32]);
    hello.extend_from_slice(&[3, b'e', b'v', b'e']);
    s.write_all(&hello).await.unwrap();
    s.write_all(&[0; 32]).await.unwrap(); // not the MAC
    let limits = FrameLimits::from(&Limits::default());
    for msg in [
        Message::GetChunk { digest: digests[0] },
        Message::Have {
            blob: Digest::of(b"blob"),
        },
    ] {
        let (h, b) = wire::encode_frame(1, &msg, &limits).unwrap();
        let _ = s.write_all(&h).await;
        let _ = s.write_all(&b).await;
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await; // EOF or reset
    assert_eq!(got.len(), handshake::MAGIC.len() + 32 + 1 + "server".len());
}

#[tokio::test]
async fn allow_list_refuses_strangers() {
    let mut scfg = cfg("server");
    scfg.allow_list = vec![b"friend".to_vec()];
    let server = start(scfg, MemSource::default()).await;
    let err = PeerClient::connect(server.addr, &cfg("stranger"))
        .await
        .err();
    assert!(matches!(err, Some(DataPlaneError::Unauthorized(_))));
    assert!(PeerClient::connect(server.addr, &cfg("friend"))
        .await
        .is_ok());
}

#[tokio::test]
async fn corrupt_bytes_are_reported_and_the_connection_survives() {
    let (mut src, digests) = source(2, 50_000);
    src.corrupt = true;
    let server = start(cfg("server"), src).await;
    let mut c = PeerClient::connect(server.addr, &cfg("client"))
        .await
        .unwrap();
    for d in &digests {
        match c.get_chunk(d, T).await {
            Err(DataPlaneError::Corrupt { peer, digest }) => {
                assert_eq!((peer, digest), (server.addr, *d));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert!(c.is_usable());
    let pool = PeerPool::new(cfg("client"), 2);
    let err = pool.get_chunk(server.addr, &digests[0], T).await;
    assert!(matches!(err, Err(DataPlaneError::Corrupt { .. })));
}

#[tokio::test]
async fn a_window_is_checked_against_its_sha256() {
    let packed = chunk(7, 17_000);
    let w = imgd_core::index::WindowRef {
        offset: 123,
        len: packed.len() as u32,
        sha256: Digest::of(&packed),
    };
    let layer = Digest::of(b"layer");
    for corrupt in [false, true] {
        let mut src = MemSource {
            corrupt,
            ..Default::default()
        };
        src.windows.insert(w.sha256, packed.clone());
        let server = start(cfg("server"), src).await;
        let pool = PeerPool::new(cfg("client"), 2);
        let got = pool.window_answer(server.addr, &layer, &w, T).await;
        match (corrupt, got) {
            (false, Ok(Answer::Here(b))) => assert_eq!(b, packed),
            (true, Err(DataPlaneError::Corrupt { digest, .. })) => assert_eq!(digest, w.sha256),
            (_, other) => panic!("corrupt {corrupt}: got {other:?}"),
        }
        let unknown = imgd_core::index::WindowRef {
            sha256: Digest::of(b"other"),
            ..w
        };
        let got = pool.window_answer(server.addr, &layer, &unknown, T).await;
        assert!(matches!(got, Ok(Answer::NotHere)), "{got:?}");
    }
}

#[tokio::test]
async fn an_index_main_part_is_checked_against_the_proxys_sha256_and_length() {
    let layer = Digest::of(b"layer");
    let index = imgd_core::index::LayerIndex {
        layer,
        compression: imgd_core::index::Compression::None,
        compressed_size: 0,
        uncompressed_size: 0,
        random_access: true,
        entries: Vec::new(),
        checkpoints: Vec::new(),
        copy: None,
        toc: None,
        windows_size: 0,
        windows: None,
    };
    let main = Bytes::from(index.encode_main());
    let named = imgd_core::wire::PartRef {
        sha256: imgd_core::index::LayerIndex::main_part_digest(&main).unwrap(),
        len: main.len() as u64,
    };
    let repo = ("library/python", Some("docker.io"));
    for corrupt in [false, true] {
        let mut src = MemSource {
            corrupt,
            ..Default::default()
        };
        src.mains.insert(named.sha256, main.clone());
        let src = Arc::new(src);
        let server = start(cfg("server"), src.clone()).await;
        let pool = PeerPool::new(cfg("client"), 2);
        let got = pool
            .layer_part_answer(server.addr, LayerPart::IndexMain, &layer, &named, repo, T)
            .await;
        match (corrupt, got) {
            (false, Ok(Answer::Here(b))) => assert_eq!(b, main),
            (true, Err(DataPlaneError::Corrupt { digest, .. })) => {
                assert_eq!(digest, named.sha256)
            }
            (_, other) => panic!("corrupt {corrupt}: got {other:?}"),
        }
        // The right bytes under a length other than the proxy's are refused too.
        if !corrupt {
            let longer = imgd_core::wire::PartRef {
                len: named.len + 1,
                ..named
            };
            let got = pool
                .layer_part_answer(server.addr, LayerPart::IndexMain, &layer, &longer, repo, T)
                .await;
            assert!(
                matches!(got, Err(DataPlaneError::Corrupt { .. })),
                "{got:?}"
            );
        }
        let unknown = imgd_core::wire::PartRef {
            sha256: Digest::of(b"other"),
            ..named
        };
        let got = pool
            .layer_part_answer(server.addr, LayerPart::IndexMain, &layer, &unknown, repo, T)
            .await;
        assert!(matches!(got, Ok(Answer::NotHere)), "{got:?}");
        let asked = src.asked_repos.lock().unwrap().clone();
        assert!(asked
            .iter()
            .all(|(r, ns)| r == "library/python" && ns.as_deref() == Some("docker.io")));
    }
}

#[tokio::test]
async fn a_chunk_list_is_checked_against_the_proxys_sha256() {
    let layer = Digest::of(b"layer");
    let list = imgd_core::ChunkList {
        blob: layer,
        size: 5,
        chunks: vec![imgd_core::ChunkRef {
            digest: Digest::of(b"12345"),
            size: 5,
        }],
        pieces: vec![Digest::of(b"12345")],
    };
    let bytes = Bytes::from(list.canonical_bytes());
    let named = imgd_core::wire::PartRef {
        sha256: Digest::of(&bytes),
        len: bytes.len() as u64,
    };
    let repo = ("r", None);
    for corrupt in [false, true] {
        let mut src = MemSource {
            corrupt,
            ..Default::default()
        };
        src.lists.insert(named.sha256, bytes.clone());
        let server = start(cfg("server"), src).await;
        let pool = PeerPool::new(cfg("client"), 2);
        let which = LayerPart::ChunkList;
        let got = pool
            .layer_part_answer(server.addr, which, &layer, &named, repo, T)
            .await;
        match (corrupt, got) {
            (false, Ok(Answer::Here(b))) => {
                assert_eq!(
                    imgd_core::ChunkList::from_canonical_bytes(&b).unwrap(),
                    list
                )
            }
            (true, Err(DataPlaneError::Corrupt { digest, .. })) => {
                assert_eq!(digest, named.sha256)
            }
            (_, other) => panic!("corrupt {corrupt}: got {other:?}"),
        }
        // Asked for as an index main part, the same name finds nothing.
        let got = pool
            .layer_part_answer(server.addr, LayerPart::IndexMain, &layer, &named, repo, T)
            .await;
        assert!(matches!(got, Ok(Answer::NotHere)), "{got:?}");
    }
}

/// A peer that authenticates, then answers every request with `reply` one byte at a
/// time, `gap` apart.
async fn fake_peer(reply: Vec<u8>, gap: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        handshake::server(&mut s, &cfg("fake")).await.unwrap();
        let mut req = [0u8; HEADER_LEN + 32];
        while s.read_exact(&mut req).await.is_ok() {
            for b in &reply {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_slow_drip_peer_times_out() {
    let body = vec![0u8; 1000];
    let mut reply = wire::encode_header(kind::CHUNK, 1, 1000).to_vec();
    reply.extend_from_slice(&body);
    let addr = fake_peer(reply, Duration::from_millis(20)).await;
    let mut c = PeerClient::connect(addr, &cfg("client")).await.unwrap();
    let started = std::time::Instant::now();
    let err = c
        .get_chunk(&Digest::of(&body), Duration::from_millis(300))
        .await;
    assert!(matches!(err, Err(DataPlaneError::Timeout(_))), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!c.is_usable());
    assert!(matches!(
        c.get_chunk(&Digest::of(&body), T).await,
        Err(DataPlaneError::Closed)
    ));
}

#[tokio::test]
async fn oversized_or_malformed_replies_are_protocol_errors() {
    let cases = [
        wire::encode_header(kind::CHUNK, 1, (4 << 20) + 1).to_vec(),
        wire::encode_header(0x55, 1, 0).to_vec(),
        wire::encode_header(kind::NOT_FOUND, 99, 0).to_vec(), // wrong request id
        wire::encode_header(kind::HAVE, 1, 32).to_vec(),      // a request, from the server
    ];
    for reply in cases {
        let addr = fake_peer(reply, Duration::ZERO).await;
        let mut c = PeerClient::connect(addr, &cfg("client")).await.unwrap();
        let err = c.get_chunk(&Digest::of(b"x"), T).await;
        assert!(matches!(err, Err(DataPlaneError::Protocol(_))), "{err:?}");
        assert!(!c.is_usable());
    }
}

#[tokio::test]
async fn the_server_rejects_bad_frames_with_an_error_then_closes() {
    let server = start(cfg("server"), MemSource::default()).await;
    let limits = FrameLimits::from(&Limits::default());
    let bad_frames = [
        wire::encode_header(kind::CHUNK, 5, 10).to_vec(), // a response kind
        wire::encode_header(kind::GET_CHUNK, 5, 4 << 20).to_vec(), // wrong length
        wire::encode_header(kind::HAVE_MAP, 5, u32::MAX).to_vec(), // oversized
        wire::encode_header(0x00, 5, 0).to_vec(),         // unknown
    ];
    for frame in bad_frames {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        handshake::client(&mut s, &cfg("client")).await.unwrap();
        s.write_all(&frame).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        match wire::decode_frame(&got, &limits) {
            Ok(Some((_, Message::Error(text), used))) => {
                assert_eq!(used, got.len(), "nothing after the error");
                assert!(!text.is_empty());
            }
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_share_a_bounded_pool() {
    let (src, digests) = source(64, 70_000);
    let server = start(cfg("server"), src).await;
    let pool = Arc::new(PeerPool::new(cfg("client"), 4));
    let addr = server.addr;
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let pool = pool.clone();
            let d = digests[i % digests.len()];
            tokio::spawn(async move { pool.get_chunk(addr, &d, T).await.map(|b| (d, b)) })
        })
        .collect();
    for t in tasks {
        let (d, b) = t.await.unwrap().unwrap();
        assert_eq!(*b.unwrap().digest(), d);
    }
    let map = pool.have(addr, &Digest::of(b"blob"), T).await.unwrap();
    assert!(map.unwrap().is_present(3));
    assert!((1..=4).contains(&pool.idle_connections(addr)));
}

#[tokio::test]
async fn the_pool_reconnects_after_the_server_drops_idle_connections() {
    let (src, digests) = source(1, 1000);
    let mut scfg = cfg("server");
    scfg.limits.idle_timeout = Duration::from_millis(100);
    let server = start(scfg, src).await;
    let pool = PeerPool::new(cfg("client"), 4);
    assert!(pool
        .get_chunk(server.addr, &digests[0], T)
        .await
        .unwrap()
        .is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(pool
        .get_chunk(server.addr, &digests[0], T)
        .await
        .unwrap()
        .is_some());
    pool.forget(server.addr);
    assert_eq!(pool.idle_connections(server.addr), 0);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let mut scfg = cfg("server");
    scfg.limits.max_connections = 1;
    let server = start(scfg, MemSource::default()).await;
    let _first = PeerClient::connect(server.addr, &cfg("a")).await.unwrap();
    let second = PeerClient::connect(server.addr, &cfg("b")).await;
    assert!(
        matches!(second, Err(DataPlaneError::Handshake(_))),
        "{:?}",
        second.err()
    );
}

#[tokio::test]
async fn a_cancelled_request_leaves_the_connection_unusable() {
    let body = vec![0u8; 1000];
    let mut reply = wire::encode_header(kind::CHUNK, 1, 1000).to_vec();
    reply.extend_from_slice(&body);
    let addr = fake_peer(reply, Duration::from_millis(5)).await;
    let mut c = PeerClient::connect(addr, &cfg("client")).await.unwrap();
    let d = Digest::of(&body);
    // The caller gives up (drops the future) in the middle of the reply.
    let _ = tokio::time::timeout(Duration::from_millis(100), c.get_chunk(&d, T)).await;
    assert!(matches!(
        c.get_chunk(&d, T).await,
        Err(DataPlaneError::Closed)
    ));
    assert!(!c.is_usable());
}

mod hostile;
mod slow_answers;
mod subscription;
