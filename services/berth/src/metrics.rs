//! Prometheus metrics of every role. The roles' crates record through the `metrics` facade;
//! this process installs the recorder (metrics-exporter-prometheus) at start, unless
//! `BERTH_METRICS=off`, and the role's `--http-listen` serves the text exposition at
//! `/metrics`. Without a recorder every recording is a no-op.
//!
//! Names follow Prometheus conventions: a `berth_` prefix, base units in the name (`_seconds`,
//! `_bytes`), `_total` on counters. Labels are bounded: a route, a method, a status, a gRPC
//! method, never a repository, tag, digest or user.

use std::sync::OnceLock;
use std::time::Duration;

use berth_core::trace;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histogram buckets of latencies: 250 µs to 30 s.
const SECONDS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Histogram buckets of Raft proposal batch sizes (commands per log entry; at most 512).
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// How often histograms are drained into their buckets when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the recorder (once; inside the runtime), unless `BERTH_METRICS` is `off`.
pub fn install() {
    if std::env::var("BERTH_METRICS").is_ok_and(|v| v == "off" || v == "0" || v == "false") {
        return;
    }
    let built = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("berth_raft_proposal_batch_size".into()), BATCH))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("berth_storage_commit_batch_size".into()), BATCH))
        .and_then(|b| b.install_recorder());
    let handle = match built {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "metrics are off: the Prometheus recorder could not be installed");
            return;
        }
    };
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    if HANDLE.set(handle).is_err() {
        tracing::warn!("the metrics recorder was installed twice; the first one renders");
    }
}

/// The exposition text, or `None` when metrics are off.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}

/// Every metric's help text and unit, in one place: the catalogue of what Berth exports.
fn describe() {
    // Frontends (and standalone): the HTTP API.
    describe_counter!("berth_http_requests_total", "HTTP requests answered, by route, method and status.");
    describe_histogram!(
        "berth_http_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its response's head, by route and method."
    );
    describe_counter!("berth_http_received_bytes_total", Unit::Bytes, "Blob bytes received in uploads.");
    describe_counter!("berth_http_sent_bytes_total", Unit::Bytes, "Blob bytes sent to clients.");
    describe_counter!(
        "berth_repairs_total",
        "Repairs of blobs short of copies this frontend tried, by outcome (repaired, deferred, failed)."
    );
    describe_gauge!("berth_repair_queue", "Blobs recorded short of copies, as of this frontend's last sweep.");
    // gRPC servers of every role.
    describe_counter!("berth_grpc_requests_total", "gRPC calls served, by method.");
    describe_histogram!(
        "berth_grpc_request_duration_seconds",
        Unit::Seconds,
        "Time from a gRPC call's arrival to its response's head, by method."
    );
    // Metadata nodes: Raft.
    describe_gauge!("berth_raft_term", "The node's current Raft term.");
    describe_gauge!("berth_raft_leader", "The id of the leader this node knows (0: none).");
    describe_gauge!("berth_raft_is_leader", "1 while this node leads the metadata group.");
    describe_gauge!("berth_raft_last_log_index", "Index of the last entry in this node's log.");
    describe_gauge!("berth_raft_applied_index", "Index of the last entry applied to this node's state.");
    describe_gauge!(
        "berth_raft_committed_index",
        "On the leader: the highest index a majority holds (its followers' matched indexes); 0 elsewhere."
    );
    describe_counter!("berth_raft_proposals_total", "Log entries this node proposed as leader.");
    describe_histogram!("berth_raft_proposal_batch_size", "Commands per proposed log entry.");
    describe_counter!("berth_raft_commands_total", "Commands this node proposed as leader.");
    describe_counter!("berth_gc_collected_bytes_total", Unit::Bytes, "Bytes garbage collection deleted.");
    describe_counter!("berth_gc_collected_blobs_total", "Blobs garbage collection deleted.");
    describe_counter!("berth_gc_rounds_total", "Rounds of garbage collection run.");
    // Storage nodes.
    describe_histogram!(
        "berth_storage_fsync_duration_seconds",
        Unit::Seconds,
        "Time of the node's fsyncs (segment group commits, staged files, index writes)."
    );
    describe_counter!("berth_storage_written_bytes_total", Unit::Bytes, "Blob bytes the node stored.");
    describe_counter!(
        "berth_storage_uncached_bytes_total",
        Unit::Bytes,
        "Blob bytes the node stored that reads ask another owner for first: their pages leave its page cache once written (an upload staged here, once its copies are sent)."
    );
    describe_gauge!(
        "berth_storage_reads_first_map_version",
        "Version of the placement map by which the node tells the copies reads ask it for first."
    );
    describe_counter!("berth_storage_blobs_written_total", "Blobs the node stored.");
    describe_histogram!(
        "berth_storage_commit_batch_size",
        "Small blobs per batch of the node's committer: blobs made durable by one segment flush and one index write."
    );
    describe_gauge!("berth_storage_uploads_open", "Uploads staged on the node.");
    describe_gauge!("berth_storage_blobs", "Blobs the node holds, as of its last placement pass.");
    describe_gauge!("berth_storage_bytes", Unit::Bytes, "Bytes the node holds, as of its last placement pass.");
    describe_gauge!("berth_storage_move_queue", "Blobs of the placement pass not yet checked against their owners.");
    describe_counter!("berth_storage_copies_made_total", "Copies made for other owners (re-replication, rebalance).");
    describe_counter!("berth_storage_copies_dropped_total", "Copies dropped once every owner held the blob.");
    describe_counter!("berth_storage_moved_bytes_total", Unit::Bytes, "Bytes copied to other owners.");
    describe_gauge!("berth_storage_move_bytes_per_second", "Copy rate of the last placement pass that copied.");
    describe_gauge!("berth_scrub_pass_checked_bytes", Unit::Bytes, "Bytes the current scrub pass has checked.");
    describe_counter!("berth_scrub_passes_total", "Scrub passes completed.");
    describe_gauge!("berth_scrub_bytes_per_second", "Read rate of the last scrub pass.");
    describe_counter!("berth_scrub_damaged_total", "Damaged copies found and taken out of service.");
    describe_counter!("berth_scrub_mended_total", "Damaged copies replaced from a good replica.");
}

/// A tower layer over a role's gRPC server counting calls by method and timing them to their
/// response's head (`berth_grpc_requests_total`, `berth_grpc_request_duration_seconds`). A
/// path that names no method of ours (answered UNIMPLEMENTED) is counted as `unknown`, so that
/// callers cannot grow the label set.
///
/// A call made for a client's request (it carries a `traceparent` or a request id, see
/// [`berth_core::trace`]) is served in a `grpc` span under the request's ids.
#[derive(Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around a gRPC server.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

/// gRPC status UNIMPLEMENTED, in the header of a trailers-only answer.
const UNIMPLEMENTED: &str = "12";

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let path = req.uri().path().to_string();
        let Some((span, ids)) = request_span(&path, req.headers()) else {
            return Box::pin(observed(started, path, self.inner.call(req)));
        };
        let answer = span.in_scope(|| self.inner.call(req));
        Box::pin(trace::scope(ids, observed(started, path, answer)).instrument(span))
    }
}

/// The span of a call made for a request (it carries the request's ids), under which the
/// call is served and logged; `None` for calls of the roles' own (heartbeats, replication).
fn request_span(path: &str, headers: &http::HeaderMap) -> Option<(tracing::Span, trace::RequestIds)> {
    let request_id = trace::passed_request_id(headers);
    if request_id.is_none() && !headers.contains_key("traceparent") {
        return None;
    }
    Some(trace::Incoming::new(headers, request_id.unwrap_or_default()).start(|ids| {
        let id = &*ids.request_id;
        // A traced call's span is exported; an untraced one's is for debugging (log lines
        // name the request's ids without it).
        if ids.sampled {
            tracing::info_span!("grpc", method = path, request_id = id, trace_id = tracing::field::Empty)
        } else {
            tracing::debug_span!("grpc", method = path, request_id = id, trace_id = tracing::field::Empty)
        }
    }))
}

/// Records a call's count and latency once `answer` is ready.
async fn observed<R, E>(
    started: std::time::Instant,
    path: String,
    answer: impl std::future::Future<Output = Result<http::Response<R>, E>>,
) -> Result<http::Response<R>, E> {
    let r = answer.await;
    let known = match &r {
        Ok(resp) => resp.headers().get("grpc-status").is_none_or(|s| s != UNIMPLEMENTED),
        Err(_) => true,
    };
    let method = if known { path } else { "unknown".to_string() };
    metrics::histogram!("berth_grpc_request_duration_seconds", "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("berth_grpc_requests_total", "method" => method).increment(1);
    r
}
