//! Blob reads and deletes, and the upload protocol (monolithic, chunked, streamed, mount).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use berth_core::access::{allowed_actions, Action, Identity};
use berth_core::store::Pusher;
use berth_core::{Digest, ErrorCode, RegistryError, UploadSession};
use futures::TryStreamExt;

use crate::auth::{self, Caller};

use crate::{body_stream, content_length, empty, header_value, parse_digest, query_param, Registry};

fn blob_unknown(d: &Digest) -> RegistryError {
    RegistryError::new(ErrorCode::BlobUnknown, format!("blob {d} is not in this repository"))
}

/// A `Range: bytes=...` request against a blob of `size` bytes.
enum RangeRequest {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(headers: &HeaderMap, size: u64) -> RangeRequest {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeRequest::Whole;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        // Multiple ranges: serving the whole blob is allowed and every client copes.
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (false, _) => {
            let Ok(first) = a.parse::<u64>() else {
                return RangeRequest::Whole;
            };
            let last = if b.is_empty() { Ok(u64::MAX) } else { b.parse::<u64>() };
            let Ok(last) = last else {
                return RangeRequest::Whole;
            };
            if last < first {
                return RangeRequest::Whole;
            }
            (first, last)
        }
        (true, false) => {
            let Ok(n) = b.parse::<u64>() else {
                return RangeRequest::Whole;
            };
            if n == 0 {
                return RangeRequest::Unsatisfiable;
            }
            (size.saturating_sub(n), u64::MAX)
        }
        (true, true) => return RangeRequest::Whole,
    };
    if parsed.0 >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part(parsed.0, parsed.1.min(size - 1))
}

/// `GET`/`HEAD /v2/<name>/blobs/<digest>`.
pub async fn get(
    reg: &Registry,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, RegistryError> {
    let digest = parse_digest(digest)?;
    let Some(linked) = reg.recall.blob_link(name, &digest, reg.meta.blob_link(name, &digest)).await? else {
        return Err(blob_unknown(&digest));
    };
    // A GET learns whether the bytes are there from the read it opens below (before any
    // header is sent), so only a HEAD asks the storage first; the link records the size.
    let size = if head {
        let Some(stored) = reg.blobs.stat(&digest).await? else { return Err(blob_unknown(&digest)) };
        stored.size
    } else {
        linked
    };
    let d = digest.to_string();
    let resp = Response::builder()
        .header("docker-content-digest", header_value(&d)?)
        .header(header::ETAG, header_value(&format!("\"{d}\""))?)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CACHE_CONTROL, "max-age=31536000");
    let (resp, range) = match parse_range(headers, size) {
        RangeRequest::Whole => (resp.status(StatusCode::OK).header(header::CONTENT_LENGTH, size), None),
        RangeRequest::Part(first, last) => (
            resp.status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, last - first + 1)
                .header(header::CONTENT_RANGE, header_value(&format!("bytes {first}-{last}/{size}"))?),
            Some((first, last)),
        ),
        RangeRequest::Unsatisfiable => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, header_value(&format!("bytes */{size}"))?)
                .header(header::CONTENT_LENGTH, 0)
                .body(Body::empty())
                .map_err(RegistryError::internal);
        }
    };
    let body = if head || size == 0 {
        Body::empty()
    } else if let Some(bytes) = small_blob(reg, &digest, size).await {
        let sent = match range {
            Some((first, last)) => bytes.slice(first as usize..=last as usize),
            None => bytes,
        };
        metrics::counter!("berth_http_sent_bytes_total").increment(sent.len() as u64);
        Body::from(sent)
    } else {
        Body::from_stream(
            reg.blobs
                .read(&digest, range)
                .await?
                .inspect_ok(|chunk| metrics::counter!("berth_http_sent_bytes_total").increment(chunk.len() as u64)),
        )
    };
    resp.body(body).map_err(RegistryError::internal)
}

/// The bytes of blob `digest`, linked with `size` bytes, when that is at most [`KEEP_SMALL`]:
/// from this frontend's small-blob cache, else read whole from storage, checked against the
/// digest and kept there. Every pull of an image reads its config, and pulls of one image
/// come in bursts (a fleet of CI runners starting from one base image), so after the first
/// the config costs no call to a storage node. `None` for a larger blob, or when the read
/// fails or gives other bytes: the streamed read then answers, trying the blob's other owners.
async fn small_blob(reg: &Registry, digest: &Digest, size: u64) -> Option<bytes::Bytes> {
    if size > KEEP_SMALL {
        return None;
    }
    if let Some(kept) = reg.small_blobs.get(digest).filter(|b| b.len() as u64 == size) {
        return Some(kept);
    }
    let read = reg.blobs.read_small(digest, KEEP_SMALL).await.ok().flatten()?;
    if read.len() as u64 != size || !digest.matches(&read) {
        return None;
    }
    // Read into a buffer of its own size: kept as it is.
    reg.small_blobs.insert(digest.clone(), read.clone());
    Some(read)
}

/// `DELETE /v2/<name>/blobs/<digest>`: unlinks the blob; its bytes go once nothing links it.
/// A blob that a manifest of the repository references is refused (409): delete the manifest.
pub async fn delete(reg: &Registry, name: &str, digest: &str) -> Result<Response, RegistryError> {
    let digest = parse_digest(digest)?;
    reg.recall.forget(name, &digest);
    if !reg.meta.unlink_blob(name, &digest).await? {
        return Err(blob_unknown(&digest));
    }
    empty(StatusCode::ACCEPTED, &[("docker-content-digest", digest.to_string())])
}

fn created(reg: &Registry, name: &str, digest: &Digest) -> Result<Response, RegistryError> {
    empty(
        StatusCode::CREATED,
        &[
            ("location", reg.location(&format!("/v2/{name}/blobs/{digest}"))),
            ("docker-content-digest", digest.to_string()),
        ],
    )
}

fn upload_accepted(
    reg: &Registry,
    status: StatusCode,
    name: &str,
    id: &str,
    size: u64,
) -> Result<Response, RegistryError> {
    // `Range` is inclusive; an empty upload reports 0-0 as docker and distribution do.
    empty(
        status,
        &[
            ("location", reg.location(&format!("/v2/{name}/blobs/uploads/{id}"))),
            ("range", format!("0-{}", size.saturating_sub(1))),
            ("docker-upload-uuid", id.to_string()),
        ],
    )
}

use berth_core::now_ms;

/// `POST /v2/<name>/blobs/uploads/`: mount, monolithic upload, or a new session. Each creates
/// the repository's package when it has none: a session in the write that records it, the
/// others (rarer) with a write of their own before their link when the package is missing.
pub async fn start(reg: &Registry, caller: &Caller, name: &str, req: Request) -> Result<Response, RegistryError> {
    if let Some(mount) = query_param(req.uri(), "mount") {
        // A mount that cannot be honoured falls back to a new session, as the spec says; so
        // does one from a repository the caller may not pull from, which reveals nothing.
        if let Ok(digest) = mount.parse::<Digest>() {
            let readable = match query_param(req.uri(), "from") {
                Some(from) if berth_core::name::valid_name(&from) => {
                    if !auth::actions(reg, caller, &from).await?.contains(&Action::Pull) {
                        // A registry token for this repository alone: if a token may also
                        // name the source, say so, as docker asks for both scopes up front.
                        if caller.claims.is_some() {
                            let facts = reg.meta.access_facts(&caller.identity, &from).await?;
                            if allowed_actions(&caller.identity, &from, &facts).contains(&Action::Pull) {
                                let scope = format!(
                                    "{} {}",
                                    auth::scope_for(name, Action::Push),
                                    auth::scope_for(&from, Action::Pull)
                                );
                                return Ok(auth::upgrade(reg, req.headers(), &scope, true));
                            }
                        }
                        false
                    } else {
                        reg.meta.blob_link(&from, &digest).await?.is_some()
                    }
                }
                Some(_) => false,
                // Without `from` the blob may be anywhere: only site administrators, who may
                // read everything, mount that way.
                None => matches!(caller.identity, Identity::User { site_admin: true, .. }),
            };
            // The stored copy's stamp goes with the link, so a copy the collector took in the
            // meantime is refused and the client uploads instead.
            if readable {
                if let Some(stored) = reg.blobs.stat(&digest).await? {
                    crate::admin::ensure_package(reg, &caller.identity, name).await?;
                    if reg.meta.link_blob(name, &digest, stored).await.is_ok() {
                        return created(reg, name, &digest);
                    }
                }
            }
        }
    }
    if let Some(digest) = query_param(req.uri(), "digest") {
        let digest = parse_digest(&digest)?;
        if content_length(req.headers()).is_some_and(|n| n > reg.config.max_blob) {
            return Err(RegistryError::too_big(reg.config.max_blob));
        }
        crate::admin::ensure_package(reg, &caller.identity, name).await?;
        let body = body_stream(&req, reg.config.idle_body_timeout);
        // A small body is read whole (within the budget of chunks read whole) to be kept.
        let stored = match whole_budget(reg, content_length(req.headers()), KEEP_SMALL) {
            Some((n, _permit)) => {
                let data = read_whole(body, n).await?;
                let sent = data.clone();
                let body: berth_core::ByteStream = Box::pin(futures::stream::once(async move { Ok(sent) }));
                let stored = reg.blobs.put(&digest, body, reg.config.max_blob).await?;
                // The store checked these very bytes against the digest.
                reg.small_blobs.insert(digest.clone(), compact(&data));
                stored
            }
            None => reg.blobs.put(&digest, body, reg.config.max_blob).await?,
        };
        reg.meta.link_blob(name, &digest, stored).await?;
        return created(reg, name, &digest);
    }
    let owner = caller.identity.subject();
    // In a cluster the staging node usually opens the area at the upload's first call.
    let begun = reg.blobs.upload_begin(&uuid::Uuid::new_v4().to_string()).await?;
    let id = begun.id;
    let session =
        UploadSession { id: id.clone(), repo: name.to_string(), started_at_ms: now_ms(), owner, staging: begun.node };
    // The metadata service refuses a caller with too many uploads open (TOOMANYREQUESTS).
    let pusher = Some(Pusher::of(&caller.identity));
    if let Err(e) = reg.meta.create_upload(session.clone(), reg.config.max_uploads_per_caller, pusher).await {
        // An upload whose area opens at its first call has nothing to cancel.
        if berth_core::store::incarnation_of(&id).is_some() {
            return Err(e);
        }
        if let Err(c) = reg.blobs.upload_cancel(&id).await {
            tracing::warn!(upload = %id, error = %c, "dropping the staging area of an upload not recorded");
        }
        return Err(e);
    }
    reg.sessions.insert(id.clone(), Arc::new(session));
    upload_accepted(reg, StatusCode::ACCEPTED, name, &id, 0)
}

/// The session `id` of repository `name`, or `BLOB_UPLOAD_UNKNOWN`.
///
/// A session this frontend started is answered from memory: what a session records
/// (repository, owner, staging node) never changes while it lasts. Whether it still lasts is
/// the staging node's to say: a session ends (finished, cancelled or expired) only after or
/// together with its staged bytes (one whose area was to open at its first call is ended on
/// its node first, so that no later call opens it), and a finish whose session has ended
/// meanwhile is refused by the metadata service. Sessions started elsewhere are read from the
/// metadata service.
async fn session(reg: &Registry, name: &str, id: &str) -> Result<Arc<UploadSession>, RegistryError> {
    let s = match reg.sessions.get(id) {
        Some(s) => s,
        None => match reg.meta.upload(id).await? {
            Some(s) => Arc::new(s),
            None => return Err(RegistryError::upload_unknown(id)),
        },
    };
    if s.repo != name {
        return Err(RegistryError::upload_unknown(id));
    }
    if let Some(node) = &s.staging {
        reg.blobs.upload_staged_at(id, node);
    }
    Ok(s)
}

/// `Content-Range: <first>-<last>` of a chunk, checked against `Content-Length`.
fn chunk_range(headers: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || RegistryError::new(ErrorCode::BlobUploadInvalid, "malformed Content-Range").with_status(416);
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let first: u64 = a.trim().parse().map_err(|_| bad())?;
    let last: u64 = b.trim().parse().map_err(|_| bad())?;
    if last < first {
        return Err(bad());
    }
    if content_length(headers).is_some_and(|n| n != last - first + 1) {
        return Err(RegistryError::new(ErrorCode::BlobUploadInvalid, "Content-Range does not match Content-Length")
            .with_status(416));
    }
    Ok(Some(first))
}

/// Chunks of at most this many bytes (by `Content-Length`) are read into memory before they go
/// to the store, which saves asking the store for the upload's size first (a round trip to the
/// staging node in a cluster); a layer pushed in one `PATCH` is often this small. The same
/// bound as the store's for keeping an upload in memory (`berth_storage::staging`), though
/// nothing depends on the two being equal.
const READ_WHOLE: u64 = 256 << 10;

/// Bytes of chunks being read whole at once, at most; beyond, a chunk takes the streamed path
/// (its offset checked with the store first), so many clients sending at once hold no more
/// than this in memory on their account.
pub(crate) const WHOLE_CHUNK_BYTES: usize = 64 << 20;

/// A blob of at most this many bytes that reaches this frontend in one piece (an upload's
/// only chunk, or a monolithic `POST`) is kept here by its digest once stored;
/// an upload's chunk is held by the upload's id until the upload ends (or, for one abandoned,
/// until evicted). Image configs are this small: the config is read again when its manifest is
/// put (to describe the package), most often through the same frontend, and is then found here
/// instead of asked of a storage node. A blob this small that a `GET` reads from storage is
/// kept too (see `small_blob`), so pulls of it through this frontend read it once.
pub(crate) const KEEP_SMALL: u64 = 64 << 10;

/// `data` in a buffer of its own. A body chunk is a slice of its connection's read buffer
/// (8 KiB, or hundreds of KiB on a connection that carried layers), which a kept slice would
/// hold whole, however small the slice; a copy keeps the caches' weights true.
fn compact(data: &bytes::Bytes) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(data)
}

/// A body of `length` bytes, at most `most`, may be read whole into memory while the permit
/// lives: `None` when it is longer, of unknown length, or over what the chunks being read whole
/// already hold ([`WHOLE_CHUNK_BYTES`]).
fn whole_budget(reg: &Registry, length: Option<u64>, most: u64) -> Option<(u64, tokio::sync::OwnedSemaphorePermit)> {
    let n = length.filter(|n| *n <= most)?;
    let permit = reg.whole_chunks.clone().try_acquire_many_owned(u32::try_from(n).ok()?).ok()?;
    Some((n, permit))
}

/// The whole of a body of `length` bytes (as `Content-Length` promised; a body that delivers
/// fewer fails with an error).
async fn read_whole(mut body: berth_core::ByteStream, length: u64) -> Result<bytes::Bytes, RegistryError> {
    let Some(first) = body.try_next().await.map_err(RegistryError::reading_body)? else {
        return Ok(bytes::Bytes::new());
    };
    if first.len() as u64 >= length {
        return Ok(first);
    }
    let mut all = bytes::BytesMut::with_capacity(length as usize);
    all.extend_from_slice(&first);
    while let Some(chunk) = body.try_next().await.map_err(RegistryError::reading_body)? {
        all.extend_from_slice(&chunk);
    }
    Ok(all.freeze())
}

/// Appends the request body to the upload, unless it has none. Returns the upload's size.
async fn append(reg: &Registry, id: &str, req: Request) -> Result<Option<u64>, RegistryError> {
    let offset = chunk_range(req.headers())?;
    let length = content_length(req.headers());
    // Without a length and not chunked, an HTTP/1.1 request has no body (RFC 9112, 6.3).
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if length == Some(0) || (length.is_none() && !chunked) {
        return Ok(None);
    }
    // A short chunk is read whole first; the store then checks its offset and the size limit
    // itself, and whatever it answers, the body has been drained.
    if let Some((n, _permit)) = whole_budget(reg, length, READ_WHOLE) {
        let chunk = read_whole(body_stream(&req, reg.config.idle_body_timeout), n).await?;
        let kept = chunk.clone();
        let body: berth_core::ByteStream = Box::pin(futures::stream::once(async move { Ok(chunk) }));
        let size = reg.blobs.upload_append(id, offset, body, reg.config.max_blob).await?;
        if size == kept.len() as u64 && size <= KEEP_SMALL {
            reg.small_uploads.insert(id.to_string(), compact(&kept));
        } else {
            reg.small_uploads.remove(id);
        }
        return Ok(Some(size));
    }
    reg.small_uploads.remove(id);
    // Checked before the body is touched, so that a refused chunk is drained, not cut off (a
    // store refusing it part way could not drain it: the body is already its stream).
    if offset.is_some() || length.is_some() {
        let current = reg.blobs.upload_size(id).await?.ok_or_else(|| RegistryError::upload_unknown(id))?;
        if let Some(off) = offset.filter(|off| *off != current) {
            return Err(RegistryError::chunk_out_of_order(off, current));
        }
        if length.is_some_and(|n| current + n > reg.config.max_blob) {
            return Err(RegistryError::too_big(reg.config.max_blob));
        }
    }
    let size = reg
        .blobs
        .upload_append(id, offset, body_stream(&req, reg.config.idle_body_timeout), reg.config.max_blob)
        .await?;
    Ok(Some(size))
}

/// Ends a session whose staged bytes are gone, so that it stops being reported.
async fn forget(reg: &Registry, id: &str) {
    reg.sessions.remove(id);
    reg.small_uploads.remove(id);
    if let Err(e) = reg.meta.end_upload(id, None).await {
        // Housekeeping ends sessions whose staging area is gone; nothing is lost meanwhile.
        tracing::warn!(upload = %id, error = %e, "ending an upload whose bytes are gone");
    }
}

/// `PATCH /v2/<name>/blobs/uploads/<id>`: a chunk, or the whole blob streamed.
pub async fn patch(reg: &Registry, name: &str, id: &str, req: Request) -> Result<Response, RegistryError> {
    session(reg, name, id).await?;
    let size = match append(reg, id, req).await {
        Ok(Some(size)) => size,
        Ok(None) => reg.blobs.upload_size(id).await?.ok_or_else(|| RegistryError::upload_unknown(id))?,
        Err(e) => {
            if e.code == ErrorCode::BlobUploadUnknown {
                forget(reg, id).await;
            }
            return Err(e);
        }
    };
    upload_accepted(reg, StatusCode::ACCEPTED, name, id, size)
}

/// `PUT /v2/<name>/blobs/uploads/<id>?digest=`: the last chunk (optional), then verification.
pub async fn finish(reg: &Registry, name: &str, id: &str, req: Request) -> Result<Response, RegistryError> {
    session(reg, name, id).await?;
    let digest = query_param(req.uri(), "digest")
        .ok_or_else(|| RegistryError::new(ErrorCode::DigestInvalid, "the digest query parameter is required"))?;
    let digest = parse_digest(&digest)?;
    if let Err(e) = append(reg, id, req).await {
        if e.code == ErrorCode::BlobUploadUnknown {
            forget(reg, id).await;
        }
        return Err(e);
    }
    match reg.blobs.upload_finish(id, &digest).await {
        Ok(stored) => {
            reg.sessions.remove(id);
            // The store verified what it staged; the chunk kept is matched to that only by
            // its size, so it is checked against the digest here too (a few microseconds for
            // a config, some tens at the largest size kept).
            if let Some((_, kept)) = reg.small_uploads.remove(id) {
                if kept.len() as u64 == stored.size && digest.matches(&kept) {
                    reg.small_blobs.insert(digest.clone(), kept);
                }
            }
            match reg.meta.end_upload(id, Some((digest.clone(), stored))).await {
                // The session was ended meanwhile (housekeeping found its staging area gone
                // while the blob was being committed from it): the blob is verified and
                // stored, so it is linked all the same.
                Err(e) if e.code == ErrorCode::BlobUploadUnknown => reg.meta.link_blob(name, &digest, stored).await?,
                r => r?,
            }
            created(reg, name, &digest)
        }
        Err(e) => {
            // The staged bytes are gone (a mismatch discards them), so is the session.
            forget(reg, id).await;
            Err(e)
        }
    }
}

/// `GET /v2/<name>/blobs/uploads/<id>`: how much has been received.
pub async fn status(reg: &Registry, name: &str, id: &str) -> Result<Response, RegistryError> {
    session(reg, name, id).await?;
    match reg.blobs.upload_size(id).await? {
        Some(size) => upload_accepted(reg, StatusCode::NO_CONTENT, name, id, size),
        None => {
            forget(reg, id).await;
            Err(RegistryError::upload_unknown(id))
        }
    }
}

/// `DELETE /v2/<name>/blobs/uploads/<id>`: cancels the upload.
pub async fn cancel(reg: &Registry, name: &str, id: &str) -> Result<Response, RegistryError> {
    session(reg, name, id).await?;
    if let Err(e) = reg.blobs.upload_cancel(id).await {
        // The session ends anyway; expiry removes a staging file left behind.
        tracing::warn!(upload = %id, error = %e, "cancelling an upload's staging area");
    }
    reg.sessions.remove(id);
    reg.small_uploads.remove(id);
    reg.meta.end_upload(id, None).await?;
    empty(StatusCode::NO_CONTENT, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Option<(u64, u64)> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, v.parse().unwrap());
        match parse_range(&h, size) {
            RangeRequest::Part(a, b) => Some((a, b)),
            RangeRequest::Whole => None,
            RangeRequest::Unsatisfiable => Some((u64::MAX, u64::MAX)),
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(range("bytes=100-", 100), Some((u64::MAX, u64::MAX)));
        assert_eq!(range("bytes=9-1", 100), None);
        assert_eq!(range("bytes=0-1,5-6", 100), None);
        assert_eq!(range("items=0-1", 100), None);
    }
}
