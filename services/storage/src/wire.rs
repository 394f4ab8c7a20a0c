//! What the storage node's client and server agree on beyond `proto/storage.proto`: frame and
//! message bounds, digests in their string form, and registry errors carried in a gRPC status.
//!
//! The error encoding is the one `berth_meta::wire` uses (ABORTED, detail as message, code and
//! HTTP status as metadata), so every role reads every other role's errors the same way.

use berth_core::{Digest, ErrorCode, RegistryError, Stored};
use berth_proto::storage as pb;
use bytes::Bytes;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Status};

/// Largest data frame. Big enough that per-message overhead (framing, a poll, an allocation)
/// is small next to the bytes, small enough that a frame never stalls the HTTP/2 window for
/// long and memory per stream stays bounded; it is also the inline threshold, so a segment
/// blob always fits in one frame.
pub const FRAME_SIZE: usize = 256 * 1024;

/// Largest encoded message either side accepts: one full data frame plus room for the
/// protobuf tags and for the largest non-data message (a page of listed digests).
pub const MAX_MESSAGE: usize = FRAME_SIZE + 32 * 1024;

/// Digests in one list reply. A sha512 digest with its stamp takes under 150 bytes encoded,
/// so a full page stays well inside [`MAX_MESSAGE`].
pub const LIST_PAGE: usize = 1000;

/// Upload ids in one expiry message: ids are at most a few dozen bytes, so a batch stays
/// well inside [`MAX_MESSAGE`].
pub const EXPIRE_BATCH: usize = 1000;

/// Largest blob `put_small` accepts over the wire: the server holds it whole before storing
/// it, so it is bounded by the largest manifest the registry accepts.
pub const SMALL_LIMIT: u64 = berth_core::manifest::MAX_MANIFEST_SIZE as u64;

/// Metadata entry naming the OCI error code of a registry error (`BLOB_UNKNOWN`).
pub const ERROR_CODE: &str = "x-berth-error-code";

/// Metadata entry carrying the HTTP status of a registry error (`404`).
pub const ERROR_STATUS: &str = "x-berth-error-status";

/// Longest piece of a bad value quoted back in an error: enough to recognise it, never a
/// megabyte echoed into a log.
const QUOTE_LIMIT: usize = 80;

/// Every error code, for reading one back from its name.
const ERROR_CODES: [ErrorCode; 15] = [
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

/// The error code spelled `name` (as [`ErrorCode::as_str`] spells it).
fn error_code(name: &str) -> Option<ErrorCode> {
    ERROR_CODES.into_iter().find(|c| c.as_str() == name)
}

/// A registry error as a status: ABORTED, the detail as message, code and HTTP status as
/// metadata.
pub fn status_of(e: RegistryError) -> Status {
    let mut md = MetadataMap::new();
    // Every code is upper-case ASCII and underscores, a valid metadata value.
    md.insert(ERROR_CODE, AsciiMetadataValue::from_static(e.code.as_str()));
    md.insert(ERROR_STATUS, AsciiMetadataValue::from(e.status));
    Status::with_metadata(Code::Aborted, e.detail, md)
}

/// The registry error a status carries, if it is one [`status_of`] made.
pub fn registry_error_of(status: &Status) -> Option<RegistryError> {
    if status.code() != Code::Aborted {
        return None;
    }
    let md = status.metadata();
    let code = error_code(md.get(ERROR_CODE)?.to_str().ok()?)?;
    let http = md.get(ERROR_STATUS)?.to_str().ok()?.parse().ok()?;
    Some(RegistryError { code, status: http, detail: status.message().to_string() })
}

/// A digest received from the peer, or why it is not one.
pub fn parse_digest(s: &str) -> Result<Digest, String> {
    s.parse().map_err(|e| format!("bad digest {:?}: {e}", quote(s)))
}

/// The start of a bad value, for an error message.
fn quote(s: &str) -> String {
    s.chars().take(QUOTE_LIMIT).collect()
}

/// `data` cut into pieces of at most [`FRAME_SIZE`] bytes, without copying it.
pub fn frames(data: Bytes) -> impl Iterator<Item = Bytes> {
    let len = data.len();
    (0..len).step_by(FRAME_SIZE).map(move |at| data.slice(at..(at + FRAME_SIZE).min(len)))
}

/// A stored blob as its message.
pub fn stored_to_proto(s: Stored) -> pb::Stored {
    pb::Stored { size: s.size, stamp: s.stamp }
}

/// A stored blob from its message.
pub fn stored_from_proto(s: pb::Stored) -> Stored {
    Stored { size: s.size, stamp: s.stamp }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a code is added to [`ErrorCode`], so [`ERROR_CODES`] cannot
    /// silently miss one.
    fn _every_code_listed(c: ErrorCode) {
        match c {
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
            | ErrorCode::Unknown => {}
        }
    }

    #[test]
    fn every_error_round_trips() {
        for code in ERROR_CODES {
            for status in [code.default_status(), 413, 416, 503] {
                let e = RegistryError::new(code, "détail: ünicode and \"quotes\"").with_status(status);
                assert_eq!(registry_error_of(&status_of(e.clone())), Some(e));
            }
        }
        assert_eq!(registry_error_of(&Status::unavailable("down")), None);
    }

    #[test]
    fn frames_are_bounded_and_complete() {
        let data = Bytes::from((0..FRAME_SIZE * 2 + 5).map(|i| i as u8).collect::<Vec<_>>());
        let parts: Vec<Bytes> = frames(data.clone()).collect();
        assert_eq!(parts.iter().map(Bytes::len).collect::<Vec<_>>(), vec![FRAME_SIZE, FRAME_SIZE, 5]);
        assert_eq!(parts.concat(), data.to_vec());
        assert_eq!(frames(Bytes::new()).count(), 0);
    }
}
