//! A small OCI registry client: the requests the scenarios make, with Docker token auth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use reqwest::{header, RequestBuilder, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use crate::report::Recorder;

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Credentials for a registry.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// User name.
    pub username: Option<String>,
    /// Password or token.
    pub token: Option<String>,
}

/// A registry at one base URL, or a cluster's frontends at several. Requests go to them in
/// turn (any frontend serves any request, the chunks of one upload included), except through
/// a worker's view ([`Registry::for_worker`]), which keeps to one of them.
#[derive(Clone)]
pub struct Registry {
    /// `http://host:port`, or several separated by spaces (for reports).
    pub url: String,
    urls: Arc<Vec<String>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    http: reqwest::Client,
    creds: Credentials,
    /// Bearer tokens by scope.
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

/// Stands in the token table for "this registry wants Basic credentials on every request".
const BASIC: &str = "\0basic";

fn parse_challenge(v: &str) -> Option<HashMap<String, String>> {
    let rest = v.strip_prefix("Bearer ")?;
    let mut out = HashMap::new();
    let mut s = rest;
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let (val, tail) = after.split_once('"')?;
        out.insert(k.trim().trim_start_matches(',').trim().to_string(), val.to_string());
        s = tail.trim_start_matches(',').trim_start();
    }
    Some(out)
}

impl Registry {
    /// A client for `url`: one base URL, or several separated by commas (a cluster's frontends).
    /// HTTPS URLs are trusted by the system's roots, and by the PEM certificates in `ca`.
    pub fn new(url: &str, creds: Credentials, ca: Option<&std::path::Path>) -> Result<Registry> {
        let mut http =
            reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).pool_max_idle_per_host(256);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build()?;
        let urls: Vec<String> =
            url.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            bail!("no registry URL in {url:?}");
        }
        Ok(Registry {
            url: urls.join(" "),
            urls: Arc::new(urls),
            next: Default::default(),
            http,
            creds,
            tokens: Default::default(),
        })
    }

    /// This registry as worker `w` of a scenario sees it: all its requests go to one base URL,
    /// URL `w mod n` (a client's connections behind a load balancer that spreads connections,
    /// not requests). Tokens are shared with every other view.
    pub fn for_worker(&self, w: usize) -> Registry {
        Registry {
            urls: Arc::new(vec![self.urls[w % self.urls.len()].clone()]),
            next: Default::default(),
            ..self.clone()
        }
    }

    /// The base URL of the next request.
    fn base(&self) -> &str {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.urls[i % self.urls.len()]
    }

    /// Sends a request built by `build` (called again after authenticating), timing it as `kind`.
    ///
    /// Authenticates as docker does: the first request of a scope goes out anonymously; a 401
    /// with a Bearer challenge makes it fetch a registry token for the scope (with the
    /// credentials, if any) and use that token from then on. A Basic challenge makes it send
    /// the credentials with every request.
    pub async fn send(
        &self,
        rec: &Recorder,
        kind: &'static str,
        scope: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response> {
        let token = self.tokens.lock().map_err(|_| anyhow!("token lock"))?.get(scope).cloned();
        let start = Instant::now();
        let resp = self.authenticated(build(&self.http), token.as_deref()).send().await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            rec.record(kind, start.elapsed());
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("401 without a challenge"))?
            .to_string();
        let t = if challenge.starts_with("Basic") {
            BASIC.to_string()
        } else {
            let challenge = parse_challenge(&challenge).ok_or_else(|| anyhow!("unreadable challenge {challenge:?}"))?;
            self.fetch_token(&challenge, scope).await?
        };
        self.tokens.lock().map_err(|_| anyhow!("token lock"))?.insert(scope.to_string(), t.clone());
        let start = Instant::now();
        let resp = self.authenticated(build(&self.http), Some(&t)).send().await?;
        rec.record(kind, start.elapsed());
        Ok(resp)
    }

    /// `req` with the scope's token: a registry token as Bearer, or the credentials as Basic.
    fn authenticated(&self, req: RequestBuilder, token: Option<&str>) -> RequestBuilder {
        match token {
            Some(BASIC) => match (&self.creds.username, &self.creds.token) {
                (Some(u), Some(p)) => req.basic_auth(u, Some(p)),
                _ => req,
            },
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A registry token for `scope` from the challenge's realm. As docker does, it asks for
    /// the scope the operation needs (a push needs `pull,push`), not the one the challenge
    /// named (a HEAD before a push is challenged for `pull` only).
    async fn fetch_token(&self, ch: &HashMap<String, String>, scope: &str) -> Result<String> {
        let realm = ch.get("realm").ok_or_else(|| anyhow!("challenge without realm"))?;
        let mut req = self.http.get(realm);
        let mut q = vec![("scope", scope.to_string())];
        if let Some(v) = ch.get("service") {
            q.push(("service", v.clone()));
        }
        req = req.query(&q);
        if let (Some(u), Some(p)) = (&self.creds.username, &self.creds.token) {
            req = req.basic_auth(u, Some(p));
        }
        let v: serde_json::Value = req.send().await?.error_for_status()?.json().await?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("token response without a token"))
    }

    fn push_scope(repo: &str) -> String {
        format!("repository:{repo}:pull,push")
    }

    fn pull_scope(repo: &str) -> String {
        format!("repository:{repo}:pull")
    }

    /// Whether a blob exists (the HEAD docker makes before uploading).
    pub async fn blob_exists(&self, rec: &Recorder, repo: &str, d: &str) -> Result<bool> {
        let url = format!("{}/v2/{repo}/blobs/{d}", self.base());
        let r = self.send(rec, "blob HEAD", &Self::push_scope(repo), |c| c.head(&url)).await?;
        Ok(r.status() == StatusCode::OK)
    }

    async fn start_upload(&self, rec: &Recorder, repo: &str) -> Result<String> {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base());
        let r = self.send(rec, "upload POST", &Self::push_scope(repo), |c| c.post(&url)).await?;
        if r.status() != StatusCode::ACCEPTED {
            bail!("POST upload: {}", r.status());
        }
        let loc = r.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).context("no Location")?;
        Ok(self.absolute(loc))
    }

    fn absolute(&self, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else {
            format!("{}{loc}", self.base())
        }
    }

    fn with_digest(loc: &str, d: &str) -> String {
        let sep = if loc.contains('?') { '&' } else { '?' };
        format!("{loc}{sep}digest={d}")
    }

    /// Ends an upload at `loc` with `PUT ?digest=`, expecting `201 Created`.
    async fn finish_upload(&self, rec: &Recorder, repo: &str, loc: &str, d: &str) -> Result<()> {
        let put = Self::with_digest(loc, d);
        let r = self
            .send(rec, "upload PUT", &Self::push_scope(repo), |c| c.put(&put).header(header::CONTENT_LENGTH, 0))
            .await?;
        if r.status() != StatusCode::CREATED {
            bail!("PUT upload: {}", r.status());
        }
        Ok(())
    }

    /// Uploads a blob the way docker does: POST, one PATCH with the whole body, PUT ?digest=.
    pub async fn push_blob(&self, rec: &Recorder, repo: &str, d: &str, data: Bytes) -> Result<()> {
        let loc = self.start_upload(rec, repo).await?;
        let len = data.len();
        let r = self
            .send(rec, "upload PATCH", &Self::push_scope(repo), |c| {
                c.patch(&loc)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, len)
                    .body(data.clone())
            })
            .await?;
        if r.status() != StatusCode::ACCEPTED {
            bail!("PATCH: {}", r.status());
        }
        let loc =
            r.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(|l| self.absolute(l)).unwrap_or(loc);
        self.finish_upload(rec, repo, &loc, d).await
    }

    /// Uploads a large blob produced by `chunks` (called per attempt), either as one streamed
    /// PATCH or as PATCHes of `chunk` bytes with `Content-Range`.
    pub async fn push_stream(
        &self,
        rec: &Recorder,
        repo: &str,
        d: &str,
        total: u64,
        chunk: Option<u64>,
        source: &crate::scenarios::BlobSource,
    ) -> Result<()> {
        let mut loc = self.start_upload(rec, repo).await?;
        match chunk {
            None => {
                let r = self
                    .send(rec, "upload PATCH", &Self::push_scope(repo), |c| {
                        c.patch(&loc)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header(header::CONTENT_LENGTH, total)
                            .body(reqwest::Body::wrap_stream(source.stream(0, total)))
                    })
                    .await?;
                if r.status() != StatusCode::ACCEPTED {
                    bail!("PATCH: {}", r.status());
                }
                if let Some(l) = r.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()) {
                    loc = self.absolute(l);
                }
            }
            Some(size) => {
                let mut off = 0;
                while off < total {
                    let n = size.min(total - off);
                    let r = self
                        .send(rec, "upload PATCH", &Self::push_scope(repo), |c| {
                            c.patch(&loc)
                                .header(header::CONTENT_TYPE, "application/octet-stream")
                                .header(header::CONTENT_LENGTH, n)
                                .header(header::CONTENT_RANGE, format!("{off}-{}", off + n - 1))
                                .body(reqwest::Body::wrap_stream(source.stream(off, n)))
                        })
                        .await?;
                    if r.status() != StatusCode::ACCEPTED {
                        bail!("PATCH at {off}: {}", r.status());
                    }
                    if let Some(l) = r.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()) {
                        loc = self.absolute(l);
                    }
                    off += n;
                }
            }
        }
        self.finish_upload(rec, repo, &loc, d).await
    }

    /// Pushes a manifest by tag.
    pub async fn put_manifest(
        &self,
        rec: &Recorder,
        repo: &str,
        tag: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<()> {
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.base());
        let r = self
            .send(rec, "manifest PUT", &Self::push_scope(repo), |c| {
                c.put(&url).header(header::CONTENT_TYPE, media_type).body(body.clone())
            })
            .await?;
        if r.status() != StatusCode::CREATED {
            bail!("PUT manifest: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// Fetches a manifest by tag or digest; returns its bytes.
    pub async fn get_manifest(&self, rec: &Recorder, repo: &str, reference: &str, accept: &str) -> Result<Bytes> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base());
        let r = self
            .send(rec, "manifest GET", &Self::pull_scope(repo), |c| c.get(&url).header(header::ACCEPT, accept))
            .await?;
        if r.status() != StatusCode::OK {
            bail!("GET manifest: {}", r.status());
        }
        Ok(r.bytes().await?)
    }

    /// Fetches a blob, verifying its digest when `verify`; returns its size. Timed as a whole
    /// transfer.
    pub async fn get_blob(&self, rec: &Recorder, repo: &str, d: &str, verify: bool) -> Result<u64> {
        use futures::StreamExt;
        let url = format!("{}/v2/{repo}/blobs/{d}", self.base());
        let start = Instant::now();
        let r = self.send(rec, "blob GET (headers)", &Self::pull_scope(repo), |c| c.get(&url)).await?;
        if r.status() != StatusCode::OK {
            bail!("GET blob: {}", r.status());
        }
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut s = r.bytes_stream();
        while let Some(part) = s.next().await {
            let part = part?;
            n += part.len() as u64;
            if verify {
                h.update(&part);
            }
        }
        rec.record("blob GET (whole)", start.elapsed());
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if verify && got != d {
            bail!("blob {d} came back as {got}");
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge() {
        let c = parse_challenge(r#"Bearer realm="http://h/token",service="berth",scope="repository:a/b:pull,push""#)
            .unwrap();
        assert_eq!(c["realm"], "http://h/token");
        assert_eq!(c["service"], "berth");
        assert_eq!(c["scope"], "repository:a/b:pull,push");
        assert!(parse_challenge("Basic realm=\"x\"").is_none());
    }

    #[test]
    fn a_worker_keeps_to_one_url_and_the_workers_cover_them_all() {
        let creds = Credentials { username: None, token: None };
        let reg = Registry::new("http://a:1, http://b:2/", creds, None).unwrap();
        // Requests without a worker go to the URLs in turn.
        assert_eq!([reg.base(), reg.base(), reg.base()], ["http://a:1", "http://b:2", "http://a:1"]);
        for (w, url) in [(0, "http://a:1"), (1, "http://b:2"), (2, "http://a:1"), (7, "http://b:2")] {
            let view = reg.for_worker(w);
            assert!((0..3).all(|_| view.base() == url), "worker {w}");
        }
        // The views share the token table.
        reg.tokens.lock().unwrap().insert("scope".into(), "t".into());
        assert_eq!(reg.for_worker(1).tokens.lock().unwrap().get("scope").map(String::as_str), Some("t"));
    }
}
