//! Deletes and garbage collection against `berth standalone`: what a delete releases is
//! reclaimed, what is still referenced is never taken, and a soak of concurrent pushes,
//! retags and deletes with the collector running ends with every acknowledged image intact
//! and nothing else on disk.

use std::time::{Duration, Instant};

use berth_tests::soak::{eventually, files, large_files, Soak};
use berth_tests::{admin_gc, bytes, client, digest, image_manifest, push_blob, push_image, put_manifest, Server};
use serde_json::Value;

/// Garbage collection settles within a few sweeps of a one-second grace period.
const GRACE: &[&str] = &["--gc-grace-secs", "1"];

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.expect("JSON error body");
    v["errors"][0]["code"].as_str().expect("errors[0].code").to_string()
}

/// The large-blob files of a server's storage.
fn blob_files(s: &Server) -> (usize, u64) {
    files(&s.data_dir.join("storage").join("blobs"))
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

const SOAK: Duration = Duration::from_secs(15);
const SOAK_WORKERS: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_soak_keeps_every_live_image_and_nothing_else() {
    let s = Server::start_with(GRACE);
    let soak = Soak::new(vec![s.url.clone()]);
    soak.run(SOAK_WORKERS, Instant::now() + SOAK).await;
    // Every worker is done: the ledger is final.
    let (expected, segments) = {
        let l = soak.ledger.lock().unwrap();
        assert!(l.pushed > 10 && l.deleted > 3, "the soak did too little to mean anything");
        eprint!("gc soak: {l}; ");
        (large_files(&l.referenced()), files(&s.data_dir.join("storage").join("segments")).1)
    };
    let settled = eventually(Duration::from_secs(40), || blob_files(&s) == expected).await;
    let on_disk = blob_files(&s);
    eprintln!(
        "layer files on disk {} ({} bytes), referenced by live images {} ({} bytes); segments {segments} bytes",
        on_disk.0, on_disk.1, expected.0, expected.1,
    );
    assert!(settled, "bytes on disk {on_disk:?} differ from what live images reference");
    soak.check_live_images().await;
}

/// `berth admin gc --dry-run` reports what is collectable and changes nothing; `berth admin gc`
/// then frees it at once, with background collection off.
#[tokio::test]
async fn gc_on_demand_reports_then_frees() {
    let s = Server::start_with(&["--gc-grace-secs", "1", "--gc-interval-secs", "0"]);
    let c = client();
    let m = push_image(&c, &s.url, "acme/app", "v1", 5, &[600_000, 700_000]).await;
    let keep = push_image(&c, &s.url, "acme/keep", "v1", 6, &[500_000]).await;
    let r = c.delete(format!("{}/v2/acme/app/manifests/{m}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dry = admin_gc(&s.url, true);
    eprintln!("dry run: {dry}");
    assert_eq!(dry["dry_run"], true);
    assert!(dry["blobs"].as_u64().unwrap() >= 2, "the two layers at least: {dry}");
    assert!(dry["bytes"].as_u64().unwrap() >= 1_300_000, "{dry}");
    assert_eq!(blob_files(&s).0, 3, "a dry run deletes nothing");
    let run = admin_gc(&s.url, false);
    eprintln!("run: {run}");
    assert_eq!(run["dry_run"], false);
    assert_eq!((&run["blobs"], &run["bytes"]), (&dry["blobs"], &dry["bytes"]), "the dry run foresaw the run");
    assert!(run["blobs"].as_u64().unwrap() >= 2, "{run}");
    assert_eq!(run["copies"], run["blobs"], "one copy each in standalone");
    assert!(run["copy_bytes"].as_u64().unwrap() >= 1_300_000, "{run}");
    assert_eq!(blob_files(&s), (1, 500_000), "only the kept image's layer is left, at once");
    let again = admin_gc(&s.url, true);
    assert_eq!(again["blobs"], 0, "{again}");
    let r = c.get(format!("{}/v2/acme/keep/manifests/{keep}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Only site administrators may.
    let anonymous = reqwest::Client::new();
    let r = anonymous.post(format!("{}/api/admin/gc", s.url)).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 401 | 403), "{}", r.status());
}
