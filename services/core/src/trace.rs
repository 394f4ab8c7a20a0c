//! A request's identity across processes: its trace id (W3C Trace Context) and request id.
//!
//! The frontend serves each HTTP request with both ids in its task, and every log line written
//! while serving it names them (the berth binary's log format reads them from the task). A
//! traced request's calls to other roles carry them in their metadata (`traceparent`,
//! `x-request-id`), and the role that serves the call opens its span under the same ids.
//!
//! When spans are exported (OpenTelemetry, see [`set_exporting`]), whether a request is traced
//! is decided once, as it arrives: by the caller's sampled flag, or by the sampler for a
//! request that starts a trace. Only a traced request's spans reach the exporting layer (its
//! filter asks [`sampled`]); the others cost it nothing. A traced request's spans form one
//! tree across processes.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SamplingDecision, ShouldSample};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header that carries a request's id between roles, and back to the HTTP client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller; a longer one is ignored.
const MAX_REQUEST_ID: usize = 64;

static SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

/// Says that spans are exported, and which requests start a trace worth keeping (the
/// sampler, as `OTEL_TRACES_SAMPLER` configures it). Set once, by the process, when it
/// installs the exporting layer.
pub fn set_exporting(sampler: Box<dyn ShouldSample>) {
    // A second call changes nothing: the first sampler stays.
    let _ = SAMPLER.set(sampler);
}

/// The ids of the request being served.
#[derive(Debug, Clone)]
pub struct RequestIds {
    /// Unique per request; clients get it back in `X-Request-Id`.
    pub request_id: Arc<str>,
    /// The trace the request belongs to (the caller's, when it named one).
    pub trace_id: TraceId,
    /// Whether its spans are exported.
    pub sampled: bool,
    /// A traced request's own span, as the parent its calls name when the span they are made
    /// in is not exported (filtered out by `BERTH_TRACE`).
    span: Option<opentelemetry::Context>,
}

impl RequestIds {
    /// The ids of a request that is not traced (nothing exported).
    pub fn untraced(request_id: impl Into<Arc<str>>, trace_id: TraceId) -> RequestIds {
        RequestIds { request_id: request_id.into(), trace_id, sampled: false, span: None }
    }
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

/// Whether the current task serves a request whose spans are exported: the exporting
/// layer's filter.
pub fn sampled() -> bool {
    CURRENT.try_with(|ids| ids.sampled).unwrap_or(false)
}

/// The trace id of the request the current task serves: the id a traced request's first
/// span is exported under (the exporter's id generator asks), so that the id sampling was
/// decided on is the id every role sees.
pub fn current_trace_id() -> Option<TraceId> {
    CURRENT.try_with(|ids| ids.trace_id).ok()
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

/// The request id a caller passed in `headers` (another role), if a sane one.
pub fn passed_request_id(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    (!v.is_empty() && v.len() <= MAX_REQUEST_ID).then_some(v)
}

/// A request arriving with `headers`, before its span exists: its ids (the caller's trace,
/// or a new one) and whether it is traced, and the caller's span to hang its own under.
pub struct Incoming {
    /// The request's ids.
    pub ids: RequestIds,
    parent: Option<opentelemetry::Context>,
}

impl Incoming {
    /// Reads the caller's `traceparent`, if any, and decides whether the request is traced.
    pub fn new(headers: &http::HeaderMap, request_id: impl Into<Arc<str>>) -> Incoming {
        let parent = headers
            .contains_key("traceparent")
            .then(|| TraceContextPropagator::new().extract(&Headers(headers)))
            .filter(|cx| cx.span().span_context().is_valid());
        let trace_id = parent.as_ref().map(|cx| cx.span().span_context().trace_id()).unwrap_or_else(new_trace_id);
        let sampled = SAMPLER.get().is_some_and(|sampler| {
            let decision = sampler.should_sample(parent.as_ref(), trace_id, "request", &SpanKind::Server, &[], &[]);
            decision.decision == SamplingDecision::RecordAndSample
        });
        Incoming { ids: RequestIds { request_id: request_id.into(), trace_id, sampled, span: None }, parent }
    }

    /// Starts the request in the span `make` makes (declaring an empty `trace_id` field),
    /// made as part of the request so that the exporting layer sees it when it is traced. A
    /// traced request's span becomes the child of the caller's. Records the trace id in the
    /// span; returns the span and the ids to serve the request with.
    pub fn start(self, make: impl FnOnce(&RequestIds) -> Span) -> (Span, RequestIds) {
        let Incoming { mut ids, parent } = self;
        let span = CURRENT.sync_scope(ids.clone(), || {
            let span = make(&ids);
            if ids.sampled && !span.is_disabled() {
                if let Some(cx) = parent {
                    // Fails only when the layer is missing or the span already started; neither here.
                    let _ = span.set_parent(cx);
                }
                // Starts the exported span, under this request's trace id (see current_trace_id).
                let cx = span.context();
                ids.span = cx.span().span_context().is_valid().then_some(cx);
            }
            span
        });
        span.record("trace_id", tracing::field::display(ids.trace_id));
        (span, ids)
    }
}

/// The metadata a call to another role carries for a traced request: its trace context
/// (`traceparent`, naming the current exported span as the parent) and its request id, given
/// to `put` as header name and value. An untraced request's calls carry nothing: sending,
/// parsing and scoping the ids on every call took 15% of a 3/3/2 cluster's manifest GETs (the
/// metadata leader serves them all), for log lines that calls rarely write.
pub fn outgoing(put: &mut dyn FnMut(&str, String)) {
    let _ = CURRENT.try_with(|ids| {
        if !ids.sampled {
            return;
        }
        let current = Span::current().context();
        let cx = Some(current).filter(|cx| cx.span().span_context().is_valid()).or_else(|| ids.span.clone());
        let cx = cx.unwrap_or_else(|| {
            // No exported span to name (the request's own was filtered out): a fresh span id
            // stands for this call, in the request's trace.
            let parent = SpanContext::new(
                ids.trace_id,
                RandomIdGenerator::default().new_span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            );
            opentelemetry::Context::new().with_remote_span_context(parent)
        });
        TraceContextPropagator::new().inject_context(&cx, &mut Setter(put));
        put(REQUEST_ID_HEADER, ids.request_id.to_string());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids_of(h: &http::HeaderMap) -> RequestIds {
        Incoming::new(h, "r").start(|_| Span::none()).1
    }

    #[test]
    fn a_callers_trace_is_continued_and_a_missing_one_made() {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(ids_of(&h).trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        h.insert("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse().unwrap());
        let made = ids_of(&h).trace_id;
        assert_ne!(made, TraceId::INVALID);
        assert_ne!(made, ids_of(&http::HeaderMap::new()).trace_id);
        // Nothing is exported in this process: no request is traced.
        assert!(!ids_of(&h).sampled);
    }

    #[tokio::test]
    async fn a_traced_request_s_calls_carry_its_ids_and_others_nothing() {
        let carried = |ids: Option<RequestIds>| async move {
            let call = async {
                let mut sent = Vec::new();
                outgoing(&mut |k, v| sent.push((k.to_string(), v)));
                sent
            };
            match ids {
                Some(ids) => scope(ids, call).await,
                None => call.await,
            }
        };
        assert!(carried(None).await.is_empty(), "outside a request nothing is carried");
        let trace_id = new_trace_id();
        assert!(carried(Some(RequestIds::untraced("r-0", trace_id))).await.is_empty(), "an untraced request's neither");
        let traced = RequestIds { sampled: true, ..RequestIds::untraced("r-1", trace_id) };
        let mut h = http::HeaderMap::new();
        for (k, v) in carried(Some(traced)).await {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        assert_eq!(ids_of(&h).trace_id, trace_id);
        assert_eq!(passed_request_id(&h), Some("r-1"));
        assert!(h["traceparent"].to_str().unwrap().ends_with("-01"), "sampled: {:?}", h["traceparent"]);
    }

    #[tokio::test]
    async fn a_spawned_task_inherits_the_request() {
        let ids = RequestIds { sampled: true, ..RequestIds::untraced("r-2", new_trace_id()) };
        let seen = scope(ids, async { tokio::spawn(inherit(async { (current(), sampled()) })).await.unwrap() }).await;
        assert_eq!(seen.0.map(|i| i.request_id).as_deref(), Some("r-2"));
        assert!(seen.1);
    }
}
