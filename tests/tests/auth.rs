//! Accounts, tokens and permissions over the real HTTP API: the permission matrix of actors ×
//! visibility × action, and the attacks that must fail.

use std::collections::BTreeMap;

use berth_tests::{client, client_with, push_image, put_manifest, Server};
use serde_json::{json, Value};

/// Admin API call as the site administrator; asserts success and returns the JSON answer.
async fn admin(s: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let c = client();
    let mut req = c.request(method.clone(), format!("{}/api/{path}", s.url));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn user_with_token(s: &Server, name: &str, scopes: &[&str], expires_in_days: Option<u64>) -> String {
    if name != "admin" {
        let c = client();
        let _ = c.post(format!("{}/api/admin/users", s.url)).json(&json!({"name": name})).send().await.unwrap();
    }
    let t = admin(
        s,
        reqwest::Method::POST,
        &format!("admin/users/{name}/tokens"),
        Some(json!({"name": "t", "scopes": scopes, "expires_in_days": expires_in_days})),
    )
    .await;
    t["token"].as_str().unwrap().to_string()
}

const ALL: &[&str] = &["read:packages", "write:packages", "delete:packages"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Act {
    Pull,
    Push,
    Delete,
    List,
}

/// Tries `act` on `repo` with `creds`; returns whether it was allowed. A refusal must be a
/// 401 (with a challenge when anonymous) or a 403.
async fn attempt(s: &Server, creds: Option<(&str, &str)>, repo: &str, act: Act) -> bool {
    let c = client_with(creds);
    let r = match act {
        Act::Pull => c.get(format!("{}/v2/{repo}/manifests/v1", s.url)).send().await.unwrap(),
        Act::List => c.get(format!("{}/v2/{repo}/tags/list", s.url)).send().await.unwrap(),
        Act::Push => c.post(format!("{}/v2/{repo}/blobs/uploads/", s.url)).send().await.unwrap(),
        Act::Delete => {
            // A fresh tag for each attempt, so that attempts do not depend on each other.
            let tag = format!("d{}", rand_tag());
            let admin = client();
            let body =
                admin.get(format!("{}/v2/{repo}/manifests/v1", s.url)).send().await.unwrap().bytes().await.unwrap();
            let put = put_manifest(&admin, &s.url, repo, &tag, body).await;
            assert_eq!(put.status(), 201);
            c.delete(format!("{}/v2/{repo}/manifests/{tag}", s.url)).send().await.unwrap()
        }
    };
    let status = r.status().as_u16();
    match status {
        200 | 202 => true,
        401 | 403 => {
            if creds.is_none() {
                assert_eq!(status, 401);
                assert!(r.headers().contains_key("www-authenticate"), "a challenge for anonymous callers");
            }
            false
        }
        other => panic!("{act:?} on {repo} answered {other}: {:?}", r.text().await),
    }
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn permission_matrix() {
    let s = Server::start();
    let admin_c = client();
    // Accounts: an organization with an owner, members, teams with each grant, an outsider.
    let alice = user_with_token(&s, "alice", ALL, None).await;
    admin(&s, reqwest::Method::POST, "admin/orgs", Some(json!({"name": "acme", "owner": "alice"}))).await;
    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    for (u, role) in [("mem", "member"), ("tread", "member"), ("twrite", "member"), ("tadmin", "member")] {
        tokens.insert(u, user_with_token(&s, u, ALL, None).await);
        admin(&s, reqwest::Method::PUT, &format!("admin/orgs/acme/members/{u}"), Some(json!({"role": role}))).await;
    }
    tokens.insert("mallory", user_with_token(&s, "mallory", ALL, None).await);
    for (team, user) in [("r", "tread"), ("w", "twrite"), ("a", "tadmin")] {
        admin(&s, reqwest::Method::POST, "admin/orgs/acme/teams", Some(json!({"name": team}))).await;
        admin(&s, reqwest::Method::PUT, &format!("admin/orgs/acme/teams/{team}/members/{user}"), None).await;
    }
    // Tokens with each scope, an expired and a revoked one, one of a deleted user.
    tokens.insert("alice-read", user_with_token(&s, "alice", &["read:packages"], None).await);
    tokens.insert("alice-write", user_with_token(&s, "alice", &["write:packages"], None).await);
    tokens.insert("alice-delete", user_with_token(&s, "alice", &["read:packages", "delete:packages"], None).await);
    tokens.insert("expired", user_with_token(&s, "alice", ALL, Some(0)).await);
    let revoked = user_with_token(&s, "alice", ALL, None).await;
    let revoked_id = revoked.split('_').nth(2).unwrap().to_string();
    admin(&s, reqwest::Method::DELETE, &format!("admin/tokens/{revoked_id}"), None).await;
    tokens.insert("revoked", revoked);
    tokens.insert("gone", user_with_token(&s, "gone", ALL, None).await);
    admin(&s, reqwest::Method::DELETE, "admin/users/gone", None).await;
    // Source repositories and CI tokens.
    admin(&s, reqwest::Method::PUT, "admin/orgs/acme/repos/src", Some(json!({"url": "https://git.example/acme/src"})))
        .await;
    admin(
        &s,
        reqwest::Method::PUT,
        "admin/orgs/acme/repos/other",
        Some(json!({"url": "https://git.example/acme/other"})),
    )
    .await;
    let ci = admin(&s, reqwest::Method::POST, "admin/orgs/acme/repos/src/ci-tokens", None).await;
    tokens.insert("ci-src", ci["token"].as_str().unwrap().to_string());
    let ci = admin(&s, reqwest::Method::POST, "admin/orgs/acme/repos/other/ci-tokens", None).await;
    tokens.insert("ci-other", ci["token"].as_str().unwrap().to_string());
    tokens.insert("alice", alice.clone());

    // Packages: one per visibility, pushed by the org owner, with a grant per team; one linked
    // to acme/src through its source annotation.
    let alice_c = client_with(Some(("alice", &alice)));
    for vis in ["private", "public", "internal"] {
        let repo = format!("acme/p-{vis}");
        push_image(&alice_c, &s.url, &repo, "v1", 1, &[100]).await;
        for (team, perm) in [("r", "read"), ("w", "write"), ("a", "admin")] {
            admin(
                &s,
                reqwest::Method::PATCH,
                &format!("packages/{repo}"),
                Some(json!({"grant": format!("team:acme/{team}={perm}")})),
            )
            .await;
        }
        admin(&s, reqwest::Method::PATCH, &format!("packages/{repo}"), Some(json!({"visibility": vis}))).await;
    }
    let linked = berth_tests::image_manifest(
        (&berth_tests::push_blob(&alice_c, &s.url, "acme/linked", b"{}").await, 2),
        &[],
        r#","annotations":{"org.opencontainers.image.source":"https://git.example/acme/src"}"#,
    );
    let r = put_manifest(&alice_c, &s.url, "acme/linked", "v1", linked).await;
    assert_eq!(r.status(), 201);
    let p = admin(&s, reqwest::Method::GET, "packages/acme/linked", None).await;
    assert_eq!(p["source"], "acme/src", "the source annotation links the package");
    assert_eq!(p["visibility"], "private", "packages are private on first push");

    use Act::*;
    let everything = vec![Pull, Push, Delete, List];
    let read = vec![Pull, List];
    let write = vec![Pull, Push, List];
    let none: Vec<Act> = vec![];
    // (actor, package) → allowed actions.
    let expect = |actor: &str, vis: &str| -> Vec<Act> {
        match (actor, vis) {
            // The linked package has no grants of its own: only its org owner and CI of its
            // source repository reach it.
            ("tadmin" | "tread" | "twrite" | "mem", "linked") => none.clone(),
            ("alice", _) | ("tadmin", _) => everything.clone(),
            ("alice-read", _) => read.clone(),
            ("alice-write", _) => write.clone(),
            ("alice-delete", _) => vec![Pull, Delete, List],
            ("tread", _) => read.clone(),
            ("twrite", _) => write.clone(),
            ("mem", "public" | "internal") => read.clone(),
            ("mallory" | "anonymous", "public") => read.clone(),
            ("ci-src" | "ci-other", "public" | "internal") => read.clone(),
            ("ci-src", "linked") => write.clone(),
            _ => none.clone(),
        }
    };
    let mut actors: Vec<&str> = tokens.keys().copied().collect();
    actors.push("anonymous");
    let mut failures = vec![];
    for actor in actors {
        for vis in ["private", "public", "internal", "linked"] {
            let repo = if vis == "linked" { "acme/linked".to_string() } else { format!("acme/p-{vis}") };
            let creds = tokens.get(actor).map(|t| ("x", t.as_str()));
            let want = expect(actor, vis);
            for act in [Pull, Push, Delete, List] {
                let got = attempt(&s, creds, &repo, act).await;
                if got != want.contains(&act) {
                    failures.push(format!("{actor} {act:?} {repo}: allowed={got}, expected {}", !got));
                }
            }
        }
    }
    assert!(failures.is_empty(), "permission matrix mismatches:\n{}", failures.join("\n"));

    // A CI token may create a package in its owner's namespace, which becomes linked...
    let ci_c = client_with(Some(("ci", tokens["ci-src"].as_str())));
    push_image(&ci_c, &s.url, "acme/ci-made", "v1", 7, &[10]).await;
    let p = admin(&s, reqwest::Method::GET, "packages/acme/ci-made", None).await;
    assert_eq!(p["source"], "acme/src");
    // ...but not in another namespace.
    assert!(!attempt(&s, Some(("ci", tokens["ci-src"].as_str())), "mallory/x", Push).await);

    // Outsiders learn nothing: a private package and an absent one answer alike.
    let m = client_with(Some(("mallory", tokens["mallory"].as_str())));
    let a = m.get(format!("{}/v2/acme/p-private/manifests/v1", s.url)).send().await.unwrap();
    let b = m.get(format!("{}/v2/acme/nothing-here/manifests/v1", s.url)).send().await.unwrap();
    assert_eq!(a.status(), b.status());
    assert_eq!(a.text().await.unwrap(), b.text().await.unwrap());
    // The catalog and tag lists show only what the caller may read.
    let cat: Value = m.get(format!("{}/v2/_catalog", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(cat["repositories"], json!(["acme/p-public"]));
    let cat: Value =
        client_with(None).get(format!("{}/v2/_catalog", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(cat["repositories"], json!(["acme/p-public"]));
    let all: Value = admin_c.get(format!("{}/v2/_catalog", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(all["repositories"].as_array().unwrap().len(), 5);
}

/// A registry token for `scope`, fetched the way docker does (GET with Basic).
async fn registry_token(s: &Server, creds: Option<(&str, &str)>, scope: &str) -> (u16, Value) {
    let c = client_with(creds);
    let r = c.get(format!("{}/token?service=berth&scope={scope}", s.url)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The actions a token response's JWT grants on its first scope.
fn granted(t: &Value) -> Vec<String> {
    use base64::Engine as _;
    let jwt = t["token"].as_str().unwrap();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&payload).unwrap();
    claims["access"][0]["actions"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

fn bearer(t: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
    reqwest::Client::builder().default_headers(h).build().unwrap()
}

#[tokio::test]
async fn token_auth_flow_and_attacks() {
    let s = Server::start_with(&["--token-ttl-secs", "2"]);
    let alice = user_with_token(&s, "alice", ALL, None).await;
    let alice_c = client_with(Some(("alice", &alice)));
    push_image(&alice_c, &s.url, "alice/app", "v1", 3, &[100]).await;
    let manifest_url = format!("{}/v2/alice/app/manifests/v1", s.url);

    // The challenge.
    let r = client_with(None).get(format!("{}/v2/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let ch = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(
        ch.starts_with("Bearer realm=\"http://") && ch.contains("/token\"") && ch.contains("service=\"berth\""),
        "{ch}"
    );
    let r = client_with(None).get(&manifest_url).send().await.unwrap();
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"repository:alice/app:pull\""));

    // GET with Basic, and the OAuth2 form POST; the token alone as password works too.
    let (status, t) = registry_token(&s, Some(("alice", &alice)), "repository:alice/app:pull,push").await;
    assert_eq!(status, 200);
    let jwt = t["token"].as_str().unwrap().to_string();
    assert_eq!(t["access_token"], t["token"]);
    assert_eq!(bearer(&jwt).get(&manifest_url).send().await.unwrap().status(), 200);
    let form = client_with(None)
        .post(format!("{}/token", s.url))
        .form(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", alice.as_str()),
            ("service", "berth"),
            ("scope", "repository:alice/app:pull"),
            ("client_id", "test"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    let (status, _) = registry_token(&s, Some(("", &alice)), "repository:alice/app:pull").await;
    assert_eq!(status, 200);
    let (status, _) =
        registry_token(&s, Some(("alice", "berth_pat_000000000000_wrong")), "repository:alice/app:pull").await;
    assert_eq!(status, 401, "bad credentials are refused, not downgraded to anonymous");

    // A changed signature.
    let mut forged = jwt.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(bearer(&forged).get(&manifest_url).send().await.unwrap().status(), 401);
    // Algorithm `none` with the same claims.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = jwt.split('.').nth(1).unwrap();
    let none = format!("{}.{claims}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#));
    assert_eq!(bearer(&none).get(&manifest_url).send().await.unwrap().status(), 401);
    // Claims edited to grant more, signature kept.
    let mut c: Value = serde_json::from_slice(&b64.decode(claims).unwrap()).unwrap();
    c["access"][0]["name"] = json!("bob/app");
    let edited =
        format!("{}.{}.{}", jwt.split('.').next().unwrap(), b64.encode(c.to_string()), jwt.split('.').nth(2).unwrap());
    assert_eq!(bearer(&edited).get(format!("{}/v2/bob/app/manifests/v1", s.url)).send().await.unwrap().status(), 401);
    // A token of another service (another registry with its own key).
    let other = Server::start_with(&["--service", "other"]);
    let other_alice = user_with_token(&other, "alice", ALL, None).await;
    let t: Value = client_with(Some(("alice", &other_alice)))
        .get(format!("{}/token?service=other&scope=repository:alice/app:pull", other.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let foreign = t["token"].as_str().unwrap();
    assert_eq!(bearer(foreign).get(&manifest_url).send().await.unwrap().status(), 401);
    let (status, _) = registry_token(&s, Some(("alice", &alice)), "repository:alice/app:pull").await;
    assert_eq!(status, 200);
    let r = client_with(Some(("alice", &alice)))
        .get(format!("{}/token?service=other&scope=repository:alice/app:pull", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "tokens for another service are not issued");
    // Expired: the test server's tokens live 2 s.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(bearer(&jwt).get(&manifest_url).send().await.unwrap().status(), 401);

    // Asking for `*` or for another owner's repository grants nothing beyond what is allowed.
    let mallory = user_with_token(&s, "mallory", ALL, None).await;
    let (status, t) = registry_token(&s, Some(("mallory", &mallory)), "repository:alice/app:*").await;
    assert_eq!(status, 200, "asking too much is never an error");
    assert_eq!(granted(&t), Vec::<String>::new());
    let r = bearer(t["token"].as_str().unwrap()).get(&manifest_url).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("insufficient_scope"));
    let (_, t) = registry_token(&s, Some(("mallory", &mallory)), "repository:alice/app:pull,push,delete").await;
    assert_eq!(granted(&t), Vec::<String>::new());
    let (_, t) = registry_token(&s, Some(("alice", &alice)), "repository:alice/app:*").await;
    assert_eq!(granted(&t), vec!["pull", "push", "delete"]);
    // Anonymous tokens: pull on public packages only.
    let (_, t) = registry_token(&s, None, "repository:alice/app:pull").await;
    assert_eq!(bearer(t["token"].as_str().unwrap()).get(&manifest_url).send().await.unwrap().status(), 403);
    admin(&s, reqwest::Method::PATCH, "packages/alice/app", Some(json!({"visibility": "public"}))).await;
    let (_, t) = registry_token(&s, None, "repository:alice/app:pull,push").await;
    let anon = bearer(t["token"].as_str().unwrap());
    assert_eq!(anon.get(&manifest_url).send().await.unwrap().status(), 200);
    assert_eq!(anon.post(format!("{}/v2/alice/app/blobs/uploads/", s.url)).send().await.unwrap().status(), 403);

    // A read-only token cannot push; a deleted user's token stops working.
    let ro = user_with_token(&s, "alice", &["read:packages"], None).await;
    let r =
        client_with(Some(("alice", &ro))).post(format!("{}/v2/alice/app/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let (_, t) = registry_token(&s, Some(("alice", &ro)), "repository:alice/app:pull,push").await;
    assert_eq!(granted(&t), vec!["pull"]);
    let gone = user_with_token(&s, "gone", ALL, None).await;
    admin(&s, reqwest::Method::DELETE, "admin/users/gone", None).await;
    let (status, _) = registry_token(&s, Some(("gone", &gone)), "repository:gone/x:pull").await;
    assert_eq!(status, 401);
    // Non-admins cannot use the admin API.
    let r = client_with(Some(("mallory", &mallory)))
        .post(format!("{}/api/admin/users", s.url))
        .json(&json!({"name": "evil"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Tokens record their last use.
    let list = admin(&s, reqwest::Method::GET, "admin/users/alice/tokens", None).await;
    assert!(list.as_array().unwrap().iter().any(|t| t["last_used_ms"].is_u64()), "{list}");
}

#[tokio::test]
async fn admin_cli_manages_users_tokens_and_packages() {
    let s = Server::start();
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new(berth_tests::berth_bin())
            .args(["admin", "--url", &s.url, "--token", berth_tests::ADMIN_TOKEN])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "berth admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["user", "create", "carol"]);
    let t: Value =
        serde_json::from_str(&cli(&["token", "create", "carol", "--scopes", "read:packages,write:packages"])).unwrap();
    let token = t["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("berth_pat_"), "recognisable prefix: {token}");
    let carol = client_with(Some(("carol", &token)));
    push_image(&carol, &s.url, "carol/tool", "v1", 9, &[10]).await;
    assert_eq!(
        client_with(None).get(format!("{}/v2/carol/tool/manifests/v1", s.url)).send().await.unwrap().status(),
        401
    );
    cli(&["package", "set", "carol/tool", "--visibility", "public"]);
    assert_eq!(
        client_with(None).get(format!("{}/v2/carol/tool/manifests/v1", s.url)).send().await.unwrap().status(),
        200
    );
    let list: Value = serde_json::from_str(&cli(&["token", "list", "carol"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(list.to_string().find(&token[10..]).is_none(), "listing never shows secrets");
    cli(&["token", "revoke", t["id"].as_str().unwrap()]);
    let r = carol.get(format!("{}/v2/carol/tool/tags/list", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401, "a revoked token stops working");
    cli(&["org", "create", "orgx", "--owner", "carol"]);
    cli(&["team", "create", "orgx", "devs"]);
    cli(&["team", "member", "orgx", "devs", "carol"]);
    cli(&["repo", "set", "orgx", "web", "--url", "https://git.example/orgx/web", "--grant", "team:orgx/devs=write"]);
    let ci: Value = serde_json::from_str(&cli(&["repo", "ci-token", "orgx", "web"])).unwrap();
    assert!(ci["token"].as_str().unwrap().starts_with("berth_ci_"));

    // Grants inherited from the source repository, until inheritance is turned off.
    cli(&["user", "create", "dan"]);
    let t: Value = serde_json::from_str(&cli(&["token", "create", "dan", "--scopes", "write:packages"])).unwrap();
    let dan = client_with(Some(("dan", t["token"].as_str().unwrap())));
    cli(&["org", "member", "orgx", "dan", "member"]);
    cli(&["team", "member", "orgx", "devs", "dan"]);
    let carol = client_with(Some(("carol", &cli_token(&cli, "carol"))));
    let cfg = berth_tests::push_blob(
        &carol,
        &s.url,
        "orgx/site",
        br#"{"config":{"Labels":{"org.opencontainers.image.source":"https://git.example/orgx/web"}}}"#,
    )
    .await;
    let m = berth_tests::image_manifest((&cfg, 80), &[], "");
    let r = put_manifest(&carol, &s.url, "orgx/site", "v1", m).await;
    assert_eq!(r.status(), 201);
    let shown: Value = serde_json::from_str(&cli(&["package", "show", "orgx/site"])).unwrap();
    assert_eq!(shown["source"], "orgx/web", "linked through the config's label");
    assert_eq!(dan.post(format!("{}/v2/orgx/site/blobs/uploads/", s.url)).send().await.unwrap().status(), 202);
    cli(&["package", "set", "orgx/site", "--inherit", "false"]);
    assert_eq!(dan.post(format!("{}/v2/orgx/site/blobs/uploads/", s.url)).send().await.unwrap().status(), 403);
}

/// A new all-scope token for `user`, made with the CLI.
fn cli_token(cli: &dyn Fn(&[&str]) -> String, user: &str) -> String {
    let t: Value = serde_json::from_str(&cli(&[
        "token",
        "create",
        user,
        "--scopes",
        "read:packages,write:packages,delete:packages",
    ]))
    .unwrap();
    t["token"].as_str().unwrap().to_string()
}

/// A bad start-up argument (a bootstrap token too short to be safe) ends `berth` with a
/// one-line error and a failing exit code, also when RUST_BACKTRACE asks for stack traces.
#[test]
fn bad_bootstrap_token_is_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(berth_tests::berth_bin())
        .args(["standalone", "--listen", "127.0.0.1:0", "--bootstrap-admin", "admin:short"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(lines[0].starts_with("berth: ") && lines[0].contains("8"), "{err}");
}

/// The parameters of a `WWW-Authenticate: Bearer ...` challenge.
fn challenge_of(r: &reqwest::Response) -> BTreeMap<String, String> {
    let v = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let rest = v.strip_prefix("Bearer ").unwrap_or("");
    rest.split("\",")
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// Clients that follow the Docker token protocol: the challenge names the scope the request
/// needs, and a token that lacks it gets `401` with `insufficient_scope`, so that the client
/// fetches a better token, as docker and the OCI conformance suite do.
#[tokio::test]
async fn challenges_name_the_scope_each_request_needs() {
    let s = Server::start();
    let alice = user_with_token(&s, "alice", ALL, None).await;
    let alice_c = client_with(Some(("alice", &alice)));
    let m = push_image(&alice_c, &s.url, "alice/app", "v1", 31, &[100]).await;
    let anon = client_with(None);

    let r = anon.delete(format!("{}/v2/alice/app/manifests/{m}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(challenge_of(&r)["scope"], "repository:alice/app:delete");
    let r = anon.post(format!("{}/v2/alice/app/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(challenge_of(&r)["scope"], "repository:alice/app:pull,push");

    // A push token cannot delete: 401 asking for delete, then a delete token can.
    let (_, t) = registry_token(&s, Some(("alice", &alice)), "repository:alice/app:pull,push").await;
    let push_token = t["token"].as_str().unwrap().to_string();
    let r = bearer(&push_token).delete(format!("{}/v2/alice/app/manifests/{m}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let ch = challenge_of(&r);
    assert_eq!((ch["scope"].as_str(), ch["error"].as_str()), ("repository:alice/app:delete", "insufficient_scope"));
    let (_, t) = registry_token(&s, Some(("alice", &alice)), &ch["scope"]).await;
    let r = bearer(t["token"].as_str().unwrap()).delete(format!("{}/v2/alice/app/manifests/{m}", s.url)).send().await;
    assert_eq!(r.unwrap().status(), 202);

    // An upload's status needs what its PATCH needs; a pull token is sent for a push token.
    let up = bearer(&push_token).post(format!("{}/v2/alice/app/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(up.status(), 202);
    let location = up.headers()["location"].to_str().unwrap().to_string();
    let (_, t) = registry_token(&s, Some(("alice", &alice)), "repository:alice/app:pull").await;
    let r = bearer(t["token"].as_str().unwrap()).get(format!("{}{location}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(challenge_of(&r)["scope"], "repository:alice/app:pull,push");
    let r = bearer(&push_token).get(format!("{}{location}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 204);

    // A mount from a repository the token does not name: 401 asking for both scopes.
    push_image(&alice_c, &s.url, "alice/base", "v1", 32, &[100]).await;
    let base: Value =
        alice_c.get(format!("{}/v2/alice/base/manifests/v1", s.url)).send().await.unwrap().json().await.unwrap();
    let layer = base["layers"][0]["digest"].as_str().unwrap();
    let mount = format!("{}/v2/alice/app/blobs/uploads/?mount={layer}&from=alice/base", s.url);
    let r = bearer(&push_token).post(&mount).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let scope = challenge_of(&r)["scope"].clone();
    assert_eq!(scope, "repository:alice/app:pull,push repository:alice/base:pull");
    let (_, t) = registry_token(&s, Some(("alice", &alice)), &scope).await;
    assert_eq!(bearer(t["token"].as_str().unwrap()).post(&mount).send().await.unwrap().status(), 201);
    // Someone who may not read the source gets a plain upload session: nothing is revealed.
    let mallory = user_with_token(&s, "mallory", ALL, None).await;
    let (_, t) = registry_token(&s, Some(("mallory", &mallory)), "repository:mallory/x:pull,push").await;
    let r = bearer(t["token"].as_str().unwrap())
        .post(format!("{}/v2/mallory/x/blobs/uploads/?mount={layer}&from=alice/base", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

/// A token does no more than its scopes allow, on the admin API too and for site
/// administrators too.
#[tokio::test]
async fn token_scopes_bind_site_administrators_and_the_admin_api() {
    let s = Server::start();
    let alice = user_with_token(&s, "alice", &["read:packages"], None).await;
    let r = client_with(Some(("alice", &alice)))
        .post(format!("{}/api/admin/users/alice/tokens", s.url))
        .json(&json!({"name": "escalate", "scopes": ["read:packages", "write:packages", "delete:packages"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a read token cannot mint a token with more scopes");
    let writer = user_with_token(&s, "alice", &["read:packages", "write:packages"], None).await;
    let r = client_with(Some(("alice", &writer)))
        .post(format!("{}/api/admin/users/alice/tokens", s.url))
        .json(&json!({"name": "more", "scopes": ["delete:packages"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "nor a write token one that can delete");

    let admin_c = client();
    push_image(&admin_c, &s.url, "admin/app", "v1", 41, &[100]).await;
    let ro = user_with_token(&s, "admin", &["read:packages"], None).await;
    let ro_c = client_with(Some(("admin", &ro)));
    assert_eq!(ro_c.get(format!("{}/v2/admin/app/manifests/v1", s.url)).send().await.unwrap().status(), 200);
    let r = ro_c.delete(format!("{}/v2/admin/app/manifests/v1", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 403, "a site administrator's read token deletes no tag");
    let r = ro_c.post(format!("{}/api/admin/users", s.url)).json(&json!({"name": "evil"})).send().await.unwrap();
    assert_eq!(r.status(), 403, "nor creates users");
    assert_eq!(ro_c.get(format!("{}/api/admin/users", s.url)).send().await.unwrap().status(), 200);
    assert_eq!(admin_c.get(format!("{}/v2/admin/app/manifests/v1", s.url)).send().await.unwrap().status(), 200);
}

/// A member of an organization who publishes a new package in it administers that package,
/// and the package links to its source repository whatever the order of the manifest's blobs.
#[tokio::test]
async fn package_creators_administer_and_labels_link_in_any_blob_order() {
    let s = Server::start();
    let owner = user_with_token(&s, "olga", ALL, None).await;
    admin(&s, reqwest::Method::POST, "admin/orgs", Some(json!({"name": "acme", "owner": "olga"}))).await;
    let _ = owner;
    let mem = user_with_token(&s, "mia", &["read:packages", "write:packages"], None).await;
    admin(&s, reqwest::Method::PUT, "admin/orgs/acme/members/mia", Some(json!({"role": "member"}))).await;
    let mia = client_with(Some(("mia", &mem)));
    // The whole push, chunked: POST, PATCH, PUT, then the manifest.
    let data = berth_tests::bytes(51, 5000);
    let d = berth_tests::digest(&data);
    let r = mia.post(format!("{}/v2/acme/new/blobs/uploads/", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = mia.patch(format!("{}{loc}", s.url)).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 202, "the creator may go on with the push it started");
    let r = mia.put(format!("{}{loc}?digest={d}", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    admin(
        &s,
        reqwest::Method::PUT,
        "admin/orgs/acme/repos/web",
        Some(json!({"url": "https://git.example/acme/web", "grants": []})),
    )
    .await;
    // A config that sorts after the layer: the label is found all the same.
    let mut config = None;
    for i in 0.. {
        let c = format!(
            r#"{{"i":{i},"config":{{"Labels":{{"org.opencontainers.image.source":"https://git.example/acme/web"}}}}}}"#
        );
        if berth_tests::digest(c.as_bytes()) > d {
            config = Some(c);
            break;
        }
    }
    let config = config.unwrap();
    let cd = berth_tests::push_blob(&mia, &s.url, "acme/new", config.as_bytes()).await;
    let m = berth_tests::image_manifest((&cd, config.len()), &[(&d, data.len())], "");
    assert_eq!(put_manifest(&mia, &s.url, "acme/new", "v1", m).await.status(), 201);
    let r = mia.get(format!("{}/api/packages/acme/new", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["source"], "acme/web");
    assert_eq!(p["grants"]["user:mia"], "admin", "{p}");
    let r = mia
        .patch(format!("{}/api/packages/acme/new", s.url))
        .json(&json!({"visibility": "internal"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the creator changes its settings");
}

/// The bootstrap credential is created once: revoking it lasts across restarts, and it never
/// attaches to an existing account that is not a site administrator.
#[tokio::test]
async fn the_bootstrap_token_is_created_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
    let tokens = admin(&s, reqwest::Method::GET, "admin/users/admin/tokens", None).await;
    let id = tokens[0]["id"].as_str().unwrap().to_string();
    admin(&s, reqwest::Method::DELETE, &format!("admin/tokens/{id}"), None).await;
    s.stop();
    let s = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
    let r = client().get(format!("{}/v2/_catalog", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401, "a revoked bootstrap token stays revoked after a restart");
    drop(s);

    // A name taken by an ordinary user is not turned into an administrator with a known token.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
    admin(&s, reqwest::Method::POST, "admin/users", Some(json!({"name": "bob"}))).await;
    s.stop();
    let out = std::process::Command::new(berth_tests::berth_bin())
        .args(["standalone", "--listen", "127.0.0.1:0", "--bootstrap-admin", "bob:a-token-bob-never-had"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a site administrator"));
}

/// Registry tokens are signed with a frontend's Ed25519 key named by key id; the public keys
/// are published as a JWKS; rotation switches keys while tokens of the old key keep working
/// until they expire; no key that could sign lies in the data directory.
#[tokio::test]
async fn signing_keys_rotate_and_are_published() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), "127.0.0.1:0", &[]);
    let (_, t) = registry_token(&s, Some(("admin", berth_tests::ADMIN_TOKEN)), "repository:admin/x:pull").await;
    let old = t["token"].as_str().unwrap().to_string();
    let header: Value = serde_json::from_slice(&b64.decode(old.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    let kid = header["kid"].as_str().unwrap().to_string();
    let jwks: Value =
        client_with(None).get(format!("{}/.well-known/jwks.json", s.url)).send().await.unwrap().json().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert!(keys.iter().any(|k| k["kid"] == kid.as_str() && k["kty"] == "OKP" && k["crv"] == "Ed25519"), "{jwks}");
    assert!(keys.iter().all(|k| k.get("d").is_none()), "no private part is published");

    let out = std::process::Command::new(berth_tests::berth_bin())
        .args(["admin", "--url", &s.url, "--token", berth_tests::ADMIN_TOKEN, "keys", "rotate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, t) = registry_token(&s, Some(("admin", berth_tests::ADMIN_TOKEN)), "repository:admin/x:pull").await;
    let new = t["token"].as_str().unwrap().to_string();
    let header: Value = serde_json::from_slice(&b64.decode(new.split('.').next().unwrap()).unwrap()).unwrap();
    assert_ne!(header["kid"], kid.as_str(), "new tokens are signed with the new key");
    for token in [&old, &new] {
        let r = bearer(token).get(format!("{}/v2/admin/x/tags/list", s.url)).send().await.unwrap();
        assert_ne!(r.status(), 401, "tokens of both keys verify");
    }
    let jwks: Value =
        client_with(None).get(format!("{}/.well-known/jwks.json", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    // An HS256 token over the same claims, keyed with anything public, is refused.
    let claims = old.split('.').nth(1).unwrap();
    let hs = format!("{}.{claims}.AAAA", b64.encode(format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#)));
    assert_eq!(bearer(&hs).get(format!("{}/v2/admin/x/tags/list", s.url)).send().await.unwrap().status(), 401);
}

/// GitHub's packages REST API under `/api/v3`: lists of an organization, a user and the
/// authenticated user, one package (its name URL-encoded), its versions newest first and one
/// version; GitHub's field shapes, pagination with `Link` headers, the `visibility` filter,
/// `package_type` required, and refusals: no `read:packages` scope, a package the caller may
/// not read (404), unknown owners and versions (404).
#[tokio::test]
async fn the_packages_api_answers_in_githubs_shapes() {
    let s = Server::start();
    let c = client();
    admin(&s, reqwest::Method::POST, "admin/orgs", Some(json!({"name": "acme", "owner": "admin"}))).await;
    let old = push_image(&c, &s.url, "acme/app", "v1", 1, &[1000]).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let new = push_image(&c, &s.url, "acme/app", "v2", 2, &[1000]).await;
    push_image(&c, &s.url, "acme/tools/cli", "latest", 3, &[1000]).await;
    push_image(&c, &s.url, "admin/mine", "v1", 4, &[1000]).await;
    let get = |url: String, token: Option<String>| {
        let s_url = s.url.clone();
        async move {
            let c = match &token {
                Some(t) => client_with(Some(("bob", t.as_str()))),
                None => client(),
            };
            let r = c.get(format!("{s_url}/api/v3/{url}")).send().await.unwrap();
            let status = r.status().as_u16();
            let link = r.headers().get("link").map(|l| l.to_str().unwrap().to_string());
            (status, link, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let rfc3339 = |v: &Value| {
        let t = v.as_str().unwrap_or_default();
        assert!(t.len() == 20 && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    };

    let (status, link, list) = get("orgs/acme/packages?package_type=container".into(), None).await;
    assert_eq!(status, 200);
    assert_eq!(link, None, "one page");
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["app", "tools/cli"]);
    let app = &list[0];
    assert!(app["id"].as_u64().is_some());
    assert_eq!(app["package_type"], "container");
    assert_eq!(app["owner"]["login"], "acme");
    assert_eq!(app["owner"]["type"], "Organization");
    assert_eq!(app["version_count"], 2);
    assert_eq!(app["visibility"], "private");
    assert_eq!(app["url"], format!("{}/api/v3/orgs/acme/packages/container/app", s.url));
    assert_eq!(list[1]["url"], format!("{}/api/v3/orgs/acme/packages/container/tools%2Fcli", s.url));
    assert!(app["html_url"].as_str().unwrap().starts_with(&s.url));
    rfc3339(&app["created_at"]);
    rfc3339(&app["updated_at"]);
    assert_eq!(app["owner"]["url"], format!("{}/api/v3/users/acme", s.url), "GitHub's users/ path for orgs too");
    assert_eq!(app["html_url"], format!("{}/orgs/acme/packages/container/package/app", s.url));
    assert!(app.get("repository").is_none(), "linked to no source repository");

    // package_type is required; other types hold nothing here.
    let (status, _, err) = get("orgs/acme/packages".into(), None).await;
    assert_eq!(status, 422);
    assert!(err["message"].is_string() && err["documentation_url"].is_string(), "GitHub's error shape: {err}");
    assert_eq!(get("orgs/acme/packages?package_type=npm".into(), None).await.2, json!([]));
    // Pagination: GitHub's Link relations.
    let (_, link, one) = get("orgs/acme/packages?package_type=container&per_page=1".into(), None).await;
    assert_eq!(one.as_array().unwrap().len(), 1);
    let link = link.expect("a Link header");
    assert!(link.contains("page=2>; rel=\"next\"") && link.contains("rel=\"last\""), "{link}");
    let (_, link, two) = get("orgs/acme/packages?package_type=container&per_page=1&page=2".into(), None).await;
    assert_eq!(two[0]["name"], "tools/cli");
    let link = link.expect("a Link header");
    assert!(link.contains("rel=\"first\"") && link.contains("rel=\"prev\"") && !link.contains("next"), "{link}");
    let (_, _, past) = get("orgs/acme/packages?package_type=container&per_page=1&page=3".into(), None).await;
    assert_eq!(past, json!([]));
    let huge = format!("orgs/acme/packages?package_type=container&per_page=100&page={}", u64::MAX);
    assert_eq!(get(huge, None).await.2, json!([]), "no page wraps around");
    assert_eq!(get("orgs/acme/packages?package_type=container&per_page=x".into(), None).await.0, 422);

    // One package, its versions and one version.
    let (status, _, cli) = get("orgs/acme/packages/container/tools%2Fcli".into(), None).await;
    assert_eq!((status, cli["name"].as_str()), (200, Some("tools/cli")));
    let (status, _, versions) = get("orgs/acme/packages/container/app/versions".into(), None).await;
    assert_eq!(status, 200);
    let digests: Vec<&str> = versions.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(digests, vec![new.as_str(), old.as_str()], "newest first");
    assert_eq!(versions[0]["metadata"], json!({"package_type": "container", "container": {"tags": ["v2"]}}));
    rfc3339(&versions[0]["created_at"]);
    assert_eq!(app["updated_at"], versions[0]["created_at"], "a package was updated by its newest push");
    let vid = versions[0]["id"].as_u64().unwrap();
    assert_eq!(versions[0]["html_url"], format!("{}/orgs/acme/packages/container/app/{vid}", s.url));
    assert_eq!(versions[1]["metadata"]["container"]["tags"], json!(["v1"]));
    let (_, link, first) = get("orgs/acme/packages/container/app/versions?per_page=1".into(), None).await;
    assert_eq!(first[0]["name"].as_str(), Some(new.as_str()));
    assert!(link.is_some_and(|l| l.contains("/versions?per_page=1&page=2>; rel=\"next\"")));
    let id = versions[1]["id"].as_u64().unwrap();
    assert_eq!(versions[1]["url"], format!("{}/api/v3/orgs/acme/packages/container/app/versions/{id}", s.url));
    let (status, _, one) = get(format!("orgs/acme/packages/container/app/versions/{id}"), None).await;
    assert_eq!((status, one["name"].as_str()), (200, Some(old.as_str())));
    assert_eq!(get("orgs/acme/packages/container/app/versions/12345".into(), None).await.0, 404);
    assert_eq!(get("orgs/acme/packages/container/app/versions?state=deleted".into(), None).await.2, json!([]));
    let (status, _, err) = get("orgs/acme/packages/container/nothing".into(), None).await;
    assert_eq!((status, err["message"].as_str()), (404, Some("package not found")));
    let r = c.put(format!("{}/api/v3/orgs/acme/packages/container/app", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404, "no such endpoint");
    assert_eq!(get("orgs/acme/packages/npm/app".into(), None).await.0, 404);

    // A user's packages, and the authenticated user's.
    let (status, _, mine) = get("users/admin/packages?package_type=container".into(), None).await;
    assert_eq!(
        (status, mine[0]["name"].as_str(), mine[0]["owner"]["type"].as_str()),
        (200, Some("mine"), Some("User"))
    );
    assert_eq!(get("user/packages?package_type=container".into(), None).await.2, mine);
    assert_eq!(get("users/nobody/packages?package_type=container".into(), None).await.0, 404);
    assert_eq!(get("orgs/admin/packages?package_type=container".into(), None).await.0, 404, "a user is no org");

    // Scopes and permissions.
    // write:packages implies read:packages, as on GitHub; delete:packages alone does not.
    let no_read = user_with_token(&s, "bob", &["delete:packages"], None).await;
    let (status, _, err) = get("orgs/acme/packages?package_type=container".into(), Some(no_read)).await;
    assert_eq!(status, 403);
    assert!(err["message"].as_str().unwrap().contains("read:packages"), "{err}");
    let bob = user_with_token(&s, "bob", &["read:packages"], None).await;
    let (status, _, seen) = get("orgs/acme/packages?package_type=container".into(), Some(bob.clone())).await;
    assert_eq!((status, seen), (200, json!([])), "private packages are not listed to outsiders");
    assert_eq!(get("orgs/acme/packages/container/app".into(), Some(bob.clone())).await.0, 404);
    admin(&s, reqwest::Method::PATCH, "packages/acme/app", Some(json!({"visibility": "public"}))).await;
    let (_, _, seen) = get("orgs/acme/packages?package_type=container".into(), Some(bob.clone())).await;
    let names: Vec<&str> = seen.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["app"]);
    let (_, _, public) = get("orgs/acme/packages?package_type=container&visibility=public".into(), None).await;
    assert_eq!(public.as_array().unwrap().len(), 1);
    assert_eq!(public[0]["visibility"], "public");
    assert_eq!(get("orgs/acme/packages?package_type=container&visibility=secret".into(), None).await.0, 422);
    // As on GHCR, an organization's public package stays public; a user's may go back.
    let r = c.patch(format!("{}/api/packages/acme/app", s.url)).json(&json!({"visibility": "private"})).send().await;
    assert_eq!(r.unwrap().status(), 409);
    assert_eq!(get("orgs/acme/packages/container/app".into(), None).await.2["visibility"], "public");
    admin(&s, reqwest::Method::PATCH, "packages/admin/mine", Some(json!({"visibility": "public"}))).await;
    admin(&s, reqwest::Method::PATCH, "packages/admin/mine", Some(json!({"visibility": "private"}))).await;
    assert_eq!(get("users/admin/packages/container/mine".into(), None).await.2["visibility"], "private");
}

/// Deleted means restorable: a version or a package deleted through the packages API is gone
/// from pulls, tag lists and listings, keeps its bytes through garbage collection, and comes
/// back with its tags where no later push took them; the rules and scopes GitHub has.
#[tokio::test]
async fn packages_and_versions_are_deleted_and_restored() {
    let s = Server::start();
    let c = client();
    admin(&s, reqwest::Method::POST, "admin/orgs", Some(json!({"name": "acme", "owner": "admin"}))).await;
    let old = push_image(&c, &s.url, "acme/app", "v1", 11, &[3000]).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let new = push_image(&c, &s.url, "acme/app", "v2", 12, &[3000]).await;
    let api = format!("{}/api/v3/orgs/acme/packages/container/app", s.url);
    let call = |method: reqwest::Method, url: String, token: Option<String>| {
        let c = match &token {
            Some(t) => client_with(Some(("bob", t.as_str()))),
            None => client(),
        };
        async move {
            let r = c.request(method, url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let get = |url: String| call(reqwest::Method::GET, url, None);
    let manifest = |reference: &str| {
        let url = format!("{}/v2/acme/app/manifests/{reference}", s.url);
        let c = client();
        async move {
            let r = c.get(url).header("accept", "application/vnd.oci.image.manifest.v1+json").send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.headers().get("docker-content-digest").map(|d| d.to_str().unwrap().to_string()))
        }
    };
    let versions = get(format!("{api}/versions")).await.1;
    let id_of = |digest: &str| {
        versions.as_array().unwrap().iter().find(|v| v["name"] == digest).unwrap()["id"].as_u64().unwrap()
    };
    let (old_id, new_id) = (id_of(&old), id_of(&new));

    // A version deleted: gone from pulls, the tag list and the active versions.
    let (status, _) = call(reqwest::Method::DELETE, format!("{api}/versions/{old_id}"), None).await;
    assert_eq!(status, 204);
    assert_eq!(manifest("v1").await.0, 404);
    assert_eq!(manifest(&old).await.0, 404);
    let as_blob = format!("{}/v2/acme/app/blobs/{old}", s.url);
    assert_eq!(c.get(&as_blob).send().await.unwrap().status(), 404, "nor are its bytes served as a blob");
    assert_eq!(c.delete(&as_blob).send().await.unwrap().status(), 409, "nor can they be unlinked");
    let tags = c.get(format!("{}/v2/acme/app/tags/list", s.url)).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(tags["tags"], json!(["v2"]));
    let active = get(format!("{api}/versions")).await.1;
    assert_eq!(active.as_array().unwrap().len(), 1);
    let (_, deleted) = get(format!("{api}/versions?state=deleted")).await;
    assert_eq!(deleted.as_array().unwrap().len(), 1);
    assert_eq!(deleted[0]["name"], old.as_str());
    assert_eq!(deleted[0]["metadata"]["container"]["tags"], json!(["v1"]), "the tags it had");
    assert!(deleted[0]["deleted_at"].is_string());
    assert_eq!(get(format!("{api}/versions/{old_id}")).await.1["name"], old.as_str());
    assert_eq!(get(api.clone()).await.1["version_count"], 1);
    // Deleting again, or the last version, is refused as on GitHub.
    assert_eq!(call(reqwest::Method::DELETE, format!("{api}/versions/{old_id}"), None).await.0, 404);
    let (status, err) = call(reqwest::Method::DELETE, format!("{api}/versions/{new_id}"), None).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["message"].as_str().unwrap().contains("last version"), "{err}");
    // Collection keeps a deleted version's bytes.
    berth_tests::admin_gc(&s.url, false);

    // Restored: it pulls again, by its tag.
    assert_eq!(call(reqwest::Method::POST, format!("{api}/versions/{old_id}/restore"), None).await.0, 204);
    assert_eq!(manifest("v1").await, (200, Some(old.clone())));
    assert_eq!(get(format!("{api}/versions?state=deleted")).await.1, json!([]));
    assert_eq!(call(reqwest::Method::POST, format!("{api}/versions/{old_id}/restore"), None).await.0, 404);
    // A tag a later push took stays with it.
    assert_eq!(call(reqwest::Method::DELETE, format!("{api}/versions/{old_id}"), None).await.0, 204);
    let taken = push_image(&c, &s.url, "acme/app", "v1", 13, &[3000]).await;
    assert_eq!(call(reqwest::Method::POST, format!("{api}/versions/{old_id}/restore"), None).await.0, 204);
    assert_eq!(manifest("v1").await, (200, Some(taken.clone())));
    assert_eq!(manifest(&old).await.0, 200, "restored, untagged");

    // Scopes and rights: delete:packages to delete, write:packages to restore, admin on it.
    let read_only = user_with_token(&s, "bob", &["read:packages"], None).await;
    admin(&s, reqwest::Method::PATCH, "packages/acme/app", Some(json!({"visibility": "public"}))).await;
    let (status, err) = call(reqwest::Method::DELETE, format!("{api}/versions/{old_id}"), Some(read_only)).await;
    assert_eq!(status, 403);
    assert!(err["message"].as_str().unwrap().contains("delete:packages"), "{err}");
    let deleter = user_with_token(&s, "bob", &["read:packages", "delete:packages"], None).await;
    let (status, err) = call(reqwest::Method::DELETE, format!("{api}/versions/{old_id}"), Some(deleter)).await;
    assert_eq!(status, 403, "bob can read the public package, not administer it");
    assert!(err["message"].as_str().unwrap().contains("admin"), "{err}");
    assert_eq!(manifest(&old).await.0, 200, "refusals change nothing");

    // The package deleted: gone from listings and pulls, and restored with its versions.
    let image = berth_tests::manifest_json(&c, &s.url, "acme/app", &new).await;
    let layer = format!("{}/v2/acme/app/blobs/{}", s.url, image["layers"][0]["digest"].as_str().unwrap());
    let anonymous = reqwest::Client::new();
    assert_eq!(anonymous.get(&layer).send().await.unwrap().status(), 200, "public");
    assert_eq!(call(reqwest::Method::DELETE, api.clone(), None).await.0, 204);
    let status = anonymous.get(&layer).send().await.unwrap().status().as_u16();
    assert!(status == 401 || status == 404, "a deleted package's visibility is gone with it: {status}");
    assert_eq!(get(api.clone()).await.0, 404);
    let listed = get(format!("{}/api/v3/orgs/acme/packages?package_type=container", s.url)).await.1;
    assert_eq!(listed, json!([]));
    assert_eq!(manifest("v2").await.0, 404);
    assert_eq!(call(reqwest::Method::DELETE, api.clone(), None).await.0, 404, "already deleted");
    assert_eq!(call(reqwest::Method::POST, format!("{api}/restore"), None).await.0, 204);
    assert_eq!(manifest("v2").await, (200, Some(new.clone())));
    assert_eq!(manifest("v1").await, (200, Some(taken)));
    assert_eq!(get(api.clone()).await.1["version_count"], 3);
    // Not once the name has been pushed to again.
    assert_eq!(call(reqwest::Method::DELETE, api.clone(), None).await.0, 204);
    push_image(&c, &s.url, "acme/app", "fresh", 14, &[3000]).await;
    let (status, err) = call(reqwest::Method::POST, format!("{api}/restore"), None).await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(manifest("v2").await.0, 404);
    assert_eq!(get(api.clone()).await.1["version_count"], 1);
}

/// After the retention period a deleted version cannot be restored: it is purged, and garbage
/// collection then takes the blobs only it held.
#[tokio::test]
async fn deleted_versions_are_purged_after_the_retention_period_and_collected() {
    let s = Server::start_with(&["--deleted-retention-secs", "2", "--gc-grace-secs", "1", "--gc-interval-secs", "0"]);
    let c = client();
    let layer = 400_000;
    let old = push_image(&c, &s.url, "admin/app", "v1", 21, &[layer]).await;
    push_image(&c, &s.url, "admin/app", "v2", 22, &[layer]).await;
    let api = format!("{}/api/v3/users/admin/packages/container/app", s.url);
    let versions = c.get(format!("{api}/versions")).send().await.unwrap().json::<Value>().await.unwrap();
    let id = versions.as_array().unwrap().iter().find(|v| v["name"] == old.as_str()).unwrap()["id"].as_u64().unwrap();
    let manifest = berth_tests::manifest_json(&c, &s.url, "admin/app", &old).await;
    let only_old = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let r = c.delete(format!("{api}/versions/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    // Within the retention period collection keeps it, and a restore works.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let kept = berth_tests::admin_gc(&s.url, false);
    assert_eq!(kept["bytes"], 0, "{kept}");
    let blob = format!("{}/v2/admin/app/blobs/{only_old}", s.url);
    assert_eq!(c.head(&blob).send().await.unwrap().status(), 200);
    assert_eq!(c.post(format!("{api}/versions/{id}/restore")).send().await.unwrap().status(), 204);
    assert_eq!(c.delete(format!("{api}/versions/{id}")).send().await.unwrap().status(), 204);
    // Past it: no restore, and collection frees what only that version held.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let r = c.post(format!("{api}/versions/{id}/restore")).send().await.unwrap();
    assert_eq!(r.status(), 404, "restorable for the retention period only");
    let started = std::time::Instant::now();
    let first = berth_tests::admin_gc(&s.url, false);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let second = berth_tests::admin_gc(&s.url, false);
    let freed = first["bytes"].as_u64().unwrap() + second["bytes"].as_u64().unwrap();
    assert!(freed >= layer as u64, "the purged version's layer is collected: {first} {second}");
    assert_eq!(c.head(&blob).send().await.unwrap().status(), 404);
    assert_eq!(
        c.get(format!("{api}/versions?state=deleted")).send().await.unwrap().json::<Value>().await.unwrap(),
        json!([])
    );
    eprintln!("purge and collection of a deleted version: {freed} bytes freed in {:?}", started.elapsed());
}

/// Download counts: manifest GETs by tag and by digest count, HEADs do not, and a frontend
/// reports them within seconds, without a metadata write per pull.
#[tokio::test]
async fn pulls_are_counted_per_version() {
    let s = Server::start();
    let c = client();
    let one = push_image(&c, &s.url, "admin/counted", "v1", 41, &[1000]).await;
    let two = push_image(&c, &s.url, "admin/counted", "v2", 42, &[1000]).await;
    let get = |reference: String, head: bool| {
        let url = format!("{}/v2/admin/counted/manifests/{reference}", s.url);
        let c = client();
        async move {
            let req = if head { c.head(url) } else { c.get(url) };
            let r = req.header("accept", "application/vnd.oci.image.manifest.v1+json").send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    for _ in 0..3 {
        get("v1".into(), false).await;
    }
    get(one.clone(), false).await;
    get(one.clone(), true).await;
    get(two.clone(), false).await;
    get("v2".into(), true).await;
    let api = format!("{}/api/v3/users/admin/packages/container/counted", s.url);
    let counts = || async {
        let versions: Value = c.get(format!("{api}/versions")).send().await.unwrap().json().await.unwrap();
        let of =
            |d: &str| versions.as_array().unwrap().iter().find(|v| v["name"] == d).unwrap()["download_count"].clone();
        let package: Value = c.get(&api).send().await.unwrap().json().await.unwrap();
        (of(&one), of(&two), package["download_count"].clone())
    };
    let started = std::time::Instant::now();
    while counts().await != (json!(4), json!(1), json!(5)) {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "counts never arrived: {:?}", counts().await);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!("download counts reported {:?} after the pulls", started.elapsed());
}

/// A push describes its package: description, license and source from the image config's
/// labels or the manifest's (an index's) annotations; too long values are cut and the push
/// still succeeds; markup is kept as text (escaping is the pages' job).
#[tokio::test]
async fn pushes_describe_their_packages() {
    let s = Server::start();
    let c = client();
    let long = format!("<script>alert(1)</script> {}", "é".repeat(600));
    let config = json!({"config": {"Labels": {
        "org.opencontainers.image.description": long,
        "org.opencontainers.image.licenses": "MIT",
        "org.opencontainers.image.source": "https://git.example/admin/described",
    }}})
    .to_string();
    let cd = berth_tests::push_blob(&c, &s.url, "admin/described", config.as_bytes()).await;
    let layer = b"layer bytes".to_vec();
    let ld = berth_tests::push_blob(&c, &s.url, "admin/described", &layer).await;
    let m = berth_tests::image_manifest((&cd, config.len()), &[(&ld, layer.len())], "");
    assert_eq!(put_manifest(&c, &s.url, "admin/described", "amd64", m.clone()).await.status(), 201);
    let api = format!("{}/api/v3/users/admin/packages/container/described", s.url);
    let p: Value = c.get(&api).send().await.unwrap().json().await.unwrap();
    let description = p["description"].as_str().unwrap();
    assert_eq!(description.chars().count(), 512, "cut at 512 characters");
    assert!(description.starts_with("<script>alert(1)</script> éé"));
    assert_eq!(
        (p["license"].as_str(), p["source_url"].as_str()),
        (Some("MIT"), Some("https://git.example/admin/described"))
    );
    // A multi-platform image: the index's annotations speak for the package.
    let md = berth_tests::digest(m.as_bytes());
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": m.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
        "annotations": {"org.opencontainers.image.description": "from the index"},
    })
    .to_string();
    let r = c
        .put(format!("{}/v2/admin/described/manifests/v1", s.url))
        .header("content-type", "application/vnd.oci.image.index.v1+json")
        .body(index)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = c.get(&api).send().await.unwrap().json().await.unwrap();
    assert_eq!(p["description"], "from the index");
    assert_eq!(p["license"], "MIT", "what the index does not say stays");
}
