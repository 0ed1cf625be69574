//! A fault-injecting HTTP relay in front of a real server (e.g. the test registry).
//!
//! Requests are forwarded unchanged (one request per connection); responses whose path
//! matches a rule are altered: a replaced status and body, or a body cut short while the
//! `Content-Length` still promises all of it. One harness for every fault test.

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
}

/// A rule: requests whose path contains `path_contains` get `fault`, up to `times` times
/// (`None`: always).
#[derive(Clone, Debug)]
pub struct Rule {
    pub path_contains: String,
    pub fault: Fault,
    pub times: Option<usize>,
}

/// The relay; stops accepting when dropped.
pub struct FaultRelay {
    port: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

impl FaultRelay {
    /// Starts a relay on a free loopback port forwarding to `target` (`127.0.0.1:PORT`).
    pub fn start(target: &str) -> Result<FaultRelay> {
        let port = free_port()?;
        let listener = TcpListener::bind(("127.0.0.1", port)).context("binding fault relay")?;
        listener.set_nonblocking(true)?;
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (r, s, n, target) = (
            rules.clone(),
            stop.clone(),
            requests.clone(),
            target.to_string(),
        );
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let (r, target) = (r.clone(), target.clone());
                        thread::spawn(move || {
                            let _ = relay(conn, &target, &r);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(FaultRelay {
            port,
            rules,
            stop,
            requests,
        })
    }

    /// Adds a rule.
    pub fn add(&self, path_contains: &str, fault: Fault, times: Option<usize>) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.push(Rule {
                path_contains: path_contains.to_string(),
                fault,
                times,
            });
        }
    }

    /// Removes every rule.
    pub fn clear(&self) {
        if let Ok(mut rules) = self.rules.lock() {
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

fn relay(client: TcpStream, target: &str, rules: &Mutex<Vec<Rule>>) -> Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut client_r = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    let head = read_head(&mut client_r)?;
    let path = head
        .first()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_string();
    let fault = take_rule(rules, &path);
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
    let limit = match fault {
        Some(Fault::Truncate { after }) => after as u64,
        _ => u64::MAX,
    };
    std::io::copy(&mut up_r.take(limit), &mut client_w)?;
    client_w.flush()?;
    let _ = client_w.shutdown(Shutdown::Both);
    Ok(())
}
