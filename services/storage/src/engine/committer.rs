//! The committer: one thread per node that makes verified small blobs durable in batches.
//!
//! A small blob held in memory (an upload's or a copy's, verified on the task that received
//! it) is handed to this thread instead of the runtime's blocking pool. The thread takes every
//! blob queued meanwhile (up to [`MAX_BATCH`] of them, [`MAX_BATCH_BYTES`] in all), writes
//! their records to the active segment, flushes once, and writes all their index entries in
//! one RocksDB write. Each commit used to take a blocking-pool thread of its own: under a
//! burst of pushes some thirty threads woke, met on the pool's lock and on the segments'
//! flush lock, and slept again in turn, and every blob made a RocksDB write of its own.
//!
//! A batch holds the locks of its blobs (see `Inner::lock_blob`) from before it looks at
//! their entries until their entries are written, as a commit on its own does; a blob queued
//! twice goes in a later batch than its first (the first commits it, the second finds it
//! stored). The queue has no bound of its own: what waits in it is staged in memory, which
//! the node's staging budget bounds (`staging::MEMORY_BUDGET`).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Weak};

use berth_core::error::Result;
use berth_core::{Digest, RegistryError, Stored};
use rocksdb::WriteBatch;
use tokio::sync::oneshot;

use super::{internal, BlobEntry, BlobLock, Inner, Location};
use crate::integrity::Checksums;
use crate::segment::{Pending, Written};
use crate::staging::Staging;

/// Most blobs committed in one batch.
const MAX_BATCH: usize = 64;
/// Most bytes committed in one batch (a batch takes one more blob past it).
const MAX_BATCH_BYTES: u64 = 16 << 20;

/// A verified blob to commit, and where its outcome goes.
pub(super) struct Job {
    pub st: Box<Staging>,
    pub digest: Digest,
    /// The digest as the index's key.
    pub key: String,
    pub checksums: Checksums,
    pub reply: oneshot::Sender<Result<Stored>>,
}

/// Starts the committer thread of the engine `inner` and returns its queue, when the engine
/// is opened on a Tokio runtime (the thread starts compactions on its blocking pool); without
/// one, commits run where they are called. The thread ends when the engine is dropped (its
/// queue with it).
pub(super) fn start(inner: Weak<Inner>) -> io::Result<Option<Sender<Job>>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return Ok(None) };
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("berth-commit".into()).spawn(move || {
        let _entered = runtime.enter();
        run(&inner, &rx)
    })?;
    Ok(Some(tx))
}

fn run(inner: &Weak<Inner>, rx: &Receiver<Job>) {
    // Jobs put off to the next batch, their blob being in the one taken.
    let mut later: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match later.pop_front() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut keys = HashSet::from([first.key.clone()]);
        let mut bytes = first.st.size;
        let mut batch = vec![first];
        let mut put_off = vec![];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Some(job) = later.pop_front().or_else(|| rx.try_recv().ok()) else { break };
            if keys.insert(job.key.clone()) {
                bytes += job.st.size;
                batch.push(job);
            } else {
                put_off.push(job);
            }
        }
        later.extend(put_off);
        // The engine is let go before anyone hears back: a caller that drops it on hearing
        // finds it closed (its RocksDB lock released), not held by this thread a while longer.
        let outcomes = match inner.upgrade() {
            Some(inner) => inner.commit_batch(batch),
            None => batch.into_iter().map(|job| (job.reply, Err(internal("the storage engine is closing")))).collect(),
        };
        for (reply, outcome) in outcomes {
            let _ = reply.send(outcome);
        }
    }
}

/// A blob of a batch whose record is written, waiting for the flush and its entry.
struct Fresh<'a> {
    job: Job,
    entry: BlobEntry,
    record: Pending<'a>,
}

type Outcome = (oneshot::Sender<Result<Stored>>, Result<Stored>);

/// The outcome of a job refused with `e`, its staged bytes let go.
fn refused(mut job: Job, e: RegistryError) -> Outcome {
    job.st.discard();
    (job.reply, Err(e))
}

impl Inner {
    /// Queues verified staged bytes `st` of `digest` for the committer; the receiver hears
    /// the commit's outcome. `Err(st)` when there is no committer (the engine is still
    /// opening, or the thread is gone): the caller commits on its own.
    pub(super) fn queue_commit(
        &self,
        st: Box<Staging>,
        digest: Digest,
        checksums: Checksums,
    ) -> std::result::Result<oneshot::Receiver<Result<Stored>>, (Box<Staging>, Checksums)> {
        let Some(queue) = self.committer.get() else { return Err((st, checksums)) };
        let (reply, outcome) = oneshot::channel();
        let key = digest.to_string();
        match queue.send(Job { st, digest, key, checksums, reply }) {
            Ok(()) => Ok(outcome),
            Err(mpsc::SendError(job)) => Err((job.st, job.checksums)),
        }
    }

    /// Commits a batch of small blobs with distinct digests (see the module docs).
    fn commit_batch(self: &Arc<Self>, jobs: Vec<Job>) -> Vec<Outcome> {
        metrics::histogram!("berth_storage_commit_batch_size").record(jobs.len() as f64);
        let mut out: Vec<Outcome> = Vec::with_capacity(jobs.len());
        let mut locks: Vec<BlobLock<'_>> = Vec::with_capacity(jobs.len());
        let mut fresh: Vec<Fresh<'_>> = Vec::with_capacity(jobs.len());
        let mut last: Option<Written> = None;
        for mut job in jobs {
            let lock = match self.lock_blob(&job.key) {
                Ok(lock) => lock,
                Err(e) => {
                    out.push(refused(job, e));
                    continue;
                }
            };
            match self.entry(&job.key) {
                Ok(None) => {}
                // Stored already (by a commit outside the committer): this copy links to it.
                Ok(Some(_)) => {
                    job.st.discard();
                    out.push((job.reply, self.restamp(&job.key)));
                    continue;
                }
                Err(e) => {
                    out.push(refused(job, e));
                    continue;
                }
            }
            locks.push(lock);
            let written = self.next_stamp().and_then(|stamp| {
                let data = job.st.take_all().map_err(internal)?;
                let (record, written) = self.segments.write(&job.key, &data).map_err(internal)?;
                let location = Location::Segment { segment: record.segment(), offset: record.offset };
                Ok((BlobEntry { size: job.st.size, blake3: job.checksums.blake3, stamp, location }, record, written))
            });
            match written {
                Ok((entry, record, written)) => {
                    last = Some(written);
                    fresh.push(Fresh { job, entry, record });
                }
                Err(e) => out.push(refused(job, e)),
            }
        }
        if let Some(last) = last {
            match self.segments.flush(&last).map_err(internal).and_then(|()| self.index_batch(&fresh)) {
                Ok(()) => out.extend(fresh.into_iter().map(|f| self.committed(f))),
                Err(e) => out.extend(fresh.into_iter().map(|f| refused(f.job, e.clone()))),
            }
        }
        drop(locks);
        out
    }

    /// Writes the index entries of the flushed records `fresh`, with the low mark.
    fn index_batch(&self, fresh: &[Fresh<'_>]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for f in fresh {
            self.put_entry(&mut batch, &f.job.key, &f.entry, &f.job.checksums.units)?;
        }
        let records: Vec<&Pending<'_>> = fresh.iter().map(|f| &f.record).collect();
        self.index_write(batch, &records, false)
    }

    /// What is left of a blob of a batch once its entry is written: its pages dropped when no
    /// read asks this node for it first, a sweep of compactions when a segment was sealed.
    fn committed(self: &Arc<Self>, mut f: Fresh<'_>) -> Outcome {
        let (size, stamp) = (f.entry.size, f.entry.stamp);
        if f.job.st.is_uncached() {
            self.drop_pages(&f.job.digest, &f.entry.location, size);
        }
        self.note_segment(f.record.segment());
        f.job.st.discard();
        self.count_written(&f.job.digest, size);
        (f.job.reply, Ok(Stored { size, stamp }))
    }
}
