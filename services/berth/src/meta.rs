//! `berth meta`: one node of the metadata group, serving the Raft transport, the Meta service
//! (to frontends and storage nodes) and the Cluster service (to `berth admin cluster`) on one
//! gRPC address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
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
}

/// Runs the node until SIGTERM or SIGINT.
pub async fn run(args: MetaArgs) -> Result<()> {
    anyhow::ensure!(args.id > 0, "--id must be a positive number");
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
    println!("berth meta: node {} serving grpc://{bound} as {advertise} (data in {})", args.id, data_dir.display());
    let server = Server::builder()
        .add_service(raft_server(meta.raft().clone()))
        .add_service(meta_server(store, gate))
        .add_service(cluster_server(meta.clone()))
        .serve_with_incoming_shutdown(incoming, crate::shutdown_signal());
    server.await.context("serving gRPC")?;
    tracing::info!("shutting down");
    meta.shutdown().await;
    Ok(())
}
