//! The packages REST API in GitHub's paths and shapes, under `/api/v3` as GitHub Enterprise
//! Server serves it, so that tools written for GitHub's API work against Berth by changing
//! the base URL. Container packages only; this part reads:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v3/user/packages?package_type=container` | the authenticated user's packages |
//! | `GET /api/v3/users/{user}/packages?package_type=container` | a user's packages |
//! | `GET /api/v3/orgs/{org}/packages?package_type=container` | an organization's packages |
//! | `GET .../packages/container/{name}` | one package (`name` URL-encoded when it holds `/`) |
//! | `GET .../packages/container/{name}/versions` | its versions, newest first |
//! | `GET .../packages/container/{name}/versions/{id}` | one version |
//! | `DELETE .../packages/container/{name}` | deletes the package, restorably |
//! | `POST .../packages/container/{name}/restore` | restores it with the versions deleted with it |
//! | `DELETE .../packages/container/{name}/versions/{id}` | deletes a version, restorably |
//! | `POST .../packages/container/{name}/versions/{id}/restore` | restores it |
//!
//! **Deleted means restorable.** A deleted version keeps its bytes; pulls, tag lists and
//! referrers do not see it, and `versions?state=deleted` lists it. A restore brings back its
//! tags where no later push took them. After the retention period (30 days unless configured,
//! `--deleted-retention-secs`) it is purged and its blobs are collected. As on GitHub, the last
//! version of a package cannot be deleted (delete the package), and a package cannot be
//! restored once its name has been pushed to again. Deleting and restoring need admin rights
//! on the package; deleting needs a token with `delete:packages`, restoring one with
//! `write:packages` (both with `read:packages`).
//!
//! Lists take `visibility` (packages), `page` and `per_page` (default 30, at most 100) and
//! answer with a `Link` header as GitHub's do. Every call needs a token with `read:packages`,
//! and shows only packages the caller may read (`core::access`); another package is 404, as on
//! GitHub. Errors have GitHub's shape, `{"message": ..., "documentation_url": ...}`.
//!
//! **Descriptions.** Packages carry `description`, `license` and `source_url` (GitHub shows
//! them on its pages only): the `org.opencontainers.image.description`, `.licenses` and
//! `.source` of the latest push that gave them, from the manifest's (or index's) annotations or
//! the image config's labels, cut at 512 and 256 characters.
//!
//! **Download counts.** One package (`GET .../packages/container/{name}`) and its versions
//! carry `download_count`, which GitHub's REST API does not have: the pulls of each version
//! (manifest `GET`s by tag or digest), reported by the frontends every few seconds.
//!
//! **Ids.** A package's `id` and a version's are numbers derived from the package name (and
//! the manifest digest): the first 52 bits of their SHA-256, stable for the life of the
//! package and below JavaScript's largest exact integer.

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use berth_core::access::{owner_of, permission, Identity, Scope, Visibility};
use berth_core::store::{DirectoryChange, PackageSummary, PackageVersion};
use berth_core::{Digest, ErrorCode, RegistryError};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};

use crate::{json_response, Registry};

/// Items per page when `per_page` is not given, and at most.
const PER_PAGE: usize = 30;
const MAX_PER_PAGE: usize = 100;

/// Whose packages a path names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnerKind {
    User,
    Org,
}

impl OwnerKind {
    pub(crate) fn path(self) -> &'static str {
        match self {
            OwnerKind::User => "users",
            OwnerKind::Org => "orgs",
        }
    }

    fn github_type(self) -> &'static str {
        match self {
            OwnerKind::User => "User",
            OwnerKind::Org => "Organization",
        }
    }
}

fn not_found(what: &str) -> RegistryError {
    RegistryError::new(ErrorCode::NameUnknown, format!("{what} not found")).with_status(404)
}

fn invalid(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported, detail).with_status(422)
}

/// A stable id below 2^52 for `s`.
pub(crate) fn id_of(s: &str) -> u64 {
    let d = Digest::sha256_of(s.as_bytes());
    u64::from_str_radix(&d.hex()[..13], 16).unwrap_or(0)
}

/// The id of a version: that of `repo@digest`.
pub(crate) fn version_id(repo: &str, digest: &Digest) -> u64 {
    id_of(&format!("{repo}@{digest}"))
}

/// RFC 3339 in UTC, to the second, as GitHub writes times.
fn time(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What a package name escapes in a URL path: what would split or end the segment.
const SEGMENT: &AsciiSet = &CONTROLS.add(b' ').add(b'/').add(b'%').add(b'?').add(b'#');

pub(crate) fn encode(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

/// A user or organization as GitHub's `simple-user` shows one, with this registry's URLs.
fn account_json(login: &str, kind: OwnerKind, base: &str) -> Value {
    let api = format!("{base}/api/v3/users/{login}");
    json!({
        "login": login,
        "id": id_of(login),
        "node_id": format!("U_{:x}", id_of(login)),
        "avatar_url": "",
        "gravatar_id": "",
        "url": api,
        "html_url": format!("{base}/{login}"),
        "followers_url": format!("{api}/followers"),
        "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"),
        "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"),
        "organizations_url": format!("{api}/orgs"),
        "repos_url": format!("{api}/repos"),
        "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"),
        "type": kind.github_type(),
        "site_admin": false,
    })
}

/// The query parameters of a request.
fn query(uri: &axum::http::Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The registry's base URL as the caller reached it.
pub(crate) fn base_url(reg: &Registry, headers: &HeaderMap) -> String {
    match &reg.auth.external_url {
        Some(base) => base.trim_end_matches('/').to_string(),
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            let scheme = if reg.auth.https { "https" } else { "http" };
            format!("{scheme}://{host}")
        }
    }
}

/// The page a list asks for: (page, per page), 1-based.
fn paging(q: &[(String, String)]) -> Result<(usize, usize), RegistryError> {
    let number = |name: &str, default: usize| -> Result<usize, RegistryError> {
        match param(q, name) {
            None | Some("") => Ok(default),
            Some(v) => v.parse::<usize>().map_err(|_| invalid(format!("{name} must be a number"))),
        }
    };
    let page = number("page", 1)?.max(1);
    let per_page = number("per_page", PER_PAGE)?.clamp(1, MAX_PER_PAGE);
    Ok((page, per_page))
}

/// One page of `items` as a JSON array, with GitHub's `Link` header (`next`, `last`, `first`,
/// `prev` as they apply) pointing at `url` with the other query parameters kept.
fn page_of(
    items: Vec<Value>,
    page: usize,
    per_page: usize,
    url: &str,
    q: &[(String, String)],
) -> Result<Response, RegistryError> {
    let pages = items.len().div_ceil(per_page).max(1);
    let link_to = |p: usize| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in q.iter().filter(|(k, _)| k != "page" && k != "per_page") {
            s.append_pair(k, v);
        }
        s.append_pair("per_page", &per_page.to_string()).append_pair("page", &p.to_string());
        format!("<{url}?{}>", s.finish())
    };
    let mut links = vec![];
    if page < pages {
        links.push(format!("{}; rel=\"next\"", link_to(page + 1)));
        links.push(format!("{}; rel=\"last\"", link_to(pages)));
    }
    if page > 1 {
        links.push(format!("{}; rel=\"first\"", link_to(1)));
        links.push(format!("{}; rel=\"prev\"", link_to((page - 1).min(pages))));
    }
    let shown: Vec<Value> = items.into_iter().skip((page - 1).saturating_mul(per_page)).take(per_page).collect();
    let mut resp = json_response(StatusCode::OK, Value::Array(shown).to_string());
    if !links.is_empty() {
        let v = HeaderValue::from_str(&links.join(", ")).map_err(RegistryError::internal)?;
        resp.headers_mut().insert(header::LINK, v);
    }
    Ok(resp)
}

/// Where GitHub's error bodies point.
const DOCS: &str = "https://docs.github.com/rest/packages/packages";

/// Handles `/api/v3/...` (`parts`: the path after `v3`, still URL-encoded), answering errors
/// as GitHub does: `{"message": ..., "documentation_url": ...}` with the same status.
pub async fn handle(
    reg: &Registry,
    who: &Identity,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    parts: &[&str],
) -> Response {
    let answer = if ![Method::GET, Method::HEAD, Method::DELETE, Method::POST].contains(method) {
        Err(not_found("endpoint"))
    } else if !who.has_scope(Scope::ReadPackages) {
        Err(RegistryError::new(ErrorCode::Denied, "this token lacks the read:packages scope"))
    } else {
        route(reg, who, method, uri, headers, parts).await
    };
    match answer {
        Ok(r) => r,
        // Internal errors keep the registry's logging and request id.
        Err(e) if e.code == ErrorCode::Unknown => crate::error_response(e),
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_response(status, json!({"message": e.detail, "documentation_url": DOCS}).to_string())
        }
    }
}

/// What a `DELETE` or `POST` of a package or version asks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Delete,
    Restore,
}

/// Whether `who` may make `change` to a package it may see with `perm`: admin rights, and the
/// scopes GitHub asks for (`delete:packages` to delete, `write:packages` to restore).
fn may_change(who: &Identity, perm: Option<berth_core::access::Perm>, change: Change) -> Result<(), RegistryError> {
    let (scope, name) = match change {
        Change::Delete => (Scope::DeletePackages, "delete:packages"),
        Change::Restore => (Scope::WritePackages, "write:packages"),
    };
    if !who.has_scope(scope) {
        return Err(RegistryError::new(ErrorCode::Denied, format!("this token lacks the {name} scope")));
    }
    if perm != Some(berth_core::access::Perm::Admin) {
        return Err(RegistryError::new(ErrorCode::Denied, "admin rights on the package are required"));
    }
    Ok(())
}

/// Routes a request of `/api/v3/...`.
async fn route(
    reg: &Registry,
    who: &Identity,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    parts: &[&str],
) -> Result<Response, RegistryError> {
    let q = query(uri);
    let base = base_url(reg, headers);
    // The owner the path names, and the rest of the path.
    let (owner, kind, rest) = match parts {
        ["user", rest @ ..] => {
            let Identity::User { name, .. } = who else {
                return Err(RegistryError::new(ErrorCode::Unauthorized, "a user's token is required"));
            };
            (name.clone(), OwnerKind::User, rest)
        }
        ["users", user, rest @ ..] => (user.to_string(), OwnerKind::User, rest),
        ["orgs", org, rest @ ..] => (org.to_string(), OwnerKind::Org, rest),
        _ => return Err(not_found("endpoint")),
    };
    if !owner_exists(reg, who, &owner, kind).await? {
        return Err(not_found(if kind == OwnerKind::Org { "organization" } else { "user" }));
    }
    let api = format!("{base}/api/v3/{}/{owner}/packages", kind.path());
    let html = format!("{base}/{}/{owner}/packages", kind.path());
    // What the method asks of the path: a read, a deletion, a restore.
    let change = match (method, rest) {
        (&Method::GET | &Method::HEAD, _) => None,
        (&Method::DELETE, ["packages", "container", _] | ["packages", "container", _, "versions", _]) => {
            Some(Change::Delete)
        }
        (
            &Method::POST,
            ["packages", "container", _, "restore"] | ["packages", "container", _, "versions", _, "restore"],
        ) => Some(Change::Restore),
        _ => return Err(not_found("endpoint")),
    };
    match rest {
        ["packages"] => {
            match param(&q, "package_type") {
                None | Some("") => return Err(invalid("package_type is required")),
                Some("container") => {}
                // Berth holds container packages only.
                Some(_) => return page_of(vec![], 1, PER_PAGE, &api, &q),
            }
            let visibility = match param(&q, "visibility") {
                None | Some("") => None,
                Some(v) => Some(v.parse::<Visibility>().map_err(invalid)?),
            };
            let (page, per_page) = paging(&q)?;
            let summaries: Vec<PackageSummary> = reg
                .meta
                .packages_of(&owner)
                .await?
                .into_iter()
                .filter(|s| visibility.is_none_or(|v| v == s.package.visibility))
                .collect();
            // Asked all at once, so that the metadata client batches them.
            let checks = summaries.iter().map(|s| reg.meta.access_facts(who, &s.package.name));
            let mut items = vec![];
            for (summary, facts) in summaries.iter().zip(futures::future::join_all(checks).await) {
                let facts = facts?;
                if permission(who, &summary.package.name, &facts).is_some() {
                    items.push(package_json(summary, facts.source.as_ref(), kind, &api, &html, &base));
                }
            }
            page_of(items, page, per_page, &api, &q)
        }
        ["packages", "container", name, more @ ..] => {
            let name = percent_decode_str(name).decode_utf8().map_err(|_| not_found("package"))?.into_owned();
            let repo = format!("{owner}/{name}");
            let facts = reg.meta.access_facts(who, &repo).await?;
            let perm = permission(who, &repo, &facts);
            let Some(package) = facts.package.clone().filter(|_| perm.is_some()) else {
                return Err(not_found("package"));
            };
            if let Some(change) = change {
                may_change(who, perm, change)?;
                return change_package(reg, &repo, change, more).await;
            }
            // A deleted package is gone but for its restore.
            if package.deleted_ms.is_some() {
                return Err(not_found("package"));
            }
            // One read of the package's versions serves the package's summary and its versions
            // alike (its owner's whole listing is not needed).
            let (versions, deleted): (Vec<PackageVersion>, Vec<PackageVersion>) =
                versions(reg, &repo).await?.into_iter().partition(|v| v.deleted_ms.is_none());
            let updated_ms = versions.iter().map(|v| v.record.pushed_at_ms).fold(package.created_ms, u64::max);
            let summary = PackageSummary { package, versions: versions.len() as u64, updated_ms };
            let mut package = package_json(&summary, facts.source.as_ref(), kind, &api, &html, &base);
            package["download_count"] = json!(versions.iter().map(|v| v.downloads).sum::<u64>());
            let pkg_url = package["url"].as_str().unwrap_or_default().to_string();
            let pkg_html = package["html_url"].as_str().unwrap_or_default().to_string();
            // A version's page is `.../packages/container/{name}/{id}` (no `package/`).
            let versions_html = format!("{html}/container/{name}");
            match more {
                [] => Ok(json_response(StatusCode::OK, package.to_string())),
                ["versions"] => {
                    let listed = match param(&q, "state") {
                        None | Some("") | Some("active") => &versions,
                        Some("deleted") => &deleted,
                        Some(other) => return Err(invalid(format!("state must be active or deleted, not {other}"))),
                    };
                    let (page, per_page) = paging(&q)?;
                    let items =
                        listed.iter().map(|v| version_json(v, &repo, &pkg_url, &pkg_html, &versions_html)).collect();
                    page_of(items, page, per_page, &format!("{pkg_url}/versions"), &q)
                }
                ["versions", id] => {
                    let id: u64 = id.parse().map_err(|_| not_found("package version"))?;
                    let v = versions
                        .into_iter()
                        .chain(deleted)
                        .find(|v| version_id(&repo, &v.record.digest) == id)
                        .ok_or_else(|| not_found("package version"))?;
                    Ok(json_response(
                        StatusCode::OK,
                        version_json(&v, &repo, &pkg_url, &pkg_html, &versions_html).to_string(),
                    ))
                }
                _ => Err(not_found("endpoint")),
            }
        }
        // Other package types: Berth has none of them.
        ["packages", _, ..] => Err(not_found("package")),
        _ => Err(not_found("endpoint")),
    }
}

/// Deletes or restores package `repo` (`more` empty or `["restore"]`) or one of its versions
/// (`["versions", id]`, `["versions", id, "restore"]`).
async fn change_package(reg: &Registry, repo: &str, change: Change, more: &[&str]) -> Result<Response, RegistryError> {
    let version = match more {
        [] | ["restore"] => None,
        ["versions", id] | ["versions", id, "restore"] => {
            let id: u64 = id.parse().map_err(|_| not_found("package version"))?;
            let v = versions(reg, repo)
                .await?
                .into_iter()
                .filter(|v| v.deleted_ms.is_some() == (change == Change::Restore))
                .find(|v| version_id(repo, &v.record.digest) == id)
                .ok_or_else(|| not_found("package version"))?;
            Some(v.record.digest.to_string())
        }
        _ => return Err(not_found("endpoint")),
    };
    // This frontend's answers for pulls by digest while the metadata service is away must
    // not outlive the deletion.
    if let (Change::Delete, Some(d)) = (change, &version) {
        if let Ok(d) = d.parse::<Digest>() {
            reg.recall.forget(repo, &d);
        }
    }
    let repo = repo.to_string();
    let c = match (change, version) {
        (Change::Delete, Some(digest)) => DirectoryChange::DeleteVersion { repo, digest, now_ms: 0 },
        (Change::Restore, Some(digest)) => DirectoryChange::RestoreVersion { repo, digest, window_ms: 0, now_ms: 0 },
        (Change::Delete, None) => DirectoryChange::DeletePackage { repo, now_ms: 0 },
        (Change::Restore, None) => DirectoryChange::RestorePackage { repo, window_ms: 0, now_ms: 0 },
    };
    // Times and the restore window are the metadata leader's (it fills them in).
    reg.meta.change_directory(c).await?;
    // 204, as GitHub answers a deletion or a restore.
    crate::empty(StatusCode::NO_CONTENT, &[])
}

/// Whether `owner` is a user (`kind` User) or an organization (`kind` Org).
pub(crate) async fn owner_exists(
    reg: &Registry,
    who: &Identity,
    owner: &str,
    kind: OwnerKind,
) -> Result<bool, RegistryError> {
    let is_org = reg.meta.access_facts(who, &format!("{owner}/-")).await?.owner_is_org;
    Ok(match kind {
        OwnerKind::Org => is_org,
        OwnerKind::User => !is_org && reg.meta.user(owner).await?.is_some(),
    })
}

/// A package's versions, newest first.
pub(crate) async fn versions(reg: &Registry, repo: &str) -> Result<Vec<PackageVersion>, RegistryError> {
    let mut v = reg.meta.package_versions(repo).await?;
    v.sort_by(|a, b| {
        b.record.pushed_at_ms.cmp(&a.record.pushed_at_ms).then_with(|| a.record.digest.cmp(&b.record.digest))
    });
    Ok(v)
}

/// A package as GitHub shows one.
fn package_json(
    s: &PackageSummary,
    source: Option<&berth_core::access::SourceRepo>,
    kind: OwnerKind,
    api: &str,
    html: &str,
    base: &str,
) -> Value {
    let repo = &s.package.name;
    let owner = owner_of(repo);
    let name = repo.strip_prefix(&format!("{owner}/")).unwrap_or(repo);
    let mut v = json!({
        "id": id_of(repo),
        "name": name,
        "package_type": "container",
        "owner": account_json(owner, kind, base),
        "version_count": s.versions,
        "visibility": s.package.visibility,
        "url": format!("{api}/container/{}", encode(name)),
        "html_url": format!("{html}/container/package/{name}"),
        "created_at": time(s.package.created_ms),
        "updated_at": time(s.updated_ms),
        "description": s.package.about.description,
        "license": s.package.about.license,
        "source_url": s.package.about.source_url,
    });
    if let Some(src) = source {
        let full = format!("{}/{}", src.org, src.name);
        v["repository"] = json!({
            "id": id_of(&full),
            "node_id": format!("R_{:x}", id_of(&full)),
            "name": src.name,
            "full_name": full,
            "private": false,
            "fork": false,
            "url": src.url,
            "html_url": src.url,
            "owner": account_json(&src.org, OwnerKind::Org, base),
        });
    }
    v
}

/// A version as GitHub shows one (`deleted_at` when it is deleted).
fn version_json(v: &PackageVersion, repo: &str, pkg_url: &str, pkg_html: &str, versions_html: &str) -> Value {
    let id = version_id(repo, &v.record.digest);
    let mut out = json!({
        "id": id,
        "name": v.record.digest.to_string(),
        "url": format!("{pkg_url}/versions/{id}"),
        "package_html_url": pkg_html,
        "html_url": format!("{versions_html}/{id}"),
        "created_at": time(v.record.pushed_at_ms),
        "updated_at": time(v.record.pushed_at_ms),
        "metadata": {"package_type": "container", "container": {"tags": v.tags}},
        "download_count": v.downloads,
    });
    if let Some(ms) = v.deleted_ms {
        out["deleted_at"] = json!(time(ms));
    }
    out
}
