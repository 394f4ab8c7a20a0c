//! TLS: a frontend serving HTTPS with a certificate of a private authority, used by docker,
//! skopeo, `berth admin` and a plain HTTPS client that trust that authority, and renewed
//! without a restart; and a cluster whose roles talk gRPC over mutual TLS and refuse callers
//! without a certificate of their authority.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::cluster::{wait_for_storage_at, RoleProcess};
use berth_tests::meta_group::cluster_cli;
use berth_tests::pki::{Ca, Issued};
use berth_tests::{
    berth_bin, client, digest, have_tool, in_ci, push_image, run_tool, DockerCli, Server, ADMIN, ADMIN_TOKEN,
};

/// An address of an interface made for the test, removed when dropped. The engine treats
/// 127.0.0.0/8 as an insecure registry and skips verifying certificates there; at another
/// address it verifies them against `/etc/docker/certs.d/ADDR/ca.crt`.
struct DummyAddress {
    link: String,
    ip: String,
}

impl DummyAddress {
    fn add() -> Option<DummyAddress> {
        let n = std::process::id() % 250 + 1;
        let (link, ip) = (format!("berthtls{n}"), format!("10.213.{n}.1"));
        let ip_cmd = |args: &[&str]| Command::new("ip").args(args).output().is_ok_and(|o| o.status.success());
        ip_cmd(&["link", "del", &link]);
        // A veth pair (the dummy driver may be missing): the address sits on one end, and
        // traffic to it stays on this host.
        let peer = format!("{link}p");
        let made = ip_cmd(&["link", "add", &link, "type", "veth", "peer", "name", &peer])
            && ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", &link])
            && ip_cmd(&["link", "set", &link, "up"])
            && ip_cmd(&["link", "set", &peer, "up"]);
        if !made {
            ip_cmd(&["link", "del", &link]);
            assert!(!in_ci(), "CI runs as root and can make an interface");
            eprintln!("SKIPPED: cannot make an interface (not root?)");
            return None;
        }
        Some(DummyAddress { link, ip })
    }
}

impl Drop for DummyAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.link]).output();
    }
}

/// The engine's trust for one registry address, removed when dropped.
struct EngineTrust(PathBuf);

impl EngineTrust {
    fn add(addr: &str, ca: &Path) -> EngineTrust {
        let dir = PathBuf::from("/etc/docker/certs.d").join(addr);
        std::fs::create_dir_all(&dir).expect("/etc/docker/certs.d");
        std::fs::copy(ca, dir.join("ca.crt")).expect("ca.crt");
        EngineTrust(dir)
    }
}

impl Drop for EngineTrust {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTPS client that trusts only the certificates in `ca`, on fresh connections.
fn trusting(ca: &Path) -> reqwest::Client {
    berth_tests::pki::trusting_only(ca).pool_max_idle_per_host(0).build().unwrap()
}

/// Whether `GET URL/v2/` as the administrator answers 200 to a client trusting `ca`.
async fn answers(url: &str, ca: &Path) -> bool {
    let r = trusting(ca).get(format!("{url}/v2/")).basic_auth(ADMIN, Some(ADMIN_TOKEN)).send().await;
    r.is_ok_and(|r| r.status() == 200)
}

/// Replaces a certificate and key in place, as a renewal does (each file swapped whole).
fn install(issued: &Issued, at: &Issued) {
    for (from, to) in [(&issued.key, &at.key), (&issued.cert, &at.cert)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_skopeo_and_admin_use_https_with_a_private_ca_and_renewals_need_no_restart() {
    let Some(docker) = DockerCli::available() else { return };
    if !have_tool("skopeo") || !have_tool("openssl") {
        return;
    }
    let Some(dummy) = DummyAddress::add() else { return };
    let work = tempfile::tempdir().unwrap();
    let ca = Ca::new(work.path(), "registry-ca");
    let sans = [format!("IP:{}", dummy.ip), "IP:127.0.0.1".to_string(), "DNS:localhost".to_string()];
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let first = ca.issue("registry", &sans);
    // The files the server reads, replaced in place later.
    let served = Issued { cert: work.path().join("tls.pem"), key: work.path().join("tls-key.pem") };
    std::fs::copy(&first.cert, &served.cert).unwrap();
    std::fs::copy(&first.key, &served.key).unwrap();
    let data = work.path().join("data");
    let server = tokio::task::block_in_place(|| {
        Server::start_in(
            &data,
            &format!("{}:0", dummy.ip),
            &["--tls-cert", served.cert.to_str().unwrap(), "--tls-key", served.key.to_str().unwrap()],
        )
    });
    let addr = server.addr.clone();
    let url = server.url.clone();
    assert!(url.starts_with("https://"), "berth says it serves {url}");

    // A client trusting the authority gets in; one that does not, or speaks plain HTTP, does not.
    assert!(answers(&url, &ca.cert).await);
    let stranger = Ca::new(work.path(), "other-ca");
    assert!(!answers(&url, &stranger.cert).await, "a certificate of another authority is not trusted");
    let plain = reqwest::Client::new().get(format!("http://{addr}/v2/")).send().await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200), "plain HTTP is not served");
    // The token realm is HTTPS too.
    let r = trusting(&ca.cert).get(format!("{url}/v2/")).send().await.unwrap();
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.contains(&format!("realm=\"https://{addr}/token\"")), "{challenge}");

    // berth admin with --ca.
    let admin = |ca: &Path| {
        let mut c = Command::new(berth_bin());
        c.args(["admin", "--url", &url, "--token", ADMIN_TOKEN, "--ca", ca.to_str().unwrap(), "user", "list"]);
        c.output().unwrap()
    };
    let listed = admin(&ca.cert);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains(ADMIN));
    assert!(!admin(&stranger.cert).status.success());

    // docker, trusting the authority through the engine's certs.d.
    let _trust = EngineTrust::add(&addr, &ca.cert);
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join("hello.txt"), "hello over https\n").unwrap();
    std::fs::write(rootfs.join("random.bin"), berth_tests::bytes(11, 300_000)).unwrap();
    let tar = work.path().join("rootfs.tar");
    run_tool("tar", &["-C", rootfs.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    let image = format!("{addr}/acme/tls:v1");
    tokio::task::block_in_place(|| {
        docker.login(&addr, ADMIN, ADMIN_TOKEN);
        docker.run(&["import", tar.to_str().unwrap(), &image]);
        let id = docker.run(&["image", "inspect", "--format", "{{.Id}}", &image]);
        docker.run(&["push", &image]);
        docker.run(&["rmi", &image]);
        docker.run(&["pull", &image]);
        assert_eq!(docker.run(&["image", "inspect", "--format", "{{.Id}}", &image]), id);
        docker.run(&["rmi", &image]);
    });

    // skopeo, trusting it through a certificate directory; without it, it refuses.
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&ca.cert, certs.join("ca.crt")).unwrap();
    let certs = certs.to_str().unwrap();
    let creds = format!("{ADMIN}:{ADMIN_TOKEN}");
    let layout = work.path().join("layout");
    let layout = format!("oci:{}:v1", layout.display());
    tokio::task::block_in_place(|| {
        run_tool(
            "skopeo",
            &["copy", "--src-cert-dir", certs, "--src-creds", &creds, &format!("docker://{image}"), &layout],
        );
        let copy = format!("docker://{addr}/acme/tls-copy:v1");
        run_tool("skopeo", &["copy", "--dest-cert-dir", certs, "--dest-creds", &creds, &layout, &copy]);
        let remote = run_tool("skopeo", &["inspect", "--raw", "--cert-dir", certs, "--creds", &creds, &copy]);
        let local = run_tool("skopeo", &["inspect", "--raw", &layout]);
        assert_eq!(remote, local, "the copy's manifest, byte for byte");
        // An empty certificate directory (skopeo would otherwise also find the engine's).
        let none = work.path().join("no-certs");
        std::fs::create_dir_all(&none).unwrap();
        let refused = Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir", none.to_str().unwrap(), "--creds", &creds, &copy])
            .output()
            .unwrap();
        assert!(!refused.status.success(), "skopeo without the authority refuses the certificate");
        let why = String::from_utf8_lossy(&refused.stderr);
        assert!(why.contains("certificate"), "{why}");
    });

    // A renewal by another authority, written over the files: served within seconds, by the
    // same process, to new connections.
    let renewed = stranger.issue("registry-renewed", &sans);
    let pid = server.pid();
    let swapped = Instant::now();
    install(&renewed, &served);
    while !answers(&url, &stranger.cert).await {
        assert!(swapped.elapsed() < Duration::from_secs(15), "the renewed certificate is not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("renewed certificate served {:?} after the files changed", swapped.elapsed());
    assert!(!answers(&url, &ca.cert).await, "the old certificate is no longer served");
    assert_eq!(server.pid(), pid);
    // A broken renewal (a key of another certificate) is not taken: the last good one stays.
    let mismatched = Issued { cert: first.cert.clone(), key: renewed.key.clone() };
    install(&mismatched, &served);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(answers(&url, &stranger.cert).await, "a key that does not match its certificate is not taken");
    // And the next good renewal is, so the files were still being watched.
    install(&first, &served);
    let swapped = Instant::now();
    while !answers(&url, &ca.cert).await {
        assert!(swapped.elapsed() < Duration::from_secs(15), "a good renewal after a broken one is not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `berth admin cluster --meta NODES status --meta-only` with the given TLS flags
/// reaches every node (it reports the ones it cannot reach, and succeeds).
fn status_reaches_all(nodes: &str, tls: &[String]) -> bool {
    let args: Vec<&str> = tls.iter().map(String::as_str).chain(["status", "--meta-only"]).collect();
    let Ok(out) = cluster_cli(nodes, &args) else { return false };
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let nodes = report["meta"].as_array().cloned().unwrap_or_default();
    !nodes.is_empty() && nodes.iter().all(|n| n["error"].is_null() && !n["state"].is_null())
}

/// The mutual TLS flags trusting the authority certificate `ca` and presenting `node`.
fn flags_of(ca: &Path, node: &Issued) -> Vec<String> {
    [("--cluster-ca", ca), ("--cluster-cert", &node.cert), ("--cluster-key", &node.key)]
        .into_iter()
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_talk_over_mutual_tls_and_refuse_callers_without_a_certificate_of_their_ca() {
    if !have_tool("openssl") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let ca = Ca::new(work.path(), "cluster-ca");
    let sans = ["IP:127.0.0.1", "DNS:localhost"];
    let (meta_cert, storage_cert, frontend_cert) =
        (ca.issue("meta", &sans), ca.issue("storage", &sans), ca.issue("frontend", &sans));
    let d = |name: &str| work.path().join(name).display().to_string();
    let start = |args: Vec<String>, cert: &Issued| {
        let mut args = args;
        args.extend(flags_of(&ca.cert, cert));
        tokio::task::block_in_place(|| RoleProcess::start(&args))
    };
    let meta: Vec<RoleProcess> = (1..=3)
        .map(|id| {
            let args =
                ["meta", "--id", &id.to_string(), "--listen", "127.0.0.1:0", "--data-dir", &d(&format!("m{id}"))];
            start(args.map(String::from).to_vec(), &meta_cert)
        })
        .collect();
    let members: Vec<String> = meta.iter().enumerate().map(|(i, m)| format!("{}={}", i + 1, m.addr)).collect();
    let admin_tls = flags_of(&ca.cert, &frontend_cert);
    let admin_args: Vec<&str> = admin_tls.iter().map(String::as_str).collect();
    let init: Vec<&str> = admin_args.iter().copied().chain(["init"]).collect();
    if let Err(e) = cluster_cli(&members.join(","), &init) {
        panic!("init over mutual TLS: {e}");
    }
    let addrs = meta.iter().map(|m| m.addr.clone()).collect::<Vec<_>>().join(",");
    let storage: Vec<RoleProcess> = (0..3)
        .map(|i| {
            let args = ["storage", "--listen", "127.0.0.1:0", "--meta", &addrs, "--data-dir", &d(&format!("s{i}"))];
            start(args.map(String::from).to_vec(), &storage_cert)
        })
        .collect();
    // Storage nodes register over TLS; wait for all three.
    wait_for_storage_at(&addrs, &admin_args, 3);
    let args = [
        "frontend",
        "--listen",
        "127.0.0.1:0",
        "--meta",
        &addrs,
        "--bootstrap-admin",
        &format!("{ADMIN}:{ADMIN_TOKEN}"),
    ];
    let frontend = start(args.map(String::from).to_vec(), &frontend_cert);

    // A push and a pull through the frontend: metadata writes, Raft replication and three
    // copies per blob, all over mutual TLS.
    let url = frontend.url();
    let c = client();
    push_image(&c, &url, "acme/mtls", "v1", 5, &[200_000, 3_000]).await;
    let layer = berth_tests::bytes(77, 500_000);
    let layer_digest = berth_tests::push_blob(&c, &url, "acme/mtls", &layer).await;
    let got = c.get(format!("{url}/v2/acme/mtls/blobs/{layer_digest}")).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(digest(&got.bytes().await.unwrap()), layer_digest);

    // Callers without a certificate of the authority get nowhere: plaintext, or another
    // authority's certificate; the cluster's own is let in.
    let stranger_ca = Ca::new(work.path(), "stranger-ca");
    let stranger = stranger_ca.issue("stranger", &sans);
    assert!(!status_reaches_all(&addrs, &[]), "a plaintext caller is refused");
    assert!(!status_reaches_all(&addrs, &flags_of(&stranger_ca.cert, &stranger)), "a stranger is refused");
    // One who trusts the cluster's authority but presents a stranger's certificate, too.
    let half = flags_of(&ca.cert, &stranger);
    assert!(!status_reaches_all(&addrs, &half), "a client certificate of another authority is refused");
    assert!(status_reaches_all(&addrs, &admin_tls), "the cluster's own certificate is let in");
    // A storage node refuses a plaintext caller as well (this process has no TLS set up).
    let node = berth_storage::client::StorageClient::new(
        &storage[0].addr,
        berth_storage::client::StorageClientConfig::default(),
    )
    .unwrap();
    let d: berth_core::Digest = layer_digest.parse().unwrap();
    assert!(berth_core::BlobStore::stat(&node, &d).await.is_err(), "a plaintext call to a storage node is refused");
}
