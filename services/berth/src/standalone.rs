//! `berth standalone`: storage engine, single-voter metadata group and frontend in one process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_core::access::Scope;
use berth_core::store::{DirectoryChange, TokenOwner, User};
use berth_core::{BlobStore, MetaStore};
use berth_frontend::auth::{new_token, record_for, AuthConfig};
use berth_frontend::{FrontendConfig, Registry};
use berth_meta::{MetaConfig, MetaService};
use berth_storage::{StorageConfig, StorageEngine};
use tokio::sync::watch;

use crate::config::StandaloneConfig;

/// Blobs fenced for deletion per sweep; bounds the work of one Raft command.
const REAP_BATCH: usize = 256;

pub async fn run(config: StandaloneConfig) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)?;
    let storage = StorageEngine::open(StorageConfig { dir: data_dir.join("storage") }).context("opening storage")?;
    let meta = MetaService::open_single(MetaConfig {
        dir: data_dir.join("meta"),
        node_id: 1,
        advertise: config.listen.to_string(),
    })
    .await
    .context("starting the metadata service")?;
    let blobs: Arc<dyn BlobStore> = Arc::new(storage);
    let metas: Arc<dyn MetaStore> = Arc::new(meta.clone());
    let key = signing_key(&*metas).await?;
    bootstrap(&*metas, &config).await?;
    let registry = Registry::new(
        blobs.clone(),
        metas.clone(),
        FrontendConfig { max_blob: config.max_blob, ..Default::default() },
        AuthConfig { key, service: config.service.clone(), ttl: config.token_ttl },
    );

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    println!("berth standalone: serving http://{addr} (data in {})", data_dir.display());

    let (stop_tx, stop_rx) = watch::channel(false);
    let housekeeping = tokio::spawn(housekeeping(blobs, metas, config.clone(), stop_rx.clone()));
    let mut server_stop = stop_rx.clone();
    let server = axum::serve(listener, berth_frontend::router(registry)).with_graceful_shutdown(async move {
        let _ = server_stop.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // In-flight requests get a bounded time to finish.
    match tokio::time::timeout(Duration::from_secs(20), server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("requests still running after 20 s; stopping anyway"),
    }
    let _ = housekeeping.await;
    meta.shutdown().await;
    Ok(())
}

/// The registry's token-signing key, made on first start and kept in the metadata service.
async fn signing_key(meta: &dyn MetaStore) -> Result<Vec<u8>> {
    if meta.signing_key().await?.is_none() {
        let key: [u8; 32] = rand::random();
        meta.change_directory(DirectoryChange::InitSigningKey { key: hex::encode(key) }).await?;
    }
    let key = meta.signing_key().await?.context("signing key missing after creating it")?;
    Ok(hex::decode(key)?)
}

/// Ensures a site administrator exists: the one named by `--bootstrap-admin`, or on a first
/// start `admin` with a generated token, printed this once.
async fn bootstrap(meta: &dyn MetaStore, config: &StandaloneConfig) -> Result<()> {
    let all = vec![Scope::ReadPackages, Scope::WritePackages, Scope::DeletePackages];
    let admin = |name: &str| User { name: name.into(), site_admin: true, created_ms: 0 };
    match &config.bootstrap_admin {
        Some((user, token)) => {
            meta.change_directory(DirectoryChange::CreateUser(admin(user))).await?;
            let record = record_for(token, TokenOwner::User(user.clone()), "bootstrap", all, None);
            meta.change_directory(DirectoryChange::CreateToken(record)).await?;
        }
        None if meta.users().await?.is_empty() => {
            meta.change_directory(DirectoryChange::CreateUser(admin("admin"))).await?;
            let (token, record) = new_token("pat", TokenOwner::User("admin".into()), "bootstrap", all, None);
            meta.change_directory(DirectoryChange::CreateToken(record)).await?;
            eprintln!(
                "berth: created the site administrator 'admin'. Its token, shown only now:\n  {token}\n\
                 log in with: docker login {} -u admin --password-stdin",
                config.listen
            );
        }
        None => {}
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Expires idle uploads and deletes the bytes of blobs no repository links any more.
async fn housekeeping(
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    config: StandaloneConfig,
    mut stop: watch::Receiver<bool>,
) {
    let period = (config.upload_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match blobs.expire_uploads(config.upload_timeout).await {
            Ok(ids) => {
                for id in ids {
                    let _ = meta.end_upload(&id, None).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiring uploads"),
        }
        match meta.begin_reap(config.gc_grace, REAP_BATCH).await {
            Ok(digests) => {
                for d in digests {
                    match blobs.delete(&d).await {
                        Ok(_) => {
                            let _ = meta.blob_reaped(&d).await;
                        }
                        Err(e) => {
                            tracing::warn!(digest = %d, error = %e, "deleting an unlinked blob")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "garbage collection"),
        }
    }
}
