//! The operations listener of every role (`--http-listen`): `/healthz` (the process serves),
//! `/readyz` (the role can do its work; frontends answer both on their API too) and `/metrics`
//! (Prometheus); and `berth probe URL`, which asks a probe, for container health checks in an
//! image that has no shell and no curl.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

/// Whether a role can do its work now: `Err` says what it lacks.
pub type Readiness = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Sets the gauges read at scrape time (Raft state, a node's statistics) just before `/metrics`
/// renders.
pub type Collect = Arc<dyn Fn() + Send + Sync>;

/// Nothing to set at scrape time.
pub fn nothing_to_collect() -> Collect {
    Arc::new(|| {})
}

/// How long `/readyz` may take before it answers 503.
const READY_WITHIN: Duration = Duration::from_secs(3);

/// Binds `listen` now (so a taken port fails the start), then serves the probes and metrics
/// until `stop` turns true.
pub async fn serve(
    listen: SocketAddr,
    ready: Readiness,
    collect: Collect,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match tokio::time::timeout(READY_WITHIN, ready()).await {
                        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
                        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, format!("no answer within {READY_WITHIN:?}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let collect = collect.clone();
                async move {
                    collect();
                    match crate::metrics::render() {
                        Some(text) => (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], text),
                        None => (
                            StatusCode::NOT_FOUND,
                            [("content-type", "text/plain; charset=utf-8")],
                            "metrics are off (BERTH_METRICS=off)\n".to_string(),
                        ),
                    }
                }
            }),
        );
    tracing::info!(addr = %bound, "serving probes and metrics over http (/healthz, /readyz, /metrics)");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // An error means the sender is gone, which only happens on the way out anyway.
                let _stopped = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the probe listener failed");
        }
    });
    Ok(())
}

/// Flags of `berth probe`.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// The URL to ask, e.g. http://127.0.0.1:5000/readyz.
    pub url: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    pub timeout_secs: u64,
}

/// GETs the URL: succeeds on a 2xx answer, else fails with the status and what the body says.
pub async fn run(args: ProbeArgs) -> Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(args.timeout_secs.max(1))).build()?;
    let r = client.get(&args.url).send().await.with_context(|| format!("GET {}", args.url))?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{}: {status} {}", args.url, body.trim());
    println!("{}", body.trim());
    Ok(())
}
