//! The frontend: the OCI Distribution HTTP API, on axum, over the [`BlobStore`] and
//! [`MetaStore`] seams.
//!
//! It holds no state that matters: everything durable is behind the two traits, and the only
//! thing kept in memory is a cache of immutable manifest bytes by digest. Handlers parse,
//! validate, call the stores and map the result; every failure becomes one [`RegistryError`]
//! and one response in [`error_response`].

mod admin;
pub mod auth;
mod blobs;
pub mod keys;
mod manifests;
mod packages_api;
mod pages;
mod pulls;
mod recall;
pub mod routes;
pub mod serve;
pub mod tls;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use berth_core::access::Action;
use berth_core::manifest::MAX_MANIFEST_SIZE;
use berth_core::trace;
use berth_core::{BlobStore, ByteStream, ErrorCode, MetaStore, RegistryError};
use bytes::Bytes;
use futures::TryStreamExt;
use tracing::Instrument;

use routes::Route;

/// Limits and timeouts of the API.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// Largest blob accepted, in bytes.
    pub max_blob: u64,
    /// Bytes of manifests kept in memory by digest.
    pub manifest_cache_bytes: u64,
    /// Upload sessions one caller may have open at once.
    pub max_uploads_per_caller: usize,
    /// Time a request body may go without a byte before the request fails (a stalled upload
    /// then releases its session for the next `PATCH` and for expiry).
    pub idle_body_timeout: Duration,
    /// Time a request other than an upload has to produce its response.
    pub request_timeout: Duration,
    /// Whether to remember the metadata service's answers to pulls by digest, to answer them
    /// when it cannot (a frontend of a cluster; an in-process store never goes away).
    pub remember_pulls: bool,
}

/// Default time a body may stall: a minute of silence is a broken client, not a slow one.
pub const DEFAULT_IDLE_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time for a request other than an upload: they read at most a manifest's 4 MiB.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Open uploads one caller may hold by default: docker pushes three layers at a time and a CI
/// runner a few images at once; a thousand leaves room for a fleet behind one token while
/// bounding the staging space one token can pin.
pub const DEFAULT_MAX_UPLOADS_PER_CALLER: usize = 1000;

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            max_blob: berth_core::store::DEFAULT_MAX_BLOB,
            manifest_cache_bytes: 16 * 1024 * 1024,
            max_uploads_per_caller: DEFAULT_MAX_UPLOADS_PER_CALLER,
            idle_body_timeout: DEFAULT_IDLE_BODY_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            remember_pulls: false,
        }
    }
}

#[derive(Clone)]
struct ByteWeight;

impl quick_cache::Weighter<berth_core::Digest, Bytes> for ByteWeight {
    fn weight(&self, _k: &berth_core::Digest, v: &Bytes) -> u64 {
        v.len() as u64 + 64
    }
}

impl quick_cache::Weighter<String, Bytes> for ByteWeight {
    fn weight(&self, k: &String, v: &Bytes) -> u64 {
        (k.len() + v.len()) as u64 + 64
    }
}

/// The registry API's shared state.
pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    config: FrontendConfig,
    auth: auth::AuthConfig,
    manifests: quick_cache::sync::Cache<berth_core::Digest, Bytes, ByteWeight>,
    /// Registry tokens already verified, by their text.
    verified: quick_cache::sync::Cache<String, Arc<auth::Claims>>,
    /// Answers to pulls by digest, for when the metadata service cannot answer.
    recall: recall::Recall,
    /// Pulls of each version, counted for the packages' download counts.
    pulls: Arc<pulls::PullCounter>,
    /// Upload sessions this frontend started, by id (see [`blobs::session`]).
    sessions: quick_cache::sync::Cache<String, Arc<berth_core::UploadSession>>,
    /// Bytes of upload chunks being read whole, at most [`blobs::WHOLE_CHUNK_BYTES`].
    whole_chunks: Arc<tokio::sync::Semaphore>,
    /// Uploads through this frontend so far made of one small chunk, by id: the chunk (see
    /// [`blobs::KEEP_SMALL`]).
    small_uploads: quick_cache::sync::Cache<String, Bytes, ByteWeight>,
    /// Small blobs uploaded whole through this frontend or pulled through it, by digest, their
    /// bytes checked against it: an image's config, read again when its manifest is put and
    /// on every pull of the image (see [`blobs::KEEP_SMALL`]).
    small_blobs: quick_cache::sync::Cache<berth_core::Digest, Bytes, ByteWeight>,
}

impl Registry {
    /// A registry API over the two stores.
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        config: FrontendConfig,
        auth: auth::AuthConfig,
    ) -> Arc<Registry> {
        let manifests = manifest_cache(config.manifest_cache_bytes.max(1));
        let recall = recall::Recall::new(config.remember_pulls);
        let pulls = pulls::PullCounter::new(meta.clone());
        Arc::new(Registry {
            pulls,
            blobs,
            meta,
            config,
            auth,
            manifests,
            verified: quick_cache::sync::Cache::new(VERIFIED_TOKENS),
            recall,
            sessions: quick_cache::sync::Cache::new(STARTED_SESSIONS),
            whole_chunks: Arc::new(tokio::sync::Semaphore::new(blobs::WHOLE_CHUNK_BYTES)),
            small_uploads: small_cache(),
            small_blobs: small_cache(),
        })
    }
}

impl Registry {
    /// Whether this frontend can serve: the metadata group answers a read through its leader,
    /// and enough storage nodes answer to take writes. `Err` says what is missing.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        if let Err(e) = self.meta.key_generation().await {
            return Err(format!("metadata: {}", e.detail));
        }
        self.blobs.readiness().map_err(|why| format!("storage: {why}"))
    }

    /// The URL a `Location` header gives for `path`: absolute under the external URL when one
    /// is configured, relative otherwise (clients resolve it against the URL they used).
    fn location(&self, path: &str) -> String {
        match &self.auth.external_url {
            Some(base) => format!("{base}{path}"),
            None => path.to_string(),
        }
    }
}

/// Verified registry tokens remembered; each is a few hundred bytes.
const VERIFIED_TOKENS: usize = 10_000;

/// Bytes of blobs each of the two small-blob caches holds at most (see [`blobs::KEEP_SMALL`]):
/// the configs of the images being pushed through a frontend at once, and more, at a few KiB
/// each; 64 entries of the largest size kept.
const SMALL_KEPT_BYTES: u64 = 4 << 20;

/// Shards of each small-blob cache. quick_cache gives each shard an equal part of the weight
/// and refuses an item heavier than about a shard; by default it makes four shards per CPU, so
/// that on a machine of 16 CPUs or more blobs near [`blobs::KEEP_SMALL`] would never be kept.
/// Four shards of 1 MiB each keep them on any machine; the caches see a few calls per pushed
/// image, too few to contend.
const SMALL_CACHE_SHARDS: usize = 4;

/// The frontend's cache of manifests by digest, `bytes` in all. quick_cache splits the weight
/// evenly over its shards and does not keep an item heavier than 97% of a shard; its default of
/// four shards per CPU made shards of 2 MiB from the default 16 MiB on 2 CPUs, and of 256 KiB
/// on 16, so that larger manifests (big image indexes, artifacts of many layers) were read from
/// storage on every pull. The shards are as many as that default, but no more than keep a
/// manifest of the largest size accepted ([`MAX_MANIFEST_SIZE`]) wherever the cache can hold
/// one: two for the default 16 MiB, more for a larger cache; one for a cache smaller than that.
fn manifest_cache(bytes: u64) -> quick_cache::sync::Cache<berth_core::Digest, Bytes, ByteWeight> {
    let largest = MAX_MANIFEST_SIZE as u64 + 64;
    let mut shards = std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_mul(4).next_power_of_two();
    while shards > 1 && bytes.div_ceil(shards as u64) * 96 / 100 < largest {
        shards /= 2;
    }
    weighed_cache(16_384, bytes, shards)
}

/// An empty small-blob cache (see [`SMALL_KEPT_BYTES`]).
fn small_cache<K>() -> quick_cache::sync::Cache<K, Bytes, ByteWeight>
where
    K: Eq + std::hash::Hash + Clone,
    ByteWeight: quick_cache::Weighter<K, Bytes>,
{
    weighed_cache(4096, SMALL_KEPT_BYTES, SMALL_CACHE_SHARDS)
}

/// An empty cache of byte strings weighed by their size, `bytes` in all, in `shards` shards.
fn weighed_cache<K>(items: usize, bytes: u64, shards: usize) -> quick_cache::sync::Cache<K, Bytes, ByteWeight>
where
    K: Eq + std::hash::Hash + Clone,
    ByteWeight: quick_cache::Weighter<K, Bytes>,
{
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(items)
        .weight_capacity(bytes)
        .shards(shards)
        .build()
        .expect("the cache's options are complete");
    quick_cache::sync::Cache::with_options(
        options,
        ByteWeight,
        quick_cache::DefaultHashBuilder::default(),
        quick_cache::sync::DefaultLifecycle::default(),
    )
}

/// Upload sessions a frontend remembers having started: more than the uploads a busy
/// frontend has open at once (an evicted one is read from the metadata service again).
const STARTED_SESSIONS: usize = 16_384;

/// The HTTP application: the `/v2/` API.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new().fallback(dispatch).with_state(registry)
}

/// The API version header every response carries.
const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// A request body left where a handler can take it, so that the dispatcher can still drain it
/// when the handler refuses the request without reading it.
#[derive(Clone)]
struct BodySlot(Arc<std::sync::Mutex<Option<Body>>>);

impl BodySlot {
    fn take(&self) -> Option<Body> {
        self.0.lock().ok().and_then(|mut b| b.take())
    }
}

/// A refused request's unread body is read and dropped up to this size, so that a client still
/// sending it sees the error response instead of a broken pipe. Past it the connection closes.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Bound on the time spent draining a refused body.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads and drops `body`; returns whether it ended within the bounds.
async fn drain(body: Body) -> bool {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    let all = async {
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { return false };
            seen += chunk.len();
            if seen > DRAIN_LIMIT {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, all).await.unwrap_or(false)
}

/// Headers every response carries: the API version, and `nosniff` so that no byte served from
/// the registry's origin is ever taken for a script.
const FIXED_HEADERS: [(&str, &str); 2] = [API_VERSION, ("x-content-type-options", "nosniff")];

/// The content security policy of every response that brings none of its own (the pages bring
/// one that allows their stylesheet): nothing runs, nothing loads.
const DEFAULT_CSP: &str = "default-src 'none'; sandbox";

/// A request id unique across processes: a random prefix per process, then a counter (cheaper
/// than a random id per request, on a path that serves tens of thousands a second).
fn next_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| format!("{:08x}", rand::random::<u32>()));
    format!("{prefix}-{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The route a path names, as a metric label: one of a fixed few, never a repository name.
/// Found without copying the path's parts: this runs on every request.
fn route_label(path: &str) -> &'static str {
    match routes::split(path) {
        Some((endpoint, _, _)) => endpoint.label(),
        None if path == "/token" => "token",
        None if path.starts_with("/api/") => "api",
        None if path == "/healthz" || path == "/readyz" => "probe",
        None if path == JWKS_PATH => "jwks",
        None => "other",
    }
}

/// A method as a metric label: the ones the API uses, else `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn dispatch(State(reg): State<Arc<Registry>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let (route, method) = (route_label(req.uri().path()), method_label(req.method()));
    // Errors are logged under this id and clients get it back, never the internal detail.
    let request_id = next_request_id();
    // Every log line of the request, here and in the roles it calls, names both ids.
    let (span, ids) = trace::Incoming::new(req.headers(), request_id).start(|ids| {
        let id = &*ids.request_id;
        // Log lines name the request's ids without it (see the berth binary's log format); a
        // traced request's span is exported, an untraced one's is for debugging.
        if ids.sampled {
            tracing::info_span!("request", method, route, request_id = id, trace_id = tracing::field::Empty)
        } else {
            tracing::debug_span!("request", method, route, request_id = id, trace_id = tracing::field::Empty)
        }
    });
    let request_id = ids.request_id.clone();
    let mut resp = trace::scope(ids, async {
        let resp = route_request(reg, req).await;
        tracing::debug!(status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "answered");
        resp
    })
    .instrument(span)
    .await;
    metrics::counter!("berth_http_requests_total", "route" => route, "method" => method, "status" => status_label(resp.status()))
        .increment(1);
    metrics::histogram!("berth_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    let headers = resp.headers_mut();
    for (k, v) in FIXED_HEADERS {
        headers.insert(k, HeaderValue::from_static(v));
    }
    headers.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(DEFAULT_CSP));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(trace::REQUEST_ID_HEADER, v);
    }
    resp
}

/// A status as a metric label (a static string for the ones the API answers).
fn status_label(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        304 => "304",
        307 => "307",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        416 => "416",
        429 => "429",
        500 => "500",
        503 => "503",
        c if c < 300 => "2xx",
        c if c < 400 => "3xx",
        c if c < 500 => "4xx",
        _ => "5xx",
    }
}

/// Where the public keys that verify registry tokens are published, as a JSON Web Key Set.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// Whether a request streams a body of unbounded length (an upload): those are bounded by
/// the idle-body timeout, not the whole-request one.
fn streams_body(route: &Route, method: &Method) -> bool {
    matches!(route, Route::UploadStart { .. } | Route::Upload { .. })
        && matches!(*method, Method::POST | Method::PATCH | Method::PUT)
}

async fn route_request(reg: Arc<Registry>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if path == JWKS_PATH {
        return match reg.auth.keys.jwks().await {
            Ok(v) => json_response(StatusCode::OK, v.to_string()),
            Err(e) => error_response(e),
        };
    }
    // Probes for orchestrators: alive (the process answers), and ready (the metadata group
    // answers a read through its leader, and enough storage nodes answer to take writes).
    if path == "/healthz" {
        return text_response(StatusCode::OK, "ok\n");
    }
    if path == "/readyz" {
        return within(reg.config.request_timeout, async {
            match reg.readiness().await {
                Ok(()) => text_response(StatusCode::OK, "ready\n"),
                Err(why) => text_response(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
            }
        })
        .await;
    }
    // The token endpoint and the REST API read their (small, bounded) bodies themselves.
    if path == "/token" || path.starts_with("/api/") {
        let work = async {
            if path == "/token" {
                auth::token_endpoint(&reg, req).await
            } else {
                admin::handle(&reg, req).await
            }
        };
        // A garbage collection run goes on until nothing collectable is left: no deadline.
        if path.trim_end_matches('/') == "/api/admin/gc" {
            return work.await;
        }
        return within(reg.config.request_timeout, work).await;
    }
    // The package pages and the home page.
    if !path.starts_with("/v2") {
        let (method, headers) = (req.method().clone(), req.headers().clone());
        let reg2 = reg.clone();
        let answer = within(reg.config.request_timeout, async move {
            pages::handle(&reg2, &method, &path, &headers).await.unwrap_or_else(|| {
                error_response(RegistryError::new(ErrorCode::Unsupported, "no such endpoint").with_status(404))
            })
        })
        .await;
        return answer;
    }
    let (parts, body) = req.into_parts();
    let slot = BodySlot(Arc::new(std::sync::Mutex::new(Some(body))));
    let mut req = Request::from_parts(parts, Body::empty());
    req.extensions_mut().insert(slot.clone());
    let mut resp = match routes::parse(&path) {
        None => error_response(RegistryError::new(ErrorCode::Unsupported, "no such endpoint").with_status(404)),
        Some(Err(e)) => error_response(e),
        Some(Ok(route)) => {
            let unbounded = streams_body(&route, req.method());
            let work = async {
                match auth::caller(&reg, req.headers()).await {
                    Err(e) => {
                        let mut r = error_response(e);
                        r.headers_mut()
                            .insert(header::WWW_AUTHENTICATE, auth::challenge(&reg, req.headers(), None, false));
                        r
                    }
                    Ok(caller) => match authorize(&reg, &caller, &route, req.method(), req.headers()).await {
                        Err(refused) => refused,
                        Ok(()) => handle(&reg, &caller, route, req).await.unwrap_or_else(error_response),
                    },
                }
            };
            if unbounded {
                work.await
            } else {
                within(reg.config.request_timeout, work).await
            }
        }
    };
    if let Some(body) = slot.take() {
        if !drain(body).await {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp
}

/// A plain-text answer.
fn text_response(status: StatusCode, text: &str) -> Response {
    let mut r = Response::new(Body::from(text.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Runs a request's work with a deadline; past it the client gets `503` and may retry.
async fn within(limit: Duration, work: impl std::future::Future<Output = Response>) -> Response {
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => error_response(
            RegistryError::new(ErrorCode::Unknown, format!("the request took longer than {} s", limit.as_secs()))
                .with_status(503),
        ),
    }
}

/// The repository and action a `/v2/` request needs, if any.
fn required(route: &Route, method: &Method) -> Option<(String, Action)> {
    let action = match *method {
        Method::GET | Method::HEAD => Action::Pull,
        Method::DELETE => Action::Delete,
        _ => Action::Push,
    };
    match route {
        Route::Base | Route::Catalog => None,
        Route::Tags { name } | Route::Referrers { name, .. } => Some((name.clone(), Action::Pull)),
        Route::Manifest { name, .. } | Route::Blob { name, .. } => Some((name.clone(), action)),
        // Everything on an upload is part of a push, its status and cancellation included.
        Route::UploadStart { name } | Route::Upload { name, .. } => Some((name.clone(), Action::Push)),
    }
}

/// Lets the request through, or answers for it (401 with a challenge, or 403).
async fn authorize(
    reg: &Registry,
    caller: &auth::Caller,
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), Response> {
    if let Route::Base = route {
        // `docker login` checks its credentials here: anonymous callers get the challenge.
        if !caller.presented {
            let mut r = error_response(RegistryError::new(ErrorCode::Unauthorized, "authentication required"));
            r.headers_mut().insert(header::WWW_AUTHENTICATE, auth::challenge(reg, headers, None, false));
            return Err(r);
        }
        return Ok(());
    }
    let Some((repo, action)) = required(route, method) else { return Ok(()) };
    let allowed = auth::actions(reg, caller, &repo).await.map_err(error_response)?;
    if !allowed.contains(&action) {
        return Err(auth::refuse(reg, caller, headers, &repo, action).await);
    }
    // A push's first write creates the repository's package when it has none (see
    // `berth_core::store::Pusher`): the handlers of the routes that start one see to it.
    Ok(())
}

async fn handle(reg: &Registry, caller: &auth::Caller, route: Route, req: Request) -> Result<Response, RegistryError> {
    let method = req.method().clone();
    let unsupported = || Err(RegistryError::new(ErrorCode::Unsupported, format!("{method} is not supported here")));
    match (route, &method) {
        (Route::Base, &Method::GET | &Method::HEAD) => Ok(json_response(StatusCode::OK, "{}".into())),
        (Route::Catalog, &Method::GET) => manifests::catalog(reg, caller, req.uri()).await,
        (Route::Tags { name }, &Method::GET) => manifests::tags(reg, &name, req.uri()).await,
        (Route::Manifest { name, reference }, &Method::GET | &Method::HEAD) => {
            manifests::get(reg, &name, &reference, req.headers(), method == Method::HEAD).await
        }
        (Route::Manifest { name, reference }, &Method::PUT) => {
            manifests::put(reg, caller, &name, &reference, req).await
        }
        (Route::Manifest { name, reference }, &Method::DELETE) => manifests::delete(reg, &name, &reference).await,
        (Route::Referrers { name, digest }, &Method::GET) => manifests::referrers(reg, &name, &digest, req.uri()).await,
        (Route::Blob { name, digest }, &Method::GET | &Method::HEAD) => {
            blobs::get(reg, &name, &digest, req.headers(), method == Method::HEAD).await
        }
        (Route::Blob { name, digest }, &Method::DELETE) => blobs::delete(reg, &name, &digest).await,
        (Route::UploadStart { name }, &Method::POST) => blobs::start(reg, caller, &name, req).await,
        (Route::Upload { name, id }, &Method::PATCH) => blobs::patch(reg, &name, &id, req).await,
        (Route::Upload { name, id }, &Method::PUT) => blobs::finish(reg, &name, &id, req).await,
        (Route::Upload { name, id }, &Method::GET) => blobs::status(reg, &name, &id).await,
        (Route::Upload { name, id }, &Method::DELETE) => blobs::cancel(reg, &name, &id).await,
        _ => unsupported(),
    }
}

// ---- response helpers -------------------------------------------------------------------

/// The one place a [`RegistryError`] becomes an HTTP response. A server fault's detail is
/// logged (under the request's id) and never sent: it may name files, nodes or states.
pub fn error_response(e: RegistryError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if e.code == ErrorCode::Unknown {
        // The line names the request's ids (the log format adds them), as the client's answer does.
        tracing::error!(detail = %e.detail, status = e.status, "request failed");
        RegistryError::new(
            ErrorCode::Unknown,
            "internal error; the server log has it under this response's X-Request-Id",
        )
        .body()
    } else {
        e.body()
    };
    let mut resp = json_response(status, body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if e.status == 416 {
        // The upload's state travels in the message; clients recover with a GET of the upload.
        resp.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_static("bytes */*"));
    }
    resp
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn header_value(v: &str) -> Result<HeaderValue, RegistryError> {
    HeaderValue::from_str(v).map_err(RegistryError::internal)
}

fn empty(status: StatusCode, headers: &[(&'static str, String)]) -> Result<Response, RegistryError> {
    let mut resp = Response::builder().status(status);
    for (k, v) in headers {
        resp = resp.header(*k, header_value(v)?);
    }
    resp.header(header::CONTENT_LENGTH, "0").body(Body::empty()).map_err(RegistryError::internal)
}

/// The request body as a stream of chunks (empty when already taken). A body that sends
/// nothing for `idle` fails with `TimedOut`, which ends the request and releases what it held.
fn body_stream(req: &Request, idle: Duration) -> ByteStream {
    match req.extensions().get::<BodySlot>().and_then(BodySlot::take) {
        Some(body) => {
            let counted = body
                .into_data_stream()
                .map_err(io::Error::other)
                .inspect_ok(|chunk| metrics::counter!("berth_http_received_bytes_total").increment(chunk.len() as u64));
            with_idle_timeout(Box::pin(counted), idle)
        }
        None => Box::pin(futures::stream::empty()),
    }
}

/// Bytes a request body must deliver in each idle window to count as moving: a client
/// trickling a byte a second holds its upload as surely as one that sends nothing.
pub const MIN_BODY_PROGRESS: u64 = 64 * 1024;

/// `body`, failing once a window of `idle` passes in which it delivered fewer than
/// [`MIN_BODY_PROGRESS`] bytes without ending.
fn with_idle_timeout(body: ByteStream, idle: Duration) -> ByteStream {
    struct Watch {
        body: ByteStream,
        deadline: tokio::time::Instant,
        moved: u64,
    }
    let start = Watch { body, deadline: tokio::time::Instant::now() + idle, moved: 0 };
    Box::pin(futures::stream::unfold(Some(start), move |state| async move {
        let mut w = state?;
        match tokio::time::timeout_at(w.deadline, futures::StreamExt::next(&mut w.body)).await {
            Ok(Some(Ok(chunk))) => {
                w.moved += chunk.len() as u64;
                if w.moved >= MIN_BODY_PROGRESS {
                    w.moved = 0;
                    w.deadline = tokio::time::Instant::now() + idle;
                }
                Some((Ok(chunk), Some(w)))
            }
            Ok(Some(Err(e))) => Some((Err(e), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the body sent less than {MIN_BODY_PROGRESS} bytes in {} s", idle.as_secs()),
                )),
                None,
            )),
        }
    }))
}

/// `Content-Length` of the request, if given and numeric.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The value of query parameter `key` (first occurrence).
fn query_param(uri: &axum::http::Uri, key: &str) -> Option<String> {
    query_params(uri, key).into_iter().next()
}

/// Every value of query parameter `key`.
fn query_params(uri: &axum::http::Uri, key: &str) -> Vec<String> {
    let q = uri.query().unwrap_or("");
    form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == key).map(|(_, v)| v.into_owned()).collect()
}

fn parse_digest(s: &str) -> Result<berth_core::Digest, RegistryError> {
    s.parse().map_err(|e| RegistryError::new(ErrorCode::DigestInvalid, format!("{s:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(len: usize) -> (berth_core::Digest, Bytes) {
        let body = Bytes::from(vec![b'{'; len]);
        (berth_core::Digest::sha256_of(&body), body)
    }

    #[test]
    fn the_manifest_cache_keeps_a_manifest_of_the_largest_size_on_any_host() {
        // The default size and larger ones keep a manifest of the largest size accepted.
        for bytes in [16 << 20, 64 << 20, 1 << 30] {
            let cache = manifest_cache(bytes);
            let (d, body) = manifest(MAX_MANIFEST_SIZE);
            cache.insert(d.clone(), body.clone());
            assert_eq!(cache.get(&d), Some(body), "a cache of {bytes} bytes");
        }
        // A cache smaller than the largest manifest still keeps what fits in it.
        let cache = manifest_cache(1 << 20);
        let (d, body) = manifest(600 << 10);
        cache.insert(d.clone(), body.clone());
        assert_eq!(cache.get(&d), Some(body));
    }
}
