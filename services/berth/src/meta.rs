//! `berth meta`: one node of the metadata group, serving the Raft transport, the Meta service
//! (to frontends and storage nodes) and the Cluster service (to `berth admin cluster`) on one
//! gRPC address.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth_core::store::{NodeState, StorageChange};
use berth_core::{BlobStore, Digest, MetaStore};
use berth_meta::cluster::{cluster_server, RaftGate};
use berth_meta::gc::Collector;
use berth_meta::network::{raft_server, Channels};
use berth_meta::server::meta_server;
use berth_meta::{MetaConfig, MetaService};
use berth_storage::router::{Audit, CurrentRouter};
use futures::StreamExt;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::follow::{follow_placement, Following};

/// Flags of `berth meta` (each also read from its environment variable).
#[derive(clap::Args, Debug)]
pub struct MetaArgs {
    /// Mutual TLS with the other roles.
    #[command(flatten)]
    pub cluster_tls: crate::config::ClusterTlsFlags,
    /// This node's id in the group (a positive number, unique and never reused).
    #[arg(long, env = "BERTH_NODE_ID", required_unless_present = "id_from_hostname")]
    pub id: Option<u64>,
    /// Take the id from the host name's ordinal suffix plus one (`berth-meta-0` is node 1), as
    /// a Kubernetes StatefulSet names its pods.
    #[arg(long, conflicts_with = "id")]
    pub id_from_hostname: bool,
    /// gRPC address to serve on.
    #[arg(long, env = "BERTH_GRPC_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// The address other nodes reach this one at [default: the listen address].
    #[arg(long, env = "BERTH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Directory of the node's log, state and snapshot.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = "berth-meta-data")]
    pub data_dir: PathBuf,
    /// Seconds without a heartbeat after which the leader declares a storage node dead: it
    /// then owns nothing and its blobs' next owners take copies of them from the survivors.
    #[arg(long, env = "BERTH_STORAGE_DEAD_AFTER_SECS", default_value_t = 60)]
    pub storage_dead_after_secs: u64,
    /// Seconds an unlinked blob is kept before the leader's garbage collection deletes its
    /// copies on every storage node.
    #[arg(long, env = "BERTH_GC_GRACE_SECS", default_value_t = 3600)]
    pub gc_grace_secs: u64,
    /// Seconds between the leader's rounds of garbage collection; 0: only when asked (`berth
    /// admin gc`) [default: half the grace period, at most 30].
    #[arg(long, env = "BERTH_GC_INTERVAL_SECS")]
    pub gc_interval_secs: Option<u64>,
    /// Seconds a version or package deleted through the packages API stays restorable, before
    /// the leader deletes it for good and collects its blobs (30 days).
    #[arg(long, env = "BERTH_DELETED_RETENTION_SECS", default_value_t = 2_592_000)]
    pub deleted_retention_secs: u64,
    /// Copies of each blob, as the frontends keep them: the leader's audit of linked blobs
    /// looks for that many at their owners.
    #[arg(long, env = "BERTH_REPLICAS", default_value_t = 3)]
    pub replicas: usize,
    /// Seconds the placement map must stay the same before the leader audits linked blobs
    /// against their owners (right after a change, placement passes are still moving copies).
    #[arg(long, env = "BERTH_AUDIT_AFTER_SECS", default_value_t = 60)]
    pub audit_after_secs: u64,
    /// An upload session that names no storage node of the map (a record from before sessions
    /// named one, or a node recorded by another spelling of its address) is ended by the
    /// leader once no node stages it and it is older than a minute, or than this many seconds
    /// when shorter, as storage nodes judge their own sessions [default: 600].
    #[arg(long, env = "BERTH_UPLOAD_TIMEOUT_SECS")]
    pub upload_timeout_secs: Option<u64>,
    /// HTTP address of the probes: `/healthz` (the node serves) and `/readyz` (it knows the
    /// group's leader) [default: none].
    #[arg(long, env = "BERTH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
}

/// Linked blobs audited per round of garbage collection: at one round every 30 s, a million
/// linked blobs take about 40 hours.
const AUDIT_PAGE: usize = 200;

/// Blobs audited at once (each asks its owners, and when they lack it, every node).
const AUDITS_AT_ONCE: usize = 8;

/// While this node leads: rounds of garbage collection over every storage node that is not
/// dead, and, with each, an audit of a page of the linked blobs against their owners (the other
/// direction of the comparison the collector's inventory walk makes). A blob an owner lacks is
/// recorded short of copies, for the frontends' repair; a blob no node holds is reported.
/// Audits wait until the placement map has stayed the same for `settle`: right after a change,
/// the placement passes of the storage nodes are still moving copies to their new owners.
async fn collect_while_leading(
    meta: MetaService,
    collector: Arc<Collector>,
    router: Arc<CurrentRouter>,
    replicas: usize,
    settle: Duration,
    sessions_settle: Duration,
) {
    // Without background rounds, audits still come, as often as rounds would by default.
    let period = collector.interval().unwrap_or_else(|| Collector::default_interval(collector.grace()));
    let mut audit_after: Option<Digest> = None;
    let mut sessions_after: Option<String> = None;
    let mut map_seen: Option<(u64, Instant)> = None;
    loop {
        tokio::time::sleep(period).await;
        if meta.leading_term().is_none() {
            continue;
        }
        let Some(version) = router.version() else { continue };
        if collector.interval().is_some() {
            collector.logged_round().await;
        }
        sessions_after = end_sessions_no_node_ends(&meta, &router, sessions_settle, sessions_after).await;
        let since = match map_seen {
            Some((v, since)) if v == version => since,
            _ => {
                map_seen = Some((version, Instant::now()));
                continue;
            }
        };
        if since.elapsed() >= settle {
            audit_after = audit_page(&meta, &router, replicas, audit_after).await;
        }
    }
}

/// Upload sessions looked at per round by [`end_sessions_no_node_ends`].
const SESSIONS_PAGE: usize = 1000;

/// Sessions per round whose staging the leader asks the storage nodes about (see
/// [`end_sessions_no_node_ends`]); each question goes to every node.
const UNNAMED_PER_ROUND: usize = 50;

/// How long a storage node has to say whether it stages an upload.
const STAGED_WAIT: Duration = Duration::from_secs(2);

/// Ends the upload sessions after `after` (a page) that no storage node will end, since each
/// node ends only the sessions naming it whose staging area it lost ([`Staged`]); open, they
/// would count against their callers and keep their repositories' loose links.
///
/// - Sessions staged on a node removed from the cluster: their staging areas went with it,
///   and no frontend sends their calls there any more.
/// - Sessions older than `settle` that name no node of the placement map, in any state
///   (records from before sessions named one, or a node recorded by an address it does not
///   call itself): ended once every node answers that it does not stage them.
///
/// Returns where the next page starts.
///
/// [`Staged`]: crate::housekeeping::Staged
async fn end_sessions_no_node_ends(
    meta: &MetaService,
    router: &CurrentRouter,
    settle: Duration,
    after: Option<String>,
) -> Option<String> {
    let page = match meta.uploads(after.as_deref(), SESSIONS_PAGE).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "reading upload sessions");
            return after;
        }
    };
    let next = if page.len() < SESSIONS_PAGE { None } else { page.last().map(|s| s.id.clone()) };
    let current = router.get().ok();
    // Every node of the map names itself, whatever its state: a dead node may come back with
    // its staged uploads, and ends its sessions itself then.
    let known: Option<HashSet<String>> = match (&current, meta.placement().await) {
        (Some(_), Ok(map)) => Some(map.nodes.into_iter().flat_map(|n| [n.name, n.addr]).collect()),
        _ => None,
    };
    let settled = berth_core::now_ms().saturating_sub(settle.as_millis() as u64);
    let mut removed: HashMap<String, bool> = HashMap::new();
    let mut asked = 0;
    for s in page {
        let unnamed = known.as_ref().is_some_and(|k| s.staging.as_ref().is_none_or(|n| !k.contains(n)));
        if let (true, Some(c)) = (unnamed && s.started_at_ms <= settled && asked < UNNAMED_PER_ROUND, &current) {
            asked += 1;
            match c.staged_anywhere(&s.id, STAGED_WAIT).await {
                Some(false) => {
                    crate::housekeeping::end_session(meta, &s.id, "no storage node stages it").await;
                    continue;
                }
                Some(true) => {}
                // A node that does not answer would hold up every other question this round.
                None => asked = UNNAMED_PER_ROUND,
            }
        }
        let Some(node) = s.staging else { continue };
        let gone = match removed.get(&node) {
            Some(gone) => *gone,
            None => *removed.entry(node.clone()).or_insert(meta.storage_removed(&node).await.unwrap_or(false)),
        };
        if gone {
            crate::housekeeping::end_session(meta, &s.id, "staged on a removed storage node").await;
        }
    }
    next
}

/// Audits the linked blobs after `after` (a page); returns where the next page starts.
async fn audit_page(
    meta: &MetaService,
    router: &CurrentRouter,
    replicas: usize,
    after: Option<Digest>,
) -> Option<Digest> {
    let page = match meta.linked_blobs(after.as_ref(), AUDIT_PAGE).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "reading linked blobs");
            return after;
        }
    };
    let Ok(current) = router.get() else { return after };
    if current.node_count() < replicas {
        // Too few nodes that are not dead for every blob to be whole: nothing to learn.
        return after;
    }
    let audits: Vec<(Digest, Audit)> = futures::stream::iter(page.iter().cloned())
        .map(|d| {
            let current = current.clone();
            async move {
                let a = current.audit(&d).await;
                (d, a)
            }
        })
        .buffer_unordered(AUDITS_AT_ONCE)
        .collect()
        .await;
    let mut short = vec![];
    for (d, a) in audits {
        match a {
            Audit::Short => short.push(d),
            Audit::Lost => {
                tracing::error!(digest = %d, "a linked blob has no copy on any storage node that is not dead")
            }
            Audit::Whole | Audit::Unanswered => {}
        }
    }
    if !short.is_empty() {
        tracing::info!(blobs = short.len(), "audit: linked blobs short of copies at their owners, recorded for repair");
        if let Err(e) = meta.note_short_copies(short).await {
            tracing::debug!(error = %e, "recording blobs short of copies");
        }
    }
    (page.len() == AUDIT_PAGE).then(|| page.last().cloned()).flatten()
}

/// How often the leader looks for storage nodes that stopped sending heartbeats.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

/// The shortest dead time accepted: two missed heartbeats (storage nodes send one every 3 s).
const MIN_DEAD_AFTER: Duration = Duration::from_secs(6);

/// Declares dead, while this node leads, every live storage node it has not heard from for
/// `after`, by its own monotonic clock: a node's heartbeat time (`seen_ms`, a wall-clock time)
/// is only compared with the one seen a moment before, so a jump of any clock declares no one
/// dead. A node leading for less than `after` declares nothing: the heartbeats it has not seen
/// may have gone to the previous leader (and after a restart of the whole group, none was sent).
async fn expire_silent_storage(meta: MetaService, after: Duration) {
    let mut term_seen: Option<u64> = None;
    // Per node: the heartbeat time last read, and when this leader first read it.
    let mut heard: HashMap<String, (u64, Instant)> = HashMap::new();
    loop {
        tokio::time::sleep(EXPIRY_CHECK).await;
        let Some(term) = meta.leading_term() else {
            term_seen = None;
            continue;
        };
        if term_seen != Some(term) {
            term_seen = Some(term);
            heard.clear();
        }
        let Ok(map) = meta.placement().await else { continue };
        let now = Instant::now();
        let mut silent = vec![];
        for n in &map.nodes {
            let since = match heard.get(&n.name) {
                Some((seen, since)) if *seen == n.seen_ms => *since,
                _ => {
                    heard.insert(n.name.clone(), (n.seen_ms, now));
                    now
                }
            };
            if n.state == NodeState::Live && now.duration_since(since) >= after {
                silent.push((n.name.clone(), n.seen_ms));
            }
        }
        heard.retain(|name, _| map.nodes.iter().any(|n| &n.name == name));
        if silent.is_empty() {
            continue;
        }
        let names: Vec<String> = silent.iter().map(|(n, _)| n.clone()).collect();
        match meta.change_storage(StorageChange::DeclareDead { nodes: silent }).await {
            Ok(true) => {
                tracing::warn!(nodes = ?names, after_secs = after.as_secs(), "declared silent storage nodes dead")
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "declaring silent storage nodes dead"),
        }
    }
}

/// Sets the Raft gauges from this node's view of the group, at scrape time.
pub(crate) fn raft_gauges(meta: &MetaService) {
    use metrics::gauge;
    let f = meta.raft_figures();
    gauge!("berth_raft_term").set(f.term as f64);
    gauge!("berth_raft_leader").set(f.leader as f64);
    gauge!("berth_raft_is_leader").set(if f.leading { 1.0 } else { 0.0 });
    gauge!("berth_raft_last_log_index").set(f.last_log_index as f64);
    gauge!("berth_raft_applied_index").set(f.applied_index as f64);
    // Only the leader knows it; followers report 0 rather than a stale value.
    gauge!("berth_raft_committed_index").set(f.committed_index.unwrap_or(0) as f64);
}

/// The id a host name's ordinal suffix gives: `NAME-N` is node N + 1.
fn id_from_hostname(host: &str) -> Result<u64> {
    let ordinal = host.rsplit_once('-').map(|(_, n)| n).unwrap_or_default();
    let n: u64 = ordinal
        .parse()
        .map_err(|_| anyhow::anyhow!("--id-from-hostname: the host name {host:?} does not end in -NUMBER"))?;
    Ok(n + 1)
}

/// This process's host name.
fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    anyhow::ensure!(rc == 0, "reading the host name: {}", std::io::Error::last_os_error());
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

pub async fn run(mut args: MetaArgs) -> Result<()> {
    args.cluster_tls.install()?;
    if args.id_from_hostname {
        args.id = Some(id_from_hostname(&hostname()?)?);
    }
    let id = args.id.context("--id is required")?;
    anyhow::ensure!(id > 0, "--id must be a positive number");
    let dead_after = Duration::from_secs(args.storage_dead_after_secs);
    anyhow::ensure!(
        dead_after >= MIN_DEAD_AFTER,
        "--storage-dead-after-secs must be at least {} (two missed heartbeats)",
        MIN_DEAD_AFTER.as_secs()
    );
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let incoming = TcpIncoming::bind(args.listen)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.listen))?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().context("reading the bound address")?;
    let advertise = args.advertise.clone().unwrap_or_else(|| bound.to_string());
    let meta = MetaService::open_node(
        MetaConfig { dir: data_dir.clone(), node_id: id, advertise: advertise.clone() },
        Channels::default(),
    )
    .await
    .context("starting the metadata node")?;
    let store: Arc<dyn MetaStore> = Arc::new(meta.clone());
    let gate = Arc::new(RaftGate::new(meta.clone()));
    let expiry = tokio::spawn(expire_silent_storage(meta.clone(), dead_after));
    // Garbage collection reaches the storage nodes of the map, dead ones left out.
    let router = Arc::new(CurrentRouter::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    // The map is this node's own state: reading it often costs nothing.
    let poll = Duration::from_millis(250);
    let placement = Following { replicas: args.replicas.max(1), write_quorum: 1, skip_dead: true, poll };
    let following = tokio::spawn(follow_placement(router.clone(), store.clone(), placement, stop_rx.clone()));
    let blobs: Arc<dyn BlobStore> = router.clone();
    let collector = Arc::new(
        Collector::new(
            blobs,
            meta.clone(),
            Duration::from_secs(args.gc_grace_secs),
            args.gc_interval_secs.map(Duration::from_secs),
        )
        .with_retention(Duration::from_secs(args.deleted_retention_secs)),
    );
    meta.set_collector(&collector);
    let settle = Duration::from_secs(args.audit_after_secs);
    let upload_timeout =
        args.upload_timeout_secs.map_or(berth_core::store::DEFAULT_UPLOAD_TIMEOUT, |s| Duration::from_secs(s.max(1)));
    let sessions_settle = crate::housekeeping::SESSION_SETTLE.min(upload_timeout);
    let collecting = tokio::spawn(collect_while_leading(
        meta.clone(),
        collector,
        router,
        args.replicas.max(1),
        settle,
        sessions_settle,
    ));
    if let Some(listen) = args.http_listen {
        let node = meta.clone();
        let ready: crate::probe::Readiness = Arc::new(move || {
            let led = node.leader();
            Box::pin(async move {
                led.map(|_| ()).ok_or_else(|| "metadata: no leader known (an election, or no majority)".to_string())
            })
        });
        let node = meta.clone();
        let collect: crate::probe::Collect = Arc::new(move || raft_gauges(&node));
        crate::probe::serve(listen, ready, collect, stop_rx.clone()).await?;
    }
    println!("berth meta: node {id} serving grpc://{bound} as {advertise} (data in {})", data_dir.display());
    let server = berth_proto::tls::server()?
        .layer(crate::metrics::GrpcMetricsLayer)
        .add_service(raft_server(meta.raft().clone()))
        .add_service(meta_server(store, gate))
        .add_service(cluster_server(meta.clone()))
        .serve_with_incoming_shutdown(incoming, crate::shutdown_signal());
    let served = server.await.context("serving gRPC");
    expiry.abort();
    collecting.abort();
    stop_tx.send_replace(true);
    following.abort();
    served?;
    tracing::info!("shutting down");
    meta.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::id_from_hostname;

    #[test]
    fn a_statefulset_ordinal_names_the_node() {
        assert_eq!(id_from_hostname("berth-meta-0").unwrap(), 1);
        assert_eq!(id_from_hostname("berth-meta-12").unwrap(), 13);
        assert!(id_from_hostname("berth-meta").is_err());
        assert!(id_from_hostname("meta1").is_err());
    }
}
