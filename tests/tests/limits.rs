//! What keeps one client from holding the registry: header and body timeouts, caps on
//! connections and uploads, bounded listings; and what a client is told when the server fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use berth_tests::{bytes, client, digest, image_manifest, push_blob, push_image, put_manifest, Server};
use serde_json::Value;

/// Whether the server closed `conn` (a read ends, or fails) within `limit`.
fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            // A response (an error page) may come before the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_pushes_go_on() {
    let s = Server::start_with(&["--header-read-timeout-secs", "2", "--idle-body-timeout-secs", "2"]);
    let c = client();
    let start = Instant::now();
    // 200 connections that send half a request header and then nothing.
    let mut half: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut t = TcpStream::connect(&s.addr).unwrap();
            t.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
            t
        })
        .collect();
    // An upload whose PATCH trickles one byte a second.
    let r = c.post(format!("{}/v2/acme/slow/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let addr = s.addr.clone();
    let patch_path = loc.clone();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", berth_tests::ADMIN, berth_tests::ADMIN_TOKEN))
    };
    let trickle = std::thread::spawn(move || {
        let mut t = TcpStream::connect(&addr).unwrap();
        let head = format!(
            "PATCH {patch_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
        );
        t.write_all(head.as_bytes()).unwrap();
        let began = Instant::now();
        for _ in 0..30 {
            if t.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            let mut probe = [0u8; 1];
            t.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            match t.read(&mut probe) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        began.elapsed()
    });
    // Meanwhile a push goes through.
    let m = push_image(&c, &s.url, "acme/busy", "v1", 7, &[300_000, 1000]).await;
    let pushed = start.elapsed();
    assert_eq!(c.get(format!("{}/v2/acme/busy/manifests/{m}", s.url)).send().await.unwrap().status(), 200);
    let trickled = tokio::task::spawn_blocking(move || trickle.join().unwrap()).await.unwrap();
    assert!(trickled < Duration::from_secs(10), "the trickling PATCH was cut off after {trickled:?}");
    let cut = tokio::task::spawn_blocking(move || {
        half.iter_mut().map(|conn| closed_within(conn, Duration::from_secs(8))).filter(|closed| *closed).count()
    })
    .await
    .unwrap();
    assert_eq!(cut, 200, "every half-sent header is cut off");
    // The stalled upload let go of its session: its status answers at once, and it goes on.
    // (A fresh connection: this server cuts idle keep-alive connections within its short header
    // timeout, and the pool's may be one it cut a moment ago.)
    let r = client().get(format!("{}{loc}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    eprintln!(
        "slow clients: push done after {pushed:?}; trickling PATCH cut after {trickled:?}; 200 half headers cut \
         within {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn connections_and_uploads_per_caller_are_capped() {
    let s = Server::start_with(&["--max-connections-per-ip", "5", "--max-uploads-per-caller", "3"]);
    let held: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&s.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(&s.addr).unwrap();
    extra.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").ok();
    assert!(closed_within(&mut extra, Duration::from_secs(5)), "a sixth connection from one address is refused");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let c = client();
    for _ in 0..3 {
        let r = c.post(format!("{}/v2/acme/many/blobs/uploads/", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let r = c.post(format!("{}/v2/acme/many/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
}

#[tokio::test]
async fn internal_errors_carry_a_request_id_and_no_detail() {
    let s = Server::start();
    let c = client();
    let data = bytes(77, 400_000);
    let d = push_blob(&c, &s.url, "acme/broken", &data).await;
    let hex = d.trim_start_matches("sha256:");
    let file = s.data_dir.join("storage/blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::remove_file(&file).unwrap();
    let r = c.get(format!("{}/v2/acme/broken/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let id = r.headers().get("x-request-id").expect("a request id").to_str().unwrap().to_string();
    assert!(!id.is_empty());
    let body = r.text().await.unwrap();
    assert!(body.contains("UNKNOWN") && body.contains("X-Request-Id"), "{body}");
    assert!(!body.contains("blobs/") && !body.contains(&s.data_dir.display().to_string()), "{body}");
    let ok = c.get(format!("{}/v2/", s.url)).send().await.unwrap();
    assert!(ok.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn an_external_url_names_the_realm_and_locations() {
    let s = Server::start_with(&["--external-url", "https://registry.example.com/"]);
    let r = berth_tests::client_with(None).get(format!("{}/v2/", s.url)).send().await.unwrap();
    let ch = r.headers()["www-authenticate"].to_str().unwrap();
    assert!(ch.contains("realm=\"https://registry.example.com/token\""), "{ch}");
    let r = client().post(format!("{}/v2/acme/ext/blobs/uploads/", s.url)).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap();
    assert!(loc.starts_with("https://registry.example.com/v2/acme/ext/blobs/uploads/"), "{loc}");
}

#[tokio::test]
async fn referrers_are_listed_a_page_at_a_time() {
    let s = Server::start();
    let c = client();
    let subject = push_image(&c, &s.url, "acme/signed", "v1", 80, &[100]).await;
    let cfg = push_blob(&c, &s.url, "acme/signed", b"{}").await;
    let mut expected = vec![];
    for i in 0..3 {
        let extra = format!(
            r#","artifactType":"application/x-sig","subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{subject}","size":1}},"annotations":{{"i":"{i}"}}"#
        );
        let m = image_manifest((&cfg, 2), &[], &extra);
        expected.push(digest(m.as_bytes()));
        assert_eq!(put_manifest(&c, &s.url, "acme/signed", &digest(m.as_bytes()), m).await.status(), 201);
    }
    expected.sort();
    let r = c.get(format!("{}/v2/acme/signed/referrers/{subject}?n=2", s.url)).send().await.unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    let page: Value = r.json().await.unwrap();
    let mut seen: Vec<String> =
        page["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(seen.len(), 2);
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let page: Value = c.get(format!("{}{next}", s.url)).send().await.unwrap().json().await.unwrap();
    seen.extend(page["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap().to_string()));
    seen.sort();
    assert_eq!(seen, expected);
}
