//! A fault-injecting HTTP relay in front of a real server (e.g. the test registry).
//!
//! Requests are forwarded unchanged (one request per connection); responses whose path
//! matches a rule are altered: a replaced status and body (e.g. 429 with `Retry-After`, or
//! a 307 redirect), a body cut short while the `Content-Length` still promises all of it,
//! a body slowed down, or a body with a byte flipped. Every request is recorded (method, path, headers) so tests can
//! count attempts and check what was sent where. A [`Gate`] can answer requests before the
//! rules (the token-auth front of [`crate::token_auth`] is one). With rules that answer
//! every path, a relay is also a small static HTTP server (e.g. standing in for blob
//! storage). One harness for every fault test.

use crate::process::free_port;
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How to alter a matching response.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status, extra headers and body instead of forwarding.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Forward, but close the connection after this many body bytes.
    Truncate { after: usize },
    /// Forward, sending the body at about this many bytes per second.
    Throttle { bytes_per_sec: u64 },
    /// Forward, with the body's byte at this offset flipped (same length: wrong bytes
    /// only a digest check can tell).
    FlipByte { at: usize },
}

/// A request as the relay received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// Header names lowercased, values as sent.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The value of header `name` (lowercase), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers some requests itself (`Some(fault)`, normally [`Fault::Respond`]) before the
/// rules are consulted; `None` lets the request through.
pub type Gate = Arc<dyn Fn(&SeenRequest) -> Option<Fault> + Send + Sync>;

/// A rule: requests whose path contains `path_contains` get `fault`, up to `times` times
/// (`None`: always).
#[derive(Clone, Debug)]
pub struct Rule {
    pub path_contains: String,
    pub fault: Fault,
    pub times: Option<usize>,
}

/// What the relay's connection threads share.
#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<SeenRequest>>,
    gate: Option<Gate>,
}

/// The relay; stops accepting when dropped.
pub struct FaultRelay {
    port: u16,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

impl FaultRelay {
    /// Starts a relay on a free loopback port forwarding to `target` (`127.0.0.1:PORT`).
    pub fn start(target: &str) -> Result<FaultRelay> {
        FaultRelay::start_gated(target, None)
    }

    /// A relay whose `gate` sees every request first.
    pub fn start_gated(target: &str, gate: Option<Gate>) -> Result<FaultRelay> {
        let port = free_port()?;
        let listener = TcpListener::bind(("127.0.0.1", port)).context("binding fault relay")?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            gate,
            ..Shared::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (sh, s, n, target) = (
            shared.clone(),
            stop.clone(),
            requests.clone(),
            target.to_string(),
        );
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let (sh, target) = (sh.clone(), target.clone());
                        thread::spawn(move || {
                            let _ = relay(conn, &target, &sh);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(FaultRelay {
            port,
            shared,
            stop,
            requests,
        })
    }

    /// A static HTTP server: `GET path` answers 200 with the bytes, anything else 404.
    /// Requests are recorded like a relay's (e.g. a stand-in for blob storage).
    pub fn serve_static(files: &[(&str, Vec<u8>)]) -> Result<FaultRelay> {
        let unreachable = format!("127.0.0.1:{}", free_port()?);
        let server = FaultRelay::start(&unreachable)?;
        for (path, body) in files {
            let ok = Fault::Respond {
                status: 200,
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body: body.clone(),
            };
            server.add(path, ok, None);
        }
        let missing = Fault::Respond {
            status: 404,
            headers: vec![],
            body: b"not found".to_vec(),
        };
        server.add("/", missing, None);
        Ok(server)
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.shared
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Requests received so far with this method whose path contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.seen()
            .iter()
            .filter(|r| r.method == method && r.path.contains(path_contains))
            .count()
    }

    /// Adds a rule.
    pub fn add(&self, path_contains: &str, fault: Fault, times: Option<usize>) {
        if let Ok(mut rules) = self.shared.rules.lock() {
            rules.push(Rule {
                path_contains: path_contains.to_string(),
                fault,
                times,
            });
        }
    }

    /// Removes every rule.
    pub fn clear(&self) {
        if let Ok(mut rules) = self.shared.rules.lock() {
            rules.clear();
        }
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn take_rule(rules: &Mutex<Vec<Rule>>, path: &str) -> Option<Fault> {
    let mut rules = rules.lock().ok()?;
    let i = rules.iter().position(|r| path.contains(&r.path_contains))?;
    let fault = rules[i].fault.clone();
    if let Some(t) = rules[i].times.as_mut() {
        *t -= 1;
        if *t == 0 {
            rules.remove(i);
        }
    }
    Some(fault)
}

/// Reads an HTTP head (request or response) up to the blank line.
fn read_head(r: &mut impl BufRead) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            anyhow::bail!("connection closed in HTTP head");
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn parse_request(head: &[String]) -> SeenRequest {
    let mut first = head.first().map(|l| l.split(' ')).into_iter().flatten();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers = head
        .iter()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    SeenRequest {
        method,
        path,
        headers,
    }
}

fn relay(client: TcpStream, target: &str, shared: &Shared) -> Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut client_r = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    let head = read_head(&mut client_r)?;
    let request = parse_request(&head);
    if let Ok(mut seen) = shared.seen.lock() {
        seen.push(request.clone());
    }
    let fault = match shared.gate.as_ref().and_then(|g| g(&request)) {
        Some(f) => Some(f),
        None => take_rule(&shared.rules, &request.path),
    };
    if let Some(Fault::Respond {
        status,
        headers,
        body,
    }) = &fault
    {
        let mut out = format!(
            "HTTP/1.1 {status} Fault\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        client_w.write_all(out.as_bytes())?;
        client_w.write_all(body)?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(target)?;
    let mut req = String::new();
    for line in &head {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("host:") {
            continue;
        }
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Host: {target}\r\nConnection: close\r\n\r\n"));
    upstream.write_all(req.as_bytes())?;
    let mut up_r = BufReader::new(upstream);
    let resp_head = read_head(&mut up_r)?;
    let mut out = String::new();
    for line in &resp_head {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    client_w.write_all(out.as_bytes())?;
    match fault {
        Some(Fault::Truncate { after }) => {
            std::io::copy(&mut up_r.take(after as u64), &mut client_w)?;
        }
        Some(Fault::Throttle { bytes_per_sec }) => {
            throttled_copy(&mut up_r, &mut client_w, bytes_per_sec)?
        }
        Some(Fault::FlipByte { at }) => {
            let mut body = Vec::new();
            up_r.read_to_end(&mut body)?;
            if let Some(b) = body.get_mut(at) {
                *b ^= 0xff;
            }
            client_w.write_all(&body)?;
        }
        _ => {
            std::io::copy(&mut up_r, &mut client_w)?;
        }
    }
    client_w.flush()?;
    let _ = client_w.shutdown(Shutdown::Both);
    Ok(())
}

/// Copies at about `bytes_per_sec`, in pieces of a tenth of a second.
fn throttled_copy(from: &mut impl Read, to: &mut impl Write, bytes_per_sec: u64) -> Result<()> {
    let mut buf = vec![0u8; (bytes_per_sec / 10).clamp(1, 1 << 20) as usize];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
        thread::sleep(Duration::from_millis(100));
    }
}
