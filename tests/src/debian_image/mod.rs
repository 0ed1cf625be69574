//! A real-world image for benchmarks: Debian 12 (bookworm) with python3, numpy and scipy
//! installed by apt, whose command imports numpy and scipy and then prints one line.
//!
//! Three gzip layers, each a real diff of the previous rootfs with OCI whiteouts:
//!
//! 1. `debootstrap --variant=minbase bookworm` (device nodes, apt lists and archives, the
//!    host's `resolv.conf` and `hostname` removed);
//! 2. `apt-get install --no-install-recommends python3`;
//! 3. `apt-get install --no-install-recommends python3-numpy python3-scipy`.
//!
//! apt runs in a chroot of the rootfs (private mount and pid namespaces), and `umoci
//! repack` writes each layer by diffing the rootfs against the mtree of the previous one.
//! That is the classic `docker build` model without needing a build engine's storage
//! (podman's would be shared with the podman tests), and umoci is the same reference
//! implementation the tests already unpack with.
//!
//! Building needs root, `debootstrap`, `umoci` and `deb.debian.org` (or
//! `IMGD_DEBIAN_MIRROR`), takes a few minutes and is bounded per step. The finished
//! layout is cached in `IMGD_BENCH_CACHE` (default `/var/cache/imgd-bench`) under a hash of
//! the recipe, and verified (every blob's digest, every layer's diff_id) before use. Nothing
//! in `cargo test` builds it: only benchmarks call [`build`].

mod build;

use crate::image::{BlobInfo, Compression, ImageInfo, LayerInfo, LayoutInfo, Platform};
use crate::registry::Registry;
use crate::skopeo::{self, Format};
use anyhow::{bail, Context, Result};
use imgd_core::{Digest, Sha256};
use serde_json::Value;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The image's reference name in its layout (`oci:DIR:debian-numpy`).
pub const REF_NAME: &str = "debian-numpy";
/// What the command's only output line starts with (it prints after the imports).
pub const FIRST_LINE_PREFIX: &str = "imported numpy ";
/// The image's command (`config.Cmd`): the imports, then one line.
pub const ARGV: &[&str] = &[
    "python3",
    "-c",
    "import numpy, scipy.linalg, scipy.sparse; \
     print('imported numpy', numpy.__version__, 'scipy', scipy.__version__)",
];
/// `PATH` of the image's config (and of a runtime spec running it).
pub const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bumped whenever the build changes in a way the recipe text does not show.
const BUILD_VERSION: u32 = 1;
/// Longest wait for another process building the same cache.
const LOCK_TIMEOUT: Duration = Duration::from_secs(90 * 60);
const DEFAULT_CACHE: &str = "/var/cache/imgd-bench";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// What the image is built from; its text, hashed, keys the cache.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Debian suite for debootstrap.
    pub suite: &'static str,
    /// Debian mirror (`IMGD_DEBIAN_MIRROR`, default deb.debian.org).
    pub mirror: String,
    /// One apt layer per entry, above the debootstrap layer.
    pub apt_layers: &'static [&'static [&'static str]],
    /// `config.Cmd`.
    pub argv: &'static [&'static str],
    /// `PATH` in `config.Env`.
    pub path_env: &'static str,
}

impl Recipe {
    /// The recipe of this module's image.
    pub fn debian_numpy() -> Recipe {
        Recipe {
            suite: "bookworm",
            mirror: std::env::var("IMGD_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into()),
            apt_layers: &[&["python3"], &["python3-numpy", "python3-scipy"]],
            argv: ARGV,
            path_env: PATH_ENV,
        }
    }

    /// The cache key: 16 hex digits of the sha256 of the recipe (the mirror excluded: any
    /// mirror serves the same suite).
    pub fn key(&self) -> String {
        let text = format!(
            "build {BUILD_VERSION}\nsuite {}\nlayers {:?}\nargv {:?}\npath {}\n",
            self.suite, self.apt_layers, self.argv, self.path_env
        );
        Digest::of(text.as_bytes()).hex()[..16].to_string()
    }
}

/// The built image: an OCI layout (gzip layers) in the cache, verified.
#[derive(Debug, Clone)]
pub struct DebianImage {
    /// The layout, holding one image named [`REF_NAME`]. Read-only: it is the cache; use
    /// [`DebianImage::scratch_copy`] to add images or push with other settings.
    pub layout: LayoutInfo,
}

impl DebianImage {
    /// The image.
    pub fn image(&self) -> Result<&ImageInfo> {
        self.layout
            .image(REF_NAME)
            .with_context(|| format!("no {REF_NAME} in {}", self.layout.dir.display()))
    }

    /// Sum of the config and layer blob sizes (what a full pull downloads, manifest aside).
    pub fn compressed_size(&self) -> Result<u64> {
        Ok(self
            .image()?
            .referenced_blobs()
            .iter()
            .map(|b| b.size)
            .sum())
    }

    /// Sum of the layers' uncompressed tar sizes.
    pub fn uncompressed_size(&self) -> Result<u64> {
        Ok(self
            .image()?
            .layers
            .iter()
            .map(|l| l.uncompressed_size)
            .sum())
    }

    /// Pushes the image to `registry` as `repo_tag` (e.g. `debian/numpy:1`), byte for byte
    /// (gzip layers, the layout's manifest digest). Returns the image.
    pub fn push(&self, registry: &Registry, repo_tag: &str) -> Result<ImageInfo> {
        let image = self.image()?;
        let digest = skopeo::push_layout(
            &self.layout.dir,
            REF_NAME,
            &registry.docker_ref(repo_tag),
            Format::OciExact,
            false,
        )?;
        if digest != image.manifest.digest {
            bail!(
                "pushed manifest {digest} is not the layout's {}",
                image.manifest.digest
            );
        }
        Ok(image.clone())
    }

    /// A writable layout at `dir` (which must not exist) holding the same image, its
    /// blobs hard-linked (copied across file systems). Add images to it, or push it with
    /// other compression (`skopeo copy --dest-compress-format zstd`).
    pub fn scratch_copy(&self, dir: &Path) -> Result<LayoutInfo> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        for entry in fs::read_dir(self.layout.dir.join("blobs/sha256"))? {
            let entry = entry?;
            let to = blobs.join(entry.file_name());
            if fs::hard_link(entry.path(), &to).is_err() {
                fs::copy(entry.path(), &to)
                    .with_context(|| format!("copying {}", entry.path().display()))?;
            }
        }
        for file in ["oci-layout", "index.json"] {
            fs::copy(self.layout.dir.join(file), dir.join(file))?;
        }
        Ok(LayoutInfo {
            dir: dir.to_owned(),
            ..self.layout.clone()
        })
    }
}

/// The Debian numpy image from the cache, built there first if missing (a few minutes;
/// needs root, debootstrap, umoci and a Debian mirror).
pub fn build() -> Result<DebianImage> {
    let cache = std::env::var_os("IMGD_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    build_in(&cache, &Recipe::debian_numpy())
}

/// [`build`] of `recipe` with the cache at `cache`.
pub fn build_in(cache: &Path, recipe: &Recipe) -> Result<DebianImage> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let _lock = lock(cache)?;
    let key = recipe.key();
    let done = cache.join(entry_name(recipe));
    if done.exists() {
        match load(&done) {
            Ok(image) => return Ok(image),
            Err(e) => {
                tracing_log(&format!(
                    "cached image {} is unusable, rebuilding: {e:#}",
                    done.display()
                ));
                remove_tree(&done)?;
            }
        }
    }
    // Left by a build that crashed: nothing in it is trusted.
    for entry in fs::read_dir(cache)? {
        let path = entry?.path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("build-"));
        if stale {
            remove_tree(&path)?;
        }
    }
    let work = cache.join(format!("build-{key}-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let log = cache.join(format!("build-{key}.log"));
    let _ = fs::remove_file(&log);
    tracing_log(&format!(
        "building the Debian numpy image in {} (log {}) ...",
        work.display(),
        log.display()
    ));
    let started = Instant::now();
    let result = build::build_layout(recipe, &work, &log).and_then(|()| {
        let out = work.join("result");
        fs::create_dir(&out)?;
        fs::rename(work.join("layout"), out.join("layout"))?;
        write_layer_sizes(&out)?;
        sync_fs(&out)?;
        fs::rename(&out, &done).context("publishing the built image")?;
        sync_fs(cache)
    });
    remove_tree(&work)?;
    result?;
    tracing_log(&format!(
        "built the Debian numpy image in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    load(&done)
}

/// Progress for a person waiting on a benchmark.
fn tracing_log(msg: &str) {
    eprintln!("debian_image: {msg}");
}

/// An exclusive lock on the cache (held until dropped), so concurrent runs do not build
/// the same image twice.
fn lock(cache: &Path) -> Result<File> {
    let file = File::create(cache.join(".lock"))?;
    let started = Instant::now();
    loop {
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if started.elapsed() > LOCK_TIMEOUT {
            bail!("{} stayed locked for {LOCK_TIMEOUT:?}", cache.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sync_fs(dir: &Path) -> Result<()> {
    let f = File::open(dir)?;
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("syncfs");
    }
    Ok(())
}

/// Fails if anything is mounted at or below `dir` (a build's chroot mounts live in a
/// private namespace; one seen here must not be deleted through).
pub(crate) fn refuse_if_mounted(dir: &Path) -> Result<()> {
    let dir = fs::canonicalize(dir)?;
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    for line in mounts.lines() {
        if let Some(point) = line.split(' ').nth(4) {
            if Path::new(point).starts_with(&dir) {
                bail!("{point} is mounted inside {}", dir.display());
            }
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    refuse_if_mounted(dir)?;
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Writes `layers.json` beside `dir/layout`: each layer's diff_id and uncompressed size,
/// checked against the config by inflating every layer.
fn write_layer_sizes(dir: &Path) -> Result<()> {
    let layout = dir.join("layout");
    let (_, manifest, config) = read_manifest_and_config(&layout)?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .context("config without rootfs.diff_ids")?;
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    if layers.len() != diff_ids.len() {
        bail!("{} layers but {} diff_ids", layers.len(), diff_ids.len());
    }
    let mut sizes = Vec::new();
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let digest = digest_field(&layer["digest"])?;
        let file = File::open(blob_path(&layout, &digest))?;
        let mut gz = flate2::read::MultiGzDecoder::new(BufReader::new(file));
        let (got, size) = hash_reader(&mut gz)?;
        if got != digest_field(diff_id)? {
            bail!("layer {digest} inflates to {got}, config says {diff_id}");
        }
        sizes.push(serde_json::json!({"diff_id": got.to_string(), "size": size}));
    }
    fs::write(dir.join("layers.json"), serde_json::to_vec_pretty(&sizes)?)?;
    Ok(())
}

/// The image of `recipe` as cached in `cache` by an earlier [`build_in`], verified (every
/// blob's digest and size, the layers' diff_ids); an error if it is missing or damaged.
/// Never builds and never needs the network.
pub fn cached(cache: &Path, recipe: &Recipe) -> Result<DebianImage> {
    load(&cache.join(entry_name(recipe)))
}

/// The cache entry of `recipe`: a directory holding the OCI layout `layout/` and
/// `layers.json` (each layer's `diff_id` and uncompressed `size`).
pub fn entry_name(recipe: &Recipe) -> String {
    format!("debian-numpy-{}", recipe.key())
}

/// Reads and verifies a cache entry.
fn load(dir: &Path) -> Result<DebianImage> {
    let layout = dir.join("layout");
    let (entry, manifest, config) = read_manifest_and_config(&layout)?;
    let manifest_blob = blob_info(&layout, &entry)?;
    let config_blob = blob_info(&layout, &manifest["config"])?;
    let sizes: Vec<Value> =
        serde_json::from_slice(&fs::read(dir.join("layers.json")).context("reading layers.json")?)
            .context("parsing layers.json")?;
    let descs = manifest["layers"].as_array().context("manifest layers")?;
    if descs.len() != sizes.len() {
        bail!("layers.json does not match the manifest");
    }
    let mut layers = Vec::new();
    for (desc, size) in descs.iter().zip(&sizes) {
        let blob = blob_info(&layout, desc)?;
        if !blob.media_type.ends_with("tar+gzip") {
            bail!("layer {} is {}, not gzip", blob.digest, blob.media_type);
        }
        layers.push(LayerInfo {
            blob,
            diff_id: digest_field(&size["diff_id"])?,
            uncompressed_size: size["size"].as_u64().context("layers.json size")?,
            compression: Compression::Gzip,
        });
    }
    let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("config diff_ids")?
        .iter()
        .map(digest_field)
        .collect::<Result<_>>()?;
    if diff_ids != layers.iter().map(|l| l.diff_id).collect::<Vec<_>>() {
        bail!("layers.json diff_ids differ from the config's");
    }
    let image = ImageInfo {
        name: REF_NAME.into(),
        platform: Platform::linux_amd64(),
        manifest: manifest_blob,
        config: config_blob,
        layers,
    };
    Ok(DebianImage {
        layout: LayoutInfo {
            dir: layout,
            images: vec![image],
            indexes: Vec::new(),
        },
    })
}

/// The `index.json` entry named [`REF_NAME`], its manifest and its config.
fn read_manifest_and_config(layout: &Path) -> Result<(Value, Value, Value)> {
    let index: Value = serde_json::from_slice(
        &fs::read(layout.join("index.json")).context("reading index.json")?,
    )?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == REF_NAME)
        })
        .context("index.json has no debian-numpy")?
        .clone();
    let manifest: Value = serde_json::from_slice(&fs::read(blob_path(
        layout,
        &digest_field(&entry["digest"])?,
    ))?)?;
    let config: Value = serde_json::from_slice(&fs::read(blob_path(
        layout,
        &digest_field(&manifest["config"]["digest"])?,
    ))?)?;
    Ok((entry, manifest, config))
}

/// The descriptor `desc` as a [`BlobInfo`], after checking the blob's digest and size.
fn blob_info(layout: &Path, desc: &Value) -> Result<BlobInfo> {
    let digest = digest_field(&desc["digest"])?;
    let size = desc["size"].as_u64().context("descriptor without size")?;
    let path = blob_path(layout, &digest);
    let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let (got, len) = hash_reader(&mut file)?;
    if got != digest || len != size {
        bail!("blob {digest}: {len} bytes hashing to {got}, descriptor says {size} bytes");
    }
    Ok(BlobInfo {
        digest,
        size,
        media_type: desc["mediaType"]
            .as_str()
            .context("descriptor without mediaType")?
            .into(),
    })
}

fn hash_reader(r: &mut impl Read) -> Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finish(), total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

fn digest_field(v: &Value) -> Result<Digest> {
    let s = v.as_str().context("digest is not a string")?;
    Digest::from_str(s).map_err(|e| anyhow::anyhow!("bad digest {s:?}: {e:?}"))
}

fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}
