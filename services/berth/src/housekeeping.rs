//! Storage housekeeping: expiring idle uploads, ending sessions whose staging is gone, and
//! (in `berth standalone`) garbage collection; run beside a storage engine (in `berth
//! standalone` and `berth storage`). A cluster's garbage collection runs on the metadata
//! leader (`crate::meta`).

use std::sync::Arc;
use std::time::Duration;

use berth_core::{BlobStore, MetaStore};
use berth_meta::gc::Collector;
use tokio::sync::watch;

/// Sessions checked against their staging areas per round.
const SESSIONS_PER_ROUND: usize = 1000;

/// A session younger than this is not ended for lack of a staging area: it may be between
/// the two writes that start it.
const SESSION_SETTLE: Duration = Duration::from_secs(60);

/// Expires uploads idle for `upload_timeout` and runs rounds of `collector`, if given, until
/// `stop` turns true.
///
/// With `all_staging`, `blobs` stages every upload of the registry, so a session whose staging
/// area it does not have is one whose staging was lost, and is ended. A storage node of a
/// cluster stages only some uploads and must not judge the others.
pub async fn run(
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    upload_timeout: Duration,
    collector: Option<Arc<Collector>>,
    all_staging: bool,
    mut stop: watch::Receiver<bool>,
) {
    let gc_period = collector.as_ref().and_then(|c| c.interval()).unwrap_or(Duration::MAX);
    let period = (upload_timeout / 4).min(gc_period).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut last_round = tokio::time::Instant::now();
    let mut sessions_cursor: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match blobs.expire_uploads(upload_timeout).await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = meta.end_upload(&id, None).await {
                        tracing::debug!(upload = %id, error = %e, "ending an expired upload");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiring uploads"),
        }
        if all_staging {
            if let Err(e) = end_sessions_without_staging(&*blobs, &*meta, &mut sessions_cursor).await {
                tracing::warn!(error = %e, "checking upload sessions");
            }
        }
        if let Some(c) = &collector {
            if last_round.elapsed() >= gc_period {
                last_round = tokio::time::Instant::now();
                c.logged_round().await;
            }
        }
    }
}

/// Ends sessions whose staging area is gone (lost with a restart before its first bytes
/// reached disk), so that they neither count against their caller nor keep their
/// repository's loose links from being collected.
async fn end_sessions_without_staging(
    blobs: &dyn BlobStore,
    meta: &dyn MetaStore,
    cursor: &mut Option<String>,
) -> berth_core::error::Result<()> {
    let page = meta.uploads(cursor.as_deref(), SESSIONS_PER_ROUND).await?;
    *cursor = if page.len() < SESSIONS_PER_ROUND { None } else { page.last().map(|s| s.id.clone()) };
    let settled = berth_core::now_ms().saturating_sub(SESSION_SETTLE.as_millis() as u64);
    for s in page {
        if s.started_at_ms <= settled && blobs.upload_size(&s.id).await?.is_none() {
            meta.end_upload(&s.id, None).await?;
        }
    }
    Ok(())
}
