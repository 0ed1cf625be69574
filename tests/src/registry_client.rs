//! Minimal blocking HTTP helpers for poking at a registry from tests (plain http only).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use imgd_core::Digest;

use crate::media_types;

/// A complete HTTP response: status, headers (lower-case names, in order) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The HTTP status code.
    pub status: u16,
    /// Header names (lower case) and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body; empty for HEAD.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }

    /// The body decoded as JSON into `T`; a non-2xx status is an error naming the body.
    pub fn json_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        if !(200..300).contains(&self.status) {
            bail!("HTTP {}: {}", self.status, self.text());
        }
        serde_json::from_slice(&self.body).context("decoding JSON body")
    }

    /// The body as (lossy) UTF-8, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Overall time limit of one request (blobs can be large).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

fn collect(mut resp: ureq::http::Response<ureq::Body>, read_body: bool) -> Result<HttpResponse> {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = if read_body {
        resp.body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .context("reading response body")?
    } else {
        Vec::new()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    let is_head = method == "HEAD";
    let mut req = if is_head {
        agent.head(url)
    } else {
        agent.get(url)
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.call().with_context(|| format!("{method} {url}"))?;
    collect(resp, !is_head).with_context(|| format!("{method} {url}"))
}

/// `GET url` with extra `headers`; any HTTP status is a success.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    get_with_timeout(url, headers, REQUEST_TIMEOUT)
}

/// [`get`] giving up after `timeout` (connect, send and receive together).
pub fn get_with_timeout(
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpResponse> {
    request(&agent(timeout), "GET", url, headers)
}

/// `HEAD url` with extra `headers`; any HTTP status is a success.
pub fn head(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    request(&agent(REQUEST_TIMEOUT), "HEAD", url, headers)
}

/// The value of an `Authorization` header for HTTP basic auth.
pub fn basic_auth(user: &str, pass: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {token}")
}

/// A registry's `/v2/` API at `base_url` (e.g. `http://127.0.0.1:5000`), optionally with
/// basic-auth credentials sent on every request.
#[derive(Clone)]
pub struct RegistryClient {
    base_url: String,
    authorization: Option<String>,
    agent: ureq::Agent,
}

impl RegistryClient {
    /// A client for the registry at `base_url` (no trailing slash needed).
    pub fn new(base_url: impl Into<String>) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        RegistryClient {
            base_url,
            authorization: None,
            agent: agent(REQUEST_TIMEOUT),
        }
    }

    /// The same client, sending basic-auth credentials.
    pub fn with_basic_auth(mut self, user: &str, pass: &str) -> Self {
        self.authorization = Some(basic_auth(user, pass));
        self
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        let url = format!("{}{path}", self.base_url);
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &self.authorization {
            all.push(("Authorization", auth));
        }
        request(&self.agent, method, &url, &all)
    }

    /// `GET {base_url}{path}`; `path` starts with `/`.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        self.send("GET", path, headers)
    }

    /// `HEAD {base_url}{path}`; `path` starts with `/`.
    pub fn head(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        self.send("HEAD", path, headers)
    }

    /// `GET /v2/<repo>/manifests/<reference>` with `Accept: accept...`; an empty `accept`
    /// sends all of [`media_types::ALL_MANIFESTS`].
    pub fn manifest(&self, repo: &str, reference: &str, accept: &[&str]) -> Result<HttpResponse> {
        let accept = if accept.is_empty() {
            media_types::ALL_MANIFESTS.join(", ")
        } else {
            accept.join(", ")
        };
        self.get(
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", &accept)],
        )
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`.
    pub fn head_blob(&self, repo: &str, digest: &Digest) -> Result<HttpResponse> {
        self.head(&format!("/v2/{repo}/blobs/{digest}"), &[])
    }

    /// `GET /v2/<repo>/blobs/<digest>`.
    pub fn blob(&self, repo: &str, digest: &Digest) -> Result<HttpResponse> {
        self.get(&format!("/v2/{repo}/blobs/{digest}"), &[])
    }

    /// Fetches a blob, failing unless the status is 200 and its sha256 equals `digest`.
    pub fn blob_verified(&self, repo: &str, digest: &Digest) -> Result<Vec<u8>> {
        let resp = self.blob(repo, digest)?;
        if resp.status != 200 {
            bail!(
                "GET blob {digest} in {repo}: status {}: {}",
                resp.status,
                resp.text()
            );
        }
        let got = Digest::of(&resp.body);
        if got != *digest {
            bail!("blob {digest} in {repo} has content digest {got}");
        }
        Ok(resp.body)
    }
}
