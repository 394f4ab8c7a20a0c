//! Configuration: built-in defaults, overridden by an optional TOML file, then by
//! environment variables (`BERTH_*`), then by flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_frontend::auth::AuthConfig;
use berth_frontend::keys::KeyRing;
use berth_frontend::serve::{self as defaults, ServeLimits};
use berth_frontend::FrontendConfig;
use serde::Deserialize;

/// Flags of the HTTP frontend, shared by `berth standalone` and `berth frontend` (each also
/// read from its environment variable).
#[derive(clap::Args, Debug, Default)]
pub struct FrontendFlags {
    /// Address to serve the registry API on [default: 127.0.0.1:5000].
    #[arg(long, env = "BERTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Largest blob accepted, in bytes [default: 10 GB].
    #[arg(long, env = "BERTH_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// USER:TOKEN — the site administrator to create (if missing) with this token, instead of
    /// a generated one printed at first start.
    #[arg(long, env = "BERTH_BOOTSTRAP_ADMIN", hide_env_values = true)]
    pub bootstrap_admin: Option<String>,
    /// The `service` name of registry tokens [default: berth].
    #[arg(long, env = "BERTH_SERVICE")]
    pub service: Option<String>,
    /// Lifetime of registry tokens in seconds [default: 300].
    #[arg(long, env = "BERTH_TOKEN_TTL_SECS")]
    pub token_ttl_secs: Option<u64>,
    /// The registry's public base URL when clients reach it through a proxy (e.g.
    /// https://registry.example.com); the token realm and Location headers use it.
    #[arg(long, env = "BERTH_EXTERNAL_URL")]
    pub external_url: Option<String>,
    /// Seconds a client has to send a request's header [default: 20].
    #[arg(long, env = "BERTH_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a request body may send nothing before the request fails [default: 60].
    #[arg(long, env = "BERTH_IDLE_BODY_TIMEOUT_SECS")]
    pub idle_body_timeout_secs: Option<u64>,
    /// Seconds a request other than an upload has to answer [default: 60].
    #[arg(long, env = "BERTH_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Open connections per client address [default: 1000].
    #[arg(long, env = "BERTH_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Open upload sessions per caller [default: 1000].
    #[arg(long, env = "BERTH_MAX_UPLOADS_PER_CALLER")]
    pub max_uploads_per_caller: Option<usize>,
    /// HTTP address of the operations listener: `/metrics` (Prometheus), `/healthz` and
    /// `/readyz` [default: none]. Keep it off the public network.
    #[arg(long, env = "BERTH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// PEM file of the certificate (then any intermediates) to serve the API over HTTPS with;
    /// with --tls-key. Both files are read again when they change (renewals need no restart).
    #[arg(long, env = "BERTH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(long, env = "BERTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Flags of `berth standalone` (each also read from its environment variable).
#[derive(clap::Args, Debug, Default)]
pub struct StandaloneArgs {
    /// The HTTP frontend's flags.
    #[command(flatten)]
    pub http: FrontendFlags,
    /// Directory holding all data [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML file with any of: listen, data_dir, max_blob_bytes, upload_timeout_secs, gc_grace_secs,
    /// gc_interval_secs, deleted_retention_secs.
    #[arg(long, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seconds without progress after which an upload session expires [default: 600].
    #[arg(long, env = "BERTH_UPLOAD_TIMEOUT_SECS")]
    pub upload_timeout_secs: Option<u64>,
    /// Seconds an unlinked blob is kept before its bytes are deleted [default: 3600].
    #[arg(long, env = "BERTH_GC_GRACE_SECS")]
    pub gc_grace_secs: Option<u64>,
    /// Seconds between rounds of garbage collection; 0: only when asked (`berth admin gc`)
    /// [default: half the grace period, at most 30].
    #[arg(long, env = "BERTH_GC_INTERVAL_SECS")]
    pub gc_interval_secs: Option<u64>,
    /// Seconds a version or package deleted through the packages API stays restorable, before
    /// it is deleted for good and its blobs are collected [default: 2592000, 30 days].
    #[arg(long, env = "BERTH_DELETED_RETENTION_SECS")]
    pub deleted_retention_secs: Option<u64>,
}

/// The TOML file's shape.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    max_blob_bytes: Option<u64>,
    upload_timeout_secs: Option<u64>,
    gc_grace_secs: Option<u64>,
    gc_interval_secs: Option<u64>,
    deleted_retention_secs: Option<u64>,
}

/// Everything an HTTP frontend runs with.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// API address.
    pub listen: SocketAddr,
    /// Largest blob accepted.
    pub max_blob: u64,
    /// Site administrator to ensure, as (user, token).
    pub bootstrap_admin: Option<(String, String)>,
    /// Token service name.
    pub service: String,
    /// Registry token lifetime.
    pub token_ttl: Duration,
    /// Public base URL, without a trailing slash.
    pub external_url: Option<String>,
    /// Connection limits.
    pub limits: ServeLimits,
    /// Idle request body limit.
    pub idle_body_timeout: Duration,
    /// Whole-request limit for requests other than uploads.
    pub request_timeout: Duration,
    /// Open uploads per caller.
    pub max_uploads_per_caller: usize,
    /// Operations listener (metrics and probes).
    pub http_listen: Option<SocketAddr>,
    /// The certificate and key to serve HTTPS with.
    pub tls: Option<berth_frontend::tls::CertFiles>,
    /// Whether the metadata service is another process (a cluster's frontend), whose answers
    /// to pulls by digest are worth remembering for when it cannot answer.
    pub remote_metadata: bool,
}

impl FrontendSettings {
    /// Merges defaults, the config file's values, the environment and the flags.
    fn load(flags: FrontendFlags, file_listen: Option<SocketAddr>, file_max_blob: Option<u64>) -> Result<Self> {
        Ok(FrontendSettings {
            listen: flags.listen.or(file_listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5000))),
            max_blob: flags.max_blob_bytes.or(file_max_blob).unwrap_or(berth_core::store::DEFAULT_MAX_BLOB),
            bootstrap_admin: match flags.bootstrap_admin {
                Some(s) => {
                    let (u, t) = s.split_once(':').context("--bootstrap-admin takes USER:TOKEN")?;
                    anyhow::ensure!(
                        !u.is_empty() && t.len() >= 8,
                        "--bootstrap-admin needs a user and a token of 8+ characters"
                    );
                    Some((u.to_string(), t.to_string()))
                }
                None => None,
            },
            service: flags.service.unwrap_or_else(|| "berth".into()),
            token_ttl: Duration::from_secs(flags.token_ttl_secs.unwrap_or(300).max(1)),
            external_url: match flags.external_url {
                Some(u) => {
                    let u = u.trim_end_matches('/').to_string();
                    anyhow::ensure!(
                        u.starts_with("http://") || u.starts_with("https://"),
                        "--external-url must start with http:// or https://"
                    );
                    Some(u)
                }
                None => None,
            },
            limits: ServeLimits {
                header_read_timeout: secs_or(flags.header_read_timeout_secs, defaults::DEFAULT_HEADER_READ_TIMEOUT),
                max_connections_per_ip: flags
                    .max_connections_per_ip
                    .unwrap_or(defaults::DEFAULT_MAX_CONNECTIONS_PER_IP)
                    .max(1),
            },
            idle_body_timeout: secs_or(flags.idle_body_timeout_secs, berth_frontend::DEFAULT_IDLE_BODY_TIMEOUT),
            request_timeout: secs_or(flags.request_timeout_secs, berth_frontend::DEFAULT_REQUEST_TIMEOUT),
            max_uploads_per_caller: flags
                .max_uploads_per_caller
                .unwrap_or(berth_frontend::DEFAULT_MAX_UPLOADS_PER_CALLER)
                .max(1),
            http_listen: flags.http_listen,
            tls: match (flags.tls_cert, flags.tls_key) {
                (Some(cert), Some(key)) => Some(berth_frontend::tls::CertFiles { cert, key }),
                (None, None) => None,
                _ => anyhow::bail!("--tls-cert and --tls-key go together"),
            },
            remote_metadata: false,
        })
    }

    /// Settings from flags and the environment alone (`berth frontend` has no config file).
    pub fn from_flags(flags: FrontendFlags) -> Result<Self> {
        Self::load(flags, None, None)
    }

    /// The API's limits.
    pub fn frontend_config(&self) -> FrontendConfig {
        FrontendConfig {
            max_blob: self.max_blob,
            max_uploads_per_caller: self.max_uploads_per_caller,
            idle_body_timeout: self.idle_body_timeout,
            request_timeout: self.request_timeout,
            remember_pulls: self.remote_metadata,
            ..Default::default()
        }
    }

    /// The token settings, signing with `keys`.
    pub fn auth_config(&self, keys: Arc<KeyRing>) -> AuthConfig {
        AuthConfig {
            keys,
            service: self.service.clone(),
            ttl: self.token_ttl,
            external_url: self.external_url.clone(),
            https: self.tls.is_some(),
        }
    }
}

/// Everything `berth standalone` runs with.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// The HTTP frontend.
    pub http: FrontendSettings,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Idle upload lifetime.
    pub upload_timeout: Duration,
    /// Age an unlinked blob must reach before deletion.
    pub gc_grace: Duration,
    /// Time between rounds of garbage collection (`None`: the default; zero: only when asked).
    pub gc_interval: Option<Duration>,
    /// How long deleted versions and packages stay restorable.
    pub deleted_retention: Duration,
}

impl StandaloneConfig {
    /// Merges defaults, the config file, the environment and the flags.
    pub fn load(args: StandaloneArgs) -> Result<StandaloneConfig> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Ok(StandaloneConfig {
            http: FrontendSettings::load(args.http, file.listen, file.max_blob_bytes)?,
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("berth-data")),
            upload_timeout: Duration::from_secs(
                args.upload_timeout_secs
                    .or(file.upload_timeout_secs)
                    .unwrap_or(berth_core::store::DEFAULT_UPLOAD_TIMEOUT.as_secs()),
            ),
            gc_grace: Duration::from_secs(args.gc_grace_secs.or(file.gc_grace_secs).unwrap_or(3600)),
            gc_interval: args.gc_interval_secs.or(file.gc_interval_secs).map(Duration::from_secs),
            deleted_retention: args
                .deleted_retention_secs
                .or(file.deleted_retention_secs)
                .map_or(berth_meta::gc::DEFAULT_RETENTION, Duration::from_secs),
        })
    }
}

/// `secs` seconds (at least one), or `default`.
fn secs_or(secs: Option<u64>, default: Duration) -> Duration {
    secs.map_or(default, |s| Duration::from_secs(s.max(1)))
}

/// Flags of mutual TLS between roles, shared by `meta`, `storage`, `frontend` and
/// `admin cluster` (see [`berth_proto::tls`]).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ClusterTlsFlags {
    /// PEM file of the certificate authority of the cluster's roles: with --cluster-cert and
    /// --cluster-key, gRPC between roles runs over mutual TLS, every side presenting a
    /// certificate this authority signed (for the host names or addresses it is reached at).
    #[arg(long, env = "BERTH_CLUSTER_CA", requires_all = ["cluster_cert", "cluster_key"])]
    pub cluster_ca: Option<PathBuf>,
    /// PEM file of this process's certificate (signed by --cluster-ca).
    #[arg(long, env = "BERTH_CLUSTER_CERT", requires_all = ["cluster_ca", "cluster_key"])]
    pub cluster_cert: Option<PathBuf>,
    /// PEM file of the private key of --cluster-cert.
    #[arg(long, env = "BERTH_CLUSTER_KEY", requires_all = ["cluster_ca", "cluster_cert"])]
    pub cluster_key: Option<PathBuf>,
}

impl ClusterTlsFlags {
    /// Sets the process up for mutual TLS when the flags ask for it. Runs before any gRPC
    /// channel or server is made.
    pub fn install(&self) -> Result<()> {
        let (Some(ca), Some(cert), Some(key)) = (&self.cluster_ca, &self.cluster_cert, &self.cluster_key) else {
            return Ok(());
        };
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
        // Fail at start on files that are not what they should be, not at the first call.
        let names = berth_frontend::tls::CertFiles { cert: cert.clone(), key: key.clone() };
        berth_frontend::tls::certified(&cert_pem, &key_pem, &names).context("--cluster-cert/--cluster-key")?;
        {
            use rustls::pki_types::pem::PemObject;
            anyhow::ensure!(
                rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem).next().is_some_and(|c| c.is_ok()),
                "--cluster-ca holds no PEM certificate"
            );
        }
        berth_proto::tls::use_mutual_tls(ca_pem, cert_pem, key_pem).map_err(anyhow::Error::msg)
    }
}
