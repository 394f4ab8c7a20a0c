//! The load scenarios. Each runs against one registry and reports the work it measured;
//! everything it needs (content, earlier pushes) is prepared before the clock starts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use futures::Stream;
use indicatif::ProgressBar;
use rand::{Rng, RngCore, SeedableRng};

use crate::client::{digest, Registry};
use crate::cpu::{Meter, Spent};
use crate::report::Recorder;

/// Scenario sizes and bounds.
#[derive(Debug, Clone)]
pub struct Params {
    /// Size of the large blob.
    pub size: u64,
    /// PATCH size of `push-chunked`.
    pub chunk_size: u64,
    /// Images to push or pull.
    pub images: usize,
    /// Concurrent workers.
    pub workers: usize,
    /// Layers per image.
    pub layers: usize,
    /// Bytes per layer.
    pub layer_size: usize,
    /// Bytes of each image's config.
    pub config_size: usize,
    /// Length of timed loops (`manifest-get`, `mixed`).
    pub duration: Duration,
    /// Share of pushes among `mixed` operations.
    pub push_ratio: f64,
    /// Repository prefix.
    pub repo: String,
    /// Seed of all generated content.
    pub seed: u64,
    /// Whether `pull-large` hashes what it receives (one client core hashes SHA-256 slower
    /// than loopback moves bytes, so by default it checks the length only).
    pub verify_large: bool,
    /// `--measure-hook`: run around each timed part (see [`mark`]).
    pub measure_hook: Option<String>,
    /// The CPU time of the registry under test and of this tool over the timed parts.
    pub meter: Arc<Meter>,
}

/// Marks where a timed part begins or ends (`stage`): the CPU meter reads there, and the
/// `--measure-hook` command, if any, runs with `stage` as its argument and is waited for (at
/// `begin` before the meter reads, at `end` after, so its own run stays outside). A timed part
/// that fails runs no `end`: the scenario ends there with its own error.
pub async fn mark(p: &Params, stage: &str) -> Result<()> {
    if stage == "end" {
        p.meter.end();
    }
    run_hook(p, stage).await?;
    if stage == "begin" {
        p.meter.begin();
    }
    Ok(())
}

async fn run_hook(p: &Params, stage: &str) -> Result<()> {
    let Some(hook) = &p.measure_hook else {
        return Ok(());
    };
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{hook} \"$1\""))
        .arg("hook")
        .arg(stage)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| anyhow!("--measure-hook {stage}: {e}"))?;
    if !status.success() {
        return Err(anyhow!("--measure-hook {stage}: {status}"));
    }
    Ok(())
}

/// What a scenario measured.
#[derive(Debug, Default)]
pub struct Work {
    /// Wall time of the measured part.
    pub seconds: f64,
    /// Counts by unit (`MB`, `images`, `blobs`, `requests`...), turned into rates per second.
    pub counts: BTreeMap<String, f64>,
    /// Failed operations.
    pub errors: u64,
    /// CPU time spent in the timed part (see [`crate::cpu`]).
    pub cpu: Spent,
}

// ---- content --------------------------------------------------------------------------------

const BLOCK: usize = 1 << 20;

/// A large blob generated on the fly: a random MiB repeated with its index stamped in, so no
/// two MiB are equal and nothing large is held in memory.
#[derive(Clone)]
pub struct BlobSource {
    block: Bytes,
    total: u64,
    /// Its digest.
    pub digest: String,
}

impl BlobSource {
    /// A source of `total` bytes (hashes it once to know its digest).
    pub fn new(seed: u64, total: u64) -> BlobSource {
        let mut block = vec![0u8; BLOCK];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut block);
        let mut s = BlobSource { block: Bytes::from(block), total, digest: String::new() };
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        let mut off = 0;
        while off < total {
            let n = (BLOCK as u64).min(total - off);
            sha2::Digest::update(&mut h, s.piece(off, n));
            off += n;
        }
        s.digest = format!("sha256:{}", hex::encode(sha2::Digest::finalize(h)));
        s
    }

    /// Bytes `[off, off + n)` where the range lies within one block.
    fn piece(&self, off: u64, n: u64) -> Bytes {
        let idx = off / BLOCK as u64;
        let start = (off % BLOCK as u64) as usize;
        let mut b = self.block.to_vec();
        b[..8].copy_from_slice(&idx.to_le_bytes());
        Bytes::from(b).slice(start..start + n as usize)
    }

    /// Bytes `[off, off + n)` as a stream of at most one-MiB pieces.
    pub fn stream(&self, off: u64, n: u64) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let src = self.clone();
        let end = (off + n).min(self.total);
        futures::stream::unfold(off, move |pos| {
            let src = src.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let block_end = (pos / BLOCK as u64 + 1) * BLOCK as u64;
                let take = block_end.min(end) - pos;
                Some((Ok(src.piece(pos, take)), pos + take))
            }
        })
    }
}

/// One generated image: its blobs and manifest.
pub struct Image {
    /// Repository.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// `(digest, bytes)` of the config then the layers.
    pub blobs: Vec<(String, Bytes)>,
    /// Manifest bytes.
    pub manifest: Bytes,
    /// Manifest digest.
    pub manifest_digest: String,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn make_image(p: &Params, round: usize, i: usize) -> Image {
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed ^ ((round as u64) << 32) ^ i as u64);
    let mut config = vec![0u8; p.config_size];
    rng.fill_bytes(&mut config);
    let mut blobs = vec![(digest(&config), Bytes::from(config))];
    for _ in 0..p.layers {
        let mut l = vec![0u8; p.layer_size];
        rng.fill_bytes(&mut l);
        blobs.push((digest(&l), Bytes::from(l)));
    }
    let layers: Vec<String> = blobs[1..]
        .iter()
        .map(|(d, b)| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{}}}"#,
                b.len()
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        blobs[0].0,
        blobs[0].1.len(),
        layers.join(",")
    );
    let manifest_digest = digest(manifest.as_bytes());
    Image {
        repo: format!("{}/img{}", p.repo, i % 16),
        tag: format!("r{round}-i{i}"),
        blobs,
        manifest: Bytes::from(manifest),
        manifest_digest,
    }
}

/// Pushes an image as docker does: HEAD each blob, upload the missing ones, PUT the manifest.
pub async fn push_image(reg: &Registry, rec: &Recorder, img: &Image) -> Result<()> {
    let start = Instant::now();
    for (d, data) in &img.blobs {
        if !reg.blob_exists(rec, &img.repo, d).await? {
            reg.push_blob(rec, &img.repo, d, data.clone()).await?;
        }
    }
    reg.put_manifest(rec, &img.repo, &img.tag, OCI_MANIFEST, img.manifest.clone()).await?;
    rec.record("image push", start.elapsed());
    Ok(())
}

/// Pulls an image by tag, verifying the manifest and every blob; returns the bytes moved.
pub async fn pull_image(reg: &Registry, rec: &Recorder, img: &Image) -> Result<u64> {
    let start = Instant::now();
    let m = reg.get_manifest(rec, &img.repo, &img.tag, OCI_MANIFEST).await?;
    if digest(&m) != img.manifest_digest {
        return Err(anyhow!("manifest of {}:{} differs", img.repo, img.tag));
    }
    let mut n = m.len() as u64;
    for (d, _) in &img.blobs {
        n += reg.get_blob(rec, &img.repo, d, true).await?;
    }
    rec.record("image pull", start.elapsed());
    Ok(n)
}

/// Shows a failed operation's error: above the progress bar, or on stderr when there is none.
fn report_error(bar: &ProgressBar, e: &anyhow::Error) {
    if bar.is_hidden() {
        eprintln!("error: {e:#}");
    } else {
        bar.println(format!("error: {e:#}"));
    }
}

/// Runs `op(w, i)` over items `i` in `0..n` with `workers` concurrent workers `w`.
async fn fan_out<F, Fut>(n: usize, workers: usize, bar: &ProgressBar, op: F) -> (u64, Duration)
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = vec![];
    for w in 0..workers.max(1) {
        let (next, errors, op, bar) = (next.clone(), errors.clone(), op.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if let Err(e) = op(w, i).await {
                    if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                        report_error(&bar, &e);
                    }
                }
                bar.inc(1);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (errors.load(Ordering::Relaxed), start.elapsed())
}

/// Runs `op(w, k)` with `workers` workers `w` until `duration` passes (each stops after its
/// current op); `k` numbers a worker's operations apart from every other worker's.
async fn for_duration<F, Fut>(duration: Duration, workers: usize, bar: &ProgressBar, op: F) -> (u64, u64, Duration)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = vec![];
    for w in 0..workers.max(1) {
        let (done, errors, op, bar) = (done.clone(), errors.clone(), op.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = w as u64;
            while Instant::now() < deadline {
                match op(w, k).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            report_error(&bar, &e);
                        }
                    }
                }
                k += 1 << 20;
            }
        }));
    }
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(start.elapsed().as_millis().min(duration.as_millis()) as u64);
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    ticker.abort();
    (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed), start.elapsed())
}

fn counts(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---- scenarios ------------------------------------------------------------------------------

/// `push-large` (`chunked` false) or `push-chunked`: one big blob.
pub async fn push_large(
    reg: &Registry,
    rec: &Recorder,
    p: &Params,
    round: usize,
    chunked: bool,
    bar: &ProgressBar,
) -> Result<Work> {
    let src = BlobSource::new(p.seed ^ 0xb10b ^ round as u64 ^ (chunked as u64) << 8, p.size);
    bar.set_length(1);
    let repo = format!("{}/large", p.repo);
    mark(p, "begin").await?;
    let start = Instant::now();
    let r = reg.push_stream(rec, &repo, &src.digest, p.size, chunked.then_some(p.chunk_size), &src).await;
    let secs = start.elapsed();
    r?;
    mark(p, "end").await?;
    rec.record(if chunked { "chunked blob push" } else { "blob push" }, secs);
    bar.inc(1);
    Ok(Work {
        seconds: secs.as_secs_f64(),
        counts: counts(&[("MB", p.size as f64 / 1e6)]),
        errors: 0,
        ..Default::default()
    })
}

/// `pull-large`: one big blob, pushed first, then pulled (verified with `--verify-large`).
pub async fn pull_large(reg: &Registry, rec: &Recorder, p: &Params, round: usize, bar: &ProgressBar) -> Result<Work> {
    let src = BlobSource::new(p.seed ^ 0xd0d0 ^ round as u64, p.size);
    let repo = format!("{}/large", p.repo);
    reg.push_stream(&Recorder::default(), &repo, &src.digest, p.size, None, &src).await?;
    bar.set_length(1);
    mark(p, "begin").await?;
    let start = Instant::now();
    let n = reg.get_blob(rec, &repo, &src.digest, p.verify_large).await;
    let secs = start.elapsed();
    let n = n?;
    mark(p, "end").await?;
    bar.inc(1);
    if n != p.size {
        return Err(anyhow!("pulled {n} bytes of a {} byte blob", p.size));
    }
    Ok(Work { seconds: secs.as_secs_f64(), counts: counts(&[("MB", n as f64 / 1e6)]), errors: 0, ..Default::default() })
}

fn images(p: &Params, round: usize) -> Arc<Vec<Image>> {
    Arc::new((0..p.images).map(|i| make_image(p, round, i)).collect())
}

/// `push-images`: W workers push N distinct images.
pub async fn push_images(reg: &Registry, rec: &Recorder, p: &Params, round: usize, bar: &ProgressBar) -> Result<Work> {
    let imgs = images(p, round);
    bar.set_length(imgs.len() as u64);
    let (reg2, rec2, imgs2) = (reg.clone(), rec.clone(), imgs.clone());
    mark(p, "begin").await?;
    let (errors, took) = fan_out(imgs.len(), p.workers, bar, move |w, i| {
        let (reg, rec, imgs) = (reg2.for_worker(w), rec2.clone(), imgs2.clone());
        async move { push_image(&reg, &rec, &imgs[i]).await }
    })
    .await;
    mark(p, "end").await?;
    let ok = imgs.len() as f64 - errors as f64;
    let per_image: usize = imgs.first().map(|i| i.blobs.iter().map(|(_, b)| b.len()).sum()).unwrap_or(0);
    Ok(Work {
        seconds: took.as_secs_f64(),
        counts: counts(&[("images", ok), ("blobs", ok * (p.layers + 1) as f64), ("MB", ok * per_image as f64 / 1e6)]),
        errors,
        ..Default::default()
    })
}

/// `pull-images`: N images pushed first, then pulled back by W workers, verifying digests.
pub async fn pull_images(reg: &Registry, rec: &Recorder, p: &Params, round: usize, bar: &ProgressBar) -> Result<Work> {
    let imgs = images(p, round + 1000);
    let setup = Recorder::default();
    let (reg2, imgs2) = (reg.clone(), imgs.clone());
    let (errors, _) = fan_out(imgs.len(), p.workers, &ProgressBar::hidden(), move |w, i| {
        let (reg, rec, imgs) = (reg2.for_worker(w), setup.clone(), imgs2.clone());
        async move { push_image(&reg, &rec, &imgs[i]).await }
    })
    .await;
    if errors > 0 {
        return Err(anyhow!("{errors} images failed to push during setup"));
    }
    bar.set_length(imgs.len() as u64);
    let bytes = Arc::new(AtomicU64::new(0));
    let (reg2, rec2, imgs2, bytes2) = (reg.clone(), rec.clone(), imgs.clone(), bytes.clone());
    mark(p, "begin").await?;
    let (errors, took) = fan_out(imgs.len(), p.workers, bar, move |w, i| {
        let (reg, rec, imgs, bytes) = (reg2.for_worker(w), rec2.clone(), imgs2.clone(), bytes2.clone());
        async move {
            let n = pull_image(&reg, &rec, &imgs[i]).await?;
            bytes.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
    })
    .await;
    mark(p, "end").await?;
    Ok(Work {
        seconds: took.as_secs_f64(),
        counts: counts(&[
            ("images", imgs.len() as f64 - errors as f64),
            ("MB", bytes.load(Ordering::Relaxed) as f64 / 1e6),
        ]),
        errors,
        ..Default::default()
    })
}

/// `manifest-get`: W workers GET one manifest by tag for D seconds.
pub async fn manifest_get(reg: &Registry, rec: &Recorder, p: &Params, round: usize, bar: &ProgressBar) -> Result<Work> {
    let img = Arc::new(make_image(&Params { layers: 1, layer_size: 1024, ..p.clone() }, round + 2000, 0));
    push_image(reg, &Recorder::default(), &img).await?;
    bar.set_length(p.duration.as_millis() as u64);
    let (reg2, rec2) = (reg.clone(), rec.clone());
    mark(p, "begin").await?;
    let (done, errors, took) = for_duration(p.duration, p.workers, bar, move |w, _| {
        let (reg, rec, img) = (reg2.for_worker(w), rec2.clone(), img.clone());
        async move {
            let m = reg.get_manifest(&rec, &img.repo, &img.tag, OCI_MANIFEST).await?;
            if m.len() != img.manifest.len() {
                return Err(anyhow!("manifest length differs"));
            }
            Ok(())
        }
    })
    .await;
    mark(p, "end").await?;
    Ok(Work { seconds: took.as_secs_f64(), counts: counts(&[("requests", done as f64)]), errors, ..Default::default() })
}

/// `mixed`: W workers for D seconds, each operation a push of a new image with probability
/// `push_ratio`, else a pull of one pushed during setup.
pub async fn mixed(reg: &Registry, rec: &Recorder, p: &Params, round: usize, bar: &ProgressBar) -> Result<Work> {
    let base = Params { images: 32.min(p.images.max(1)), ..p.clone() };
    let seeded = images(&base, round + 3000);
    let setup = Recorder::default();
    for img in seeded.iter() {
        push_image(reg, &setup, img).await?;
    }
    bar.set_length(p.duration.as_millis() as u64);
    let pushes = Arc::new(AtomicU64::new(0));
    let (reg2, rec2, p2, pushes2) = (reg.clone(), rec.clone(), p.clone(), pushes.clone());
    mark(p, "begin").await?;
    let (done, errors, took) = for_duration(p.duration, p.workers, bar, move |w, k| {
        let (reg, rec, p, seeded, pushes) =
            (reg2.for_worker(w), rec2.clone(), p2.clone(), seeded.clone(), pushes2.clone());
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed ^ k);
            if rng.gen_bool(p.push_ratio.clamp(0.0, 1.0)) {
                let img = make_image(&p, round + 4000, k as usize);
                push_image(&reg, &rec, &img).await?;
                pushes.fetch_add(1, Ordering::Relaxed);
            } else {
                let img = &seeded[rng.gen_range(0..seeded.len())];
                pull_image(&reg, &rec, img).await?;
            }
            Ok(())
        }
    })
    .await;
    mark(p, "end").await?;
    let pushed = pushes.load(Ordering::Relaxed) as f64;
    Ok(Work {
        seconds: took.as_secs_f64(),
        counts: counts(&[("operations", done as f64), ("image pushes", pushed), ("image pulls", done as f64 - pushed)]),
        errors,
        ..Default::default()
    })
}
