//! Builds (or finds in the cache) the Debian python3 + numpy + scipy image the benchmarks
//! run, and prints its layout and sizes; with `--push HOST:PORT/REPO:TAG`, pushes it there
//! (plain http) as gzip layers, digests preserved.
//!
//! `cargo run --release -p imgd-benches --bin debian-image [-- --push 127.0.0.1:5000/debian/numpy:1]`
//! (root; debootstrap and umoci; reaches deb.debian.org unless cached).

use anyhow::{bail, Result};
use imgd_tests::debian_image;
use imgd_tests::skopeo::{self, Format};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let push = match args.as_slice() {
        [] => None,
        [flag, dest] if flag == "--push" => Some(dest.clone()),
        _ => bail!("usage: debian-image [--push HOST:PORT/REPO:TAG]"),
    };
    let image = debian_image::build()?;
    let info = image.image()?;
    println!(
        "layout {}:{}",
        image.layout.dir.display(),
        debian_image::REF_NAME
    );
    println!("manifest {}", info.manifest.digest);
    for (i, l) in info.layers.iter().enumerate() {
        println!(
            "layer {i}: {} gzip {:.1} MB, tar {:.1} MB",
            l.blob.digest,
            l.blob.size as f64 / 1e6,
            l.uncompressed_size as f64 / 1e6
        );
    }
    println!(
        "total: {:.1} MB compressed, {:.1} MB uncompressed",
        image.compressed_size()? as f64 / 1e6,
        image.uncompressed_size()? as f64 / 1e6
    );
    println!("command: {:?}", debian_image::ARGV);
    if let Some(dest) = push {
        let digest = skopeo::push_layout(
            &image.layout.dir,
            debian_image::REF_NAME,
            &format!("docker://{dest}"),
            Format::OciExact,
            false,
        )?;
        println!("pushed {dest}@{digest}");
    }
    Ok(())
}
