//! The storage node: verified blobs on local disk under a RocksDB index, and upload staging.
//!
//! # Layout of a node's directory
//! - `index/`: RocksDB. Column family `blobs` maps a digest to a [`BlobEntry`] (size, BLAKE3
//!   checksum, creation time, where the bytes are) and holds each segment's count of deleted
//!   bytes, the segments' low mark (`~indexed`), the unit checksums of blobs over 1 MiB
//!   (`~units/<digest>`, see [`integrity`]) and the copies found damaged (`~corrupt/<digest>`);
//!   column family `inline` holds small blobs stored before segments existed.
//! - `quarantine/`: blob files found damaged, kept for a person to look at, never served.
//! - `segments/<id>.seg`: small blobs back to back (see the `segment` module).
//! - `blobs/<algorithm>/<first two hex>/<hex>`: one file per large blob.
//! - `uploads/<id>`: one append-only staging file per upload session.
//!
//! # Why one file per large blob and segments for small ones
//! Layers are written once, read many times and deleted whole. A file per blob lets deletion
//! reclaim space at once (unlink) with no compaction to schedule, and lets a finished upload
//! become a blob by a rename, so its bytes are written exactly once. Blobs of at most
//! [`INLINE_THRESHOLD`] bytes (manifests, configs, small layers) are appended to a shared
//! segment instead: concurrent small pushes share one `fdatasync` (group commit) and no inode
//! is created per blob. Their bytes are also written once: kept in RocksDB they went to the
//! WAL and again to a blob file at memtable flush, which on a push of many 256 KiB layers
//! wrote twice the pushed bytes and took more CPU in copies than hashing did. Deleting a
//! segment blob counts its bytes dead in its segment; once half of a sealed segment is dead,
//! its live blobs move to the active segment and the file is deleted. Inline blobs of older
//! nodes are still served; once [`RECLAIM_AFTER`] bytes of them are deleted, a compaction
//! with blob GC rewrites the blob files without them.
//!
//! # Durability and visibility
//! A blob is visible only through its index entry, and the entry is written only after the
//! digest matched (for a copy from another node: the bytes matched that node's BLAKE3 of them,
//! see `BlobStore::put_copy`) and the bytes were fsynced (file and directory, or the segment). A crash at
//! any point leaves either no entry (nothing served) or a complete, verified blob. A blob
//! file's entry is a synced write. A segment blob's is not: its record names its digest, so a
//! crash that loses the entry leaves what is needed to make it again, and the node does so at
//! open (see the `segment` module); a small blob then waits for one fsync, not two. Small
//! blobs held in memory are committed by one thread per node in batches: one flush of their
//! records and one index write for all that arrived meanwhile (see the engine's `committer`
//! module). Staged
//! uploads survive a restart: their hash state is rebuilt from the staged file when the session
//! is next touched.

mod engine;
mod framing;
pub mod integrity;
mod mapped;
mod segment;
mod staging;
mod wire;

pub mod client;
pub mod placement;
pub mod router;
pub mod server;

pub use engine::{BlobEntry, Location, ReadsFirst, StorageConfig, StorageEngine};

/// Largest blob kept in a segment. Images' configs and manifests are a few KiB and many small
/// layers stay below this; above it a blob gets a file of its own, whose rename-based commit
/// avoids copying its bytes.
pub const INLINE_THRESHOLD: u64 = 256 * 1024;

/// Bytes of deleted inline blobs after which a compaction reclaims their space.
pub const RECLAIM_AFTER: u64 = 64 * 1024 * 1024;

/// Bytes gathered from the network before one hash-and-write step on the blocking pool: big
/// enough that the hop to the pool is negligible next to hashing, small enough to bound memory.
pub const WRITE_BUFFER: usize = 1024 * 1024;

/// Size of the chunks a blob file is sent in: one integrity unit ([`integrity::UNIT`]), checked
/// before it goes out. Each chunk's pages are faulted in by one hop to the blocking pool, so
/// large chunks keep the hops rare; the bytes stay in the page cache (the file is
/// memory-mapped), so a pull's memory does not grow with the chunk size.
pub const READ_CHUNK: usize = integrity::UNIT as usize;

/// Runs an fsync (or a synced index write) and records how long it took
/// (`berth_storage_fsync_duration_seconds`): on one disk shared by everything, its latency is
/// what a push's acknowledgement waits for.
pub(crate) fn timed_fsync<T>(sync: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let r = sync();
    metrics::histogram!("berth_storage_fsync_duration_seconds").record(started.elapsed().as_secs_f64());
    r
}

/// The kernel's page size: what file offsets of a memory map and whole-page ranges of the page
/// cache are counted in.
pub(crate) fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf only reads its integer argument.
    *PAGE.get_or_init(|| u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(512))
}
