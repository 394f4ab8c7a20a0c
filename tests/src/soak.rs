//! The garbage collection soak: workers push images, retag them, delete them and push loose
//! blobs through one or more registry URLs while the collector runs, keeping a ledger of what
//! was acknowledged. Afterwards every live image must pull whole and nothing else stay on disk.
//!
//! A request the registry answers `503` (no metadata leader for a moment) or that gets no
//! answer is made again until it is answered, for up to [`RETRY_FOR`]: all of them are
//! idempotent, so the ledger records each operation once it is acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bytes, client, digest, image_manifest};

/// How long an operation is retried while the registry answers 503 or not at all.
pub const RETRY_FOR: Duration = Duration::from_secs(60);

/// Layers every image shares within its repository (so deletes and pushes contend for them).
const SHARED: usize = 3;

/// An image the soak pushed and had acknowledged, with what it references.
#[derive(Clone, Debug)]
pub struct Image {
    pub repo: String,
    pub manifest: String,
    pub tags: Vec<String>,
    /// (digest, size) of its config and layers.
    pub blobs: Vec<(String, usize)>,
}

/// What the workers did and had acknowledged.
#[derive(Default)]
pub struct Ledger {
    /// Images acknowledged and not deleted, by manifest digest.
    pub live: BTreeMap<String, Image>,
    pub pushed: usize,
    pub deleted: usize,
    pub retagged: usize,
    pub refused_blob_deletes: usize,
    pub loose_deletes: usize,
    /// Requests answered 503 or not at all, and made again.
    pub retries: usize,
}

impl std::fmt::Display for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pushed, {} deleted, {} retagged, {} referenced-blob deletes refused, {} loose blobs deleted, {} live \
             images, {} requests retried (503 or no answer)",
            self.pushed,
            self.deleted,
            self.retagged,
            self.refused_blob_deletes,
            self.loose_deletes,
            self.live.len(),
            self.retries
        )
    }
}

impl Ledger {
    /// The (digest, size) of every blob a live image references.
    pub fn referenced(&self) -> BTreeSet<(String, usize)> {
        self.live.values().flat_map(|im| im.blobs.iter().cloned()).collect()
    }
}

/// The soak's shared state.
#[derive(Clone)]
pub struct Soak {
    pub urls: Vec<String>,
    pub ledger: Arc<Mutex<Ledger>>,
    /// Deletes and retags of one repository take its lock, so that a retag never re-creates an
    /// image another worker has just deleted (the ledger would not know it); pushes take none.
    locks: Arc<[tokio::sync::Mutex<()>; 2]>,
}

fn shared_layer(repo: &str, i: usize) -> Vec<u8> {
    bytes(0x5_0000 + i as u64 + repo.len() as u64 * 100, 300_000 + i * 1000)
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or_default().to_string()
}

impl Soak {
    /// A soak through `urls` (each operation goes to the next).
    pub fn new(urls: Vec<String>) -> Soak {
        let locks = Arc::new([tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())]);
        Soak { urls, ledger: Arc::default(), locks }
    }

    /// Runs `workers` workers until `until` (each at most 10,000 operations).
    pub async fn run(&self, workers: u64, until: Instant) {
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let s = self.clone();
                tokio::spawn(async move { s.worker(w, until).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// Sends the request `make` builds until it is answered with anything but 503.
    async fn send(&self, make: impl Fn(&str) -> reqwest::RequestBuilder, turn: &mut usize) -> reqwest::Response {
        let start = Instant::now();
        loop {
            *turn += 1;
            let url = &self.urls[*turn % self.urls.len()];
            match make(url).send().await {
                Ok(r) if r.status() != 503 => return r,
                Ok(_) | Err(_) if start.elapsed() < RETRY_FOR => {
                    self.ledger.lock().unwrap().retries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(r) => panic!("still 503 after {RETRY_FOR:?}: {:?}", r.text().await),
                Err(e) => panic!("no answer for {RETRY_FOR:?}: {e}"),
            }
        }
    }

    /// Pushes a blob monolithically. A push that meets the collector deleting the same blob
    /// (it found the old copy stored just as the collector fenced it) is refused with
    /// `BLOB_UNKNOWN` and succeeds when made again, as a client's retry would.
    async fn push_blob(&self, c: &reqwest::Client, repo: &str, data: &[u8], turn: &mut usize) -> String {
        let d = digest(data);
        for _ in 0..20 {
            let r = self
                .send(|u| c.post(format!("{u}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()), turn)
                .await;
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

    /// Pushes an image of a fresh large layer, a shared one and a config; retries once when a
    /// shared layer was collected between its upload and the manifest (the registry says so).
    async fn push(&self, c: &reqwest::Client, repo: &str, seed: u64, tag: &str, turn: &mut usize) -> Option<Image> {
        for _ in 0..2 {
            let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
            let own = bytes(seed, 260_000 + (seed as usize % 7) * 10_000);
            let shared = shared_layer(repo, seed as usize % SHARED);
            let mut blobs = vec![];
            for data in [&config, &own, &shared] {
                blobs.push((self.push_blob(c, repo, data, turn).await, data.len()));
            }
            let layers: Vec<(&str, usize)> = blobs[1..].iter().map(|(d, n)| (d.as_str(), *n)).collect();
            let body = image_manifest((&blobs[0].0, blobs[0].1), &layers, "");
            let r = self.put_manifest(c, repo, tag, &body, turn).await;
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

    async fn put_manifest(
        &self,
        c: &reqwest::Client,
        repo: &str,
        tag: &str,
        body: &str,
        turn: &mut usize,
    ) -> reqwest::Response {
        self.send(
            |u| {
                c.put(format!("{u}/v2/{repo}/manifests/{tag}"))
                    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                    .body(body.to_string())
            },
            turn,
        )
        .await
    }

    async fn worker(&self, worker: u64, until: Instant) {
        let c = client();
        let mut turn = worker as usize;
        let mut i = 0u64;
        while Instant::now() < until && i < 10_000 {
            i += 1;
            let r_index = ((worker + i) % 2) as usize;
            let repo = format!("soak/r{r_index}");
            let seed = worker << 32 | i;
            let _repo_lock = if matches!(i % 5, 3 | 4) { Some(self.locks[r_index].lock().await) } else { None };
            match i % 5 {
                // Delete one of the live images of this repository.
                3 => {
                    let victim = {
                        let l = self.ledger.lock().unwrap();
                        l.live.values().filter(|im| im.repo == repo).nth((seed % 3) as usize).cloned()
                    };
                    if let Some(v) = victim {
                        let r = self
                            .send(|u| c.delete(format!("{u}/v2/{}/manifests/{}", v.repo, v.manifest)), &mut turn)
                            .await;
                        // 404: an earlier try was applied although its answer was lost.
                        assert!(matches!(r.status().as_u16(), 202 | 404), "manifest delete answered {}", r.status());
                        let mut l = self.ledger.lock().unwrap();
                        l.live.remove(&v.manifest);
                        l.deleted += 1;
                    }
                }
                // Retag a live image, and try to delete a blob it references.
                4 => {
                    let target = {
                        let l = self.ledger.lock().unwrap();
                        l.live.values().rfind(|im| im.repo == repo).cloned()
                    };
                    if let Some(t) = target {
                        let got = self
                            .send(|u| c.get(format!("{u}/v2/{}/manifests/{}", t.repo, t.manifest)), &mut turn)
                            .await;
                        assert_eq!(got.status(), 200, "a live image's manifest");
                        let body = String::from_utf8(got.bytes().await.unwrap().to_vec()).unwrap();
                        let tag = format!("re{worker}x{i}");
                        let put = self.put_manifest(&c, &t.repo, &tag, &body, &mut turn).await;
                        let r = self
                            .send(|u| c.delete(format!("{u}/v2/{}/blobs/{}", t.repo, t.blobs[1].0)), &mut turn)
                            .await;
                        assert_eq!(put.status(), 201);
                        assert_eq!(r.status(), 409, "a referenced blob's delete is refused");
                        let mut l = self.ledger.lock().unwrap();
                        if let Some(im) = l.live.get_mut(&t.manifest) {
                            im.tags.push(tag);
                        }
                        l.retagged += 1;
                        l.refused_blob_deletes += 1;
                    }
                }
                // A blob pushed and deleted again before any manifest references it.
                2 => {
                    let d = self.push_blob(&c, &repo, &bytes(seed ^ 0xabc, 2000), &mut turn).await;
                    let r = self.send(|u| c.delete(format!("{u}/v2/{repo}/blobs/{d}")), &mut turn).await;
                    assert!(matches!(r.status().as_u16(), 202 | 404), "blob delete answered {}", r.status());
                    self.ledger.lock().unwrap().loose_deletes += 1;
                }
                _ => {
                    if let Some(im) = self.push(&c, &repo, seed, &format!("w{worker}i{i}"), &mut turn).await {
                        let mut l = self.ledger.lock().unwrap();
                        l.pushed += 1;
                        l.live.insert(im.manifest.clone(), im);
                    }
                }
            }
        }
    }

    /// Every live image pulls through every URL, by digest and by each tag, and verifies.
    pub async fn check_live_images(&self) {
        let c = client();
        let live: Vec<Image> = self.ledger.lock().unwrap().live.values().cloned().collect();
        for url in &self.urls {
            for im in &live {
                for reference in im.tags.iter().chain([&im.manifest]) {
                    let r = c.get(format!("{url}/v2/{}/manifests/{reference}", im.repo)).send().await.unwrap();
                    assert_eq!(r.status(), 200, "{url} {} {reference}", im.repo);
                    assert_eq!(digest(&r.bytes().await.unwrap()), im.manifest);
                }
                for (d, n) in &im.blobs {
                    let r = c.get(format!("{url}/v2/{}/blobs/{d}", im.repo)).send().await.unwrap();
                    assert_eq!(r.status(), 200, "{url} {} {d}", im.repo);
                    let body = r.bytes().await.unwrap();
                    assert_eq!((digest(&body), body.len()), (d.clone(), *n));
                }
            }
        }
    }
}

/// Files under `dir` (recursively) and their total size.
pub fn files(dir: &Path) -> (usize, u64) {
    let mut out = (0, 0);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
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

/// The large blobs (kept in files of their own, above 256 KiB) among `blobs`: how many, and
/// their bytes.
pub fn large_files(blobs: &BTreeSet<(String, usize)>) -> (usize, u64) {
    let large: Vec<u64> = blobs.iter().map(|(_, n)| *n as u64).filter(|n| *n > 256 * 1024).collect();
    (large.len(), large.iter().sum())
}

/// Waits until `cond` holds, for at most `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cond()
}
