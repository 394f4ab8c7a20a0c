fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // Blob bytes as `bytes::Bytes`: a received frame is a slice of the buffer it arrived
        // in, and a frame sent is the chunk it was read as, with no copy into a Vec between.
        .bytes(".berth.storage.v1")
        .compile_protos(&["proto/storage.proto", "proto/meta.proto", "proto/cluster.proto"], &["proto"])?;
    Ok(())
}
