//! The common start of a swarm test: a registry holding a big image, a LAN of hosts in
//! network namespaces, and a proxy on the LAN's gateway.

use crate::daemons::Proxy;
use crate::image::{presets, ImageInfo};
use crate::netns::Lan;
use crate::registry::Registry;
use anyhow::Result;
use std::path::Path;

/// A registry with `big:1`, a LAN, and a proxy whose upstream `local` is the registry, so
/// the hosts pull `local/big:1`. Fields drop in order: the proxy, the LAN, the registry.
pub struct LanSetup {
    /// The proxy, listening on the LAN's gateway.
    pub proxy: Proxy,
    pub lan: Lan,
    pub registry: Registry,
    /// The image `big:1` ([`presets::big_gzip`]).
    pub image: ImageInfo,
    /// Sum of the image's blob sizes.
    pub image_size: u64,
}

impl LanSetup {
    /// Pushes [`presets::big_gzip`]`(mib)` (built under `dir/big`) as `big:1`, makes a LAN
    /// of `hosts` hosts and starts the proxy on its gateway, storing under `dir/proxy`.
    pub fn start(dir: &Path, mib: u64, hosts: usize) -> Result<LanSetup> {
        let registry = Registry::start()?;
        let (image, image_size) = crate::skopeo::push_image(
            &registry,
            &dir.join("big"),
            presets::big_gzip(mib),
            "big:1",
        )?;
        let lan = Lan::new(hosts)?;
        let proxy = Proxy::start_on_lan(
            &lan,
            &dir.join("proxy"),
            &[format!("local={}", registry.url())],
        )?;
        Ok(LanSetup {
            proxy,
            lan,
            registry,
            image,
            image_size,
        })
    }
}
