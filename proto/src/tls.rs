//! Mutual TLS between roles. A process given a certificate authority, a certificate and its
//! key (`--cluster-ca`, `--cluster-cert`, `--cluster-key`) serves gRPC over TLS, asks every
//! caller for a certificate signed by that authority, and presents its own when it calls
//! another role, checking that role's certificate against the same authority and the
//! address called (so certificates name the hosts or IP addresses roles are reached at).
//! Without them, roles talk plaintext gRPC, as on a private network.
//!
//! The setting is the process's: one identity per process, installed once at start before
//! any channel is made; a renewed certificate takes effect at the next start. Every service
//! of every role accepts any certificate the authority signed: keep that authority for the
//! roles alone (the frontends' public certificate is a separate one, `--tls-cert`).

use std::sync::OnceLock;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// The authority and identity of this process.
struct ClusterTls {
    ca: Certificate,
    identity: Identity,
}

static CLUSTER_TLS: OnceLock<ClusterTls> = OnceLock::new();

/// Time a caller has to finish the TLS handshake; past it the connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes every gRPC server and channel of the process use mutual TLS with this authority and
/// identity (all PEM). Fails if called twice.
pub fn use_mutual_tls(ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>) -> Result<(), &'static str> {
    let tls = ClusterTls { ca: Certificate::from_pem(ca), identity: Identity::from_pem(cert, key) };
    CLUSTER_TLS.set(tls).map_err(|_| "mutual TLS between roles is already set up")
}

/// A channel endpoint for the role at `addr` (`host:port`): over TLS when set up.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    match CLUSTER_TLS.get() {
        None => Endpoint::from_shared(format!("http://{addr}")),
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(ClientTlsConfig::new().ca_certificate(tls.ca.clone()).identity(tls.identity.clone())),
    }
}

/// A gRPC server builder: over TLS, requiring callers' certificates, when set up.
pub fn server() -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder();
    match CLUSTER_TLS.get() {
        None => Ok(builder),
        Some(tls) => builder.tls_config(
            ServerTlsConfig::new()
                .identity(tls.identity.clone())
                .client_ca_root(tls.ca.clone())
                .timeout(HANDSHAKE_TIMEOUT),
        ),
    }
}
