//! Hostile peers: malformed and oversized frames, garbage handshakes, request floods.
//! Each gets a clear error (where the protocol has a way to say it), its connection is
//! dropped, the server's memory stays bounded, and an honest peer is served throughout.

use super::*;

/// An authenticated raw connection.
async fn raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    handshake::client(&mut s, &cfg("mallory")).await.unwrap();
    s
}

/// Everything the server sends until it closes, with a time limit.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    got
}

async fn honest_fetch(c: &mut PeerClient, d: &Digest) {
    let got = c.get_chunk(d, T).await.unwrap().unwrap();
    assert_eq!(got.digest(), d);
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_an_error_and_others_are_served() {
    let (src, digests) = source(1, 10_000);
    let server = start(cfg("server"), src).await;
    let mut honest = PeerClient::connect(server.addr, &cfg("honest"))
        .await
        .unwrap();
    let limits = FrameLimits::from(&Limits::default());
    let mut garbage = vec![0xa5u8; 4096];
    garbage[4] = 0x01; // GetChunk kind with a huge length
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("garbage", garbage, "GetChunk frame body must be 32 bytes"),
        (
            "oversized length prefix",
            wire::encode_header(kind::HAVE, 1, u32::MAX).to_vec(),
            "must be 32 bytes, got 4294967295",
        ),
        (
            "oversized chunk",
            wire::encode_header(kind::CHUNK, 1, u32::MAX).to_vec(),
            "Chunk frame body of 4294967295 bytes exceeds the limit",
        ),
        (
            "unknown kind",
            wire::encode_header(0x7f, 1, 0).to_vec(),
            "unknown frame kind 0x7f",
        ),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw(server.addr).await;
        s.write_all(&bytes).await.unwrap();
        let got = until_closed(&mut s).await;
        match wire::decode_frame(&got, &limits) {
            Ok(Some((_, Message::Error(text), used))) => {
                assert_eq!(used, got.len(), "{what}: nothing after the error");
                assert!(text.contains(want), "{what}: {text}");
            }
            other => panic!("{what}: expected an Error frame, got {other:?}"),
        }
        honest_fetch(&mut honest, &digests[0]).await;
    }
}

#[tokio::test]
async fn a_garbage_handshake_is_dropped_without_a_word() {
    let (src, digests) = source(1, 1000);
    let server = start(cfg("server"), src).await;
    let mut honest = PeerClient::connect(server.addr, &cfg("honest"))
        .await
        .unwrap();
    // Wrong magic; then a right magic with an over-long node id.
    let mut long_id = handshake::MAGIC.to_vec();
    long_id.extend_from_slice(&[0; 32]);
    long_id.push(255);
    long_id.extend_from_slice(&[b'x'; 255]);
    for hello in [vec![0x17u8; 1000], long_id] {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let _ = s.write_all(&hello).await;
        let got = until_closed(&mut s).await;
        assert!(got.is_empty(), "the server said {} bytes", got.len());
        honest_fetch(&mut honest, &digests[0]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_is_held_back_then_dropped_while_others_are_served() {
    let (src, digests) = source(1, 1 << 20);
    let mut scfg = cfg("server");
    scfg.limits.write_timeout = Duration::from_millis(500);
    let server = start(scfg, src).await;
    let limits = FrameLimits::from(&Limits::default());
    let mut s = raw(server.addr).await;
    // 2 million requests for a 1 MiB chunk (82 MB of requests, 2 TB of answers), never
    // reading an answer: the server reads a request only after writing the previous
    // answer, so the flood stalls on TCP backpressure instead of piling up in memory.
    let (h, b) = wire::encode_frame(1, &Message::GetChunk { digest: digests[0] }, &limits).unwrap();
    let one = [&h[..], &b[..]].concat();
    let batch: Vec<u8> = one.repeat(10_000);
    let total = 200usize;
    let flood = tokio::spawn(async move {
        let mut sent = 0;
        for _ in 0..total {
            if s.write_all(&batch).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    // Meanwhile an honest peer is served.
    let mut honest = PeerClient::connect(server.addr, &cfg("honest"))
        .await
        .unwrap();
    for _ in 0..3 {
        honest_fetch(&mut honest, &digests[0]).await;
    }
    // The server gives up on the flooder after its write timeout; the flood ends with
    // an error long before all of it was sent.
    let sent = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the flooder's connection was not dropped")
        .unwrap();
    assert!(sent < total / 2, "{sent} of {total} batches went through");
    honest_fetch(&mut honest, &digests[0]).await;
}
