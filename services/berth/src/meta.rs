//! `berth meta`: one node of the metadata group, serving the Raft transport, the Meta service
//! (to frontends and storage nodes) and the Cluster service (to `berth admin cluster`) on one
//! gRPC address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth_core::store::{NodeState, StorageChange};
use berth_core::MetaStore;
use berth_meta::cluster::{cluster_server, RaftGate};
use berth_meta::network::{raft_server, Channels};
use berth_meta::server::meta_server;
use berth_meta::{MetaConfig, MetaService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

/// Flags of `berth meta` (each also read from its environment variable).
#[derive(clap::Args, Debug)]
pub struct MetaArgs {
    /// This node's id in the group (a positive number, unique and never reused).
    #[arg(long, env = "BERTH_NODE_ID")]
    pub id: u64,
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

pub async fn run(args: MetaArgs) -> Result<()> {
    anyhow::ensure!(args.id > 0, "--id must be a positive number");
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
        MetaConfig { dir: data_dir.clone(), node_id: args.id, advertise: advertise.clone() },
        Channels::default(),
    )
    .await
    .context("starting the metadata node")?;
    let store: Arc<dyn MetaStore> = Arc::new(meta.clone());
    let gate = Arc::new(RaftGate::new(meta.clone()));
    let expiry = tokio::spawn(expire_silent_storage(meta.clone(), dead_after));
    println!("berth meta: node {} serving grpc://{bound} as {advertise} (data in {})", args.id, data_dir.display());
    let server = Server::builder()
        .add_service(raft_server(meta.raft().clone()))
        .add_service(meta_server(store, gate))
        .add_service(cluster_server(meta.clone()))
        .serve_with_incoming_shutdown(incoming, crate::shutdown_signal());
    let served = server.await.context("serving gRPC");
    expiry.abort();
    served?;
    tracing::info!("shutting down");
    meta.shutdown().await;
    Ok(())
}
