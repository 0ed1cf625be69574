//! `imgd-evil-peer`: a misbehaving data-plane peer, for fault tests.
//!
//! As a **liar** it joins the swarm like an agent (libp2p discovery, the data plane with the
//! swarm key), claims in its have-maps to hold every chunk of an image, and answers chunk
//! and piece requests (`GetChunk`, `GetPieces`) according to `--mode`:
//! - `flip`: the chunk (or the pieces) with one byte flipped;
//! - `truncate`: a chunk frame announcing the whole chunk, half the bytes, then a hang-up;
//! - `drip`: a chunk frame announcing the whole chunk, then a few bytes per second;
//! - `phantom`: it does not hold the chunks it advertises: `NotFound` or an error frame.
//!
//! It prints `evil peer <ID> ready` once it serves.
//!
//! As a **probe** (`--probe IP:PORT`) it is an outsider trying to read an agent's data
//! plane: it runs the client handshake (with `--wrong-key`, a random key instead of the
//! test swarm key), then sends `GetChunk` and `Have` for the image's first layer
//! whatever the handshake said, and prints one JSON line: the handshake outcome and the
//! bytes, chunk and have-map it got back. `--print-id` prints the node id of `--dir`'s key.
//!
//! ```text
//! imgd-evil-peer --proxy URL --image REPO:TAG --dir DIR [--mode flip|truncate|drip|phantom]
//! imgd-evil-peer --proxy URL --image REPO:TAG --dir DIR --probe IP:PORT [--wrong-key]
//! imgd-evil-peer --dir DIR --print-id
//! ```

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use imgd_agent::dataplane::wire::{self, FrameLimits, Message, HEADER_LEN};
use imgd_agent::dataplane::{handshake, DataPlaneConfig, HaveMap, Limits};
use imgd_agent::image::{self, ImageRef};
use imgd_agent::peers::PeerSet;
use imgd_agent::proxy_client::ProxyClient;
use imgd_core::{ChunkList, Digest, PIECE_SIZE};
use imgd_tests::daemons::TEST_SWARM_KEY;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How the liar answers chunk requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Flip,
    Truncate,
    Drip,
    Phantom,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "flip" => Mode::Flip,
            "truncate" => Mode::Truncate,
            "drip" => Mode::Drip,
            "phantom" => Mode::Phantom,
            other => bail!("unknown --mode {other} (flip, truncate, drip, phantom)"),
        })
    }
}

/// The image's chunk lists and the true bytes of its chunks.
struct Image {
    lists: HashMap<Digest, ChunkList>,
    chunks: HashMap<Digest, Bytes>,
    first_layer: Digest,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn required(name: &str) -> Result<String> {
    arg(name).with_context(|| format!("missing {name}"))
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Resolves the image through the proxy and downloads its chunks.
async fn load_image(with_bytes: bool) -> Result<Image> {
    let proxy = ProxyClient::new(&required("--proxy")?, Duration::from_secs(30))?;
    let r = ImageRef::parse(&required("--image")?)?;
    let record = image::resolve(&proxy, &r).await?;
    let first_layer = *record.layers.first().context("image without layers")?;
    let mut img = Image {
        lists: HashMap::new(),
        chunks: HashMap::new(),
        first_layer,
    };
    for blob in record.blobs() {
        let info = proxy.blob_info(&r.proxy_repo(), &blob).await?;
        if with_bytes || blob == first_layer {
            for c in &info.chunks.chunks {
                img.chunks
                    .insert(c.digest, proxy.chunk(&c.digest).await?.into_bytes());
            }
        }
        img.lists.insert(blob, info.chunks);
    }
    Ok(img)
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::path::PathBuf::from(required("--dir")?);
    std::fs::create_dir_all(&dir)?;
    let keypair = imgd_agent::identity::load_or_create(&dir.join("node.key"))?;
    let node_id = keypair.public().to_peer_id().to_string();
    if flag("--print-id") {
        println!("{node_id}");
        return Ok(());
    }
    let mut cfg = DataPlaneConfig::new(TEST_SWARM_KEY, node_id.clone().into_bytes());
    if let Some(target) = arg("--probe") {
        if flag("--wrong-key") {
            cfg.key.0 = rand_key();
        }
        let img = load_image(false).await?;
        let report = probe(target.parse()?, &cfg, &img).await;
        println!("{report}");
        return Ok(());
    }
    let mode = Mode::parse(&arg("--mode").unwrap_or_else(|| "flip".into()))?;
    let img = Arc::new(load_image(true).await?);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:7401").await?;
    let settings = imgd_agent::swarm::SwarmSettings {
        keypair,
        listen: "0.0.0.0:7400".parse()?,
        data_port: 7401,
        swarm_key: TEST_SWARM_KEY,
        allow_list: vec![],
        bootstrap: vec![],
        mdns: true,
        zone: None,
    };
    let (_, swarm) = imgd_agent::swarm::start(settings, Arc::new(PeerSet::default()))?;
    // Announced as a provider of every blob, so fetching hosts find it and ask it.
    for blob in img.lists.keys() {
        swarm
            .send(imgd_agent::swarm::SwarmCommand::Provide(*blob))
            .await?;
    }
    println!("evil peer {node_id} ready ({mode:?})");
    let cfg = Arc::new(cfg);
    loop {
        let (stream, addr) = listener.accept().await?;
        let (img, cfg) = (img.clone(), cfg.clone());
        tokio::spawn(async move {
            if let Err(e) = lie(stream, &cfg, &img, mode).await {
                eprintln!("evil peer: connection from {addr} ended: {e:#}");
            }
        });
    }
}

fn rand_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (std::process::id() as u8)
            .wrapping_add(i as u8)
            .wrapping_mul(31);
    }
    k
}

/// Serves one connection as a liar: handshake, then requests until the peer hangs up.
async fn lie(mut s: TcpStream, cfg: &DataPlaneConfig, img: &Image, mode: Mode) -> Result<()> {
    s.set_nodelay(true)?;
    handshake::server(&mut s, cfg).await?;
    let limits = FrameLimits::from(&Limits::default());
    let mut served = 0u32;
    loop {
        let mut head = [0u8; HEADER_LEN];
        if s.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let header = wire::decode_header(&head, &limits)?;
        let mut body = vec![0u8; header.len];
        s.read_exact(&mut body).await?;
        let id = header.request_id;
        // Claims every chunk of every blob of its image.
        let claim = |blob: &Digest| match img.lists.get(blob) {
            Some(list) => {
                let n = list.chunks.len() as u32;
                let mut map = HaveMap::new(n);
                (0..n).for_each(|i| map.set_present(i, true));
                Message::HaveMap(map)
            }
            None => Message::Unknown,
        };
        let reply = match wire::decode_body(&header, &body)? {
            Message::Have { blob } => claim(&blob),
            Message::Subscribe { blob } => {
                // One pushed map, then silence until the subscriber hangs up.
                send(&mut s, id, &claim(&blob)).await?;
                let mut probe = [0u8; 1];
                let _ = s.read(&mut probe).await;
                return Ok(());
            }
            Message::GetPieces {
                chunk,
                first,
                count,
            } => {
                let Some(bytes) = img.chunks.get(&chunk) else {
                    send(&mut s, id, &Message::NotFound).await?;
                    continue;
                };
                served += 1;
                let a = (first as usize * PIECE_SIZE).min(bytes.len());
                let b = ((first as usize + count as usize) * PIECE_SIZE).min(bytes.len());
                let mut v = bytes[a..b].to_vec();
                match mode {
                    Mode::Phantom => Message::NotFound,
                    _ if v.is_empty() => Message::NotFound,
                    _ => {
                        // Every other mode lies with a flipped byte in the last piece.
                        let at = v.len() - 1;
                        v[at] ^= 0x5a;
                        Message::Pieces(Bytes::from(v))
                    }
                }
            }
            Message::GetChunk { digest } => {
                let Some(bytes) = img.chunks.get(&digest) else {
                    send(&mut s, id, &Message::NotFound).await?;
                    continue;
                };
                served += 1;
                match mode {
                    Mode::Flip => {
                        let mut v = bytes.to_vec();
                        let mid = v.len() / 2;
                        v[mid] ^= 0x5a;
                        Message::Chunk(Bytes::from(v))
                    }
                    Mode::Phantom if served.is_multiple_of(2) => Message::NotFound,
                    Mode::Phantom => Message::Error("chunk vanished".into()),
                    Mode::Truncate | Mode::Drip => {
                        let head = wire::encode_header(wire::kind::CHUNK, id, bytes.len() as u32);
                        s.write_all(&head).await?;
                        if mode == Mode::Truncate {
                            s.write_all(&bytes[..bytes.len() / 2]).await?;
                            return Ok(()); // hang up mid-chunk
                        }
                        for piece in bytes.chunks(4) {
                            s.write_all(piece).await?;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        continue;
                    }
                }
            }
            other => bail!("unexpected request {other:?}"),
        };
        send(&mut s, id, &reply).await?;
    }
}

async fn send(s: &mut TcpStream, id: u32, msg: &Message) -> Result<()> {
    let (head, body) = wire::encode_frame(id, msg, &FrameLimits::from(&Limits::default()))?;
    s.write_all(&head).await?;
    s.write_all(&body).await?;
    Ok(())
}

/// Tries to read the image's first layer from `target` as an outsider; returns a JSON
/// report of what came back.
async fn probe(target: std::net::SocketAddr, cfg: &DataPlaneConfig, img: &Image) -> String {
    let outcome = async {
        let mut s = TcpStream::connect(target).await?;
        let hs = handshake::client(&mut s, cfg).await;
        let list = img.lists.get(&img.first_layer).context("first layer")?;
        let chunk = list.chunks.first().context("no chunk")?.digest;
        let limits = FrameLimits::from(&Limits::default());
        let mut sent = Vec::new();
        for (id, m) in [
            (1, Message::GetChunk { digest: chunk }),
            (
                2,
                Message::Have {
                    blob: img.first_layer,
                },
            ),
        ] {
            let (h, b) = wire::encode_frame(id, &m, &limits)?;
            sent.extend_from_slice(&h);
            sent.extend_from_slice(&b);
        }
        // Whatever the handshake said, ask, as an attacker would.
        let _ = s.write_all(&sent).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            let mut buf = [0u8; 65536];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || got.len() > (8 << 20) {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if decoded(&got, &limits).len() >= 2 {
                    break;
                }
            }
        })
        .await;
        let replies = decoded(&got, &limits);
        let chunk_ok = replies
            .iter()
            .any(|m| matches!(m, Message::Chunk(b) if Digest::of(b) == chunk));
        let have = replies.iter().any(|m| matches!(m, Message::HaveMap(_)));
        anyhow::Ok(serde_json::json!({
            "handshake": match hs { Ok(_) => "ok".to_string(), Err(e) => format!("refused: {e}") },
            "bytes_after_handshake": got.len(),
            "chunk": chunk_ok,
            "have_map": have,
        }))
    }
    .await;
    match outcome {
        Ok(v) => v.to_string(),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }).to_string(),
    }
}

/// The whole frames at the start of `buf`.
fn decoded(buf: &[u8], limits: &FrameLimits) -> Vec<Message> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some((_, m, used))) = wire::decode_frame(&buf[at..], limits) {
        out.push(m);
        at += used;
    }
    out
}
