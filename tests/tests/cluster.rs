//! Berth as a cluster of processes (three metadata nodes, three storage nodes, two frontends):
//! any frontend serves any request, uploads included, and losing a storage node stops nothing.

use berth_tests::cluster::{Cluster, ClusterOptions};
use berth_tests::{bytes, client, digest, push_image};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_core::{BlobStore, Digest};
use berth_storage::client::{StorageClient, StorageClientConfig};

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_through_one_frontend_pull_through_the_other() {
    let mut cl = tokio::task::block_in_place(Cluster::start);
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
    let r = token_client(&a, "repository:acme/app:pull")
        .await
        .get(format!("{b}/v2/acme/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Even one signed by a key published a moment ago, right after the other frontend read
    // the published keys (as when both start together and a client's first token comes from
    // one and its next request goes to the other): the unknown key id waits for the next
    // read of the keys instead of being refused.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let valid = token(&a, "repository:acme/app:pull").await;
    let made_up =
        format!("{}.{}", b64.encode(r#"{"alg":"EdDSA","kid":"00000000deadbeef"}"#), valid.split_once('.').unwrap().1);
    let began = Instant::now();
    let r = berth_tests::client_with(None)
        .get(format!("{b}/v2/acme/app/tags/list"))
        .bearer_auth(&made_up)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a made-up key id is refused (after b reads the keys again)");
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(berth_tests::berth_bin())
            .args(["admin", "--url", &a, "--token", berth_tests::ADMIN_TOKEN, "keys", "rotate"])
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = token_client(&a, "repository:acme/app:pull").await;
    let r = fresh.get(format!("{b}/v2/acme/app/tags/list")).send().await.unwrap();
    eprintln!("a key published {:.0} ms after b read the keys verified at b", began.elapsed().as_secs_f64() * 1e3);
    assert_eq!(r.status(), 200, "a token of a key just published verifies at the other frontend");

    // Small blobs b has served (the config, the 2000-byte layer) it keeps, checked against
    // their digests: pulled again, they cost no storage read, and are served while no storage
    // node answers; a larger layer is not kept.
    let blob = |d: &Value| format!("{b}/v2/acme/app/blobs/{}", d["digest"].as_str().unwrap());
    let (config, big, small) = (blob(&manifest["config"]), blob(&manifest["layers"][0]), blob(&manifest["layers"][1]));
    let r = c.get(&config).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let config_bytes = r.bytes().await.unwrap();
    assert_eq!(digest(&config_bytes), manifest["config"]["digest"].as_str().unwrap());
    for i in 0..cl.storage.len() {
        tokio::task::block_in_place(|| cl.stop_storage(i));
    }
    let r = c.get(&config).send().await.unwrap();
    assert_eq!(r.status(), 200, "a config pulled through b before, with no storage node up");
    assert_eq!(r.bytes().await.unwrap(), config_bytes);
    let r = c.get(&small).send().await.unwrap();
    assert_eq!(r.status(), 200, "a small layer pulled through b before, with no storage node up");
    let whole = r.bytes().await.unwrap();
    assert_eq!(digest(&whole), manifest["layers"][1]["digest"].as_str().unwrap());
    let r = c.get(&small).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/2000");
    assert_eq!(r.bytes().await.unwrap(), whole[10..20]);
    let r = c.get(&big).send().await.unwrap();
    assert!(r.status().is_server_error(), "a 300,000-byte layer with no storage node up: {}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_chunks_alternate_between_frontends() {
    let cl = tokio::task::block_in_place(Cluster::start);
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

/// Starts `n` uploads in `repo` through `front`, each sent 100 bytes (staged in memory);
/// returns their ids.
async fn start_uploads(c: &reqwest::Client, front: &str, repo: &str, n: u8) -> Vec<String> {
    let mut ids = vec![];
    for i in 0..n {
        let r = c.post(format!("{front}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
        assert_eq!(r.status(), 202);
        ids.push(r.headers()["docker-upload-uuid"].to_str().unwrap().to_string());
        let location = r.headers()["location"].to_str().unwrap().to_string();
        let r = c.patch(format!("{front}{location}")).body(vec![i; 100]).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    ids
}

/// Uploads begun before a graceful restart of every storage node (SIGTERM, as a rolling
/// restart or an upgrade does) go on after it, finished through the other frontend: those
/// with a first chunk staged in memory, and those with no bytes yet, which the frontend began
/// without a call to their node (it had heard the node's incarnation, which their ids name):
/// their areas open at their first call, after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_begun_before_a_graceful_restart_of_the_storage_nodes_go_on() {
    use berth_core::MetaStore;
    let mut cl = tokio::task::block_in_place(Cluster::start);
    let (a, b) = (cl.frontends[0].url(), cl.frontends[1].url());
    let c = client();
    // Pushes through a, whose clients hear every node's incarnation meanwhile.
    for i in 0..12 {
        berth_tests::push_blob(&c, &a, "acme/kept", format!("warm-up {i}").as_bytes()).await;
    }
    let post = || async {
        let r = c.post(format!("{a}/v2/acme/kept/blobs/uploads/")).send().await.unwrap();
        assert_eq!(r.status(), 202);
        r.headers()["location"].to_str().unwrap().to_string()
    };
    let mut uploads = vec![];
    for i in 0..12u64 {
        let data = bytes(i, 200);
        let mut location = post().await;
        if i % 2 == 1 {
            let r = c
                .patch(format!("{a}{location}"))
                .header("content-range", "0-99")
                .header("content-type", "application/octet-stream")
                .body(data[..100].to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            location = r.headers()["location"].to_str().unwrap().to_string();
        }
        uploads.push((location, data));
    }
    let meta = berth_meta::client::MetaClient::new(
        cl.meta.addrs().split(',').map(String::from).collect(),
        berth_meta::client::MetaClientConfig::default(),
    )
    .unwrap();
    // The ones with no bytes yet that began without a call: their ids name an incarnation.
    let id_of = |location: &str| location.rsplit('/').next().unwrap_or_default().split('?').next().unwrap().to_string();
    let begun_without_a_call = uploads
        .iter()
        .step_by(2)
        .filter(|(location, _)| berth_core::store::incarnation_of(&id_of(location)).is_some())
        .count();
    assert!(begun_without_a_call > 0, "no upload with no bytes yet began without a call to its node");
    let sessions = meta.uploads(None, 1000).await.unwrap();
    assert_eq!(sessions.iter().filter(|s| uploads.iter().any(|(l, _)| id_of(l) == s.id)).count(), 12);
    tokio::task::block_in_place(|| {
        for i in 0..3 {
            assert!(cl.stop_storage(i), "storage node {i} exits cleanly on SIGTERM");
            cl.restart_storage(i);
        }
    });
    for (i, (location, data)) in uploads.iter().enumerate() {
        let sent = if i % 2 == 1 { 100 } else { 0 };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{b}{location}{sep}digest={}", digest(data)))
            .header("content-type", "application/octet-stream")
            .body(data[sent..].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "upload {i} after the restart: {:?}", r.text().await);
        let got = c.get(format!("{a}/v2/acme/kept/blobs/{}", digest(data))).send().await.unwrap();
        assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
    }
    eprintln!(
        "{begun_without_a_call} of 6 uploads with no bytes began without a call to their node; all 12 finished after the restart"
    );
}

/// Storage nodes SIGKILLed while uploads were staged in their memory lose those uploads; once
/// back, each ends the sessions staged on it (they could only fail now), so that they stop
/// counting against their callers and keeping their repository's loose links. The sessions
/// staged on a node removed from the cluster are ended by the metadata leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_whose_staging_died_with_its_node_are_ended() {
    use berth_core::MetaStore;
    // Sessions settle (may be ended for want of a staging area) after the upload timeout
    // when it is under a minute; the leader looks for sessions of removed nodes with each
    // round of garbage collection.
    let options = ClusterOptions {
        storage_args: vec!["--upload-timeout-secs".into(), "20".into()],
        meta_args: vec!["--gc-interval-secs".into(), "1".into()],
        ..Default::default()
    };
    let mut cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let front = cl.frontends[0].url();
    let c = client();
    let ids = start_uploads(&c, &front, "acme/lost", 6).await;
    let meta = berth_meta::client::MetaClient::new(
        cl.meta.addrs().split(',').map(String::from).collect(),
        berth_meta::client::MetaClientConfig::default(),
    )
    .unwrap();
    let open = || async { meta.uploads(None, 1000).await.unwrap().into_iter().filter(|s| ids.contains(&s.id)).count() };
    // Not yet idle for the upload timeout: until the kill, only the sessions' own staging
    // areas could end them.
    assert_eq!(open().await, 6);
    tokio::task::block_in_place(|| {
        (0..3).for_each(|i| cl.kill_storage(i));
        (0..3).for_each(|i| cl.restart_storage(i));
    });
    let start = Instant::now();
    while open().await > 0 && start.elapsed() < Duration::from_secs(45) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(open().await, 0, "sessions whose staging died with its node are still open after 45 s");
    eprintln!("sessions ended {:.1} s after the storage nodes restarted", start.elapsed().as_secs_f64());
    // The repository takes uploads as before.
    let pushed = berth_tests::push_blob(&c, &front, "acme/lost", b"after the restart").await;
    assert_eq!(pushed, digest(b"after the restart"));

    // Uploads staged on each node; one node is killed and removed from the cluster. The
    // others stay open: they are idle for less than the upload timeout until the end.
    let ids = start_uploads(&c, &front, "acme/lost", 9).await;
    let staged_on = |sessions: Vec<berth_core::UploadSession>| -> Vec<(String, Option<String>)> {
        sessions.into_iter().filter(|s| ids.contains(&s.id)).map(|s| (s.id, s.staging)).collect()
    };
    let before = staged_on(meta.uploads(None, 1000).await.unwrap());
    assert_eq!(before.len(), 9);
    // Every session names the node its bytes are staged on (as that node's router answered
    // the start), which is how a node's own sessions are told apart from the others'.
    assert!(before.iter().all(|(_, n)| n.is_some()), "a session names no staging node: {before:?}");
    // The node to remove: one that stages some of them (which ones do depends on the uploads'
    // ids, and on which nodes the frontend found answering since the restart).
    let (victim, name) = tokio::task::block_in_place(|| {
        (0..3)
            .filter_map(|i| storage_node(&cl, &cl.storage[i].addr).map(|(name, _, _)| (i, name)))
            .find(|(_, name)| before.iter().any(|(_, n)| n.as_deref() == Some(name.as_str())))
    })
    .expect("a node that stages some of the uploads");
    let kept: Vec<(String, Option<String>)> =
        before.iter().filter(|(_, n)| n.as_deref() != Some(name.as_str())).cloned().collect();
    tokio::task::block_in_place(|| {
        cl.kill_storage(victim);
        berth_tests::meta_group::cluster_cli(&cl.meta.addrs(), &["remove", &name, "--force"]).unwrap();
    });
    let start = Instant::now();
    let mut after = staged_on(meta.uploads(None, 1000).await.unwrap());
    while after.len() > kept.len() && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = staged_on(meta.uploads(None, 1000).await.unwrap());
    }
    eprintln!("sessions of the removed node ended {:.1} s after its removal", start.elapsed().as_secs_f64());
    assert_eq!(after, kept, "exactly the sessions staged on the removed node are ended");
}

/// Sessions that name no storage node of the cluster (records from before sessions named
/// one, or a node recorded by an address it does not call itself) are ended by the metadata
/// leader once every node answers that it does not stage them; one a node does stage stays,
/// and so does one staged on a node that is then declared dead (it may come back with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_naming_no_node_are_ended_once_no_node_stages_them() {
    use berth_core::{MetaStore, UploadSession};
    let options = ClusterOptions {
        meta_args: ["--gc-interval-secs", "1", "--upload-timeout-secs", "3", "--storage-dead-after-secs", "6"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let mut cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let meta = berth_meta::client::MetaClient::new(
        cl.meta.addrs().split(',').map(String::from).collect(),
        berth_meta::client::MetaClientConfig::default(),
    )
    .unwrap();
    let id = |n: u8| format!("5e55a0{n:02x}-0000-4000-8000-000000000000");
    let (unnamed, misspelled, staged, on_dead) = (id(1), id(2), id(3), id(4));
    // Staged on a node, but its record names none.
    StorageClient::new(&cl.storage[1].addr, StorageClientConfig::default())
        .unwrap()
        .upload_start(&staged)
        .await
        .unwrap();
    let session = |id: &str, staging: Option<&str>| UploadSession {
        id: id.to_string(),
        repo: "acme/unnamed".into(),
        started_at_ms: berth_core::now_ms(),
        owner: berth_tests::ADMIN.into(),
        staging: staging.map(String::from),
    };
    for (id, staging) in [(&unnamed, None), (&misspelled, Some("storage.invalid:7001")), (&staged, None)] {
        meta.create_upload(session(id, staging), 0, None).await.unwrap();
    }
    let ours = [unnamed.clone(), misspelled.clone(), staged.clone(), on_dead.clone()];
    let open = || async {
        let mut ids: Vec<String> =
            meta.uploads(None, 1000).await.unwrap().into_iter().map(|s| s.id).filter(|i| ours.contains(i)).collect();
        ids.sort();
        ids
    };
    assert_eq!(open().await.len(), 3, "not ended before they are 3 s old");
    let start = Instant::now();
    while open().await.len() > 1 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("sessions staged nowhere ended {:.1} s after they were recorded", start.elapsed().as_secs_f64());
    assert_eq!(open().await, vec![staged.clone()], "exactly the sessions no node stages are ended");
    // Rounds go on; the one a node stages stays open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(open().await, vec![staged.clone()]);

    // Staged on node 2, which is killed and declared dead: no node up stages it, but the
    // session names a node of the map, and stays open.
    let (name, _, _) = tokio::task::block_in_place(|| storage_node(&cl, &cl.storage[2].addr)).expect("node 2");
    StorageClient::new(&cl.storage[2].addr, StorageClientConfig::default())
        .unwrap()
        .upload_start(&on_dead)
        .await
        .unwrap();
    meta.create_upload(session(&on_dead, Some(&name)), 0, None).await.unwrap();
    tokio::task::block_in_place(|| cl.kill_storage(2));
    let killed = Instant::now();
    while tokio::task::block_in_place(|| storage_node(&cl, &cl.storage[2].addr)).map(|n| n.1) != Some("dead".into()) {
        assert!(killed.elapsed() < Duration::from_secs(30), "node 2 not declared dead");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(open().await, vec![staged, on_dead], "a session staged on a dead node was ended");
}

use berth_tests::run_tool as run;

#[test]
fn docker_pushes_through_one_frontend_and_pulls_through_the_other() {
    let Some(cli) = berth_tests::DockerCli::available() else { return };
    let cl = Cluster::start();
    let (a, b) = (&cl.frontends[0].addr, &cl.frontends[1].addr);
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join("hello.txt"), "hello from a berth cluster\n").unwrap();
    std::fs::write(rootfs.join("random.bin"), bytes(99, 2_000_000)).unwrap();
    let tar = work.path().join("rootfs.tar");
    run("tar", &["-C", rootfs.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    let docker = |args: &[&str]| cli.run(args);
    for addr in [a, b] {
        cli.login(addr, berth_tests::ADMIN, berth_tests::ADMIN_TOKEN);
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

/// Storage node 0 SIGKILLed while pushes (monolithic and chunked) and pulls run through both
/// frontends, and started again a few seconds later: pushes go on (a push whose upload was
/// staged on the killed node is retried once, as clients do), no pull of an acknowledged image
/// fails, and once the node is back, repair gives every blob of every acknowledged image a
/// copy on each of the three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_a_storage_node_stops_no_push_and_no_pull() {
    let mut cl = tokio::task::block_in_place(Cluster::start);
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Pushed>>> = Arc::default();
    let (failed_pushes, failed_pulls, pulled) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = vec![];
    for w in 0..2usize {
        let front = fronts[w].clone();
        let (stop_pushing, acked_pushes, failed_pushes) = (stop.clone(), acked.clone(), failed_pushes.clone());
        load.push(tokio::spawn(async move {
            let (stop, acked) = (stop_pushing, acked_pushes);
            let c = client();
            let mut seed = 1000 * (w as u64 + 1);
            while !stop.load(Ordering::Relaxed) && seed < 1000 * (w as u64 + 1) + 200 {
                seed += 1;
                let repo = format!("acme/load{w}");
                let chunked = seed.is_multiple_of(2);
                let mut pushed = try_push_image(&c, &front, &repo, seed, chunked).await;
                if pushed.is_none() {
                    pushed = try_push_image(&c, &front, &repo, seed, chunked).await;
                }
                match pushed {
                    Some((m, blobs)) => acked.lock().unwrap().push((repo, m, blobs)),
                    None => {
                        failed_pushes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (stop, acked, failed_pulls, pulled) = (stop.clone(), acked.clone(), failed_pulls.clone(), pulled.clone());
        let other = fronts[1 - w].clone();
        load.push(tokio::spawn(async move {
            let c = client();
            let mut k = w;
            while !stop.load(Ordering::Relaxed) {
                let pick = {
                    let a = acked.lock().unwrap();
                    (!a.is_empty()).then(|| a[k % a.len()].clone())
                };
                k += 7;
                let Some((repo, m, _)) = pick else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if pulls(&c, &other, &repo, &m).await {
                    pulled.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("pull of {repo}@{m} through {other} failed");
                    failed_pulls.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| cl.kill_storage(0));
    let before_kill = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_kill = acked.lock().unwrap().len() - before_kill;
    tokio::task::block_in_place(|| cl.restart_storage(0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let (failed_pushes, failed_pulls) = (failed_pushes.load(Ordering::Relaxed), failed_pulls.load(Ordering::Relaxed));
    eprintln!(
        "storage node loss: {} pushes acknowledged ({during_kill} while the node was down), {failed_pushes} failed, \
         {} pulls, {failed_pulls} failed",
        acked.len(),
        pulled.load(Ordering::Relaxed)
    );
    assert!(during_kill > 0, "pushes went on while the node was down");
    assert_eq!(failed_pushes, 0);
    assert_eq!(failed_pulls, 0);

    // Repair: every blob of every acknowledged image on all three nodes.
    let nodes: Vec<StorageClient> =
        cl.storage.iter().map(|s| StorageClient::new(&s.addr, StorageClientConfig::default()).unwrap()).collect();
    let blobs: Vec<Digest> = acked.iter().flat_map(|(_, _, b)| b.iter().map(|d| d.parse().unwrap())).collect();
    let started = Instant::now();
    let mut short = blobs.len();
    while started.elapsed() < Duration::from_secs(60) {
        short = 0;
        for d in &blobs {
            for n in &nodes {
                if !matches!(n.stat(d).await, Ok(Some(_))) {
                    short += 1;
                }
            }
        }
        if short == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{} blobs on three nodes each {:?} after the restart", blobs.len(), started.elapsed());
    assert_eq!(short, 0, "copies still missing after repair");
    for (repo, m, _) in &acked {
        assert!(pulls(&client(), &fronts[0], repo, m).await, "{repo}@{m} after the repair");
    }
}

/// An acknowledged push: repository, manifest digest, and the digests of every blob stored
/// (the manifest's bytes included).
type Pushed = (String, String, Vec<String>);

/// An image (config and two layers) pushed through `front`, its blobs monolithically or, with
/// `chunked`, as an upload session with a PATCH then a PUT (staged on one storage node); its
/// manifest digest and blob digests, or `None` if any request failed.
async fn try_push_image(
    c: &reqwest::Client,
    front: &str,
    repo: &str,
    seed: u64,
    chunked: bool,
) -> Option<(String, Vec<String>)> {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let mut blobs = vec![];
    for data in [config.clone(), bytes(seed, 200_000), bytes(seed + 100_000, 3000)] {
        let d = digest(&data);
        let status = if chunked {
            let r = c.post(format!("{front}/v2/{repo}/blobs/uploads/")).send().await.ok()?;
            let loc = r.headers().get("location")?.to_str().ok()?.to_string();
            let r = c
                .patch(format!("{front}{loc}"))
                .header("content-type", "application/octet-stream")
                .body(data.clone())
                .send()
                .await
                .ok()?;
            let loc = r.headers().get("location")?.to_str().ok()?.to_string();
            c.put(format!("{front}{loc}?digest={d}")).send().await.ok()?.status()
        } else {
            c.post(format!("{front}/v2/{repo}/blobs/uploads/?digest={d}"))
                .body(data.clone())
                .send()
                .await
                .ok()?
                .status()
        };
        if status != 201 {
            eprintln!("blob push answered {status}");
            return None;
        }
        blobs.push((d, data.len()));
    }
    let layers: Vec<(&str, usize)> = blobs[1..].iter().map(|(d, n)| (d.as_str(), *n)).collect();
    let m = berth_tests::image_manifest((&blobs[0].0, blobs[0].1), &layers, "");
    let r = berth_tests::put_manifest(c, front, repo, &format!("v{seed}"), m.clone()).await;
    if r.status() != 201 {
        eprintln!("manifest push answered {}", r.status());
        return None;
    }
    let md = digest(m.as_bytes());
    let mut all: Vec<String> = blobs.into_iter().map(|(d, _)| d).collect();
    all.push(md.clone());
    Some((md, all))
}

/// Whether manifest `m` and every blob it names pull through `front` and verify.
async fn pulls(c: &reqwest::Client, front: &str, repo: &str, m: &str) -> bool {
    let Ok(r) = c.get(format!("{front}/v2/{repo}/manifests/{m}")).send().await else { return false };
    if r.status() != 200 {
        return false;
    }
    let Ok(body) = r.bytes().await else { return false };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else { return false };
    let mut digests = vec![v["config"]["digest"].as_str().unwrap_or_default().to_string()];
    digests.extend(v["layers"].as_array().into_iter().flatten().filter_map(|l| l["digest"].as_str().map(String::from)));
    for d in digests {
        let Ok(r) = c.get(format!("{front}/v2/{repo}/blobs/{d}")).send().await else { return false };
        if r.status() != 200 {
            return false;
        }
        match r.bytes().await {
            Ok(b) if digest(&b) == d => {}
            _ => return false,
        }
    }
    true
}

/// `deploy/local/cluster.sh up DIR` starts a 3/3/2 cluster that serves, writes `cluster.env`
/// as its contract says (with each process's metrics URL), and `down DIR` stops every process
/// it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_script_starts_a_cluster_that_serves() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster.sh");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let bin = berth_tests::berth_bin();
    let up = std::process::Command::new("bash").arg(&script).args(["up", &d]).env("BERTH_BIN", &bin).output().unwrap();
    assert!(up.status.success(), "cluster.sh up: {}", String::from_utf8_lossy(&up.stderr));
    // A failed check below still stops the cluster; once the test's own `down` has run, the
    // guard is disarmed (its pids could by then name other processes).
    struct Down(Option<(std::path::PathBuf, String)>);
    impl Drop for Down {
        fn drop(&mut self) {
            if let Some((script, dir)) = self.0.take() {
                let _ = std::process::Command::new("bash").arg(script).args(["down", &dir]).output();
            }
        }
    }
    let mut guard = Down(Some((script.clone(), d.clone())));
    // Read the environment file the way a shell user would.
    let var = |name: &str| -> String {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(". '{d}/cluster.env' && printf %s \"${name}\""))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fronts: Vec<String> = var("BERTH_FRONTENDS").split_whitespace().map(String::from).collect();
    assert_eq!(fronts.len(), 2);
    let pids: Vec<u32> =
        ["META_1", "META_2", "META_3", "STORAGE_1", "STORAGE_2", "STORAGE_3", "FRONTEND_1", "FRONTEND_2"]
            .iter()
            .map(|p| var(&format!("BERTH_PID_{p}")).parse().unwrap())
            .collect();
    assert!(var("BERTH_CMD_STORAGE_2").contains("storage"), "restart commands are recorded");
    let c = berth_tests::client_with(Some((&var("BERTH_ADMIN_USER"), &var("BERTH_ADMIN_TOKEN"))));
    let m = push_image(&c, &fronts[0], "acme/local", "v1", 5, &[300_000]).await;
    let r = c.get(format!("{}/v2/acme/local/manifests/v1", fronts[1])).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(digest(&r.bytes().await.unwrap()), m);
    // Every process serves its probes at the URL the file gives, and its role's metrics there.
    let procs = ["META_1", "META_2", "META_3", "STORAGE_1", "STORAGE_2", "STORAGE_3", "FRONTEND_1", "FRONTEND_2"];
    for p in procs {
        let url = var(&format!("BERTH_HTTP_{p}"));
        let r = reqwest::get(format!("{url}/healthz")).await.unwrap();
        assert_eq!(r.status(), 200, "{p} probe at {url}");
    }
    for (p, series) in [
        ("META_2", "berth_raft_term"),
        ("STORAGE_1", "berth_storage_blobs"),
        ("FRONTEND_2", "berth_http_requests_total"),
    ] {
        let url = var(&format!("BERTH_HTTP_{p}"));
        let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
        assert!(text.lines().any(|l| l.starts_with(series)), "{p} metrics at {url} lack {series}");
    }
    // To describe a package, a manifest's put reads its image's config. A config uploaded
    // whole through the same frontend (in one PATCH, or in a monolithic POST) is read from that
    // frontend's memory; through another frontend, from a storage node. Either way the package
    // is described.
    let storage_http: Vec<String> =
        ["STORAGE_1", "STORAGE_2", "STORAGE_3"].iter().map(|p| var(&format!("BERTH_HTTP_{p}"))).collect();
    let user = var("BERTH_ADMIN_USER");
    let cases = [
        ("kept-config", &fronts[0], false, false),
        ("posted-config", &fronts[0], true, false),
        ("read-config", &fronts[1], false, true),
    ];
    for (name, manifest_through, monolithic, reads) in cases {
        let repo = format!("{user}/{name}");
        let config = serde_json::json!({"config": {"Labels": {"org.opencontainers.image.description": name}}});
        let config = config.to_string().into_bytes();
        let cd = if monolithic {
            berth_tests::push_blob(&c, &fronts[0], &repo, &config).await
        } else {
            upload_in_one_patch(&c, &fronts[0], &repo, &config).await
        };
        let layer = bytes(77, 100);
        let ld = berth_tests::push_blob(&c, &fronts[0], &repo, &layer).await;
        let m = berth_tests::image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
        let before = small_reads(&storage_http).await;
        assert_eq!(berth_tests::put_manifest(&c, manifest_through, &repo, "v1", m).await.status(), 201);
        // One read, or more when the first node asked has no copy yet (a push is acknowledged
        // once two of the three have it).
        let read = small_reads(&storage_http).await - before;
        assert_eq!(read >= 1.0, reads, "{read} storage reads of {name}'s config");
        let api = format!("{}/api/v3/users/{user}/packages/container/{name}", fronts[1]);
        let p: Value = c.get(&api).send().await.unwrap().json().await.unwrap();
        assert_eq!(p["description"].as_str(), Some(name), "{p}");
    }
    let down = std::process::Command::new("bash").arg(&script).args(["down", &d]).output().unwrap();
    guard.0 = None;
    assert!(down.status.success(), "cluster.sh down: {}", String::from_utf8_lossy(&down.stderr));
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive || is_zombie(pid), "process {pid} still runs after down");
    }
}

/// Uploads `data` to `repo` as docker does: `POST`, the whole blob in one `PATCH`, then `PUT
/// ?digest=`. Returns its digest.
async fn upload_in_one_patch(c: &reqwest::Client, front: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    // The cluster's frontends answer with locations relative to themselves.
    let at = |r: &reqwest::Response| format!("{front}{}", r.headers()["location"].to_str().unwrap());
    let r = c.post(format!("{front}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r =
        c.patch(at(&r)).header("content-type", "application/octet-stream").body(data.to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(format!("{}?digest={d}", at(&r))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    d
}

/// `ReadSmall` calls served by the storage nodes whose metrics are at `urls`, together.
async fn small_reads(urls: &[String]) -> f64 {
    let mut n = 0.0;
    for url in urls {
        let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
        n += text
            .lines()
            .filter(|l| l.starts_with("berth_grpc_requests_total") && l.contains(".Storage/ReadSmall\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    n
}

/// Whether `pid` has exited and only waits to be reaped.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

#[test]
fn skopeo_copies_through_one_frontend_and_back_through_the_other() {
    if !berth_tests::have_tool("skopeo") {
        return;
    }
    let cl = Cluster::start();
    let (a, b) = (&cl.frontends[0].addr, &cl.frontends[1].addr);
    let creds = format!("{}:{}", berth_tests::ADMIN, berth_tests::ADMIN_TOKEN);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(push_image(&client(), &format!("http://{a}"), "acme/sk", "v1", 21, &[400_000, 500]));
    let work = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:v1", work.path().join("layout").display());
    // Pull through B into a local layout, push it back through A under another name, and read
    // the manifest back through B: the same bytes all the way.
    run(
        "skopeo",
        &["copy", "--src-tls-verify=false", "--src-creds", &creds, &format!("docker://{b}/acme/sk:v1"), &layout],
    );
    let copy = format!("docker://{a}/acme/sk-copy:v1");
    run("skopeo", &["copy", "--dest-tls-verify=false", "--dest-creds", &creds, &layout, &copy]);
    let raw = run(
        "skopeo",
        &["inspect", "--tls-verify=false", "--creds", &creds, "--raw", &format!("docker://{b}/acme/sk-copy:v1")],
    );
    let copied: Value = serde_json::from_str(&raw).unwrap();
    // skopeo compresses these test layers (random bytes labelled gzip) on the way, so the copy
    // has layers of its own: every one of them pulls through B and verifies.
    let mut digests = vec![copied["config"]["digest"].as_str().unwrap().to_string()];
    digests.extend(copied["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()));
    assert_eq!(digests.len(), 3);
    for d in digests {
        let body = rt
            .block_on(async {
                client().get(format!("http://{b}/v2/acme/sk-copy/blobs/{d}")).send().await?.bytes().await
            })
            .unwrap();
        assert_eq!(digest(&body), d);
    }
    let original = rt.block_on(async { client().get(format!("http://{b}/v2/acme/sk/manifests/{m}")).send().await });
    assert_eq!(original.unwrap().status(), 200);
}

/// A registry token for `scope` from `front`, and a client that sends it.
/// A registry token for `scope` from frontend `front`, as the administrator.
async fn token(front: &str, scope: &str) -> String {
    let t: Value =
        client().get(format!("{front}/token?service=berth&scope={scope}")).send().await.unwrap().json().await.unwrap();
    t["token"].as_str().unwrap().to_string()
}

async fn token_client(front: &str, scope: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let bearer = format!("Bearer {}", token(front, scope).await);
    headers.insert(reqwest::header::AUTHORIZATION, bearer.parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// One metadata node stopped (a minority): pushes go on. Two stopped (a majority): writes
/// answer 503 with Retry-After within a bounded time, and pulls by digest of what the
/// frontends served before go on through both. Both restarted: the group heals, pushes work
/// again and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_minority_and_majority_loss() {
    let mut cl = tokio::task::block_in_place(Cluster::start);
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let repo = "acme/quorum";
    let c = token_client(&fronts[0], &format!("repository:{repo}:pull,push")).await;
    let m1 = push_image(&c, &fronts[0], repo, "v1", 31, &[200_000]).await;

    let leader = tokio::task::block_in_place(|| cl.meta.wait_for_leader(Duration::from_secs(10))).unwrap();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    tokio::task::block_in_place(|| cl.meta.nodes[followers[0] as usize - 1].kill());
    let m2 = push_image(&c, &fronts[1], repo, "v2", 32, &[3000]).await;
    for (f, m) in fronts.iter().flat_map(|f| [(f, &m1), (f, &m2)]) {
        assert!(pulls(&c, f, repo, m).await, "{m} pulls through {f} with one metadata node down");
    }

    // The leader goes too: two of three are down.
    tokio::task::block_in_place(|| cl.meta.nodes[leader as usize - 1].kill());
    let manifest = c.get(format!("{}/v2/{repo}/manifests/{m1}", fronts[0])).send().await.unwrap().text().await.unwrap();
    let started = Instant::now();
    let r = berth_tests::put_manifest(&c, &fronts[0], repo, "v3", manifest).await;
    let took = started.elapsed();
    assert_eq!(r.status(), 503, "a tag write without a metadata majority");
    assert!(r.headers().contains_key("retry-after"), "503 carries Retry-After");
    assert!(took < Duration::from_secs(15), "the write was answered in {took:?}");
    let r = c.post(format!("{}/v2/{repo}/blobs/uploads/", fronts[1])).send().await.unwrap();
    assert_eq!(r.status(), 503, "an upload cannot start without a metadata majority");
    assert!(r.headers().contains_key("retry-after"));
    eprintln!("without a metadata majority: a tag write answered 503 in {took:?}");
    for (f, m) in fronts.iter().flat_map(|f| [(f, &m1), (f, &m2)]) {
        assert!(pulls(&c, f, repo, m).await, "{m} pulls by digest through {f} without a metadata majority");
    }
    // A tag cannot be read without the group: the frontend says it cannot answer.
    let r = c.get(format!("{}/v2/{repo}/manifests/v1", fronts[1])).send().await.unwrap();
    assert_eq!(r.status(), 503);
    // The probes say it too: alive, not ready.
    assert_eq!(reqwest::get(format!("{}/healthz", fronts[0])).await.unwrap().status(), 200);
    let r = reqwest::get(format!("{}/readyz", fronts[0])).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().starts_with("metadata"), "not ready for want of the metadata group");

    // Both come back: the group elects a leader and writes go on.
    tokio::task::block_in_place(|| {
        cl.meta.nodes[leader as usize - 1].restart();
        cl.meta.nodes[followers[0] as usize - 1].restart();
        cl.meta.wait_for_leader(Duration::from_secs(20)).expect("a leader after the restart");
    });
    let m4 = push_image(&c, &fronts[1], repo, "v4", 34, &[5000]).await;
    for (tag, m) in [("v1", &m1), ("v2", &m2), ("v4", &m4)] {
        for f in &fronts {
            let r = c.get(format!("{f}/v2/{repo}/manifests/{tag}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{tag} through {f} after the group healed");
            assert_eq!(reqwest::get(format!("{f}/readyz")).await.unwrap().status(), 200, "ready again");
            assert_eq!(&digest(&r.bytes().await.unwrap()), m);
        }
    }
    let r = c.get(format!("{}/v2/{repo}/manifests/v3", fronts[0])).send().await.unwrap();
    assert_eq!(r.status(), 404, "the write answered 503 did not happen later");
}

/// Every process SIGKILLed at once, then started again on its data: every image acknowledged
/// before pulls through both frontends by tag and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_killed_and_restarted_keeps_everything_acknowledged() {
    let mut cl = tokio::task::block_in_place(Cluster::start);
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let c = client();
    let mut pushed = vec![];
    for i in 0..6u64 {
        let repo = format!("acme/restart{}", i % 2);
        let m = push_image(&c, &fronts[i as usize % 2], &repo, &format!("v{i}"), 40 + i, &[100_000, 2000]).await;
        pushed.push((repo, format!("v{i}"), m));
    }
    tokio::task::block_in_place(|| {
        cl.kill_all();
        cl.restart_all();
        cl.meta.wait_for_leader(Duration::from_secs(20)).expect("a leader after the restart");
    });
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    for (repo, tag, m) in &pushed {
        for f in &fronts {
            let r = c.get(format!("{f}/v2/{repo}/manifests/{tag}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{repo}:{tag} through {f} after the restart");
            assert_eq!(&digest(&r.bytes().await.unwrap()), m);
            assert!(pulls(&c, f, repo, m).await, "{repo}@{m} and its blobs through {f}");
        }
    }
    // And the restarted cluster takes new pushes.
    let m = push_image(&c, &fronts[1], "acme/restart0", "after", 50, &[4000]).await;
    assert!(pulls(&c, &fronts[0], "acme/restart0", &m).await);
}

/// The manifest whose tag write is value `k` of the register the leader-kill test checks.
fn register_manifest(config: &str, config_len: usize, k: u64) -> String {
    berth_tests::image_manifest((config, config_len), &[], &format!(r#","annotations":{{"k":"{k}"}}"#))
}

/// The metadata leader SIGKILLed five times while one writer moves a tag through alternating
/// frontends (manifest PUTs) and two readers read it, one through each frontend: every time a
/// new leader is elected and writes resume, no acknowledged write is lost, and the recorded
/// history of tag writes and reads is linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_through_both_frontends_keep_tags_linearizable() {
    use berth_tests::linearizability::{violations, History, Op};
    let mut cl = tokio::task::block_in_place(Cluster::start);
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let repo = "acme/register";
    let c = token_client(&fronts[0], &format!("repository:{repo}:pull,push")).await;
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = berth_tests::push_blob(&c, &fronts[0], repo, config).await;
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));

    let writer = {
        let (c, fronts, history, stop, cd) =
            (c.clone(), fronts.clone(), history.clone(), stop.clone(), config_digest.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) && k < 100_000 {
                k += 1;
                let body = register_manifest(&cd, config.len(), k);
                let start = Instant::now();
                let r = c
                    .put(format!("{}/v2/{repo}/manifests/live", fronts[k as usize % 2]))
                    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                    .body(body)
                    .send()
                    .await;
                let acked = r.is_ok_and(|r| r.status() == 201);
                history.lock().unwrap().writes.push(Op { start, end: Instant::now(), value: Some(k), acked });
            }
        })
    };
    let readers: Vec<_> = fronts
        .iter()
        .map(|front| {
            let (c, front, history, stop) = (c.clone(), front.clone(), history.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                    n += 1;
                    let start = Instant::now();
                    let Ok(r) = c.get(format!("{front}/v2/{repo}/manifests/live")).send().await else { continue };
                    let value = match r.status().as_u16() {
                        200 => {
                            let Ok(body) = r.json::<Value>().await else { continue };
                            body["annotations"]["k"].as_str().and_then(|k| k.parse().ok())
                        }
                        404 => None,
                        // No answer (503 while there is no leader): not part of the history.
                        _ => continue,
                    };
                    history.lock().unwrap().reads.push(Op { start, end: Instant::now(), value, acked: true });
                }
            })
        })
        .collect();

    let mut failovers = vec![];
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader =
            tokio::task::block_in_place(|| cl.meta.wait_for_leader(Duration::from_secs(10))).expect("a leader");
        tokio::task::block_in_place(|| cl.meta.nodes[leader as usize - 1].kill());
        let killed = Instant::now();
        let first_ack = loop {
            let ack =
                history.lock().unwrap().writes.iter().filter(|w| w.acked && w.start > killed).map(|w| w.end).min();
            if let Some(t) = ack {
                break t;
            }
            assert!(killed.elapsed() < Duration::from_secs(20), "no tag write acknowledged within 20 s of the kill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        failovers.push(first_ack.duration_since(killed));
        tokio::task::block_in_place(|| cl.meta.nodes[leader as usize - 1].restart());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }

    let h = std::mem::take(&mut *history.lock().unwrap());
    let acked: Vec<u64> = h.writes.iter().filter(|w| w.acked).filter_map(|w| w.value).collect();
    for k in &acked {
        let d = digest(register_manifest(&config_digest, config.len(), *k).as_bytes());
        let r = c.get(format!("{}/v2/{repo}/manifests/{d}", fronts[(*k as usize + 1) % 2])).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged write {k} is lost");
    }
    let bad = violations(&h);
    let mut sorted = failovers.clone();
    sorted.sort();
    eprintln!(
        "through both frontends: {} tag writes acknowledged, {} not, {} reads; leader kill to the first \
         acknowledged tag write sent after it: median {:?}, max {:?} (all: {failovers:?}); {} linearizability violations",
        acked.len(),
        h.writes.len() - acked.len(),
        h.reads.len(),
        sorted[sorted.len() / 2],
        sorted.last().unwrap(),
        bad.len()
    );
    assert!(bad.is_empty(), "{bad:?}");
    assert!(acked.len() > 50, "too few writes to mean anything");
}

/// A storage node started while the cluster serves registers itself; the placement map's
/// version moves, both frontends place blobs on it without a restart, and every blob still
/// has exactly three copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_that_registers_takes_its_share_of_new_blobs() {
    let mut cl = tokio::task::block_in_place(Cluster::start);
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let map = |cl: &Cluster| -> Value {
        serde_json::from_str(&berth_tests::meta_group::cluster_cli(&cl.meta.addrs(), &["storage"]).unwrap()).unwrap()
    };
    let before = map(&cl);
    assert_eq!(before["nodes"].as_array().unwrap().len(), 3);
    let added = tokio::task::block_in_place(|| {
        let i = cl.add_storage();
        berth_tests::cluster::wait_for_storage(&cl.meta, 4);
        i
    });
    let after = map(&cl);
    assert!(after["version"].as_u64() > before["version"].as_u64(), "{after}");
    // The frontends poll the map every 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = client();
    let mut blobs = vec![];
    for i in 0..24u64 {
        blobs.push(berth_tests::push_blob(&c, &fronts[i as usize % 2], "acme/grow", &bytes(500 + i, 2000)).await);
    }
    let nodes: Vec<StorageClient> =
        cl.storage.iter().map(|s| StorageClient::new(&s.addr, StorageClientConfig::default()).unwrap()).collect();
    let mut on_new = 0;
    for d in &blobs {
        let d: Digest = d.parse().unwrap();
        let mut copies = 0;
        for (i, n) in nodes.iter().enumerate() {
            if matches!(n.stat(&d).await, Ok(Some(_))) {
                copies += 1;
                on_new += usize::from(i == added);
            }
        }
        assert_eq!(copies, 3, "{d} has {copies} copies");
    }
    eprintln!("{on_new} of {} new blobs have a copy on the node that joined", blobs.len());
    assert!(on_new > 0, "the new node holds none of the new blobs");
}

/// The name of the storage node at `addr`, its state and blobs held, from the placement map.
fn storage_node(cl: &Cluster, addr: &str) -> Option<(String, String, u64)> {
    let map: Value =
        serde_json::from_str(&berth_tests::meta_group::cluster_cli(&cl.meta.addrs(), &["storage"]).ok()?).ok()?;
    map["nodes"].as_array()?.iter().find(|n| n["addr"] == addr).map(|n| {
        (
            n["name"].as_str().unwrap_or_default().to_string(),
            n["state"].as_str().unwrap_or_default().to_string(),
            n["blobs"].as_u64().unwrap_or(0),
        )
    })
}

/// Bytes the storage nodes report having copied to other owners, summed.
fn bytes_moved(cl: &Cluster) -> u64 {
    let map: Value = berth_tests::meta_group::cluster_cli(&cl.meta.addrs(), &["storage"])
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    map["nodes"].as_array().into_iter().flatten().filter_map(|n| n["moving"]["bytes_moved"].as_u64()).sum()
}

/// Four storage nodes; one is killed for longer than the dead time. The metadata leader
/// declares it dead, the survivors copy every blob it owned to the blobs' next owners (each
/// blob at R = 3 live owners again), and pulls go on meanwhile. Back, it owns its share
/// again and the stand-ins drop the copies they took: every copy where placement wants it,
/// and nowhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_dead_past_the_dead_time_has_its_blobs_copied_again() {
    let options = berth_tests::cluster::ClusterOptions {
        storage_nodes: 4,
        meta_args: vec!["--storage-dead-after-secs".into(), "8".into()],
        // The blobs are seconds old when the node dies: passes may look at them at once.
        storage_args: vec!["--placement-grace-secs".into(), "1".into()],
        ..Default::default()
    };
    let mut cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let meta = cl.meta.addrs();
    let c = client();
    let sizes = [1_000, 40_000, 300_000, 700_000];
    let mut blobs: Vec<(Digest, Vec<u8>)> = vec![];
    for i in 0..40u64 {
        let data = bytes(7_000 + i, sizes[i as usize % sizes.len()]);
        let d = berth_tests::push_blob(&c, &fronts[i as usize % 2], "acme/heal", &data).await;
        blobs.push((d.parse().unwrap(), data));
    }
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let (census, _) = berth_tests::cluster::wait_for_exact_copies(&meta, &digests, 3, Duration::from_secs(30)).await;
    assert_eq!(census, Default::default(), "copies before the kill");
    let victim = StorageClient::new(&cl.storage[0].addr, StorageClientConfig::default()).unwrap();
    let mut held = 0;
    for d in &digests {
        held += usize::from(matches!(victim.stat(d).await, Ok(Some(_))));
    }
    assert!(held > 10, "node 0 holds {held} of {} blobs", digests.len());
    let moved_before = tokio::task::block_in_place(|| bytes_moved(&cl));

    tokio::task::block_in_place(|| cl.kill_storage(0));
    let killed = Instant::now();
    let addr = cl.storage[0].addr.clone();
    let mut declared = None;
    while killed.elapsed() < Duration::from_secs(20) {
        if tokio::task::block_in_place(|| storage_node(&cl, &addr)).is_some_and(|(_, state, _)| state == "dead") {
            declared = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let declared = declared.expect("the killed node declared dead");
    // Pulls go on while its blobs are copied again.
    for (i, (d, data)) in blobs.iter().enumerate() {
        let r = c.get(format!("{}/v2/acme/heal/blobs/{d}", fronts[i % 2])).send().await.unwrap();
        assert_eq!(r.status(), 200, "{d}");
        assert!(r.bytes().await.unwrap() == data[..], "{d}");
    }
    let (census, took) = berth_tests::cluster::wait_for_exact_copies(&meta, &digests, 3, Duration::from_secs(60)).await;
    // The nodes report what they copied in their next heartbeats (every 3 s).
    let mut moved = 0;
    for _ in 0..20 {
        moved = tokio::task::block_in_place(|| bytes_moved(&cl)).saturating_sub(moved_before);
        if moved > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(moved > 0, "the survivors report copies made");
    eprintln!(
        "storage node dead: declared after {declared:?}; {held} of its blobs back at three live owners {took:?} later; \
         {moved} bytes copied ({:.1} MB/s)",
        moved as f64 / 1e6 / took.as_secs_f64().max(0.001)
    );
    assert_eq!(census, Default::default(), "every blob at its three live owners");

    // Back: it owns its share again, and the stand-ins' copies go.
    tokio::task::block_in_place(|| cl.restart_storage(0));
    let back = Instant::now();
    while tokio::task::block_in_place(|| storage_node(&cl, &addr)).is_none_or(|(_, state, _)| state != "live") {
        assert!(back.elapsed() < Duration::from_secs(20), "the restarted node is live again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (census, took) = berth_tests::cluster::wait_for_exact_copies(&meta, &digests, 3, Duration::from_secs(60)).await;
    eprintln!(
        "storage node back after {:?}: copies where placement wants them, and nowhere else, {took:?} later",
        back.elapsed() - took
    );
    assert_eq!(census, Default::default(), "copies after the node came back");
    // It owns its old blobs again: it kept them all and dropped none (as its heartbeats,
    // every 3 s, report once its first pass has counted them).
    let mut node = Value::Null;
    for _ in 0..30 {
        let map: Value = serde_json::from_str(
            &tokio::task::block_in_place(|| berth_tests::meta_group::cluster_cli(&meta, &["storage"])).unwrap(),
        )
        .unwrap();
        node = map["nodes"].as_array().unwrap().iter().find(|n| n["addr"] == addr.as_str()).unwrap().clone();
        if node["blobs"].as_u64() == Some(held as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(node["blobs"].as_u64(), Some(held as u64), "{node}");
    assert_eq!(node["moving"]["copies_dropped"], 0, "{node}");
}

/// Under a push and pull load through both frontends, a fourth storage node joins (it takes
/// its share of the existing blobs), then one of the first three is drained (its blobs go to
/// their other owners) and removed: afterwards every blob has exactly its three copies at its
/// owners, and no push or pull failed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_under_load_then_one_is_drained_and_removed() {
    // Short enough for a test, longer than a frontend takes to see a new map (it polls every
    // 2 s) and finish the pushes it began under the old one.
    let options = berth_tests::cluster::ClusterOptions {
        storage_args: vec!["--placement-grace-secs".into(), "6".into()],
        ..Default::default()
    };
    let mut cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let meta = cl.meta.addrs();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Pushed>>> = Arc::default();
    let (failed_pushes, failed_pulls, pulled) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = vec![];
    for w in 0..2usize {
        let (front, stop_pushing, acked_pushes, failed) =
            (fronts[w].clone(), stop.clone(), acked.clone(), failed_pushes.clone());
        load.push(tokio::spawn(async move {
            let (stop, acked) = (stop_pushing, acked_pushes);
            let c = client();
            let first = 20_000 * (w as u64 + 1);
            let mut seed = first;
            // At most 400 images each, paced: the load runs for the whole test, bounded.
            while !stop.load(Ordering::Relaxed) && seed < first + 400 {
                seed += 1;
                let repo = format!("acme/grow{w}");
                match try_push_image(&c, &front, &repo, seed, seed.is_multiple_of(2)).await {
                    Some((m, blobs)) => acked.lock().unwrap().push((repo, m, blobs)),
                    None => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
        let (other, stop, acked, failed, pulled) =
            (fronts[1 - w].clone(), stop.clone(), acked.clone(), failed_pulls.clone(), pulled.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            let mut k = w;
            while !stop.load(Ordering::Relaxed) {
                let pick = {
                    let a = acked.lock().unwrap();
                    (!a.is_empty()).then(|| a[k % a.len()].clone())
                };
                k += 7;
                let Some((repo, m, _)) = pick else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if pulls(&c, &other, &repo, &m).await {
                    pulled.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("pull of {repo}@{m} through {other} failed");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let acked_blobs = |acked: &Arc<Mutex<Vec<Pushed>>>| -> Vec<Digest> {
        acked.lock().unwrap().iter().flat_map(|(_, _, b)| b.iter().map(|d| d.parse().unwrap())).collect()
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let moved_before = tokio::task::block_in_place(|| bytes_moved(&cl));
    let joined = tokio::task::block_in_place(|| {
        let i = cl.add_storage();
        berth_tests::cluster::wait_for_storage(&cl.meta, 4);
        i
    });
    let join_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_join = acked_blobs(&acked);
    let (census, _) =
        berth_tests::cluster::wait_for_exact_copies(&meta, &before_join, 3, Duration::from_secs(90)).await;
    let join_took = join_started.elapsed();
    let moved_join = tokio::task::block_in_place(|| bytes_moved(&cl)).saturating_sub(moved_before);
    assert_eq!(census, Default::default(), "the blobs pushed so far at their owners once a node joined");
    let newcomer = StorageClient::new(&cl.storage[joined].addr, StorageClientConfig::default()).unwrap();
    let mut on_new = 0;
    for d in &before_join {
        on_new += usize::from(matches!(newcomer.stat(d).await, Ok(Some(_))));
    }
    eprintln!(
        "node joined: {on_new} of {} blobs moved onto it in {join_took:?} ({moved_join} bytes, {:.1} MB/s)",
        before_join.len(),
        moved_join as f64 / 1e6 / join_took.as_secs_f64()
    );
    assert!(on_new > 0, "the new node took none of the existing blobs");

    let addr = cl.storage[0].addr.clone();
    let (name, _, _) = tokio::task::block_in_place(|| storage_node(&cl, &addr)).expect("node 0 in the map");
    tokio::task::block_in_place(|| berth_tests::meta_group::cluster_cli(&meta, &["drain", &name])).unwrap();
    let drain_started = Instant::now();
    let moved_before = tokio::task::block_in_place(|| bytes_moved(&cl));
    // Drained once its heartbeat reports no blobs.
    let mut drained = false;
    while drain_started.elapsed() < Duration::from_secs(90) {
        let node = tokio::task::block_in_place(|| storage_node(&cl, &addr));
        if node.as_ref().is_some_and(|(_, state, blobs)| state == "draining" && *blobs == 0) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_took = drain_started.elapsed();
    let moved_drain = tokio::task::block_in_place(|| bytes_moved(&cl)).saturating_sub(moved_before);
    assert!(drained, "node 0 still holds blobs after {drain_took:?}");
    eprintln!(
        "node drained in {drain_took:?} ({moved_drain} bytes, {:.1} MB/s)",
        moved_drain as f64 / 1e6 / drain_took.as_secs_f64()
    );
    // Removal is accepted once a pass after the drain reported the node empty (heartbeats
    // every 3 s carry it).
    let mut removed = Err(String::new());
    for _ in 0..40 {
        removed = tokio::task::block_in_place(|| berth_tests::meta_group::cluster_cli(&meta, &["remove", &name]));
        if removed.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(removed.map(|s| s.trim().to_string()), Ok("ok".to_string()));
    tokio::task::block_in_place(|| cl.kill_storage(0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let all = acked_blobs(&acked);
    let (census, _) = berth_tests::cluster::wait_for_exact_copies(&meta, &all, 3, Duration::from_secs(60)).await;
    let (failed_pushes, failed_pulls) = (failed_pushes.load(Ordering::Relaxed), failed_pulls.load(Ordering::Relaxed));
    eprintln!(
        "join, drain and removal under load: {} images pushed, {failed_pushes} failed; {} pulls, {failed_pulls} failed",
        acked.lock().unwrap().len(),
        pulled.load(Ordering::Relaxed)
    );
    assert_eq!(census, Default::default(), "every blob at exactly its three owners");
    assert_eq!(failed_pushes, 0);
    assert_eq!(failed_pulls, 0);
    let acked = acked.lock().unwrap().clone();
    for (repo, m, _) in &acked {
        assert!(pulls(&client(), &fronts[1], repo, m).await, "{repo}@{m} after the drain");
    }
}

/// One flipped byte in a stored copy: pulls through both frontends never return it (a read
/// checks each 1 MiB unit before sending it and goes on from another replica), and the node
/// replaces its copy from a good replica. A second copy damaged where no read goes is found by
/// the scrub and replaced the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_copy_is_never_served_and_is_mended() {
    use berth_storage::placement::{Member, Placement};
    let options = berth_tests::cluster::ClusterOptions {
        storage_args: vec!["--scrub-bandwidth".into(), "0".into(), "--scrub-pause-secs".into(), "3".into()],
        ..Default::default()
    };
    let cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let fronts = [cl.frontends[0].url(), cl.frontends[1].url()];
    let meta = cl.meta.addrs();
    let c = client();
    let unit = 1 << 20;
    let read_one = bytes(41, 3 * unit + 999);
    let scrubbed_one = bytes(42, 2 * unit + 5);
    let a: Digest = berth_tests::push_blob(&c, &fronts[0], "acme/scrub", &read_one).await.parse().unwrap();
    let b: Digest = berth_tests::push_blob(&c, &fronts[0], "acme/scrub", &scrubbed_one).await.parse().unwrap();
    let (census, _) =
        berth_tests::cluster::wait_for_exact_copies(&meta, &[a.clone(), b.clone()], 3, Duration::from_secs(30)).await;
    assert_eq!(census, Default::default());

    // The node reads of `a` go to first, by the placement the frontends compute.
    let map: Value = serde_json::from_str(
        &tokio::task::block_in_place(|| berth_tests::meta_group::cluster_cli(&meta, &["storage"])).unwrap(),
    )
    .unwrap();
    let nodes = map["nodes"].as_array().unwrap();
    let placement = Placement::new(
        nodes
            .iter()
            .map(|n| Member {
                name: n["name"].as_str().unwrap().into(),
                zone: None,
                weight: n["capacity"].as_u64().unwrap(),
                owns: true,
            })
            .collect(),
    );
    let index_of = |addr: &str| cl.storage.iter().position(|s| s.addr == addr).unwrap();
    let first = index_of(nodes[placement.placed(&a, 3)[0]]["addr"].as_str().unwrap());
    let other = (first + 1) % 3;
    let blob_file = |i: usize, d: &Digest| cl.storage_dir(i).join("blobs/sha256").join(&d.hex()[..2]).join(d.hex());
    let flip = |path: std::path::PathBuf, at: usize| {
        let mut data = std::fs::read(&path).unwrap();
        data[at] ^= 0x20;
        std::fs::write(&path, data).unwrap();
    };
    // In the second unit, so that the first read fails part way.
    flip(blob_file(first, &a), unit + 12_345);

    for i in 0..20 {
        let r = c.get(format!("{}/v2/acme/scrub/blobs/{a}", fronts[i % 2])).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert!(body == read_one[..], "pull {i} returned other bytes ({} of {})", body.len(), read_one.len());
    }
    let mended = |i: usize, d: Digest, want: Vec<u8>| {
        let addr = cl.storage[i].addr.clone();
        async move {
            let node = StorageClient::new(&addr, StorageClientConfig::default()).unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(s) = node.read(&d, None).await {
                    let mut got = vec![];
                    let mut s = s;
                    let mut ok = true;
                    while let Some(chunk) = futures::StreamExt::next(&mut s).await {
                        match chunk {
                            Ok(c) => got.extend_from_slice(&c),
                            Err(_) => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    if ok && got == want {
                        return Some(start.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            None
        }
    };
    let took = mended(first, a.clone(), read_one.clone()).await.expect("the damaged copy read into is mended");
    eprintln!("a copy damaged and met by a read: mended {took:?} after 20 good pulls");

    // Damaged where no read goes: the scrub finds it.
    flip(blob_file(other, &b), 7);
    let took = mended(other, b.clone(), scrubbed_one.clone()).await.expect("the scrub finds and mends the damage");
    eprintln!("a copy damaged and left alone: found by the scrub and mended within {took:?}");
    // What the nodes report, in their heartbeats (every 3 s).
    let (mut found, mut fixed, mut map) = (0, 0, Value::Null);
    for _ in 0..30 {
        map = serde_json::from_str(
            &tokio::task::block_in_place(|| berth_tests::meta_group::cluster_cli(&meta, &["storage"])).unwrap(),
        )
        .unwrap();
        let sum = |field: &str| -> u64 {
            map["nodes"].as_array().unwrap().iter().filter_map(|n| n["scrub"][field].as_u64()).sum()
        };
        (found, fixed) = (sum("damaged_found"), sum("mended"));
        if found >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Mended by the node itself or first by another's placement pass: either way, checked above.
    eprintln!("storage nodes report {found} damaged copies found, {fixed} mended by their own mender");
    assert!(found >= 2, "{map}");
    // The damaged files are kept aside, never served.
    assert!(std::fs::read_dir(cl.storage_dir(first).join("quarantine")).unwrap().count() >= 1);
}

/// Garbage collection in a loop on the metadata leader while pushes, retags and deletes run
/// through both frontends, and the leader SIGKILLed in the middle (and brought back): every
/// acknowledged, undeleted image pulls and verifies through both frontends, and on every
/// storage node the layer files left are exactly those live images reference. `berth admin
/// gc` then reports through a frontend, and a dry run afterwards finds nothing left to free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_collection_across_the_cluster_survives_a_leader_kill() {
    use berth_tests::cluster::ClusterOptions;
    use berth_tests::soak::{eventually, files, large_files, Soak};
    let options = ClusterOptions { meta_args: vec!["--gc-grace-secs".into(), "1".into()], ..Default::default() };
    let mut cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let layer_files = |cl: &Cluster| -> Vec<(usize, u64)> {
        (0..cl.storage.len()).map(|i| files(&cl.storage_dir(i).join("blobs"))).collect()
    };
    let soak = Soak::new(cl.frontends.iter().map(|f| f.url()).collect());
    let started = Instant::now();
    let soaking = {
        let soak = soak.clone();
        tokio::spawn(async move { soak.run(4, started + Duration::from_secs(24)).await })
    };
    // The leader goes down a third of the way in, and comes back a few seconds later.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let leader = tokio::task::block_in_place(|| cl.meta.wait_for_leader(Duration::from_secs(10))).expect("a leader");
    let before_kill = layer_files(&cl);
    tokio::task::block_in_place(|| cl.meta.nodes[leader as usize - 1].kill());
    let killed = Instant::now();
    let next = tokio::task::block_in_place(|| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            match cl.meta.leader() {
                Some(l) if l != leader => return Some(l),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        None
    })
    .expect("a new leader");
    eprintln!("leader {leader} killed; {next} leads after {:?}", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::block_in_place(|| cl.meta.nodes[leader as usize - 1].restart());
    soaking.await.unwrap();
    let at_end = layer_files(&cl);
    let (expected, summary) = {
        let l = soak.ledger.lock().unwrap();
        assert!(l.pushed > 10 && l.deleted > 3, "the soak did too little to mean anything");
        let summary = l.to_string();
        (large_files(&l.referenced()), summary)
    };
    // Every node holds every blob (three nodes, three copies): each ends with exactly the
    // layer files live images reference.
    let settled = eventually(Duration::from_secs(60), || layer_files(&cl).iter().all(|f| *f == expected)).await;
    let after = layer_files(&cl);
    eprintln!(
        "cluster gc soak: {summary}; layer files per storage node (count, bytes): at the leader kill {before_kill:?}, \
         at the end of the load {at_end:?}, after collection {after:?}; live images reference {expected:?}"
    );
    assert!(settled, "layer files per node {after:?} differ from what live images reference {expected:?}");
    soak.check_live_images().await;
    // On demand, through a frontend: nothing is left to free.
    let url = cl.frontends[1].url();
    let run = tokio::task::block_in_place(|| berth_tests::admin_gc(&url, false));
    eprintln!("berth admin gc after the soak: {run}");
    assert_eq!(run["dry_run"], false, "{run}");
    let dry = tokio::task::block_in_place(|| berth_tests::admin_gc(&url, true));
    assert_eq!((dry["blobs"].as_u64(), dry["strays"].as_u64()), (Some(0), Some(0)), "{dry}");
    assert!(layer_files(&cl).iter().all(|f| *f == expected));
}

/// `berth admin gc` on a cluster deletes an unreferenced blob's copies on every storage node at
/// once and reports them; a dry run before it counts the blob and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_gc_deletes_every_copy_and_reports_it() {
    use berth_tests::cluster::ClusterOptions;
    use berth_tests::soak::files;
    let meta_args = ["--gc-grace-secs", "1", "--gc-interval-secs", "0"].map(String::from).to_vec();
    let cl = tokio::task::block_in_place(|| Cluster::start_with(ClusterOptions { meta_args, ..Default::default() }));
    let (a, b) = (cl.frontends[0].url(), cl.frontends[1].url());
    let c = client();
    let m = push_image(&c, &a, "acme/gone", "v1", 11, &[700_000]).await;
    push_image(&c, &a, "acme/kept", "v1", 12, &[600_000]).await;
    let layer_files = || -> Vec<(usize, u64)> { (0..3).map(|i| files(&cl.storage_dir(i).join("blobs"))).collect() };
    assert_eq!(layer_files(), vec![(2, 1_300_000); 3]);
    let r = c.delete(format!("{b}/v2/acme/gone/manifests/{m}")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gc = |dry: bool| tokio::task::block_in_place(|| berth_tests::admin_gc(&b, dry));
    let dry = gc(true);
    eprintln!("dry run: {dry}");
    assert!(dry["blobs"].as_u64().unwrap() >= 1 && dry["bytes"].as_u64().unwrap() >= 700_000, "{dry}");
    assert_eq!(layer_files(), vec![(2, 1_300_000); 3], "a dry run deletes nothing");
    let run = gc(false);
    eprintln!("run: {run}");
    assert_eq!((run["blobs"].as_u64(), run["bytes"].as_u64()), (dry["blobs"].as_u64(), dry["bytes"].as_u64()));
    assert!(run["copies"].as_u64().unwrap() >= 3, "three copies of the layer at least: {run}");
    assert!(run["copy_bytes"].as_u64().unwrap() >= 3 * 700_000, "{run}");
    assert_eq!(layer_files(), vec![(1, 600_000); 3], "every node's copy went at once");
    let r = c.get(format!("{a}/v2/acme/kept/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Anti-entropy, both ways: a copy an owner lost behind the registry's back (deleted straight
/// from the node) is found by the leader's audit of linked blobs and copied back; a blob stored
/// on one node that no repository links (put straight into the node) is found by the leader's
/// inventory walk and collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_audits_links_against_copies_both_ways() {
    use berth_tests::cluster::{copy_census, wait_for_exact_copies, ClusterOptions};
    let meta_args = ["--gc-grace-secs", "1", "--audit-after-secs", "1"].map(String::from).to_vec();
    // The storage nodes' own placement passes stay out of the way (their next pass after the
    // map settles comes 20 minutes later): only the audit can bring the copies back.
    let storage_args = ["--placement-grace-secs", "600"].map(String::from).to_vec();
    let options = ClusterOptions { meta_args, storage_args, ..Default::default() };
    let cl = tokio::task::block_in_place(|| Cluster::start_with(options));
    let c = client();
    let a = cl.frontends[0].url();
    let m = push_image(&c, &a, "acme/audited", "v1", 21, &[400_000, 3000]).await;
    let manifest: Value =
        c.get(format!("{a}/v2/acme/audited/manifests/{m}")).send().await.unwrap().json().await.unwrap();
    let mut blobs: Vec<Digest> =
        vec![m.parse().unwrap(), manifest["config"]["digest"].as_str().unwrap().parse().unwrap()];
    for l in manifest["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().parse().unwrap());
    }
    let meta = cl.meta.addrs();
    assert_eq!(copy_census(&meta, &blobs, 3).await.missing, 0);
    let node = StorageClient::new(&cl.storage[1].addr, StorageClientConfig::default()).unwrap();
    for d in &blobs[1..] {
        assert!(node.delete(d, None).await.unwrap().any());
    }
    assert_eq!(copy_census(&meta, &blobs, 3).await.missing, 3, "config and two layers");
    let (census, took) = wait_for_exact_copies(&meta, &blobs, 3, Duration::from_secs(30)).await;
    eprintln!("three copies lost behind the registry's back: back at every owner after {took:?}");
    assert_eq!(census.missing, 0, "the audit found the lost copies and they were repaired");

    let stray = bytes(22, 500_000);
    let sd = Digest::sha256_of(&stray);
    let other = StorageClient::new(&cl.storage[2].addr, StorageClientConfig::default()).unwrap();
    let body: berth_core::ByteStream = Box::pin(futures::stream::iter([Ok(::bytes::Bytes::from(stray.clone()))]));
    other.put(&sd, body, u64::MAX).await.unwrap();
    let start = Instant::now();
    while other.stat(&sd).await.unwrap().is_some() && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(other.stat(&sd).await.unwrap(), None, "the stray copy is collected");
    eprintln!("a stray copy on one node: collected after {:?}", start.elapsed());
    // The audited image still pulls whole.
    for d in &blobs[1..] {
        let r = c.get(format!("{a}/v2/acme/audited/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(digest(&r.bytes().await.unwrap()), d.to_string());
    }
}

/// The packages REST API through a frontend of the cluster: the listing and the versions come
/// from the metadata group over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packages_api_answers_through_a_frontend_of_the_cluster() {
    let cl = tokio::task::block_in_place(Cluster::start);
    let (a, b) = (cl.frontends[0].url(), cl.frontends[1].url());
    let c = client();
    for probe in ["healthz", "readyz"] {
        let r = reqwest::get(format!("{b}/{probe}")).await.unwrap();
        assert_eq!(r.status(), 200, "/{probe}: {}", r.text().await.unwrap());
    }
    let m = push_image(&c, &a, "admin/tools/cli", "v1", 31, &[2000]).await;
    let r = c.get(format!("{b}/api/v3/user/packages?package_type=container")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    assert_eq!((list[0]["name"].as_str(), list[0]["version_count"].as_u64()), (Some("tools/cli"), Some(1)));
    let r = c.get(format!("{b}/api/v3/users/admin/packages/container/tools%2Fcli/versions")).send().await.unwrap();
    let versions: Value = r.json().await.unwrap();
    assert_eq!(versions[0]["name"].as_str(), Some(m.as_str()));
    assert_eq!(versions[0]["metadata"]["container"]["tags"], serde_json::json!(["v1"]));
    // Deleted through one frontend, restored through the other; pulls follow.
    push_image(&c, &b, "admin/tools/cli", "v2", 32, &[2000]).await;
    let api = "api/v3/users/admin/packages/container/tools%2Fcli";
    let id = versions[0]["id"].as_u64().unwrap();
    let v1 = |url: String| {
        let c = c.clone();
        async move {
            let r = c
                .get(format!("{url}/v2/admin/tools/cli/manifests/v1"))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send();
            r.await.unwrap().status()
        }
    };
    assert_eq!(c.delete(format!("{a}/{api}/versions/{id}")).send().await.unwrap().status(), 204);
    assert_eq!(v1(b.clone()).await, 404);
    let r = c.get(format!("{b}/{api}/versions?state=deleted")).send().await.unwrap();
    let deleted: Value = r.json().await.unwrap();
    assert_eq!(deleted[0]["name"].as_str(), Some(m.as_str()));
    assert!(deleted[0]["deleted_at"].is_string());
    assert_eq!(c.post(format!("{b}/{api}/versions/{id}/restore")).send().await.unwrap().status(), 204);
    assert_eq!(v1(a.clone()).await, 200);
    // Pulls through both frontends add up in the version's download count.
    assert_eq!(v1(b.clone()).await, 200);
    let started = std::time::Instant::now();
    loop {
        let r = c.get(format!("{a}/{api}/versions/{id}")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if v["download_count"] == 2 {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "download count {}", v["download_count"]);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
