//! The errors a registry client sees: OCI error codes, their HTTP statuses and JSON body.
//!
//! Every failure that reaches a client becomes exactly one [`RegistryError`]; the frontend
//! turns it into a response in one place.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Error codes of the OCI Distribution Specification, plus `UNKNOWN` for server faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content.
    DigestInvalid,
    /// Manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported.
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// A fault on the server's side.
    Unknown,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BlobUnknown,
        ErrorCode::BlobUploadInvalid,
        ErrorCode::BlobUploadUnknown,
        ErrorCode::DigestInvalid,
        ErrorCode::ManifestBlobUnknown,
        ErrorCode::ManifestInvalid,
        ErrorCode::ManifestUnknown,
        ErrorCode::NameInvalid,
        ErrorCode::NameUnknown,
        ErrorCode::SizeInvalid,
        ErrorCode::Unauthorized,
        ErrorCode::Denied,
        ErrorCode::Unsupported,
        ErrorCode::TooManyRequests,
        ErrorCode::Unknown,
    ];

    /// The code spelled `name` (as [`ErrorCode::as_str`] spells it).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The code as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status the code usually travels with.
    pub fn default_status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => 404,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unknown => 500,
            _ => 400,
        }
    }

    /// The spec's human message for the code.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "blob unknown to registry",
            ErrorCode::BlobUploadInvalid => "blob upload invalid",
            ErrorCode::BlobUploadUnknown => "blob upload unknown to registry",
            ErrorCode::DigestInvalid => "provided digest did not match uploaded content",
            ErrorCode::ManifestBlobUnknown => "manifest references a manifest or blob unknown to registry",
            ErrorCode::ManifestInvalid => "manifest invalid",
            ErrorCode::ManifestUnknown => "manifest unknown to registry",
            ErrorCode::NameInvalid => "invalid repository name",
            ErrorCode::NameUnknown => "repository name not known to registry",
            ErrorCode::SizeInvalid => "provided length did not match content length",
            ErrorCode::Unauthorized => "authentication required",
            ErrorCode::Denied => "requested access to the resource is denied",
            ErrorCode::Unsupported => "the operation is unsupported",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::Unknown => "internal error",
        }
    }
}

/// One error as a client receives it: a code, an HTTP status, and a detail for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    /// The OCI error code.
    pub code: ErrorCode,
    /// HTTP status (the code's default unless a case of the spec says otherwise, e.g. 413, 416).
    pub status: u16,
    /// What exactly was wrong, for humans.
    pub detail: String,
    /// Set by a client of another role when its call never left this process (no connection
    /// could be made, or the peer refused the stream unprocessed): repeating it is safe. Never
    /// carried over the wire, so an error a peer relays is never taken for one.
    pub unsent: bool,
}

impl RegistryError {
    /// An error with the code's default status.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        RegistryError { code, status: code.default_status(), detail: detail.into(), unsent: false }
    }

    /// The same error, marked as a call that never reached its peer (see [`RegistryError::unsent`]).
    pub fn marked_unsent(mut self) -> Self {
        self.unsent = true;
        self
    }

    /// The same error with another HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// `413 SIZE_INVALID`: a blob, or an upload, would grow past the `limit` in bytes.
    pub fn too_big(limit: u64) -> Self {
        RegistryError::new(ErrorCode::SizeInvalid, format!("blob exceeds the limit of {limit} bytes")).with_status(413)
    }

    /// `BLOB_UPLOAD_UNKNOWN` for upload `id`: never started, or ended (finished, cancelled or
    /// expired).
    pub fn upload_unknown(id: &str) -> Self {
        RegistryError::new(ErrorCode::BlobUploadUnknown, format!("upload {id} is unknown or expired"))
    }

    /// `416 BLOB_UPLOAD_INVALID`: a chunk that starts at `offset` sent to an upload of `size`
    /// bytes (a chunk must start where the upload ends).
    pub fn chunk_out_of_order(offset: u64, size: u64) -> Self {
        RegistryError::new(
            ErrorCode::BlobUploadInvalid,
            format!("chunk starts at {offset} but the upload has {size} bytes"),
        )
        .with_status(416)
    }

    /// `BLOB_UPLOAD_INVALID`: the request's body failed while it was read.
    pub fn reading_body(e: impl fmt::Display) -> Self {
        RegistryError::new(ErrorCode::BlobUploadInvalid, format!("reading body: {e}"))
    }

    /// A server-side fault; the detail is logged, not trusted to be client-safe.
    pub fn internal(detail: impl fmt::Display) -> Self {
        RegistryError::new(ErrorCode::Unknown, detail.to_string())
    }

    /// The JSON error body of the distribution spec.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Item<'a> {
            code: &'a str,
            message: &'a str,
            detail: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Item<'a>; 1],
        }
        serde_json::to_string(&Body {
            errors: [Item { code: self.code.as_str(), message: self.code.message(), detail: &self.detail }],
        })
        .unwrap_or_else(|_| String::from("{\"errors\":[]}"))
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code.as_str(), self.status, self.detail)
    }
}

impl std::error::Error for RegistryError {}

/// Shorthand for results whose error reaches a client.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a code is added, so [`ErrorCode::ALL`] cannot silently miss it.
    fn listed(code: ErrorCode) -> bool {
        match code {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadInvalid
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameInvalid
            | ErrorCode::NameUnknown
            | ErrorCode::SizeInvalid
            | ErrorCode::Unauthorized
            | ErrorCode::Denied
            | ErrorCode::Unsupported
            | ErrorCode::TooManyRequests
            | ErrorCode::Unknown => ErrorCode::ALL.contains(&code),
        }
    }

    #[test]
    fn every_code_is_listed_and_read_back_from_its_name() {
        for code in ErrorCode::ALL {
            assert!(listed(code));
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_name("NOT_A_CODE"), None);
    }
}
