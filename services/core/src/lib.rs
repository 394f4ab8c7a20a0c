//! Berth's shared vocabulary: what every role agrees on.
//!
//! Digests and their hashing, repository names and tags, the OCI error codes a client sees,
//! manifest parsing and validation, and the two seams the frontend talks to — [`BlobStore`]
//! (bytes, owned by storage nodes) and [`MetaStore`] (everything agreed on through Raft).
//! Standalone wires in-process implementations of both; the cluster wires gRPC clients.

pub mod access;
pub mod digest;
pub mod error;
pub mod manifest;
pub mod name;
pub mod store;
pub mod trace;

pub use digest::{Algorithm, Digest, DigestHasher};

/// The wall-clock time in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
pub use error::{ErrorCode, RegistryError};
pub use store::{BlobStore, ByteStream, Deleted, ManifestRecord, MetaStore, Stored, UploadSession};
