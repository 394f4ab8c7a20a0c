//! The package pages and the home page, in a real browser: Debian's chromium, headless,
//! reading the DOM the registry's HTML makes and taking a screenshot.

use std::path::Path;
use std::process::Command;

use berth_tests::{client, push_blob, put_manifest, Server};
use serde_json::json;

/// The headless browser, when there is one (CI installs it: `.ci/run`).
fn chromium() -> Option<&'static str> {
    for b in ["chromium", "chromium-browser"] {
        if Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(b);
        }
    }
    assert!(!berth_tests::in_ci(), "chromium is required in CI (.ci/run installs it)");
    eprintln!("SKIPPED: no chromium");
    None
}

/// Chromium's flags for a headless run as root in a container.
fn browser(bin: &str, profile: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The DOM of `url` after chromium loaded it, serialized.
fn dom(bin: &str, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = browser(bin, profile.path()).args(["--dump-dom", url]).output().expect("running chromium");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first element carrying `data-field="field"` in `dom`, tags stripped.
fn field(dom: &str, field: &str) -> Option<String> {
    let at = dom.find(&format!("data-field=\"{field}\""))?;
    let open = dom[at..].find('>')? + at + 1;
    let mut depth = 0;
    let mut text = String::new();
    let mut rest = &dom[open..];
    while let Some(lt) = rest.find('<') {
        text.push_str(&rest[..lt]);
        let gt = rest[lt..].find('>')? + lt;
        let tag = &rest[lt + 1..gt];
        if tag.starts_with('/') {
            if depth == 0 {
                return Some(text);
            }
            depth -= 1;
        } else if !tag.ends_with('/') {
            depth += 1;
        }
        rest = &rest[gt + 1..];
    }
    None
}

/// A multi-platform image (two platforms) pushed to `repo` as `tag`, whose index gives a
/// description (with markup) and a license. Returns the index digest and the platforms'.
async fn push_multi_platform(s: &Server, repo: &str, tag: &str) -> (String, Vec<String>) {
    let c = client();
    let mut children = vec![];
    let mut entries = vec![];
    for (arch, seed) in [("amd64", 1u8), ("arm64", 2u8)] {
        let config = json!({"architecture": arch, "os": "linux", "config": {}}).to_string();
        let cd = push_blob(&c, &s.url, repo, config.as_bytes()).await;
        let layer = vec![seed; 150_000];
        let ld = push_blob(&c, &s.url, repo, &layer).await;
        let m = berth_tests::image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
        let md = berth_tests::digest(m.as_bytes());
        assert_eq!(put_manifest(&c, &s.url, repo, &md, m.clone()).await.status(), 201);
        entries.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                            "size": m.len(), "platform": {"architecture": arch, "os": "linux"}}));
        children.push(md);
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
        "annotations": {
            "org.opencontainers.image.description": "A <script>alert('pwned')</script> tool & friends",
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.source": "https://git.example/acme/tool",
        },
    })
    .to_string();
    let r = c
        .put(format!("{}/v2/{repo}/manifests/{tag}", s.url))
        .header("content-type", "application/vnd.oci.image.index.v1+json")
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    (berth_tests::digest(index.as_bytes()), children)
}

async fn make_public(s: &Server, repo: &str) {
    let r = client()
        .patch(format!("{}/api/packages/{repo}", s.url))
        .json(&json!({"visibility": "public"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

#[tokio::test]
async fn a_package_page_shows_everything_and_escapes_what_pushers_wrote() {
    let Some(bin) = chromium() else { return };
    let s = Server::start();
    let (index, _) = push_multi_platform(&s, "admin/tool", "latest").await;
    make_public(&s, "admin/tool").await;
    // Two pulls, counted once the frontend reports them.
    let c = client();
    for _ in 0..2 {
        let r = c
            .get(format!("{}/v2/admin/tool/manifests/latest", s.url))
            .header("accept", "application/vnd.oci.image.index.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let url = format!("{}/users/admin/packages/container/package/tool", s.url);
    let page = tokio::task::spawn_blocking({
        let url = url.clone();
        move || dom(bin, &url)
    })
    .await
    .unwrap();
    assert_eq!(field(&page, "name").as_deref().map(|n| n.starts_with("tool")), Some(true), "{page}");
    assert_eq!(field(&page, "visibility").as_deref(), Some("public"));
    // The markup a pusher wrote is text: escaped in the DOM, no script element made of it.
    assert_eq!(
        field(&page, "description").as_deref(),
        Some("A &lt;script&gt;alert('pwned')&lt;/script&gt; tool &amp; friends")
    );
    assert!(!page.contains("<script"), "no script element in the page");
    assert_eq!(field(&page, "license").as_deref(), Some("Apache-2.0"));
    assert_eq!(field(&page, "source").as_deref(), Some("https://git.example/acme/tool"));
    assert!(page.contains("href=\"https://git.example/acme/tool\""));
    assert_eq!(field(&page, "downloads").as_deref(), Some("2"));
    let host = s.url.trim_start_matches("http://");
    assert_eq!(field(&page, "pull-by-tag"), Some(format!("docker pull {host}/admin/tool:latest")));
    assert_eq!(field(&page, "pull-by-digest"), Some(format!("docker pull {host}/admin/tool@{index}")));
    assert!(page.contains(&format!("data-version=\"{index}\"")), "the index is a version");
    assert!(page.contains("data-tag=\"latest\""));
    assert!(page.contains("linux/amd64, linux/arm64"), "the platforms of the multi-platform version");
    assert!(page.contains("data-field=\"size\">300.") || page.contains("data-field=\"size\">301."), "sizes");
    // A screenshot (the one in docs/ was taken this way: BERTH_SCREENSHOT=docs/package-page.png).
    let shot = std::env::var("BERTH_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("berth-page-{}.png", std::process::id())));
    let out = tokio::task::spawn_blocking({
        let (url, shot) = (url.clone(), shot.clone());
        move || {
            let profile = tempfile::tempdir().unwrap();
            browser(bin, profile.path())
                .args(["--hide-scrollbars", "--window-size=1200,1100"])
                .arg(format!("--screenshot={}", shot.display()))
                .arg(&url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a screenshot of the page");
    if std::env::var("BERTH_SCREENSHOT").is_err() {
        let _ = std::fs::remove_file(&shot);
    }
}

#[tokio::test]
async fn private_pages_are_not_found_by_outsiders_and_the_home_page_lists_public_ones() {
    let Some(bin) = chromium() else { return };
    let s = Server::start();
    push_multi_platform(&s, "admin/hidden", "v1").await;
    push_multi_platform(&s, "admin/shown", "v1").await;
    make_public(&s, "admin/shown").await;
    let hidden = format!("{}/users/admin/packages/container/package/hidden", s.url);
    // An outsider (no credentials): 404, in the browser as over HTTP.
    let anonymous = reqwest::Client::new();
    assert_eq!(anonymous.get(&hidden).send().await.unwrap().status(), 404);
    let page = tokio::task::spawn_blocking({
        let hidden = hidden.clone();
        move || dom(bin, &hidden)
    })
    .await
    .unwrap();
    assert!(page.contains("Not found") && !page.contains("data-field=\"name\""), "{page}");
    // Its owner sees it.
    let r = client().get(&hidden).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("data-field=\"name\">hidden"));
    // The owner's page and the home page list only what the viewer may see.
    let (home, owner) = tokio::task::spawn_blocking({
        let url = s.url.clone();
        move || (dom(bin, &format!("{url}/")), dom(bin, &format!("{url}/users/admin/packages")))
    })
    .await
    .unwrap();
    assert!(home.contains(&format!("docker login {}", s.url.trim_start_matches("http://"))), "{home}");
    assert!(home.contains("href=\"/users/admin/packages/container/package/shown\""), "{home}");
    assert!(!home.contains("hidden"));
    assert!(owner.contains("data-package=\"shown\"") && !owner.contains("data-package=\"hidden\""), "{owner}");
    // Pages have a policy that lets no script run.
    let r = anonymous.get(format!("{}/", s.url)).send().await.unwrap();
    let policy = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("sandbox") && !policy.contains("script"),
        "{policy}"
    );
    assert_eq!(anonymous.get(format!("{}/users/nobody/packages", s.url)).send().await.unwrap().status(), 404);
    let v =
        berth_tests::json_of(client().get(format!("{}/api/v3/users/admin/packages/container/shown/versions", s.url)))
            .await;
    let id = v[0]["id"].as_u64().unwrap();
    let r = anonymous.get(format!("{}/users/admin/packages/container/shown/{id}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200, "a version's page (the API's html_url)");
    assert!(r.text().await.unwrap().contains("class=\"marked\""));
    // Logging in is the browser's Basic login: a challenge, then home once credentials verify.
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirect.get(format!("{}/login", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));
    let r =
        no_redirect.get(format!("{}/login", s.url)).basic_auth(berth_tests::ADMIN, Some("wrong")).send().await.unwrap();
    assert_eq!(r.status(), 401, "credentials that do not verify");
    let r = no_redirect
        .get(format!("{}/login", s.url))
        .basic_auth(berth_tests::ADMIN, Some(berth_tests::ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["location"].to_str().unwrap()), (303, "/"));
}
