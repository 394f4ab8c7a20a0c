fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/storage.proto", "proto/meta.proto", "proto/cluster.proto"], &["proto"])?;
    Ok(())
}
