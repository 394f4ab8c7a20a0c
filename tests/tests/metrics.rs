//! Prometheus metrics: every role of a cluster serves `/metrics` on its `--http-listen`
//! address, and a push moves the counters of the frontend it went through, of the storage
//! nodes that stored its blobs and of the metadata leader that committed it. No label carries
//! a repository name or a digest.

use std::time::Duration;

use berth_tests::cluster::{wait_for_storage, RoleProcess};
use berth_tests::meta_group::MetaGroup;
use berth_tests::{client, push_image, ADMIN, ADMIN_TOKEN};

/// A free loopback address (bound and released; nothing else here takes ports meanwhile).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("addr").to_string()
}

/// The exposition text of `http://ADDR/metrics`.
async fn scrape(addr: &str) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics")).await.expect("GET /metrics");
    assert_eq!(r.status(), 200, "/metrics of {addr}");
    r.text().await.expect("body")
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_moves_the_counters_of_every_role_it_touches() {
    let meta_ops: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let ops = meta_ops.clone();
    let group = tokio::task::block_in_place(|| {
        MetaGroup::start_each(3, move |id| vec!["--http-listen".into(), ops[id as usize - 1].clone()])
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let storage_ops: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let _storage: Vec<RoleProcess> = (0..3)
        .map(|i| {
            RoleProcess::start(&[
                "storage".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--meta".into(),
                group.addrs(),
                "--data-dir".into(),
                dir.path().join(format!("s{i}")).display().to_string(),
                "--http-listen".into(),
                storage_ops[i].clone(),
            ])
        })
        .collect();
    tokio::task::block_in_place(|| wait_for_storage(&group, 3));
    let front_ops = free_addr();
    let frontend = RoleProcess::start(&[
        "frontend".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--meta".into(),
        group.addrs(),
        "--bootstrap-admin".into(),
        format!("{ADMIN}:{ADMIN_TOKEN}"),
        "--http-listen".into(),
        front_ops.clone(),
    ]);
    let leader = tokio::task::block_in_place(|| group.wait_for_leader(Duration::from_secs(10))).expect("a leader");
    let leader_ops = &meta_ops[leader as usize - 1];

    // Probes on the operations listener of every role.
    for addr in meta_ops.iter().chain(&storage_ops).chain([&front_ops]) {
        for probe in ["healthz", "readyz"] {
            let r = reqwest::get(format!("http://{addr}/{probe}")).await.expect("probe");
            assert_eq!(r.status(), 200, "/{probe} of {addr}: {:?}", r.text().await);
        }
    }

    // Each storage node follows the placement map every 2 s: wait until all three go by the
    // same version, which has all three (each is in the map it goes by).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now: Vec<String> = futures::future::join_all(storage_ops.iter().map(|a| scrape(a))).await;
        let versions: Vec<f64> = now.iter().map(|t| sum(t, "berth_storage_reads_first_map_version", &[])).collect();
        if versions[0] > 0.0 && versions.iter().all(|v| *v == versions[0]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the storage nodes go by map versions {versions:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before_leader = scrape(leader_ops).await;
    let before_storage: Vec<String> = futures::future::join_all(storage_ops.iter().map(|a| scrape(a))).await;
    let c = client();
    let repo = "admin/metered-repository";
    push_image(&c, &frontend.url(), repo, "v1", 7, &[300_000, 1000]).await;
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", frontend.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(r.status(), 200);

    // The frontend: requests by route, method and status, latency, bytes received.
    let f = scrape(&front_ops).await;
    assert!(
        sum(&f, "berth_http_requests_total", &[r#"route="manifest""#, r#"method="PUT""#, r#"status="201""#]) >= 1.0
    );
    assert!(
        sum(&f, "berth_http_requests_total", &[r#"route="manifest""#, r#"method="GET""#, r#"status="200""#]) >= 1.0
    );
    assert!(sum(&f, "berth_http_requests_total", &[r#"route="upload_start""#, r#"status="201""#]) >= 3.0, "{f}");
    assert!(sum(&f, "berth_http_request_duration_seconds_count", &[r#"route="manifest""#]) >= 2.0);
    assert!(sum(&f, "berth_http_received_bytes_total", &[]) >= 301_000.0, "{f}");

    // The storage nodes: blobs written (each on at least two nodes), fsyncs timed, gRPC calls.
    let after_storage: Vec<String> = futures::future::join_all(storage_ops.iter().map(|a| scrape(a))).await;
    let delta = |name: &str, after: &[String]| {
        after.iter().map(|t| sum(t, name, &[])).sum::<f64>()
            - before_storage.iter().map(|t| sum(t, name, &[])).sum::<f64>()
    };
    let written = delta("berth_storage_blobs_written_total", &after_storage);
    assert!(written >= 6.0, "3 blobs, at least 2 copies each: {written} written");
    let fsyncs: f64 = after_storage.iter().map(|t| sum(t, "berth_storage_fsync_duration_seconds_count", &[])).sum();
    assert!(fsyncs >= 6.0, "fsyncs timed: {fsyncs}");
    // The small blobs (the config, the small layer, the manifest) went through the committers.
    let batches: f64 = after_storage.iter().map(|t| sum(t, "berth_storage_commit_batch_size_count", &[])).sum();
    assert!(batches >= 1.0, "small blobs committed in batches: {batches}");
    assert!(after_storage.iter().any(|t| sum(t, "berth_grpc_requests_total", &["Storage/"]) >= 1.0));
    assert!(after_storage.iter().all(|t| t.contains("berth_storage_uploads_open")));
    // Of each blob's three copies, the two on nodes that reads do not ask first leave the page
    // cache: two thirds of the bytes written (the third copy may land after the answer).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<String> = futures::future::join_all(storage_ops.iter().map(|a| scrape(a))).await;
        let (bytes, uncached) =
            (delta("berth_storage_written_bytes_total", &now), delta("berth_storage_uncached_bytes_total", &now));
        if bytes >= 3.0 * 301_000.0 && uncached * 3.0 == bytes * 2.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{uncached} of {bytes} bytes written left the page cache");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The metadata leader: it leads, and proposed (in batches) what the push wrote.
    let l = scrape(leader_ops).await;
    assert_eq!(sum(&l, "berth_raft_is_leader", &[]), 1.0);
    assert_eq!(sum(&l, "berth_raft_leader", &[]), leader as f64);
    let proposed = sum(&l, "berth_raft_proposals_total", &[]) - sum(&before_leader, "berth_raft_proposals_total", &[]);
    assert!(proposed >= 1.0, "the push was proposed: {proposed}");
    assert!(sum(&l, "berth_raft_proposal_batch_size_count", &[]) >= 1.0);
    assert!(sum(&l, "berth_raft_applied_index", &[]) > sum(&before_leader, "berth_raft_applied_index", &[]));
    assert!(sum(&l, "berth_raft_committed_index", &[]) >= 1.0, "{l}");
    assert!(sum(&l, "berth_grpc_requests_total", &["Meta/"]) >= 1.0);

    // Bounded labels: no repository name, no digest.
    for text in after_storage.iter().chain([&f, &l]) {
        assert!(!text.contains("metered"), "a repository name in a label");
        assert!(!text.contains("sha256:"), "a digest in a label");
    }
}

/// The Grafana dashboard in `deploy/grafana/` charts only metrics Berth describes (in
/// `services/berth/src/metrics.rs`), so a renamed metric cannot leave a panel silently empty.
#[test]
fn the_dashboard_charts_only_metrics_berth_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/berth-dashboard.json")).expect("dashboard");
    let catalogue = std::fs::read_to_string(root.join("services/berth/src/metrics.rs")).expect("metrics.rs");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut charted = 0;
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("berth_") {
                let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_string();
                assert!(
                    catalogue.contains(&format!("\"{base}\"")),
                    "panel {:?} charts {name}, which Berth does not describe",
                    panel["title"]
                );
                charted += 1;
            }
        }
    }
    assert!(charted >= 20, "{charted} series charted");
}
