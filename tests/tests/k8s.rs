//! The Kubernetes base (`deploy/k8s/`): `kubectl kustomize` renders it offline, every object
//! validates against the Kubernetes schemas (`kubernetes-validate --strict`), it holds what an
//! operator needs (stateful roles with their own volumes, autoscaled frontends, disruption
//! budgets that keep a metadata majority and the write quorum, probes, requests, the network
//! policy, the Job that forms the group), and every container's command line is one the
//! `berth` binary accepts.

use std::path::Path;
use std::process::{Command, Stdio};

use berth_tests::{berth_bin, have_tool};
use serde_json::Value;

/// `kubectl kustomize deploy/DIR`: the YAML, and its objects as JSON.
fn render(dir: &str) -> Option<(String, Vec<Value>)> {
    if !have_tool("kubectl") || !have_tool("kubernetes-validate") {
        return None;
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(dir);
    let out = Command::new("kubectl").arg("kustomize").arg(&base).output().expect("kubectl kustomize");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).expect("utf-8");
    // PyYAML comes with kubernetes-validate: YAML documents to one JSON list.
    let mut py = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    py.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("writing YAML");
    let out = py.wait_with_output().expect("python3");
    assert!(out.status.success(), "YAML to JSON failed");
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    Some((yaml, docs))
}

/// Every object validates against the Kubernetes schemas.
fn validate(yaml: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("berth.yaml");
    std::fs::write(&file, yaml).expect("writing the rendered objects");
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate");
    assert!(
        out.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_kubernetes_base_renders_and_every_object_validates() {
    let Some((yaml, docs)) = render("k8s") else { return };
    validate(&yaml);

    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for (kind, n) in [
        ("StatefulSet", 2),
        ("Deployment", 1),
        ("HorizontalPodAutoscaler", 1),
        ("Service", 3),
        ("PodDisruptionBudget", 3),
        ("NetworkPolicy", 1),
        ("Job", 1),
    ] {
        assert_eq!(kinds.iter().filter(|k| **k == kind).count(), n, "{kind} objects: {kinds:?}");
    }
    // Stateful roles: their own volumes, headless services that publish pods before ready.
    for name in ["berth-meta", "berth-storage"] {
        let set = named(&docs, "StatefulSet", name);
        assert_eq!(set["spec"]["replicas"], 3);
        assert_eq!(set["spec"]["serviceName"], name);
        assert_eq!(set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data");
        let svc = named(&docs, "Service", name);
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
    }
    // Disruption budgets: a metadata majority, the write quorum of storage nodes.
    assert_eq!(named(&docs, "PodDisruptionBudget", "berth-meta")["spec"]["minAvailable"], 2);
    assert_eq!(named(&docs, "PodDisruptionBudget", "berth-storage")["spec"]["minAvailable"], 2);
    let hpa = named(&docs, "HorizontalPodAutoscaler", "berth-frontend");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "berth-frontend");
    assert!(hpa["spec"]["minReplicas"].as_u64() >= Some(2));
    // Only Berth's roles reach the gRPC ports.
    let policy = &of_kind(&docs, "NetworkPolicy")[0]["spec"];
    let grpc_from = &policy["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"];
    assert_eq!(grpc_from, &serde_json::json!(["frontend", "meta", "storage", "admin"]));
    assert_eq!(policy["podSelector"]["matchExpressions"][0]["values"], serde_json::json!(["meta", "storage"]));
    assert!(policy["ingress"][0]["ports"].as_array().expect("ports").iter().any(|p| p["port"] == 7100));

    // Every long-running container: probes on /healthz and /readyz, resource requests; and
    // every container's arguments parse as a berth command line.
    let mut containers = 0;
    for d in &docs {
        let Some(spec) = d["spec"]["template"]["spec"]["containers"].as_array() else { continue };
        for c in spec {
            containers += 1;
            assert!(c["resources"]["requests"]["cpu"].is_string(), "{} requests CPU", c["name"]);
            if d["kind"] != "Job" {
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{}", c["name"]);
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{}", c["name"]);
            }
            let mut args: Vec<String> =
                c["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
            args.push("--help".into());
            let out = Command::new(berth_bin()).args(&args).output().expect("berth");
            assert!(
                out.status.success(),
                "berth does not take the arguments of {}: {args:?}: {}",
                c["name"],
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_eq!(containers, 4, "meta, storage, frontend and the init Job");
}

/// The environment variable `name` of container `c`, if set to a value.
fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// The secret mounted at the directory holding `path` in container `c` of pod spec `pod`.
fn secret_holding<'a>(pod: &'a Value, c: &Value, path: &str) -> Option<&'a str> {
    let mount = c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"].as_str().is_some_and(|dir| Path::new(path).parent() == Some(Path::new(dir))))?;
    let volume = pod["volumes"].as_array()?.iter().find(|v| v["name"] == mount["name"])?;
    volume["secret"]["secretName"].as_str()
}

#[test]
fn the_tls_overlay_renders_validates_and_gives_every_role_its_certificates() {
    let Some((yaml, docs)) = render("k8s-tls") else { return };
    validate(&yaml);

    let mut containers = 0;
    for d in &docs {
        let pod = &d["spec"]["template"]["spec"];
        let Some(spec) = pod["containers"].as_array() else { continue };
        for c in spec {
            containers += 1;
            // Every role, the Job included: the authority, a certificate and its key, each a
            // file of the cluster's secret.
            let file =
                |path: &str| Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
            for (var, key) in
                [("BERTH_CLUSTER_CA", "ca.crt"), ("BERTH_CLUSTER_CERT", "tls.crt"), ("BERTH_CLUSTER_KEY", "tls.key")]
            {
                let path = env_of(c, var).unwrap_or_else(|| panic!("{} has no {var}", c["name"]));
                assert_eq!(secret_holding(pod, c, path), Some("berth-cluster-tls"), "{}: {var}={path}", c["name"]);
                assert_eq!(file(path), key, "{}: {var} names the secret's {key}", c["name"]);
            }
            if c["name"] != "frontend" {
                assert_eq!(env_of(c, "BERTH_TLS_CERT"), None, "only frontends serve HTTPS");
                continue;
            }
            for (var, key) in [("BERTH_TLS_CERT", "tls.crt"), ("BERTH_TLS_KEY", "tls.key")] {
                let path = env_of(c, var).unwrap_or_else(|| panic!("the frontend has no {var}"));
                assert_eq!(secret_holding(pod, c, path), Some("berth-https-tls"), "frontend: {var}={path}");
                assert_eq!(file(path), key, "frontend: {var} names the secret's {key}");
            }
            // The API port now speaks TLS; the probes ask the plain operations port, the one
            // --http-listen binds.
            let metrics =
                c["ports"].as_array().expect("ports").iter().find(|p| p["name"] == "metrics").expect("metrics");
            let http_listen = format!("--http-listen=0.0.0.0:{}", metrics["containerPort"]);
            assert!(c["args"].as_array().expect("args").iter().any(|a| *a == *http_listen), "{http_listen}");
            for probe in ["livenessProbe", "readinessProbe"] {
                assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
            }
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        }
    }
    assert_eq!(containers, 4, "meta, storage, frontend and the init Job");
}
