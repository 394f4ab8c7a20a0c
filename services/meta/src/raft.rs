//! openraft glue: the type configuration, the RocksDB log store, and the state machine over
//! [`crate::state`] with its snapshots. The network is in [`crate::network`].

// openraft's `StorageError` is what its traits return; its size is not ours to change.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome};
use crate::state::{StateView, Tx, CF_STATE, KEY_APPLIED, KEY_MEMBERSHIP};

/// A metadata node's id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Berth's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Column family of the Raft log (index, big-endian → entry).
pub const CF_LOG: &str = "log";
/// Column family of Raft's own durable state (vote, committed, last purged).
pub const CF_RAFT: &str = "raft";

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// The last applied log id and membership, as openraft asks for them.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(AnyError::new(&e)).into()
}

/// Runs blocking RocksDB work off the reactor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(write_err)?
}

fn cf<'a>(db: &'a DB, name: &str) -> StoreResult<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| write_err(std::io::Error::other(format!("column family {name} missing"))))
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

// ---- log store ------------------------------------------------------------------------------

/// The Raft log in RocksDB; every append is fsynced before Raft is told it is durable.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    recent: Arc<Mutex<Recent>>,
}

/// Encoded bytes of the newest log entries kept in memory, at most. Reads back ask for the
/// last few entries (a follower that keeps up is at most `max_payload_entries` behind), so a
/// little covers them; a follower further behind is read from RocksDB as before.
const RECENT_BYTES: usize = 2 << 20;

/// The newest entries of the log, as appended: each entry is read back soon after its append,
/// by replication (on the leader) and by the state machine (on every node), and answering
/// those reads from here saves an iterator over RocksDB and the decoding of every entry.
///
/// The entries held are always the log's last ones without a gap: appends add at the end,
/// truncation cuts the end, purging and the memory bound take from the front. So a read
/// whose first index is held is answered whole from here, exactly as RocksDB would answer it.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    /// Entries from `start` up to `end`, if `start` is held.
    fn read(&self, start: u64, end: Bound<u64>) -> Option<Vec<Entry<TypeConfig>>> {
        let skip = usize::try_from(start.checked_sub(self.first()?)?).ok()?;
        if skip >= self.entries.len() {
            return None;
        }
        let wanted = (Bound::Included(start), end);
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take_while(|(e, _)| wanted.contains(&e.log_id.index))
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        // openraft appends right after the log's last entry, having truncated a conflicting
        // tail first. Anything else (the first append after a start, or after a truncation
        // below what is held) begins a new run: what was held is no longer the log's end.
        if self.entries.back().is_some_and(|(e, _)| e.log_id.index + 1 != entry.log_id.index) {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > RECENT_BYTES {
            let Some((_, n)) = self.entries.pop_front() else { break };
            self.bytes -= n;
        }
    }

    /// Forgets entries from `index` on.
    fn truncate(&mut self, index: u64) {
        let keep = self.entries.partition_point(|(e, _)| e.log_id.index < index);
        self.bytes -= self.entries.drain(keep..).map(|(_, n)| n).sum::<usize>();
    }

    /// Forgets entries up to `index`.
    fn purge(&mut self, index: u64) {
        let gone = self.entries.partition_point(|(e, _)| e.log_id.index <= index);
        self.bytes -= self.entries.drain(..gone).map(|(_, n)| n).sum::<usize>();
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

fn lock(recent: &Mutex<Recent>) -> std::sync::MutexGuard<'_, Recent> {
    recent.lock().unwrap_or_else(|poisoned| {
        // Whatever a panic left half done is dropped; empty is always right (reads miss).
        let mut r = poisoned.into_inner();
        r.clear();
        recent.clear_poison();
        r
    })
}

impl LogStore {
    /// A log store over `db` (with the [`CF_LOG`] and [`CF_RAFT`] families).
    pub fn new(db: Arc<DB>) -> LogStore {
        LogStore { db, recent: Arc::default() }
    }

    fn get_raft<T: for<'de> Deserialize<'de>>(&self, k: &str) -> StoreResult<Option<T>> {
        match self.db.get_cf(cf(&self.db, CF_RAFT)?, k).map_err(read_err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    async fn put_raft<T: Serialize>(&self, k: &'static str, v: &T) -> StoreResult<()> {
        let bytes = serde_json::to_vec(v).map_err(write_err)?;
        let db = self.db.clone();
        blocking(move || db.put_cf_opt(cf(&db, CF_RAFT)?, k, bytes, &synced()).map_err(write_err)).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        if let Some(entries) = lock(&self.recent).read(start, end) {
            return Ok(entries);
        }
        // A short range (what replication asks for while followers keep up: entries just
        // appended, still in RocksDB's memory) is read on the calling task, where a hop to the
        // blocking pool and back cost more than the read; a long one (a follower catching up,
        // perhaps from files on the disk) on the blocking pool.
        let short = match end {
            Bound::Included(e) => e.saturating_sub(start) < INLINE_ENTRIES,
            Bound::Excluded(e) => e.saturating_sub(start) <= INLINE_ENTRIES,
            Bound::Unbounded => false,
        };
        if short {
            return read_entries(&self.db, start, end);
        }
        let db = self.db.clone();
        blocking(move || read_entries(&db, start, end)).await
    }
}

/// Log entries read or applied on the calling task at most (see `try_get_log_entries` and
/// `apply`).
const INLINE_ENTRIES: u64 = 64;

/// The log entries from `start` up to `end`.
fn read_entries(db: &DB, start: u64, end: Bound<u64>) -> StoreResult<Vec<Entry<TypeConfig>>> {
    let mut out = vec![];
    let from = start.to_be_bytes();
    for item in db.iterator_cf(cf(db, CF_LOG)?, IteratorMode::From(&from, Direction::Forward)) {
        let (k, v) = item.map_err(read_err)?;
        let idx =
            u64::from_be_bytes(k.as_ref().try_into().map_err(|_| read_err(std::io::Error::other("bad log key")))?);
        if !(Bound::Included(start), end).contains(&idx) {
            break;
        }
        out.push(serde_json::from_slice(&v).map_err(read_err)?);
    }
    Ok(out)
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.get_raft("purged")?;
        let last = match self.db.iterator_cf(cf(&self.db, CF_LOG)?, IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        self.put_raft("vote", vote).await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.get_raft("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        // Only a hint that lets a restart re-apply committed entries before an election; the
        // log itself is durable. Not fsynced, so a commit costs one fsync (the append), not two.
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.db.put_cf(cf(&self.db, CF_RAFT)?, "committed", bytes).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(self.get_raft::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = vec![];
        let mut appended = vec![];
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(write_err)?;
            let index = e.log_id.index;
            appended.push((v.len(), e));
            encoded.push((index.to_be_bytes(), v));
        }
        let db = self.db.clone();
        let r = blocking(move || {
            let mut batch = WriteBatch::default();
            let log = cf(&db, CF_LOG)?;
            for (k, v) in encoded {
                batch.put_cf(log, k, v);
            }
            db.write_opt(batch, &synced()).map_err(write_err)
        })
        .await;
        match &r {
            Ok(()) => {
                // Held before Raft learns of the append, so every read after it finds them.
                let mut recent = lock(&self.recent);
                for (size, e) in appended {
                    recent.push(e, size);
                }
                drop(recent);
                callback.log_io_completed(Ok(()));
            }
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        r
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        lock(&self.recent).truncate(log_id.index);
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf(&db, CF_LOG)?, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
            db.write_opt(batch, &synced()).map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let purged = serde_json::to_vec(&log_id).map_err(write_err)?;
        lock(&self.recent).purge(log_id.index);
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&db, CF_RAFT)?, "purged", purged);
            batch.delete_range_cf(cf(&db, CF_LOG)?, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
            db.write_opt(batch, &synced()).map_err(write_err)
        })
        .await
    }
}

// ---- state machine --------------------------------------------------------------------------

/// The state machine: applies commands to the state column family and builds snapshots.
#[derive(Clone)]
pub struct StateMachine {
    view: StateView,
    snapshot_path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl StateMachine {
    /// A state machine over `view`, keeping its latest snapshot at `snapshot_path`.
    pub fn new(view: StateView, snapshot_path: PathBuf) -> StateMachine {
        StateMachine { view, snapshot_path }
    }

    fn applied(&self) -> StoreResult<AppliedState> {
        let applied = self.view.get(KEY_APPLIED).map_err(read_err)?;
        let membership = self.view.get(KEY_MEMBERSHIP).map_err(read_err)?.unwrap_or_default();
        Ok((applied, membership))
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old file or the new one,
/// complete: written beside it, fsynced, renamed over it, and the directory fsynced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Applies `entries` in order, each with its applied log id in the same batch; the batches are
/// not fsynced: the log is, and a crash replays what was lost.
fn apply_entries(view: &StateView, entries: Vec<Entry<TypeConfig>>) -> StoreResult<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut tx = Tx::new(view);
        let mut extra: Vec<(&[u8], Vec<u8>)> =
            vec![(KEY_APPLIED, serde_json::to_vec(&Some(entry.log_id)).map_err(write_err)?)];
        let outcome = match &entry.payload {
            EntryPayload::Normal(cmd) => tx.apply(cmd).map_err(write_err)?,
            EntryPayload::Blank => Outcome::Done,
            EntryPayload::Membership(m) => {
                let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                extra.push((KEY_MEMBERSHIP, serde_json::to_vec(&sm).map_err(write_err)?));
                Outcome::Done
            }
        };
        view.db().write(tx.into_batch(&extra).map_err(write_err)?).map_err(write_err)?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let view = self.view.clone();
        let path = self.snapshot_path.clone();
        blocking(move || {
            // One RocksDB snapshot gives the data and the applied log id at the same instant.
            let db = view.db().clone();
            let snap = db.snapshot();
            let state = cf(&db, CF_STATE)?;
            let decode = |k: &[u8]| -> StoreResult<Option<Vec<u8>>> { snap.get_cf(state, k).map_err(read_err) };
            let applied: Option<LogId<NodeId>> = match decode(KEY_APPLIED)? {
                Some(v) => serde_json::from_slice(&v).map_err(read_err)?,
                None => None,
            };
            let membership: StoredMembership<NodeId, BasicNode> = match decode(KEY_MEMBERSHIP)? {
                Some(v) => serde_json::from_slice(&v).map_err(read_err)?,
                None => StoredMembership::default(),
            };
            let pairs = view.dump(&snap).map_err(read_err)?;
            let data = serde_json::to_vec(&pairs).map_err(read_err)?;
            let snapshot_id = match &applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, pairs.len()),
                None => format!("none-{}", pairs.len()),
            };
            let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
            let file = SnapshotFile { meta: meta.clone(), data: data.clone() };
            write_durably(&path, &serde_json::to_vec(&file).map_err(write_err)?).map_err(write_err)?;
            Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StoreResult<AppliedState> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // A few light commands (a push's or a pull's writes) are applied on the calling task:
        // their keys are in memory and the writes are not fsynced, so a hop to the blocking
        // pool and back cost more than the work. Sweeps, membership changes and long batches
        // (a restart re-applying the log) go to the blocking pool.
        let light = entries.len() as u64 <= INLINE_ENTRIES
            && entries.iter().all(|e| match &e.payload {
                EntryPayload::Normal(cmd) => cmd.is_light(),
                EntryPayload::Blank => true,
                EntryPayload::Membership(_) => false,
            });
        if light {
            return apply_entries(&self.view, entries);
        }
        let view = self.view.clone();
        blocking(move || apply_entries(&view, entries)).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(vec![])))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = serde_json::from_slice(&data).map_err(read_err)?;
        let view = self.view.clone();
        let path = self.snapshot_path.clone();
        let meta = meta.clone();
        blocking(move || {
            let db = view.db().clone();
            let state = cf(&db, CF_STATE)?;
            let mut batch = WriteBatch::default();
            // Everything below '~' is replicated state; '~' keys are rewritten just after.
            batch.delete_range_cf(state, [0u8].as_slice(), b"~".as_slice());
            for (k, v) in &pairs {
                batch.put_cf(state, k, v);
            }
            batch.put_cf(state, KEY_APPLIED, serde_json::to_vec(&meta.last_log_id).map_err(write_err)?);
            batch.put_cf(state, KEY_MEMBERSHIP, serde_json::to_vec(&meta.last_membership).map_err(write_err)?);
            db.write_opt(batch, &synced()).map_err(write_err)?;
            // The state above is durable before the file that describes it replaces the old one,
            // and the replacement is atomic: a crash leaves the old snapshot or the new, whole.
            let file = SnapshotFile { meta, data };
            write_durably(&path, &serde_json::to_vec(&file).map_err(write_err)?).map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let path = self.snapshot_path.clone();
        blocking(move || match std::fs::read(&path) {
            Ok(bytes) => {
                let file: SnapshotFile = serde_json::from_slice(&bytes).map_err(read_err)?;
                Ok(Some(Snapshot { meta: file.meta, snapshot: Box::new(Cursor::new(file.data)) }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_err(e)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(entries: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    /// The entries held answer a read exactly as the log would, or not at all.
    #[test]
    fn recent_entries_are_the_logs_end_without_a_gap() {
        let mut r = Recent::default();
        assert_eq!(indexes(r.read(1, Bound::Unbounded)), None);
        for i in 1..=5 {
            r.push(entry(i), 10);
        }
        assert_eq!(indexes(r.read(2, Bound::Included(4))), Some(vec![2, 3, 4]));
        assert_eq!(indexes(r.read(2, Bound::Excluded(4))), Some(vec![2, 3]));
        assert_eq!(indexes(r.read(3, Bound::Unbounded)), Some(vec![3, 4, 5]));
        assert_eq!(indexes(r.read(5, Bound::Included(9))), Some(vec![5]));
        // Below what is held, or past the end: the log itself answers.
        assert_eq!(indexes(r.read(0, Bound::Unbounded)), None);
        assert_eq!(indexes(r.read(6, Bound::Unbounded)), None);

        // A conflicting tail is cut and written again.
        r.truncate(4);
        assert_eq!(indexes(r.read(2, Bound::Unbounded)), Some(vec![2, 3]));
        r.push(entry(4), 10);
        assert_eq!(indexes(r.read(1, Bound::Unbounded)), Some(vec![1, 2, 3, 4]));

        // An append that does not follow what is held starts over.
        r.push(entry(9), 10);
        assert_eq!(indexes(r.read(1, Bound::Unbounded)), None);
        assert_eq!(indexes(r.read(9, Bound::Unbounded)), Some(vec![9]));
        assert_eq!(r.bytes, 10);

        r.push(entry(10), 10);
        r.purge(9);
        assert_eq!(indexes(r.read(9, Bound::Unbounded)), None);
        assert_eq!(indexes(r.read(10, Bound::Unbounded)), Some(vec![10]));
        assert_eq!(r.bytes, 10);

        // The memory bound takes the oldest first.
        let big = RECENT_BYTES / 2 + 1;
        r.push(entry(11), big);
        r.push(entry(12), big);
        assert_eq!(indexes(r.read(12, Bound::Unbounded)), Some(vec![12]));
        assert_eq!(indexes(r.read(10, Bound::Unbounded)), None);
        assert_eq!(r.bytes, big);
    }
}
