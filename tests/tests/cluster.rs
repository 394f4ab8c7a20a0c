//! Berth as a cluster of processes (three metadata nodes, a storage node, two frontends): any
//! frontend serves any request, uploads included.

use berth_tests::cluster::Cluster;
use berth_tests::{bytes, client, digest, push_image};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_through_one_frontend_pull_through_the_other() {
    let cl = tokio::task::block_in_place(|| Cluster::start(&[]));
    let (a, b) = (cl.frontends[0].url(), cl.frontends[1].url());
    let c = client();
    let m = push_image(&c, &a, "acme/app", "v1", 1, &[300_000, 2000]).await;
    let r = c.get(format!("{b}/v2/acme/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(digest(&body), m);
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        let r = c.get(format!("{b}/v2/acme/app/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(digest(&r.bytes().await.unwrap()), d);
    }
    // A token from one frontend is good at the other.
    let t: Value = c
        .get(format!("{a}/token?service=berth&scope=repository:acme/app:pull"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .get(format!("{b}/v2/acme/app/tags/list"))
        .bearer_auth(t["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_chunks_alternate_between_frontends() {
    let cl = tokio::task::block_in_place(|| Cluster::start(&[]));
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let c = client();
    let data = bytes(7, 5 * 1024 * 1024 + 11);
    let d = digest(&data);
    let r = c.post(format!("{}/v2/acme/chunks/blobs/uploads/", fronts[0])).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let mut location = r.headers()["location"].to_str().unwrap().to_string();
    let chunk = 1024 * 1024;
    for (i, part) in data.chunks(chunk).enumerate() {
        let first = i * chunk;
        let last = first + part.len() - 1;
        let r = c
            .patch(format!("{}{location}", fronts[i % 2]))
            .header("content-range", format!("{first}-{last}"))
            .header("content-type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "chunk {i}");
        location = r.headers()["location"].to_str().unwrap().to_string();
        // The status is the same whichever frontend is asked.
        let s = c.get(format!("{}{location}", fronts[(i + 1) % 2])).send().await.unwrap();
        assert_eq!(s.status(), 204);
        assert_eq!(s.headers()["range"].to_str().unwrap(), format!("0-{last}"));
    }
    let r = c.put(format!("{}{location}?digest={d}", fronts[1])).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(format!("{}/v2/acme/chunks/blobs/{d}", fronts[0])).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(digest(&r.bytes().await.unwrap()), d);
}

/// Runs a command; its stdout, or a panic with its stderr.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn docker_pushes_through_one_frontend_and_pulls_through_the_other() {
    if !berth_tests::have_tool("docker") {
        return;
    }
    if !std::process::Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success()) {
        assert!(!berth_tests::in_ci(), "the docker engine must be running in CI");
        eprintln!("SKIPPED: no docker engine");
        return;
    }
    let cl = Cluster::start(&[]);
    let (a, b) = (&cl.frontends[0].addr, &cl.frontends[1].addr);
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join("hello.txt"), "hello from a berth cluster\n").unwrap();
    std::fs::write(rootfs.join("random.bin"), bytes(99, 2_000_000)).unwrap();
    let tar = work.path().join("rootfs.tar");
    run("tar", &["-C", rootfs.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    let config = work.path().join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let cfg = config.to_str().unwrap();
    let docker = |args: &[&str]| {
        let mut full = vec!["--config", cfg];
        full.extend_from_slice(args);
        run("docker", &full)
    };
    for addr in [a, b] {
        use std::io::Write;
        let mut child = std::process::Command::new("docker")
            .args(["--config", cfg, "login", addr, "-u", berth_tests::ADMIN, "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(berth_tests::ADMIN_TOKEN.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "docker login {addr}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pushed = format!("{a}/acme/cluster:v1");
    let pulled = format!("{b}/acme/cluster:v1");
    docker(&["import", tar.to_str().unwrap(), &pushed]);
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &pushed]).trim().to_string();
    docker(&["push", &pushed]);
    docker(&["rmi", &pushed]);
    docker(&["pull", &pulled]);
    let got = docker(&["image", "inspect", "--format", "{{.Id}}", &pulled]).trim().to_string();
    assert_eq!(got, id, "the same image through the other frontend");
    docker(&["rmi", &pulled]);
}
