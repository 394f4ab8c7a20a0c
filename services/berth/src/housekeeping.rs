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

/// A session younger than this (or than the upload timeout, when that is shorter) is not
/// ended for lack of a staging area: it may be between the two writes that start it. (A
/// session being finished has no staging area left either, until its end is written; the
/// frontend links the blob when housekeeping ended the session meanwhile.)
pub(crate) const SESSION_SETTLE: Duration = Duration::from_secs(60);

/// The upload sessions whose staging areas `blobs` holds. A session opens its staging area
/// before it is recorded, so one of these without an area once it has settled lost it (with
/// a restart before its first bytes reached disk), and is ended: it could only fail, and it
/// would count against its caller and keep its repository's loose links from being collected.
pub enum Staged {
    /// Every session of the registry (`berth standalone`).
    All,
    /// The sessions that name this storage node of a cluster, by its name or by its address
    /// (as frontends given a fixed list of storage nodes name them): a node does not judge
    /// the uploads staged on the others.
    On {
        /// The node's name.
        name: String,
        /// The address it advertises.
        addr: String,
    },
}

/// Expires uploads idle for `upload_timeout`, ends the sessions of `staged` whose staging area
/// is gone, and runs rounds of `collector`, if given, until `stop` turns true.
pub async fn run(
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    upload_timeout: Duration,
    collector: Option<Arc<Collector>>,
    staged: Staged,
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
        let settle = SESSION_SETTLE.min(upload_timeout);
        if let Err(e) = end_sessions_without_staging(&*blobs, &*meta, &staged, settle, &mut sessions_cursor).await {
            tracing::warn!(error = %e, "checking upload sessions");
        }
        if let Some(c) = &collector {
            if last_round.elapsed() >= gc_period {
                last_round = tokio::time::Instant::now();
                c.logged_round().await;
            }
        }
    }
}

/// Ends the sessions of `staged` older than `settle` whose staging area is gone (see
/// [`Staged`]), a page of them per call.
async fn end_sessions_without_staging(
    blobs: &dyn BlobStore,
    meta: &dyn MetaStore,
    staged: &Staged,
    settle: Duration,
    cursor: &mut Option<String>,
) -> berth_core::error::Result<()> {
    let page = meta.uploads(cursor.as_deref(), SESSIONS_PER_ROUND).await?;
    *cursor = if page.len() < SESSIONS_PER_ROUND { None } else { page.last().map(|s| s.id.clone()) };
    let settled = berth_core::now_ms().saturating_sub(settle.as_millis() as u64);
    for s in page {
        let judged = match staged {
            Staged::All => true,
            Staged::On { name, addr } => s.staging.as_deref().is_some_and(|n| n == name || n == addr),
        };
        if !judged || s.started_at_ms > settled {
            continue;
        }
        // One session's failure does not keep the rest of the page from being judged.
        match blobs.upload_staged(&s.id).await {
            Ok(true) => {}
            Ok(false) => end_session(meta, &s.id, "its staging area is gone").await,
            Err(e) => tracing::warn!(upload = %s.id, error = %e, "checking an upload's staging area"),
        }
    }
    Ok(())
}

/// Ends upload session `id`, which no one can finish any more (`why`), and logs it; a session
/// ended meanwhile (finished, cancelled) is no failure, and any other is logged and left for
/// the next round.
pub(crate) async fn end_session(meta: &dyn MetaStore, id: &str, why: &str) {
    match meta.end_upload(id, None).await {
        Ok(()) => tracing::info!(upload = %id, why, "ended an upload session"),
        Err(e) if e.code == berth_core::ErrorCode::BlobUploadUnknown => {}
        Err(e) => tracing::warn!(upload = %id, why, error = %e, "ending an upload session"),
    }
}
