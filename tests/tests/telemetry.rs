//! Traces and logs: a push through a cluster's frontend is one trace across the frontend and
//! the storage nodes, exported over OTLP to a collector run here (a tonic server of the OTLP
//! trace service); a request's log lines, as JSON, name its request id and trace id.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_tests::cluster::{Cluster, ClusterOptions};
use berth_tests::{client, digest, Launch, Server};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

/// An OTLP trace collector keeping every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = vec![];
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(span.trace_id),
                    span_id: hex::encode(span.span_id),
                    parent: hex::encode(span.parent_span_id),
                });
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Starts it on a free loopback port; returns its endpoint URL.
    async fn start(&self) -> String {
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = incoming.local_addr().expect("addr");
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
        format!("http://{addr}")
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }
}

/// A monolithic push of `data` to `url`'s `repo`, in the trace `traceparent` names; it must
/// be created.
async fn push_in_trace(url: &str, repo: &str, data: Vec<u8>, traceparent: &str) -> reqwest::Response {
    let r = client()
        .post(format!("{url}/v2/{repo}/blobs/uploads/?digest={}", digest(&data)))
        .header("traceparent", traceparent)
        .body(data)
        .send()
        .await
        .expect("push");
    assert_eq!(r.status(), 201);
    r
}

const TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CALLER_SPAN: &str = "eee19b7ec3c1b174";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_one_trace_across_frontend_and_storage_nodes() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let launch = Launch {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            // Batches leave every 100 ms, so the test need not wait out the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        stderr: None,
    };
    let cl = tokio::task::block_in_place(|| Cluster::start_with(ClusterOptions { launch, ..Default::default() }));
    let url = cl.frontends[0].url();
    // One monolithic push, in the trace the caller names.
    let data = berth_tests::bytes(7, 300_000);
    let r = push_in_trace(&url, "traced/app", data, &format!("00-{TRACE}-{CALLER_SPAN}-01")).await;
    let request_id = r.headers().get("x-request-id").expect("a request id").to_str().unwrap().to_string();
    assert!(!request_id.is_empty());

    // The frontend's request span, and on at least two storage nodes (W = 2) a call span with
    // the write under it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.of_trace(TRACE);
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let request = spans.iter().any(|s| s.service == "berth-frontend" && s.name == "request");
        // Batches arrive from each process on their own: wait for every span's parent too.
        let whole = spans.iter().all(|s| s.parent == CALLER_SPAN || ids.contains(s.parent.as_str()));
        let storage_writes = spans.iter().filter(|s| s.service == "berth-storage" && s.name == "store.put").count();
        if request && whole && storage_writes >= 2 {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans of the push did not all arrive: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One tree: the request span is the caller's child, and every other span's parent is a
    // span of the trace.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let request = spans.iter().find(|s| s.name == "request").unwrap();
    assert_eq!(request.parent, CALLER_SPAN, "the request continues the caller's trace");
    for s in &spans {
        if s.span_id != request.span_id {
            assert!(ids.contains(s.parent.as_str()), "span {s:?} hangs off no span of the trace: {spans:#?}");
        }
    }
    // The storage nodes' call spans are children of the frontend's spans (the calls carried
    // the context across processes), and the writes are children of those calls.
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut nodes_written = 0;
    for write in spans.iter().filter(|s| s.service == "berth-storage" && s.name == "store.put") {
        let call = by_id[write.parent.as_str()];
        assert_eq!((call.service.as_str(), call.name.as_str()), ("berth-storage", "grpc"), "{spans:#?}");
        assert_eq!(by_id[call.parent.as_str()].service, "berth-frontend", "{spans:#?}");
        nodes_written += 1;
    }
    assert!(nodes_written >= 2, "{spans:#?}");
    // A caller that does not keep its trace (sampled flag 0) gets none of its spans exported.
    const UNSAMPLED: &str = "0af7651916cd43dd8448eb211c80319c";
    push_in_trace(&url, "traced/app", berth_tests::bytes(9, 1000), &format!("00-{UNSAMPLED}-{CALLER_SPAN}-00")).await;
    // A traced request after it: once its spans are in, the untraced one's would be too.
    const LATER: &str = "1bf92f3577b34da6a3ce929d0e0e4736";
    let r = client()
        .get(format!("{url}/v2/"))
        .header("traceparent", format!("00-{LATER}-{CALLER_SPAN}-01"))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while collector.of_trace(LATER).is_empty() {
        assert!(Instant::now() < deadline, "the later traced request's span did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The frontends and storage nodes flush on the same schedule; give the storage nodes one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.of_trace(UNSAMPLED).is_empty(), "spans of an unsampled request were exported");
    // Nothing of the push leaked into another trace.
    let others =
        collector.spans.lock().unwrap().iter().filter(|s| s.name == "store.put" && s.trace_id != TRACE).count();
    assert_eq!(others, 0, "writes of the push outside its trace");
}

/// The JSON log lines of a standalone server, parsed.
fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("the log");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_of_a_request_name_its_request_and_trace_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("berth.log");
    let launch = Launch {
        env: vec![("BERTH_LOG".into(), "info,berth_frontend=debug".into()), ("BERTH_LOG_FORMAT".into(), "json".into())],
        stderr: Some(log.clone()),
    };
    let server = tokio::task::block_in_place(|| Server::start_launched(&launch));
    let c = client();
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let r = push_in_trace(&server.url, "logged/app", berth_tests::bytes(8, 1000), &traceparent).await;
    let pushed_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // A request without a trace gets a new one.
    let r = c.get(format!("{}/v2/", server.url)).send().await.expect("GET /v2/");
    assert_eq!(r.status(), 200);
    let checked_id = r.headers()["x-request-id"].to_str().unwrap().to_string();

    // The access line is written as the response leaves: wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered =
        |id: &str| json_lines(&log).into_iter().find(|l| l["message"] == "answered" && l["request_id"] == id);
    let (pushed, checked) = loop {
        if let (Some(p), Some(c)) = (answered(&pushed_id), answered(&checked_id)) {
            break (p, c);
        }
        assert!(Instant::now() < deadline, "no access lines for both requests in {:?}", std::fs::read_to_string(&log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(pushed["trace_id"], TRACE, "{pushed}");
    assert_eq!(pushed["status"], 201, "{pushed}");
    assert_eq!(pushed["level"], "DEBUG");
    let other = checked["trace_id"].as_str().expect("a trace id");
    assert!(other.len() == 32 && other != TRACE && other.bytes().all(|b| b.is_ascii_hexdigit()), "{checked}");
    assert_ne!(pushed_id, checked_id);
    // Every line naming a request names its trace too, as the line's own members.
    for line in json_lines(&log) {
        if line.get("request_id").is_some() {
            assert!(line["request_id"].is_string() && line["trace_id"].is_string(), "{line}");
        }
    }
}
