//! imgd test fixtures: the pieces end-to-end tests are built from.
//!
//! - [`process`]: child processes that die with the test ([`process::ChildGuard`]), free
//!   ports and waiting for an HTTP server to answer.
//! - [`registry`]: a real upstream registry (Debian's `docker-registry`, distribution 2.8)
//!   in a temporary directory, optionally behind basic auth.
//! - [`image`]: OCI images built on the spot, deterministically from specs and seeds, written
//!   as OCI image layouts.
//! - [`skopeo`]: pushing layouts to a registry and reading manifests back with `skopeo`.
//! - [`registry_client`]: minimal blocking HTTP helpers to poke at a registry directly.
//! - [`pull`]: pulling an image over `/v2/` and verifying every manifest, blob and diff_id.
//! - [`debian_image`]: a real-world image (Debian, python3, numpy, scipy) built once by
//!   debootstrap and apt, cached on disk, for benchmarks.
//! - [`umoci`]: unpacking layouts with `umoci`, a reference for layer application.
//! - [`media_types`]: the OCI and Docker media type strings.
//! - [`containerd`], [`podman`]: private instances of the container engines; [`cri`]: a
//!   CRI client for containerd's CRI plugin.
//! - [`fault_relay`]: a fault-injecting, request-recording relay (and static server).
//! - [`token_auth`]: a registry token-auth front with expiring tokens.
//! - [`lan_setup`]: a registry with a big image, a LAN of namespace hosts and a proxy on it.
//! - [`scrape`]: a daemon's `/metrics` read into samples.
//! - [`zoned_lan`]: a fleet in several routed subnets (zones), bootstrap peers only, with
//!   the proxy's egress into each subnet counted by the kernel.

pub mod containerd;
pub mod cri;
pub mod daemons;
pub mod debian_image;
pub mod evil_peer;
pub mod fault_relay;
pub mod guards;
pub mod image;
pub mod lan_setup;
pub mod media_types;
pub mod netns;
pub mod podman;
pub mod process;
pub mod pull;
pub mod registry;
pub mod registry_client;
pub mod scrape;
pub mod skopeo;
pub mod token_auth;
pub mod umoci;
pub mod zoned_lan;
