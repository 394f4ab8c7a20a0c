//! Harness of Berth's cross-process tests: starts the real `berth` binary on loopback with
//! its own data directory, and offers small helpers to build and push content over HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

pub mod cluster;
pub mod compose;
pub mod linearizability;
pub mod meta_group;
pub mod netns;
pub mod pki;
pub mod soak;

/// The `berth` binary built beside the test executables (or `$BERTH_BIN`).
pub fn berth_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BERTH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/berth
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile directory");
    let bin = profile_dir.join("berth");
    assert!(bin.exists(), "{} is missing: build the workspace first (cargo test --workspace builds it)", bin.display());
    bin
}

/// Whether this run is CI's, where every external client must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether a command-line tool is installed; in CI its absence fails the test.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(!in_ci(), "{tool} is required in CI (.ci/run installs it)");
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// Starts `berth ARGS...` and reads the address it serves on from the first line it prints
/// (`... http://ADDR ...`, `https://` or `grpc://`); the rest of its output is drained.
pub fn spawn_berth<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Child, String) {
    spawn_berth_via(&[], args)
}

/// [`spawn_berth`] through a command prefix such as `ip netns exec NS` (which execs berth, so
/// the child is berth itself).
pub fn spawn_berth_via<S: AsRef<std::ffi::OsStr>>(prefix: &[String], args: &[S]) -> (Child, String) {
    spawn_berth_with(prefix, args, &Launch::default())
}

/// What else a started `berth` gets.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Environment variables besides the test process's own.
    pub env: Vec<(String, String)>,
    /// A file its stderr (its log) goes to, instead of the test's.
    pub stderr: Option<PathBuf>,
}

/// [`spawn_berth_via`], with `launch`'s environment and log file.
pub fn spawn_berth_with<S: AsRef<std::ffi::OsStr>>(prefix: &[String], args: &[S], launch: &Launch) -> (Child, String) {
    let (child, url) = spawn_berth_serving(prefix, args, launch);
    let addr = url.split_once("://").map(|(_, addr)| addr.to_string()).expect("a URL");
    (child, addr)
}

/// [`spawn_berth_with`], returning the URL berth says it serves (`http://ADDR`, `https://`
/// or `grpc://`).
pub fn spawn_berth_serving<S: AsRef<std::ffi::OsStr>>(
    prefix: &[String],
    args: &[S],
    launch: &Launch,
) -> (Child, String) {
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(berth_bin());
            c
        }
        None => Command::new(berth_bin()),
    };
    command
        .args(args)
        .env("BERTH_LOG", std::env::var("BERTH_LOG").unwrap_or_else(|_| "warn".into()))
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped());
    if let Some(path) = &launch.stderr {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("opening the log file");
        command.stderr(log);
    }
    let mut child = command.spawn().expect("starting berth");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next().expect("berth printed nothing").expect("reading berth's stdout");
    let url = line
        .split_whitespace()
        .find(|w| ["http://", "https://", "grpc://"].iter().any(|p| w.starts_with(p)))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

/// The site administrator every test server is bootstrapped with.
pub const ADMIN: &str = "admin";
/// Its token.
pub const ADMIN_TOKEN: &str = "berth-test-admin-token";

/// A running `berth standalone`.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` when it serves TLS), as berth printed it.
    pub url: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh data directory.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// Starts a server on a fresh data directory with extra flags.
    pub fn start_with(extra: &[&str]) -> Server {
        Self::start_fresh(extra, &Launch::default())
    }

    /// Starts a server on a fresh data directory as `launch` says.
    pub fn start_launched(launch: &Launch) -> Server {
        Self::start_fresh(&[], launch)
    }

    fn start_fresh(extra: &[&str], launch: &Launch) -> Server {
        let tmp = tempfile::Builder::new().prefix("berth-test-").tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in_with(&dir, "127.0.0.1:0", extra, launch);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `dir` (kept after the server stops) listening on `listen`.
    pub fn start_in(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        Self::start_in_with(dir, listen, extra, &Launch::default())
    }

    fn start_in_with(dir: &Path, listen: &str, extra: &[&str], launch: &Launch) -> Server {
        let mut args: Vec<std::ffi::OsString> = vec!["standalone".into(), "--listen".into(), listen.into()];
        args.extend(["--data-dir".into(), dir.as_os_str().to_owned(), "--bootstrap-admin".into()]);
        args.push(format!("{ADMIN}:{ADMIN_TOKEN}").into());
        args.extend(extra.iter().map(|a| a.into()));
        let (child, url) = spawn_berth_serving(&[], &args, launch);
        let addr = url.split_once("://").map(|(_, addr)| addr.to_string()).expect("a URL");
        Server { child, url, addr, data_dir: dir.to_path_buf(), _tmp: None }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL, like a power cut of the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks it to stop with SIGTERM and waits; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        terminate(&mut self.child)
    }

    /// Peak resident set size so far, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// An HTTP client for the API acting as the site administrator (Basic auth on every request;
/// no redirects: `Location` headers are checked by hand).
pub fn client() -> reqwest::Client {
    client_with(Some((ADMIN, ADMIN_TOKEN)))
}

/// An HTTP client sending these Basic credentials (or none).
pub fn client_with(creds: Option<(&str, &str)>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some((u, t)) = creds {
        use base64::Engine as _;
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{t}"));
        headers.insert(reqwest::header::AUTHORIZATION, format!("Basic {v}").parse().expect("header"));
    }
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// Pushes a blob monolithically (`POST ?digest=`); returns its digest.
pub async fn push_blob(c: &reqwest::Client, url: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    let r = c
        .post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("push blob");
    assert_eq!(r.status(), 201, "pushing blob {d}: {:?}", r.text().await);
    d
}

/// An OCI image manifest over a config and layers (as `(digest, size)`), with extras
/// spliced in as raw JSON members.
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)], extra: &str) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|(d, s)| {
            format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{s}}}"#)
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]{extra}}}"#,
        config.0,
        config.1,
        layers.join(",")
    )
}

/// The JSON a request answers (panics on a failed request or a body that is not JSON).
pub async fn json_of(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.expect("request").json().await.expect("a JSON body")
}

/// An OCI image manifest of `repo` by tag or digest, as JSON.
pub async fn manifest_json(c: &reqwest::Client, url: &str, repo: &str, reference: &str) -> serde_json::Value {
    json_of(
        c.get(format!("{url}/v2/{repo}/manifests/{reference}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json"),
    )
    .await
}

/// `PUT /v2/<repo>/manifests/<reference>` of an OCI image manifest.
pub async fn put_manifest(
    c: &reqwest::Client,
    url: &str,
    repo: &str,
    reference: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    c.put(format!("{url}/v2/{repo}/manifests/{reference}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(body)
        .send()
        .await
        .expect("push manifest")
}

/// Pushes a small image (config + layers of the given sizes) and tags it; returns the
/// manifest's digest.
pub async fn push_image(
    c: &reqwest::Client,
    url: &str,
    repo: &str,
    tag: &str,
    seed: u64,
    layer_sizes: &[usize],
) -> String {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let cd = push_blob(c, url, repo, &config).await;
    let mut layers = vec![];
    for (i, n) in layer_sizes.iter().enumerate() {
        let data = bytes(seed * 1000 + i as u64, *n);
        layers.push((push_blob(c, url, repo, &data).await, *n));
    }
    let refs: Vec<(&str, usize)> = layers.iter().map(|(d, n)| (d.as_str(), *n)).collect();
    let m = image_manifest((&cd, config.len()), &refs, "");
    let r = put_manifest(c, url, repo, tag, m.clone()).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    digest(m.as_bytes())
}

/// `berth admin gc` (with `--dry-run` when `dry_run`) against the registry at `url` as the
/// test administrator: its JSON report. Blocks while the command runs.
pub fn admin_gc(url: &str, dry_run: bool) -> serde_json::Value {
    let mut args = vec!["admin", "--url", url, "--token", ADMIN_TOKEN, "gc"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = Command::new(berth_bin()).args(&args).output().expect("running berth admin gc");
    assert!(out.status.success(), "berth admin gc: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// Runs a command-line tool; its stdout, or a panic with its output.
pub fn run_tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The docker CLI with a private config directory, so that its logins stay with one test.
pub struct DockerCli {
    config: tempfile::TempDir,
}

impl DockerCli {
    /// The CLI, when docker and a running engine are here; in CI their absence fails the test.
    pub fn available() -> Option<DockerCli> {
        if !have_tool("docker") {
            return None;
        }
        if !Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success()) {
            assert!(!in_ci(), "the docker engine must be running in CI");
            eprintln!("SKIPPED: no docker engine");
            return None;
        }
        Some(DockerCli { config: tempfile::tempdir().expect("docker config dir") })
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["--config", self.config.path().to_str().expect("utf-8 temp path")];
        full.extend_from_slice(args);
        full
    }

    /// `docker ARGS...`; its stdout, or a panic.
    pub fn run(&self, args: &[&str]) -> String {
        run_tool("docker", &self.args(args))
    }

    /// Whether `docker ARGS...` fails.
    pub fn fails(&self, args: &[&str]) -> bool {
        !Command::new("docker").args(self.args(args)).output().expect("running docker").status.success()
    }

    /// `docker login ADDR -u USER --password-stdin`, with `token` on stdin.
    pub fn login(&self, addr: &str, user: &str, token: &str) {
        use std::io::Write;
        let mut child = Command::new("docker")
            .args(self.args(&["login", addr, "-u", user, "--password-stdin"]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker login");
        child.stdin.take().expect("stdin").write_all(token.as_bytes()).expect("writing the token");
        let out = child.wait_with_output().expect("docker login");
        assert!(out.status.success(), "docker login {addr} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Stops `child` with SIGTERM, as a rolling restart or an upgrade does, and waits 30 s at most
/// for it to exit (then SIGKILLs it); returns whether it exited cleanly.
pub fn terminate(child: &mut std::process::Child) -> bool {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    for _ in 0..300 {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    child.wait().ok();
    false
}
