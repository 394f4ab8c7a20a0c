//! Garbage collection: the job that turns the metadata service's reference counts into
//! deleted bytes (the design is in [`crate::state`]).
//!
//! A round removes expired loose links and fences the blobs no repository links any more
//! (one Raft write), deletes each fenced blob from storage, and lifts each fence with the stamp
//! of the copy deleted (which raises the reap floor). A round also walks a page of the storage
//! inventory and reports blobs the metadata service has no record of as strays. The job talks
//! only to the two store traits, so the same code runs in standalone and, on the metadata
//! leader, in a cluster. It never stops writes: a blob being deleted is fenced, nothing else.

use std::sync::Arc;
use std::time::Duration;

use berth_core::error::Result;
use berth_core::{now_ms, BlobStore, Digest, MetaStore};
use tokio::sync::Mutex;

/// Blobs fenced and deleted per round at most; bounds the work of one Raft command.
pub const REAP_BATCH: usize = 256;

/// Stored blobs compared with the metadata per round: a full pass over a node of a million
/// blobs takes about an hour at one round every few seconds, with a small, steady cost.
pub const INVENTORY_PAGE: usize = 1000;

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcRound {
    /// Blobs deleted from storage.
    pub deleted: usize,
    /// Bytes those blobs held.
    pub freed_bytes: u64,
    /// Stored blobs found unknown to the metadata service.
    pub strays: usize,
}

/// The garbage collector of one registry.
pub struct Collector {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    grace: Duration,
    /// Where the next inventory page starts (`None`: at the beginning).
    inventory_cursor: Mutex<Option<Digest>>,
}

impl Collector {
    /// A collector that deletes what has been unreferenced for at least `grace`.
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, grace: Duration) -> Collector {
        Collector { blobs, meta, grace, inventory_cursor: Mutex::new(None) }
    }

    /// One round: strays, then loose links and fences, then deletions.
    pub async fn round(&self) -> Result<GcRound> {
        let mut done = GcRound { strays: self.find_strays().await?, ..Default::default() };
        for d in self.meta.begin_reap(self.grace, REAP_BATCH).await? {
            let size = self.blobs.stat(&d).await?.map_or(0, |s| s.size);
            let stamp = self.blobs.delete(&d).await?;
            // Only once the bytes are gone is the fence lifted, with the stamp of the copy taken.
            self.meta.blob_reaped(&d, stamp).await?;
            if stamp.is_some() {
                done.deleted += 1;
                done.freed_bytes += size;
            }
        }
        Ok(done)
    }

    /// Compares one page of the storage inventory with the metadata service's records; blobs
    /// stored before the grace period began and unknown to it become deletion candidates.
    async fn find_strays(&self) -> Result<usize> {
        let mut cursor = self.inventory_cursor.lock().await;
        let page = self.blobs.list(cursor.as_ref(), INVENTORY_PAGE).await?;
        *cursor = if page.len() < INVENTORY_PAGE { None } else { page.last().map(|(d, _)| d.clone()) };
        let settled = now_ms().saturating_sub(self.grace.as_millis() as u64);
        let old: Vec<Digest> = page.into_iter().filter(|(_, stamp)| *stamp <= settled).map(|(d, _)| d).collect();
        if old.is_empty() {
            return Ok(0);
        }
        let unknown = self.meta.unknown_blobs(old).await?;
        let n = unknown.len();
        if n > 0 {
            self.meta.note_strays(unknown).await?;
        }
        Ok(n)
    }
}
