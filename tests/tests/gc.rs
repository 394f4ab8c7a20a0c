//! Deletes and garbage collection against `berth standalone`: what a delete releases is
//! reclaimed, what is still referenced is never taken, and a soak of concurrent pushes,
//! retags and deletes with the collector running ends with every acknowledged image intact
//! and nothing else on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_tests::{bytes, client, digest, image_manifest, push_blob, push_image, put_manifest, Server};
use serde_json::Value;

/// Garbage collection settles within a few sweeps of a one-second grace period.
const GRACE: &[&str] = &["--gc-grace-secs", "1"];

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.expect("JSON error body");
    v["errors"][0]["code"].as_str().expect("errors[0].code").to_string()
}

/// Files under `dir` (recursively) and their total size.
fn files(dir: &Path) -> (usize, u64) {
    let mut out = (0, 0);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                let (n, b) = files(&e.path());
                out = (out.0 + n, out.1 + b);
            } else {
                out = (out.0 + 1, out.1 + meta.len());
            }
        }
    }
    out
}

/// The large-blob files of a server's storage.
fn blob_files(s: &Server) -> (usize, u64) {
    files(&s.data_dir.join("storage").join("blobs"))
}

/// Waits until `cond` holds, for at most `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cond()
}

#[tokio::test]
async fn deleting_an_image_reclaims_its_config_and_layers() {
    let s = Server::start_with(GRACE);
    let c = client();
    let m = push_image(&c, &s.url, "acme/app", "v1", 1, &[600_000, 700_000]).await;
    let (n, bytes_before) = blob_files(&s);
    assert_eq!(n, 2);
    let r = c.delete(format!("{}/v2/acme/app/manifests/{m}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(
        eventually(Duration::from_secs(20), || blob_files(&s).0 == 0).await,
        "the layers of a deleted image are reclaimed: {:?} left",
        blob_files(&s)
    );
    eprintln!("reclaimed {bytes_before} bytes of layer files after deleting the image");
}

#[tokio::test]
async fn referenced_blobs_cannot_be_deleted_and_the_image_keeps_pulling() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), "127.0.0.1:0", GRACE);
    let c = client();
    let m = push_image(&c, &s.url, "acme/app", "v1", 2, &[400_000]).await;
    let manifest: Value =
        c.get(format!("{}/v2/acme/app/manifests/v1", s.url)).send().await.unwrap().json().await.unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    for d in [&layer, &config, &m] {
        let r = c.delete(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 409, "{d}");
        assert_eq!(error_code(r).await, "DENIED");
    }
    // Several sweeps later, after a restart too, the image pulls whole.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.stop();
    let s = Server::start_in(dir.path(), "127.0.0.1:0", GRACE);
    for d in [&layer, &config] {
        let r = c.get(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(&digest(&r.bytes().await.unwrap()), d);
    }
    let r = c.get(format!("{}/v2/acme/app/manifests/{m}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A blob nothing references is deleted at once.
    let loose = push_blob(&c, &s.url, "acme/app", &bytes(9, 1000)).await;
    let r = c.delete(format!("{}/v2/acme/app/blobs/{loose}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn bytes_of_refused_manifests_are_collected() {
    let s = Server::start_with(GRACE);
    let c = client();
    let (_, empty) = blob_files(&s);
    for i in 0..5 {
        // A 1 MB manifest whose blobs were never pushed.
        let pad = "x".repeat(1_000_000);
        let body = image_manifest(
            (&digest(format!("cfg{i}").as_bytes()), 10),
            &[(&digest(b"never pushed"), 10)],
            &format!(r#","annotations":{{"pad":"{pad}"}}"#),
        );
        let r = put_manifest(&c, &s.url, "acme/junk", &format!("t{i}"), body).await;
        assert_eq!(r.status(), 400);
        assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    }
    let (n, grown) = blob_files(&s);
    assert_eq!(n, 5, "each refused manifest's bytes reached the disk");
    assert!(
        eventually(Duration::from_secs(30), || blob_files(&s).0 == 0).await,
        "refused manifests' bytes stay on disk: {:?}",
        blob_files(&s)
    );
    eprintln!("refused manifests: {grown} bytes on disk, {} after collection (empty: {empty})", blob_files(&s).1);
}

#[tokio::test]
async fn an_emptied_repository_leaves_the_catalog() {
    let s = Server::start_with(GRACE);
    let c = client();
    let keep = push_image(&c, &s.url, "acme/keep", "v1", 3, &[100]).await;
    let gone = push_image(&c, &s.url, "acme/gone", "v1", 4, &[100]).await;
    let r = c.delete(format!("{}/v2/acme/gone/manifests/{gone}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let cat: Value = c.get(format!("{}/v2/_catalog", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(cat["repositories"], serde_json::json!(["acme/keep"]));
    let r = c.get(format!("{}/v2/acme/gone/tags/list", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    assert_eq!(c.get(format!("{}/v2/acme/keep/manifests/{keep}", s.url)).send().await.unwrap().status(), 200);
}

// ---- the soak -------------------------------------------------------------------------------

/// An image the soak pushed and had acknowledged, with what it references.
#[derive(Clone, Debug)]
struct Image {
    repo: String,
    manifest: String,
    tags: Vec<String>,
    /// (digest, size) of its config and layers.
    blobs: Vec<(String, usize)>,
}

#[derive(Default)]
struct Ledger {
    live: BTreeMap<String, Image>,
    pushed: usize,
    deleted: usize,
    retagged: usize,
    refused_blob_deletes: usize,
    loose_deletes: usize,
}

const SOAK: Duration = Duration::from_secs(15);
const SOAK_WORKERS: u64 = 4;
/// Layers every image shares within its repository (so deletes and pushes contend for them).
const SHARED: usize = 3;

fn shared_layer(repo: &str, i: usize) -> Vec<u8> {
    bytes(0x5_0000 + i as u64 + repo.len() as u64 * 100, 300_000 + i * 1000)
}

/// Pushes an image of a fresh large layer, a shared one and a config; retries once when a
/// shared layer was collected between its upload and the manifest (the registry says so).
async fn push(c: &reqwest::Client, url: &str, repo: &str, seed: u64, tag: &str) -> Option<Image> {
    for _ in 0..2 {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
        let own = bytes(seed, 260_000 + (seed as usize % 7) * 10_000);
        let shared = shared_layer(repo, seed as usize % SHARED);
        let mut blobs = vec![];
        for data in [&config, &own, &shared] {
            blobs.push((push_blob_racing_gc(c, url, repo, data).await, data.len()));
        }
        let layers: Vec<(&str, usize)> = blobs[1..].iter().map(|(d, n)| (d.as_str(), *n)).collect();
        let body = image_manifest((&blobs[0].0, blobs[0].1), &layers, "");
        let r = put_manifest(c, url, repo, tag, body.clone()).await;
        match r.status().as_u16() {
            201 => {
                return Some(Image {
                    repo: repo.into(),
                    manifest: digest(body.as_bytes()),
                    tags: vec![tag.into()],
                    blobs,
                })
            }
            400 => continue,
            other => panic!("manifest push answered {other}: {:?}", r.text().await),
        }
    }
    None
}

/// Deletes and retags of one repository take its lock, so that a retag never re-creates an
/// image another worker has just deleted (the ledger would not know it); pushes take none.
type RepoLocks = Arc<[tokio::sync::Mutex<()>; 2]>;

/// Pushes a blob monolithically. A push that meets the collector deleting the same blob (it
/// found the old copy stored just as the collector fenced it) is refused with `BLOB_UNKNOWN`
/// and succeeds when made again, as a client's retry would.
async fn push_blob_racing_gc(c: &reqwest::Client, url: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    for _ in 0..20 {
        let r = c.post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().await.unwrap();
        match r.status().as_u16() {
            201 => return d,
            404 => {
                assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("blob push answered {other}: {:?}", r.text().await),
        }
    }
    panic!("blob {d} could not be pushed in 20 tries")
}

async fn soak_worker(url: String, worker: u64, ledger: Arc<Mutex<Ledger>>, locks: RepoLocks, until: Instant) {
    let c = client();
    let mut i = 0u64;
    while Instant::now() < until && i < 10_000 {
        i += 1;
        let r_index = ((worker + i) % 2) as usize;
        let repo = format!("soak/r{r_index}");
        let seed = worker << 32 | i;
        let _repo_lock = if matches!(i % 5, 3 | 4) { Some(locks[r_index].lock().await) } else { None };
        match i % 5 {
            // Delete one of the live images of this repository.
            3 => {
                let victim = {
                    let l = ledger.lock().unwrap();
                    l.live.values().filter(|im| im.repo == repo).nth((seed % 3) as usize).cloned()
                };
                if let Some(v) = victim {
                    let r = c.delete(format!("{url}/v2/{}/manifests/{}", v.repo, v.manifest)).send().await.unwrap();
                    assert_eq!(r.status(), 202);
                    let mut l = ledger.lock().unwrap();
                    l.live.remove(&v.manifest);
                    l.deleted += 1;
                }
            }
            // Retag a live image, and try to delete a blob it references.
            4 => {
                let target = {
                    let l = ledger.lock().unwrap();
                    l.live.values().rfind(|im| im.repo == repo).cloned()
                };
                if let Some(t) = target {
                    let body = c
                        .get(format!("{url}/v2/{}/manifests/{}", t.repo, t.manifest))
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap();
                    let tag = format!("re{worker}x{i}");
                    let put = put_manifest(&c, &url, &t.repo, &tag, body.clone()).await;
                    let r = c.delete(format!("{url}/v2/{}/blobs/{}", t.repo, t.blobs[1].0)).send().await.unwrap();
                    assert_eq!(put.status(), 201);
                    assert_eq!(r.status(), 409, "a referenced blob's delete is refused");
                    let mut l = ledger.lock().unwrap();
                    if let Some(im) = l.live.get_mut(&t.manifest) {
                        im.tags.push(tag);
                    }
                    l.retagged += 1;
                    l.refused_blob_deletes += 1;
                }
            }
            // A blob pushed and deleted again before any manifest references it.
            2 => {
                let d = push_blob_racing_gc(&c, &url, &repo, &bytes(seed ^ 0xabc, 2000)).await;
                let r = c.delete(format!("{url}/v2/{repo}/blobs/{d}")).send().await.unwrap();
                assert_eq!(r.status(), 202);
                ledger.lock().unwrap().loose_deletes += 1;
            }
            _ => {
                if let Some(im) = push(&c, &url, &repo, seed, &format!("w{worker}i{i}")).await {
                    let mut l = ledger.lock().unwrap();
                    l.pushed += 1;
                    l.live.insert(im.manifest.clone(), im);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_soak_keeps_every_live_image_and_nothing_else() {
    let s = Server::start_with(GRACE);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let locks: RepoLocks = Arc::new([tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())]);
    let until = Instant::now() + SOAK;
    let workers: Vec<_> = (0..SOAK_WORKERS)
        .map(|w| tokio::spawn(soak_worker(s.url.clone(), w, ledger.clone(), locks.clone(), until)))
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    // Every worker is done: the ledger is final.
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    let c = client();
    // What live images reference, and the large blobs among it (those live in files).
    let mut referenced: BTreeSet<(String, usize)> = BTreeSet::new();
    for im in l.live.values() {
        referenced.extend(im.blobs.iter().cloned());
    }
    let files_expected: Vec<&(String, usize)> = referenced.iter().filter(|(_, n)| *n as u64 > 256 * 1024).collect();
    let expected_bytes: u64 = files_expected.iter().map(|(_, n)| *n as u64).sum();
    let settled =
        eventually(Duration::from_secs(40), || blob_files(&s) == (files_expected.len(), expected_bytes)).await;
    let on_disk = blob_files(&s);
    eprintln!(
        "gc soak: {} pushed, {} deleted, {} retagged, {} referenced-blob deletes refused, {} loose blobs deleted; \
         {} live images; layer files on disk {} ({} bytes), referenced by live images {} ({} bytes); \
         segments {} bytes",
        l.pushed,
        l.deleted,
        l.retagged,
        l.refused_blob_deletes,
        l.loose_deletes,
        l.live.len(),
        on_disk.0,
        on_disk.1,
        files_expected.len(),
        expected_bytes,
        files(&s.data_dir.join("storage").join("segments")).1,
    );
    assert!(l.pushed > 10 && l.deleted > 3, "the soak did too little to mean anything");
    assert!(settled, "bytes on disk {on_disk:?} differ from what live images reference");
    // Every acknowledged, undeleted image pulls, by digest and by each tag, and verifies.
    for im in l.live.values() {
        for reference in im.tags.iter().chain([&im.manifest]) {
            let r = c.get(format!("{}/v2/{}/manifests/{reference}", s.url, im.repo)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{} {reference}", im.repo);
            assert_eq!(digest(&r.bytes().await.unwrap()), im.manifest);
        }
        for (d, n) in &im.blobs {
            let r = c.get(format!("{}/v2/{}/blobs/{d}", s.url, im.repo)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{} {d}", im.repo);
            let body = r.bytes().await.unwrap();
            assert_eq!((digest(&body), body.len()), (d.clone(), *n));
        }
    }
}
