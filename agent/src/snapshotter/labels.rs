//! The snapshot labels that tell a layer's image and digest, and what imgd adds.
//!
//! containerd passes a layer's annotations to `Prepare` as labels when its puller adds
//! them: CRI (`disable_snapshot_annotations = false`) sets `cri.*`, `ctr-remote images
//! rpull` sets `remote/stargz.*`. Plain `ctr pull` sets neither, and such layers take the
//! ordinary overlayfs path.

use imgd_core::Digest;
use std::collections::{BTreeMap, HashMap};

/// The committed name containerd wants for the layer being extracted (its chain id).
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// Marks a committed placeholder whose contents imgd serves lazily (value: the layer).
pub const REMOTE: &str = "containerd.io/snapshot/imgd.remote-layer";

const CRI_IMAGE: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
const STARGZ_IMAGE: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_LAYER: &str = "containerd.io/snapshot/remote/stargz.digest";

/// An extract snapshot of a layer whose image is known: a candidate for a placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRequest {
    /// The committed name to create (`containerd.io/snapshot.ref`).
    pub target: String,
    pub layer: Digest,
    /// The image reference as containerd knows it.
    pub image: String,
}

/// The layer request the labels describe: `None` when they name no image layer (an
/// ordinary snapshot), an error when they name one badly.
pub fn layer_request(labels: &HashMap<String, String>) -> Option<Result<LayerRequest, String>> {
    let target = labels.get(TARGET)?;
    let (image, layer) = [(CRI_IMAGE, CRI_LAYER), (STARGZ_IMAGE, STARGZ_LAYER)]
        .iter()
        .find_map(|(i, l)| Some((labels.get(*i)?, labels.get(*l)?)))?;
    Some(
        layer
            .parse::<Digest>()
            .map(|layer| LayerRequest {
                target: target.clone(),
                layer,
                image: image.clone(),
            })
            .map_err(|e| format!("layer digest label {layer:?}: {e}")),
    )
}

/// How the proxy routes an image reference: repository name and containerd's `ns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRoute {
    pub name: String,
    pub ns: Option<String>,
}

/// Splits a containerd image reference (`host[:port]/path[:tag][@digest]`, normalised by
/// containerd) into the proxy's route. A reference whose host is one of `local_hosts`
/// (the proxy's or this agent's mirror address) names the proxy's own repository;
/// any other host is passed as `ns`, as containerd does through a mirror.
pub fn proxy_route(image: &str, local_hosts: &[String]) -> Result<ProxyRoute, String> {
    let bad = || format!("image reference {image:?} has no repository");
    let without_digest = image.split('@').next().unwrap_or(image);
    let (host, path) = match without_digest.split_once('/') {
        Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => (h, p),
        _ => ("docker.io", without_digest),
    };
    // A tag is a last ':' after the last '/'.
    let name = match path.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => path,
    };
    if name.is_empty() || name.contains("..") || name.starts_with('/') {
        return Err(bad());
    }
    let name = if host == "docker.io" && !name.contains('/') {
        format!("library/{name}")
    } else {
        name.to_string()
    };
    let is_local = local_hosts.iter().any(|l| same_host(l, host));
    Ok(ProxyRoute {
        name,
        ns: (!is_local).then(|| host.to_string()),
    })
}

/// `localhost:P` and `127.0.0.1:P` name the same listener.
fn same_host(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.replacen("localhost", "127.0.0.1", 1);
    norm(a) == norm(b)
}

/// The labels kept on a placeholder: what containerd passed, plus imgd's marker.
pub fn placeholder_labels(
    passed: &HashMap<String, String>,
    layer: &Digest,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> =
        passed.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(REMOTE.to_string(), layer.to_string());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_and_stargz_labels_name_a_layer_and_plain_ones_do_not() {
        let d = Digest::of(b"layer");
        let cri = labels(&[
            (TARGET, "sha256:chain"),
            (CRI_IMAGE, "127.0.0.1:5000/local/app:1"),
            (CRI_LAYER, &d.to_string()),
        ]);
        let want = LayerRequest {
            target: "sha256:chain".into(),
            layer: d,
            image: "127.0.0.1:5000/local/app:1".into(),
        };
        assert_eq!(layer_request(&cri), Some(Ok(want.clone())));
        let stargz = labels(&[
            (TARGET, "sha256:chain"),
            (STARGZ_IMAGE, "127.0.0.1:5000/local/app:1"),
            (STARGZ_LAYER, &d.to_string()),
        ]);
        assert_eq!(layer_request(&stargz), Some(Ok(want)));
        assert_eq!(layer_request(&labels(&[(TARGET, "sha256:chain")])), None);
        assert_eq!(layer_request(&labels(&[(CRI_LAYER, &d.to_string())])), None);
        let bad = labels(&[
            (TARGET, "t"),
            (CRI_IMAGE, "a/b:1"),
            (CRI_LAYER, "sha256:zz"),
        ]);
        assert!(matches!(layer_request(&bad), Some(Err(_))));
    }

    #[test]
    fn references_route_to_the_proxy_or_through_ns() {
        let local = vec!["127.0.0.1:5000".to_string()];
        let r = proxy_route("127.0.0.1:5000/local/app:1", &local).unwrap();
        assert_eq!((r.name.as_str(), r.ns), ("local/app", None));
        let r = proxy_route("localhost:5000/local/app@sha256:abc", &local).unwrap();
        assert_eq!((r.name.as_str(), r.ns), ("local/app", None));
        let r = proxy_route("docker.io/library/python:3.11", &local).unwrap();
        assert_eq!(
            (r.name.as_str(), r.ns.as_deref()),
            ("library/python", Some("docker.io"))
        );
        let r = proxy_route("busybox", &local).unwrap();
        assert_eq!(
            (r.name.as_str(), r.ns.as_deref()),
            ("library/busybox", Some("docker.io"))
        );
        let r = proxy_route("reg.example:8443/team/app", &local).unwrap();
        assert_eq!(
            (r.name.as_str(), r.ns.as_deref()),
            ("team/app", Some("reg.example:8443"))
        );
        assert!(proxy_route("127.0.0.1:5000/", &local).is_err());
    }
}
