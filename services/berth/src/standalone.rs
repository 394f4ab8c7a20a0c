//! `berth standalone`: storage engine, single-voter metadata group and frontend in one process.

use std::sync::Arc;

use anyhow::{Context, Result};
use berth_core::{BlobStore, MetaStore};
use berth_meta::gc::Collector;
use berth_meta::{MetaConfig, MetaService};
use berth_storage::{StorageConfig, StorageEngine};
use tokio::sync::watch;

use crate::config::StandaloneConfig;

pub async fn run(config: StandaloneConfig) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let storage = StorageEngine::open(StorageConfig { dir: data_dir.join("storage") }).context("opening storage")?;
    let meta = MetaService::open_single(MetaConfig {
        dir: data_dir.join("meta"),
        node_id: 1,
        advertise: config.http.listen.to_string(),
    })
    .await
    .context("starting the metadata service")?;
    let blobs: Arc<dyn BlobStore> = Arc::new(storage.clone());
    let metas: Arc<dyn MetaStore> = Arc::new(meta.clone());
    let collector = Arc::new(
        Collector::new(blobs.clone(), meta.clone(), config.gc_grace, config.gc_interval)
            .with_retention(config.deleted_retention),
    );
    meta.set_collector(&collector);
    let (stop_tx, stop_rx) = watch::channel(false);
    let housekeeping = tokio::spawn(crate::housekeeping::run(
        blobs.clone(),
        metas.clone(),
        config.upload_timeout,
        Some(collector),
        crate::housekeeping::Staged::All,
        stop_rx.clone(),
    ));
    let signal = tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    let suffix = format!(" (data in {})", data_dir.display());
    let (node, engine) = (meta.clone(), storage.clone());
    let collect: crate::probe::Collect = Arc::new(move || {
        crate::meta::raft_gauges(&node);
        metrics::gauge!("berth_storage_uploads_open").set(engine.uploads_open() as f64);
    });
    let served = crate::http::serve_registry(
        blobs,
        metas,
        &config.http,
        crate::http::Serving { role: "standalone", suffix: &suffix, key_owner: "standalone", collect },
        stop_rx,
    )
    .await;
    signal.abort();
    if let Err(e) = housekeeping.await {
        tracing::warn!(error = %e, "housekeeping ended abnormally");
    }
    // Uploads under way go on after the restart (see StorageEngine::keep_staged_uploads).
    if let Err(e) = storage.keep_staged_uploads().await {
        tracing::warn!(error = %e, "keeping staged uploads on disk");
    }
    meta.shutdown().await;
    served
}
