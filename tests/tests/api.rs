//! The OCI Distribution API of `berth standalone`, endpoint by endpoint, over real HTTP (the
//! cases in `shared/api_cases.rs`, which `cluster_api.rs` runs against a cluster too), and
//! what only a standalone server has.

use berth_tests::Server;
use berth_tests::Server as Target;

include!("shared/api_cases.rs");

#[tokio::test]
async fn blob_size_limit_and_upload_expiry() {
    let s = Server::start_with(&["--max-blob-bytes", "1000", "--upload-timeout-secs", "1"]);
    let c = client();
    let big = bytes(7, 1001);
    let r = c
        .post(format!("{}/v2/acme/lim/blobs/uploads/?digest={}", s.url, digest(&big)))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "SIZE_INVALID");
    let r = c.post(format!("{}/v2/acme/lim/blobs/uploads/", s.url)).send().await.unwrap();
    let up = format!("{}{}", s.url, header(&r, "location"));
    let r = c.patch(&up).body(big[..600].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.patch(&up).body(big[600..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let r = c.get(&up).send().await.unwrap();
    assert_eq!(header(&r, "range"), "0-599", "the refused chunk changed nothing");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let r = c.get(&up).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn data_survives_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let md;
    {
        let mut s = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
        md = push_image(&c, &s.url, "acme/keep", "v1", 10, &[500_000, 10]).await;
        assert!(s.stop(), "SIGTERM stops berth cleanly");
    }
    let s = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
    let r = c.get(format!("{}/v2/acme/keep/manifests/v1", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), md);
}

/// Started with a low soft limit on open files (1024 is a common default), `berth` raises it to
/// the hard limit, so that the number of clients it serves at once is not capped by it.
#[test]
fn open_files_limit_is_raised_to_the_hard_limit() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -S -n 256 && exec \"$0\" \"$@\"")
        .arg(berth_tests::berth_bin())
        .args(["standalone", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first line on stdout says the registry is listening, so start-up is over.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let row = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = row.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised: {row}");
    assert_ne!(nums[0], "256", "{row}");
}
