//! `berth standalone`: storage engine, single-voter metadata group and frontend in one process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_core::access::Scope;
use berth_core::store::{DirectoryChange, TokenOwner, User};
use berth_core::{BlobStore, MetaStore};
use berth_frontend::auth::{new_token, record_for, AuthConfig};
use berth_frontend::keys::KeyRing;
use berth_frontend::{FrontendConfig, Registry};
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
        advertise: config.listen.to_string(),
    })
    .await
    .context("starting the metadata service")?;
    let blobs: Arc<dyn BlobStore> = Arc::new(storage);
    let metas: Arc<dyn MetaStore> = Arc::new(meta.clone());
    bootstrap(&*metas, &config).await?;
    let keys = KeyRing::start(metas.clone(), config.token_ttl, "standalone").await?;
    let registry = Registry::new(
        blobs.clone(),
        metas.clone(),
        FrontendConfig {
            max_blob: config.max_blob,
            max_uploads_per_caller: config.max_uploads_per_caller,
            idle_body_timeout: config.idle_body_timeout,
            request_timeout: config.request_timeout,
            ..Default::default()
        },
        AuthConfig {
            keys: keys.clone(),
            service: config.service.clone(),
            ttl: config.token_ttl,
            external_url: config.external_url.clone(),
        },
    );

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    println!("berth standalone: serving http://{addr} (data in {})", data_dir.display());

    let (stop_tx, stop_rx) = watch::channel(false);
    let housekeeping = tokio::spawn(housekeeping(blobs, metas, keys, config.clone(), stop_rx.clone()));
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(berth_frontend::serve::serve(
        listener,
        berth_frontend::router(registry),
        config.limits.clone(),
        async move {
            // An error means the sender is gone, which only happens on the way out anyway.
            let _stopped = server_stop.wait_for(|s| *s).await;
        },
    ));

    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    stop_tx.send_replace(true);
    // In-flight requests get a bounded time to finish.
    match tokio::time::timeout(Duration::from_secs(20), server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("requests still running after 20 s; stopping anyway"),
    }
    if let Err(e) = housekeeping.await {
        tracing::warn!(error = %e, "housekeeping ended abnormally");
    }
    meta.shutdown().await;
    Ok(())
}

/// Ensures a site administrator exists: the one named by `--bootstrap-admin`, or on a first
/// start `admin` with a generated token, printed this once. Either is created once: the token
/// of `--bootstrap-admin` is stored only when its user is created, so revoking it lasts across
/// restarts, and an existing account of that name is never given it.
async fn bootstrap(meta: &dyn MetaStore, config: &StandaloneConfig) -> Result<()> {
    let all = vec![Scope::ReadPackages, Scope::WritePackages, Scope::DeletePackages];
    let admin = |name: &str| User { name: name.into(), site_admin: true, created_ms: berth_core::now_ms() };
    match &config.bootstrap_admin {
        Some((user, token)) => {
            if meta.change_directory(DirectoryChange::CreateUser(admin(user))).await? {
                let record = record_for(token, TokenOwner::User(user.clone()), "bootstrap", all, None);
                meta.change_directory(DirectoryChange::CreateToken(record)).await?;
            } else {
                match meta.user(user).await? {
                    Some(u) if u.site_admin => {}
                    _ => anyhow::bail!(
                        "--bootstrap-admin: the name {user:?} is taken by an account that is not a site administrator"
                    ),
                }
            }
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

/// Sessions checked against their staging areas per round.
const SESSIONS_PER_ROUND: usize = 1000;

/// A session younger than this is not ended for lack of a staging area: it may be between
/// the two writes that start it.
const SESSION_SETTLE: Duration = Duration::from_secs(60);

/// Expires idle uploads and runs garbage collection.
async fn housekeeping(
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    keys: Arc<KeyRing>,
    config: StandaloneConfig,
    mut stop: watch::Receiver<bool>,
) {
    let period =
        (config.upload_timeout / 4).min(config.gc_grace / 2).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let collector = Collector::new(blobs.clone(), meta.clone(), config.gc_grace);
    let mut sessions_cursor: Option<String> = None;
    let mut rotations_checked = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match blobs.expire_uploads(config.upload_timeout).await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = meta.end_upload(&id, None).await {
                        tracing::debug!(upload = %id, error = %e, "ending an expired upload");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiring uploads"),
        }
        if rotations_checked.elapsed() >= berth_frontend::keys::ROTATION_CHECK {
            rotations_checked = tokio::time::Instant::now();
            if let Err(e) = keys.follow_rotations().await {
                tracing::warn!(error = %e, "checking for a signing key rotation");
            }
        }
        if let Err(e) = end_sessions_without_staging(&*blobs, &*meta, &mut sessions_cursor).await {
            tracing::warn!(error = %e, "checking upload sessions");
        }
        match collector.round().await {
            Ok(r) if r.deleted > 0 || r.strays > 0 => {
                tracing::info!(
                    deleted = r.deleted,
                    freed_bytes = r.freed_bytes,
                    strays = r.strays,
                    "garbage collection"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "garbage collection"),
        }
    }
}

/// Ends sessions whose staging area is gone (lost with a restart before its first bytes
/// reached disk), so that they neither count against their caller nor keep their
/// repository's loose links from being collected.
async fn end_sessions_without_staging(
    blobs: &dyn BlobStore,
    meta: &dyn MetaStore,
    cursor: &mut Option<String>,
) -> berth_core::error::Result<()> {
    let page = meta.uploads(cursor.as_deref(), SESSIONS_PER_ROUND).await?;
    *cursor = if page.len() < SESSIONS_PER_ROUND { None } else { page.last().map(|s| s.id.clone()) };
    let settled = berth_core::now_ms().saturating_sub(SESSION_SETTLE.as_millis() as u64);
    for s in page {
        if s.started_at_ms <= settled && blobs.upload_size(&s.id).await?.is_none() {
            meta.end_upload(&s.id, None).await?;
        }
    }
    Ok(())
}
