//! Download counts: pulls of each version (manifest `GET`s, by tag or by digest) are counted
//! in memory and reported to the metadata service every [`REPORT_EVERY`] in one write, so
//! that a pull costs no Raft write. A frontend that crashes loses at most the pulls since its
//! last report.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use berth_core::store::{DirectoryChange, PullCount};
use berth_core::{Digest, MetaStore};

/// How often a frontend reports the pulls it counted.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Versions counted between two reports, at most: pulls of further versions in the same
/// seconds go uncounted rather than let memory grow without bound.
const MAX_COUNTED: usize = 100_000;

/// Versions per metadata write of a report: each write stays far below the gRPC message
/// limit (4 MiB), however many versions a report holds.
const PER_WRITE: usize = 2_000;

/// Pulls by repository and manifest digest since the last report.
type Counts = HashMap<String, HashMap<Digest, u64>>;

/// One frontend's pull counts.
pub struct PullCounter {
    counts: Mutex<(Counts, usize)>,
    meta: Arc<dyn MetaStore>,
    reporting: OnceLock<()>,
}

impl PullCounter {
    /// Counts reported to `meta`.
    pub fn new(meta: Arc<dyn MetaStore>) -> Arc<PullCounter> {
        Arc::new(PullCounter { counts: Mutex::default(), meta, reporting: OnceLock::new() })
    }

    /// Counts one pull of version `digest` of `repo`. The first starts the reports (in the
    /// runtime of the request that made it).
    pub fn count(self: &Arc<Self>, repo: &str, digest: &Digest) {
        if self.reporting.get().is_none() && self.reporting.set(()).is_ok() {
            tokio::spawn(report(Arc::downgrade(self)));
        }
        let Ok(mut guard) = self.counts.lock() else { return };
        let (counts, versions) = &mut *guard;
        if let Some(n) = counts.get_mut(repo).and_then(|d| d.get_mut(digest)) {
            *n += 1;
        } else if *versions < MAX_COUNTED {
            *versions += 1;
            counts.entry(repo.to_string()).or_default().insert(digest.clone(), 1);
        }
    }

    /// The counts so far, which start again from zero.
    fn take(&self) -> Vec<PullCount> {
        let Ok(mut guard) = self.counts.lock() else { return vec![] };
        let (counts, _) = std::mem::take(&mut *guard);
        counts
            .into_iter()
            .flat_map(|(repo, digests)| {
                digests.into_iter().map(move |(d, pulls)| PullCount {
                    repo: repo.clone(),
                    digest: d.to_string(),
                    pulls,
                })
            })
            .collect()
    }

    /// Puts back counts a report could not deliver, for the next one.
    fn put_back(&self, unsent: Vec<PullCount>) {
        let Ok(mut guard) = self.counts.lock() else { return };
        let (counts, versions) = &mut *guard;
        for c in unsent {
            let Ok(d) = c.digest.parse::<Digest>() else { continue };
            let per_repo = counts.entry(c.repo).or_default();
            if !per_repo.contains_key(&d) {
                if *versions >= MAX_COUNTED {
                    continue;
                }
                *versions += 1;
            }
            *per_repo.entry(d).or_default() += c.pulls;
        }
    }
}

/// Reports the counts every [`REPORT_EVERY`] while the counter is in use.
async fn report(counter: Weak<PullCounter>) {
    loop {
        tokio::time::sleep(REPORT_EVERY).await;
        let Some(c) = counter.upgrade() else { return };
        let counts = c.take();
        for part in counts.chunks(PER_WRITE) {
            // Kept for the next report: a metadata group without a majority does not lose
            // them. (A write that timed out may have been applied all the same, and is then
            // counted twice: counts are approximate in that rare case.)
            if let Err(e) = c.meta.change_directory(DirectoryChange::CountPulls(part.to_vec())).await {
                tracing::warn!(error = %e, versions = part.len(), "reporting download counts; kept for the next report");
                c.put_back(part.to_vec());
            }
        }
    }
}
