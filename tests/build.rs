//! Generates the CRI client the tests drive containerd's CRI plugin with, from
//! `proto/cri_subset.proto`. Needs `protoc` (Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/cri_subset.proto"], &["proto"])?;
    Ok(())
}
