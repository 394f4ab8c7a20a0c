// The OCI Distribution API endpoint by endpoint, over real HTTP, against `Target` (a
// `berth standalone`, or a frontend of a 3/3/2 cluster): included by `api.rs` and
// `cluster_api.rs`, which say what `Target` is.

use berth_tests::{bytes, client, digest, image_manifest, push_blob, push_image};
use reqwest::StatusCode;
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.expect("JSON error body");
    v["errors"][0]["code"].as_str().expect("errors[0].code").to_string()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn base_endpoint_and_version_header() {
    let s = Target::start();
    let c = client();
    let r = c.get(format!("{}/v2/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-distribution-api-version"), "registry/2.0");
    let r = c.get(format!("{}/v2/a/b/unknown-endpoint", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "docker-distribution-api-version"), "registry/2.0");
}

#[tokio::test]
async fn monolithic_blob_push_get_head_range_delete() {
    let s = Target::start();
    let c = client();
    let data = bytes(1, 300_000);
    let d = push_blob(&c, &s.url, "acme/app", &data).await;

    let r = c.head(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "300000");
    assert_eq!(header(&r, "docker-content-digest"), d);

    let r = c.get(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    for (range, first, last) in
        [("bytes=0-99", 0, 99), ("bytes=299990-", 299_990, 299_999), ("bytes=-10", 299_990, 299_999)]
    {
        let r = c.get(format!("{}/v2/acme/app/blobs/{d}", s.url)).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(header(&r, "content-range"), format!("bytes {first}-{last}/300000"));
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[first..=last]);
    }
    let r = c.get(format!("{}/v2/acme/app/blobs/{d}", s.url)).header("range", "bytes=300000-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "content-range"), "bytes */300000");

    // Linked only where it was pushed.
    let r = c.get(format!("{}/v2/acme/other/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");

    let r = c.delete(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = c.delete(format!("{}/v2/acme/app/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn chunked_upload_with_gap_status_and_resume() {
    let s = Target::start();
    let c = client();
    let data = bytes(2, 3 * 1024 * 1024 + 17);
    let d = digest(&data);
    let r = c.post(format!("{}/v2/acme/chunky/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = header(&r, "location");
    assert!(loc.starts_with("/v2/acme/chunky/blobs/uploads/"), "{loc}");
    assert!(!header(&r, "docker-upload-uuid").is_empty());
    assert_eq!(header(&r, "range"), "0-0");
    let up = format!("{}{loc}", s.url);

    let chunk = 1024 * 1024;
    let r = c
        .patch(&up)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("0-{}", chunk - 1))
        .header("content-length", chunk.to_string())
        .body(data[..chunk].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), format!("0-{}", chunk - 1));

    // A chunk that leaves a gap is refused with 416 and changes nothing.
    let r = c
        .patch(&up)
        .header("content-range", format!("{}-{}", chunk + 10, 2 * chunk + 9))
        .body(data[chunk + 10..2 * chunk + 10].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    // So is a short one (read whole before the store checks where it starts), also when the
    // chunk would start before the end.
    for first in [chunk + 10, chunk - 100] {
        let r = c
            .patch(&up)
            .header("content-range", format!("{first}-{}", first + 999))
            .header("content-length", "1000")
            .body(data[first..first + 1000].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 416);
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    }

    // The client asks where it stands and resumes from there.
    let r = c.get(&up).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), format!("0-{}", chunk - 1));
    let r = c
        .patch(&up)
        .header("content-range", format!("{chunk}-{}", 2 * chunk - 1))
        .body(data[chunk..2 * chunk].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // A streamed chunk without Content-Range appends.
    let r = c.patch(&up).body(data[2 * chunk..3 * chunk].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), format!("0-{}", 3 * chunk - 1));

    // A wrong digest is refused and nothing is stored.
    let wrong = digest(b"something else");
    let r = c.put(format!("{up}?digest={wrong}")).body(data[3 * chunk..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c.head(format!("{}/v2/acme/chunky/blobs/{wrong}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(&up).send().await.unwrap();
    assert_eq!(r.status(), 404, "a failed upload is gone");

    // Again, correctly, with the last chunk in the PUT.
    let r = c.post(format!("{}/v2/acme/chunky/blobs/uploads/", s.url)).send().await.unwrap();
    let up = format!("{}{}", s.url, header(&r, "location"));
    let r = c.patch(&up).body(data[..3 * chunk].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .put(format!("{up}?digest={d}"))
        .header("content-range", format!("{}-{}", 3 * chunk, data.len() - 1))
        .body(data[3 * chunk..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/acme/chunky/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    let got = c.get(format!("{}/v2/acme/chunky/blobs/{d}", s.url)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), &data[..]);
    let r = c.get(&up).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn put_without_final_chunk_and_cancel() {
    let s = Target::start();
    let c = client();
    let data = bytes(3, 5000);
    let d = digest(&data);
    let r = c.post(format!("{}/v2/acme/x/blobs/uploads/", s.url)).send().await.unwrap();
    let up = format!("{}{}", s.url, header(&r, "location"));
    c.patch(&up).body(data.clone()).send().await.unwrap();
    let r = c.put(format!("{up}?digest={d}")).header("content-length", "0").send().await.unwrap();
    assert_eq!(r.status(), 201);

    let r = c.post(format!("{}/v2/acme/x/blobs/uploads/", s.url)).send().await.unwrap();
    let up = format!("{}{}", s.url, header(&r, "location"));
    let r = c.delete(&up).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c.patch(&up).body(vec![1, 2, 3]).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // An upload is bound to its repository.
    let r = c.post(format!("{}/v2/acme/x/blobs/uploads/", s.url)).send().await.unwrap();
    let loc = header(&r, "location").replace("/acme/x/", "/acme/y/");
    let r = c.get(format!("{}{loc}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // PUT without a digest.
    let r = c.put(format!("{}{}", s.url, header(&r, "location"))).send().await.unwrap();
    assert!(r.status().is_client_error());
}

#[tokio::test]
async fn cross_repository_mount() {
    let s = Target::start();
    let c = client();
    let data = bytes(4, 1000);
    let d = push_blob(&c, &s.url, "acme/src", &data).await;
    let r = c.post(format!("{}/v2/acme/dst/blobs/uploads/?mount={d}&from=acme/src", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/acme/dst/blobs/{d}"));
    let r = c.get(format!("{}/v2/acme/dst/blobs/{d}", s.url)).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // Mount without `from`.
    let r = c.post(format!("{}/v2/acme/third/blobs/uploads/?mount={d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    // A mount that cannot be honoured starts an ordinary upload.
    let missing = digest(b"missing");
    let r = c.post(format!("{}/v2/acme/dst/blobs/uploads/?mount={missing}&from=acme/src", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(header(&r, "location").contains("/blobs/uploads/"));
}

#[tokio::test]
async fn manifests_by_tag_and_digest_with_accept_and_delete() {
    let s = Target::start();
    let c = client();
    let md = push_image(&c, &s.url, "acme/img", "v1", 5, &[1000, 2000]).await;
    let r = c.get(format!("{}/v2/acme/img/manifests/v1", s.url)).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
    assert_eq!(header(&r, "docker-content-digest"), md);
    let body = r.bytes().await.unwrap();
    assert_eq!(digest(&body), md);
    let r = c.head(format!("{}/v2/acme/img/manifests/{md}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), body.len().to_string());
    // Accept without the manifest's type.
    let r = c
        .get(format!("{}/v2/acme/img/manifests/v1", s.url))
        .header("accept", "application/vnd.docker.distribution.manifest.v1+prettyjws")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // PUT by digest with extra tags.
    let r = c
        .put(format!("{}/v2/acme/img/manifests/{md}?tag=v2&tag=latest", s.url))
        .header("content-type", OCI_MANIFEST)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/acme/img/manifests/{md}"));
    let tags: Value = c.get(format!("{}/v2/acme/img/tags/list", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["latest", "v1", "v2"]));
    // Delete a tag, then the manifest (with its remaining tags).
    let r = c.delete(format!("{}/v2/acme/img/manifests/v2", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(format!("{}/v2/acme/img/manifests/v2", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = c.delete(format!("{}/v2/acme/img/manifests/{md}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // That was the repository's last manifest: the repository is gone with it.
    for reference in ["v1", "latest", md.as_str()] {
        let r = c.get(format!("{}/v2/acme/img/manifests/{reference}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{reference}");
        assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    }
    let r = c.delete(format!("{}/v2/acme/img/manifests/{md}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(format!("{}/v2/nobody/here/manifests/latest", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn docker_schema2_and_index_and_other_media_types() {
    let s = Target::start();
    let c = client();
    let cfg = br#"{"architecture":"arm64","os":"linux"}"#;
    let cd = push_blob(&c, &s.url, "acme/multi", cfg).await;
    let layer = bytes(6, 700);
    let ld = push_blob(&c, &s.url, "acme/multi", &layer).await;
    let docker = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{ld}","size":700}}]}}"#,
        cfg.len()
    );
    let r = c
        .put(format!("{}/v2/acme/multi/manifests/arm64", s.url))
        .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
        .body(docker.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dd = digest(docker.as_bytes());
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{dd}","size":{},"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#,
        docker.len()
    );
    let r = c
        .put(format!("{}/v2/acme/multi/manifests/latest", s.url))
        .header("content-type", "application/vnd.docker.distribution.manifest.list.v2+json")
        .body(list.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let r = c.get(format!("{}/v2/acme/multi/manifests/latest", s.url)).send().await.unwrap();
    assert_eq!(header(&r, "content-type"), "application/vnd.docker.distribution.manifest.list.v2+json");
    assert_eq!(r.text().await.unwrap(), list);
    // An index naming a manifest the repository lacks.
    let bad = list.replace(&dd, &digest(b"absent"));
    let r = c
        .put(format!("{}/v2/acme/multi/manifests/bad", s.url))
        .header("content-type", "application/vnd.docker.distribution.manifest.list.v2+json")
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // Any other media type is refused: served back from the registry's origin with the type
    // the pusher chose, an HTML "manifest" would be stored cross-site scripting.
    for (ct, body) in [
        ("application/vnd.example.thing+json", r#"{"schemaVersion":2,"custom":true}"#),
        ("text/html", r#"{"schemaVersion":2,"mediaType":"text/html","x":"<script>alert(1)</script>"}"#),
    ] {
        let r = c
            .put(format!("{}/v2/acme/multi/manifests/custom", s.url))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{ct}");
        assert_eq!(error_code(r).await, "MANIFEST_INVALID");
        let r = c.get(format!("{}/v2/acme/multi/manifests/custom", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    // What is served is never sniffed into something else, nor run as a page.
    let r = c.get(format!("{}/v2/acme/multi/manifests/{dd}", s.url)).send().await.unwrap();
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert!(header(&r, "content-security-policy").contains("default-src 'none'"));
}

#[tokio::test]
async fn bad_manifests_get_the_right_error_and_change_nothing() {
    let s = Target::start();
    let c = client();
    let cfg = b"{}";
    let cd = push_blob(&c, &s.url, "acme/bad", cfg).await;
    let missing = digest(b"not uploaded");
    let put = |tag: &str, ct: &str, body: String| {
        c.put(format!("{}/v2/acme/bad/manifests/{tag}", s.url)).header("content-type", ct).body(body).send()
    };
    let m = image_manifest((&cd, 2), &[(&missing, 12)], "");
    let r = put("t", OCI_MANIFEST, m).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let r = put("t", OCI_MANIFEST, "{not json".into()).await.unwrap();
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    // Content-Type and mediaType disagree.
    let r = put("t", OCI_INDEX, image_manifest((&cd, 2), &[], "")).await.unwrap();
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    // Over 4 MiB.
    let huge = image_manifest((&cd, 2), &[], &format!(r#","annotations":{{"x":"{}"}}"#, "a".repeat(4 * 1024 * 1024)));
    let r = put("t", OCI_MANIFEST, huge).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    // Digest in the URL that the body does not hash to.
    let good = image_manifest((&cd, 2), &[], "");
    let r = put(&missing, OCI_MANIFEST, good.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // Invalid names and tags.
    let r = c.put(format!("{}/v2/Acme/Bad/manifests/t", s.url)).body(good.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "NAME_INVALID");
    let r = put(".bad-tag", OCI_MANIFEST, good.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = c.get(format!("{}/v2/acme/bad/blobs/sha256:nothex", s.url)).send().await.unwrap();
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // Nothing of the above left a tag behind, nor made a repository of blobs alone.
    let r = c.get(format!("{}/v2/acme/bad/tags/list", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    // Foreign layers need not be uploaded.
    let foreign = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{missing}","size":12,"urls":["https://example.invalid/layer"]}}]}}"#
    );
    let r = put("foreign", OCI_MANIFEST, foreign).await.unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn tags_and_catalog_pagination() {
    let s = Target::start();
    let c = client();
    let md = push_image(&c, &s.url, "acme/pages", "t00", 8, &[10]).await;
    let body = c.get(format!("{}/v2/acme/pages/manifests/{md}", s.url)).send().await.unwrap().bytes().await.unwrap();
    for i in 1..12 {
        let r = c
            .put(format!("{}/v2/acme/pages/manifests/t{i:02}", s.url))
            .header("content-type", OCI_MANIFEST)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let mut seen = vec![];
    let mut next = "/v2/acme/pages/tags/list?n=5".to_string();
    loop {
        let r = c.get(format!("{}{next}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let link = header(&r, "link");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["name"], "acme/pages");
        let page: Vec<String> = v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        assert!(page.len() <= 5);
        seen.extend(page);
        if link.is_empty() {
            break;
        }
        next = link.trim_start_matches('<').split('>').next().unwrap().to_string();
        assert!(link.ends_with("rel=\"next\""));
    }
    let expected: Vec<String> = (0..12).map(|i| format!("t{i:02}")).collect();
    assert_eq!(seen, expected);
    // Edges: n=0, last past the end, last in the middle, a bad n.
    let v: Value = c.get(format!("{}/v2/acme/pages/tags/list?n=0", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    let v: Value =
        c.get(format!("{}/v2/acme/pages/tags/list?last=t11", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    let v: Value =
        c.get(format!("{}/v2/acme/pages/tags/list?n=2&last=t05", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["t06", "t07"]));
    let r = c.get(format!("{}/v2/acme/pages/tags/list?n=x", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = c.get(format!("{}/v2/acme/none/tags/list", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    for (i, repo) in ["b/one", "a/two", "c/three"].into_iter().enumerate() {
        push_image(&c, &s.url, repo, "v1", 900 + i as u64, &[10]).await;
    }
    let r = c.get(format!("{}/v2/_catalog?n=2", s.url)).send().await.unwrap();
    assert_eq!(header(&r, "link"), "</v2/_catalog?n=2&last=acme%2Fpages>; rel=\"next\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["a/two", "acme/pages"]));
    let v: Value =
        c.get(format!("{}/v2/_catalog?n=2&last=acme/pages", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["b/one", "c/three"]));
}

#[tokio::test]
async fn referrers_api_and_subject() {
    let s = Target::start();
    let c = client();
    let subject = push_image(&c, &s.url, "acme/ref", "v1", 9, &[100]).await;
    let subject_size =
        c.get(format!("{}/v2/acme/ref/manifests/v1", s.url)).send().await.unwrap().bytes().await.unwrap().len();
    let empty = push_blob(&c, &s.url, "acme/ref", b"{}").await;
    let sbom = push_blob(&c, &s.url, "acme/ref", b"sbom contents").await;
    let mut referrers = vec![];
    for (kind, ann) in [("application/spdx+json", "one"), ("application/vnd.example.sig", "two")] {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{kind}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[{{"mediaType":"application/octet-stream","digest":"{sbom}","size":13}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{subject_size}}},"annotations":{{"n":"{ann}"}}}}"#
        );
        let d = digest(m.as_bytes());
        let r = c
            .put(format!("{}/v2/acme/ref/manifests/{d}", s.url))
            .header("content-type", OCI_MANIFEST)
            .body(m)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(header(&r, "oci-subject"), subject);
        referrers.push(d);
    }
    let r = c.get(format!("{}/v2/acme/ref/referrers/{subject}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["schemaVersion"], 2);
    let ms = v["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 2);
    let mut got: Vec<&str> = ms.iter().map(|m| m["digest"].as_str().unwrap()).collect();
    got.sort();
    let mut want: Vec<&str> = referrers.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want);
    assert!(ms.iter().any(|m| m["artifactType"] == "application/spdx+json" && m["annotations"]["n"] == "one"));

    let r = c
        .get(format!("{}/v2/acme/ref/referrers/{subject}?artifactType=application/vnd.example.sig", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], referrers[1].as_str());

    // Unknown subject: an empty index, never 404. Bad digest: 400.
    let r = c.get(format!("{}/v2/acme/ref/referrers/{}", s.url, digest(b"nothing"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]));
    let r = c.get(format!("{}/v2/acme/ref/referrers/sha256:zz", s.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn sha512_blobs() {
    use sha2::Digest as _;
    let s = Target::start();
    let c = client();
    let data = bytes(11, 4000);
    let d = format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)));
    let r =
        c.post(format!("{}/v2/acme/s512/blobs/uploads/?digest={d}", s.url)).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(format!("{}/v2/acme/s512/blobs/{d}", s.url)).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), &data[..]);
    // A manifest pushed by tag is addressed with the algorithm the client asks for.
    let m = image_manifest((&d, data.len()), &[], "");
    let m512 = format!("sha512:{}", hex::encode(sha2::Sha512::digest(m.as_bytes())));
    for query in ["?digest-algorithm=sha512".to_string(), format!("?digest={m512}")] {
        let r = c
            .put(format!("{}/v2/acme/s512/manifests/v1{query}", s.url))
            .header("content-type", OCI_MANIFEST)
            .body(m.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{query}");
        assert_eq!(header(&r, "docker-content-digest"), m512);
    }
    let r = c.get(format!("{}/v2/acme/s512/manifests/{m512}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), m512);
}
