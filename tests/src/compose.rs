//! The compose cluster of `deploy/compose/` on the Docker engine, for tests: the image built
//! with `deploy/image.sh` under a name of the test's own, the cluster brought up under a
//! project name of its own with its frontends on free loopback ports, and everything (containers,
//! network, volumes, image) removed when the handle drops.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{berth_bin, run_tool, ADMIN_TOKEN};

/// The containers of the cluster, by service name.
pub const METAS: [&str; 3] = ["meta1", "meta2", "meta3"];
/// The storage services.
pub const STORAGES: [&str; 3] = ["storage1", "storage2", "storage3"];
/// The frontend services.
pub const FRONTENDS: [&str; 2] = ["frontend1", "frontend2"];

/// A compose cluster brought up for one test.
pub struct ComposeCluster {
    project: String,
    image: String,
    /// The compose files, the base first.
    files: Vec<PathBuf>,
    /// With TLS (`deploy/compose/tls.yml`): the directory `deploy/compose/certs.sh` wrote.
    certs: Option<tempfile::TempDir>,
    /// The frontends' published addresses (`127.0.0.1:PORT`), as `FRONTENDS` orders them.
    pub frontends: [String; 2],
    /// How long `docker-compose up` took to return, and until the first push succeeded
    /// (filled by the test that pushes).
    pub up_took: Duration,
}

/// Two free loopback ports (bound together, so not the same one twice).
fn free_ports() -> [u16; 2] {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    [a.local_addr().expect("addr").port(), b.local_addr().expect("addr").port()]
}

/// Runs `deploy/compose/certs.sh DIR`: makes the certificates, or renews them.
fn make_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/certs.sh");
    let out = Command::new("bash").arg(script).arg(dir).output().expect("running deploy/compose/certs.sh");
    assert!(out.status.success(), "deploy/compose/certs.sh: {}", String::from_utf8_lossy(&out.stderr));
}

impl ComposeCluster {
    /// Builds the image and brings the cluster up (`docker-compose up -d`); returns once both
    /// frontends answer `/readyz` with 200. With `tls`, `deploy/compose/tls.yml` is laid over
    /// the base: certificates from `deploy/compose/certs.sh`, HTTPS on the frontends, mutual
    /// TLS between the roles.
    pub fn up(name: &str, tls: bool) -> ComposeCluster {
        let project = format!("berthtest{}{}", name, std::process::id());
        let image = format!("berth-test-compose:{project}");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new("bash")
            .arg(repo.join("deploy/image.sh"))
            .arg(&image)
            .env("BERTH_BIN", berth_bin())
            .output()
            .expect("running deploy/image.sh");
        assert!(out.status.success(), "deploy/image.sh: {}", String::from_utf8_lossy(&out.stderr));
        let ports = free_ports();
        let mut files = vec![repo.join("deploy/compose/docker-compose.yml")];
        let certs = tls.then(|| {
            files.push(repo.join("deploy/compose/tls.yml"));
            let dir = tempfile::tempdir().expect("certificates directory");
            make_certs(dir.path());
            dir
        });
        let mut cluster = ComposeCluster {
            project,
            image,
            files,
            certs,
            frontends: [format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1])],
            up_took: Duration::ZERO,
        };
        let started = Instant::now();
        let out = cluster.compose().args(["up", "-d"]).output().expect("running docker-compose up");
        assert!(
            out.status.success(),
            "docker-compose up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.up_took = started.elapsed();
        for f in cluster.frontends.clone() {
            cluster.wait_ready(&f, Duration::from_secs(60));
        }
        cluster
    }

    /// `docker-compose -f FILE -p PROJECT` with the cluster's environment.
    pub fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        for f in &self.files {
            c.arg("-f").arg(f);
        }
        c.arg("-p").arg(&self.project);
        if let Some(certs) = &self.certs {
            c.env("BERTH_CERTS", certs.path());
        }
        c.env("BERTH_IMAGE", &self.image)
            .env("BERTH_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("BERTH_PORT_1", self.frontends[0].rsplit(':').next().expect("port"))
            .env("BERTH_PORT_2", self.frontends[1].rsplit(':').next().expect("port"))
            .env("BERTH_LOG", "info,openraft=error");
        c
    }

    /// The authority the frontends' HTTPS certificate is signed by, when they serve HTTPS.
    pub fn ca(&self) -> Option<PathBuf> {
        self.certs.as_ref().map(|d| d.path().join("ca.crt"))
    }

    /// Renews the certificates as an operator would (`deploy/compose/certs.sh DIR` again).
    pub fn renew_certs(&self) {
        make_certs(self.certs.as_ref().expect("a cluster with TLS").path());
    }

    /// The serial number of the certificate the frontend at `addr` serves now.
    pub fn served_serial(&self, addr: &str) -> String {
        let mut client = Command::new("openssl")
            .args(["s_client", "-connect", addr, "-servername", "localhost"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let cert = client.stdout.take().expect("stdout");
        let out =
            Command::new("openssl").args(["x509", "-noout", "-serial"]).stdin(cert).output().expect("openssl x509");
        let _ = client.wait();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The base URL of a frontend's published address: `https://` when it serves TLS.
    pub fn url(&self, addr: &str) -> String {
        format!("{}://{addr}", if self.certs.is_some() { "https" } else { "http" })
    }

    /// A client that trusts the frontends' certificate (only the test's authority, when they
    /// serve HTTPS).
    pub fn client(&self) -> reqwest::ClientBuilder {
        match self.ca() {
            Some(ca) => crate::pki::trusting_only(&ca),
            None => reqwest::Client::builder(),
        }
    }

    /// The container of a service (compose names it PROJECT_SERVICE_1).
    pub fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    /// The private network's name.
    pub fn network(&self) -> String {
        format!("{}_berth", self.project)
    }

    /// `docker ARGS...` on a service's container (the service name comes last).
    pub fn docker(&self, args: &[&str], service: &str) -> String {
        let c = self.container(service);
        let mut all: Vec<&str> = args.to_vec();
        all.push(&c);
        run_tool("docker", &all)
    }

    /// Waits until the frontend at `ADDR` answers `/readyz` with 200 (over HTTPS, checking
    /// its certificate, when it serves TLS).
    pub fn wait_ready(&self, addr: &str, limit: Duration) {
        let started = Instant::now();
        loop {
            let mut curl = Command::new("curl");
            curl.args(["-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}"]);
            if let Some(ca) = self.ca() {
                curl.arg("--cacert").arg(ca);
            }
            let code = curl.arg(format!("{}/readyz", self.url(addr))).output();
            if code.is_ok_and(|o| o.stdout == b"200") {
                return;
            }
            assert!(started.elapsed() < limit, "{addr} was not ready within {limit:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The health a container's check reports (`healthy`, `starting`, `unhealthy`).
    pub fn health(&self, service: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.State.Health.Status}}", &self.container(service)])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until a service's health check passes.
    pub fn wait_healthy(&self, service: &str, limit: Duration) {
        let started = Instant::now();
        while self.health(service) != "healthy" {
            assert!(started.elapsed() < limit, "{service} not healthy within {limit:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `berth admin cluster ... status --meta-only`, run inside a metadata container that is
    /// running (the image holds the binary): one view per metadata node.
    pub fn meta_status(&self) -> Vec<Value> {
        for m in METAS {
            let out = Command::new("docker")
                .args([
                    "exec",
                    &self.container(m),
                    "/usr/local/bin/berth",
                    "admin",
                    "cluster",
                    "--meta",
                    "meta1:7000,meta2:7000,meta3:7000",
                    "status",
                    "--meta-only",
                ])
                .output()
                .expect("docker exec");
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
                return v["meta"].as_array().cloned().unwrap_or_default();
            }
        }
        vec![]
    }

    /// The service of the metadata leader, as a majority of the nodes that answer see it.
    pub fn meta_leader(&self) -> Option<&'static str> {
        let views = self.meta_status();
        let mut votes = [0usize; 4];
        for v in &views {
            if let Some(l) = v["leader"].as_u64().filter(|l| (1..=3).contains(l)) {
                votes[l as usize] += 1;
            }
        }
        (1..=3).find(|&i| votes[i] >= 2).map(|i| METAS[i - 1])
    }

    /// Waits for a leader other than `not` (when given); returns it and how long it took.
    pub fn wait_for_leader(&self, not: Option<&str>, limit: Duration) -> (&'static str, Duration) {
        let started = Instant::now();
        loop {
            if let Some(l) = self.meta_leader().filter(|l| Some(*l) != not) {
                return (l, started.elapsed());
            }
            assert!(started.elapsed() < limit, "no metadata leader within {limit:?}: {:?}", self.meta_status());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The lines of the frontends' logs that report failed requests (their causes).
    pub fn frontend_errors(&self) -> String {
        let out = self.compose().args(["logs", "--no-color"]).args(FRONTENDS).output();
        let all = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        all.lines().filter(|l| l.contains("ERROR")).collect::<Vec<_>>().join("\n")
    }

    /// The last lines of every container's log.
    pub fn logs(&self) -> String {
        let out = self.compose().args(["logs", "--no-color", "--tail", "30"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.compose().args(["down", "-v", "-t", "5"]).output();
        let _ = Command::new("docker").args(["rmi", "-f", &self.image]).output();
    }
}
