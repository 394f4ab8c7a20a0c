//! Garbage collection: the job that turns the metadata service's reference counts into
//! deleted bytes (the bookkeeping is described in [`crate::state`]).
//!
//! One job runs for the whole registry, where the metadata service leads: the only node of
//! `berth standalone`, the leader of a cluster's metadata group (`berth meta`), with a blob
//! store that reaches every storage node that is not dead. A round:
//! - walks a page of the storage inventory and notes blobs the metadata service has no
//!   record of as strays (they become deletion candidates);
//! - removes loose links past the grace period and fences the blobs no repository links any
//!   more, raising the reap floor to the cutoff, in one Raft write;
//! - deletes each fenced blob on every storage node that answers, only copies stamped at or
//!   before the floor, and then lifts its fence.
//!
//! It never stops writes: a blob being deleted is fenced, nothing else. What it has fenced
//! stays fenced in the replicated state until its copies are gone, so a leader that takes over
//! half way finishes the deletions of its predecessor (its first step returns the fences left
//! over, with a floor at least as high): nothing is leaked. And since no link may name a copy
//! at or below the floor, and no copy above it is deleted, nothing linked is lost, however a
//! collection, a push of the same blob and a change of leader interleave.
//!
//! A storage node that is dead while a blob is deleted, or fails to answer, keeps its copy, and
//! the fence is lifted all the same (one failing node must not stop collection everywhere).
//! That copy is stamped at or below the floor, so no link can name it while no repository
//! links the blob; once the node answers again the inventory walk finds it as a stray, and it
//! is collected a grace period later. Copies kept because a write stamped them after the floor
//! end the same way, unless a push links them.
//!
//! **Clocks.** The cutoff is the leader's clock less the grace period; stamps are the storage
//! nodes' clocks. Skew between them never makes the collector delete a copy that is linked
//! (the floor check is exact); a storage clock behind the leader's by more than the grace
//! period would make fresh copies look old, and their links would be refused. Clocks are
//! assumed within the grace period (an hour by default) of each other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::error::Result;
use berth_core::store::GcReport;
use berth_core::{now_ms, BlobStore, Deleted, Digest};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Mutex;

use crate::MetaService;

/// Blobs fenced and deleted per round at most; bounds the work of one Raft command.
pub const REAP_BATCH: usize = 256;

/// Stored blobs compared with the metadata per round (a page of each storage node's inventory,
/// merged): a full pass over a million blobs takes a thousand rounds, about eight hours at the
/// default of one round every 30 s, with a small, steady cost. `berth admin gc` walks it whole.
pub const INVENTORY_PAGE: usize = 1000;

/// Blobs deleted, stated or released at once: each deletion waits for every storage node's
/// synced write.
const AT_ONCE: usize = 16;

/// Blobs a dry run looks at, at most (its answer says how many it found up to this).
const PREVIEW_LIMIT: usize = 1_000_000;

/// How long a version deleted through the packages API stays restorable, unless configured.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Rounds an on-demand run makes at most before it reports (the background rounds go on).
const MAX_RUN_ROUNDS: u64 = 100_000;

/// What one fencing step gave: the blobs to delete, and the reap floor (only copies stamped at
/// or before it may be deleted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reap {
    /// Blobs fenced, this step's and any an earlier step left.
    pub fenced: Vec<Digest>,
    /// The reap floor after this step.
    pub floor: u64,
    /// Loose links this step removed.
    pub unlinked: usize,
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcRound {
    /// Fences lifted: blobs whose copies (on the nodes that answered) are gone.
    pub released: usize,
    /// Blobs of which this round deleted at least one copy.
    pub deleted: usize,
    /// Bytes those blobs held, one copy each.
    pub freed_bytes: u64,
    /// Copies deleted across the storage nodes, and their bytes; copies kept, and nodes that
    /// did not answer.
    pub copies: Deleted,
    /// Fenced blobs left fenced: no storage node answered.
    pub undone: usize,
    /// Loose links removed.
    pub unlinked: usize,
    /// Stored blobs found unknown to the metadata service.
    pub strays: usize,
    /// Deleted versions purged: past the retention period, deleted for good.
    pub purged: usize,
}

/// The garbage collector of one registry.
pub struct Collector {
    blobs: Arc<dyn BlobStore>,
    meta: MetaService,
    grace: Duration,
    /// Where the next inventory page starts (`None`: at the beginning).
    inventory_cursor: Mutex<Option<Digest>>,
    /// Held by a round or a run: one at a time.
    busy: Mutex<()>,
    /// Time between background rounds; `None`: only on demand.
    interval: Option<Duration>,
    /// How long deleted versions stay restorable before a round purges them.
    retention: Duration,
}

impl Collector {
    /// A collector that deletes from `blobs` what has been unreferenced in `meta` for at
    /// least `grace`.
    /// Background rounds come every `interval`: by default (`None`) every half grace period
    /// (between a quarter second and 30 s); zero means only on demand.
    pub fn new(blobs: Arc<dyn BlobStore>, meta: MetaService, grace: Duration, interval: Option<Duration>) -> Collector {
        let interval = match interval {
            None => Some(Self::default_interval(grace)),
            Some(i) if i.is_zero() => None,
            Some(i) => Some(i),
        };
        Collector {
            blobs,
            meta,
            grace,
            inventory_cursor: Mutex::new(None),
            busy: Mutex::new(()),
            interval,
            retention: DEFAULT_RETENTION,
        }
    }

    /// Keeps versions deleted through the packages API restorable for `retention` (30 days
    /// unless set); then a round purges them, and their blobs are collected a grace period
    /// later.
    pub fn with_retention(mut self, retention: Duration) -> Collector {
        self.retention = retention;
        self
    }

    /// How long deleted versions stay restorable.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Time between background rounds when none is given: half the grace period, between a
    /// quarter second and 30 s.
    pub fn default_interval(grace: Duration) -> Duration {
        (grace / 2).clamp(Duration::from_millis(250), Duration::from_secs(30))
    }

    /// Time between background rounds; `None`: collection runs only on demand.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// One background round: a page of the inventory for strays, then one batch of deletions
    /// (which goes ahead when the inventory could not be read).
    pub async fn round(&self) -> Result<GcRound> {
        let _busy = self.busy.lock().await;
        let strays = {
            let mut cursor = self.inventory_cursor.lock().await;
            match self.strays_in_page(cursor.as_ref(), true).await {
                Ok((found, next)) => {
                    *cursor = next;
                    found.len()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "comparing the storage inventory with the metadata");
                    0
                }
            }
        };
        let mut done = self.reap_batch().await?;
        done.strays = strays;
        Ok(done)
    }

    /// One background round, logged.
    pub async fn logged_round(&self) {
        match self.round().await {
            Ok(r) if r.released > 0 || r.strays > 0 || r.undone > 0 || r.unlinked > 0 || r.purged > 0 => {
                tracing::info!(
                    purged = r.purged,
                    deleted = r.deleted,
                    freed_bytes = r.freed_bytes,
                    copies = r.copies.copies,
                    copy_bytes = r.copies.bytes,
                    kept = r.copies.kept,
                    unreached = r.copies.unreached,
                    undone = r.undone,
                    unlinked = r.unlinked,
                    strays = r.strays,
                    "garbage collection"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "garbage collection"),
        }
    }

    /// Runs collection to the end of what is collectable now, or with `dry_run` only counts
    /// it: the blobs past the grace period and their bytes, and the stored blobs no record
    /// knows of (which a run notes, to be collected a grace period later).
    pub async fn collect(&self, dry_run: bool) -> Result<GcReport> {
        let started = Instant::now();
        let _busy = self.busy.lock().await;
        let mut report = if dry_run { self.preview().await? } else { self.run().await? };
        report.dry_run = dry_run;
        report.millis = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Deletion rounds until one changes nothing, then a whole inventory walk for strays.
    async fn run(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        loop {
            let r = self.reap_batch().await?;
            report.rounds += 1;
            report.blobs += r.deleted as u64;
            report.bytes += r.freed_bytes;
            report.copies += u64::from(r.copies.copies);
            report.copy_bytes += r.copies.bytes;
            report.kept += u64::from(r.copies.kept);
            if r.undone > 0 {
                return Err(berth_core::RegistryError::new(
                    berth_core::ErrorCode::Unknown,
                    format!("no storage node answered for {} blobs; they stay fenced", r.undone),
                )
                .with_status(503));
            }
            if (r.released == 0 && r.unlinked == 0 && r.purged == 0) || report.rounds >= MAX_RUN_ROUNDS {
                break;
            }
        }
        let (strays, bytes) = self.walk_inventory(true).await?;
        report.strays = strays;
        report.stray_bytes = bytes;
        Ok(report)
    }

    /// What a run would delete now, and the strays it would note.
    async fn preview(&self) -> Result<GcReport> {
        let candidates = self.meta.reap_preview(self.grace, PREVIEW_LIMIT).await?;
        let mut report = GcReport::default();
        // A blob no node holds any more (its deletion half done) frees nothing.
        for size in self.sizes(candidates).await?.into_iter().flatten() {
            report.blobs += 1;
            report.bytes += size;
        }
        let (strays, bytes) = self.walk_inventory(false).await?;
        report.strays = strays;
        report.stray_bytes = bytes;
        Ok(report)
    }

    /// The size of each of `blobs` in storage (`None`: not stored).
    async fn sizes(&self, blobs: Vec<Digest>) -> Result<Vec<Option<u64>>> {
        futures::stream::iter(blobs)
            .map(|d| async move { Ok::<_, berth_core::RegistryError>(self.blobs.stat(&d).await?.map(|s| s.size)) })
            .buffer_unordered(AT_ONCE)
            .try_collect()
            .await
    }

    /// Purges deleted versions past the retention period, then fences a batch and deletes it
    /// on every storage node.
    async fn reap_batch(&self) -> Result<GcRound> {
        let purged = self.meta.purge_deleted(self.retention, REAP_BATCH).await?;
        let reap = self.meta.begin_reap(self.grace, REAP_BATCH).await?;
        let floor = reap.floor;
        let outcomes: Vec<(Digest, Result<Deleted>)> = futures::stream::iter(reap.fenced)
            .map(|d| async move {
                let r = self.blobs.delete(&d, Some(floor)).await;
                (d, r)
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        let mut done = GcRound { unlinked: reap.unlinked, purged, ..GcRound::default() };
        let mut lift = vec![];
        for (d, r) in outcomes {
            match r {
                Ok(copies) => {
                    if copies.copies > 0 {
                        done.deleted += 1;
                        done.freed_bytes += copies.bytes / u64::from(copies.copies);
                    }
                    done.copies = done.copies.and(copies);
                    lift.push(d);
                }
                Err(e) => {
                    // No node answered: the fence stays, and the next round tries again.
                    tracing::warn!(digest = %d, error = %e, "deleting a collected blob");
                    done.undone += 1;
                }
            }
        }
        done.released = lift.len();
        futures::stream::iter(lift)
            .map(|d| async move { self.meta.blob_reaped(&d).await })
            .buffer_unordered(AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        metrics::counter!("berth_gc_rounds_total").increment(1);
        metrics::counter!("berth_gc_collected_blobs_total").increment(done.deleted as u64);
        metrics::counter!("berth_gc_collected_bytes_total").increment(done.freed_bytes);
        Ok(done)
    }

    /// Walks the whole inventory for strays, noting them (`note`) or only counting them:
    /// how many, and their bytes (one copy each).
    async fn walk_inventory(&self, note: bool) -> Result<(u64, u64)> {
        let mut cursor: Option<Digest> = None;
        let (mut n, mut bytes) = (0, 0);
        loop {
            let (found, next) = self.strays_in_page(cursor.as_ref(), note).await?;
            n += found.len() as u64;
            bytes += self.sizes(found).await?.into_iter().flatten().sum::<u64>();
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok((n, bytes)),
            }
        }
    }

    /// Compares one page of the storage inventory after `after` with the metadata service's
    /// records: blobs stored before the grace period began and unknown to it are strays, noted
    /// as deletion candidates when `note`. Returns them and where the next page starts (`None`:
    /// the walk is over).
    async fn strays_in_page(&self, after: Option<&Digest>, note: bool) -> Result<(Vec<Digest>, Option<Digest>)> {
        let page = self.blobs.list(after, INVENTORY_PAGE).await?;
        let next = if page.len() < INVENTORY_PAGE { None } else { page.last().map(|(d, _)| d.clone()) };
        let settled = now_ms().saturating_sub(self.grace.as_millis() as u64);
        let old: Vec<Digest> = page.into_iter().filter(|(_, stamp)| *stamp <= settled).map(|(d, _)| d).collect();
        if old.is_empty() {
            return Ok((vec![], next));
        }
        let unknown = self.meta.unknown_blobs(old).await?;
        if note && !unknown.is_empty() {
            self.meta.note_strays(unknown.clone()).await?;
        }
        Ok((unknown, next))
    }
}

#[cfg(test)]
mod tests;
