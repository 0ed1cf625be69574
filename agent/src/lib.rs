//! imgd agent: the node daemon next to the container engine.
//!
//! - [`cache`]: the verified chunk cache (files + RocksDB) with quota and pins.
//! - [`dataplane`]: the authenticated TCP protocol peers exchange chunks over.
//! - [`swarm`]: discovery and membership on libp2p (a TCP private network under the swarm key, mDNS, Kademlia, identify).
//! - [`peers`]: known peers, their zones, round trips and penalties, and each blob's
//!   providers; [`holders`]: the few of them a fetch asks, found by provider records, with
//!   pushed have-maps; [`control_counts`]: the control requests that costs.
//! - [`fetch`]: the fetch policy: cache, then peers, then the proxy; [`chunk_state`]: a
//!   chunk's life there (absent, in flight, present, evicted) as a state machine.
//! - [`pieces`]: partial chunks: the verified 64 KiB pieces lazy reads fetch.
//! - [`proxy_client`], [`image`]: talking to imgd-proxy and resolving images.
//! - [`snapshotter`]: the containerd proxy snapshotter serving lazy mounts to containers.
//! - [`mounts`]: lazy mounts, each served by its own [`mount_process`] (`imgd-mount`),
//!   which outlives the agent.
//! - [`api`]: the local API for `imgctl`; [`mirror`]: the registry mirror endpoint,
//!   which also serves [`metrics`], `/healthz` and `/readyz`.

pub mod agent;
pub mod api;
pub mod cache;
pub mod chunk_source;
pub mod chunk_state;
pub mod config;
pub mod control_counts;
pub mod dataplane;
pub mod engine_config;
pub mod error;
pub mod fetch;
pub mod fresh_port_tcp;
pub mod holders;
pub mod identity;
pub mod image;
pub mod layer_indexes;
pub mod layer_parts;
pub mod metrics;
pub mod metrics_page;
pub mod mirror;
pub mod mount_process;
pub mod mounts;
pub mod peers;
pub mod pieces;
pub mod proxy_client;
pub mod proxy_replicas;
pub mod snapshotter;
pub mod startup;
pub mod swarm;
pub mod unix_http;
pub mod window_share;

/// Code generated from `proto/` (containerd's API).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}
