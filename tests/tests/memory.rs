//! Memory: pushing and pulling a 2 GiB blob keeps berth's peak RSS under 150 MB.

use berth_tests::{client, Server};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};

const TOTAL: usize = 2 << 30;
const CHUNK: usize = 1 << 20;
const LIMIT: u64 = 150 * 1000 * 1000;

/// The i-th MiB of the test blob: a random block with the index stamped in, so no two
/// chunks are equal and nothing is kept to produce them.
fn chunk(block: &[u8], i: usize) -> bytes::Bytes {
    let mut c = block.to_vec();
    c[..8].copy_from_slice(&(i as u64).to_le_bytes());
    bytes::Bytes::from(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_blob_push_and_pull_in_bounded_memory() {
    let s = Server::start();
    let c = client();
    let block = berth_tests::bytes(42, CHUNK);
    let mut hasher = Sha256::new();
    for i in 0..TOTAL / CHUNK {
        hasher.update(chunk(&block, i));
    }
    let d = format!("sha256:{}", hex::encode(hasher.finalize()));

    // docker-style: POST, one streamed PATCH of the whole blob, PUT ?digest=.
    let r = c.post(format!("{}/v2/big/blob/blobs/uploads/", s.url)).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let block2 = block.clone();
    let stream = futures::stream::iter(0..TOTAL / CHUNK).map(move |i| Ok::<_, std::io::Error>(chunk(&block2, i)));
    let r = c.patch(format!("{}{loc}", s.url)).body(reqwest::Body::wrap_stream(stream)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(format!("{}{loc}?digest={d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let after_push = s.peak_rss();

    let r = c.get(format!("{}/v2/big/blob/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    while let Some(part) = body.next().await {
        let part = part.unwrap();
        n += part.len();
        hasher.update(&part);
    }
    assert_eq!(n, TOTAL);
    assert_eq!(format!("sha256:{}", hex::encode(hasher.finalize())), d);
    let peak = s.peak_rss();
    eprintln!(
        "memory: peak RSS of berth after a 2 GiB push {:.1} MB, after the pull {:.1} MB (limit 150 MB)",
        after_push as f64 / 1e6,
        peak as f64 / 1e6
    );
    assert!(peak > 0, "could not read berth's peak RSS");
    assert!(peak < LIMIT, "peak RSS {peak} bytes is over 150 MB");
}
