//! Package pages: HTML rendered by the registry itself, with no script at all (the pages'
//! content security policy lets none run) and one stylesheet inline:
//!
//! | path | page |
//! |---|---|
//! | `/` | what this registry is, how to log in, push and pull, and its public packages |
//! | `/users/{user}/packages`, `/orgs/{org}/packages` | an owner's packages |
//! | `/{users,orgs}/{owner}/packages/container/package/{name}` | a package |
//! | `/{users,orgs}/{owner}/packages/container/{name}/{id}` | a package, one version marked |
//! | `/login` | asks the browser for a user name and personal access token (Basic) |
//!
//! A package page shows its description, license and source link, visibility, downloads,
//! tags, and its versions with digests, sizes, dates, downloads and, for multi-platform
//! images, their platforms, with `docker pull` commands by tag and by digest.
//!
//! Pages show what the caller may read (`core::access`), and answer 404 for anything else,
//! as the API does: anyone sees public packages, and credentials (Basic, or a registry or
//! personal access token as Bearer) show the rest. **Logging in** is the browser's own Basic
//! login: `/login` answers 401 with a Basic challenge until the browser sends a user name and
//! a personal access token that verify, then sends it home; the browser keeps sending them to
//! every page of the registry. No cookie, no session: nothing to steal but what the browser
//! already holds. Everything a pusher wrote (names, tags,
//! descriptions, licenses, URLs) is escaped; a source URL becomes a link only when it is
//! `http` or `https`.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use berth_core::access::{owner_of, permission, Identity, Visibility};
use berth_core::store::PackageVersion;
use berth_core::{Digest, RegistryError};
use percent_encoding::percent_decode_str;
use serde_json::Value;

use crate::packages_api::{self, encode, version_id, OwnerKind};
use crate::{auth, Registry};

/// Versions a package page lists, newest first.
const VERSIONS_SHOWN: usize = 50;

/// Public packages the home page lists.
const PUBLIC_SHOWN: usize = 100;

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1f2328;\
background:#fff}header{background:#24292f;padding:14px 24px}header a{color:#fff;text-decoration:none;\
font-weight:600;font-size:18px}main{max-width:1040px;margin:24px auto;padding:0 24px}h1{font-size:26px;\
margin:8px 0}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:6px;margin-top:28px}\
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}pre{background:#f6f8fa;\
border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;white-space:pre-wrap;word-break:break-all;\
user-select:all;margin:6px 0}\
table{border-collapse:collapse;width:100%;font-size:14px}th,td{border-bottom:1px solid #d0d7de;\
padding:6px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}.badge{display:inline-block;\
border:1px solid #d0d7de;border-radius:2em;padding:0 10px;font-size:12px;margin-left:8px;vertical-align:middle}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:6px 18px;font-size:14px}dt{font-weight:600;\
color:#59636e}dd{margin:0}.muted{color:#59636e}tr.marked{background:#fff8c5}ul{padding-left:20px}\
li{margin:4px 0}.wide{width:46%}";

/// The pages' content security policy: no script, no request anywhere, only the stylesheet
/// above (by its hash).
fn policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(STYLE.as_bytes()));
        format!("default-src 'none'; style-src 'sha256-{hash}'; sandbox")
    })
}

/// `s` as HTML text or attribute value.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page: `title` and `body` (HTML already escaped).
fn page(status: StatusCode, title: &str, body: &str, head: bool) -> Response {
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width,initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body>\
         <header><a href=\"/\">Berth</a></header><main>{body}</main></body></html>",
        esc(title)
    );
    let len = html.len();
    let mut r = Response::new(if head { axum::body::Body::empty() } else { axum::body::Body::from(html) });
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

fn not_found(head: bool) -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        "<h1>Not found</h1><p class=\"muted\">There is no such page, or you may not see it.</p>",
        head,
    )
}

/// The registry's host as clients name it (for `docker` commands).
fn host(reg: &Registry, headers: &HeaderMap) -> String {
    let base = packages_api::base_url(reg, headers);
    base.split_once("://").map_or(base.clone(), |(_, h)| h.to_string())
}

/// A path's segments, each percent-decoded.
fn segments(path: &str) -> Option<Vec<String>> {
    path.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned()))
        .collect()
}

/// Answers a page's path (`None`: not a page; the caller answers as for any other path).
pub async fn handle(reg: &Registry, method: &Method, path: &str, headers: &HeaderMap) -> Option<Response> {
    if *method != Method::GET && *method != Method::HEAD {
        return None;
    }
    let head = *method == Method::HEAD;
    let segs = segments(path)?;
    let parts: Vec<&str> = segs.iter().map(String::as_str).collect();
    let kind_of = |k: &str| match k {
        "users" => Some(OwnerKind::User),
        "orgs" => Some(OwnerKind::Org),
        _ => None,
    };
    enum Page<'a> {
        Home,
        Owner(OwnerKind, &'a str),
        Package(OwnerKind, &'a str, String, Option<u64>),
    }
    if parts.as_slice() == ["login"] {
        return Some(login(reg, headers, head).await);
    }
    let which = match parts.as_slice() {
        [] => Page::Home,
        [k, owner, "packages"] => Page::Owner(kind_of(k)?, owner),
        [k, owner, "packages", "container", "package", name @ ..] if !name.is_empty() => {
            Page::Package(kind_of(k)?, owner, name.join("/"), None)
        }
        [k, owner, "packages", "container", name @ .., id] if !name.is_empty() => {
            Page::Package(kind_of(k)?, owner, name.join("/"), Some(id.parse().ok()?))
        }
        _ => return None,
    };
    let who = match auth::caller(reg, headers).await {
        Ok(c) => c.identity,
        Err(e) => return Some(crate::error_response(e)),
    };
    let answer = match which {
        Page::Home => home(reg, &who, headers, head).await,
        Page::Owner(kind, owner) => owner_page(reg, &who, kind, owner, head).await,
        Page::Package(kind, owner, name, id) => package_page(reg, &who, headers, kind, owner, &name, id, head).await,
    };
    Some(answer.unwrap_or_else(crate::error_response))
}

/// `/login`: the browser's Basic login (see the module docs).
async fn login(reg: &Registry, headers: &HeaderMap, head: bool) -> Response {
    let ok = headers.contains_key(header::AUTHORIZATION)
        && matches!(auth::caller(reg, headers).await, Ok(c) if !matches!(c.identity, Identity::Anonymous));
    if ok {
        let mut r = page(StatusCode::SEE_OTHER, "Logged in", "<h1>Logged in</h1><p><a href=\"/\">Home</a></p>", head);
        r.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/"));
        return r;
    }
    let mut r = page(
        StatusCode::UNAUTHORIZED,
        "Log in",
        "<h1>Log in</h1><p>Give your user name and a personal access token.</p>",
        head,
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"berth\", charset=\"UTF-8\""));
    r
}

/// The owner's path segment for packages of `repo`.
async fn kind_of_owner(reg: &Registry, who: &Identity, repo: &str) -> Result<OwnerKind, RegistryError> {
    let is_org = reg.meta.access_facts(who, &format!("{}/-", owner_of(repo))).await?.owner_is_org;
    Ok(if is_org { OwnerKind::Org } else { OwnerKind::User })
}

/// The page path of package `repo`.
fn package_path(kind: OwnerKind, repo: &str) -> String {
    let owner = owner_of(repo);
    let name = repo.strip_prefix(&format!("{owner}/")).unwrap_or(repo);
    let name: Vec<String> = name.split('/').map(encode).collect();
    format!("/{}/{}/packages/container/package/{}", kind.path(), encode(owner), name.join("/"))
}

async fn home(reg: &Registry, who: &Identity, headers: &HeaderMap, head: bool) -> Result<Response, RegistryError> {
    let host = esc(&host(reg, headers));
    let public = reg.meta.public_repositories(None, PUBLIC_SHOWN).await?;
    let kinds = futures::future::join_all(public.iter().map(|r| kind_of_owner(reg, who, r))).await;
    let mut body = format!(
        "<h1>Berth container registry</h1><p>This is a container registry: it stores images that \
         <code>docker</code>, <code>podman</code>, <code>skopeo</code>, <code>oras</code> and any OCI client \
         push and pull, and it keeps them as packages of users and organizations.</p>\
         <h2>Log in, push and pull</h2><p>Log in with your user name and a personal access token \
         (an administrator makes one with <code>berth admin token create</code>):</p>\
         <pre data-field=\"login\">docker login {host}</pre>\
         <p>Tag an image with this registry's name and push it; it becomes a private package of \
         the namespace you push to:</p>\
         <pre data-field=\"push\">docker tag my-image {host}/OWNER/NAME:TAG\ndocker push {host}/OWNER/NAME:TAG</pre>\
         <pre data-field=\"pull\">docker pull {host}/OWNER/NAME:TAG</pre>\
         <p>To see the private packages you may read on these pages, <a href=\"/login\">log in</a> \
         with the same user name and token.</p><h2>Public packages</h2>"
    );
    if public.is_empty() {
        body.push_str("<p class=\"muted\">No package is public yet.</p>");
    } else {
        body.push_str("<ul data-field=\"public-packages\">");
        for (repo, kind) in public.iter().zip(kinds) {
            let path = package_path(kind?, repo);
            let _ = write!(body, "<li><a href=\"{}\">{}</a></li>", esc(&path), esc(repo));
        }
        body.push_str("</ul>");
    }
    Ok(page(StatusCode::OK, "Berth container registry", &body, head))
}

async fn owner_page(
    reg: &Registry,
    who: &Identity,
    kind: OwnerKind,
    owner: &str,
    head: bool,
) -> Result<Response, RegistryError> {
    if !packages_api::owner_exists(reg, who, owner, kind).await? {
        return Ok(not_found(head));
    }
    let summaries = reg.meta.packages_of(owner).await?;
    let checks = summaries.iter().map(|s| reg.meta.access_facts(who, &s.package.name));
    let mut rows = String::new();
    for (s, facts) in summaries.iter().zip(futures::future::join_all(checks).await) {
        if permission(who, &s.package.name, &facts?).is_none() {
            continue;
        }
        let repo = &s.package.name;
        let name = repo.strip_prefix(&format!("{owner}/")).unwrap_or(repo);
        let _ = write!(
            rows,
            "<tr data-package=\"{}\"><td><a href=\"{}\">{}</a><span class=\"badge\">{}</span></td><td>{}</td>\
             <td>{}</td><td>{}</td></tr>",
            esc(name),
            esc(&package_path(kind, repo)),
            esc(name),
            visibility_name(s.package.visibility),
            esc(s.package.about.description.as_deref().unwrap_or("")),
            s.versions,
            date(s.updated_ms)
        );
    }
    let body = if rows.is_empty() {
        format!("<h1>{}</h1><p class=\"muted\">No packages to show.</p>", esc(owner))
    } else {
        format!(
            "<h1>{}</h1><h2>Packages</h2><table><thead><tr><th>Package</th><th>Description</th><th>Versions</th>\
             <th>Updated</th></tr></thead><tbody>{rows}</tbody></table>",
            esc(owner)
        )
    };
    Ok(page(StatusCode::OK, &format!("{owner}'s packages"), &body, head))
}

fn visibility_name(v: Visibility) -> &'static str {
    match v {
        Visibility::Public => "public",
        Visibility::Internal => "internal",
        Visibility::Private => "private",
    }
}

/// A date as `YYYY-MM-DD HH:MM UTC`.
fn date(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Bytes in a human unit.
fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// What a version's manifest says: its size (config and layers; for an index, its
/// platforms' together) and, for an index, its platforms.
async fn shape(reg: &Registry, digest: &Digest) -> (Option<u64>, Vec<String>) {
    let Ok(bytes) = crate::manifests::manifest_bytes(reg, digest).await else { return (None, vec![]) };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { return (None, vec![]) };
    let image_size = |v: &Value| -> u64 {
        v["config"]["size"].as_u64().unwrap_or(0)
            + v["layers"].as_array().map_or(0, |l| l.iter().filter_map(|l| l["size"].as_u64()).sum())
    };
    let Some(children) = v["manifests"].as_array() else { return (Some(image_size(&v)), vec![]) };
    let mut platforms = vec![];
    let mut total = 0;
    for child in children {
        let p = &child["platform"];
        let (os, arch) = (p["os"].as_str().unwrap_or("unknown"), p["architecture"].as_str().unwrap_or("unknown"));
        let mut name = format!("{os}/{arch}");
        if let Some(variant) = p["variant"].as_str() {
            let _ = write!(name, "/{variant}");
        }
        // Attestations and signatures ride in indexes as "unknown/unknown": not platforms.
        if os != "unknown" {
            platforms.push(name);
        }
        let child_size = match child["digest"].as_str().and_then(|d| d.parse::<Digest>().ok()) {
            Some(d) => match crate::manifests::manifest_bytes(reg, &d).await {
                Ok(b) => serde_json::from_slice::<Value>(&b).map(|c| image_size(&c)).unwrap_or(0),
                Err(_) => 0,
            },
            None => 0,
        };
        total += child_size;
    }
    (Some(total), platforms)
}

#[allow(clippy::too_many_arguments)]
async fn package_page(
    reg: &Registry,
    who: &Identity,
    headers: &HeaderMap,
    kind: OwnerKind,
    owner: &str,
    name: &str,
    marked: Option<u64>,
    head: bool,
) -> Result<Response, RegistryError> {
    let repo = format!("{owner}/{name}");
    if !packages_api::owner_exists(reg, who, owner, kind).await? {
        return Ok(not_found(head));
    }
    let facts = reg.meta.access_facts(who, &repo).await?;
    let Some(package) = facts.package.clone().filter(|p| p.deleted_ms.is_none()) else { return Ok(not_found(head)) };
    if permission(who, &repo, &facts).is_none() {
        return Ok(not_found(head));
    }
    let versions: Vec<PackageVersion> =
        packages_api::versions(reg, &repo).await?.into_iter().filter(|v| v.deleted_ms.is_none()).collect();
    if marked.is_some_and(|id| !versions.iter().any(|v| version_id(&repo, &v.record.digest) == id)) {
        return Ok(not_found(head));
    }
    let host = host(reg, headers);
    let downloads: u64 = versions.iter().map(|v| v.downloads).sum();
    let about = &package.about;
    let mut body = format!(
        "<p class=\"muted\"><a href=\"/{}/{}/packages\">{}</a></p><h1 data-field=\"name\">{}<span class=\"badge\" \
         data-field=\"visibility\">{}</span></h1>",
        kind.path(),
        esc(&encode(owner)),
        esc(owner),
        esc(name),
        visibility_name(package.visibility)
    );
    match &about.description {
        Some(d) => {
            let _ = write!(body, "<p data-field=\"description\">{}</p>", esc(d));
        }
        None => body.push_str("<p class=\"muted\" data-field=\"description\">No description.</p>"),
    }
    body.push_str("<dl>");
    if let Some(l) = &about.license {
        let _ = write!(body, "<dt>License</dt><dd data-field=\"license\">{}</dd>", esc(l));
    }
    if let Some(url) = &about.source_url {
        let link = if url.starts_with("https://") || url.starts_with("http://") {
            format!("<a href=\"{}\" rel=\"nofollow noopener noreferrer\">{}</a>", esc(url), esc(url))
        } else {
            esc(url)
        };
        let _ = write!(body, "<dt>Source</dt><dd data-field=\"source\">{link}</dd>");
    }
    let _ = write!(
        body,
        "<dt>Total downloads</dt><dd data-field=\"downloads\">{downloads}</dd><dt>Versions</dt>\
         <dd data-field=\"version-count\">{}</dd><dt>Created</dt><dd>{}</dd></dl>",
        versions.len(),
        date(package.created_ms)
    );
    // Install: the newest version, by its tag ("latest" when it has it) and by digest.
    if let Some(newest) = versions.first() {
        body.push_str("<h2>Install from the command line</h2>");
        let tag = versions
            .iter()
            .find(|v| v.tags.iter().any(|t| t == "latest"))
            .map(|_| "latest".to_string())
            .or_else(|| versions.iter().find_map(|v| v.tags.first().cloned()));
        if let Some(tag) = tag {
            let _ = write!(
                body,
                "<pre data-field=\"pull-by-tag\">docker pull {}</pre>",
                esc(&format!("{host}/{repo}:{tag}"))
            );
        }
        let _ = write!(
            body,
            "<pre data-field=\"pull-by-digest\">docker pull {}</pre>",
            esc(&format!("{host}/{repo}@{}", newest.record.digest))
        );
    }
    // Tags, newest version first.
    let mut tag_rows = String::new();
    for v in &versions {
        for t in &v.tags {
            let _ = write!(
                tag_rows,
                "<tr data-tag=\"{}\"><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                esc(t),
                esc(t),
                esc(&v.record.digest.to_string()),
                date(v.record.pushed_at_ms)
            );
        }
    }
    if !tag_rows.is_empty() {
        let _ = write!(
            body,
            "<h2>Tags</h2><table><thead><tr><th>Tag</th><th>Digest</th><th>Pushed</th></tr></thead>\
             <tbody>{tag_rows}</tbody></table>"
        );
    }
    let shown = &versions[..versions.len().min(VERSIONS_SHOWN)];
    let shapes = futures::future::join_all(shown.iter().map(|v| shape(reg, &v.record.digest))).await;
    body.push_str(
        "<h2>Versions</h2><table><thead><tr><th class=\"wide\">Digest</th><th>Tags</th><th>Platforms</th>\
         <th>Size</th><th>Pushed</th><th>Downloads</th></tr></thead><tbody>",
    );
    for (v, (bytes, platforms)) in shown.iter().zip(shapes) {
        let id = version_id(&repo, &v.record.digest);
        let digest = v.record.digest.to_string();
        let tags: Vec<String> = v.tags.iter().map(|t| format!("<code>{}</code>", esc(t))).collect();
        let _ = write!(
            body,
            "<tr id=\"v{id}\" data-version=\"{}\"{}><td><code title=\"{}\">{}…</code><pre data-field=\"pull\">docker pull {}</pre></td>\
             <td>{}</td><td data-field=\"platforms\">{}</td><td data-field=\"size\">{}</td><td>{}</td>\
             <td data-field=\"downloads\">{}</td></tr>",
            esc(&digest),
            if marked == Some(id) { " class=\"marked\"" } else { "" },
            esc(&digest),
            esc(&digest[..digest.len().min(19)]),
            esc(&format!("{host}/{repo}@{digest}")),
            tags.join(" "),
            esc(&platforms.join(", ")),
            bytes.map(size).unwrap_or_default(),
            date(v.record.pushed_at_ms),
            v.downloads
        );
    }
    body.push_str("</tbody></table>");
    if versions.len() > VERSIONS_SHOWN {
        let _ = write!(body, "<p class=\"muted\">The newest {VERSIONS_SHOWN} of {} versions.</p>", versions.len());
    }
    Ok(page(StatusCode::OK, &repo, &body, head))
}
