//! A registry token-auth front for tests: the registry token flow in front of a real
//! (anonymous) registry, built on [`crate::fault_relay`].
//!
//! `/v2/...` requests without a valid token get 401 with
//! `WWW-Authenticate: Bearer realm="http://ADDR/token",service="imgd-test",scope=...`;
//! `GET /token?scope=...&service=...` issues a fresh token (`{"token": ..}`) that expires
//! after `max_uses` requests, so a pull outlives its first token. Valid requests are
//! forwarded to the registry.

use crate::fault_relay::{Fault, FaultRelay, Gate, SeenRequest};
use anyhow::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Tokens issued and their remaining uses.
#[derive(Default)]
struct Tokens {
    left: Mutex<HashMap<String, usize>>,
    issued: AtomicUsize,
    refused: AtomicUsize,
}

/// The running front; stops when dropped.
pub struct TokenAuth {
    relay: FaultRelay,
    tokens: Arc<Tokens>,
}

impl TokenAuth {
    /// Starts a front for the registry at `target` (`127.0.0.1:PORT`) whose tokens are good
    /// for `max_uses` requests each.
    pub fn start(target: &str, max_uses: usize) -> Result<TokenAuth> {
        let tokens = Arc::new(Tokens::default());
        // The realm names the front's own address, taken from each request's Host header.
        let t = tokens.clone();
        let gate: Gate = Arc::new(move |req: &SeenRequest| gate(&t, max_uses, req));
        let relay = FaultRelay::start_gated(target, Some(gate))?;
        Ok(TokenAuth { relay, tokens })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.relay.url()
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.tokens.issued.load(Ordering::Relaxed)
    }

    /// Registry requests refused for a missing or expired token.
    pub fn refused(&self) -> usize {
        self.tokens.refused.load(Ordering::Relaxed)
    }

    /// The relay underneath, e.g. to count requests.
    pub fn relay(&self) -> &FaultRelay {
        &self.relay
    }
}

fn respond(status: u16, headers: Vec<(String, String)>, body: &[u8]) -> Option<Fault> {
    Some(Fault::Respond {
        status,
        headers,
        body: body.to_vec(),
    })
}

fn gate(tokens: &Tokens, max_uses: usize, req: &SeenRequest) -> Option<Fault> {
    let host = req.header("host").unwrap_or("127.0.0.1");
    if req.path.starts_with("/token") {
        let n = tokens.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let token = format!("imgd-test-token-{n}");
        if let Ok(mut left) = tokens.left.lock() {
            left.insert(token.clone(), max_uses);
        }
        let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
        let json = vec![("Content-Type".into(), "application/json".into())];
        return respond(200, json, body.as_bytes());
    }
    let sent = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = sent.is_some_and(|t| {
        let Ok(mut left) = tokens.left.lock() else {
            return false;
        };
        match left.get_mut(t) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    });
    if valid {
        return None;
    }
    tokens.refused.fetch_add(1, Ordering::Relaxed);
    let repo = req
        .path
        .strip_prefix("/v2/")
        .and_then(|p| p.split("/manifests/").next())
        .and_then(|p| p.split("/blobs/").next())
        .unwrap_or("");
    let mut challenge = format!(r#"Bearer realm="http://{host}/token",service="imgd-test""#);
    if !repo.is_empty() {
        challenge.push_str(&format!(r#",scope="repository:{repo}:pull""#));
    }
    let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"token missing or expired"}]}"#;
    respond(
        401,
        vec![
            ("WWW-Authenticate".into(), challenge),
            ("Content-Type".into(), "application/json".into()),
        ],
        body,
    )
}
