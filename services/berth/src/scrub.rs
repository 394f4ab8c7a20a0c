//! How a storage node keeps its bytes honest: a scrub that re-reads every blob it holds at a
//! bounded rate and checks it against its checksums, and a mender that replaces each copy found
//! damaged (by the scrub or by a read) with a good one from another node.
//!
//! A damaged copy is taken out of service the moment it is found (see the storage engine's
//! `quarantine`), so no read serves it meanwhile: reads go on from the other replicas. The
//! mender then asks the other nodes, in placement order, which holds the blob, copies it from
//! there (the write verifies the digest, as every write does) and the record of the damage is
//! cleared. A blob no other node holds is reported and its record dropped: there is nothing to
//! mend it from, and its damaged bytes stay in the node's `quarantine/` directory.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use berth_core::store::NodeStats;
use berth_core::{BlobStore, Digest, MetaStore};
use berth_storage::client::{StorageClient, StorageClientConfig};
use berth_storage::placement::Placement;
use berth_storage::StorageEngine;
use tokio::sync::watch;

/// How often damaged copies are looked for and mended.
const MEND_EVERY: Duration = Duration::from_secs(2);

/// Blobs scrubbed per step, between two looks at the damaged copies.
const STEP: usize = 16;

/// What the scrub of one node needs.
pub struct Scrubber {
    /// This node's engine.
    pub engine: StorageEngine,
    /// The metadata group (for the other nodes' addresses).
    pub meta: Arc<dyn MetaStore>,
    /// This node's name in the placement map.
    pub name: String,
    /// Bytes per second the scrub may read (0: no limit).
    pub bandwidth: u64,
    /// Pause between two passes over everything.
    pub pause: Duration,
    /// What the node reports in its heartbeats.
    pub stats: Arc<Mutex<NodeStats>>,
}

impl Scrubber {
    fn update(&self, f: impl FnOnce(&mut NodeStats)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Scrubs and mends until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut cursor: Option<Digest> = None;
        let mut pass_started = Instant::now();
        let mut pass_bytes = 0u64;
        let mut resting_until: Option<Instant> = None;
        loop {
            let mended_at = Instant::now();
            self.mend().await;
            let damaged = self.engine.quarantined();
            self.update(|s| s.damaged = damaged);
            let resting = resting_until.is_some_and(|t| Instant::now() < t);
            if !resting {
                if resting_until.take().is_some() {
                    pass_started = Instant::now();
                    pass_bytes = 0;
                }
                match self.step(cursor.as_ref()).await {
                    Some((last, bytes)) => {
                        cursor = Some(last);
                        pass_bytes += bytes;
                        self.update(|s| s.scrubbed = pass_bytes);
                        // Paced: the bytes of this pass over the time it may take.
                        if self.bandwidth > 0 {
                            let due = Duration::from_secs_f64(pass_bytes as f64 / self.bandwidth as f64);
                            let wait = due.saturating_sub(pass_started.elapsed());
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = stop.wait_for(|s| *s) => return,
                            }
                        }
                    }
                    None => {
                        let secs = pass_started.elapsed().as_secs_f64();
                        self.update(|s| {
                            s.scrub_passes += 1;
                            s.scrub_rate = if secs > 0.0 { (pass_bytes as f64 / secs) as u64 } else { 0 };
                        });
                        tracing::debug!(bytes = pass_bytes, secs, "scrub pass done");
                        cursor = None;
                        resting_until = Some(Instant::now() + self.pause);
                    }
                }
            }
            // Between steps while scrubbing; every MEND_EVERY while resting.
            let idle =
                if resting_until.is_some() { MEND_EVERY.saturating_sub(mended_at.elapsed()) } else { Duration::ZERO };
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Scrubs the next few blobs after `after`: the last one scrubbed and the bytes read, or
    /// `None` at the end of the inventory.
    async fn step(&self, after: Option<&Digest>) -> Option<(Digest, u64)> {
        let page = match self.engine.list(after, STEP).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing blobs to scrub");
                return None;
            }
        };
        let last = page.last()?.0.clone();
        let mut bytes = 0;
        for (d, _) in &page {
            let size = match self.engine.stat(d).await {
                Ok(Some(s)) => s.size,
                _ => continue,
            };
            match self.engine.scrub(d).await {
                // A damaged copy is out of service now; the mender counts and replaces it.
                Ok(Some(_)) => bytes += size,
                Ok(None) => {}
                Err(e) => tracing::warn!(digest = %d, error = %e, "scrubbing a blob"),
            }
        }
        Some((last, bytes))
    }

    /// Replaces damaged copies (found by the scrub or by reads) from good replicas. (Another
    /// node's placement pass, or a frontend's repair, may write a good copy first; that clears
    /// the record too.)
    async fn mend(&self) {
        let damaged = match self.engine.damaged().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "listing damaged copies");
                return;
            }
        };
        if damaged.is_empty() {
            return;
        }
        let map = match self.meta.placement().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "reading the placement map to mend damaged copies");
                return;
            }
        };
        let placement = Placement::of_map(&map);
        for (d, _) in &damaged {
            let mut answered_all = true;
            let mut mended = false;
            for i in placement.ranked(d) {
                let node = &map.nodes[i];
                if node.name == self.name {
                    continue;
                }
                let config = StorageClientConfig { request_timeout: Duration::from_secs(5), ..Default::default() };
                let Ok(peer) = StorageClient::new(&node.addr, config) else {
                    answered_all = false;
                    continue;
                };
                let size = match peer.stat(d).await {
                    Ok(Some(s)) => s.size,
                    Ok(None) => continue,
                    Err(_) => {
                        answered_all = false;
                        continue;
                    }
                };
                let copied = berth_core::store::copy_blob(&peer, &self.engine, d, size);
                match copied.await {
                    Ok(_) => {
                        mended = true;
                        break;
                    }
                    Err(e) => {
                        answered_all = false;
                        tracing::warn!(digest = %d, from = %node.name, error = %e, "mending a damaged copy");
                    }
                }
            }
            if mended {
                self.update(|s| s.mended += 1);
                tracing::info!(digest = %d, "damaged copy replaced from a good replica");
            } else if answered_all {
                tracing::error!(digest = %d, "a damaged copy has no good replica to be mended from");
                if let Err(e) = self.engine.forget_damaged(d).await {
                    tracing::warn!(digest = %d, error = %e, "dropping the record of a damaged copy");
                }
            }
        }
    }
}
