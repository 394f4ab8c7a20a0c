//! `berth-loadtest` end to end: every scenario, at a small size, against `berth standalone`
//! with Docker token auth on, side by side (`--compare`) with the reference registry the
//! benchmark uses (Debian's `docker-registry`), the way `loadtest/bench.sh` runs them. Checks
//! that the tool completes every scenario without errors and reports what it measured, and that
//! failures are counted, not hidden.
//!
//! Needs the `berth` binary next to `berth-loadtest` (`cargo test --workspace` builds both).

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TOKEN: &str = "loadtest-admin-token";

/// A child process, killed when the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh directory under the system's temp dir, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("berth-loadtest-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn loadtest_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_berth-loadtest"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("registry on port {port} exited: {status}");
        }
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_berth(dir: &Path) -> (Proc, String) {
    let berth = loadtest_bin().with_file_name("berth");
    assert!(berth.exists(), "{} is missing: run `cargo test --workspace`, which builds it", berth.display());
    let port = free_port();
    let mut child = Command::new(berth)
        .args(["standalone", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("berth"))
        .args(["--bootstrap-admin", &format!("bench:{TOKEN}")])
        .env("BERTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child);
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// The reference registry with filesystem storage, as `bench.sh` configures it. In CI it must
/// be installed; elsewhere a second Berth stands in.
fn start_reference(dir: &Path) -> Option<(Proc, String)> {
    let installed = Command::new("sh")
        .args(["-c", "command -v docker-registry"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(std::env::var("CI").is_err(), "docker-registry is not installed (.ci/run installs it)");
        eprintln!("docker-registry is not installed; comparing against a second berth");
        return None;
    }
    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("reference").display()
        ),
    )
    .unwrap();
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child);
    Some((Proc(child), format!("http://127.0.0.1:{port}")))
}

/// Runs the tool with `args` plus small sizes; returns its JSON report.
fn run(dir: &Path, args: &[&str]) -> Value {
    let json = dir.join(format!("report-{}.json", free_port()));
    let out = Command::new(loadtest_bin())
        .args(args)
        .args([
            "--quiet",
            "--size",
            "6000000",
            "--chunk-size",
            "1000000",
            "--images",
            "12",
            "--workers",
            "4",
            "--layers",
            "2",
            "--layer-size",
            "70000",
            "--duration",
            "1",
            "--max-seconds",
            "120",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berth-loadtest {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// The CPU milliseconds an outcome's `field` (`server_cpu_ms` or `client_cpu_ms`) accounts for
/// in all: ms per unit times the units counted. Every unit gives the same total.
fn cpu_ms_spent(o: &Value, field: &str) -> f64 {
    let seconds = o["seconds"].as_f64().unwrap();
    let totals: Vec<f64> = o[field]
        .as_object()
        .unwrap()
        .iter()
        .map(|(unit, ms)| ms.as_f64().unwrap() * o["rates"][format!("{unit}/s")].as_f64().unwrap() * seconds)
        .collect();
    let first = totals[0];
    assert!(totals.iter().all(|t| (t - first).abs() <= 1e-6 * first.max(1.0)), "{field} per unit disagree: {o}");
    first
}

#[test]
fn every_scenario_against_berth_with_auth_and_the_reference() {
    let scratch = Scratch::new();
    let (_berth, berth_url) = start_berth(&scratch.0);
    let second_dir = scratch.0.join("second");
    let (_reference, reference_url) = match start_reference(&scratch.0) {
        Some(r) => r,
        None => start_berth(&second_dir),
    };
    let pid = _berth.0.id().to_string();
    let report = run(
        &scratch.0,
        &[
            "all",
            "--url",
            &berth_url,
            "--username",
            "bench",
            "--token",
            TOKEN,
            "--pid",
            &pid,
            "--compare",
            &reference_url,
            "--compare-username",
            "bench",
            "--compare-token",
            TOKEN,
        ],
    );
    let scenarios = report.as_array().unwrap();
    let names: Vec<&str> = scenarios.iter().map(|s| s[0]["scenario"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["push-large", "push-chunked", "pull-large", "push-images", "pull-images", "manifest-get", "mixed"]
    );
    let (mut berth_cpu_ms, mut client_cpu_ms, mut machine_shares) = (0.0, 0.0, 0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for s in scenarios {
        let outcomes = s.as_array().unwrap();
        assert_eq!(outcomes.len(), 2, "{s}");
        assert_eq!(outcomes[0]["target"], berth_url.as_str());
        assert_eq!(outcomes[1]["target"], reference_url.as_str());
        for o in outcomes {
            let what = format!("{} against {}", o["scenario"], o["target"]);
            assert_eq!(o["errors"], 0, "{what}: {o}");
            assert!(o["seconds"].as_f64().unwrap() > 0.0, "{what}");
            let rates = o["rates"].as_object().unwrap();
            assert!(!rates.is_empty() && rates.values().all(|v| v.as_f64().unwrap() > 0.0), "{what}: {rates:?}");
            for (kind, l) in o["latencies"].as_object().unwrap() {
                let (p50, p99, max) = (l["p50_ms"].as_f64(), l["p99_ms"].as_f64(), l["max_ms"].as_f64());
                assert!(p50 <= p99 && p99 <= max, "{what}: {kind} {l}");
            }
        }
        // Berth's memory was sampled; the reference's pid was not given.
        assert!(outcomes[0]["peak_rss_mib"].as_f64().unwrap() > 1.0, "{s}");
        // CPU time per unit counted: the client's always, the server's only where its pid was
        // given, for every unit the scenario counts.
        let units: BTreeSet<String> =
            outcomes[0]["rates"].as_object().unwrap().keys().map(|k| k.trim_end_matches("/s").to_string()).collect();
        for (o, server) in [(&outcomes[0], true), (&outcomes[1], false)] {
            let keys = |field: &str| -> BTreeSet<String> { o[field].as_object().unwrap().keys().cloned().collect() };
            assert_eq!(keys("client_cpu_ms"), units, "{o}");
            assert_eq!(keys("server_cpu_ms"), if server { units.clone() } else { BTreeSet::new() }, "{o}");
        }
        // The machine's idle and stolen shares of the timed parts, as percentages; none for a
        // timed part shorter than /proc/stat's 10 ms tick (some are, at these sizes).
        for o in outcomes {
            for field in ["machine_idle_pct", "machine_steal_pct"] {
                assert!(
                    o[field].is_null() || o[field].as_f64().is_some_and(|v| (0.0..=100.0).contains(&v)),
                    "{field}: {o}"
                );
                machine_shares += usize::from(!o[field].is_null());
            }
        }
        let berth = &outcomes[0];
        let (server, client) = (cpu_ms_spent(berth, "server_cpu_ms"), cpu_ms_spent(berth, "client_cpu_ms"));
        // Two readings of /proc per timed part, each off by up to one 10 ms tick.
        let most = berth["seconds"].as_f64().unwrap() * 1e3 * cores + 20.0;
        assert!(server <= most, "Berth's processes spent {server} ms in {most} ms of its cores: {berth}");
        berth_cpu_ms += server;
        client_cpu_ms += client;
    }
    // The clock ticks of /proc are 10 ms: a scenario this small may spend less, all of them
    // together do not.
    assert!(berth_cpu_ms > 0.0, "Berth spent no CPU time in any timed part");
    assert!(client_cpu_ms > 0.0, "the tool spent no CPU time in any timed part");
    assert!(machine_shares > 0, "no timed part gave the machine's idle and stolen shares");
    let images = &scenarios[3][0];
    // The report gives a rate and a duration; their product is the count, up to float rounding.
    let pushed = images["rates"]["images/s"].as_f64().unwrap() * images["seconds"].as_f64().unwrap();
    assert!((pushed - 12.0).abs() < 1e-6, "push-images pushed {pushed} images, not 12: {images}");
    for kind in ["blob HEAD", "upload POST", "upload PATCH", "upload PUT", "manifest PUT", "image push"] {
        assert!(images["latencies"].get(kind).is_some(), "push-images recorded no {kind}: {images}");
    }
}

#[test]
fn failures_are_counted_not_hidden() {
    let scratch = Scratch::new();
    let (_berth, url) = start_berth(&scratch.0);
    // A wrong token: every push is refused, and the report says so.
    let report = run(&scratch.0, &["push-images", "--url", &url, "--username", "bench", "--token", "wrong-token"]);
    let o = &report[0][0];
    assert_eq!(o["errors"], 12, "{o}");
    assert_eq!(o["rates"]["images/s"], 0.0, "{o}");
    // A scenario that cannot set itself up fails the run.
    let out = Command::new(loadtest_bin())
        .args(["pull-images", "--quiet", "--images", "2", "--workers", "1", "--url", &url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "pull-images without credentials succeeded");
}
