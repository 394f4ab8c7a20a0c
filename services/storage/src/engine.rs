//! The storage engine: the [`BlobStore`] of one node over its local directory.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use berth_core::error::Result;
use berth_core::store::{incarnation_of, upload_uuid};
use berth_core::{BlobStore, ByteStream, Deleted, Digest, ErrorCode, RegistryError, Stored};
use bytes::Bytes;
use futures::StreamExt;
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::integrity::{decode_units, encode_units, unit_crc_ok, units_match, Checksums, TreeHasher, UnitSums, UNIT};
use crate::mapped::read_mapped;
use crate::segment::{Mark, Pending, Segments};
use crate::staging::{create_dirs_durably, sync_dir, Staging};
use crate::{INLINE_THRESHOLD, RECLAIM_AFTER, WRITE_BUFFER};

const CF_BLOBS: &str = "blobs";
const CF_INLINE: &str = "inline";

/// Where a node keeps its files.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The node's directory; created if missing.
    pub dir: PathBuf,
}

/// Where a blob's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// In the `inline` column family, under the same key: where small blobs went before
    /// segments. Still read, deleted and reclaimed; no longer written.
    Inline,
    /// In its own file under `blobs/`.
    File,
    /// In segment file `segments/<segment>.seg`, `offset` bytes in.
    Segment {
        /// The segment's id.
        segment: u32,
        /// Where the blob's bytes start.
        offset: u64,
    },
}

/// Key (in the `blobs` column family) of the stamp reservation: no stamp above it was given.
const STAMP_KEY: &str = "~stamp";

/// Key (in the `blobs` column family) of the segments' low mark, written with every segment
/// blob's entry: every record below it has its entry written (see the `segment` module).
const LOW_MARK_KEY: &str = "~indexed";

fn encode_mark((segment, offset): Mark) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&segment.to_le_bytes());
    v[4..].copy_from_slice(&offset.to_le_bytes());
    v
}

fn decode_mark(v: &[u8]) -> Option<Mark> {
    let segment = u32::from_le_bytes(v.get(..4)?.try_into().ok()?);
    let offset = u64::from_le_bytes(v.get(4..12)?.try_into().ok()?);
    Some((segment, offset))
}

/// Stamps reserved by one durable write: a node gives this many (ten seconds' worth at one a
/// millisecond) before it writes the reservation again, and never reuses one after a restart
/// even when the clock went back. After a restart stamps start at the reservation, so they run
/// at most this far ahead of the clock; garbage collection compares them with a time (the
/// reap floor) and leaves copies stamped after it for a later round.
const STAMP_LEASE: u64 = 10_000;

/// The stamps given so far, and the reservation on disk.
struct Stamps {
    last: u64,
    reserved: u64,
}

/// How long a compaction sweep waits after being asked for.
const COMPACT_DELAY: Duration = Duration::from_secs(1);

/// Key (in the `blobs` column family, beside digests) of a segment's count of deleted bytes.
fn dead_key(segment: u32) -> String {
    format!("~dead/{segment:08}")
}

/// Key (in the `blobs` column family) of the unit checksums of a blob over one unit.
fn units_key(key: &str) -> String {
    format!("~units/{key}")
}

/// Key (in the `blobs` column family) of a copy found damaged and taken out of service: when.
fn corrupt_key(key: &str) -> String {
    format!("~corrupt/{key}")
}

const CORRUPT_PREFIX: &str = "~corrupt/";

/// A little-endian u64 value: a segment's dead bytes under its [`dead_key`], the stamp
/// reservation under [`STAMP_KEY`].
fn le_u64(v: &[u8]) -> u64 {
    v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// The index entry of one verified blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Length in bytes.
    pub size: u64,
    /// BLAKE3 of the bytes, checked on scrub and repair.
    pub blake3: [u8; 32],
    /// The copy's stamp (see [`berth_core::Stored`]): when it was stored, in milliseconds since
    /// the Unix epoch, made strictly increasing on this node, and renewed whenever a write
    /// finds the blob already stored.
    pub stamp: u64,
    /// Where the bytes are.
    pub location: Location,
}

/// An upload's slot: loaded lazily from disk, gone once finished, cancelled or expired.
enum Slot {
    Unloaded,
    Ready(Box<Staging>),
    Gone,
}

/// One node's blob storage (cheap to clone).
#[derive(Clone)]
pub struct StorageEngine {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    db: DB,
    /// Bytes of inline blobs deleted since their space was last reclaimed.
    deleted_inline: AtomicU64,
    /// Whether a reclaiming compaction is running.
    reclaiming: AtomicBool,
    /// Small blobs (see [`crate::segment`]).
    segments: Segments,
    /// Held while deleting a segment blob or moving a compacted segment's live blobs, so that
    /// neither undoes the other's index writes.
    segment_index: Mutex<()>,
    /// Whether a sweep of segment compactions is running.
    compacting: AtomicBool,
    /// Whether a sweep was asked for since the running one began.
    compact_again: AtomicBool,
    /// Blobs being committed or deleted: each is locked by one of these at a time (see
    /// [`Inner::lock_blob`]); `unlocked` wakes those waiting for one.
    committing: Mutex<HashSet<String>>,
    unlocked: Condvar,
    /// The committer thread's queue (see the `committer` module); set once the engine is open.
    committer: OnceLock<std::sync::mpsc::Sender<committer::Job>>,
    /// Stamps for copies (see [`BlobEntry::stamp`]).
    stamps: Mutex<Stamps>,
    /// The active segment as commits last saw it; when it changes, the segment just sealed
    /// may already be half dead.
    last_segment: AtomicU32,
    uploads: Mutex<HashMap<String, Arc<AsyncMutex<Slot>>>>,
    /// Drawn at every start, or kept from the graceful stop before it (see
    /// [`BlobStore::incarnation`] and [`StorageEngine::keep_staged_uploads`]).
    incarnation: u64,
    /// Uploads clients called that have ended here (finished, cancelled, expired), the newest
    /// [`ENDED_REMEMBERED`]: a late call for one whose id names this incarnation (see
    /// [`berth_core::store::upload_id`]) finds it unknown instead of opening it again, empty.
    ended: Mutex<Ended>,
    /// Bytes of uploads staged in memory (see [`Staging`]).
    staged_in_memory: Arc<AtomicU64>,
    /// Copies found damaged and taken out of service since the node started.
    quarantined: AtomicU64,
    /// Which blobs reads ask this node for first (see [`StorageEngine::set_reads_first`]).
    reads_first: std::sync::RwLock<Option<ReadsFirst>>,
}

/// Largest blob a `put_small` hashes on the calling task.
const HASHED_ON_TASK: usize = 64 * 1024;

/// The integrity checksums of staged bytes `st` that hash to `digest` (for a copy from another
/// node: that match `copy_of`, that node's BLAKE3 of them); other bytes are discarded and
/// refused.
fn verified(st: &mut Staging, digest: &Digest, copy_of: Option<[u8; 32]>) -> Result<Checksums> {
    let checked = match &copy_of {
        Some(blake3) => Ok(st.verify_copy(blake3)),
        None => st.verify(digest).map_err(internal),
    };
    match checked {
        Ok((true, checksums)) => return Ok(checksums),
        Ok((false, _)) => {}
        Err(e) => {
            st.discard();
            return Err(e);
        }
    }
    st.discard();
    let why = match copy_of {
        Some(_) => format!("the copy of {digest} received does not match the sending node's BLAKE3"),
        None => format!("uploaded content does not hash to {digest}"),
    };
    Err(RegistryError::new(ErrorCode::DigestInvalid, why))
}

/// Stages small blob `data` in `st` once it hashes to `digest` (the digest is checked here:
/// staging keeps only the integrity checksums); a staging file it spilled to is removed when
/// it fails.
fn stage_small(st: &mut Staging, digest: &Digest, data: Bytes) -> Result<()> {
    if !digest.matches(&data) {
        return Err(RegistryError::new(ErrorCode::DigestInvalid, format!("content does not hash to {digest}")));
    }
    st.append(data).map_err(internal).inspect_err(|_| st.discard())
}

/// Blob `key`'s lock, held (see [`Inner::lock_blob`]).
struct BlobLock<'a> {
    inner: &'a Inner,
    key: String,
}

impl Drop for BlobLock<'_> {
    fn drop(&mut self) {
        let mut locked = match self.inner.committing.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        locked.remove(&self.key);
        drop(locked);
        self.inner.unlocked.notify_all();
    }
}

/// Whether reads of a blob ask this node for it first: its first owner in placement order.
pub type ReadsFirst = Arc<dyn Fn(&Digest) -> bool + Send + Sync>;

fn internal(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::internal(e)
}

use berth_core::now_ms;

/// A new incarnation: random, never 0 (which nodes of earlier versions report).
fn draw_incarnation() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 | 1
}

/// The file a graceful stop leaves the node's incarnation in, with the ended uploads it
/// remembers (see [`StorageEngine::keep_staged_uploads`]).
const KEPT_INCARNATION: &str = "incarnation";

/// How long a kept incarnation stays good: a start later than this after the stop (a node
/// down that long, or a binary of an earlier version run meanwhile, which leaves the file
/// alone) draws a new one. Longer than an upload is kept idle by default.
const KEPT_FOR: Duration = Duration::from_secs(3600);

/// Writes `incarnation` and the `ended` uploads for the next start to take up, durably.
fn keep_incarnation(dir: &std::path::Path, incarnation: u64, ended: &[u128]) -> io::Result<()> {
    let mut text = format!("{incarnation}\n{}\n", now_ms());
    for id in ended {
        text.push_str(&format!("{id:032x}\n"));
    }
    let tmp = dir.join(format!("{KEPT_INCARNATION}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(KEPT_INCARNATION))?;
    sync_dir(dir)
}

/// The incarnation and ended uploads a graceful stop left, removed durably so that a start
/// after a crash draws a new incarnation; or a new incarnation when none was left, or it was
/// left more than [`KEPT_FOR`] ago.
fn take_kept_incarnation(dir: &std::path::Path) -> io::Result<(u64, Ended)> {
    let path = dir.join(KEPT_INCARNATION);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((draw_incarnation(), Ended::default())),
        Err(e) => return Err(e),
    };
    fs::remove_file(&path)?;
    sync_dir(dir)?;
    let mut lines = text.lines();
    let incarnation = lines.next().and_then(|l| l.parse::<u64>().ok()).filter(|i| *i != 0);
    let kept_at = lines.next().and_then(|l| l.parse::<u64>().ok()).unwrap_or(0);
    let fresh = now_ms().saturating_sub(kept_at) <= KEPT_FOR.as_millis() as u64;
    let Some(incarnation) = incarnation.filter(|_| fresh) else {
        return Ok((draw_incarnation(), Ended::default()));
    };
    let mut ended = Ended::default();
    lines.filter_map(|l| u128::from_str_radix(l, 16).ok()).for_each(|id| ended.insert(id));
    Ok((incarnation, ended))
}

/// Ended uploads remembered (see `Inner::ended`): at 100 pushed images of four blobs a
/// second, the last 160 seconds' worth, in about 3 MiB.
const ENDED_REMEMBERED: usize = 65_536;

/// Ended uploads whose ids name this incarnation, by the UUID their ids begin with, oldest
/// first.
#[derive(Default)]
struct Ended {
    ids: std::collections::HashSet<u128>,
    order: std::collections::VecDeque<u128>,
}

impl Ended {
    fn insert(&mut self, id: u128) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > ENDED_REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

/// The key an upload whose id names an incarnation is remembered by once ended.
fn ended_key(id: &str) -> Option<u128> {
    uuid::Uuid::parse_str(upload_uuid(id)).ok().map(|u| u.as_u128())
}

/// Upload ids name files, so only UUID-like ids are accepted.
fn valid_upload_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Runs blocking work (RocksDB, fsync, hashing) off the reactor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// How long a graceful stop waits for uploads still receiving bytes before it writes out the
/// others' staged bytes without them.
const KEEP_WAIT: Duration = Duration::from_secs(5);

impl StorageEngine {
    /// Tells the engine which blobs reads ask this node for first (`None`: all of them, as in
    /// a single node). The copies of the others leave the page cache once they are on the
    /// disk: a node holding one of R copies is read from first for about 1/R of its blobs,
    /// and without this every copy written stays cached until memory runs short, which
    /// crowds out what reads use and, on a machine whose memory the host backs lazily, makes
    /// every write of a copy pay for fresh pages (see `loadtest/src/limits.rs`).
    pub fn set_reads_first(&self, reads_first: Option<ReadsFirst>) {
        if let Ok(mut r) = self.inner.reads_first.write() {
            *r = reads_first;
        }
    }

    /// Writes the uploads staged in memory to their files and makes them durable, so that they
    /// outlive the restart about to come: called when the node stops gracefully, after it has
    /// stopped taking requests and running housekeeping. An upload begun just before a rolling
    /// restart then goes on once the node is back, instead of being unknown to it. The
    /// incarnation is kept for the next start too, with the uploads that ended (and the ones
    /// that could not be kept, as ended), so that uploads begun without opening their areas go
    /// on as well. Returns how many were written.
    pub async fn keep_staged_uploads(&self) -> Result<usize> {
        let slots: Vec<(String, Arc<AsyncMutex<Slot>>)> =
            self.inner.uploads.lock().map_err(internal)?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // An append still streaming holds its slot: it is skipped after a moment (its client
        // starts that upload again), and every other is written out meanwhile.
        let deadline = tokio::time::Instant::now() + KEEP_WAIT;
        let mut kept = 0;
        for (id, slot) in slots {
            let Ok(mut guard) = tokio::time::timeout_at(deadline, slot.lock_owned()).await else {
                tracing::warn!(upload = %id, "an upload still receiving bytes is not kept for the restart");
                // Its bytes are lost with the stop: after the restart it is unknown.
                self.note_ended(&id);
                continue;
            };
            kept += blocking(move || match &mut *guard {
                Slot::Ready(st) => st.sync().map(|()| 1).map_err(internal),
                _ => Ok(0),
            })
            .await?;
        }
        let dir = self.inner.dir.join("uploads");
        blocking(move || sync_dir(&dir).map_err(internal)).await?;
        // The next start goes on in this incarnation, so that uploads begun without opening
        // their areas go on too, and the ones that ended stay ended.
        let ended: Vec<u128> = self.inner.ended.lock().map_err(internal)?.order.iter().copied().collect();
        let (dir, incarnation) = (self.inner.dir.clone(), self.inner.incarnation);
        blocking(move || keep_incarnation(&dir, incarnation, &ended).map_err(internal)).await?;
        Ok(kept)
    }

    /// Uploads staged on this node (in memory or in files loaded since the start).
    pub fn uploads_open(&self) -> usize {
        self.inner.uploads.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Opens (or creates) the node's directory and index.
    pub fn open(config: StorageConfig) -> io::Result<StorageEngine> {
        let dir = config.dir;
        let (incarnation, ended) = take_kept_incarnation(&dir)?;
        for sub in ["blobs", "uploads"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        // After a crash the index is what it was at some point in the order of its writes (the
        // default, set here because segment blobs' recovery depends on it: see `recover_index`).
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Memtables are the engine's main memory cost; small ones keep a node's RSS flat, and
        // the index entries they hold are tiny.
        let mut index_opts = Options::default();
        index_opts.set_write_buffer_size(4 << 20);
        index_opts.set_max_write_buffer_number(2);
        // Every write of a blob first asks the index whether it holds the digest, and for a
        // new blob it does not: Bloom filters answer that without searching the memtable's
        // skip list or reading table blocks.
        let mut index_table = rocksdb::BlockBasedOptions::default();
        index_table.set_bloom_filter(10.0, false);
        index_opts.set_block_based_table_factory(&index_table);
        index_opts.set_memtable_prefix_bloom_ratio(0.1);
        index_opts.set_memtable_whole_key_filtering(true);
        // Inline blobs leave the memtable for a blob file at flush, so a bigger memtable buys
        // nothing but memory: 8 MiB instead of 16 took a push-heavy run's peak RSS from about
        // 85 to 74 MiB at the same rate.
        let mut inline_opts = Options::default();
        inline_opts.set_write_buffer_size(8 << 20);
        inline_opts.set_max_write_buffer_number(2);
        // Layers are compressed already; compressing them again costs CPU and saves nothing.
        inline_opts.set_compression_type(rocksdb::DBCompressionType::None);
        // Values go to blob files when memtables flush, so compaction moves references instead
        // of rewriting every small blob again and again; blob GC reclaims deleted ones.
        inline_opts.set_enable_blob_files(true);
        inline_opts.set_min_blob_size(4096);
        // Blob GC is off while serving: with it on, every compaction rewrites the live blobs of
        // the oldest blob files whether or not anything in them was deleted, which took a
        // sixth of the CPU of a push-heavy load. Deleted blobs' space is reclaimed instead by
        // a compaction with GC on, once enough has been deleted (see `reclaim_inline_space`).
        inline_opts.set_enable_blob_gc(false);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_BLOBS, index_opts),
            ColumnFamilyDescriptor::new(CF_INLINE, inline_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, dir.join("index"), cfs).map_err(io::Error::other)?;
        let segments = Segments::open(dir.join("segments"))?;
        let active = segments.active_id();
        let reserved = db
            .get_cf(db.cf_handle(CF_BLOBS).ok_or_else(|| io::Error::other("blobs column family missing"))?, STAMP_KEY)
            .map_err(io::Error::other)?
            .map_or(0, |v| le_u64(&v));
        let engine = StorageEngine {
            inner: Arc::new(Inner {
                dir,
                db,
                deleted_inline: AtomicU64::new(0),
                reclaiming: AtomicBool::new(false),
                segments,
                segment_index: Mutex::new(()),
                compacting: AtomicBool::new(false),
                compact_again: AtomicBool::new(false),
                committing: Mutex::new(HashSet::new()),
                unlocked: Condvar::new(),
                committer: OnceLock::new(),
                stamps: Mutex::new(Stamps { last: reserved, reserved }),
                last_segment: AtomicU32::new(active),
                uploads: Mutex::new(HashMap::new()),
                incarnation,
                ended: Mutex::new(ended),
                staged_in_memory: Arc::new(AtomicU64::new(0)),
                quarantined: AtomicU64::new(0),
                reads_first: std::sync::RwLock::new(None),
            }),
        };
        engine.inner.recover_index().map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(queue) = committer::start(Arc::downgrade(&engine.inner))? {
            let _ = engine.inner.committer.set(queue);
        }
        // Segments left at least half dead (the node stopped before a sweep ran, or recovery
        // counted records dead) are compacted now rather than at the next delete or roll.
        // The sweep runs on the runtime's blocking pool: without a runtime it waits for those.
        match engine.inner.compactable() {
            Ok(ids) if !ids.is_empty() && tokio::runtime::Handle::try_current().is_ok() => {
                tracing::info!(segments = ids.len(), "compacting segments left at least half dead");
                engine.inner.compact_segments();
            }
            Ok(_) => {}
            // Only space waits: the node serves, and the next delete or roll looks again.
            Err(e) => tracing::warn!(error = %e, "looking for segments to compact"),
        }
        Ok(engine)
    }

    /// The index entry of a blob, if stored.
    ///
    /// Index entries are tiny and hot, so the lookup runs on the calling task: a hop to the
    /// blocking pool would cost more than the read.
    pub async fn entry(&self, digest: &Digest) -> Result<Option<BlobEntry>> {
        self.inner.entry(&digest.to_string())
    }

    /// Re-reads a stored blob and checks every byte against its BLAKE3 (and the kept unit
    /// checksums against the bytes): `Some(true)` when intact, `Some(false)` when damaged (the
    /// copy is then taken out of service, see [`StorageEngine::damaged`]), `None` when absent.
    pub async fn scrub(&self, digest: &Digest) -> Result<Option<bool>> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        blocking(move || {
            let Some(entry) = inner.entry(&digest.to_string())? else {
                return Ok(None);
            };
            let (at, size) = (entry.location, entry.size);
            let intact = inner.scrub_one(&digest, entry)?;
            // The check read the copy into the page cache: a copy reads ask another owner for
            // first leaves it again, or scrubbing would fill the cache with such copies.
            if intact && !inner.keeps_cached(&digest) {
                inner.drop_pages(&digest, &at, size);
            }
            Ok(Some(intact))
        })
        .await
    }

    /// Blobs whose copy here was found damaged and taken out of service, not yet replaced by a
    /// good copy (a write of the blob clears its record), with when each was found.
    pub async fn damaged(&self) -> Result<Vec<(Digest, u64)>> {
        let inner = self.inner.clone();
        blocking(move || {
            let blobs = inner.cf(CF_BLOBS)?;
            let mut out = vec![];
            let from = IteratorMode::From(CORRUPT_PREFIX.as_bytes(), Direction::Forward);
            for kv in inner.db.iterator_cf(blobs, from) {
                let (k, v) = kv.map_err(internal)?;
                let Some(rest) = k.strip_prefix(CORRUPT_PREFIX.as_bytes()) else { break };
                if let Ok(d) = String::from_utf8_lossy(rest).parse::<Digest>() {
                    out.push((d, le_u64(&v)));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Copies found damaged (by reads or scrubs) and taken out of service since the node started.
    pub fn quarantined(&self) -> u64 {
        self.inner.quarantined.load(Ordering::Relaxed)
    }

    /// Forgets the damage record of `digest` (a blob no longer wanted here, e.g. collected).
    pub async fn forget_damaged(&self, digest: &Digest) -> Result<()> {
        let inner = self.inner.clone();
        let key = corrupt_key(&digest.to_string());
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_cf(inner.cf(CF_BLOBS)?, key);
            inner.synced_write(batch)
        })
        .await
    }

    /// Stores a whole blob through a staging area of its own; checked against `copy_of` (the
    /// sending node's BLAKE3, see [`BlobStore::put_copy`]) when given, else against `digest`.
    async fn put_checked(
        &self,
        digest: &Digest,
        copy_of: Option<[u8; 32]>,
        body: ByteStream,
        limit: u64,
    ) -> Result<Stored> {
        let id = format!("put-{}", uuid::Uuid::new_v4());
        let cached = self.inner.keeps_cached(digest);
        self.start_upload(&id, copy_of.is_none(), cached)?;
        // Committed right after, so the chunks are not settled (see `Staging::settle`); on a
        // task of its own, so that a caller that gives up cannot leave them staged unsettled
        // between the append and the commit.
        let (this, digest) = (self.clone(), digest.clone());
        let put = tokio::spawn(async move {
            match this.append_to(&id, Some(0), body, limit, false).await {
                Ok(_) => this.finish_upload(&id, &digest, copy_of).await,
                Err(e) => {
                    let _ = this.upload_cancel(&id).await;
                    Err(e)
                }
            }
        });
        put.await.map_err(internal)?
    }

    /// Appends `body` to upload `id` at `offset` (if given), within `limit` bytes in all; then,
    /// with `settle`, copies what it holds as received into its own memory (see
    /// `Staging::settle`), as an upload that waits for its next call must.
    async fn append_to(
        &self,
        id: &str,
        offset: Option<u64>,
        body: ByteStream,
        limit: u64,
        settle: bool,
    ) -> Result<u64> {
        let mut guard = self.lock_upload(id).await?;
        let Slot::Ready(st) = std::mem::replace(&mut *guard, Slot::Gone) else {
            return Err(RegistryError::upload_unknown(id));
        };
        if let Some(off) = offset {
            if off != st.size {
                let size = st.size;
                *guard = Slot::Ready(st);
                return Err(RegistryError::chunk_out_of_order(off, size));
            }
        }
        let (st, result) = self.append_body(st, body, limit).await;
        match st {
            Some(mut st) => {
                if settle {
                    st.settle();
                }
                *guard = Slot::Ready(st)
            }
            // Next use reloads the staged file from disk.
            None => *guard = Slot::Unloaded,
        }
        result
    }

    /// Opens an empty staging area; `hash_digest` unless it receives a copy (see
    /// [`Staging::create`]), and `cached` unless its blob is known to be one that reads do not
    /// ask this node for first (see [`StorageEngine::set_reads_first`]).
    fn start_upload(&self, id: &str, hash_digest: bool, cached: bool) -> Result<()> {
        if !valid_upload_id(id) {
            return Err(RegistryError::upload_unknown(id));
        }
        let st = Staging::create(self.inner.upload_path(id), self.inner.staged_in_memory.clone(), hash_digest);
        let st = st.uncached_if(!cached);
        let slot = Arc::new(AsyncMutex::new(Slot::Ready(Box::new(st))));
        self.inner.uploads.lock().map_err(internal)?.insert(id.to_string(), slot);
        Ok(())
    }

    /// Verifies the staged bytes (against `copy_of` when given, else `digest`) and commits
    /// them, fsynced.
    #[tracing::instrument(name = "store.finish", skip_all)]
    async fn finish_upload(&self, id: &str, digest: &Digest, copy_of: Option<[u8; 32]>) -> Result<Stored> {
        let mut guard = self.lock_upload(id).await?;
        let Slot::Ready(st) = std::mem::replace(&mut *guard, Slot::Gone) else {
            return Err(RegistryError::upload_unknown(id));
        };
        let inner = self.inner.clone();
        let digest = digest.clone();
        // The slot stays in the map, locked, until the commit is over: a call for the upload
        // meanwhile waits for it (and then finds it gone) instead of opening the staged file
        // being committed, and housekeeping sees the upload in use, not lost.
        // Bytes held in memory are a small blob's (see `Staging`); their hashes ran as they
        // came, so they are verified here and committed by the committer.
        let at_once = match copy_of {
            Some(_) => st.in_memory(),
            None => st.verifies_at_once(&digest),
        };
        let committed = if at_once {
            let mut st = st;
            match verified(&mut st, &digest, copy_of) {
                Ok(checksums) => self.commit_small(st, &digest, checksums).await,
                Err(e) => Err(e),
            }
        } else {
            blocking(move || {
                let mut st = st;
                let checksums = verified(&mut st, &digest, copy_of)?;
                let path = st.path.clone();
                inner.commit(st, &digest, checksums).inspect_err(|_| {
                    let _ = fs::remove_file(&path);
                })
            })
            .await
        };
        self.note_ended(id);
        self.forget_upload(id);
        committed
    }

    /// Commits verified staged bytes held in memory of a small blob: through the committer
    /// (see the `committer` module), or on the blocking pool when there is none.
    async fn commit_small(&self, st: Box<Staging>, digest: &Digest, checksums: Checksums) -> Result<Stored> {
        match self.inner.queue_commit(st, digest.clone(), checksums) {
            Ok(outcome) => outcome.await.map_err(|_| internal("the committer stopped"))?,
            Err((st, checksums)) => {
                let (inner, digest) = (self.inner.clone(), digest.clone());
                blocking(move || inner.commit(st, &digest, checksums)).await
            }
        }
    }

    /// Remembers that upload `id` has ended (see `Inner::ended`), if its id names this
    /// incarnation: only such an upload could be opened again by a late call.
    fn note_ended(&self, id: &str) {
        if incarnation_of(id) != Some(self.inner.incarnation) {
            return;
        }
        if let (Some(key), Ok(mut e)) = (ended_key(id), self.inner.ended.lock()) {
            e.insert(key);
        }
    }

    /// The slot of upload `id`, locked; loads a staged file left by an earlier process.
    async fn lock_upload(&self, id: &str) -> Result<OwnedMutexGuard<Slot>> {
        if !valid_upload_id(id) {
            return Err(RegistryError::upload_unknown(id));
        }
        let known = self.inner.uploads.lock().map_err(internal)?.get(id).cloned();
        let slot = match known {
            Some(slot) => slot,
            None => {
                // Judged outside the map's lock (it looks at the disk); a call for the same
                // upload meanwhile may have put a slot in first, which then wins.
                let first = Arc::new(AsyncMutex::new(self.first_call(id)?));
                self.inner.uploads.lock().map_err(internal)?.entry(id.to_string()).or_insert(first).clone()
            }
        };
        let mut guard = slot.lock_owned().await;
        if let Slot::Unloaded = *guard {
            let path = self.inner.upload_path(id);
            let budget = self.inner.staged_in_memory.clone();
            *guard = blocking(move || match Staging::reopen(path, budget) {
                Ok(s) => Ok(Slot::Ready(Box::new(s))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Slot::Gone),
                Err(e) => Err(internal(e)),
            })
            .await?;
        }
        if let Slot::Gone = *guard {
            // Its bytes are gone (a finish, a cancel, a staging file lost): a later call must
            // not open it again, empty.
            self.note_ended(id);
            self.forget_upload(id);
            return Err(RegistryError::upload_unknown(id));
        }
        Ok(guard)
    }

    /// The slot of upload `id`, called for the first time in this process: an empty staging
    /// area when the id names this incarnation (see [`berth_core::store::upload_id`]), has no
    /// staging file (one kept through a graceful restart is loaded instead) and has not ended
    /// here; else whatever its staging file holds, if it has one.
    fn first_call(&self, id: &str) -> Result<Slot> {
        let path = self.inner.upload_path(id);
        let ended = |key| self.inner.ended.lock().map(|e| e.ids.contains(&key)).unwrap_or(true);
        let opens = incarnation_of(id) == Some(self.inner.incarnation)
            && ended_key(id).is_some_and(|key| !ended(key))
            && !path.exists();
        if !opens {
            return Ok(Slot::Unloaded);
        }
        Ok(Slot::Ready(Box::new(Staging::create(path, self.inner.staged_in_memory.clone(), true))))
    }

    fn forget_upload(&self, id: &str) {
        if let Ok(mut map) = self.inner.uploads.lock() {
            map.remove(id);
        }
    }

    /// Streams `body` into the staged upload, about `WRITE_BUFFER` bytes per blocking step, the
    /// next batch of chunks arriving from the network while the previous one is hashed and
    /// written. Chunks are passed on as they came (no copy). On any failure the upload is
    /// rolled back to where this append started.
    ///
    /// Returns the staging state back, or `None` if it was lost with a failed blocking task.
    async fn append_body(
        &self,
        st: Box<Staging>,
        mut body: ByteStream,
        limit: u64,
    ) -> (Option<Box<Staging>>, Result<u64>) {
        let mark = st.mark();
        let start = st.size;
        let mut idle: Option<Box<Staging>> = Some(st);
        let mut inflight: Option<JoinHandle<(Box<Staging>, io::Result<()>)>> = None;
        let mut batch: Vec<Bytes> = vec![];
        let mut batched = 0usize;
        let mut received = 0u64;
        let mut outcome: Result<()> = Ok(());
        loop {
            let done = match body.next().await {
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if start + received > limit {
                        outcome = Err(RegistryError::too_big(limit));
                        break;
                    }
                    batched += chunk.len();
                    batch.push(chunk);
                    false
                }
                Some(Err(e)) => {
                    outcome = Err(RegistryError::reading_body(e));
                    break;
                }
                None => true,
            };
            if batched >= WRITE_BUFFER || (done && !batch.is_empty()) {
                let st = match inflight.take() {
                    Some(h) => match h.await {
                        Ok((st, Ok(()))) => st,
                        Ok((st, Err(e))) => {
                            idle = Some(st);
                            outcome = Err(internal(e));
                            break;
                        }
                        Err(e) => {
                            outcome = Err(internal(e));
                            break;
                        }
                    },
                    None => match idle.take() {
                        Some(st) => st,
                        None => {
                            outcome = Err(internal("staging state lost"));
                            break;
                        }
                    },
                };
                let chunks = std::mem::take(&mut batch);
                let small = st.stays_in_memory(batched as u64);
                batched = 0;
                if small {
                    // Hashed and kept in memory on this task: a few hundred microseconds at
                    // most, less than the hop to the blocking pool and back costs.
                    let mut st = st;
                    let r = chunks.into_iter().try_for_each(|c| st.append(c));
                    idle = Some(st);
                    if let Err(e) = r {
                        outcome = Err(internal(e));
                        break;
                    }
                } else {
                    inflight = Some(tokio::task::spawn_blocking(move || {
                        let mut st = st;
                        let r = chunks.into_iter().try_for_each(|c| st.append(c));
                        (st, r)
                    }));
                }
            }
            if done {
                break;
            }
        }
        if let Some(h) = inflight.take() {
            match h.await {
                Ok((st, r)) => {
                    idle = Some(st);
                    if let (Err(e), Ok(())) = (r, &outcome) {
                        outcome = Err(internal(e));
                    }
                }
                Err(e) => outcome = Err(internal(e)),
            }
        }
        let Some(st) = idle else {
            return (None, Err(internal("upload state lost")));
        };
        match outcome {
            Ok(()) => {
                let size = st.size;
                (Some(st), Ok(size))
            }
            Err(e) => {
                let rolled = tokio::task::spawn_blocking(move || {
                    let mut st = st;
                    let r = st.rollback(mark);
                    (st, r)
                })
                .await;
                match rolled {
                    Ok((st, Ok(()))) => (Some(st), Err(e)),
                    Ok((_, Err(io))) => {
                        tracing::error!(error = %io, "rolling back an upload failed; dropping it");
                        (None, Err(e))
                    }
                    Err(_) => (None, Err(e)),
                }
            }
        }
    }
}

impl Inner {
    /// Whether a copy of `digest` written here stays in the page cache.
    fn keeps_cached(&self, digest: &Digest) -> bool {
        match self.reads_first.read() {
            Ok(r) => r.as_ref().is_none_or(|f| f(digest)),
            Err(_) => true,
        }
    }

    /// Checks blob `digest`'s copy here, whose index entry is `entry` (see
    /// [`StorageEngine::scrub`]): whether it is intact.
    fn scrub_one(self: &Arc<Self>, digest: &Digest, entry: BlobEntry) -> Result<bool> {
        let key = digest.to_string();
        match entry.location {
            Location::File => {
                let file = match fs::File::open(self.blob_path(digest)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.quarantine(digest, "its file is missing");
                        return Ok(false);
                    }
                    Err(e) => return Err(internal(e)),
                };
                if file.metadata().map_err(internal)?.len() < entry.size {
                    self.quarantine(digest, "its file is shorter than the blob");
                    return Ok(false);
                }
                // The strict check: every byte's BLAKE3, then the kept unit checksums
                // against what the bytes give (a damaged record is written again).
                let sums = Inner::file_sums(&file, entry.size)?;
                if sums.blake3 != entry.blake3 {
                    self.quarantine(digest, "its bytes do not match its BLAKE3");
                    return Ok(false);
                }
                if self.stored_sums(&key, entry.size)?.as_ref() != Some(&sums.units) {
                    tracing::warn!(%digest, "unit checksums missing or damaged; kept again from the verified bytes");
                    self.keep_sums(&key, &sums.units)?;
                }
                Ok(true)
            }
            _ => Ok(self.checked_small_bytes(digest, entry, true)?.is_some()),
        }
    }

    /// Drops the pages of blob `digest` (`size` bytes at `at`) from the page cache (see
    /// [`StorageEngine::set_reads_first`]); a failure only leaves them cached.
    fn drop_pages(&self, digest: &Digest, at: &Location, size: u64) {
        let dropped = match at {
            Location::Segment { segment, offset } => self.segments.drop_cached(*segment, *offset, size),
            Location::File => fs::File::open(self.blob_path(digest)).map(|f| crate::staging::drop_all_cached(&f)),
            Location::Inline => Ok(()),
        };
        if let Err(e) = dropped {
            tracing::debug!(%digest, error = %e, "dropping a blob's pages from the page cache");
        }
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir.join("blobs").join(digest.algorithm().name()).join(&hex[..2]).join(hex)
    }

    fn upload_path(&self, id: &str) -> PathBuf {
        self.dir.join("uploads").join(id)
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| internal(format!("column family {name} missing")))
    }

    fn entry(&self, key: &str) -> Result<Option<BlobEntry>> {
        match self.db.get_pinned_cf(self.cf(CF_BLOBS)?, key).map_err(internal)? {
            Some(v) => bincode::deserialize(&v).map(Some).map_err(internal),
            None => Ok(None),
        }
    }

    fn inline(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(CF_INLINE)?, key).map_err(internal)
    }

    /// The bytes of a small blob (inline or in a segment) whose index entry the caller read,
    /// `None` if it is no longer stored. A segment read can race with the segment's
    /// compaction; the entry is then looked up again and names the blob's new place.
    fn small_bytes(&self, key: &str, mut entry: BlobEntry) -> Result<Option<Vec<u8>>> {
        for _ in 0..3 {
            match entry.location {
                Location::Inline => return self.inline(key)?.ok_or_else(|| internal("inline bytes missing")).map(Some),
                Location::Segment { segment, offset } => match self.segments.read(segment, offset, entry.size) {
                    Ok(data) => return Ok(Some(data)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => match self.entry(key)? {
                        Some(moved) => entry = moved,
                        None => return Ok(None),
                    },
                    Err(e) => return Err(internal(e)),
                },
                Location::File => return Err(internal("not a small blob")),
            }
        }
        Err(internal(format!("blob {key} kept moving while being read")))
    }

    /// [`Inner::small_bytes`], checked: against its CRC (what a read checks) or, with
    /// `strict` (the scrub) or for a blob stored before CRCs were kept, against its BLAKE3. A
    /// damaged copy is taken out of service and answered as not stored.
    fn checked_small_bytes(
        self: &Arc<Self>,
        digest: &Digest,
        entry: BlobEntry,
        strict: bool,
    ) -> Result<Option<Vec<u8>>> {
        let (root, size) = (entry.blake3, entry.size);
        let key = digest.to_string();
        let sums = self.stored_sums(&key, size)?;
        let Some(data) = self.small_bytes(&key, entry)? else { return Ok(None) };
        let intact = match &sums {
            Some(sums) if !strict => unit_crc_ok(&data, 0, sums),
            _ => blake3::hash(&data).as_bytes() == &root,
        };
        if !intact {
            self.quarantine(digest, "its bytes do not match their checksum");
            return Ok(None);
        }
        if sums.is_none() {
            self.keep_sums(&key, &UnitSums { cvs: vec![], crcs: vec![crc32fast::hash(&data)] })?;
        }
        Ok(Some(data))
    }

    /// The bytes of a segment blob read on the calling task, when they are all in the page
    /// cache and match their CRC: a pull of a blob pushed or pulled lately then costs no hop to
    /// the blocking pool and back. `None` sends the caller to [`Inner::checked_small_bytes`] on
    /// the blocking pool, which reads from the disk, follows a compaction and deals with
    /// damage.
    fn cached_small_bytes(&self, digest: &Digest, entry: &BlobEntry) -> Option<Vec<u8>> {
        let Location::Segment { segment, offset } = entry.location else { return None };
        let sums = self.stored_sums(&digest.to_string(), entry.size).ok().flatten()?;
        let data = self.segments.read_cached(segment, offset, entry.size).ok().flatten()?;
        unit_crc_ok(&data, 0, &sums).then_some(data)
    }

    /// The unit checksums kept for blob `key` of `size` bytes, if any (and well-formed).
    fn stored_sums(&self, key: &str, size: u64) -> Result<Option<UnitSums>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_BLOBS)?, units_key(key))
            .map_err(internal)?
            .and_then(|v| decode_units(&v, size)))
    }

    /// Keeps unit checksums derived from verified bytes. Not synced: losing them in a crash
    /// only means deriving them again.
    fn keep_sums(&self, key: &str, sums: &UnitSums) -> Result<()> {
        self.db.put_cf(self.cf(CF_BLOBS)?, units_key(key), encode_units(sums)).map_err(internal)
    }

    /// All checksums of a blob file, from one pass over its bytes.
    fn file_sums(file: &fs::File, size: u64) -> Result<Checksums> {
        let mut tree = TreeHasher::default();
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(UNIT);
            tree.update(&read_mapped(file, offset, len as usize).map_err(internal)?);
            offset += len;
        }
        Ok(tree.finish())
    }

    /// The unit checksums of a blob file. A blob stored before they were kept gets them now,
    /// from one pass over its file checked against its BLAKE3; `None` (and the copy taken out
    /// of service) when that check fails.
    fn units_of(self: &Arc<Self>, digest: &Digest, entry: &BlobEntry, file: &fs::File) -> Result<Option<UnitSums>> {
        let key = digest.to_string();
        if let Some(sums) = self.stored_sums(&key, entry.size)?.filter(|u| units_match(u, entry.size, &entry.blake3)) {
            return Ok(Some(sums));
        }
        let sums = Self::file_sums(file, entry.size)?;
        if sums.blake3 != entry.blake3 {
            self.quarantine(digest, "its bytes do not match its checksum");
            return Ok(None);
        }
        self.keep_sums(&key, &sums.units)?;
        Ok(Some(sums.units))
    }

    /// Takes a damaged copy out of service: its entry goes (so the node answers that it does
    /// not hold the blob, and repair writes a good copy), a blob file moves to `quarantine/`
    /// for a person to look at, a segment blob's bytes count as dead, and the damage is
    /// recorded under `~corrupt/` until a good copy replaces it.
    fn quarantine(self: &Arc<Self>, digest: &Digest, why: &str) {
        let key = digest.to_string();
        let r = self.with_blob_lock(&key, || {
            let Some(entry) = self.entry(&key)? else { return Ok(()) };
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_BLOBS)?, &key);
            batch.delete_cf(self.cf(CF_BLOBS)?, units_key(&key));
            batch.put_cf(self.cf(CF_BLOBS)?, corrupt_key(&key), berth_core::now_ms().to_le_bytes());
            match entry.location {
                Location::File => {
                    let dir = self.dir.join("quarantine");
                    create_dirs_durably(&dir).map_err(internal)?;
                    let to = dir.join(format!("{}-{}", digest.hex(), entry.stamp));
                    match fs::rename(self.blob_path(digest), &to) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(internal(e)),
                    }
                    self.synced_write(batch)
                }
                Location::Segment { segment, .. } => {
                    let _g = self.segment_index.lock().map_err(internal)?;
                    self.count_dead(batch, segment, entry.size)
                }
                Location::Inline => {
                    batch.delete_cf(self.cf(CF_INLINE)?, &key);
                    self.synced_write(batch)
                }
            }
        });
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) => tracing::error!(%digest, why, "a stored copy is damaged: taken out of service until repaired"),
            Err(e) => {
                tracing::error!(%digest, why, error = %e, "a stored copy is damaged, and taking it out of service failed")
            }
        }
    }

    /// Deletes a segment blob's entry and counts its bytes dead in its segment; compacts the
    /// segment once half of it is dead.
    fn delete_from_segment(self: &Arc<Self>, key: &str) -> Result<Option<u64>> {
        let _g = self.segment_index.lock().map_err(internal)?;
        let Some(entry) = self.entry(key)? else { return Ok(None) };
        let Location::Segment { segment, .. } = entry.location else {
            return Err(internal("not a segment blob"));
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_BLOBS)?, key);
        batch.delete_cf(self.cf(CF_BLOBS)?, units_key(key));
        self.count_dead(batch, segment, entry.size)?;
        Ok(Some(entry.stamp))
    }

    /// Writes `batch` (synced) with `bytes` more counted dead in `segment`, and starts the
    /// segment's compaction once half of it is dead. The caller holds `segment_index`.
    fn count_dead(self: &Arc<Self>, mut batch: WriteBatch, segment: u32, bytes: u64) -> Result<()> {
        let dead = self.dead_in(segment)? + bytes;
        batch.put_cf(self.cf(CF_BLOBS)?, dead_key(segment), dead.to_le_bytes());
        // With the low mark: recovery at the next open then starts past the deleted record
        // (unless another was still pending) and does not index it again.
        self.index_write(batch, &[], true)?;
        if segment != self.segments.active_id() && dead * 2 >= self.segments.size(segment).unwrap_or(0) {
            self.compact_segments();
        }
        Ok(())
    }

    /// Bytes counted dead in `segment`.
    fn dead_in(&self, segment: u32) -> Result<u64> {
        Ok(self.db.get_cf(self.cf(CF_BLOBS)?, dead_key(segment)).map_err(internal)?.map_or(0, |v| le_u64(&v)))
    }

    /// Sealed segments at least half dead.
    fn compactable(&self) -> Result<Vec<u32>> {
        let blobs = self.cf(CF_BLOBS)?;
        let active = self.segments.active_id();
        let mut out = vec![];
        for kv in self.db.iterator_cf(blobs, IteratorMode::From(b"~dead/", Direction::Forward)) {
            let (k, v) = kv.map_err(internal)?;
            let Some(id) = k.strip_prefix(b"~dead/") else { break };
            let Some(id) = std::str::from_utf8(id).ok().and_then(|i| i.parse::<u32>().ok()) else { continue };
            let dead = le_u64(&v);
            if id != active && dead * 2 >= self.segments.size(id).unwrap_or(0) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Compacts every sealed segment that is at least half dead, on the blocking pool; one
    /// sweep at a time, and a request made during a sweep runs another after it.
    fn compact_segments(self: &Arc<Self>) {
        self.compact_again.store(true, Ordering::Release);
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        tokio::task::spawn_blocking(move || {
            // Deletes come in bursts (garbage collection reaps in batches): waiting for the
            // burst to pass keeps compaction from copying blobs that are about to be deleted.
            std::thread::sleep(COMPACT_DELAY);
            while inner.compact_again.swap(false, Ordering::AcqRel) {
                let r =
                    inner.compactable().and_then(|ids| ids.into_iter().try_for_each(|id| inner.compact_segment(id)));
                if let Err(e) = r {
                    tracing::warn!(error = %e, "compacting segments");
                }
            }
            inner.compacting.store(false, Ordering::Release);
            if inner.compact_again.load(Ordering::Acquire) {
                inner.compact_segments();
            }
        });
    }

    /// Moves the live blobs of sealed segment `segment` to the active one, points their
    /// entries there and deletes the segment.
    fn compact_segment(&self, segment: u32) -> Result<()> {
        // A record sealed into it whose commit has not written its entry yet would look dead
        // and be left behind: wait for the next sweep.
        if self.segments.pending_in(segment) {
            self.compact_again.store(true, Ordering::Release);
            return Ok(());
        }
        let records = self.segments.records(segment).map_err(internal)?;
        // A walk that stops short of the end would leave blobs behind in a deleted file.
        let walked = records.last().map_or(0, |r| r.end());
        let size = self.segments.size(segment).map_err(internal)?;
        if walked != size {
            return Err(internal(format!("segment {segment}: records end at {walked} of {size} bytes; not compacted")));
        }
        let mut moved = vec![];
        let mut pending = vec![];
        for rec in records {
            let live = matches!(self.entry(&rec.key)?,
                Some(BlobEntry { location: Location::Segment { segment: s, offset }, .. }) if s == segment && offset == rec.offset);
            if live {
                let data = self.segments.read(segment, rec.offset, rec.len).map_err(internal)?;
                let copy = self.segments.append(&rec.key, &data).map_err(internal)?;
                moved.push((rec.key, rec.offset, rec.len, copy.segment(), copy.offset));
                pending.push(copy);
            }
        }
        let _g = self.segment_index.lock().map_err(internal)?;
        let blobs = self.cf(CF_BLOBS)?;
        let mut batch = WriteBatch::default();
        let mut kept = 0u64;
        // Copies of blobs deleted while they were being copied: dead from the start.
        let mut orphaned: HashMap<u32, u64> = HashMap::new();
        for (key, old, len, new_segment, new_offset) in &moved {
            match self.entry(key)? {
                Some(mut e) if e.location == (Location::Segment { segment, offset: *old }) => {
                    kept += e.size;
                    e.location = Location::Segment { segment: *new_segment, offset: *new_offset };
                    batch.put_cf(blobs, key, bincode::serialize(&e).map_err(internal)?);
                }
                _ => *orphaned.entry(*new_segment).or_default() += len,
            }
        }
        for (s, bytes) in &orphaned {
            batch.put_cf(blobs, dead_key(*s), (self.dead_in(*s)? + bytes).to_le_bytes());
        }
        batch.delete_cf(blobs, dead_key(segment));
        self.index_write(batch, &pending.iter().collect::<Vec<_>>(), true)?;
        drop(pending);
        if !orphaned.is_empty() {
            self.compact_again.store(true, Ordering::Release);
        }
        self.segments.remove(segment).map_err(internal)?;
        tracing::info!(segment, live_bytes = kept, "compacted a segment");
        Ok(())
    }

    /// Rewrites the inline column family with blob GC on, so that blob files holding deleted
    /// blobs are rewritten without them and their space returns to the disk.
    fn reclaim_inline_space(&self) -> Result<()> {
        let cf = self.cf(CF_INLINE)?;
        let reclaimed = self.deleted_inline.swap(0, Ordering::Relaxed);
        self.db
            .set_options_cf(
                cf,
                &[("enable_blob_garbage_collection", "true"), ("blob_garbage_collection_age_cutoff", "1.0")],
            )
            .map_err(internal)?;
        self.db.flush_cf(cf).map_err(internal)?;
        self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        let restored = self.db.set_options_cf(cf, &[("enable_blob_garbage_collection", "false")]).map_err(internal);
        tracing::info!(bytes = reclaimed, "reclaimed the space of deleted inline blobs");
        restored
    }

    fn synced_write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        crate::timed_fsync(|| self.db.write_opt(batch, &wo)).map_err(internal)
    }

    /// Writes `batch`, which holds the entries of the segment records `own`, with the low mark
    /// (see the `segment` module). Unless `sync`, the write is not flushed: the records were,
    /// and their entries can be made again from them.
    fn index_write(&self, mut batch: WriteBatch, own: &[&Pending<'_>], sync: bool) -> Result<()> {
        let mark = self.segments.low_mark(own).map_err(internal)?;
        batch.put_cf(self.cf(CF_BLOBS)?, LOW_MARK_KEY, encode_mark(mark));
        if sync {
            self.synced_write(batch)
        } else {
            self.db.write(batch).map_err(internal)
        }
    }

    /// Makes again the index entries of segment blobs that a crash took with it: every record
    /// past the low mark that survived is read, and indexed anew (with a fresh stamp) when no
    /// entry names it and its bytes hash to its key; any other record there is counted dead.
    /// Called at open, before anything else writes. A segment blob deleted while an older
    /// record's entry was still being written (so that the mark written with the deletion
    /// stayed below it) can come back this way; the collector's inventory walk finds it
    /// unreferenced and deletes it again.
    fn recover_index(self: &Arc<Self>) -> Result<()> {
        let blobs = self.cf(CF_BLOBS)?;
        let from = self.db.get_cf(blobs, LOW_MARK_KEY).map_err(internal)?;
        let mut batch = WriteBatch::default();
        let (mut indexed, mut dead_bytes) = (0u64, 0u64);
        // A node from before low marks were kept synced every entry: nothing to make again.
        if let Some((first, at)) = from.as_deref().and_then(decode_mark) {
            let mut seen = std::collections::HashSet::new();
            let mut dead: HashMap<u32, u64> = HashMap::new();
            for id in self.segments.ids().map_err(internal)?.into_iter().filter(|&id| id >= first) {
                let records = self.segments.records_from(id, if id == first { at } else { 0 }).map_err(internal)?;
                for rec in records {
                    let here = Location::Segment { segment: id, offset: rec.offset };
                    let data = match self.entry(&rec.key)? {
                        Some(e) if e.location == here => continue,
                        // Not named by an entry, and not indexed yet in this pass: a candidate.
                        None if !seen.contains(&rec.key) => {
                            Some(self.segments.read(id, rec.offset, rec.len).map_err(internal)?)
                        }
                        _ => None,
                    };
                    // The bytes of a candidate that hash to its key, else dead space.
                    let Some(data) = data.filter(|d| rec.key.parse::<Digest>().is_ok_and(|k| k.matches(d))) else {
                        *dead.entry(id).or_default() += rec.len;
                        continue;
                    };
                    let mut tree = TreeHasher::default();
                    tree.update(&data);
                    let sums = tree.finish();
                    let entry =
                        BlobEntry { size: rec.len, blake3: sums.blake3, stamp: self.next_stamp()?, location: here };
                    self.put_entry(&mut batch, &rec.key, &entry, &sums.units)?;
                    seen.insert(rec.key);
                    indexed += 1;
                }
            }
            for (id, bytes) in dead {
                batch.put_cf(blobs, dead_key(id), (self.dead_in(id)? + bytes).to_le_bytes());
                dead_bytes += bytes;
            }
        }
        self.index_write(batch, &[], true)?;
        if indexed > 0 || dead_bytes > 0 {
            tracing::warn!(
                indexed,
                dead_bytes,
                "indexed segment blobs the index lacked (lost in a crash, or deleted as the node stopped)"
            );
        }
        Ok(())
    }

    /// A stamp greater than every one this node gave before (see [`BlobEntry::stamp`]).
    fn next_stamp(&self) -> Result<u64> {
        let mut st = self.stamps.lock().map_err(internal)?;
        let stamp = now_ms().max(st.last + 1);
        if stamp > st.reserved {
            let reserved = stamp + STAMP_LEASE;
            let mut batch = WriteBatch::default();
            batch.put_cf(self.cf(CF_BLOBS)?, STAMP_KEY, reserved.to_le_bytes());
            self.synced_write(batch)?;
            st.reserved = reserved;
        }
        st.last = stamp;
        Ok(stamp)
    }

    /// Runs `f` holding blob `key`'s lock: commits and deletes of one blob run one at a time.
    fn with_blob_lock<T>(&self, key: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _locked = self.lock_blob(key)?;
        f()
    }

    /// Takes blob `key`'s lock, waiting while another holds it; held until the guard drops.
    fn lock_blob(&self, key: &str) -> Result<BlobLock<'_>> {
        let mut locked = self.committing.lock().map_err(internal)?;
        while locked.contains(key) {
            locked = self.unlocked.wait(locked).map_err(internal)?;
        }
        locked.insert(key.to_string());
        Ok(BlobLock { inner: self, key: key.to_string() })
    }

    /// Makes verified staged bytes a durable blob (see the crate docs for the order of steps).
    ///
    /// Commits of one blob run one at a time: the same blob pushed by several clients at once
    /// (CI jobs sharing a base layer) is stored once, and the others find it stored.
    fn commit(self: &Arc<Self>, st: Box<Staging>, digest: &Digest, checksums: Checksums) -> Result<Stored> {
        let key = digest.to_string();
        self.with_blob_lock(&key, || self.commit_one(st, digest, &key, checksums))
    }

    fn commit_one(
        self: &Arc<Self>,
        mut st: Box<Staging>,
        digest: &Digest,
        key: &str,
        checksums: Checksums,
    ) -> Result<Stored> {
        let size = st.size;
        if self.entry(key)?.is_some() {
            st.discard();
            return self.restamp(key);
        }
        let stamp = self.next_stamp()?;
        let mut entry = BlobEntry { size, blake3: checksums.blake3, stamp, location: Location::File };
        let mut record = None;
        // A copy of a blob this node is not read from first leaves the page cache now (its
        // staging said so when it began); an upload staged here, once the copies this node
        // sends of it are sent (see `BlobStore::note_copies_sent`).
        let drop_now = st.is_uncached();
        if size <= INLINE_THRESHOLD {
            let data = st.take_all().map_err(internal)?;
            let appended = self.segments.append(key, &data).map_err(internal)?;
            if drop_now {
                let at = Location::Segment { segment: appended.segment(), offset: appended.offset };
                self.drop_pages(digest, &at, size);
            }
            let segment = appended.segment();
            self.note_segment(segment);
            entry.location = Location::Segment { segment, offset: appended.offset };
            record = Some(appended);
        } else {
            st.sync().map_err(internal)?;
            if drop_now {
                st.drop_cached();
            }
            let path = self.blob_path(digest);
            let parent = path.parent().ok_or_else(|| internal("blob path has no parent"))?;
            create_dirs_durably(parent).map_err(internal)?;
            fs::rename(&st.path, &path).map_err(internal)?;
            sync_dir(parent).map_err(internal)?;
        }
        let mut batch = WriteBatch::default();
        self.put_entry(&mut batch, key, &entry, &checksums.units)?;
        match record {
            // The record's flush made the blob durable; its entry can be made again from it.
            Some(record) => self.index_write(batch, &[&record], false)?,
            None => self.synced_write(batch)?,
        }
        if entry.location != Location::File {
            st.discard();
        }
        self.count_written(digest, size);
        Ok(Stored { size, stamp })
    }

    /// Adds to `batch` the index writes of a blob stored afresh: its entry, its unit sums, and
    /// the end of any damage recorded against an earlier copy.
    fn put_entry(&self, batch: &mut WriteBatch, key: &str, entry: &BlobEntry, units: &UnitSums) -> Result<()> {
        let blobs = self.cf(CF_BLOBS)?;
        batch.put_cf(blobs, key, bincode::serialize(entry).map_err(internal)?);
        batch.put_cf(blobs, units_key(key), encode_units(units));
        batch.delete_cf(blobs, corrupt_key(key));
        Ok(())
    }

    /// Notes that a record went to segment `segment`: when that is a newer segment than the
    /// last one seen, the one just sealed may already be half dead, and a sweep looks.
    fn note_segment(self: &Arc<Self>, segment: u32) {
        if self.last_segment.fetch_max(segment, Ordering::AcqRel) < segment {
            self.compact_segments();
        }
    }

    /// Counts a blob of `size` bytes written.
    fn count_written(&self, digest: &Digest, size: u64) {
        metrics::counter!("berth_storage_blobs_written_total").increment(1);
        metrics::counter!("berth_storage_written_bytes_total").increment(size);
        if !self.keeps_cached(digest) {
            metrics::counter!("berth_storage_uncached_bytes_total").increment(size);
        }
    }

    /// Gives the stored copy of blob `key` a fresh stamp: a write that found it already stored
    /// links it as a copy younger than any the collector deleted. The caller holds the blob's
    /// lock; `segment_index` keeps a compaction from writing the entry back with its old stamp.
    fn restamp(&self, key: &str) -> Result<Stored> {
        let _g = self.segment_index.lock().map_err(internal)?;
        let mut entry = self.entry(key)?.ok_or_else(|| internal(format!("blob {key} vanished while locked")))?;
        entry.stamp = self.next_stamp()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_BLOBS)?, key, bincode::serialize(&entry).map_err(internal)?);
        self.synced_write(batch)?;
        Ok(Stored { size: entry.size, stamp: entry.stamp })
    }
}

#[async_trait]
impl BlobStore for StorageEngine {
    async fn stat(&self, digest: &Digest) -> Result<Option<Stored>> {
        Ok(self.entry(digest).await?.map(|e| Stored { size: e.size, stamp: e.stamp }))
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> Result<ByteStream> {
        let Some(entry) = self.entry(digest).await? else {
            return Err(RegistryError::new(ErrorCode::BlobUnknown, digest.to_string()));
        };
        let (first, last) = range.unwrap_or((0, entry.size.saturating_sub(1)));
        if entry.size == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        match entry.location {
            Location::Inline | Location::Segment { .. } => {
                let data = match self.inner.cached_small_bytes(digest, &entry) {
                    Some(data) => data,
                    None => {
                        let inner = self.inner.clone();
                        let d = digest.clone();
                        blocking(move || inner.checked_small_bytes(&d, entry, false)).await?.ok_or_else(|| {
                            RegistryError::new(
                                ErrorCode::BlobUnknown,
                                format!("{digest} is not stored here (or was damaged)"),
                            )
                        })?
                    }
                };
                let data = Bytes::from(data);
                let end = (last as usize + 1).min(data.len());
                let part = data.slice((first as usize).min(end)..end);
                Ok(futures::stream::once(async move { Ok(part) }).boxed())
            }
            Location::File => {
                let inner = self.inner.clone();
                let d = digest.clone();
                let size = entry.size;
                let opened = blocking(move || {
                    let file = fs::File::open(inner.blob_path(&d)).map_err(internal)?;
                    // A map past the end of a file faults; a blob file shorter than its entry
                    // was damaged outside Berth.
                    if file.metadata().map_err(internal)?.len() < size {
                        inner.quarantine(&d, "its file is shorter than the blob");
                        return Ok(None);
                    }
                    let Some(units) = inner.units_of(&d, &entry, &file)? else { return Ok(None) };
                    Ok(Some((file, units)))
                })
                .await?;
                let Some((file, units)) = opened else {
                    return Err(RegistryError::new(
                        ErrorCode::BlobUnknown,
                        format!("{digest} is not stored here (its copy was damaged)"),
                    ));
                };
                let (file, units) = (Arc::new(file), Arc::new(units));
                let end = (last + 1).min(size);
                // Whole units are read and checked, each mapped on the blocking pool while the
                // one before it is being sent; only the requested bytes of each go out. A unit
                // that does not check ends the stream with an error before any of its bytes.
                let units_wanted = (first / UNIT)..end.div_ceil(UNIT);
                let inner = self.inner.clone();
                let d = digest.clone();
                Ok(futures::stream::iter(units_wanted)
                    .map(move |k| {
                        let (file, units, inner, d) = (file.clone(), units.clone(), inner.clone(), d.clone());
                        async move {
                            tokio::task::spawn_blocking(move || {
                                let start = k * UNIT;
                                let len = (size - start).min(UNIT);
                                let data = read_mapped(&file, start, len as usize)?;
                                if !unit_crc_ok(&data, k, &units) {
                                    inner.quarantine(&d, &format!("unit {k} does not match its checksum"));
                                    return Err(io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        format!("{d}: stored bytes damaged at offset {start}"),
                                    ));
                                }
                                let from = first.max(start) - start;
                                let to = end.min(start + len) - start;
                                Ok(data.slice(from as usize..to as usize))
                            })
                            .await
                            .map_err(io::Error::other)?
                        }
                    })
                    .buffered(2)
                    .boxed())
            }
        }
    }

    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>> {
        let key = digest.to_string();
        let Some(entry) = self.inner.entry(&key)? else {
            return Ok(None);
        };
        if entry.size > limit {
            return Err(internal(format!("blob {key} is larger than {limit} bytes")));
        }
        if let Some(data) = self.inner.cached_small_bytes(digest, &entry) {
            return Ok(Some(Bytes::from(data)));
        }
        let inner = self.inner.clone();
        let digest = digest.clone();
        blocking(move || {
            let data = match entry.location {
                Location::File => {
                    let data = fs::read(inner.blob_path(&digest)).map_err(internal)?;
                    if blake3::hash(&data).as_bytes() != &entry.blake3 {
                        inner.quarantine(&digest, "its bytes do not match its checksum");
                        return Ok(None);
                    }
                    data
                }
                _ => match inner.checked_small_bytes(&digest, entry, false)? {
                    Some(d) => d,
                    None => return Ok(None),
                },
            };
            Ok(Some(Bytes::from(data)))
        })
        .await
    }

    #[tracing::instrument(name = "store.put", skip_all, fields(bytes = data.len()))]
    async fn put_small(&self, digest: &Digest, data: Bytes) -> Result<Stored> {
        let path = self.inner.upload_path(&format!("small-{}", uuid::Uuid::new_v4()));
        let st = Staging::create(path, self.inner.staged_in_memory.clone(), false);
        let mut st = Box::new(st.uncached_if(!self.inner.keeps_cached(digest)));
        if data.len() <= HASHED_ON_TASK && st.stays_in_memory(data.len() as u64) {
            // Hashed here (less than the hop to the blocking pool costs), kept in memory, and
            // committed by the committer.
            stage_small(&mut st, digest, data)?;
            let checksums = st.checksums();
            return self.commit_small(st, digest, checksums).await;
        }
        let (inner, digest) = (self.inner.clone(), digest.clone());
        blocking(move || {
            stage_small(&mut st, &digest, data)?;
            let checksums = st.checksums();
            inner.commit(st, &digest, checksums)
        })
        .await
    }

    #[tracing::instrument(name = "store.put", skip_all)]
    async fn put(&self, digest: &Digest, body: ByteStream, limit: u64) -> Result<Stored> {
        self.put_checked(digest, None, body, limit).await
    }

    async fn blake3(&self, digest: &Digest) -> Result<Option<[u8; 32]>> {
        Ok(self.entry(digest).await?.map(|e| e.blake3))
    }

    #[tracing::instrument(name = "store.put_copy", skip_all)]
    async fn put_copy(&self, digest: &Digest, blake3: [u8; 32], body: ByteStream, limit: u64) -> Result<Stored> {
        self.put_checked(digest, Some(blake3), body, limit).await
    }

    async fn upload_start(&self, id: &str) -> Result<Option<String>> {
        // The digest is not known yet: the blob stays cached until its copies are sent.
        self.start_upload(id, true, true).map(|()| None)
    }

    fn incarnation(&self) -> Option<u64> {
        Some(self.inner.incarnation)
    }

    #[tracing::instrument(name = "store.append", skip_all)]
    async fn upload_append(&self, id: &str, offset: Option<u64>, body: ByteStream, limit: u64) -> Result<u64> {
        self.append_to(id, offset, body, limit, true).await
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>> {
        match self.lock_upload(id).await {
            Ok(guard) => match &*guard {
                Slot::Ready(st) => Ok(Some(st.size)),
                _ => Ok(None),
            },
            Err(e) if e.code == ErrorCode::BlobUploadUnknown => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn upload_staged(&self, id: &str) -> Result<bool> {
        if !valid_upload_id(id) {
            return Ok(false);
        }
        let slot = self.inner.uploads.lock().map_err(internal)?.get(id).cloned();
        let path = self.inner.upload_path(id);
        Ok(match slot {
            Some(slot) => match slot.try_lock() {
                // In use: an append, a finish or a cancel is under way.
                Err(_) => true,
                Ok(guard) => match &*guard {
                    Slot::Ready(_) => true,
                    Slot::Gone => false,
                    Slot::Unloaded => path.exists(),
                },
            },
            None => path.exists(),
        })
    }

    /// Verifies the staged bytes and commits them, fsynced.
    async fn upload_finish(&self, id: &str, digest: &Digest) -> Result<Stored> {
        self.finish_upload(id, digest, None).await
    }

    async fn note_copies_sent(&self, digest: &Digest) {
        if self.inner.keeps_cached(digest) {
            return;
        }
        // The index lookup and a segment record's drop (a few clean pages) run on the calling
        // task, as lookups do; a file's drop, which may free a whole large blob's pages, runs
        // on the blocking pool.
        match self.entry(digest).await {
            Ok(Some(e)) if e.location == Location::File => {
                let (inner, digest) = (self.inner.clone(), digest.clone());
                let _ = blocking(move || {
                    inner.drop_pages(&digest, &e.location, e.size);
                    Ok(())
                })
                .await;
            }
            Ok(Some(e)) => self.inner.drop_pages(digest, &e.location, e.size),
            _ => {}
        }
    }

    async fn upload_cancel(&self, id: &str) -> Result<()> {
        let mut guard = self.lock_upload(id).await?;
        self.note_ended(id);
        *guard = Slot::Gone;
        self.forget_upload(id);
        let path = self.inner.upload_path(id);
        blocking(move || match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(internal(e)),
        })
        .await
    }

    async fn expire_uploads(&self, idle: Duration) -> Result<Vec<String>> {
        let cutoff = SystemTime::now().checked_sub(idle).unwrap_or(UNIX_EPOCH);
        // Uploads this process knows: idle by their last append. A locked one is receiving
        // bytes right now.
        let slots: Vec<(String, Arc<AsyncMutex<Slot>>)> =
            self.inner.uploads.lock().map_err(internal)?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut stale = vec![];
        for (id, slot) in &slots {
            if let Ok(guard) = slot.try_lock() {
                if let Slot::Ready(st) = &*guard {
                    if st.touched < cutoff {
                        stale.push(id.clone());
                    }
                }
            }
        }
        // Staging files left by an earlier process: idle by their modification time.
        let dir = self.inner.dir.join("uploads");
        let known: std::collections::HashSet<String> = slots.into_iter().map(|(k, _)| k).collect();
        let orphans = blocking(move || {
            let mut out = vec![];
            for e in fs::read_dir(&dir).map_err(internal)? {
                let e = e.map_err(internal)?;
                let name = e.file_name().to_string_lossy().into_owned();
                let modified = e.metadata().and_then(|m| m.modified()).map_err(internal)?;
                if modified < cutoff && !known.contains(&name) {
                    out.push(name);
                }
            }
            Ok(out)
        })
        .await?;
        for id in &orphans {
            let _ = fs::remove_file(self.inner.upload_path(id));
            self.note_ended(id);
        }
        for id in &stale {
            self.upload_cancel(id).await.ok();
        }
        stale.extend(orphans);
        Ok(stale)
    }

    async fn delete(&self, digest: &Digest, upto: Option<u64>) -> Result<Deleted> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        blocking(move || {
            let key = digest.to_string();
            inner.with_blob_lock(&key, || inner.delete_one(&digest, &key, upto))
        })
        .await
    }

    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>> {
        let inner = self.inner.clone();
        let start = after.map(Digest::to_string);
        blocking(move || {
            let blobs = inner.cf(CF_BLOBS)?;
            let from = start.as_deref().unwrap_or("");
            let mut out = vec![];
            for kv in inner.db.iterator_cf(blobs, IteratorMode::From(from.as_bytes(), Direction::Forward)) {
                let (k, v) = kv.map_err(internal)?;
                // Digest keys sort before the `~` bookkeeping keys.
                if k.starts_with(b"~") || out.len() >= n {
                    break;
                }
                if start.as_deref().is_some_and(|s| s.as_bytes() == &*k) {
                    continue;
                }
                let Ok(digest) = String::from_utf8_lossy(&k).parse::<Digest>() else { continue };
                let entry: BlobEntry = bincode::deserialize(&v).map_err(internal)?;
                out.push((digest, entry.stamp));
            }
            Ok(out)
        })
        .await
    }
}

impl Inner {
    /// Deletes blob `key` and reclaims its space, unless its copy is stamped after `upto`. The
    /// caller holds the blob's lock, which a write that gives the copy a fresh stamp takes too.
    fn delete_one(self: &Arc<Self>, digest: &Digest, key: &str, upto: Option<u64>) -> Result<Deleted> {
        let Some(entry) = self.entry(key)? else {
            return Ok(Deleted::default());
        };
        if upto.is_some_and(|u| entry.stamp > u) {
            return Ok(Deleted { kept: 1, ..Deleted::default() });
        }
        let done = Deleted { copies: 1, bytes: entry.size, stamp: Some(entry.stamp), ..Deleted::default() };
        if let Location::Segment { .. } = entry.location {
            return self.delete_from_segment(key).map(|_| done);
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_BLOBS)?, key);
        batch.delete_cf(self.cf(CF_BLOBS)?, units_key(key));
        if entry.location == Location::Inline {
            batch.delete_cf(self.cf(CF_INLINE)?, key);
        }
        self.synced_write(batch)?;
        if entry.location == Location::Inline {
            let deleted = self.deleted_inline.fetch_add(entry.size, Ordering::Relaxed) + entry.size;
            if deleted >= RECLAIM_AFTER && !self.reclaiming.swap(true, Ordering::AcqRel) {
                let inner = self.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = inner.reclaim_inline_space() {
                        tracing::warn!(error = %e, "reclaiming the space of deleted inline blobs");
                    }
                    inner.reclaiming.store(false, Ordering::Release);
                });
            }
        }
        if entry.location == Location::File {
            match fs::remove_file(self.blob_path(digest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(internal(e)),
            }
        }
        Ok(done)
    }
}

mod committer;
#[cfg(test)]
mod tests;
