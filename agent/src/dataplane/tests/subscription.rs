//! Have-map subscriptions: the first map at once, changes pushed within the rate bound,
//! a bounded number at once, and the end when the subscriber hangs up.

use super::*;
use std::sync::Mutex;

/// A source whose one blob's map the test changes, bumping the change counter.
struct Changing {
    map: Mutex<HaveMap>,
    changes: tokio::sync::watch::Sender<u64>,
    subscribers: Mutex<Vec<Vec<u8>>>,
}

impl Changing {
    fn new(chunks: u32) -> Arc<Changing> {
        Arc::new(Changing {
            map: Mutex::new(HaveMap::new(chunks)),
            changes: tokio::sync::watch::channel(0).0,
            subscribers: Mutex::new(Vec::new()),
        })
    }

    fn set(&self, i: u32) {
        self.map.lock().unwrap().set_present(i, true);
        self.changes.send_modify(|n| *n += 1);
    }
}

impl ChunkSource for Changing {
    fn chunk(&self, _: &Digest) -> Option<Bytes> {
        None
    }
    fn have(&self, blob: &Digest) -> Option<HaveMap> {
        (*blob == Digest::of(b"blob")).then(|| self.map.lock().unwrap().clone())
    }
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
    fn subscribed(&self, _: &Digest, peer_id: &[u8]) {
        self.subscribers.lock().unwrap().push(peer_id.to_vec());
    }
}

async fn serve_changing(src: Arc<Changing>, limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut c = cfg("server");
    c.limits = limits;
    tokio::spawn(serve(listener, c, src));
    addr
}

#[tokio::test]
async fn changes_are_pushed_coalesced_within_the_rate_bound() {
    let src = Changing::new(200);
    let addr = serve_changing(src.clone(), Limits::default()).await;
    let pool = PeerPool::new(cfg("client"), 1);
    let blob = Digest::of(b"blob");
    let mut sub = pool.subscribe(addr, &blob, T).await.unwrap();
    let first = sub.next(T).await.unwrap().unwrap();
    assert_eq!((first.chunk_count(), first.is_present(0)), (200, false));
    assert_eq!(*src.subscribers.lock().unwrap(), vec![b"client".to_vec()]);

    // One change arrives pushed, well before the heartbeat.
    let t = tokio::time::Instant::now();
    src.set(0);
    let map = sub.next(T).await.unwrap().unwrap();
    assert!(map.is_present(0));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // 200 changes in a burst of about 1 s: coalesced, at most one frame per 50 ms.
    let writer = {
        let src = src.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                src.set(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let t = tokio::time::Instant::now();
    let mut frames = 0;
    loop {
        let map = sub.next(T).await.unwrap().unwrap();
        frames += 1;
        if (0..200).all(|i| map.is_present(i)) {
            break;
        }
        assert!(frames < 1000, "never saw the last change");
    }
    writer.await.unwrap();
    let bound = t.elapsed().as_millis() as u64 / wire::PUSH_INTERVAL_MS + 2;
    assert!(
        frames <= bound && frames >= 2,
        "{frames} frames in {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn subscriptions_are_bounded_and_end_when_the_subscriber_hangs_up() {
    let src = Changing::new(8);
    let limits = Limits {
        max_subscriptions: 1,
        ..Limits::default()
    };
    let addr = serve_changing(src.clone(), limits).await;
    let pool = PeerPool::new(cfg("client"), 1);
    let blob = Digest::of(b"blob");
    let mut first = pool.subscribe(addr, &blob, T).await.unwrap();
    first.next(T).await.unwrap().unwrap();
    let mut second = pool.subscribe(addr, &blob, T).await.unwrap();
    match second.next(T).await {
        Err(DataPlaneError::Remote(text)) => assert!(text.contains("too many"), "{text}"),
        other => panic!(
            "a second subscription over the limit: {:?}",
            other.map(|_| ())
        ),
    }
    // Hanging up frees the slot (the server notices within a push interval).
    drop(first);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let mut again = pool.subscribe(addr, &blob, T).await.unwrap();
        if again.next(T).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A blob the server does not know ends the subscription with Unknown.
    let mut unknown = pool.subscribe(addr, &Digest::of(b"other"), T).await;
    // (the slot may still be held by `again`'s server side for a moment)
    for _ in 0..100 {
        match unknown.as_mut().unwrap().next(T).await {
            Ok(None) => return,
            Err(DataPlaneError::Remote(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                unknown = pool.subscribe(addr, &Digest::of(b"other"), T).await;
            }
            other => panic!("unknown blob: {:?}", other.map(|m| m.is_some())),
        }
    }
    panic!("never answered Unknown");
}
