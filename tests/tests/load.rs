//! Load on one agent: 64 concurrent readers on one mount plus 8 concurrent prefetches of
//! different images, for a bounded time. No read fails or returns wrong bytes, every
//! reader keeps reading and its reads reach the agent, the prefetches run while the
//! readers read (the agent reaches the proxy through a relay that slows down the
//! prefetched images' chunks, so their fetches last), everything finishes, and the
//! agent's peak RSS stays within a bound.

use imgd_tests::daemons::{Agent, AgentOptions, Proxy};
use imgd_tests::fault_relay::{Fault, FaultRelay};
use imgd_tests::guards::ImgdMount;
use imgd_tests::image::{Content, FileSpec, ImageSpec, LayerSpec, SplitMix64};
use imgd_tests::registry::Registry;
use imgd_tests::skopeo;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const READERS: usize = 64;
const PREFETCHES: usize = 8;
/// How long the readers run.
const LOAD_TIME: Duration = Duration::from_secs(20);
/// Files of the mounted image: `data/f{i}`, 2 MiB each.
const FILES: u64 = 16;
const FILE_LEN: u64 = 2 * MIB;
/// Peak RSS (VmHWM) allowed to the agent under this load. Measured on the 2-core machine:
/// 138-151 MiB (25 MiB idle) on 2026-11-23, when the prefetches ended in the first
/// seconds; 281-296 MiB on 2026-12-01 with the prefetches slowed so that their 32 chunk
/// fetches (8 blobs, 4 at once each, a 4 MiB body buffer each) are all in flight during the
/// reads. The bound leaves about 1.4x of margin over that.
const RSS_BOUND_MIB: u64 = 400;
/// How fast the relay between agent and proxy sends each chunk of the prefetched images
/// (4 MiB, 4 at once per prefetch), so that the 8 prefetches last about 8 s of
/// [`LOAD_TIME`].
const PREFETCH_CHUNK_BYTES_PER_SEC: u64 = 512 << 10;
/// Reads each reader must complete in [`LOAD_TIME`]: every reader makes progress.
const MIN_READS_PER_READER: u64 = 100;
/// Reads the readers must complete together while all 8 prefetches are running.
const MIN_READS_DURING_PREFETCHES: u64 = 5000;

fn file_content(i: u64) -> Content {
    Content::Random {
        seed: 9000 + i,
        len: FILE_LEN,
    }
}

/// An image of `files` incompressible 4 MiB files seeded by `seed`.
fn data_image(name: &str, seed: u64, files: u64, len: u64) -> ImageSpec {
    let mut specs = vec![FileSpec::dir("data")];
    specs.extend((0..files).map(|i| FileSpec::random(format!("data/f{i}"), seed + i, len)));
    ImageSpec::new(name, vec![LayerSpec::gzip(specs)])
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// The digests of the 4 MiB chunks of blob `digest` of the layout in `dir`.
fn chunk_digests(dir: &Path, digest: &imgd_core::Digest) -> Vec<imgd_core::Digest> {
    let blob = std::fs::read(dir.join("blobs/sha256").join(digest.hex())).unwrap();
    blob.chunks(imgd_core::CHUNK_SIZE)
        .map(imgd_core::Digest::of)
        .collect()
}

/// Drops the file's cached pages, so that the next read reaches the agent.
fn drop_pages(file: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// One reader: random slices of random files until `stop`, each checked against the
/// file's content, counting into `done`. Returns (reads, bytes read, errors and
/// mismatches as text).
fn reader(
    dir: &Path,
    id: u64,
    expected: &[Vec<u8>],
    stop: &AtomicBool,
    done: &AtomicU64,
) -> (u64, u64, Vec<String>) {
    let mut rng = SplitMix64::new(id);
    let (mut reads, mut bytes) = (0, 0);
    let mut errors = Vec::new();
    while !stop.load(Ordering::Relaxed) && errors.len() < 10 {
        let f = rng.next_u64() % FILES;
        let len = (64 << 10) * (1 + rng.next_u64() % 4);
        let off = (rng.next_u64() % (FILE_LEN - len)) & !4095;
        let path = dir.join(format!("data/f{f}"));
        let mut buf = vec![0u8; len as usize];
        let got = std::fs::File::open(&path).and_then(|file| {
            drop_pages(&file)?;
            file.read_exact_at(&mut buf, off)
        });
        match got {
            Ok(()) if buf[..] == expected[f as usize][off as usize..(off + len) as usize] => {}
            Ok(()) => errors.push(format!("wrong bytes in f{f} at {off}")),
            Err(e) => errors.push(format!("f{f} at {off}: {e}")),
        }
        reads += 1;
        bytes += len;
        done.fetch_add(1, Ordering::Relaxed);
    }
    (reads, bytes, errors)
}

/// Samples taken while the load runs: reads completed while every prefetch was running.
#[derive(Default)]
struct Overlap {
    /// (time since start, reads completed) at the first and last sample at which every
    /// prefetch's imgctl was running and the agent had every prefetch's layer in flight.
    first: Option<(Duration, u64)>,
    last: Option<(Duration, u64)>,
    /// The most chunk fetches the agent had in flight at those samples.
    chunks_in_flight: u64,
}

impl Overlap {
    fn record(&mut self, at: Duration, reads: u64, chunks_in_flight: u64) {
        self.first.get_or_insert((at, reads));
        self.last = Some((at, reads));
        self.chunks_in_flight = self.chunks_in_flight.max(chunks_in_flight);
    }

    /// Reads completed between the first and the last sample, and for how long.
    fn reads(&self) -> (u64, Duration) {
        match (self.first, self.last) {
            (Some((t0, r0)), Some((t1, r1))) => (r1 - r0, t1 - t0),
            _ => (0, Duration::ZERO),
        }
    }
}

#[test]
fn many_readers_on_a_mount_and_many_prefetches_finish_without_errors_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let mut specs = vec![FileSpec::dir("data")];
    specs.extend((0..FILES).map(|i| {
        FileSpec::new(
            format!("data/f{i}"),
            imgd_tests::image::EntryKind::File(file_content(i)),
        )
    }));
    let mounted = ImageSpec::new("mounted", vec![LayerSpec::gzip(specs)]);
    skopeo::push_image(&reg, &tmp.path().join("mounted"), mounted, "mounted:1").unwrap();
    let mut total_prefetch = 0;
    let mut slow_chunks = Vec::new();
    for p in 0..PREFETCHES as u64 {
        let name = format!("p{p}");
        let spec = data_image(&name, 100 * (p + 1), 4, 4 * MIB);
        let dir = tmp.path().join(&name);
        let (image, size) = skopeo::push_image(&reg, &dir, spec, &format!("{name}:1")).unwrap();
        total_prefetch += size;
        for layer in &image.layers {
            slow_chunks.extend(chunk_digests(&dir, &layer.blob.digest));
        }
    }
    let proxy = Proxy::start(&[format!("local={}", reg.url())]).unwrap();
    // The prefetched images' chunks come slowly, so the prefetches overlap the readers.
    let relay = FaultRelay::start(&proxy.addr()).unwrap();
    let slow = Fault::Throttle {
        bytes_per_sec: PREFETCH_CHUNK_BYTES_PER_SEC,
    };
    for d in &slow_chunks {
        relay.add(&format!("/imgd/v1/chunks/{d}"), slow.clone(), None);
    }
    let a = Agent::start(AgentOptions::local(relay.url(), tmp.path().join("agent"))).unwrap();
    let mount = ImgdMount::mount(&a, "local/mounted:1", &tmp.path().join("mnt")).unwrap();
    let expected: Arc<Vec<Vec<u8>>> =
        Arc::new((0..FILES).map(|i| file_content(i).to_vec()).collect());
    let hwm_before = vm_hwm_kib(a.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    for r in 0..READERS as u64 {
        let (dir, expected, stop, done, tx) = (
            mount.dir().to_path_buf(),
            expected.clone(),
            stop.clone(),
            done.clone(),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            let _ = tx.send(reader(&dir, r + 1, &expected, &stop, &done));
        });
    }
    let started = Instant::now();
    let mut prefetches: Vec<_> = (0..PREFETCHES)
        .map(|p| {
            a.spawn_imgctl(&["prefetch", &format!("local/p{p}:1")])
                .unwrap()
        })
        .collect();
    let mut overlap = Overlap::default();
    while started.elapsed() < LOAD_TIME {
        std::thread::sleep(Duration::from_millis(200));
        let reads = done.load(Ordering::Relaxed);
        let at = started.elapsed();
        let mut running = 0;
        for c in prefetches.iter_mut() {
            if c.try_wait().unwrap().is_none() {
                running += 1;
            }
        }
        let s = a.status().unwrap();
        let in_flight = s["blobs_in_flight"].as_u64().unwrap();
        if running == PREFETCHES && in_flight >= PREFETCHES as u64 {
            overlap.record(at, reads, s["chunks_in_flight"].as_u64().unwrap());
        }
    }
    stop.store(true, Ordering::Relaxed);

    let mut per_reader = Vec::new();
    let (mut reads, mut bytes) = (0, 0);
    let mut errors = Vec::new();
    for _ in 0..READERS {
        let (n, b, e) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a reader did not finish: deadlock or hang");
        per_reader.push(n);
        reads += n;
        bytes += b;
        errors.extend(e);
    }
    for (p, child) in prefetches.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut child = imgd_tests::guards::KillOnDrop(Some(child));
        let c = child.0.as_mut().unwrap();
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "prefetch {p} did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "prefetch {p} failed:\n{}", a.log());
    }
    let took = started.elapsed();
    let hwm = vm_hwm_kib(a.pid());
    let s = a.status().unwrap();
    let m = &s["mounts"][0];
    let agent_reads = m["reads"].as_u64().unwrap();
    let agent_bytes = m["bytes_read"].as_u64().unwrap();
    let (during, window) = overlap.reads();
    println!(
        "{READERS} readers: {reads} reads of {bytes} bytes in {took:?} (fewest by one reader {}); the agent served {agent_reads} FUSE reads of {agent_bytes} bytes; {during} reads in the {window:?} while all {PREFETCHES} prefetches of {total_prefetch} bytes ran (up to {} chunk fetches in flight); agent VmHWM {} MiB before, {} MiB after (bound {RSS_BOUND_MIB} MiB)",
        per_reader.iter().min().unwrap(),
        overlap.chunks_in_flight,
        hwm_before / 1024,
        hwm / 1024
    );
    assert!(errors.is_empty(), "read errors: {errors:?}");
    for (r, n) in per_reader.iter().enumerate() {
        assert!(
            *n >= MIN_READS_PER_READER,
            "a reader ({r} in order of finishing) made only {n} reads"
        );
    }
    // Each read first dropped the file's pages, so each reached the agent at least once.
    assert!(
        agent_reads >= reads && agent_bytes >= bytes,
        "the agent served {agent_reads} reads of {agent_bytes} bytes for {reads} reads of {bytes} bytes: {s}"
    );
    assert!(
        during >= MIN_READS_DURING_PREFETCHES,
        "only {during} reads in the {window:?} while all {PREFETCHES} prefetches ran"
    );
    assert_eq!(m["eio"].as_u64().unwrap(), 0, "{s}");
    assert!(
        hwm / 1024 <= RSS_BOUND_MIB,
        "agent peak RSS {} MiB",
        hwm / 1024
    );
    a.verify_clean().unwrap();
    for p in 0..PREFETCHES {
        let (ok, out, err) = a.imgctl(&["images"]).unwrap();
        assert!(ok && out.contains(&format!("local/p{p}:1")), "{out}{err}");
    }
}
