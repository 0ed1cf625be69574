//! `imgd-evil-peer`: a swarm member that lies, for fault tests. It joins the swarm like an
//! agent (libp2p discovery, the data plane with the swarm key), claims to hold every chunk
//! of an image, and serves each chunk with one byte flipped.
//!
//! `imgd-evil-peer --proxy URL --image REPO:TAG --dir DIR`

use anyhow::{Context, Result};
use bytes::Bytes;
use imgd_agent::config::DEV_SWARM_KEY;
use imgd_agent::dataplane::{self, ChunkSource, DataPlaneConfig, HaveMap};
use imgd_agent::image::{self, ImageRef};
use imgd_agent::peers::PeerSet;
use imgd_agent::proxy_client::ProxyClient;
use imgd_core::{ChunkList, Digest};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

struct Liar {
    lists: HashMap<Digest, ChunkList>,
    chunks: HashMap<Digest, Bytes>,
}

impl ChunkSource for Liar {
    fn chunk(&self, digest: &Digest) -> Option<Bytes> {
        self.chunks.get(digest).cloned()
    }

    fn have(&self, blob: &Digest) -> Option<HaveMap> {
        let list = self.lists.get(blob)?;
        let mut map = HaveMap::new(list.chunks.len() as u32);
        for i in 0..list.chunks.len() as u32 {
            map.set_present(i, true);
        }
        Some(map)
    }
}

fn arg(name: &str) -> Result<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args
        .iter()
        .position(|a| a == name)
        .with_context(|| format!("missing {name}"))?;
    args.get(i + 1)
        .cloned()
        .with_context(|| format!("missing value of {name}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let proxy = ProxyClient::new(&arg("--proxy")?, Duration::from_secs(30))?;
    let dir = std::path::PathBuf::from(arg("--dir")?);
    std::fs::create_dir_all(&dir)?;
    let r = ImageRef::parse(&arg("--image")?)?;
    let record = image::resolve(&proxy, &r).await?;
    let mut liar = Liar {
        lists: HashMap::new(),
        chunks: HashMap::new(),
    };
    for blob in record.blobs() {
        let info = proxy.blob_info(&r.proxy_repo(), &blob).await?;
        for c in &info.chunks.chunks {
            let mut bytes = proxy.chunk(&c.digest).await?.to_vec();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x5a;
            liar.chunks.insert(c.digest, Bytes::from(bytes));
        }
        liar.lists.insert(blob, info.chunks);
    }
    let keypair = imgd_agent::identity::load_or_create(&dir.join("node.key"))?;
    let node_id = keypair.public().to_peer_id().to_string();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:7401").await?;
    let settings = imgd_agent::swarm::SwarmSettings {
        keypair,
        quic_listen: "0.0.0.0:7400".parse()?,
        data_port: 7401,
        swarm_key: DEV_SWARM_KEY,
        allow_list: vec![],
        bootstrap: vec![],
        mdns: true,
    };
    let _swarm = imgd_agent::swarm::start(settings, Arc::new(PeerSet::default()))?;
    println!("evil peer {node_id} ready");
    dataplane::serve(
        listener,
        DataPlaneConfig::new(DEV_SWARM_KEY, node_id.into_bytes()),
        Arc::new(liar),
    )
    .await?;
    Ok(())
}
