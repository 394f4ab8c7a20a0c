//! Manifests, tags, the catalog and the referrers API.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use berth_core::manifest::{self, MAX_MANIFEST_SIZE, OCI_INDEX};
use berth_core::name::valid_tag;
use berth_core::store::{Pusher, MAX_PAGE};
use berth_core::{Digest, ErrorCode, ManifestRecord, RegistryError};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Serialize;

use crate::auth::Caller;
use crate::{
    body_stream, content_length, empty, header_value, json_response, parse_digest, query_param, query_params, Registry,
};

/// A manifest reference: a tag or a digest.
enum Reference {
    Tag(String),
    Digest(Digest),
}

fn parse_reference(r: &str) -> Result<Reference, RegistryError> {
    if r.contains(':') {
        return parse_digest(r).map(Reference::Digest);
    }
    if valid_tag(r) {
        Ok(Reference::Tag(r.to_string()))
    } else {
        Err(RegistryError::new(ErrorCode::ManifestInvalid, format!("invalid tag {r:?}")))
    }
}

fn manifest_unknown(name: &str, r: &str) -> RegistryError {
    RegistryError::new(ErrorCode::ManifestUnknown, format!("manifest {r} is not in {name}"))
}

/// The digest a reference points at in `name`, or `MANIFEST_UNKNOWN` / `NAME_UNKNOWN`.
async fn resolve(reg: &Registry, name: &str, reference: &str) -> Result<ManifestRecord, RegistryError> {
    let record = match parse_reference(reference)? {
        Reference::Digest(d) => reg.recall.manifest(name, &d, reg.meta.manifest(name, &d)).await?,
        Reference::Tag(t) => reg.meta.tagged_manifest(name, &t).await?,
    };
    match record {
        Some(r) => Ok(r),
        None => Err(unknown(reg, name, reference).await),
    }
}

async fn unknown(reg: &Registry, name: &str, reference: &str) -> RegistryError {
    match reg.meta.repo_exists(name).await {
        Ok(false) => RegistryError::new(ErrorCode::NameUnknown, format!("repository {name} is not known")),
        _ => manifest_unknown(name, reference),
    }
}

/// Whether a client's `Accept` header lets it receive `media_type`.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let t = manifest::bare_media_type(item);
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == media_type || t == "*/*" || t == "application/*" {
                return true;
            }
        }
    }
    !any
}

/// `GET`/`HEAD /v2/<name>/manifests/<reference>`.
pub async fn get(
    reg: &Registry,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, RegistryError> {
    let record = resolve(reg, name, reference).await?;
    if !accepts(headers, &record.media_type) {
        return Err(RegistryError::new(
            ErrorCode::ManifestUnknown,
            format!("manifest is a {} which the Accept header does not allow", record.media_type),
        ));
    }
    let d = record.digest.to_string();
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, header_value(&record.media_type)?)
        .header(header::CONTENT_LENGTH, record.size)
        .header("docker-content-digest", header_value(&d)?)
        .header(header::ETAG, header_value(&format!("\"{d}\""))?);
    if head {
        return resp.body(Body::empty()).map_err(RegistryError::internal);
    }
    let bytes = manifest_bytes(reg, &record.digest).await?;
    reg.pulls.count(name, &record.digest);
    resp.body(Body::from(bytes)).map_err(RegistryError::internal)
}

pub(crate) async fn manifest_bytes(reg: &Registry, digest: &Digest) -> Result<Bytes, RegistryError> {
    if let Some(b) = reg.manifests.get(digest) {
        return Ok(b);
    }
    let b =
        reg.blobs.read_small(digest, MAX_MANIFEST_SIZE as u64).await?.ok_or_else(|| {
            RegistryError::internal(format!("manifest {digest} is indexed but its bytes are missing"))
        })?;
    reg.manifests.insert(digest.clone(), b.clone());
    Ok(b)
}

/// Reads a manifest body, refusing more than [`MAX_MANIFEST_SIZE`] bytes as soon as it shows.
async fn read_manifest_body(req: Request, idle: std::time::Duration) -> Result<Bytes, RegistryError> {
    let too_big = || RegistryError::new(ErrorCode::ManifestInvalid, "manifest exceeds 4 MiB").with_status(413);
    if content_length(req.headers()).is_some_and(|n| n > MAX_MANIFEST_SIZE as u64) {
        return Err(too_big());
    }
    let mut body = body_stream(&req, idle);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| RegistryError::new(ErrorCode::ManifestInvalid, format!("reading body: {e}")))?;
        if buf.len() + chunk.len() > MAX_MANIFEST_SIZE {
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

use berth_core::now_ms;

/// `PUT /v2/<name>/manifests/<reference>[?tag=...]`.
pub async fn put(
    reg: &Registry,
    caller: &Caller,
    name: &str,
    reference: &str,
    req: Request,
) -> Result<Response, RegistryError> {
    let reference = parse_reference(reference)?;
    let mut tags = vec![];
    for t in query_params(req.uri(), "tag") {
        if !valid_tag(&t) {
            return Err(RegistryError::new(ErrorCode::ManifestInvalid, format!("invalid tag {t:?}")));
        }
        tags.push(t);
    }
    // The tags given as `?tag=` are echoed in `OCI-Tag`, which tells the client they were set.
    let tag_params = tags.clone();
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let uri = req.uri().clone();
    let body = read_manifest_body(req, reg.config.idle_body_timeout).await?;
    let digest = match &reference {
        Reference::Digest(d) => {
            if !d.matches(&body) {
                return Err(RegistryError::new(ErrorCode::DigestInvalid, format!("manifest does not hash to {d}")));
            }
            d.clone()
        }
        Reference::Tag(t) => {
            tags.insert(0, t.clone());
            digest_of_tagged(&uri, &body)?
        }
    };
    let parsed = manifest::parse(content_type.as_deref(), &body)?;
    let parsed_source = crate::admin::SourceHint {
        annotations: parsed
            .annotations
            .iter()
            .filter(|(k, _)| k.starts_with("org.opencontainers.image."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        config: parsed.config.clone(),
    };
    let record = ManifestRecord {
        digest: digest.clone(),
        media_type: parsed.media_type,
        size: body.len() as u64,
        subject: parsed.subject.clone(),
        artifact_type: parsed.artifact_type,
        annotations: parsed.annotations,
        blobs: parsed.blobs,
        manifests: parsed.manifests,
        pushed_at_ms: now_ms(),
    };
    // Bytes of a manifest the metadata service then refuses are collected as strays.
    let stored = reg.blobs.put_small(&digest, body.clone()).await?;
    reg.meta.put_manifest(name, record, tags, stored, Some(Pusher::of(&caller.identity))).await?;
    reg.manifests.insert(digest.clone(), body);
    crate::admin::describe_package(reg, name, &parsed_source).await;
    let mut headers = vec![
        ("location", reg.location(&format!("/v2/{name}/manifests/{digest}"))),
        ("docker-content-digest", digest.to_string()),
    ];
    if let Some(subject) = parsed.subject {
        headers.push(("oci-subject", subject.to_string()));
    }
    headers.extend(tag_params.into_iter().map(|t| ("oci-tag", t)));
    empty(StatusCode::CREATED, &headers)
}

/// The digest of a manifest pushed by tag: sha256, unless the client names the digest it
/// expects (`?digest=`, checked) or the algorithm to use (`?digest-algorithm=`, as for blobs).
fn digest_of_tagged(uri: &Uri, body: &[u8]) -> Result<Digest, RegistryError> {
    if let Some(d) = query_param(uri, "digest") {
        let d = parse_digest(&d)?;
        if !d.matches(body) {
            return Err(RegistryError::new(ErrorCode::DigestInvalid, format!("manifest does not hash to {d}")));
        }
        return Ok(d);
    }
    let algorithm = match query_param(uri, "digest-algorithm").as_deref() {
        None | Some("sha256") => berth_core::Algorithm::Sha256,
        Some("sha512") => berth_core::Algorithm::Sha512,
        Some(other) => {
            return Err(RegistryError::new(
                ErrorCode::DigestInvalid,
                format!("digest algorithm {other:?} is not supported"),
            ))
        }
    };
    let mut h = algorithm.hasher();
    h.update(body);
    Ok(h.finish())
}

/// `DELETE /v2/<name>/manifests/<reference>`: a digest deletes the manifest and its tags, a
/// tag deletes only the tag.
pub async fn delete(reg: &Registry, name: &str, reference: &str) -> Result<Response, RegistryError> {
    let existed = match parse_reference(reference)? {
        Reference::Digest(d) => {
            reg.recall.forget(name, &d);
            reg.meta.delete_manifest(name, &d).await?
        }
        Reference::Tag(t) => reg.meta.delete_tag(name, &t).await?,
    };
    if !existed {
        return Err(unknown(reg, name, reference).await);
    }
    empty(StatusCode::ACCEPTED, &[])
}

/// `n` and `last` of a listing; `n` above [`MAX_PAGE`] is trimmed to it.
fn page(uri: &Uri) -> Result<(usize, Option<String>, bool), RegistryError> {
    let n = match query_param(uri, "n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            RegistryError::new(ErrorCode::Unsupported, format!("n={n:?} is not a number")).with_status(400)
        })?),
        None => None,
    };
    Ok((n.unwrap_or(MAX_PAGE).min(MAX_PAGE), query_param(uri, "last"), n.is_some()))
}

/// A `Link` to the next page, when there is one.
fn next_link(path: &str, items: &[String], n: usize, more: bool) -> Option<String> {
    let last = items.last()?;
    if !more {
        return None;
    }
    let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
    Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""))
}

fn listing(body: String, link: Option<String>) -> Result<Response, RegistryError> {
    let mut resp = json_response(StatusCode::OK, body);
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, header_value(&l)?);
    }
    Ok(resp)
}

/// `GET /v2/<name>/tags/list[?n=&last=]`.
pub async fn tags(reg: &Registry, name: &str, uri: &Uri) -> Result<Response, RegistryError> {
    let (n, last, _) = page(uri)?;
    let mut tags = reg
        .meta
        .tags(name, last.as_deref(), n + 1)
        .await?
        .ok_or_else(|| RegistryError::new(ErrorCode::NameUnknown, format!("repository {name} is not known")))?;
    let more = tags.len() > n;
    tags.truncate(n);
    #[derive(Serialize)]
    struct TagList<'a> {
        name: &'a str,
        tags: &'a [String],
    }
    let body = serde_json::to_string(&TagList { name, tags: &tags }).map_err(RegistryError::internal)?;
    listing(body, next_link(&format!("/v2/{name}/tags/list"), &tags, n, more))
}

/// Repositories a catalog request examines at most for a caller whose access is checked per
/// repository: the request's work stays bounded however many private repositories there are.
/// A page that runs out of this budget ends early and links to the rest.
pub const CATALOG_SCAN: usize = 10_000;

/// `GET /v2/_catalog[?n=&last=]`: the repositories the caller may pull from.
pub async fn catalog(reg: &Registry, caller: &crate::auth::Caller, uri: &Uri) -> Result<Response, RegistryError> {
    use berth_core::access::{Action, Identity};
    let (n, last, _) = page(uri)?;
    let (repos, more, resume) = match &caller.identity {
        // Anonymous callers see public packages only, listed from their own index.
        Identity::Anonymous => {
            let mut repos = reg.meta.public_repositories(last.as_deref(), n + 1).await?;
            let more = repos.len() > n;
            repos.truncate(n);
            (repos, more, None)
        }
        // Site administrators may pull from everything.
        Identity::User { site_admin: true, .. } => {
            let mut repos = reg.meta.repositories(last.as_deref(), n + 1).await?;
            let more = repos.len() > n;
            repos.truncate(n);
            (repos, more, None)
        }
        // The catalog is judged per repository from the caller's identity, whatever the token says.
        _ => {
            let who =
                crate::auth::Caller { identity: caller.identity.clone(), claims: None, presented: caller.presented };
            let mut repos = vec![];
            let mut cursor = last;
            let mut examined = 0;
            let mut more = false;
            'pages: while examined < CATALOG_SCAN {
                let batch = reg.meta.repositories(cursor.as_deref(), MAX_PAGE.min(CATALOG_SCAN - examined)).await?;
                let exhausted = batch.is_empty();
                for repo in batch {
                    if !crate::auth::actions(reg, &who, &repo).await?.contains(&Action::Pull) {
                        cursor = Some(repo);
                        examined += 1;
                        continue;
                    }
                    if repos.len() == n {
                        more = true;
                        break 'pages;
                    }
                    cursor = Some(repo.clone());
                    examined += 1;
                    repos.push(repo);
                }
                if exhausted {
                    break;
                }
            }
            // Out of budget before the page filled: the next page starts where this one stopped.
            let resume = (!more && examined >= CATALOG_SCAN).then_some(cursor).flatten();
            (repos, more, resume)
        }
    };
    #[derive(Serialize)]
    struct Catalog<'a> {
        repositories: &'a [String],
    }
    let body = serde_json::to_string(&Catalog { repositories: &repos }).map_err(RegistryError::internal)?;
    let link = match resume {
        Some(cursor) => {
            let cursor: String = form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
            Some(format!("</v2/_catalog?n={n}&last={cursor}>; rel=\"next\""))
        }
        None => next_link("/v2/_catalog", &repos, n, more),
    };
    listing(body, link)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferrerDescriptor<'a> {
    media_type: &'a str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<&'a str>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    annotations: &'a std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferrersIndex<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<ReferrerDescriptor<'a>>,
}

/// Referrers listed per page at most: a subject with thousands of signatures or attestations
/// still answers in bounded memory and time; the rest follow through `Link`.
pub const REFERRERS_PAGE: usize = 1000;

/// `GET /v2/<name>/referrers/<digest>[?artifactType=][&n=&last=]`: an image index of the
/// manifests whose `subject` is `digest` (empty, never 404, when there are none), a page at a
/// time.
pub async fn referrers(reg: &Registry, name: &str, digest: &str, uri: &Uri) -> Result<Response, RegistryError> {
    let subject = parse_digest(digest)?;
    let filter = query_param(uri, "artifactType");
    let n = match query_param(uri, "n") {
        Some(n) => n.parse::<usize>().map_err(|_| {
            RegistryError::new(ErrorCode::Unsupported, format!("n={n:?} is not a number")).with_status(400)
        })?,
        None => REFERRERS_PAGE,
    }
    .clamp(1, REFERRERS_PAGE);
    let after = query_param(uri, "last").map(|l| parse_digest(&l)).transpose()?;
    let mut records = reg.meta.referrers(name, &subject, after.as_ref(), n + 1).await?;
    let more = records.len() > n;
    records.truncate(n);
    let manifests = records
        .iter()
        .filter(|r| filter.as_deref().is_none_or(|f| r.artifact_type.as_deref() == Some(f)))
        .map(|r| ReferrerDescriptor {
            media_type: &r.media_type,
            digest: r.digest.to_string(),
            size: r.size,
            artifact_type: r.artifact_type.as_deref(),
            annotations: &r.annotations,
        })
        .collect();
    let body = serde_json::to_string(&ReferrersIndex { schema_version: 2, media_type: OCI_INDEX, manifests })
        .map_err(RegistryError::internal)?;
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut().insert(header::CONTENT_TYPE, header_value(OCI_INDEX)?);
    if filter.is_some() {
        resp.headers_mut().insert("oci-filters-applied", header_value("artifactType")?);
    }
    if let (true, Some(last)) = (more, records.last()) {
        let mut next = format!("/v2/{name}/referrers/{subject}?n={n}&last={}", last.digest);
        if let Some(f) = &filter {
            next.push_str("&artifactType=");
            next.extend(form_urlencoded::byte_serialize(f.as_bytes()));
        }
        resp.headers_mut().insert(header::LINK, header_value(&format!("<{next}>; rel=\"next\""))?);
    }
    Ok(resp)
}
