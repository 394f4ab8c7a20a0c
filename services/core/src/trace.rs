//! A request's identity across processes: its trace id (W3C Trace Context) and request id.
//!
//! The frontend starts each HTTP request in a `tracing` span that carries both ids, so every
//! log line of the request names them. Calls to other roles carry them in their metadata
//! (`traceparent`, `x-request-id`), and the role that serves the call opens its span under the
//! same ids. When spans are exported (OpenTelemetry, see [`set_exporting`]) the span ids are
//! the exported spans' and the spans form one tree across processes; when they are not, the
//! trace id still travels, for the logs.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header that carries a request's id between roles, and back to the HTTP client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller; a longer one is ignored.
const MAX_REQUEST_ID: usize = 64;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Says whether spans are exported: set once, by the process, when it installs an
/// OpenTelemetry layer. Spans then get their parent from the caller's `traceparent` and pass
/// their own span id on.
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The ids of the request being served.
#[derive(Debug, Clone)]
pub struct RequestIds {
    /// Unique per request; clients get it back in `X-Request-Id`.
    pub request_id: String,
    /// The trace the request belongs to (the caller's, when it named one).
    pub trace_id: TraceId,
}

tokio::task_local! {
    static CURRENT: RequestIds;
}

/// Runs `f` as part of the request `ids` name: calls it makes to other roles carry them.
pub async fn scope<F: Future>(ids: RequestIds, f: F) -> F::Output {
    CURRENT.scope(ids, f).await
}

/// The ids of the request the current task serves, if any.
pub fn current() -> Option<RequestIds> {
    CURRENT.try_with(RequestIds::clone).ok()
}

/// `f`, to be spawned as a task of its own, still inside the current request and span (a
/// spawned task inherits neither).
pub fn inherit<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let ids = current();
    let f = f.instrument(Span::current());
    async move {
        match ids {
            Some(ids) => CURRENT.scope(ids, f).await,
            None => f.await,
        }
    }
}

/// Reads headers for the propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Hands the propagator's headers to a setter.
struct Setter<'a>(&'a mut dyn FnMut(&str, String));

impl Injector for Setter<'_> {
    fn set(&mut self, key: &str, value: String) {
        (self.0)(key, value)
    }
}

/// A new random trace id.
pub fn new_trace_id() -> TraceId {
    RandomIdGenerator::default().new_trace_id()
}

/// The trace the `traceparent` of `headers` names, if a valid one.
fn remote_trace(headers: &http::HeaderMap) -> Option<(opentelemetry::Context, TraceId)> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    let id = cx.span().span_context().trace_id();
    (id != TraceId::INVALID).then_some((cx, id))
}

/// The request id a caller passed in `headers` (another role), if a sane one.
pub fn passed_request_id(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    (!v.is_empty() && v.len() <= MAX_REQUEST_ID).then_some(v)
}

/// Starts serving a request (or a call from another role) with `headers` in `span`: continues
/// the trace the caller's `traceparent` names, else starts one, and records its id in the
/// span's `trace_id` field (which `span` declares, empty). When spans are exported, `span`
/// becomes the child of the caller's span and the trace id is the exported one.
pub fn begin(span: &Span, headers: &http::HeaderMap) -> TraceId {
    let remote = remote_trace(headers);
    let id = if exporting() && !span.is_disabled() {
        if let Some((cx, _)) = remote {
            // Fails only when the layer is missing or the span already started; neither here.
            let _ = span.set_parent(cx);
        }
        Some(span.context().span().span_context().trace_id()).filter(|id| *id != TraceId::INVALID)
    } else {
        remote.map(|(_, id)| id)
    };
    let id = id.unwrap_or_else(new_trace_id);
    span.record("trace_id", tracing::field::display(id));
    id
}

/// The metadata a call to another role carries: the current trace (`traceparent`) and
/// request id, given to `put` as header name and value.
pub fn outgoing(put: &mut dyn FnMut(&str, String)) {
    let ids = current();
    if exporting() {
        let cx = Span::current().context();
        if cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&cx, &mut Setter(put));
        }
    } else if let Some(ids) = &ids {
        // No span id of ours to pass on: a fresh one stands for this call, so the callee's
        // log lines share the trace id.
        let parent = SpanContext::new(
            ids.trace_id,
            RandomIdGenerator::default().new_span_id(),
            TraceFlags::default(),
            false,
            TraceState::NONE,
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(parent);
        TraceContextPropagator::new().inject_context(&cx, &mut Setter(put));
    }
    if let Some(ids) = ids {
        put(REQUEST_ID_HEADER, ids.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_trace_is_continued_and_a_missing_one_made() {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(begin(&Span::none(), &h).to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        h.insert("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse().unwrap());
        let made = begin(&Span::none(), &h);
        assert_ne!(made, TraceId::INVALID);
        assert_ne!(made, begin(&Span::none(), &http::HeaderMap::new()));
    }

    #[tokio::test]
    async fn calls_carry_the_request_s_ids() {
        let mut sent = Vec::new();
        outgoing(&mut |k, v| sent.push((k.to_string(), v)));
        assert!(sent.is_empty(), "outside a request nothing is carried: {sent:?}");
        let trace_id = new_trace_id();
        let ids = RequestIds { request_id: "r-1".into(), trace_id };
        let sent = scope(ids, async {
            let mut sent = Vec::new();
            outgoing(&mut |k, v| sent.push((k.to_string(), v)));
            sent
        })
        .await;
        let mut h = http::HeaderMap::new();
        for (k, v) in &sent {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        assert_eq!(begin(&Span::none(), &h), trace_id);
        assert_eq!(passed_request_id(&h), Some("r-1"));
    }

    #[tokio::test]
    async fn a_spawned_task_inherits_the_request() {
        let ids = RequestIds { request_id: "r-2".into(), trace_id: new_trace_id() };
        let seen = scope(ids, async { tokio::spawn(inherit(async { current() })).await.unwrap() }).await;
        assert_eq!(seen.map(|i| i.request_id).as_deref(), Some("r-2"));
    }
}
