//! Mutual authentication of a data plane connection with the pre-shared swarm key.
//!
//! ```text
//! client -> server  hello: "imgd-dp-v5" | nonce[32] | id_len: u8 | id[id_len <= 64]
//! server -> client  hello (sent only after a well-formed client hello)
//! client -> server  mac_C[32]
//! server -> client  mac_S[32] (sent only if mac_C is right and the client is allowed)
//! mac_R = HMAC-SHA256(key, "imgd-dp-v5" | R | own nonce | peer nonce
//!                          | len(own id) | own id | len(peer id) | peer id)
//! ```
//!
//! `R` is the role byte (`b'C'` or `b'S'`), so a MAC cannot be reflected back to its
//! sender; both fresh nonces make every MAC single-use; the ids are length-prefixed so
//! the MAC input is unambiguous. MACs are compared in constant time. The client proves
//! the key first, so a peer without the key learns nothing beyond the server's hello.
//! On any failure the connection is simply dropped, without an error message.

use super::{DataPlaneConfig, DataPlaneError, Result, MAX_NODE_ID_LEN};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol and version tag that starts every hello and every MAC input.
pub const MAGIC: &[u8; 10] = b"imgd-dp-v5";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const ROLE_CLIENT: u8 = b'C';
const ROLE_SERVER: u8 = b'S';

/// One side's hello.
struct Hello {
    nonce: [u8; NONCE_LEN],
    id: Vec<u8>,
}

impl Hello {
    fn fresh(cfg: &DataPlaneConfig) -> Result<Self> {
        if cfg.node_id.len() > MAX_NODE_ID_LEN {
            return Err(DataPlaneError::Config(format!(
                "our node id is {} bytes, the limit is {MAX_NODE_ID_LEN}",
                cfg.node_id.len()
            )));
        }
        Ok(Hello {
            nonce: rand::random(),
            id: cfg.node_id.clone(),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAGIC.len() + NONCE_LEN + 1 + self.id.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&self.nonce);
        v.push(self.id.len() as u8); // checked <= 64 in `fresh`
        v.extend_from_slice(&self.id);
        v
    }

    async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Self> {
        let mut fixed = [0u8; MAGIC.len() + NONCE_LEN + 1];
        read_exact(stream, &mut fixed, "hello").await?;
        if &fixed[..MAGIC.len()] != MAGIC {
            return Err(DataPlaneError::Handshake(
                "peer is not speaking imgd-dp-v5".into(),
            ));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&fixed[MAGIC.len()..MAGIC.len() + NONCE_LEN]);
        let id_len = fixed[MAGIC.len() + NONCE_LEN] as usize;
        if id_len > MAX_NODE_ID_LEN {
            return Err(DataPlaneError::Handshake(format!(
                "peer node id of {id_len} bytes exceeds {MAX_NODE_ID_LEN}"
            )));
        }
        let mut id = vec![0u8; id_len];
        read_exact(stream, &mut id, "hello").await?;
        Ok(Hello { nonce, id })
    }
}

async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    what: &str,
) -> Result<()> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if hung_up(&e) => Err(DataPlaneError::Handshake(format!(
            "peer closed the connection before its {what}"
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, buf: &[u8]) -> Result<()> {
    match stream.write_all(buf).await {
        Ok(()) => Ok(()),
        Err(e) if hung_up(&e) => Err(DataPlaneError::Handshake(
            "peer closed the connection during the handshake".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Whether `e` means the peer closed or reset the connection.
fn hung_up(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// The MAC a side with role `role` sends.
fn mac(key: &[u8; 32], role: u8, own: &Hello, peer: &Hello) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(MAGIC);
    m.update(&[role]);
    m.update(&own.nonce);
    m.update(&peer.nonce);
    m.update(&[own.id.len() as u8]);
    m.update(&own.id);
    m.update(&[peer.id.len() as u8]);
    m.update(&peer.id);
    m
}

fn check_allowed(cfg: &DataPlaneConfig, peer: &Hello) -> Result<()> {
    if cfg.allows(&peer.id) {
        Ok(())
    } else {
        Err(DataPlaneError::Unauthorized(format!(
            "node id {} is not on the allow list",
            imgd_core::digest::to_hex(&peer.id)
        )))
    }
}

/// Runs the client side over `stream` within the configured handshake timeout and
/// returns the server's authenticated node id.
pub async fn client<S>(stream: &mut S, cfg: &DataPlaneConfig) -> Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = cfg.limits.handshake_timeout;
    super::with_timeout(limit, "handshake", async {
        let own = Hello::fresh(cfg)?;
        write_all(stream, &own.encode()).await?;
        let peer = Hello::read(stream).await?;
        let tag = mac(&cfg.key.0, ROLE_CLIENT, &own, &peer).finalize();
        write_all(stream, &tag.into_bytes()).await?;
        let mut theirs = [0u8; MAC_LEN];
        if let Err(e) = stream.read_exact(&mut theirs).await {
            return Err(if hung_up(&e) {
                DataPlaneError::Unauthorized(
                    "server refused us: wrong swarm key or not on its allow list".into(),
                )
            } else {
                e.into()
            });
        }
        mac(&cfg.key.0, ROLE_SERVER, &peer, &own)
            .verify_slice(&theirs)
            .map_err(|_| {
                DataPlaneError::Unauthorized("server does not hold the swarm key".into())
            })?;
        check_allowed(cfg, &peer)?;
        Ok(peer.id)
    })
    .await
}

/// Runs the server side over `stream` within the configured handshake timeout and
/// returns the client's authenticated node id. On error the caller must drop the
/// connection; nothing has been sent after our hello.
pub async fn server<S>(stream: &mut S, cfg: &DataPlaneConfig) -> Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = cfg.limits.handshake_timeout;
    super::with_timeout(limit, "handshake", async {
        let peer = Hello::read(stream).await?;
        let own = Hello::fresh(cfg)?;
        write_all(stream, &own.encode()).await?;
        let mut theirs = [0u8; MAC_LEN];
        read_exact(stream, &mut theirs, "MAC").await?;
        mac(&cfg.key.0, ROLE_CLIENT, &peer, &own)
            .verify_slice(&theirs)
            .map_err(|_| {
                DataPlaneError::Unauthorized("client does not hold the swarm key".into())
            })?;
        check_allowed(cfg, &peer)?;
        let tag = mac(&cfg.key.0, ROLE_SERVER, &own, &peer).finalize();
        write_all(stream, &tag.into_bytes()).await?;
        Ok(peer.id)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(key: u8, id: &[u8]) -> DataPlaneConfig {
        DataPlaneConfig::new([key; 32], id)
    }

    async fn run(c: DataPlaneConfig, s: DataPlaneConfig) -> (Result<Vec<u8>>, Result<Vec<u8>>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let r = server(&mut b, &s).await;
            drop(b); // on failure: hang up without a word
            r
        });
        let client = client(&mut a, &c).await;
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn matching_keys_authenticate_both_ids() {
        let (c, s) = run(cfg(1, b"alice"), cfg(1, b"bob")).await;
        assert_eq!(c.unwrap(), b"bob");
        assert_eq!(s.unwrap(), b"alice");
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_sides() {
        let (c, s) = run(cfg(1, b"alice"), cfg(2, b"bob")).await;
        assert!(matches!(c, Err(DataPlaneError::Unauthorized(_))), "{c:?}");
        assert!(matches!(s, Err(DataPlaneError::Unauthorized(_))), "{s:?}");
    }

    #[tokio::test]
    async fn allow_lists_are_enforced_by_either_side() {
        let mut s = cfg(1, b"bob");
        s.allow_list = vec![b"carol".to_vec()];
        let (c, s) = run(cfg(1, b"alice"), s).await;
        assert!(matches!(c, Err(DataPlaneError::Unauthorized(_))));
        assert!(matches!(s, Err(DataPlaneError::Unauthorized(_))));

        let mut c = cfg(1, b"alice");
        c.allow_list = vec![b"carol".to_vec()];
        let (c, _) = run(c, cfg(1, b"bob")).await;
        assert!(matches!(c, Err(DataPlaneError::Unauthorized(_))));

        let mut s = cfg(1, b"bob");
        s.allow_list = vec![b"carol".to_vec(), b"alice".to_vec()];
        let (c, s) = run(cfg(1, b"alice"), s).await;
        assert!(c.is_ok() && s.is_ok());
    }

    #[tokio::test]
    async fn garbage_and_silence_fail_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[0u8; 200]).await.unwrap();
        let s = server(&mut b, &cfg(1, b"bob")).await;
        assert!(matches!(s, Err(DataPlaneError::Handshake(_))), "{s:?}");

        let mut quick = cfg(1, b"bob");
        quick.limits.handshake_timeout = Duration::from_millis(50);
        let (_a, mut b) = tokio::io::duplex(4096);
        let s = server(&mut b, &quick).await;
        assert!(matches!(s, Err(DataPlaneError::Timeout(_))), "{s:?}");

        let long = cfg(1, &[7u8; 65]);
        let (mut a, _b) = tokio::io::duplex(4096);
        assert!(client(&mut a, &long).await.is_err());
    }
}
