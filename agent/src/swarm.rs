//! Discovery and membership on libp2p: a private network (TCP, then libp2p `pnet` with a
//! key derived from the swarm key, then noise and yamux), mDNS on the LAN, Kademlia with
//! bootstrap peers for wider networks, and identify, which carries each agent's chunk
//! data-plane port and zone (`imgd/VERSION dp=PORT [zone=ZONE]` as agent version).
//!
//! **Provider records.** A host announces a blob (`start_providing`) when it starts
//! fetching it and keeps the record while it holds it; records live
//! [`PROVIDER_TTL`] and are republished every [`PROVIDER_REPUBLISH`], so a withdrawn one
//! ([`SwarmCommand::StopProviding`], on eviction) is gone from the network within the
//! TTL. A fetching host finds the blob's other hosts with `get_providers`
//! ([`SwarmCommand::FindProviders`]); found providers go into the [`PeerSet`] and are
//! dialled, so identify tells their data-plane address and zone.
//!
//! **Admission.** `pnet` encrypts every byte of a connection, from its first, with the
//! pre-shared key, so a host without the swarm key cannot finish any handshake: it never
//! reaches Kademlia or identify, and so never enters a member's routing table (Kademlia
//! inserts only peers that connected). mDNS announcements are not authenticated, so a
//! peer found by mDNS is only dialled, never added to the routing table before it has
//! connected. (QUIC would be faster, but `pnet` works over TCP only; libp2p carries no
//! chunk bytes, so its speed does not matter.) See `docs/security.md`.
//!
//! libp2p carries no chunk bytes and no chunk lists: those flow over the data plane, which
//! authenticates every connection with the swarm key. Kademlia provider records are keyed
//! by HMAC(swarm key, blob digest), so a node outside the swarm cannot tell which blobs a
//! member holds. Peers outside a non-empty allow-list are disconnected at once.

use crate::fresh_port_tcp::FreshPortTcp;
use crate::peers::PeerSet;
use futures::StreamExt;
use hmac::{KeyInit, Mac};
use imgd_core::Digest;
use libp2p::core::upgrade::Version;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity, kad, mdns, noise, tcp, yamux, Multiaddr, PeerId, Transport};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const PROTOCOL: &str = "/imgd/1.0.0";

/// How long a provider record lives on the nodes that store it.
pub const PROVIDER_TTL: Duration = Duration::from_secs(600);
/// How often a host republishes the provider records of the blobs it holds.
pub const PROVIDER_REPUBLISH: Duration = Duration::from_secs(300);

/// Errors starting the swarm.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("libp2p: {0}")]
    Libp2p(String),
    #[error("bad multiaddr {0:?}: {1}")]
    Addr(String, String),
}

/// Commands to the running swarm.
#[derive(Debug)]
pub enum SwarmCommand {
    /// Announce that this agent fetches or holds the blob.
    Provide(Digest),
    /// Withdraw that announcement (the blob was evicted): no more republishing, and the
    /// records elsewhere expire within [`PROVIDER_TTL`].
    StopProviding(Digest),
    /// Look for providers of a blob (found peers go into the peer set as the blob's
    /// providers and are dialled; the lookup's end is recorded there too).
    FindProviders(Digest),
}

/// Settings of the discovery layer.
pub struct SwarmSettings {
    pub keypair: identity::Keypair,
    /// The libp2p listen address (TCP).
    pub listen: SocketAddr,
    pub data_port: u16,
    pub swarm_key: [u8; 32],
    pub allow_list: Vec<String>,
    pub bootstrap: Vec<String>,
    pub mdns: bool,
    /// This host's zone label, told to peers through identify.
    pub zone: Option<String>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    mdns: libp2p::swarm::behaviour::toggle::Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
}

/// The Kademlia key under which providers of `blob` are announced.
pub fn provider_key(swarm_key: &[u8; 32], blob: &Digest) -> kad::RecordKey {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(swarm_key)
        .expect("HMAC takes any key length");
    mac.update(b"imgd-provider-v1");
    mac.update(blob.as_bytes());
    kad::RecordKey::new(&mac.finalize().into_bytes().as_slice())
}

/// The key of the libp2p private network: derived from the swarm key, so no two
/// protocols share one key.
fn pnet_key(swarm_key: &[u8; 32]) -> PreSharedKey {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(swarm_key)
        .expect("HMAC takes any key length");
    mac.update(b"imgd-pnet-v1");
    PreSharedKey::new(mac.finalize().into_bytes().into())
}

fn tcp_addr(a: SocketAddr) -> Multiaddr {
    let ip = match a.ip() {
        IpAddr::V4(ip) => format!("/ip4/{ip}"),
        IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    format!("{ip}/tcp/{}", a.port())
        .parse()
        .unwrap_or_else(|_| Multiaddr::empty())
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn data_port(agent_version: &str) -> Option<u16> {
    agent_version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dp=")?.parse().ok())
}

/// How often peers announced by mDNS but not connected are dialled again.
const REDIAL_EVERY: Duration = Duration::from_secs(3);

/// A dial of an mDNS-announced peer: skipped while connected or already dialling.
fn announced_dial(peer: PeerId, addrs: &[Multiaddr]) -> DialOpts {
    DialOpts::peer_id(peer)
        .condition(PeerCondition::DisconnectedAndNotDialing)
        .addresses(addrs.to_vec())
        .build()
}

fn zone_of(agent_version: &str) -> Option<&str> {
    agent_version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("zone="))
}

/// Starts the swarm in a background task; returns the local peer id and a command sender.
pub fn start(
    settings: SwarmSettings,
    peers: Arc<PeerSet>,
) -> Result<(PeerId, mpsc::Sender<SwarmCommand>), SwarmError> {
    let e = |x: &dyn std::fmt::Display| SwarmError::Libp2p(x.to_string());
    let local_id = settings.keypair.public().to_peer_id();
    let mut agent_version = format!(
        "imgd/{} dp={}",
        env!("CARGO_PKG_VERSION"),
        settings.data_port
    );
    if let Some(zone) = &settings.zone {
        agent_version.push_str(&format!(" zone={zone}"));
    }
    let mdns_on = settings.mdns;
    let psk = pnet_key(&settings.swarm_key);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(settings.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                FreshPortTcp(tcp::tokio::Transport::new(
                    tcp::Config::default().nodelay(true),
                ))
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(Duration::from_secs(10)),
            )
        })
        .map_err(|x| e(&x))?
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), id)?)
            } else {
                None
            };
            let mut kad_cfg = kad::Config::new(libp2p::StreamProtocol::new("/imgd/kad/1.0.0"));
            kad_cfg.set_query_timeout(Duration::from_secs(10));
            kad_cfg.set_provider_record_ttl(Some(PROVIDER_TTL));
            kad_cfg.set_provider_publication_interval(Some(PROVIDER_REPUBLISH));
            let mut kad =
                kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kad_cfg);
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(PROTOCOL.into(), key.public())
                    .with_agent_version(agent_version.clone()),
            );
            Ok(Behaviour {
                mdns: mdns.into(),
                kad,
                identify,
            })
        })
        .map_err(|x| e(&x))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm
        .listen_on(tcp_addr(settings.listen))
        .map_err(|x| e(&x))?;
    for b in &settings.bootstrap {
        let addr: Multiaddr = b
            .parse()
            .map_err(|x: libp2p::multiaddr::Error| SwarmError::Addr(b.clone(), x.to_string()))?;
        let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(SwarmError::Addr(
                b.clone(),
                "must end with /p2p/PEER_ID".into(),
            ));
        };
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        let _ = swarm.dial(addr);
    }
    let (tx, mut rx) = mpsc::channel(256);
    let allow: HashSet<String> = settings.allow_list.into_iter().collect();
    let key = settings.swarm_key;
    tokio::spawn(async move {
        // Remote IP of each connected peer, to pair with the port identify reports.
        let mut remote_ip: HashMap<PeerId, IpAddr> = HashMap::new();
        // Peers mDNS announced and has not expired: redialled while not connected, since
        // mDNS reports a peer only once and a first dial can fail.
        let mut announced: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        let mut redial_tick = tokio::time::interval(REDIAL_EVERY);
        let mut bootstrap_tick = tokio::time::interval(Duration::from_secs(30));
        // How often the routing table is copied out for status and metrics.
        let mut table_tick = tokio::time::interval(Duration::from_millis(500));
        // The blob each running provider lookup is for.
        let mut lookups: HashMap<kad::QueryId, Digest> = HashMap::new();
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(SwarmCommand::Provide(blob)) => {
                        let _ = swarm.behaviour_mut().kad.start_providing(provider_key(&key, &blob));
                    }
                    Some(SwarmCommand::StopProviding(blob)) => {
                        swarm.behaviour_mut().kad.stop_providing(&provider_key(&key, &blob));
                    }
                    Some(SwarmCommand::FindProviders(blob)) => {
                        let id = swarm.behaviour_mut().kad.get_providers(provider_key(&key, &blob));
                        lookups.insert(id, blob);
                    }
                },
                _ = bootstrap_tick.tick() => {
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
                _ = redial_tick.tick() => {
                    for (peer, addrs) in &announced {
                        if !swarm.is_connected(peer) {
                            tracing::debug!(%peer, "redialling an announced peer");
                            let _ = swarm.dial(announced_dial(*peer, addrs));
                        }
                    }
                }
                _ = table_tick.tick() => {
                    let table = swarm
                        .behaviour_mut()
                        .kad
                        .kbuckets()
                        .flat_map(|b| b.iter().map(|e| e.node.key.preimage().to_string()).collect::<Vec<_>>())
                        .collect();
                    peers.set_routing_table(table);
                }
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                        if !allow.is_empty() && !allow.contains(&peer_id.to_string()) {
                            tracing::warn!(%peer_id, "peer not on the allow-list, disconnecting");
                            let _ = swarm.disconnect_peer_id(peer_id);
                            continue;
                        }
                        if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                            remote_ip.insert(peer_id, ip);
                        }
                    }
                    SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                        remote_ip.remove(&peer_id);
                        peers.remove(&peer_id.to_string());
                        tracing::info!(%peer_id, "peer left");
                    }
                    SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                        // A host without the swarm key fails here (the pnet handshake).
                        tracing::info!(?peer_id, %error, "swarm connection failed");
                    }
                    SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                        tracing::info!(from = %send_back_addr, %error, "swarm connection refused");
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                        // Unauthenticated announcements: dial, and let Kademlia add the
                        // peer only once it connected (which proves the swarm key).
                        for (peer, addr) in found {
                            if peer == local_id {
                                continue;
                            }
                            let addrs = announced.entry(peer).or_default();
                            if !addrs.contains(&addr) {
                                addrs.push(addr);
                            }
                            if !swarm.is_connected(&peer) {
                                let _ = swarm.dial(announced_dial(peer, addrs));
                            }
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                        for (peer, addr) in gone {
                            if let Some(addrs) = announced.get_mut(&peer) {
                                addrs.retain(|a| a != &addr);
                                if addrs.is_empty() {
                                    announced.remove(&peer);
                                }
                            }
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                        if info.protocol_version != PROTOCOL {
                            continue;
                        }
                        for a in &info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                        }
                        match (remote_ip.get(&peer_id), data_port(&info.agent_version)) {
                            (Some(ip), Some(port)) => {
                                let addr = SocketAddr::new(*ip, port);
                                tracing::info!(%peer_id, data = %addr, zone = zone_of(&info.agent_version), "peer joined");
                                let zone = zone_of(&info.agent_version);
                                peers.upsert(&peer_id.to_string(), addr, zone);
                            }
                            _ => tracing::debug!(%peer_id, agent = info.agent_version, "peer without data plane"),
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                        id, result: kad::QueryResult::GetProviders(result), step, ..
                    })) => {
                        let Some(blob) = lookups.get(&id).copied() else { continue };
                        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                            let others: Vec<PeerId> = providers.into_iter().filter(|p| *p != local_id).collect();
                            for p in &others {
                                if !swarm.is_connected(p) {
                                    let _ = swarm.dial(*p);
                                }
                            }
                            peers.add_providers(&blob, others.iter().map(|p| p.to_string()));
                        }
                        if step.last {
                            lookups.remove(&id);
                            peers.lookup_done(&blob);
                        }
                    }
                    SwarmEvent::NewListenAddr { address, .. } => {
                        crate::metrics::swarm_listening();
                        tracing::info!(%address, "swarm listening")
                    }
                    _ => {}
                },
            }
        }
    });
    Ok((local_id, tx))
}
