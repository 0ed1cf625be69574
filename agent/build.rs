//! Generates containerd's snapshots.v1 gRPC service (server side) from `proto/`.
//! Needs `protoc` (Debian's protobuf-compiler, installed by .ci/setup).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&["proto/containerd_snapshots.proto"], &["proto"])?;
    Ok(())
}
