//! Logs and traces of a role.
//!
//! Logs go to stderr as text or JSON lines (`--log-format`), filtered by `BERTH_LOG` (an
//! `EnvFilter`; default `info,openraft=warn`). A line written while serving a request names
//! its request id and trace id (see [`berth_core::trace`]).
//!
//! Spans are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not otherwise; `BERTH_TRACE` filters
//! them as `BERTH_LOG` filters logs (default `info,openraft=warn`), each independently. The exporter takes the
//! standard OpenTelemetry variables (`OTEL_SERVICE_NAME`, default `berth-ROLE`;
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`; `OTEL_BSP_*` for batching;
//! `OTEL_RESOURCE_ATTRIBUTES`).

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SdkTracerProvider, ShouldSample};
use opentelemetry_sdk::Resource;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{self, FilterExt};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{self, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, the span's fields before the message.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields
    /// (`message` among them), `span` (the innermost span's fields) and `spans` (all of them).
    Json,
}

/// What must be flushed on the way out.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Writes a log line as `inner` does, and on a line written while serving a request, that
/// request's ids (`request_id`, `trace_id`): at the end of a text line, as the first members
/// of a JSON one. The ids come from the task, at the moment a line is written, so requests
/// that log nothing cost nothing (a span with them as fields would format them for every
/// request).
struct WithIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let Some(ids) = berth_core::trace::current() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        if self.json {
            // Request ids from other roles are visible ASCII of bounded length, but may hold quotes.
            let id = serde_json::to_string(&*ids.request_id).map_err(|_| std::fmt::Error)?;
            let rest = body.strip_prefix('{').ok_or(std::fmt::Error)?;
            let sep = if rest.starts_with('}') { "" } else { "," };
            writeln!(writer, "{{\"request_id\":{id},\"trace_id\":\"{}\"{sep}{rest}", ids.trace_id)
        } else {
            writeln!(writer, "{body} request_id={} trace_id={}", ids.request_id, ids.trace_id)
        }
    }
}

/// Whether the environment asks for spans to be exported.
fn export_wanted() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the process's subscriber: logs in `format`, and for a serving `role` (`None` for
/// the command-line tools) the OTLP exporter when the environment asks for it. Runs inside
/// the runtime, which the exporter's gRPC channel lives on.
pub fn init(format: LogFormat, role: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = env_filter("BERTH_LOG")?;
    // Colours only for a person at a terminal; files and collectors get plain lines.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.event_format(WithIds { inner: fmt::format(), json: false }).boxed(),
        LogFormat::Json => fmt
            .fmt_fields(fmt::format::JsonFields::new())
            .event_format(WithIds { inner: fmt::format().json().flatten_event(true), json: true })
            .boxed(),
    };
    let provider = match role {
        Some(role) if export_wanted() => Some(provider(role)?),
        _ => None,
    };
    let sampler = provider.as_ref().map(|_| sampler());
    let spans = provider.as_ref().map(|p| {
        // Only what a reader of a trace uses: no thread names (a string per span), code
        // locations or idle/busy timings (two clock reads per poll).
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("berth"))
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false)
    });
    // Each has its own filter: logs kept to warnings still leave the spans exported whole.
    // Spans reach the exporting layer only for requests that are traced (decided as each
    // arrives, see berth_core::trace): the others cost it nothing.
    let span_filter = env_filter("BERTH_TRACE")?.and(filter::filter_fn(|_| berth_core::trace::sampled()));
    Registry::default()
        .with(logs.with_filter(filter))
        .with(spans.map(|s| s.with_filter(span_filter)))
        .try_init()
        .context("installing the log subscriber")?;
    if let Some(sampler) = sampler {
        berth_core::trace::set_exporting(sampler);
    }
    Ok(Telemetry { provider })
}

/// The filter the variable `var` sets, by default `info,openraft=warn`; a value that does not
/// parse is an error, not silently the default.
fn env_filter(var: &str) -> anyhow::Result<EnvFilter> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).with_context(|| format!("{var}={v:?}")),
        _ => Ok(EnvFilter::new("info,openraft=warn")),
    }
}

/// Trace ids for the exported spans: a request's first span gets the id its sampling was
/// decided on (see `berth_core::trace::current_trace_id`), so a ratio sampler in every role
/// decides alike; anything else a random one.
#[derive(Debug)]
struct RequestTraceIds;

impl IdGenerator for RequestTraceIds {
    fn new_trace_id(&self) -> TraceId {
        berth_core::trace::current_trace_id().unwrap_or_else(berth_core::trace::new_trace_id)
    }

    fn new_span_id(&self) -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// A tracer provider exporting over OTLP/gRPC in batches.
fn provider(role: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter =
        opentelemetry_otlp::SpanExporter::builder().with_tonic().build().context("setting up the OTLP exporter")?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(format!("berth-{role}"));
    }
    // Which requests are traced is decided as they arrive (with the sampler below); every
    // span that reaches the provider belongs to one.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::AlwaysOn)
        .with_id_generator(RequestTraceIds)
        .with_resource(resource.build())
        .build())
}

/// The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` configure (default: a
/// caller's decision, else every request).
fn sampler() -> Box<dyn ShouldSample> {
    opentelemetry_sdk::trace::Config::default().sampler
}

impl Telemetry {
    /// Exports the spans still queued (blocks, up to the exporter's timeout).
    pub fn flush(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("berth: exporting the last spans: {e}");
            }
        }
    }
}
