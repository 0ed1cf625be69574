//! Peer chunk throughput on loopback: the agent's data plane (handshake, framing, sha256
//! verification on the client, as in production) against a plain tokio TCP copy of the
//! same bytes, both measured in this run, with the CPU each side spends. The plain copy
//! with sha256 on receive uses as many connections as the data plane (`--conns`), one
//! task each on the same multi-threaded runtime, so the two differ only by the protocol.
//!
//! The serving side runs in a child process (this binary re-executed with `--serve`), so
//! its CPU time is read from `/proc/<pid>/stat` and the client's from `getrusage`.
//!
//! `cargo run --release -p imgd-benches --bin bench-p2p [-- --mib 1024 --runs 3
//!  --conns 4 --socket-buffer BYTES]`
//!
//! Targets: data plane >= 80% of the plain copy, <= 1 CPU-second per GiB per side.
//!
//! On loopback both sides share the machine's cores, and verification alone costs
//! about 0.5 CPU-s per GiB (sha256 runs at about 2 GB/s per core with SHA-NI), while
//! a plain copy costs about 0.1-0.2 CPU-s per GiB per side. On 2 cores the verified
//! transfer is therefore CPU-bound near 2.3 GB/s, whatever the protocol; the "cores
//! busy" line shows how close to that bound the data plane runs.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use imgd_agent::dataplane::{serve, ChunkSource, DataPlaneConfig, HaveMap, PeerPool};
use imgd_benches::{mb_per_s, report};
use imgd_core::{Digest, CHUNK_SIZE};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: [u8; 32] = [0x5a; 32];
const GIB: f64 = (1u64 << 30) as f64;

struct Opts {
    mib: usize,
    runs: usize,
    conns: usize,
    socket_buffer: usize,
}

fn opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        mib: 1024,
        runs: 3,
        conns: 4,
        socket_buffer: 0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("bad value for {flag}"))?;
        match flag.as_str() {
            "--mib" => o.mib = value.max(4),
            "--runs" => o.runs = value.max(1),
            "--conns" => o.conns = value.max(1),
            "--socket-buffer" => o.socket_buffer = value,
            _ => bail!("unknown option {flag}"),
        }
    }
    Ok(o)
}

fn config(node: &str, socket_buffer: usize) -> DataPlaneConfig {
    let mut cfg = DataPlaneConfig::new(KEY, node.as_bytes());
    cfg.limits.socket_buffer = (socket_buffer > 0).then_some(socket_buffer);
    cfg
}

/// Deterministic incompressible-looking chunk `i`.
fn make_chunk(i: usize) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut v = Vec::with_capacity(CHUNK_SIZE);
    while v.len() < CHUNK_SIZE {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend_from_slice(&state.to_le_bytes());
    }
    Bytes::from(v)
}

struct MemSource(HashMap<Digest, Bytes>);

impl ChunkSource for MemSource {
    fn chunk(&self, digest: &Digest) -> Option<Bytes> {
        self.0.get(digest).cloned()
    }
    fn have(&self, _blob: &Digest) -> Option<HaveMap> {
        None
    }
}

/// The serving child: holds the chunks in memory, serves the data plane on one port
/// and a plain TCP copy on another, until killed. A plain-copy client sends the first
/// chunk and the number of chunks it wants (two u32, little endian) and gets their bytes.
fn child(o: &Opts) -> Result<()> {
    let chunks: Vec<Bytes> = (0..o.mib * (1 << 20) / CHUNK_SIZE)
        .map(make_chunk)
        .collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
    let source = MemSource(
        digests
            .iter()
            .copied()
            .zip(chunks.iter().cloned())
            .collect(),
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dp = TcpListener::bind("127.0.0.1:0").await?;
        let plain = TcpListener::bind("127.0.0.1:0").await?;
        let mut out = std::io::stdout().lock();
        let (a, b) = (dp.local_addr()?.port(), plain.local_addr()?.port());
        writeln!(out, "READY {a} {b}")?;
        for d in &digests {
            writeln!(out, "{}", d.hex())?;
        }
        writeln!(out, "END")?;
        out.flush()?;
        drop(out);
        let chunks = Arc::new(chunks);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = plain.accept().await {
                let chunks = chunks.clone();
                tokio::spawn(async move {
                    s.set_nodelay(true)?;
                    let first = s.read_u32_le().await? as usize;
                    let count = s.read_u32_le().await? as usize;
                    for c in chunks.iter().skip(first).take(count) {
                        s.write_all(c).await?;
                    }
                    s.shutdown().await
                });
            }
        });
        let cfg = config("bench-server", o.socket_buffer);
        serve(dp, cfg, Arc::new(source)).await?;
        Ok(())
    })
}

/// utime + stime of process `pid`, in seconds.
fn proc_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// User + system CPU of this process, in seconds.
fn self_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A plain-copy connection asking for `count` chunks from `first`.
async fn plain_connect(addr: SocketAddr, first: usize, count: usize) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_u32_le(u32::try_from(first)?).await?;
    s.write_u32_le(u32::try_from(count)?).await?;
    Ok(s)
}

/// Plain copy: read every chunk on one connection into a reused 4 MiB buffer.
async fn plain_copy(addr: SocketAddr, chunks: usize) -> Result<u64> {
    let mut s = plain_connect(addr, 0, chunks).await?;
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// `tokio::io::copy` of the stream into a sink (its default 8 KiB buffer).
async fn tokio_copy(addr: SocketAddr, chunks: usize) -> Result<u64> {
    let mut s = plain_connect(addr, 0, chunks).await?;
    Ok(tokio::io::copy(&mut s, &mut tokio::io::sink()).await?)
}

/// Plain copy plus what verification costs at least, with the data plane's parallelism:
/// `conns` tasks on the runtime, each on its own connection for an equal share of the
/// chunks, hash each 4 MiB chunk in 256 KiB pieces as they arrive, without any protocol.
async fn plain_copy_sha256(addr: SocketAddr, chunks: usize, conns: usize) -> Result<u64> {
    let per = chunks.div_ceil(conns);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let first = (i * per).min(chunks);
            let count = per.min(chunks - first);
            tokio::spawn(async move { hash_chunks(plain_connect(addr, first, count).await?).await })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

/// Reads 4 MiB chunks from `s` until it closes, hashing each as it arrives.
async fn hash_chunks(mut s: TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let mut hasher = imgd_core::Sha256::new();
        let mut filled = 0;
        while filled < CHUNK_SIZE {
            let end = (filled + (256 << 10)).min(CHUNK_SIZE);
            let n = s.read(&mut buf[filled..end]).await?;
            if n == 0 {
                return Ok(total);
            }
            hasher.update(&buf[filled..filled + n]);
            filled += n;
            total += n as u64;
        }
        std::hint::black_box(hasher.finish());
    }
}

/// Data plane: `conns` tasks fetch the chunks through one pool, verifying each.
async fn data_plane(addr: SocketAddr, digests: Arc<Vec<Digest>>, o: &Opts) -> Result<u64> {
    let pool = Arc::new(PeerPool::new(
        config("bench-client", o.socket_buffer),
        o.conns,
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..o.conns)
        .map(|_| {
            let (pool, next, digests) = (pool.clone(), next.clone(), digests.clone());
            tokio::spawn(async move {
                let mut total = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(d) = digests.get(i) else {
                        return anyhow::Ok(total);
                    };
                    let bytes = pool.get_chunk(addr, d, Duration::from_secs(30)).await?;
                    total += bytes.context("server lost a chunk")?.len() as u64;
                }
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await??;
    }
    Ok(total)
}

struct Run {
    took: Duration,
    client_cpu: f64,
    server_cpu: f64,
}

fn measure(pid: u32, expect: u64, f: impl FnOnce() -> Result<u64>) -> Result<Run> {
    let (c0, s0, t0) = (self_cpu(), proc_cpu(pid)?, Instant::now());
    let got = f()?;
    let took = t0.elapsed();
    let (c1, s1) = (self_cpu(), proc_cpu(pid)?);
    if got != expect {
        bail!("transferred {got} bytes, expected {expect}");
    }
    Ok(Run {
        took,
        client_cpu: c1 - c0,
        server_cpu: s1 - s0,
    })
}

fn print(name: &str, best: &Run, bytes: u64) {
    let gib = bytes as f64 / GIB;
    report(name, mb_per_s(bytes, best.took), "MB/s");
    report("  client CPU per GiB", best.client_cpu / gib, "CPU-s");
    report("  server CPU per GiB", best.server_cpu / gib, "CPU-s");
}

fn parent(o: &Opts) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--serve")
        .args(["--mib", &o.mib.to_string()])
        .args(["--socket-buffer", &o.socket_buffer.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let result = drive(o, &mut child);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn drive(o: &Opts, child: &mut std::process::Child) -> Result<()> {
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
    let ready = lines.next().context("child exited")??;
    let ports: Vec<u16> = ready
        .strip_prefix("READY ")
        .context("child did not start")?
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut digests = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if line == "END" {
            break;
        }
        digests.push(format!("sha256:{line}").parse::<Digest>()?);
    }
    let dp_addr = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let plain_addr = SocketAddr::from(([127, 0, 0, 1], ports[1]));
    let bytes = (digests.len() * CHUNK_SIZE) as u64;
    let n = digests.len();
    let digests = Arc::new(digests);
    let rt = tokio::runtime::Runtime::new()?;

    let (mut plain, mut copy, mut hashed, mut dp) = (vec![], vec![], vec![], vec![]);
    for _ in 0..o.runs {
        plain.push(measure(pid, bytes, || {
            rt.block_on(plain_copy(plain_addr, n))
        })?);
        copy.push(measure(pid, bytes, || {
            rt.block_on(tokio_copy(plain_addr, n))
        })?);
        hashed.push(measure(pid, bytes, || {
            rt.block_on(plain_copy_sha256(plain_addr, n, o.conns))
        })?);
        let d = digests.clone();
        dp.push(measure(pid, bytes, || {
            rt.block_on(data_plane(dp_addr, d, o))
        })?);
    }
    let best = |runs: Vec<Run>| runs.into_iter().min_by_key(|r| r.took).context("no runs");
    let (plain, copy, hashed, dp) = (best(plain)?, best(copy)?, best(hashed)?, best(dp)?);

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench-p2p: {} chunks of 4 MiB ({} MiB) over 127.0.0.1, best of {} runs, {} connections for the data plane and the copy + sha256, client runtime of {threads} worker threads",
        digests.len(),
        bytes >> 20,
        o.runs,
        o.conns
    );
    print(
        "plain TCP copy, 1 connection, 4 MiB reads (the baseline)",
        &plain,
        bytes,
    );
    print(
        "plain TCP copy, 1 connection, tokio::io::copy to sink",
        &copy,
        bytes,
    );
    print(
        &format!(
            "plain TCP copy + sha256 on receive, {} connections",
            o.conns
        ),
        &hashed,
        bytes,
    );
    print("data plane, sha256-verified", &dp, bytes);
    let ratio = |base: &Run| base.took.as_secs_f64() / dp.took.as_secs_f64();
    report(
        "ratio data plane / plain copy (target >= 0.80)",
        ratio(&plain),
        "x",
    );
    report("ratio data plane / tokio::io::copy", ratio(&copy), "x");
    report(
        "ratio data plane / plain copy + sha256 (same connections)",
        ratio(&hashed),
        "x",
    );
    // Both processes share this machine's cores: how many the data plane kept busy.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = (dp.client_cpu + dp.server_cpu) / dp.took.as_secs_f64();
    report(
        &format!("data plane: cores busy, both sides (of {cores})"),
        busy,
        "cores",
    );
    let sample = make_chunk(0);
    let t = Instant::now();
    for _ in 0..64 {
        std::hint::black_box(Digest::of(&sample));
    }
    report(
        "context: sha256 on one core",
        mb_per_s(64 * CHUNK_SIZE as u64, t.elapsed()),
        "MB/s",
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        return child(&opts(&args[1..])?);
    }
    parent(&opts(&args)?)
}
