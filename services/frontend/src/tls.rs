//! HTTPS for the API: rustls, with a certificate chain and key read from PEM files and read
//! again when either file changes, so that a renewed certificate takes effect without a
//! restart (connections already open keep the one they began with).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How often the files are looked at for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Where the serving certificate and its key are.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM: the certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What a file looked like when it was last read: a change of either means read it again.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The process's crypto provider (ring).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificate chain and key of `files`.
pub fn load(files: &CertFiles) -> io::Result<CertifiedKey> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| bad("reading", path, &e));
    certified(&read(&files.cert)?, &read(&files.key)?, files)
}

fn bad(what: &str, path: &Path, e: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what} {}: {e}", path.display()))
}

/// The certificate chain in `cert` (PEM) with the key in `key` (PEM), checked to belong
/// together; errors name the files of `names` they came from.
pub fn certified(cert: &[u8], key: &[u8], names: &CertFiles) -> io::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad("reading certificates from", &names.cert, &e))?;
    if chain.is_empty() {
        return Err(bad("no certificate in", &names.cert, &"empty"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("reading the key from", &names.key, &e))?;
    let signer = provider().key_provider.load_private_key(key).map_err(|e| bad("unusable key in", &names.key, &e))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| bad("the key does not match the certificate in", &names.cert, &e))?;
    Ok(certified)
}

/// The certificate handshakes are answered with: the files' latest readable contents.
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files as last read (or found unreadable: warned about once per change).
    seen: Mutex<(Stamp, Stamp)>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

impl ReloadingCert {
    /// Reads `files` (they must be valid now).
    pub fn open(files: CertFiles) -> io::Result<Arc<ReloadingCert>> {
        let seen = (stamp(&files.cert), stamp(&files.key));
        let current = RwLock::new(Arc::new(load(&files)?));
        Ok(Arc::new(ReloadingCert { files, current, seen: Mutex::new(seen) }))
    }

    /// Reads the files again if either changed since last looked at; returns whether the
    /// certificate served changed. Unreadable or mismatched files leave it as it is.
    pub fn reload_if_changed(&self) -> bool {
        let now = (stamp(&self.files.cert), stamp(&self.files.key));
        {
            let Ok(mut seen) = self.seen.lock() else { return false };
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match load(&self.files) {
            Ok(c) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(c);
                }
                tracing::info!(cert = %self.files.cert.display(), "serving the renewed certificate");
                true
            }
            Err(e) => {
                // A renewal half written is seen again once the files change again.
                tracing::warn!(error = %e, "the certificate files changed but cannot be used; keeping the current one");
                false
            }
        }
    }

    /// Looks at the files every [`RELOAD_CHECK`] until `stop` turns true.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_CHECK) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let me = self.clone();
            // Reading files blocks; keep it off the runtime's threads.
            if tokio::task::spawn_blocking(move || me.reload_if_changed()).await.is_err() {
                return;
            }
        }
    }

    /// A TLS acceptor answering with this certificate, speaking HTTP/1.1.
    pub fn acceptor(self: &Arc<Self>) -> io::Result<TlsAcceptor> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
