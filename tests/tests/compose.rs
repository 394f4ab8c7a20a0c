//! The compose cluster (`deploy/compose/`) on the Docker engine, from the outside: the real
//! docker CLI logs in, pushes through one frontend and pulls through the other; containers are
//! killed, cut off the network, restarted one by one and stopped under load, as operators and
//! their orchestrators do, and no operation on acknowledged content fails.
//!
//! The load is driven over HTTP as a balancer in front of the two frontends would send it: each
//! request goes to the next frontend, or to the other one when the first refuses the connection
//! (it is stopped or restarting). Connections are not reused between requests, so no request
//! is sent on a connection a stopping frontend is closing.
//!
//! The rolling restart runs the cluster with `deploy/compose/tls.yml`: HTTPS to the frontends,
//! checked against the authority `deploy/compose/certs.sh` made, and mutual TLS between every
//! role, through every restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;

use berth_tests::compose::{ComposeCluster, FRONTENDS, METAS, STORAGES};
use berth_tests::{bytes, digest, image_manifest, DockerCli, ADMIN, ADMIN_TOKEN};

/// Sends each request to the next frontend that takes the connection.
#[derive(Clone)]
struct Balancer {
    urls: Vec<String>,
    client: reqwest::Client,
    next: Arc<AtomicU64>,
    /// Frontends taken out of rotation (a bit each), as before an orchestrator stops one.
    out: Arc<AtomicU64>,
}

impl Balancer {
    fn new(cluster: &ComposeCluster) -> Balancer {
        use base64::Engine as _;
        let mut headers = reqwest::header::HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN}:{ADMIN_TOKEN}"));
        headers.insert(reqwest::header::AUTHORIZATION, format!("Basic {basic}").parse().expect("header"));
        let client = cluster
            .client()
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let urls = cluster.frontends.iter().map(|a| cluster.url(a)).collect();
        Balancer { urls, client, next: Arc::default(), out: Arc::default() }
    }

    /// Takes frontend `i` out of rotation (`false`) or puts it back (`true`).
    fn rotate(&self, i: usize, serving: bool) {
        if serving {
            self.out.fetch_and(!(1 << i), Ordering::SeqCst);
        } else {
            self.out.fetch_or(1 << i, Ordering::SeqCst);
        }
    }

    /// Sends `path` (starting with `/`) to a frontend; a refused connection moves on to the
    /// next one, for up to 30 s (both may be refusing for a moment during a rolling restart).
    async fn send(
        &self,
        path: &str,
        build: impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        let started = Instant::now();
        loop {
            let mut i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.urls.len();
            if self.out.load(Ordering::SeqCst) & (1 << i) != 0 {
                i = (i + 1) % self.urls.len();
            }
            match build(&self.client, format!("{}{path}", self.urls[i])).send().await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_connect() && started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(format!("{path} via {}: {e:?}", self.urls[i])),
            }
        }
    }

    /// Pushes one blob as docker does (POST, PATCH, PUT), each request through whichever
    /// frontend the balancer picks.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String, String> {
        let d = digest(data);
        let r = self.send(&format!("/v2/{repo}/blobs/uploads/"), |c, u| c.post(u)).await?;
        let loc = location(&expect(r, 202, "POST").await?)?;
        let body = data.to_vec();
        let r = self
            .send(&loc, |c, u| c.patch(u).header("content-type", "application/octet-stream").body(body.clone()))
            .await?;
        let loc = location(&expect(r, 202, "PATCH").await?)?;
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self.send(&format!("{loc}{sep}digest={d}"), |c, u| c.put(u)).await?;
        expect(r, 201, "PUT").await?;
        Ok(d)
    }

    /// Pushes a small image (a config and two layers) and tags it; returns its manifest digest.
    async fn push_image(&self, repo: &str, tag: &str, seed: u64) -> Result<String, String> {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
        let cd = self.push_blob(repo, &config).await?;
        let mut layers = vec![];
        for (i, n) in [40_000usize, 300_000].iter().enumerate() {
            layers.push((self.push_blob(repo, &bytes(seed * 10 + i as u64, *n)).await?, *n));
        }
        let refs: Vec<(&str, usize)> = layers.iter().map(|(d, n)| (d.as_str(), *n)).collect();
        let m = image_manifest((&cd, config.len()), &refs, "");
        let r = self
            .send(&format!("/v2/{repo}/manifests/{tag}"), |c, u| {
                c.put(u).header("content-type", "application/vnd.oci.image.manifest.v1+json").body(m.clone())
            })
            .await?;
        expect(r, 201, "manifest PUT").await?;
        Ok(digest(m.as_bytes()))
    }

    /// Pulls an image by tag and checks the manifest's digest and every blob's bytes.
    async fn pull_image(&self, repo: &str, tag: &str, manifest: &str) -> Result<(), String> {
        let r = self
            .send(&format!("/v2/{repo}/manifests/{tag}"), |c, u| {
                c.get(u).header("accept", "application/vnd.oci.image.manifest.v1+json")
            })
            .await?;
        if r.status() != 200 {
            return Err(format!("manifest GET {repo}:{tag}: {} {:?}", r.status(), r.text().await));
        }
        let body = r.bytes().await.map_err(|e| format!("manifest body: {e}"))?;
        if digest(&body) != manifest {
            return Err(format!("{repo}:{tag} names another manifest"));
        }
        let m: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap_or_default().to_string()];
        for l in m["layers"].as_array().into_iter().flatten() {
            blobs.push(l["digest"].as_str().unwrap_or_default().to_string());
        }
        for b in blobs {
            let r = self.send(&format!("/v2/{repo}/blobs/{b}"), |c, u| c.get(u)).await?;
            if r.status() != 200 {
                return Err(format!("blob GET {b}: {}", r.status()));
            }
            let data = r.bytes().await.map_err(|e| format!("blob {b}: {e}"))?;
            if digest(&data) != b {
                return Err(format!("blob {b} came back with other bytes"));
            }
        }
        Ok(())
    }
}

/// The `Location` an upload request answered, as a path.
fn location(r: &reqwest::Response) -> Result<String, String> {
    let l = r.headers().get("location").and_then(|v| v.to_str().ok()).ok_or("no Location")?;
    Ok(match l.find("/v2/") {
        Some(i) if l.starts_with("http") => l[i..].to_string(),
        _ => l.to_string(),
    })
}

/// The response when its status is `code`, else what went wrong.
async fn expect(r: reqwest::Response, code: u16, what: &str) -> Result<reqwest::Response, String> {
    if r.status().as_u16() == code {
        return Ok(r);
    }
    Err(format!("{what}: {} {}", r.status(), r.text().await.unwrap_or_default()))
}

/// Acknowledged images (repo, tag, manifest digest), and the failures of a load loop.
#[derive(Default)]
struct Tally {
    images: Vec<(String, String, String)>,
    pushes: u64,
    pulls: u64,
    failures: Vec<String>,
}

/// Runs `workers` loops until `stop`: each pulls an acknowledged image (by tag, verifying every
/// byte) and, when `push` is set, pushes a new one first.
fn load(
    rt: &tokio::runtime::Runtime,
    lb: &Balancer,
    tally: &Arc<Mutex<Tally>>,
    stop: &Arc<AtomicBool>,
    workers: u64,
    push: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (lb, tally, stop) = (lb.clone(), tally.clone(), stop.clone());
            rt.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if push {
                        let (repo, tag) = (format!("admin/load{w}"), format!("t{n}"));
                        match lb.push_image(&repo, &tag, 1_000_000 + w * 100_000 + n).await {
                            Ok(m) => {
                                let mut t = tally.lock().unwrap();
                                t.pushes += 1;
                                t.images.push((repo, tag, m));
                            }
                            Err(e) => tally.lock().unwrap().failures.push(format!("push: {e}")),
                        }
                    }
                    let pick = {
                        let t = tally.lock().unwrap();
                        t.images[(n as usize * 7 + w as usize) % t.images.len()].clone()
                    };
                    match lb.pull_image(&pick.0, &pick.1, &pick.2).await {
                        Ok(()) => tally.lock().unwrap().pulls += 1,
                        Err(e) => tally.lock().unwrap().failures.push(format!("pull: {e}")),
                    }
                }
            })
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Brings the cluster up (with TLS: `deploy/compose/tls.yml` over the base), pushes the seed
/// images through the balancer; prints when the first push succeeded after `docker-compose up`
/// began.
fn seeded(
    name: &str,
    tls: bool,
    rt: &tokio::runtime::Runtime,
    n: u64,
) -> (ComposeCluster, Balancer, Arc<Mutex<Tally>>) {
    let began = Instant::now();
    let cluster = ComposeCluster::up(name, tls);
    let lb = Balancer::new(&cluster);
    let tally = Arc::new(Mutex::new(Tally::default()));
    for i in 0..n {
        let (repo, tag) = ("admin/seed".to_string(), format!("s{i}"));
        let m = rt.block_on(lb.push_image(&repo, &tag, i)).expect("seed push");
        if i == 0 {
            eprintln!(
                "compose: up returned after {:.1} s; first push acknowledged {:.1} s after docker-compose up began",
                cluster.up_took.as_secs_f64(),
                began.elapsed().as_secs_f64()
            );
        }
        tally.lock().unwrap().images.push((repo, tag, m));
    }
    (cluster, lb, tally)
}

fn finish(rt: &tokio::runtime::Runtime, stop: &Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).expect("load worker");
    }
}

#[test]
fn compose_cluster_takes_docker_and_survives_kills_and_a_cut_off_metadata_node() {
    let Some(cli) = DockerCli::available() else { return };
    if !berth_tests::have_tool("docker-compose") {
        return;
    }
    let rt = runtime();
    let (cluster, lb, tally) = seeded("kills", false, &rt, 6);

    // The docker CLI: push through one frontend, pull through the other.
    let [a, b] = cluster.frontends.clone();
    cli.login(&a, ADMIN, ADMIN_TOKEN);
    cli.login(&b, ADMIN, ADMIN_TOKEN);
    let image = run_image_name(&cluster);
    let (up, down) = (format!("{a}/admin/berth:compose"), format!("{b}/admin/berth:compose"));
    let local = cli.run(&["image", "inspect", "--format", "{{.Id}}", &image]).trim().to_string();
    cli.run(&["tag", &image, &up]);
    let pushed = Instant::now();
    cli.run(&["push", &up]);
    eprintln!("compose: docker push of the berth image took {:.1} s", pushed.elapsed().as_secs_f64());
    cli.run(&["rmi", &up]);
    cli.run(&["pull", &down]);
    let pulled = cli.run(&["image", "inspect", "--format", "{{.Id}}", &down]).trim().to_string();
    cli.run(&["rmi", &down]);
    assert_eq!(pulled, local, "the image pulled through the second frontend is the one pushed through the first");

    // A storage node, then the metadata leader, killed under a pull loop.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&rt, &lb, &tally, &stop, 3, false);
    std::thread::sleep(Duration::from_secs(2));
    cluster.docker(&["kill"], STORAGES[1]);
    std::thread::sleep(Duration::from_secs(5));
    let (leader, _) = cluster.wait_for_leader(None, Duration::from_secs(10));
    cluster.docker(&["kill"], leader);
    let (next, took) = cluster.wait_for_leader(Some(leader), Duration::from_secs(30));
    eprintln!("compose: killed {leader} (leader); {next} leads, seen {:.1} s later", took.as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    cluster.docker(&["start"], STORAGES[1]);
    cluster.docker(&["start"], leader);
    cluster.wait_healthy(STORAGES[1], Duration::from_secs(60));
    cluster.wait_healthy(leader, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    finish(&rt, &stop, tasks);
    {
        let t = tally.lock().unwrap();
        eprintln!("compose: {} pulls during the kills, {} failed", t.pulls, t.failures.len());
        assert!(
            t.failures.is_empty(),
            "failed pulls: {:?}\n{}",
            &t.failures[..t.failures.len().min(5)],
            cluster.frontend_errors()
        );
        assert!(t.pulls >= 10, "the pull loop ran: {} pulls", t.pulls);
    }

    // The leader cut off the network: the other two elect another and writes go on; after
    // it is connected again it catches up.
    let (cut, _) = cluster.wait_for_leader(None, Duration::from_secs(10));
    run_docker(&["network", "disconnect", &cluster.network(), &cluster.container(cut)]);
    let cut_at = Instant::now();
    for i in 0..4 {
        let m = rt.block_on(lb.push_image("admin/cut", &format!("c{i}"), 500 + i)).expect("a push with a node cut off");
        if i == 0 {
            eprintln!(
                "compose: first push after cutting {cut} off acknowledged in {:.1} s",
                cut_at.elapsed().as_secs_f64()
            );
        }
        tally.lock().unwrap().images.push(("admin/cut".into(), format!("c{i}"), m));
    }
    run_docker(&["network", "connect", "--alias", cut, &cluster.network(), &cluster.container(cut)]);
    let healed = Instant::now();
    loop {
        let views = cluster.meta_status();
        let applied: Vec<u64> = views.iter().filter_map(|v| v["applied_index"].as_u64()).collect();
        let cut_view = views.iter().find(|v| v["node"].as_str().is_some_and(|n| n.starts_with(cut)));
        let caught_up = cut_view
            .and_then(|v| v["applied_index"].as_u64())
            .is_some_and(|a| applied.len() == 3 && applied.iter().all(|x| *x <= a + 2) && v_leader_known(cut_view));
        if caught_up {
            break;
        }
        assert!(healed.elapsed() < Duration::from_secs(60), "{cut} did not catch up: {views:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("compose: {cut} caught up {:.1} s after it was connected again", healed.elapsed().as_secs_f64());
    cluster.wait_healthy(cut, Duration::from_secs(30));

    // Everything acknowledged pulls whole through both frontends.
    let images = tally.lock().unwrap().images.clone();
    for (repo, tag, m) in &images {
        for _ in FRONTENDS {
            rt.block_on(lb.pull_image(repo, tag, m)).expect("an acknowledged image");
        }
    }
}

fn v_leader_known(v: Option<&serde_json::Value>) -> bool {
    v.is_some_and(|v| v["leader"].as_u64().is_some_and(|l| l > 0))
}

fn run_docker(args: &[&str]) -> String {
    berth_tests::run_tool("docker", args)
}

/// The image the cluster runs (its containers' image).
fn run_image_name(cluster: &ComposeCluster) -> String {
    cluster.docker(&["inspect", "--format", "{{.Config.Image}}"], METAS[0]).trim().to_string()
}

#[test]
fn compose_cluster_rolling_restart_and_graceful_drain_fail_nothing() {
    if DockerCli::available().is_none() || !berth_tests::have_tool("docker-compose") {
        return;
    }
    let rt = runtime();
    // Over TLS, outside and inside.
    let (cluster, lb, tally) = seeded("rolling", true, &rt, 4);
    // Inside, only TLS: a caller on the network without the cluster's certificate is refused,
    // the same caller with it is answered.
    let status = |certs: Option<&std::path::Path>| {
        let mut c = std::process::Command::new("docker");
        c.args(["run", "--rm", "--network", &cluster.network()]);
        if let Some(dir) = certs {
            c.arg("-v").arg(format!("{}:/certs/cluster:ro", dir.display()));
            for (var, file) in [("CA", "ca.crt"), ("CERT", "tls.crt"), ("KEY", "tls.key")] {
                c.args(["-e", &format!("BERTH_CLUSTER_{var}=/certs/cluster/{file}")]);
            }
        }
        c.args([&run_image_name(&cluster), "admin", "cluster", "--meta", "meta1:7000", "status", "--meta-only"]);
        // One view per node asked: its state, or why it did not answer.
        let out = c.output().expect("docker run");
        assert!(out.status.success(), "berth admin cluster status: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        v["meta"][0].clone()
    };
    let cluster_certs = cluster.ca().expect("TLS").with_file_name("cluster");
    // With the certificate first: the node is up and answering, so the plaintext call that
    // follows is refused for what it is, not for want of a listener.
    let mutual = status(Some(&cluster_certs));
    assert!(mutual["state"].is_string(), "with the certificate: {mutual}");
    let plain = status(None);
    assert!(plain["error"].is_string() && plain["state"].is_null(), "a plaintext call was answered: {plain}");
    let why = plain["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(!why.contains("connection refused") && !why.contains("dns"), "the plaintext call reached nothing: {plain}");
    // A renewal (certs.sh again) is served by both frontends within seconds, without a restart.
    let before: Vec<String> = cluster.frontends.iter().map(|f| cluster.served_serial(f)).collect();
    assert!(before.iter().all(|s| s.starts_with("serial=")), "{before:?}");
    cluster.renew_certs();
    let renewing = Instant::now();
    for (f, old) in cluster.frontends.iter().zip(&before) {
        while cluster.served_serial(f) == *old {
            assert!(renewing.elapsed() < Duration::from_secs(15), "{f} still serves {old}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!(
        "compose: a renewed certificate was served by both frontends {:.1} s after certs.sh",
        renewing.elapsed().as_secs_f64()
    );

    // Every container restarted in turn (SIGTERM, then start), each healthy again before the
    // next, under a loop of pushes and pulls.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&rt, &lb, &tally, &stop, 2, true);
    let rolling = Instant::now();
    for service in METAS.iter().chain(STORAGES.iter()).chain(FRONTENDS.iter()) {
        // A frontend leaves the balancer's rotation before it is stopped and returns once it
        // is ready; the requests it is serving when stopped finish (graceful drain).
        let frontend = FRONTENDS.iter().position(|f| f == service);
        if let Some(i) = frontend {
            lb.rotate(i, false);
        }
        cluster.docker(&["restart", "-t", "30"], service);
        cluster.wait_healthy(service, Duration::from_secs(90));
        if let Some(i) = frontend {
            cluster.wait_ready(&cluster.frontends[i], Duration::from_secs(30));
            lb.rotate(i, true);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    finish(&rt, &stop, tasks);
    {
        let t = tally.lock().unwrap();
        eprintln!(
            "compose: rolling restart of 8 containers in {:.0} s: {} pushes, {} pulls, {} failed",
            rolling.elapsed().as_secs_f64(),
            t.pushes,
            t.pulls,
            t.failures.len()
        );
        assert!(
            t.failures.is_empty(),
            "failed operations: {:?}\n{}",
            &t.failures[..t.failures.len().min(5)],
            cluster.frontend_errors()
        );
        assert!(t.pushes >= 5 && t.pulls >= 5, "the loop ran");
    }

    // docker stop of a frontend lets the upload it is receiving finish: a PATCH trickling
    // 4 MiB over about 4 s, stopped after 1 s, is answered 202, and the upload completes
    // through the other frontend.
    let [a, b] = cluster.frontends.clone().map(|f| cluster.url(&f));
    let data = bytes(77, 4 << 20);
    let d = digest(&data);
    let direct = cluster.client().pool_max_idle_per_host(0).build().expect("client");
    let auth = |r: reqwest::RequestBuilder| r.basic_auth(ADMIN, Some(ADMIN_TOKEN));
    let r = rt.block_on(auth(direct.post(format!("{a}/v2/admin/drain/blobs/uploads/"))).send()).expect("POST");
    assert_eq!(r.status(), 202);
    let loc = location(&r).expect("Location");
    let chunks: Vec<bytes::Bytes> = data.chunks(128 << 10).map(bytes::Bytes::copy_from_slice).collect();
    let body = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(125)).await;
        Ok::<_, std::io::Error>(c)
    });
    let patch = rt.spawn(
        auth(direct.patch(format!("{a}{loc}")))
            .header("content-type", "application/octet-stream")
            .header("content-length", data.len())
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let stopping = Instant::now();
    cluster.docker(&["stop", "-t", "30"], FRONTENDS[0]);
    let stop_took = stopping.elapsed();
    let r = rt.block_on(patch).expect("task").expect("the PATCH in flight is answered");
    assert_eq!(r.status(), 202, "the PATCH in flight finished: {:?}", rt.block_on(r.text()));
    let loc = location(&r).expect("Location");
    let code = cluster.docker(&["inspect", "--format", "{{.State.ExitCode}}"], FRONTENDS[0]);
    assert_eq!(code.trim(), "0", "the frontend exits 0 after draining");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = rt.block_on(auth(direct.put(format!("{b}{loc}{sep}digest={d}"))).send()).expect("PUT");
    assert_eq!(r.status(), 201, "finished through the other frontend");
    eprintln!(
        "compose: docker stop of a frontend took {:.1} s, the upload it was receiving finished",
        stop_took.as_secs_f64()
    );
    cluster.docker(&["start"], FRONTENDS[0]);
    cluster.wait_ready(&cluster.frontends[0], Duration::from_secs(60));
    let r = rt.block_on(auth(direct.get(format!("{a}/v2/admin/drain/blobs/{d}"))).send()).expect("GET");
    assert_eq!(r.status(), 200);
    assert_eq!(digest(&rt.block_on(r.bytes()).expect("body")), d);
}
