//! Which endpoint a `/v2/...` path names.
//!
//! Repository names contain slashes, so routes are found by their fixed tails
//! (`/manifests/<ref>`, `/blobs/<digest>`, ...) rather than by a router pattern.

use berth_core::name::valid_name;
use berth_core::{ErrorCode, RegistryError};

/// A parsed `/v2/` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags { name: String },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: String, reference: String },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: String, digest: String },
    /// `/v2/<name>/blobs/uploads/`.
    UploadStart { name: String },
    /// `/v2/<name>/blobs/uploads/<id>`.
    Upload { name: String, id: String },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers { name: String, digest: String },
}

fn checked(name: &str) -> Result<String, RegistryError> {
    if valid_name(name) {
        Ok(name.to_string())
    } else {
        Err(RegistryError::new(ErrorCode::NameInvalid, format!("invalid repository name {name:?}")))
    }
}

/// Which endpoint a `/v2/` path names, before its parts are checked: what metrics count
/// requests under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Base,
    Catalog,
    Tags,
    Manifest,
    Blob,
    UploadStart,
    Upload,
    Referrers,
}

impl Endpoint {
    /// The endpoint's name as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::Tags => "tags",
            Endpoint::Manifest => "manifest",
            Endpoint::Blob => "blob",
            Endpoint::UploadStart => "upload_start",
            Endpoint::Upload => "upload",
            Endpoint::Referrers => "referrers",
        }
    }
}

/// Splits a `/v2/` path into its endpoint, the repository name (unchecked; empty for the
/// base and the catalog) and the last segment (empty where the endpoint has none), without
/// copying anything.
pub fn split(path: &str) -> Option<(Endpoint, &str, &str)> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some((Endpoint::Base, "", ""));
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some((Endpoint::Catalog, "", ""));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some((Endpoint::Tags, name, ""));
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
        return Some((Endpoint::UploadStart, name, ""));
    }
    // A tail is `/<marker>/<last>` where `last` has no slash; try the markers in turn.
    let (head, last) = rest.rsplit_once('/')?;
    if last.is_empty() {
        return None;
    }
    [
        ("/blobs/uploads", Endpoint::Upload),
        ("/manifests", Endpoint::Manifest),
        ("/blobs", Endpoint::Blob),
        ("/referrers", Endpoint::Referrers),
    ]
    .into_iter()
    .find_map(|(marker, e)| head.strip_suffix(marker).map(|name| (e, name, last)))
}

/// Parses the path of a request under `/v2/`; `None` when it names no endpoint.
pub fn parse(path: &str) -> Option<Result<Route, RegistryError>> {
    let (endpoint, name, last) = split(path)?;
    let last = last.to_string();
    Some(match endpoint {
        Endpoint::Base => Ok(Route::Base),
        Endpoint::Catalog => Ok(Route::Catalog),
        Endpoint::Tags => checked(name).map(|name| Route::Tags { name }),
        Endpoint::UploadStart => checked(name).map(|name| Route::UploadStart { name }),
        Endpoint::Upload => checked(name).map(|name| Route::Upload { name, id: last }),
        Endpoint::Manifest => checked(name).map(|name| Route::Manifest { name, reference: last }),
        Endpoint::Blob => checked(name).map(|name| Route::Blob { name, digest: last }),
        Endpoint::Referrers => checked(name).map(|name| Route::Referrers { name, digest: last }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> Route {
        parse(p).unwrap().unwrap()
    }

    #[test]
    fn routes() {
        assert_eq!(ok("/v2/"), Route::Base);
        assert_eq!(ok("/v2"), Route::Base);
        assert_eq!(ok("/v2/_catalog"), Route::Catalog);
        assert_eq!(ok("/v2/a/b/tags/list"), Route::Tags { name: "a/b".into() });
        assert_eq!(
            ok("/v2/a/blobs/b/manifests/latest"),
            Route::Manifest { name: "a/blobs/b".into(), reference: "latest".into() }
        );
        assert_eq!(ok("/v2/a/b/blobs/sha256:x"), Route::Blob { name: "a/b".into(), digest: "sha256:x".into() });
        assert_eq!(ok("/v2/a/blobs/uploads/"), Route::UploadStart { name: "a".into() });
        assert_eq!(ok("/v2/a/blobs/uploads"), Route::UploadStart { name: "a".into() });
        assert_eq!(ok("/v2/a/blobs/uploads/123"), Route::Upload { name: "a".into(), id: "123".into() });
        assert_eq!(ok("/v2/a/referrers/sha256:x"), Route::Referrers { name: "a".into(), digest: "sha256:x".into() });
        assert_eq!(parse("/v2/a/b/c"), None);
        assert_eq!(parse("/v3/a/manifests/x"), None);
        assert_eq!(parse("/v2/UPPER/manifests/x").unwrap().unwrap_err().code, ErrorCode::NameInvalid);
    }
}
