//! Storage housekeeping: expiring idle uploads, ending sessions whose staging is gone, and
//! (in `berth standalone`) garbage collection; run beside a storage engine (in `berth
//! standalone` and `berth storage`). A cluster's garbage collection runs on the metadata
//! leader (`crate::meta`).

use std::sync::Arc;
use std::time::Duration;

use berth_core::store::incarnation_of;
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

/// The upload sessions whose staging areas `blobs` holds. A session either opens its staging
/// area before it is recorded, or its id names the node's incarnation, in which the area
/// opens at the upload's first call (see [`berth_core::store::upload_id`]). So one without
/// an area once it has settled lost it (with a restart before its first bytes reached disk),
/// unless its id names the incarnation the node is in: that one is only idle, and ends with
/// the upload timeout. A lost one is ended: it could only fail, and it would count against
/// its caller and keep its repository's loose links from being collected.
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
        let ages = Ages { settle, idle: upload_timeout };
        if let Err(e) = end_sessions_without_staging(&*blobs, &*meta, &staged, ages, &mut sessions_cursor).await {
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

/// How old a session without a staging area must be to be ended.
#[derive(Clone, Copy)]
struct Ages {
    /// One that lost its area ([`SESSION_SETTLE`], at most the upload timeout).
    settle: Duration,
    /// One begun in this node's incarnation without opening its area, which opens at the
    /// upload's first call: the upload timeout, as for any upload that receives nothing.
    idle: Duration,
}

/// Ends the sessions of `staged` whose staging area is gone (see [`Staged`] and [`Ages`]), a
/// page of them per call.
async fn end_sessions_without_staging(
    blobs: &dyn BlobStore,
    meta: &dyn MetaStore,
    staged: &Staged,
    ages: Ages,
    cursor: &mut Option<String>,
) -> berth_core::error::Result<()> {
    let page = meta.uploads(cursor.as_deref(), SESSIONS_PER_ROUND).await?;
    *cursor = if page.len() < SESSIONS_PER_ROUND { None } else { page.last().map(|s| s.id.clone()) };
    let now = berth_core::now_ms();
    let older_than = |age: Duration| now.saturating_sub(age.as_millis() as u64);
    for s in page {
        let judged = match staged {
            Staged::All => true,
            Staged::On { name, addr } => s.staging.as_deref().is_some_and(|n| n == name || n == addr),
        };
        // A session begun in this incarnation without its area has lost nothing: it is only
        // idle until its first call opens the area.
        let unopened = incarnation_of(&s.id).is_some_and(|i| Some(i) == blobs.incarnation());
        let age = if unopened { ages.idle } else { ages.settle };
        if !judged || s.started_at_ms > older_than(age) {
            continue;
        }
        // One session's failure does not keep the rest of the page from being judged.
        match blobs.upload_staged(&s.id).await {
            Ok(true) => {}
            Ok(false) if unopened => {
                // Ended on the node too, so that a late call does not open its area after all.
                if let Err(e) = blobs.upload_cancel(&s.id).await {
                    tracing::warn!(upload = %s.id, error = %e, "ending an upload that received nothing");
                    continue;
                }
                end_session(meta, &s.id, "it received nothing for the upload timeout").await
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::store::upload_id;
    use berth_core::UploadSession;
    use berth_meta::{MetaConfig, MetaService};
    use berth_storage::{StorageConfig, StorageEngine};

    /// A storage node judges the sessions staged on it: one begun in its incarnation without
    /// opening its area is idle, not lost, until the upload timeout; one of another
    /// incarnation, or one whose area was opened at its start, has lost its area once settled.
    #[tokio::test]
    async fn a_session_not_yet_opened_is_ended_only_once_idle() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaService::open_single(MetaConfig {
            dir: dir.path().join("meta"),
            node_id: 1,
            advertise: "127.0.0.1:0".into(),
        })
        .await
        .unwrap();
        let engine = StorageEngine::open(StorageConfig { dir: dir.path().join("storage") }).unwrap();
        let now = engine.incarnation().unwrap();
        let staged = Staged::On { name: "node-a".into(), addr: "127.0.0.1:7001".into() };
        let uuid = |n: u8| format!("5e55a0{n:02x}-0000-4000-8000-000000000000");
        // 1: not opened yet; 2: of another incarnation; 3: opened at its start, since lost;
        // 4: opened at its first call, receiving.
        let ids = [upload_id(&uuid(1), now), upload_id(&uuid(2), now ^ 2), uuid(3), upload_id(&uuid(4), now)];
        for id in &ids {
            let session = UploadSession {
                id: id.clone(),
                repo: "acme/app".into(),
                started_at_ms: 1,
                owner: "mia".into(),
                staging: Some("node-a".into()),
            };
            meta.create_upload(session, 0, None).await.unwrap();
        }
        assert_eq!(engine.upload_size(&ids[3]).await.unwrap(), Some(0), "opened at its first call");
        let open = || async {
            let mut ids: Vec<String> = meta.uploads(None, 10).await.unwrap().into_iter().map(|s| s.id).collect();
            ids.sort();
            ids
        };
        let settled = Ages { settle: Duration::ZERO, idle: Duration::from_secs(3600) };
        end_sessions_without_staging(&engine, &meta, &staged, settled, &mut None).await.unwrap();
        assert_eq!(open().await, vec![ids[0].clone(), ids[3].clone()]);
        let idle = Ages { settle: Duration::ZERO, idle: Duration::ZERO };
        end_sessions_without_staging(&engine, &meta, &staged, idle, &mut None).await.unwrap();
        assert_eq!(open().await, vec![ids[3].clone()], "an unopened session is ended once past the upload timeout");
        // And stays ended on the node: a late call does not open its area.
        assert_eq!(engine.upload_size(&ids[0]).await.unwrap(), None);
    }
}
