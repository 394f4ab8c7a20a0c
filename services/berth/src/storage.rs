//! `berth storage`: a storage node, serving its blob store over gRPC and keeping it: expiring
//! idle uploads and collecting garbage against the metadata group.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_core::{BlobStore, MetaStore};
use berth_meta::client::{MetaClient, MetaClientConfig};
use berth_storage::server::storage_server;
use berth_storage::{StorageConfig, StorageEngine};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

/// Flags of `berth storage` (each also read from its environment variable).
#[derive(clap::Args, Debug)]
pub struct StorageArgs {
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
    /// Seconds an unlinked blob is kept before its bytes are deleted [default: 3600].
    #[arg(long, env = "BERTH_GC_GRACE_SECS")]
    pub gc_grace_secs: Option<u64>,
}

/// Runs the node until SIGTERM or SIGINT.
pub async fn run(args: StorageArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let engine = StorageEngine::open(StorageConfig { dir: data_dir.clone() }).context("opening storage")?;
    let blobs: Arc<dyn BlobStore> = Arc::new(engine);
    let metas: Arc<dyn MetaStore> =
        Arc::new(MetaClient::new(args.meta, MetaClientConfig::default()).context("the metadata nodes")?);
    let incoming = TcpIncoming::bind(args.listen)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.listen))?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().context("reading the bound address")?;
    println!("berth storage: serving grpc://{bound} (data in {})", data_dir.display());
    let (stop_tx, stop_rx) = watch::channel(false);
    let upload_timeout = Duration::from_secs(
        args.upload_timeout_secs.unwrap_or(berth_core::store::DEFAULT_UPLOAD_TIMEOUT.as_secs()).max(1),
    );
    let gc_grace = Duration::from_secs(args.gc_grace_secs.unwrap_or(3600));
    // Sessions staged on other nodes are not this node's to judge (see housekeeping::run).
    let housekeeping =
        tokio::spawn(crate::housekeeping::run(blobs.clone(), metas, upload_timeout, gc_grace, false, stop_rx));
    let served = Server::builder()
        .http2_adaptive_window(Some(true))
        .add_service(storage_server(blobs))
        .serve_with_incoming_shutdown(incoming, crate::shutdown_signal())
        .await
        .context("serving gRPC");
    stop_tx.send_replace(true);
    if let Err(e) = housekeeping.await {
        tracing::warn!(error = %e, "housekeeping ended abnormally");
    }
    served
}
