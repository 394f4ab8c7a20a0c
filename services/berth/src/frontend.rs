//! `berth frontend`: the registry's HTTP API, holding no state of its own: metadata through
//! the metadata group's gRPC service, bytes through the storage nodes' (each blob on R of them,
//! see `berth_storage::router`). The storage nodes are the ones registered in the metadata
//! group's placement map, polled every [`MAP_POLL`] (or a fixed list given with `--storage`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_core::{BlobStore, Digest, MetaStore};
use berth_meta::client::{MetaClient, MetaClientConfig};
use berth_storage::client::{StorageClient, StorageClientConfig};
use berth_storage::router::{CurrentRouter, Replicated};
use tokio::sync::watch;

use crate::config::{FrontendFlags, FrontendSettings};
use crate::follow::{follow_placement, Following};

/// Flags of `berth frontend` (each also read from its environment variable).
#[derive(clap::Args, Debug)]
pub struct FrontendArgs {
    /// Mutual TLS with the other roles.
    #[command(flatten)]
    pub cluster_tls: crate::config::ClusterTlsFlags,
    /// The HTTP frontend's flags.
    #[command(flatten)]
    pub http: FrontendFlags,
    /// Metadata nodes' gRPC addresses, `ADDR,...` (any of them; the leader is found).
    #[arg(long, env = "BERTH_META", value_delimiter = ',', required = true)]
    pub meta: Vec<String>,
    /// A fixed list of storage nodes' gRPC addresses, `ADDR,...`, instead of the nodes
    /// registered with the metadata group.
    #[arg(long, env = "BERTH_STORAGE", value_delimiter = ',')]
    pub storage: Vec<String>,
    /// Copies of each blob. With a fixed `--storage` list of fewer nodes, every node holds every
    /// blob; with the registered nodes, a blob that has fewer copies is recorded and repaired
    /// once enough nodes have registered.
    #[arg(long, env = "BERTH_REPLICAS", default_value_t = 3)]
    pub replicas: usize,
    /// Copies durable before a push is acknowledged.
    #[arg(long, env = "BERTH_WRITE_QUORUM", default_value_t = 2)]
    pub write_quorum: usize,
    /// This frontend's name, stable across its restarts (it names the keys it signs tokens
    /// with) [default: its listen address].
    #[arg(long, env = "BERTH_NAME")]
    pub name: Option<String>,
}

/// Runs the frontend until SIGTERM or SIGINT.
pub async fn run(args: FrontendArgs) -> Result<()> {
    args.cluster_tls.install()?;
    let settings = FrontendSettings { remote_metadata: true, ..FrontendSettings::from_flags(args.http)? };
    let metas: Arc<dyn MetaStore> =
        Arc::new(MetaClient::new(args.meta, MetaClientConfig::default()).context("the metadata nodes")?);
    let router = Arc::new(CurrentRouter::default());
    if !args.storage.is_empty() {
        let mut nodes: Vec<(String, Arc<dyn BlobStore>)> = vec![];
        for addr in &args.storage {
            let client = StorageClient::new(addr, StorageClientConfig::default()).context("a storage node")?;
            nodes.push((addr.clone(), Arc::new(client)));
        }
        // Fewer nodes than replicas: every node holds every blob, and the quorum shrinks with it.
        let replicas = args.replicas.clamp(1, nodes.len());
        let quorum = args.write_quorum.clamp(1, replicas);
        let fixed = Replicated::new(nodes, replicas, quorum)
            .map_err(|e| anyhow::anyhow!("storage: {e}"))?
            .with_addrs(args.storage.clone())
            .with_repair_record(metas.clone());
        router.set(0, fixed);
    } else if args.write_quorum == 0 || args.write_quorum > args.replicas {
        anyhow::bail!("the write quorum must be between 1 and the replica count ({})", args.replicas);
    }
    let name = args.name.unwrap_or_else(|| format!("frontend-{}", settings.listen));
    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    let follow = args.storage.is_empty().then(|| {
        let placement =
            Following { replicas: args.replicas, write_quorum: args.write_quorum, skip_dead: false, poll: MAP_POLL };
        tokio::spawn(follow_placement(router.clone(), metas.clone(), placement, stop_rx.clone()))
    });
    let repairs = tokio::spawn(repair_copies(router.clone(), metas.clone(), stop_rx.clone()));
    let blobs: Arc<dyn BlobStore> = router;
    let served = crate::http::serve_registry(
        blobs,
        metas,
        &settings,
        crate::http::Serving {
            role: "frontend",
            suffix: "",
            key_owner: &name,
            collect: crate::probe::nothing_to_collect(),
        },
        stop_rx,
    )
    .await;
    signal.abort();
    repairs.abort();
    if let Some(f) = follow {
        f.abort();
    }
    served
}

/// How often a frontend asks for the placement map.
const MAP_POLL: Duration = Duration::from_secs(2);

/// How often the record of blobs short of copies is worked through.
const REPAIR_PERIOD: Duration = Duration::from_secs(2);

/// Blobs repaired per page of the record.
const REPAIR_PAGE: usize = 256;

/// Brings blobs recorded short of copies back to R, until `stop` turns true: every
/// [`REPAIR_PERIOD`], the whole record, a page at a time. Every frontend does this; two
/// repairing one blob at once write the same verified bytes, which is harmless.
async fn repair_copies(router: Arc<CurrentRouter>, meta: Arc<dyn MetaStore>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPAIR_PERIOD) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut after: Option<Digest> = None;
        let mut queued = 0usize;
        loop {
            let page = match meta.short_copies(after.as_ref(), REPAIR_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the blobs short of copies");
                    break;
                }
            };
            queued += page.len();
            let Ok(current) = router.get() else { break };
            for d in &page {
                let outcome = current.repair(d).await;
                let label = match &outcome {
                    Ok(true) => "repaired",
                    Ok(false) => "deferred",
                    Err(_) => "failed",
                };
                metrics::counter!("berth_repairs_total", "outcome" => label).increment(1);
                match outcome {
                    Ok(true) => {
                        if let Err(e) = meta.copies_repaired(d).await {
                            tracing::debug!(digest = %d, error = %e, "clearing a repaired blob's record");
                        } else {
                            tracing::info!(digest = %d, "blob back to its full copy count");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(digest = %d, error = %e, "repairing a blob's copies"),
                }
            }
            if page.len() < REPAIR_PAGE {
                metrics::gauge!("berth_repair_queue").set(queued as f64);
                break;
            }
            after = page.last().cloned();
        }
    }
}
