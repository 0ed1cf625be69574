//! A peer's answer is timed by when it starts and by the gaps in its body, not as a
//! whole: a loaded peer that keeps sending is waited for, a stuck one is cut off.

use super::*;

/// A server that answers one `GetChunk` with `body`, written in `parts` with `gap`
/// before each part (and, with `stall`, one long pause in the middle).
async fn trickling(
    body: Bytes,
    parts: usize,
    gap: Duration,
    stall: Option<Duration>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        handshake::server(&mut s, &cfg("slow")).await.unwrap();
        let limits = FrameLimits::from(&Limits::default());
        let mut head = [0u8; HEADER_LEN];
        s.read_exact(&mut head).await.unwrap();
        let header = wire::decode_header(&head, &limits).unwrap();
        let mut req = vec![0u8; header.len];
        s.read_exact(&mut req).await.unwrap();
        let (h, b) = wire::encode_frame(header.request_id, &Message::Chunk(body), &limits).unwrap();
        s.write_all(&h).await.unwrap();
        for (k, part) in b.chunks(b.len().div_ceil(parts)).enumerate() {
            tokio::time::sleep(gap).await;
            if k == parts / 2 {
                if let Some(pause) = stall {
                    tokio::time::sleep(pause).await;
                }
            }
            if s.write_all(part).await.is_err() {
                return;
            }
        }
        let _ = s.read_to_end(&mut Vec::new()).await;
    });
    addr
}

async fn ask(addr: SocketAddr, digest: &Digest, timeout: Duration) -> Result<Option<Bytes>> {
    let mut c = PeerClient::connect(addr, &cfg("client")).await.unwrap();
    let chunk = c.get_chunk(digest, timeout).await?;
    Ok(chunk.map(imgd_core::VerifiedChunk::into_bytes))
}

#[tokio::test]
async fn an_answer_that_keeps_coming_is_waited_for_past_the_timeout() {
    let body = chunk(1, 1 << 20);
    let d = Digest::of(&body);
    // 8 parts 150 ms apart: 1.2 s in all, against a 400 ms time-out.
    let addr = trickling(body.clone(), 8, Duration::from_millis(150), None).await;
    let got = ask(addr, &d, Duration::from_millis(400)).await.unwrap();
    assert_eq!(got, Some(body));
}

#[tokio::test]
async fn an_answer_that_stalls_is_cut_off_after_the_timeout() {
    let body = chunk(2, 1 << 20);
    let d = Digest::of(&body);
    let addr = trickling(
        body,
        8,
        Duration::from_millis(10),
        Some(Duration::from_secs(2)),
    )
    .await;
    let started = std::time::Instant::now();
    let err = ask(addr, &d, Duration::from_millis(400)).await.unwrap_err();
    assert!(
        matches!(err, DataPlaneError::Timeout("request body")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_trickle_is_cut_off_at_four_timeouts_in_all() {
    let body = chunk(3, 1 << 20);
    let d = Digest::of(&body);
    // 16 parts 300 ms apart: every gap within 400 ms, 4.8 s in all, past 4 × 400 ms.
    let addr = trickling(body, 16, Duration::from_millis(300), None).await;
    let started = std::time::Instant::now();
    let err = ask(addr, &d, Duration::from_millis(400)).await.unwrap_err();
    assert!(matches!(err, DataPlaneError::Timeout("request")), "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(3),
        "{took:?}"
    );
}
