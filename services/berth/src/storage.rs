//! `berth storage`: a storage node, serving its blob store over gRPC and keeping it: expiring
//! idle uploads and collecting garbage against the metadata group. It registers itself with
//! the metadata group (name, address, zone, capacity) at start and sends a heartbeat every
//! [`HEARTBEAT`]; frontends place blobs on the nodes of that map, and the node moves its own
//! blobs to where that map wants them (`crate::rebalance`), and scrubs them, replacing damaged
//! copies from good replicas (`crate::scrub`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use berth_core::store::{NodeState, NodeStats, StorageNode};
use berth_core::{BlobStore, MetaStore};
use berth_meta::client::{MetaClient, MetaClientConfig};
use berth_storage::server::storage_server;
use berth_storage::{StorageConfig, StorageEngine};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

/// Flags of `berth storage` (each also read from its environment variable).
#[derive(clap::Args, Debug)]
pub struct StorageArgs {
    /// Mutual TLS with the other roles.
    #[command(flatten)]
    pub cluster_tls: crate::config::ClusterTlsFlags,
    /// gRPC address to serve on.
    #[arg(long, env = "BERTH_GRPC_LISTEN", default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Directory of the node's blobs and index.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = "berth-storage-data")]
    pub data_dir: PathBuf,
    /// Metadata nodes' gRPC addresses, `ADDR,...`.
    #[arg(long, env = "BERTH_META", value_delimiter = ',', required = true)]
    pub meta: Vec<String>,
    /// Seconds without progress after which an upload session expires [default: 600].
    #[arg(long, env = "BERTH_UPLOAD_TIMEOUT_SECS")]
    pub upload_timeout_secs: Option<u64>,
    /// Ignored: garbage collection runs on the metadata leader (`berth meta --gc-grace-secs`).
    /// Accepted so that earlier command lines still start.
    #[arg(long, hide = true)]
    pub gc_grace_secs: Option<u64>,
    /// The address frontends and other nodes reach this node at [default: the address bound].
    #[arg(long, env = "BERTH_ADVERTISE")]
    pub advertise: Option<String>,
    /// The node's name, which placement hashes: keep it for the life of the data [default: one
    /// made at first start and kept in the data directory].
    #[arg(long, env = "BERTH_NODE_NAME")]
    pub name: Option<String>,
    /// The node's zone (rack, room, data centre): copies of a blob go to different zones.
    #[arg(long, env = "BERTH_ZONE")]
    pub zone: Option<String>,
    /// Bytes this node offers [default: the size of the data directory's file system].
    /// Placement gives each node a share of blobs in proportion to it.
    #[arg(long, env = "BERTH_CAPACITY_BYTES")]
    pub capacity_bytes: Option<u64>,
    /// Copies of each blob (R): the same as the frontends' `--replicas`.
    #[arg(long, env = "BERTH_REPLICAS", default_value_t = 3)]
    pub replicas: usize,
    /// Bytes per second this node may spend copying blobs to their owners (re-replication,
    /// rebalance, drain); 0 for no limit.
    #[arg(long, env = "BERTH_MOVE_BANDWIDTH", default_value_t = 64 << 20)]
    pub move_bandwidth: u64,
    /// Seconds between passes that check every blob here against its owners when the
    /// placement map has not changed (a change starts a pass at once).
    #[arg(long, env = "BERTH_PLACEMENT_CHECK_SECS", default_value_t = 3600)]
    pub placement_check_secs: u64,
    /// Seconds a new blob is left to the write that stored it before placement passes look at
    /// it (that write copies it to its owners itself). Keep it well above the time frontends
    /// take to follow a new map (they poll every 2 s) and finish the uploads begun before.
    #[arg(long, env = "BERTH_PLACEMENT_GRACE_SECS", default_value_t = 30)]
    pub placement_grace_secs: u64,
    /// Bytes per second the scrub may re-read to check this node's blobs; 0 for no limit.
    #[arg(long, env = "BERTH_SCRUB_BANDWIDTH", default_value_t = 16 << 20)]
    pub scrub_bandwidth: u64,
    /// Seconds between two scrub passes over everything this node holds.
    #[arg(long, env = "BERTH_SCRUB_PAUSE_SECS", default_value_t = 3600)]
    pub scrub_pause_secs: u64,
    /// HTTP address of the probes: `/healthz` (the node serves) and `/readyz` (its last
    /// heartbeat reached the metadata group) [default: none].
    #[arg(long, env = "BERTH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
}

/// How often a storage node renews its registration.
pub const HEARTBEAT: Duration = Duration::from_secs(3);

/// The node's name: `given`, else the one kept in `dir`, else a new one (kept there).
fn node_name(dir: &Path, given: Option<String>) -> Result<String> {
    let file = dir.join("node-name");
    let kept = std::fs::read_to_string(&file).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let name = match (given, kept) {
        (Some(g), Some(k)) if g != k => {
            tracing::warn!(given = %g, kept = %k, "the node's name changed: blobs move to the owners the new name gives");
            g
        }
        (Some(g), _) => g,
        (None, Some(k)) => return Ok(k),
        (None, None) => format!("storage-{}", hex::encode(rand::random::<[u8; 6]>())),
    };
    std::fs::write(&file, format!("{name}\n")).with_context(|| format!("writing {}", file.display()))?;
    Ok(name)
}

/// The size of the file system holding `dir`, in bytes.
fn filesystem_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: `path` is a NUL-terminated string and `st` a properly sized out-parameter.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) == 0 {
            (st.f_blocks as u64).saturating_mul(st.f_frsize as u64)
        } else {
            0
        }
    }
}

/// Registers `node` now and every [`HEARTBEAT`] until `stop` turns true, with the latest
/// `stats`.
async fn heartbeat(
    meta: Arc<dyn MetaStore>,
    node: StorageNode,
    stats: Arc<Mutex<NodeStats>>,
    heard: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut registered = false;
    loop {
        let stats = *stats.lock().unwrap_or_else(PoisonError::into_inner);
        match meta.register_storage(StorageNode { stats, ..node.clone() }).await {
            Ok(()) => {
                heard.store(berth_core::now_ms(), Ordering::Relaxed);
                if !registered {
                    registered = true;
                    tracing::info!(name = %node.name, addr = %node.addr, "registered with the metadata group");
                }
            }
            Err(e) => tracing::warn!(error = %e, "registering with the metadata group"),
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Sets the node's gauges and counters kept in its statistics, at scrape time.
fn node_gauges(engine: &StorageEngine, stats: &Mutex<NodeStats>) {
    use metrics::{counter, gauge};
    let s = *stats.lock().unwrap_or_else(PoisonError::into_inner);
    gauge!("berth_storage_uploads_open").set(engine.uploads_open() as f64);
    gauge!("berth_storage_blobs").set(s.blobs as f64);
    gauge!("berth_storage_bytes").set(s.bytes as f64);
    gauge!("berth_storage_move_queue").set(s.queued as f64);
    counter!("berth_storage_copies_made_total").absolute(s.copies_made);
    counter!("berth_storage_copies_dropped_total").absolute(s.copies_dropped);
    counter!("berth_storage_moved_bytes_total").absolute(s.bytes_moved);
    gauge!("berth_storage_move_bytes_per_second").set(s.move_rate as f64);
    gauge!("berth_scrub_pass_checked_bytes").set(s.scrubbed as f64);
    counter!("berth_scrub_passes_total").absolute(s.scrub_passes);
    gauge!("berth_scrub_bytes_per_second").set(s.scrub_rate as f64);
    counter!("berth_scrub_damaged_total").absolute(s.damaged);
    counter!("berth_scrub_mended_total").absolute(s.mended);
}

/// Runs the node until SIGTERM or SIGINT.
pub async fn run(args: StorageArgs) -> Result<()> {
    args.cluster_tls.install()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let engine = StorageEngine::open(StorageConfig { dir: data_dir.clone() }).context("opening storage")?;
    let blobs: Arc<dyn BlobStore> = Arc::new(engine.clone());
    let keeper = engine.clone();
    let metas: Arc<dyn MetaStore> =
        Arc::new(MetaClient::new(args.meta, MetaClientConfig::default()).context("the metadata nodes")?);
    let incoming = TcpIncoming::bind(args.listen)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.listen))?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().context("reading the bound address")?;
    let node = StorageNode {
        name: node_name(&data_dir, args.name)?,
        addr: args.advertise.unwrap_or_else(|| bound.to_string()),
        zone: args.zone,
        capacity: args.capacity_bytes.unwrap_or_else(|| filesystem_bytes(&data_dir)),
        seen_ms: 0,
        state: NodeState::Live,
        stats: NodeStats::default(),
        since_version: 0,
    };
    println!("berth storage: serving grpc://{bound} as {} (data in {})", node.name, data_dir.display());
    // Of the upload sessions, only those staged here are this node's to judge.
    let staged = crate::housekeeping::Staged::On { name: node.name.clone(), addr: node.addr.clone() };
    let (stop_tx, stop_rx) = watch::channel(false);
    let upload_timeout = Duration::from_secs(
        args.upload_timeout_secs.unwrap_or(berth_core::store::DEFAULT_UPLOAD_TIMEOUT.as_secs()).max(1),
    );
    let stats = Arc::new(Mutex::new(NodeStats::default()));
    let reads_first = tokio::spawn(crate::rebalance::follow_reads_first(
        engine.clone(),
        metas.clone(),
        node.name.clone(),
        stop_rx.clone(),
    ));
    let rebalance = crate::rebalance::Rebalancer {
        local: blobs.clone(),
        meta: metas.clone(),
        name: node.name.clone(),
        replicas: args.replicas.max(1),
        bandwidth: args.move_bandwidth,
        interval: Duration::from_secs(args.placement_check_secs.max(1)),
        grace: Duration::from_secs(args.placement_grace_secs),
        stats: stats.clone(),
    };
    let rebalancing = tokio::spawn(rebalance.run(stop_rx.clone()));
    let scrub = crate::scrub::Scrubber {
        engine,
        meta: metas.clone(),
        name: node.name.clone(),
        bandwidth: args.scrub_bandwidth,
        pause: Duration::from_secs(args.scrub_pause_secs),
        stats: stats.clone(),
    };
    let scrubbing = tokio::spawn(scrub.run(stop_rx.clone()));
    // When the metadata group last took this node's heartbeat (ms since the epoch; 0: never).
    let heard = Arc::new(AtomicU64::new(0));
    if let Some(listen) = args.http_listen {
        let heard = heard.clone();
        let ready: crate::probe::Readiness = Arc::new(move || {
            let last = heard.load(Ordering::Relaxed);
            Box::pin(async move {
                let ago = berth_core::now_ms().saturating_sub(last);
                if last == 0 {
                    Err("not registered with the metadata group yet".to_string())
                } else if ago > 3 * HEARTBEAT.as_millis() as u64 {
                    Err(format!("the metadata group has not taken a heartbeat for {} s", ago / 1000))
                } else {
                    Ok(())
                }
            })
        });
        let (engine, stats) = (keeper.clone(), stats.clone());
        let collect: crate::probe::Collect = Arc::new(move || node_gauges(&engine, &stats));
        crate::probe::serve(listen, ready, collect, stop_rx.clone()).await?;
    }
    let heartbeats = tokio::spawn(heartbeat(metas.clone(), node, stats, heard, stop_rx.clone()));
    if args.gc_grace_secs.is_some() {
        tracing::warn!("--gc-grace-secs is ignored by storage nodes: set it on the metadata nodes (berth meta)");
    }
    // Garbage collection runs on the metadata leader, over every storage node.
    let housekeeping =
        tokio::spawn(crate::housekeeping::run(blobs.clone(), metas, upload_timeout, None, staged, stop_rx));
    let served = berth_proto::tls::server()?
        .layer(crate::metrics::GrpcMetricsLayer)
        .initial_stream_window_size(berth_storage::client::STREAM_WINDOW)
        .initial_connection_window_size(berth_storage::client::CONNECTION_WINDOW)
        .max_frame_size(berth_storage::client::MAX_FRAME)
        .add_service(storage_server(blobs))
        .serve_with_incoming_shutdown(incoming, crate::shutdown_signal())
        .await
        .context("serving gRPC");
    stop_tx.send_replace(true);
    heartbeats.abort();
    rebalancing.abort();
    scrubbing.abort();
    reads_first.abort();
    // Housekeeping ends first: an upload it expired after the staged ones were kept would be
    // missing from the ended ones kept with them.
    if let Err(e) = housekeeping.await {
        tracing::warn!(error = %e, "housekeeping ended abnormally");
    }
    match keeper.keep_staged_uploads().await {
        Ok(n) => tracing::info!(uploads = n, "staged uploads kept on disk for the restart"),
        Err(e) => tracing::warn!(error = %e, "keeping staged uploads on disk"),
    }
    served
}
