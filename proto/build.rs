//! Generates the peer service's prost messages and tonic stubs from `horcrux/peer.proto`.
//! `protox` parses the schema in Rust, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=horcrux/peer.proto");
    let fds = protox::compile(["horcrux/peer.proto"], ["."])?;
    tonic_prost_build::configure()
        // `bytes` fields decode as `Bytes` slices of the receive buffer: no copy per frame.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
