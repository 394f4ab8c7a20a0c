//! `berth frontend`: the registry's HTTP API, holding no state of its own: metadata through
//! the metadata group's gRPC service, bytes through a storage node's.

use std::sync::Arc;

use anyhow::{Context, Result};
use berth_core::{BlobStore, MetaStore};
use berth_meta::client::{MetaClient, MetaClientConfig};
use berth_storage::client::{StorageClient, StorageClientConfig};
use tokio::sync::watch;

use crate::config::{FrontendFlags, FrontendSettings};

/// Flags of `berth frontend` (each also read from its environment variable).
#[derive(clap::Args, Debug)]
pub struct FrontendArgs {
    /// The HTTP frontend's flags.
    #[command(flatten)]
    pub http: FrontendFlags,
    /// Metadata nodes' gRPC addresses, `ADDR,...` (any of them; the leader is found).
    #[arg(long, env = "BERTH_META", value_delimiter = ',', required = true)]
    pub meta: Vec<String>,
    /// The storage node's gRPC address.
    #[arg(long, env = "BERTH_STORAGE", required = true)]
    pub storage: String,
    /// This frontend's name, stable across its restarts (it names the keys it signs tokens
    /// with) [default: its listen address].
    #[arg(long, env = "BERTH_NAME")]
    pub name: Option<String>,
}

/// Runs the frontend until SIGTERM or SIGINT.
pub async fn run(args: FrontendArgs) -> Result<()> {
    let settings = FrontendSettings::from_flags(args.http)?;
    let metas: Arc<dyn MetaStore> =
        Arc::new(MetaClient::new(args.meta, MetaClientConfig::default()).context("the metadata nodes")?);
    let blobs: Arc<dyn BlobStore> =
        Arc::new(StorageClient::new(&args.storage, StorageClientConfig::default()).context("the storage node")?);
    let name = args.name.unwrap_or_else(|| format!("frontend-{}", settings.listen));
    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    let served = crate::http::serve_registry(blobs, metas, &settings, "frontend", "", &name, stop_rx).await;
    signal.abort();
    served
}
