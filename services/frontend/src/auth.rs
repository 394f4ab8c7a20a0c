//! Authentication and authorization: tokens, Docker token auth (JWT), and the access check of
//! every `/v2/` request.
//!
//! Personal access tokens and CI tokens are checked against the metadata service (only their
//! SHA-256 is stored: they are long random strings, so a slow password hash would add nothing
//! but latency). The token endpoint turns one into a short-lived JWT (EdDSA, signed with the
//! frontend's key and naming it by key id; see [`crate::keys`]) listing the granted actions per
//! repository; any frontend verifies it with the published public keys.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use berth_core::access::{allowed_actions, Action, Identity, Scope};
use berth_core::store::{DirectoryChange, TokenOwner, TokenRecord};
use berth_core::{ErrorCode, RegistryError};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{error_response, json_response, Registry};

/// How long a registry token lives by default. Short, because permission changes apply at the
/// next one.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// How long a CI token lives.
pub const CI_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The `iss` of Berth's tokens.
const ISSUER: &str = "berth";

/// Token-signing settings of a frontend.
#[derive(Clone)]
pub struct AuthConfig {
    /// Signing and verifying keys.
    pub keys: Arc<crate::keys::KeyRing>,
    /// The `service` of challenges and the `aud` of tokens.
    pub service: String,
    /// Lifetime of registry tokens.
    pub ttl: Duration,
    /// The registry's public base URL (`https://registry.example.com`), when clients reach it
    /// through a proxy; the token realm and `Location` headers use it. Without it the realm
    /// is the request's `Host`, under `https://` when the frontend serves HTTPS.
    pub external_url: Option<String>,
    /// Whether the frontend serves HTTPS itself.
    pub https: bool,
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

use berth_core::now_ms;

// ---- tokens ---------------------------------------------------------------------------------

/// A freshly made token: the string shown once, and what is stored.
pub fn new_token(
    kind: &str,
    owner: TokenOwner,
    name: &str,
    scopes: Vec<Scope>,
    expires_ms: Option<u64>,
) -> (String, TokenRecord) {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let id: String = (0..12).map(|_| format!("{:x}", rng.gen_range(0..16u8))).collect();
    let secret: String = (0..40).map(|_| format!("{:x}", rng.gen_range(0..16u8))).collect();
    let token = format!("berth_{kind}_{id}_{secret}");
    let record = record_for(&token, owner, name, scopes, expires_ms);
    (token, record)
}

/// The stored record of a given token string (used for bootstrap tokens chosen by operators).
pub fn record_for(
    token: &str,
    owner: TokenOwner,
    name: &str,
    scopes: Vec<Scope>,
    expires_ms: Option<u64>,
) -> TokenRecord {
    TokenRecord {
        id: token_id(token),
        owner,
        name: name.to_string(),
        scopes,
        sha256: hex::encode(Sha256::digest(token.as_bytes())),
        created_ms: now_ms(),
        expires_ms,
        last_used_ms: None,
    }
}

/// The id under which a token string is stored: embedded in Berth's own tokens, derived from
/// the hash for any other string.
pub fn token_id(token: &str) -> String {
    let mut parts = token.splitn(4, '_');
    if let (Some("berth"), Some("pat" | "ci"), Some(id), Some(_)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    {
        if !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return id.to_string();
        }
    }
    format!("b{}", &hex::encode(Sha256::digest(token.as_bytes()))[..16])
}

fn unauthorized(detail: &str) -> RegistryError {
    RegistryError::new(ErrorCode::Unauthorized, detail)
}

/// Checks a presented token; `UNAUTHORIZED` if unknown, wrong, expired, revoked or its user gone.
pub async fn authenticate(reg: &Registry, token: &str) -> Result<Identity, RegistryError> {
    use subtle::ConstantTimeEq;
    let bad = || unauthorized("invalid username or token");
    let Some(rec) = reg.meta.token(&token_id(token)).await? else { return Err(bad()) };
    let presented = hex::encode(Sha256::digest(token.as_bytes()));
    if !bool::from(presented.as_bytes().ct_eq(rec.sha256.as_bytes())) {
        return Err(bad());
    }
    let now = now_ms();
    if rec.expires_ms.is_some_and(|e| e <= now) {
        return Err(unauthorized("token expired"));
    }
    if rec.last_used_ms.is_none_or(|t| now.saturating_sub(t) > 60_000) {
        let meta = reg.meta.clone();
        let id = rec.id.clone();
        tokio::spawn(async move {
            let _ = meta.change_directory(DirectoryChange::TouchToken { id, now_ms: now }).await;
        });
    }
    match rec.owner {
        TokenOwner::User(name) => {
            let Some(user) = reg.meta.user(&name).await? else { return Err(bad()) };
            Ok(Identity::User { name, scopes: rec.scopes.into_iter().collect(), site_admin: user.site_admin })
        }
        TokenOwner::Ci(source) => Ok(Identity::Ci { source }),
    }
}

// ---- JWT ------------------------------------------------------------------------------------

/// One repository's granted actions in a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessEntry {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name (or `catalog`).
    pub name: String,
    /// Granted actions.
    pub actions: Vec<String>,
}

/// Claims of a registry token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    /// Granted actions.
    pub access: Vec<AccessEntry>,
    /// `user`, `ci` or `anonymous`.
    kind: String,
    #[serde(default)]
    scopes: Vec<Scope>,
    #[serde(default)]
    site_admin: bool,
}

impl Claims {
    fn identity(&self) -> Identity {
        match self.kind.as_str() {
            "user" => Identity::User {
                name: self.sub.clone(),
                scopes: self.scopes.iter().copied().collect(),
                site_admin: self.site_admin,
            },
            "ci" => Identity::Ci { source: self.sub.trim_start_matches("ci:").to_string() },
            _ => Identity::Anonymous,
        }
    }

    fn allows(&self, repo: &str, action: Action) -> bool {
        self.access
            .iter()
            .any(|a| a.kind == "repository" && a.name == repo && a.actions.iter().any(|x| x == action.as_str()))
    }
}

fn sign(cfg: &AuthConfig, who: &Identity, access: Vec<AccessEntry>) -> Result<String, RegistryError> {
    let t = now();
    let (kind, scopes, site_admin) = match who {
        Identity::Anonymous => ("anonymous", vec![], false),
        Identity::User { scopes, site_admin, .. } => ("user", scopes.iter().copied().collect(), *site_admin),
        Identity::Ci { .. } => ("ci", vec![], false),
    };
    let claims = Claims {
        iss: ISSUER.into(),
        sub: who.subject(),
        aud: cfg.service.clone(),
        exp: secs(t + cfg.ttl),
        nbf: secs(t).saturating_sub(5),
        iat: secs(t),
        jti: uuid::Uuid::new_v4().to_string(),
        access,
        kind: kind.into(),
        scopes,
        site_admin,
    };
    let (kid, key) = cfg.keys.signing()?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid);
    jsonwebtoken::encode(&header, &claims, &key).map_err(RegistryError::internal)
}

/// Verifies a registry token: EdDSA only, signed by a published key that has not retired, our
/// issuer and service, within its lifetime.
pub async fn verify(cfg: &AuthConfig, token: &str) -> Result<Claims, RegistryError> {
    let bad = || unauthorized("invalid or expired token");
    let header = jsonwebtoken::decode_header(token).map_err(|_| bad())?;
    if header.alg != Algorithm::EdDSA {
        return Err(bad());
    }
    let kid = header.kid.ok_or_else(bad)?;
    let key = cfg.keys.verifying(&kid).await?.ok_or_else(bad)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[cfg.service.as_str()]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    v.leeway = 0;
    jsonwebtoken::decode::<Claims>(token, &key, &v).map(|d| d.claims).map_err(|_| bad())
}

// ---- callers --------------------------------------------------------------------------------

/// Who sent a request, and how.
pub struct Caller {
    /// The identity.
    pub identity: Identity,
    /// With a registry token: exactly what it grants.
    pub claims: Option<Arc<Claims>>,
    /// Whether any credentials came with the request.
    pub presented: bool,
}

/// The `user:password` of a Basic header.
fn basic(v: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(v.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The token of a Basic header: the password, or the user name when the password is empty.
fn basic_token(v: &str) -> Option<String> {
    let (u, p) = basic(v)?;
    Some(if p.is_empty() { u } else { p })
}

/// Identifies the caller from `Authorization` (registry token, Basic, or none).
pub async fn caller(reg: &Registry, headers: &HeaderMap) -> Result<Caller, RegistryError> {
    let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(Caller { identity: Identity::Anonymous, claims: None, presented: false });
    };
    if let Some(t) = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")) {
        let t = t.trim();
        // A personal access token used as a bearer token (as in GitHub's API) is accepted too.
        if t.starts_with("berth_") {
            let identity = authenticate(reg, t).await?;
            return Ok(Caller { identity, claims: None, presented: true });
        }
        // Verified tokens are remembered until they expire: a client sends the same token with
        // every request, and a lookup is far cheaper than HMAC and JSON each time.
        let now = secs(now());
        if let Some(claims) = reg.verified.get(t).filter(|c| c.exp > now) {
            return Ok(Caller { identity: claims.identity(), claims: Some(claims), presented: true });
        }
        let claims = Arc::new(verify(&reg.auth, t).await?);
        reg.verified.insert(t.to_string(), claims.clone());
        return Ok(Caller { identity: claims.identity(), claims: Some(claims), presented: true });
    }
    if let Some(b) = auth.strip_prefix("Basic ").or_else(|| auth.strip_prefix("basic ")) {
        let token = basic_token(b).ok_or_else(|| unauthorized("malformed Basic credentials"))?;
        let identity = authenticate(reg, &token).await?;
        return Ok(Caller { identity, claims: None, presented: true });
    }
    Err(unauthorized("unsupported authorization scheme"))
}

/// Actions the caller may take on `repo`.
pub async fn actions(reg: &Registry, caller: &Caller, repo: &str) -> Result<BTreeSet<Action>, RegistryError> {
    if let Some(c) = &caller.claims {
        return Ok([Action::Pull, Action::Push, Action::Delete].into_iter().filter(|a| c.allows(repo, *a)).collect());
    }
    let facts = reg.meta.access_facts(&caller.identity, repo).await?;
    Ok(allowed_actions(&caller.identity, repo, &facts))
}

/// The challenge that sends a client to the token endpoint, asking for `scope` (one or more
/// scope strings separated by spaces).
pub fn challenge(reg: &Registry, headers: &HeaderMap, scope: Option<&str>, insufficient: bool) -> HeaderValue {
    let realm = format!("{}/token", crate::packages_api::base_url(reg, headers));
    let mut v = format!("Bearer realm=\"{realm}\",service=\"{}\"", reg.auth.service);
    if let Some(s) = scope {
        v.push_str(&format!(",scope=\"{s}\""));
    }
    if insufficient {
        v.push_str(",error=\"insufficient_scope\"");
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

/// The scope string a request for `action` on `repo` needs, as the Docker token protocol
/// names it: pushing needs pull too, deleting needs delete.
pub fn scope_for(repo: &str, action: Action) -> String {
    let actions = match action {
        Action::Pull => "pull",
        Action::Push => "pull,push",
        Action::Delete => "delete",
    };
    format!("repository:{repo}:{actions}")
}

/// `401` with a challenge for `scope`: the caller's token lacks it but a new token may carry it.
pub fn upgrade(reg: &Registry, headers: &HeaderMap, scope: &str, insufficient: bool) -> Response {
    let mut r = error_response(unauthorized("authentication required"));
    r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge(reg, headers, Some(scope), insufficient));
    r
}

/// The response to a request the caller may not make.
///
/// Anonymous callers and registry tokens that lack the action get `401` with a challenge
/// naming the scope the request needs (with `error="insufficient_scope"` for a token), as the
/// Docker token protocol has it, so that clients fetch a token for it. When the identity
/// behind the credentials could not get that scope anyway, the answer is `403 DENIED`, the
/// same whether the repository exists or not.
pub async fn refuse(reg: &Registry, caller: &Caller, headers: &HeaderMap, repo: &str, action: Action) -> Response {
    let scope = scope_for(repo, action);
    if !caller.presented {
        return upgrade(reg, headers, &scope, false);
    }
    if caller.claims.is_some() {
        let facts = reg.meta.access_facts(&caller.identity, repo).await;
        if facts.is_ok_and(|f| allowed_actions(&caller.identity, repo, &f).contains(&action)) {
            return upgrade(reg, headers, &scope, true);
        }
    }
    let mut r = error_response(RegistryError::new(ErrorCode::Denied, "requested access to the resource is denied"));
    if caller.claims.is_some() {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge(reg, headers, Some(&scope), true));
    }
    r
}

// ---- the token endpoint ---------------------------------------------------------------------

/// One `scope` entry a client asks for.
fn parse_scope(s: &str) -> Option<(String, String, Vec<String>)> {
    let (kind, rest) = s.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((kind.to_string(), name.to_string(), actions.split(',').map(str::to_string).collect()))
}

#[derive(Serialize)]
struct TokenResponse {
    token: String,
    access_token: String,
    expires_in: u64,
    issued_at: String,
}

/// `GET /token` (Basic or anonymous) and `POST /token` (OAuth2 password grant form).
pub async fn token_endpoint(reg: &Registry, req: Request) -> Response {
    match issue(reg, req).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = error_response(e);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"berth\""));
            r
        }
    }
}

async fn issue(reg: &Registry, req: Request) -> Result<Response, RegistryError> {
    let is_post = req.method() == axum::http::Method::POST;
    let headers = req.headers().clone();
    let mut params: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    if is_post {
        let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
            .await
            .map_err(|_| RegistryError::new(ErrorCode::Unsupported, "token request body too large").with_status(400))?;
        params.extend(form_urlencoded::parse(&body).into_owned());
    }
    let param = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    if let Some(service) = param("service") {
        if service != reg.auth.service {
            return Err(RegistryError::new(ErrorCode::Denied, format!("unknown service {service:?}")).with_status(400));
        }
    }
    let secret = match (param("password"), headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        (Some(p), _) if is_post => Some(p),
        (_, Some(a)) => match a.strip_prefix("Basic ").or_else(|| a.strip_prefix("basic ")) {
            Some(b) => Some(basic_token(b).ok_or_else(|| unauthorized("malformed Basic credentials"))?),
            None => return Err(unauthorized("the token endpoint takes Basic credentials")),
        },
        _ => None,
    };
    let identity = match secret {
        Some(s) => authenticate(reg, &s).await?,
        None => Identity::Anonymous,
    };
    let mut access = vec![];
    // OAuth2 form posts put several scopes space-separated in one parameter.
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let caller = Caller { identity: identity.clone(), claims: None, presented: true };
    for s in scopes {
        let Some((kind, name, wanted)) = parse_scope(&s) else { continue };
        let granted: Vec<String> = match kind.as_str() {
            "repository" if berth_core::name::valid_name(&name) => {
                let allowed = actions(reg, &caller, &name).await?;
                let want_all = wanted.iter().any(|w| w == "*");
                allowed
                    .iter()
                    .filter(|a| want_all || wanted.iter().any(|w| w == a.as_str()))
                    .map(|a| a.as_str().to_string())
                    .collect()
            }
            "registry" if name == "catalog" => vec!["*".into()],
            _ => vec![],
        };
        access.push(AccessEntry { kind, name, actions: granted });
    }
    let token = sign(&reg.auth, &identity, access)?;
    let body = serde_json::to_string(&TokenResponse {
        token: token.clone(),
        access_token: token,
        expires_in: reg.auth.ttl.as_secs(),
        issued_at: httpdate_rfc3339(now()),
    })
    .map_err(RegistryError::internal)?;
    Ok(json_response(StatusCode::OK, body))
}

/// RFC 3339 UTC time, as token responses carry it.
fn httpdate_rfc3339(t: SystemTime) -> String {
    let s = secs(t);
    let (days, rem) = (s / 86_400, s % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// An empty 200 for `GET /v2/` once the caller is known.
pub fn base_ok() -> Response {
    let mut r = Response::new(Body::from("{}"));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids() {
        assert_eq!(token_id("berth_pat_0123abcd_ffff"), "0123abcd");
        assert!(token_id("some-operator-secret").starts_with('b'));
        assert!(token_id("berth_pat_../../x_y").starts_with('b'));
    }

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope("repository:acme/app:pull,push"),
            Some(("repository".into(), "acme/app".into(), vec!["pull".into(), "push".into()]))
        );
        assert_eq!(parse_scope("registry:catalog:*").unwrap().1, "catalog");
        assert_eq!(parse_scope("nonsense"), None);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(httpdate_rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)), "2023-11-14T22:13:20Z");
    }
}
