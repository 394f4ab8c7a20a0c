//! The HTTP frontend as a role's part: the registry API over a blob store and a metadata
//! store, served until the role stops; shared by `berth standalone` and `berth frontend`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_core::access::Scope;
use berth_core::store::{DirectoryChange, TokenOwner, User};
use berth_core::{BlobStore, MetaStore};
use berth_frontend::auth::{new_token, record_for};
use berth_frontend::keys::KeyRing;
use berth_frontend::tls::ReloadingCert;
use berth_frontend::Registry;
use tokio::sync::watch;

use crate::config::FrontendSettings;

/// How long requests in flight may run on once the role is asked to stop.
const DRAIN: Duration = Duration::from_secs(20);

/// Which role serves the API, as it names itself.
pub struct Serving<'a> {
    /// The role's name in the first line on stdout (`standalone`, `frontend`).
    pub role: &'a str,
    /// What that line says after the address.
    pub suffix: &'a str,
    /// Whose signing keys this process's are (see `KeyRing::start`).
    pub key_owner: &'a str,
    /// The role's gauges set at scrape time.
    pub collect: crate::probe::Collect,
}

/// Serves the registry API until `stop` turns true, then lets requests in flight finish (for
/// at most [`DRAIN`]). The first line on stdout is `berth ROLE: serving http://ADDR SUFFIX` (`https://` when it serves TLS).
pub async fn serve_registry(
    blobs: Arc<dyn BlobStore>,
    metas: Arc<dyn MetaStore>,
    settings: &FrontendSettings,
    serving: Serving<'_>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let Serving { role, suffix, key_owner, collect } = serving;
    bootstrap(&*metas, settings).await?;
    let keys = KeyRing::start(metas.clone(), settings.token_ttl, key_owner).await?;
    let registry = Registry::new(blobs, metas, settings.frontend_config(), settings.auth_config(keys.clone()));
    if let Some(listen) = settings.http_listen {
        let reg = registry.clone();
        let ready: crate::probe::Readiness = Arc::new(move || {
            let reg = reg.clone();
            Box::pin(async move { reg.readiness().await })
        });
        crate::probe::serve(listen, ready, collect, stop.clone()).await?;
    }
    let tls = match &settings.tls {
        Some(files) => {
            let cert = ReloadingCert::open(files.clone()).context("--tls-cert/--tls-key")?;
            tokio::spawn(cert.clone().watch(stop.clone()));
            Some(cert.acceptor()?)
        }
        None => None,
    };
    let listener =
        tokio::net::TcpListener::bind(settings.listen).await.with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("berth {role}: serving {scheme}://{addr}{suffix}");
    let rotations = tokio::spawn(follow_rotations(keys, stop.clone()));
    let mut server_stop = stop.clone();
    let server = tokio::spawn(berth_frontend::serve::serve(
        listener,
        berth_frontend::router(registry),
        settings.limits.clone(),
        tls,
        async move {
            // An error means the sender is gone, which only happens on the way out anyway.
            let _stopped = server_stop.wait_for(|s| *s).await;
        },
    ));
    let mut stop = stop;
    // An error means the sender is gone: stop as if asked.
    let _stopped = stop.wait_for(|s| *s).await;
    match tokio::time::timeout(DRAIN, server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("requests still running after {DRAIN:?}; stopping anyway"),
    }
    if let Err(e) = rotations.await {
        tracing::warn!(error = %e, "the key rotation watcher ended abnormally");
    }
    Ok(())
}

/// Rotates this frontend's signing key when another frontend asked every one to.
async fn follow_rotations(keys: Arc<KeyRing>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(berth_frontend::keys::ROTATION_CHECK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = keys.follow_rotations().await {
            tracing::warn!(error = %e, "checking for a signing key rotation");
        }
    }
}

/// Ensures a site administrator exists: the one named by `--bootstrap-admin`, or on a first
/// start `admin` with a generated token, printed this once. Either is created once: the token
/// of `--bootstrap-admin` is stored only when its user is created, so revoking it lasts across
/// restarts, and an existing account of that name is never given it.
async fn bootstrap(meta: &dyn MetaStore, config: &FrontendSettings) -> Result<()> {
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
