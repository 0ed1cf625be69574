//! Trust boundaries of imgd-proxy: the chunk API token, and per-repository authorization
//! of cached content (a blob cached for one repository is not served for another that
//! upstream does not let see it).

use imgd_core::Digest;
use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::FaultRelay;
use imgd_tests::image::{self, presets};
use imgd_tests::registry::Registry;
use imgd_tests::registry_client::{self, HttpResponse};
use imgd_tests::skopeo::{self, Format};
use std::path::Path;
use std::process::Command;

const TOKEN: &str = "chunk-api-token-0123456789";

fn start_proxy(dir: &Path, config_text: &str) -> Proxy {
    Proxy::start_with_config(dir, config_text).unwrap()
}

/// `curl -X PUT` of an empty startup trace; returns the status.
fn put_trace(proxy: &Proxy, manifest: &Digest, auth: Option<&str>) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args([
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"paths":[]}"#,
        ]);
    if let Some(a) = auth {
        cmd.args(["-H", &format!("authorization: {a}")]);
    }
    let out = cmd
        .arg(format!("{}/imgd/v1/traces/{manifest}", proxy.url()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

fn agent(dir: &Path, proxy: &Proxy, extra_toml: String) -> Agent {
    Agent::start(AgentOptions {
        extra_toml,
        ..AgentOptions::local(proxy.url(), dir)
    })
    .unwrap()
}

#[test]
fn the_chunk_api_requires_its_token_and_the_agent_sends_it() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let spec = presets::small_multi_layer();
    let (img, _) = skopeo::push_image(&reg, &tmp.path().join("img"), spec, "app:1").unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let proxy = start_proxy(
        tmp.path(),
        &format!(
            "[chunk_api]\ntoken_file = {:?}\n[[upstream]]\nname = \"local\"\nurl = \"{}\"\n",
            token_file,
            reg.url()
        ),
    );
    let layer = img.layers[0].blob.digest;
    let right = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");
    let routes = [
        format!("/imgd/v1/blobs/{layer}?repo=local/app"),
        format!("/imgd/v1/indexes/{layer}?repo=local/app"),
        format!("/imgd/v1/indexes/{layer}/windows?repo=local/app"),
        format!("/imgd/v1/chunks/{layer}"),
        format!("/imgd/v1/traces/{}", img.manifest.digest),
        "/imgd/v1/verify".to_string(),
    ];
    for path in &routes {
        for auth in [None, Some(wrong.as_str()), Some("Basic Zm9vOmJhcg==")] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let r = proxy.get(path, &headers).unwrap();
            assert_eq!(r.status, 401, "{path} with {auth:?}: {}", r.text());
            assert!(r
                .header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer")));
        }
    }
    assert_eq!(put_trace(&proxy, &img.manifest.digest, None), 401);
    assert_eq!(put_trace(&proxy, &img.manifest.digest, Some(&wrong)), 401);
    assert_eq!(
        proxy.stats().unwrap().upstream_blob_fetches,
        0,
        "nothing fetched unauthorized"
    );
    // The registry API and the counters stay open.
    let r = proxy.get("/v2/local/app/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    let without = agent(&tmp.path().join("a1"), &proxy, String::new());
    let (ok, _, err) = without.imgctl(&["prefetch", "local/app:1"]).unwrap();
    assert!(!ok, "an agent without the token is refused");
    assert!(err.contains("401"), "{err}");
    drop(without);

    let extra = format!("proxy_token_file = {token_file:?}\n");
    let with = agent(&tmp.path().join("a2"), &proxy, extra);
    let (ok, out, err) = with.imgctl(&["prefetch", "local/app:1"]).unwrap();
    assert!(ok, "{out}{err}\n{}", with.log());
    let (ok, out, err) = with.imgctl(&["verify"]).unwrap();
    assert!(ok, "{out}{err}");

    let r: HttpResponse = proxy
        .get(
            &format!("/imgd/v1/blobs/{layer}"),
            &[("Authorization", &right)],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let chunk = r.json().unwrap()["chunks"]["chunks"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let r = proxy
        .get(
            &format!("/imgd/v1/chunks/{chunk}"),
            &[("Authorization", &right)],
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(Digest::of(&r.body).to_string(), chunk);
    assert_eq!(put_trace(&proxy, &img.manifest.digest, Some(&right)), 204);
}

#[test]
fn a_cached_blob_is_served_only_for_repositories_upstream_lets_see_it() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start_with_htpasswd("imgd", "s3cret").unwrap();
    let layout =
        image::build_layout(&tmp.path().join("small"), &[presets::small_multi_layer()]).unwrap();
    for repo in ["app:1", "other:1"] {
        skopeo::push_layout_with(
            &layout.dir,
            "small",
            &reg.docker_ref(repo),
            Format::OciExact,
            false,
            &["--dest-creds", "imgd:s3cret"],
        )
        .unwrap();
    }
    let img = layout.image("small").unwrap();
    let relay = FaultRelay::start(reg.addr()).unwrap();
    let proxy = start_proxy(
        tmp.path(),
        &format!(
            "[[upstream]]\nname = \"auth\"\nurl = \"{0}\"\nusername = \"imgd\"\npassword = \"s3cret\"\n\
             [[upstream]]\nname = \"anon\"\nurl = \"{0}\"\n",
            relay.url()
        ),
    );
    let layer = img.layers[0].blob.digest;
    let blob = |repo: &str| {
        proxy
            .get(&format!("/v2/{repo}/blobs/{layer}"), &[])
            .unwrap()
    };
    let upstream_gets = || relay.count("GET", &format!("/blobs/{layer}"));

    let r = blob("auth/app");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(Digest::of(&r.body), layer);
    assert_eq!(upstream_gets(), 1);

    // Cached, but these routes cannot see it upstream: the upstream's answer, no bytes.
    let r = blob("anon/app");
    assert_eq!(
        r.status,
        401,
        "no credentials for this upstream: {}",
        r.text()
    );
    assert!(relay.count("HEAD", &format!("/v2/app/blobs/{layer}")) >= 1);
    let r = blob("auth/nothere");
    assert_eq!(r.status, 404, "a repository without the blob: {}", r.text());
    let r = proxy
        .get(&format!("/imgd/v1/blobs/{layer}?repo=anon/app"), &[])
        .unwrap();
    assert_eq!(r.status, 401, "the chunk API asks too: {}", r.text());

    // A repository that holds the blob: confirmed once, then served from cache.
    let r = blob("auth/other");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(Digest::of(&r.body), layer);
    assert_eq!(relay.count("HEAD", &format!("/v2/other/blobs/{layer}")), 1);
    let r = blob("auth/other");
    assert_eq!(r.status, 200);
    assert_eq!(
        relay.count("HEAD", &format!("/v2/other/blobs/{layer}")),
        1,
        "on record"
    );
    assert_eq!(upstream_gets(), 1, "never fetched twice");

    // Manifests cached by digest are checked the same way.
    let by_digest = |repo: &str| {
        let path = format!("/v2/{repo}/manifests/{}", img.manifest.digest);
        proxy.get(&path, &[]).unwrap()
    };
    assert_eq!(by_digest("auth/app").status, 200);
    assert_eq!(by_digest("anon/app").status, 401);
    assert_eq!(by_digest("auth/nothere").status, 404);
    let r = by_digest("auth/other");
    assert_eq!(r.status, 200);
    assert_eq!(Digest::of(&r.body), img.manifest.digest);
    let direct = registry_client::get(&format!("{}/v2/app/manifests/1", relay.url()), &[]).unwrap();
    assert_eq!(direct.status, 401, "the upstream really is protected");
}
