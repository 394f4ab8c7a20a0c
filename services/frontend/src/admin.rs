//! The admin and packages REST API (`/api/...`), and package bookkeeping done on push.
//!
//! | method and path | who |
//! |---|---|
//! | `GET/POST /api/admin/users`, `DELETE /api/admin/users/{user}` | site admins |
//! | `GET/POST /api/admin/users/{user}/tokens` | site admins, the user |
//! | `DELETE /api/admin/tokens/{id}` | site admins, the token's user |
//! | `POST /api/admin/orgs` | site admins |
//! | `PUT/DELETE /api/admin/orgs/{org}/members/{user}` | site admins, org owners |
//! | `POST /api/admin/orgs/{org}/teams`, `PUT/DELETE .../teams/{team}/members/{user}` | site admins, org owners |
//! | `PUT /api/admin/orgs/{org}/repos/{repo}` (a source repository) | site admins, org owners |
//! | `POST /api/admin/orgs/{org}/repos/{repo}/ci-tokens` | site admins, org owners, admins of the repo |
//! | `GET/PATCH /api/packages/{name}` | readers / package admins |
//! | `POST /api/admin/keys/rotate`, `GET /api/admin/keys` | site admins |
//! | `POST /api/admin/gc` (collect garbage now), `GET /api/admin/gc` (what it would free) | site admins |
//! | `GET /api/v3/...`: GitHub's packages REST API ([`crate::packages_api`]) | readers |
//!
//! Callers authenticate with a personal access token (Basic, or `Authorization: Bearer`).

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use berth_core::access::{
    permission, About, Identity, OrgRole, Perm, Principal, Scope, SourceRepo, Visibility, MAX_DESCRIPTION, MAX_LICENSE,
};
use berth_core::store::{parse_grants, DirectoryChange, TokenOwner, User};
use berth_core::{Digest, ErrorCode, RegistryError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, new_token, CI_TOKEN_TTL};
use crate::{error_response, json_response, Registry};

/// The annotation (or config label) that links a package to its source repository.
pub const SOURCE_KEY: &str = "org.opencontainers.image.source";
/// The annotation (or config label) of a package's description.
pub const DESCRIPTION_KEY: &str = "org.opencontainers.image.description";
/// The annotation (or config label) of a package's license expression.
pub const LICENSES_KEY: &str = "org.opencontainers.image.licenses";

/// What a pushed manifest says of its package: its (or its index's) annotations, and the
/// image config, whose labels say what the annotations do not.
pub struct SourceHint {
    /// The manifest's annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The image config, whose labels may carry them.
    pub config: Option<Digest>,
}

/// `s` cut to at most `max` characters.
fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Largest config read for its labels.
const MAX_CONFIG: u64 = 1024 * 1024;

use berth_core::now_ms;

/// Creates the package on its first push: private, administered by the user who pushed it
/// (as on GHCR, where the account that first publishes a package administers it), and linked
/// to the CI token's repository when a CI token creates it.
pub async fn ensure_package(reg: &Registry, who: &Identity, repo: &str) -> Result<(), RegistryError> {
    let facts = reg.meta.access_facts(who, repo).await?;
    // A deleted package's name is free: the push creates a new package in its place.
    if facts.package.as_ref().is_some_and(|p| p.deleted_ms.is_none()) {
        return Ok(());
    }
    let (source, creator) = match who {
        Identity::Ci { source } => (Some(source.clone()), None),
        Identity::User { name, .. } => (None, Some(name.clone())),
        Identity::Anonymous => (None, None),
    };
    let change = DirectoryChange::EnsurePackage { repo: repo.into(), source, creator, now_ms: now_ms() };
    reg.meta.change_directory(change).await?;
    Ok(())
}

/// Records the description, license and source URL a pushed manifest gives its package (the
/// manifest's annotations first, then the image config's labels; too long values cut), and
/// links the package to the source repository registered under that URL. Best effort: a
/// failure leaves the package as it was, never the push failed.
pub async fn describe_package(reg: &Registry, repo: &str, hint: &SourceHint) {
    let keys = [DESCRIPTION_KEY, LICENSES_KEY, SOURCE_KEY];
    let mut found = keys.map(|k| hint.annotations.get(k).cloned());
    if found.iter().any(Option::is_none) {
        if let Some(config) = &hint.config {
            // Most often uploaded through this frontend a moment ago (see `blobs::KEEP_SMALL`).
            let bytes = match reg.small_blobs.get(config) {
                Some(b) => Some(b),
                None => reg.blobs.read_small(config, MAX_CONFIG).await.ok().flatten(),
            };
            if let Some(bytes) = bytes {
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                    for (slot, k) in found.iter_mut().zip(keys) {
                        if slot.is_none() {
                            *slot = v["config"]["Labels"][k].as_str().map(str::to_string);
                        }
                    }
                }
            }
        }
    }
    let [description, license, source_url] = found;
    let about = About {
        description: description.map(|d| cut(&d, MAX_DESCRIPTION)),
        license: license.map(|l| cut(&l, MAX_LICENSE)),
        source_url,
    };
    if about == About::default() {
        return;
    }
    if let Err(e) = reg.meta.change_directory(DirectoryChange::DescribePackage { repo: repo.into(), about }).await {
        tracing::warn!(repo, error = %e, "recording a package's description");
    }
}

fn bad_request(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported, detail).with_status(400)
}

fn not_found() -> RegistryError {
    RegistryError::new(ErrorCode::NameUnknown, "not found").with_status(404)
}

fn denied() -> RegistryError {
    RegistryError::new(ErrorCode::Denied, "requested access to the resource is denied")
}

fn conflict(what: &str) -> RegistryError {
    RegistryError::new(ErrorCode::Denied, format!("{what} already exists or conflicts")).with_status(409)
}

fn ok_json(status: StatusCode, v: Value) -> Result<Response, RegistryError> {
    Ok(json_response(status, v.to_string()))
}

fn no_content() -> Result<Response, RegistryError> {
    Ok(json_response(StatusCode::NO_CONTENT, String::new()))
}

async fn body_json<T: for<'de> Deserialize<'de>>(req: Request) -> Result<T, RegistryError> {
    let bytes = axum::body::to_bytes(req.into_body(), 1024 * 1024).await.map_err(|_| bad_request("body too large"))?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

fn is_site_admin(who: &Identity) -> bool {
    matches!(who, Identity::User { site_admin: true, .. })
}

fn user_name(who: &Identity) -> Option<&str> {
    match who {
        Identity::User { name, .. } => Some(name),
        _ => None,
    }
}

async fn require_org_admin(reg: &Registry, who: &Identity, org: &str) -> Result<(), RegistryError> {
    let members = reg.meta.org_members(org).await?.ok_or_else(not_found)?;
    let owner = user_name(who).is_some_and(|u| members.get(u) == Some(&OrgRole::Owner));
    if is_site_admin(who) || owner {
        Ok(())
    } else {
        Err(denied())
    }
}

fn check_name(kind: &str, name: &str) -> Result<(), RegistryError> {
    // Account names are repository name components: they become namespaces.
    if berth_core::name::valid_name(name) && !name.contains('/') {
        Ok(())
    } else {
        Err(bad_request(format!("invalid {kind} name {name:?}")))
    }
}

/// Serves `/api/...`.
pub async fn handle(reg: &Registry, req: Request) -> Response {
    let caller = match auth::caller(reg, req.headers()).await {
        Ok(c) if c.presented && c.claims.is_none() => c,
        Ok(_) => {
            let mut r =
                error_response(RegistryError::new(ErrorCode::Unauthorized, "a personal access token is required"));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Basic realm=\"berth\""));
            return r;
        }
        Err(e) => return error_response(e),
    };
    route(reg, &caller.identity, req).await.unwrap_or_else(error_response)
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    #[serde(default)]
    site_admin: bool,
}

#[derive(Deserialize)]
struct NewToken {
    #[serde(default)]
    name: String,
    scopes: Vec<Scope>,
    expires_in_days: Option<u64>,
}

#[derive(Deserialize)]
struct NewOrg {
    name: String,
    owner: String,
}

#[derive(Deserialize)]
struct Member {
    role: OrgRole,
}

#[derive(Deserialize)]
struct NewTeam {
    name: String,
}

#[derive(Deserialize)]
struct SourceBody {
    url: String,
    #[serde(default)]
    grants: Vec<String>,
}

#[derive(Deserialize)]
struct PackagePatch {
    visibility: Option<Visibility>,
    inherit: Option<bool>,
    /// `PRINCIPAL=PERM` to grant, or `PRINCIPAL=none` to remove.
    grant: Option<String>,
}

/// The scope a call of the API needs: reading needs `read:packages`, any change
/// `write:packages` (site administrators included: a token does no more than its scopes).
fn needed_scope(method: &Method) -> Scope {
    match *method {
        Method::GET | Method::HEAD => Scope::ReadPackages,
        _ => Scope::WritePackages,
    }
}

fn lacks_scope(scope: Scope) -> RegistryError {
    let name = serde_json::to_value(scope).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    RegistryError::new(ErrorCode::Denied, format!("this token lacks the {name} scope"))
}

async fn route(reg: &Registry, who: &Identity, req: Request) -> Result<Response, RegistryError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    if let ["v3", rest @ ..] = parts.as_slice() {
        // GitHub's API answers its own way, refusals included.
        return Ok(crate::packages_api::handle(reg, who, &method, req.uri(), req.headers(), rest).await);
    }
    let scope = needed_scope(&method);
    if !who.has_scope(scope) {
        return Err(lacks_scope(scope));
    }
    let meta = &reg.meta;
    match (method, parts.as_slice()) {
        (Method::POST, ["admin", "keys", "rotate"]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            let kid = reg.auth.keys.rotate_everywhere().await?;
            ok_json(StatusCode::OK, json!({"kid": kid}))
        }
        (m @ (Method::GET | Method::POST), ["admin", "gc"]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            ok_json(StatusCode::OK, json!(meta.collect_garbage(m == Method::GET).await?))
        }
        (Method::GET, ["admin", "keys"]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            ok_json(StatusCode::OK, json!(meta.signing_keys().await?))
        }
        (Method::GET, ["admin", "users"]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            ok_json(StatusCode::OK, json!(meta.users().await?))
        }
        (Method::POST, ["admin", "users"]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            let u: NewUser = body_json(req).await?;
            check_name("user", &u.name)?;
            let user = User { name: u.name.clone(), site_admin: u.site_admin, created_ms: now_ms() };
            if !meta.change_directory(DirectoryChange::CreateUser(user.clone())).await? {
                return Err(conflict(&u.name));
            }
            ok_json(StatusCode::CREATED, json!(user))
        }
        (Method::DELETE, ["admin", "users", name]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            if !meta.change_directory(DirectoryChange::DeleteUser(name.to_string())).await? {
                return Err(not_found());
            }
            no_content()
        }
        (method, ["admin", "users", name, "tokens"]) => {
            if !is_site_admin(who) && user_name(who) != Some(*name) {
                return Err(denied());
            }
            if meta.user(name).await?.is_none() {
                return Err(not_found());
            }
            if method == Method::GET {
                let list: Vec<Value> = meta
                    .tokens_of(name)
                    .await?
                    .into_iter()
                    .map(|t| {
                        json!({"id": t.id, "name": t.name, "scopes": t.scopes, "created_ms": t.created_ms,
                               "expires_ms": t.expires_ms, "last_used_ms": t.last_used_ms})
                    })
                    .collect();
                return ok_json(StatusCode::OK, json!(list));
            }
            if method != Method::POST {
                return Err(bad_request("use GET or POST"));
            }
            let t: NewToken = body_json(req).await?;
            if t.scopes.is_empty() {
                return Err(bad_request("a token needs at least one scope"));
            }
            // A token never makes a token that can do more than itself.
            if let Some(missing) = t.scopes.iter().find(|s| !who.has_scope(**s)) {
                return Err(lacks_scope(*missing));
            }
            let expires_ms = t.expires_in_days.map(|d| now_ms() + d * 86_400_000);
            let (token, record) = new_token("pat", TokenOwner::User(name.to_string()), &t.name, t.scopes, expires_ms);
            meta.change_directory(DirectoryChange::CreateToken(record.clone())).await?;
            ok_json(
                StatusCode::CREATED,
                json!({"id": record.id, "token": token, "scopes": record.scopes, "expires_ms": expires_ms}),
            )
        }
        (Method::DELETE, ["admin", "tokens", id]) => {
            let rec = meta.token(id).await?.ok_or_else(not_found)?;
            let own = matches!(&rec.owner, TokenOwner::User(u) if Some(u.as_str()) == user_name(who));
            if !is_site_admin(who) && !own {
                return Err(denied());
            }
            meta.change_directory(DirectoryChange::RevokeToken(id.to_string())).await?;
            no_content()
        }
        (Method::POST, ["admin", "orgs"]) => {
            if !is_site_admin(who) {
                return Err(denied());
            }
            let o: NewOrg = body_json(req).await?;
            check_name("organization", &o.name)?;
            if meta.user(&o.owner).await?.is_none() {
                return Err(bad_request(format!("no user {:?}", o.owner)));
            }
            if !meta.change_directory(DirectoryChange::CreateOrg { name: o.name.clone(), owner: o.owner }).await? {
                return Err(conflict(&o.name));
            }
            ok_json(StatusCode::CREATED, json!({"name": o.name}))
        }
        (method, ["admin", "orgs", org, "members", user]) => {
            require_org_admin(reg, who, org).await?;
            let role = match method {
                Method::PUT => Some(body_json::<Member>(req).await?.role),
                Method::DELETE => None,
                _ => return Err(bad_request("use PUT or DELETE")),
            };
            if meta.user(user).await?.is_none() {
                return Err(bad_request(format!("no user {user:?}")));
            }
            meta.change_directory(DirectoryChange::SetOrgMember { org: org.to_string(), user: user.to_string(), role })
                .await?;
            no_content()
        }
        (Method::POST, ["admin", "orgs", org, "teams"]) => {
            require_org_admin(reg, who, org).await?;
            let t: NewTeam = body_json(req).await?;
            check_name("team", &t.name)?;
            if !meta
                .change_directory(DirectoryChange::CreateTeam { org: org.to_string(), team: t.name.clone() })
                .await?
            {
                return Err(conflict(&t.name));
            }
            ok_json(StatusCode::CREATED, json!({"org": org, "name": t.name}))
        }
        (method, ["admin", "orgs", org, "teams", team, "members", user]) => {
            require_org_admin(reg, who, org).await?;
            let member = match method {
                Method::PUT => true,
                Method::DELETE => false,
                _ => return Err(bad_request("use PUT or DELETE")),
            };
            let change = DirectoryChange::SetTeamMember {
                org: org.to_string(),
                team: team.to_string(),
                user: user.to_string(),
                member,
            };
            if !meta.change_directory(change).await? {
                return Err(not_found());
            }
            no_content()
        }
        (Method::PUT, ["admin", "orgs", org, "repos", name]) => {
            require_org_admin(reg, who, org).await?;
            let b: SourceBody = body_json(req).await?;
            let grants = parse_grants(&b.grants).map_err(bad_request)?;
            let repo = SourceRepo { org: org.to_string(), name: name.to_string(), url: b.url, grants };
            meta.change_directory(DirectoryChange::PutSourceRepo(repo.clone())).await?;
            ok_json(StatusCode::OK, json!(repo))
        }
        (Method::POST, ["admin", "orgs", org, "repos", name, "ci-tokens"]) => {
            let source = meta.source_repo(org, name).await?.ok_or_else(not_found)?;
            let repo_admin = match who {
                Identity::User { name: u, .. } => source.grants.get(&Principal::User(u.clone())) == Some(&Perm::Admin),
                _ => false,
            };
            if !repo_admin {
                require_org_admin(reg, who, org).await?;
            }
            let expires = now_ms() + CI_TOKEN_TTL.as_millis() as u64;
            let (token, record) = new_token(
                "ci",
                TokenOwner::Ci(format!("{org}/{name}")),
                "ci",
                vec![Scope::WritePackages],
                Some(expires),
            );
            meta.change_directory(DirectoryChange::CreateToken(record)).await?;
            ok_json(StatusCode::CREATED, json!({"token": token, "expires_in": CI_TOKEN_TTL.as_secs()}))
        }
        (method, ["packages", rest @ ..]) if !rest.is_empty() => {
            let repo = rest.join("/");
            let facts = meta.access_facts(who, &repo).await?;
            let perm = permission(who, &repo, &facts);
            let Some(package) = facts.package.clone().filter(|_| perm.is_some()) else {
                return Err(not_found());
            };
            match method {
                Method::GET => ok_json(StatusCode::OK, json!(package)),
                Method::PATCH => {
                    if perm != Some(Perm::Admin) {
                        return Err(denied());
                    }
                    let p: PackagePatch = body_json(req).await?;
                    let grant = match p.grant {
                        Some(g) => {
                            let (who, perm) =
                                g.rsplit_once('=').ok_or_else(|| bad_request("grant is PRINCIPAL=PERM"))?;
                            let who: Principal = who.parse().map_err(bad_request)?;
                            let perm =
                                if perm == "none" { None } else { Some(perm.parse::<Perm>().map_err(bad_request)?) };
                            Some((who, perm))
                        }
                        None => None,
                    };
                    let change = DirectoryChange::UpdatePackage {
                        repo: repo.clone(),
                        visibility: p.visibility,
                        grant,
                        inherit: p.inherit,
                    };
                    meta.change_directory(change).await?;
                    let after = meta.access_facts(&Identity::Anonymous, &repo).await?.package;
                    ok_json(StatusCode::OK, json!(after))
                }
                _ => Err(bad_request("use GET or PATCH")),
            }
        }
        _ => Err(not_found()),
    }
}
