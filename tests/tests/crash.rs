//! Crash safety: SIGKILL in the middle of concurrent pushes, restart, and check that every
//! acknowledged push is there and verifies, and that nothing half-written is served. And a
//! graceful restart (SIGTERM) in the middle of uploads: they go on afterwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_tests::{bytes, client, digest, image_manifest, Server};

/// What the pushers saw acknowledged, and everything they tried.
#[derive(Default)]
struct Ledger {
    /// (repo, digest, size) of blobs whose push got 201.
    blobs: Vec<(String, String, usize)>,
    /// (repo, tag, manifest digest) of manifests whose push got 201.
    manifests: Vec<(String, String, String)>,
    /// (repo, digest) of every blob push attempted.
    attempted: Vec<(String, String)>,
}

const ROUNDS: usize = 4;
const WORKERS: usize = 8;

/// One worker: pushes images (a chunked layer, a monolithic layer, a config, a manifest) until
/// the server dies or the bound is reached.
async fn pusher(url: String, worker: usize, round: usize, ledger: Arc<Mutex<Ledger>>) {
    let c = client();
    for i in 0..200u64 {
        let repo = format!("crash/w{worker}");
        let seed = (round as u64) << 40 | (worker as u64) << 20 | i;
        let big = bytes(seed, 200_000 + (i as usize % 5) * 150_000);
        let small = bytes(seed ^ 0xff, 3000);
        let config = format!(r#"{{"seed":{seed}}}"#).into_bytes();
        let mut layers = vec![];
        for (data, chunked) in [(&big, true), (&small, false), (&config, false)] {
            let d = digest(data);
            ledger.lock().unwrap().attempted.push((repo.clone(), d.clone()));
            let ok = if chunked {
                let Ok(r) = c.post(format!("{url}/v2/{repo}/blobs/uploads/")).send().await else {
                    return;
                };
                let loc = r.headers().get("location").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                let half = data.len() / 2;
                let Ok(_) = c.patch(format!("{url}{loc}")).body(data[..half].to_vec()).send().await else {
                    return;
                };
                let Ok(r) = c.put(format!("{url}{loc}?digest={d}")).body(data[half..].to_vec()).send().await else {
                    return;
                };
                r.status() == 201
            } else {
                let Ok(r) =
                    c.post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().await
                else {
                    return;
                };
                r.status() == 201
            };
            if !ok {
                return;
            }
            ledger.lock().unwrap().blobs.push((repo.clone(), d.clone(), data.len()));
            layers.push((d, data.len()));
        }
        let m = image_manifest(
            (&layers[2].0, layers[2].1),
            &[(&layers[0].0, layers[0].1), (&layers[1].0, layers[1].1)],
            "",
        );
        let tag = format!("r{round}-{i}");
        let Ok(r) = c
            .put(format!("{url}/v2/{repo}/manifests/{tag}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(m.clone())
            .send()
            .await
        else {
            return;
        };
        if r.status() != 201 {
            return;
        }
        ledger.lock().unwrap().manifests.push((repo, tag, digest(m.as_bytes())));
    }
}

async fn verify(url: &str, ledger: &Ledger) {
    let c = client();
    for (repo, d, size) in &ledger.blobs {
        let r = c.get(format!("{url}/v2/{repo}/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged blob {d} in {repo} is gone");
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), *size);
        assert_eq!(&digest(&body), d, "acknowledged blob {d} does not verify");
    }
    for (repo, tag, md) in &ledger.manifests {
        let r = c.get(format!("{url}/v2/{repo}/manifests/{tag}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged manifest {repo}:{tag} is gone");
        let body = r.bytes().await.unwrap();
        assert_eq!(&digest(&body), md);
    }
    // Whatever else is served must be whole: every blob that answers verifies.
    for (repo, d) in &ledger.attempted {
        let r = c.get(format!("{url}/v2/{repo}/blobs/{d}")).send().await.unwrap();
        if r.status() == 200 {
            let body = r.bytes().await.unwrap();
            assert_eq!(&digest(&body), d, "a half-written blob {d} is served");
        } else {
            assert_eq!(r.status(), 404);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_concurrent_pushes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        let mut server = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
        // Everything acknowledged in earlier rounds is still there after this restart.
        let snapshot = std::mem::take(&mut *ledger.lock().unwrap());
        verify(&server.url, &snapshot).await;
        *ledger.lock().unwrap() = snapshot;
        let workers: Vec<_> =
            (0..WORKERS).map(|w| tokio::spawn(pusher(server.url.clone(), w, round, ledger.clone()))).collect();
        // Kill at a different moment each round, while pushes are in flight.
        tokio::time::sleep(Duration::from_millis(700 + 400 * round as u64)).await;
        server.kill();
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
        }
        let acked = ledger.lock().unwrap().blobs.len();
        assert!(acked > total_acked, "round {round} acknowledged no push before the kill");
        total_acked = acked;
    }
    let server = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    verify(&server.url, &l).await;
    eprintln!(
        "crash test: {ROUNDS} SIGKILLs, {} blobs and {} manifests acknowledged, all verified; {} pushes attempted",
        l.blobs.len(),
        l.manifests.len(),
        l.attempted.len()
    );
}

/// Uploads begun before a graceful restart (SIGTERM, as an upgrade or a rolling restart does)
/// go on after it, also those small enough to be staged in memory: one with no bytes yet and
/// one with its first chunk; both finish and serve their bytes.
#[tokio::test]
async fn uploads_under_way_go_on_after_a_graceful_restart() {
    let mut server = Server::start();
    let c = client();
    let loc = |r: &reqwest::Response| r.headers()["location"].to_str().unwrap().to_string();
    let fresh = c.post(format!("{}/v2/admin/kept/blobs/uploads/", server.url)).send().await.unwrap();
    assert_eq!(fresh.status(), 202);
    let fresh = loc(&fresh);
    let started = c.post(format!("{}/v2/admin/kept/blobs/uploads/", server.url)).send().await.unwrap();
    let data = bytes(9, 3000);
    let r = c
        .patch(format!("{}{}", server.url, loc(&started)))
        .header("content-type", "application/octet-stream")
        .header("content-range", "0-999")
        .body(data[..1000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started = loc(&r);
    assert!(server.stop(), "standalone exits cleanly on SIGTERM");

    let dir = server.data_dir.clone();
    let server2 = Server::start_in(&dir, "127.0.0.1:0", &[]);
    let url = &server2.url;
    let r = c.get(format!("{url}{started}")).send().await.unwrap();
    assert_eq!(r.status(), 204, "the upload with a chunk is known after the restart");
    assert_eq!(r.headers()["range"], "0-999");
    let d = digest(&data);
    let sep = |l: &str| if l.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{url}{started}{}digest={d}", sep(&started)))
        .header("content-type", "application/octet-stream")
        .body(data[1000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let small = bytes(10, 500);
    let ds = digest(&small);
    let r = c
        .put(format!("{url}{fresh}{}digest={ds}", sep(&fresh)))
        .header("content-type", "application/octet-stream")
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the upload with no bytes yet is known after the restart: {:?}", r.text().await);
    for (d, want) in [(d, data), (ds, small)] {
        let got = c.get(format!("{url}/v2/admin/kept/blobs/{d}")).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(got.as_ref(), &want[..]);
    }
}
