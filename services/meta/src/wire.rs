//! Conversions between the registry's own types and the messages of `proto/meta.proto`, and
//! the one place where errors and NotLeader answers are put into a gRPC status and read back.
//!
//! Decoding never trusts the peer: a malformed digest, an unknown enum value or a missing
//! message field is a [`WireError`]. The server answers it as INVALID_ARGUMENT; the client
//! reports it as a 500, because a peer that sends it is broken, not the user's request.

mod access;
mod directory;
mod records;

use berth_core::digest::DigestError;
use berth_core::{Digest, RegistryError};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Status};

use crate::server::NotLeader;

pub use berth_proto::status::{registry_error_of, status_of};

/// Metadata entry with the leader's gRPC address in a NotLeader answer.
pub const LEADER: &str = "x-berth-leader";

/// The message of a NotLeader answer.
pub const NOT_LEADER: &str = "not the leader";

/// Largest message either side of the Meta service accepts: a batch of reads is answered
/// with up to 128 records, each as large as a manifest's annotations make it.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Longest piece of a bad value quoted back in an error: enough to recognise it, never a
/// megabyte echoed into a log.
const QUOTE_LIMIT: usize = 80;

/// A received message that the proto allows but the registry's types do not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A message field the value cannot do without was absent.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// A digest string did not parse.
    #[error("bad digest {value:?}: {reason}")]
    Digest {
        /// The start of the string received.
        value: String,
        /// Why it is not a digest.
        reason: DigestError,
    },
    /// An enum field held its zero value or a number the enum does not define.
    #[error("{value} is not a valid {what}")]
    Enum {
        /// The enum's name.
        what: &'static str,
        /// The number received.
        value: i32,
    },
    /// A grantee was neither `user:NAME` nor `team:ORG/TEAM`.
    #[error("bad grantee: {0}")]
    Principal(String),
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

impl From<WireError> for RegistryError {
    fn from(e: WireError) -> RegistryError {
        RegistryError::internal(format!("malformed answer from the metadata service: {e}"))
    }
}

/// A registry type and the proto message it travels as, in both directions.
///
/// A local trait rather than `From`/`TryFrom`: both sides are foreign to this crate, so the
/// orphan rule forbids implementing the standard traits between them here.
pub trait Wire: Sized {
    /// The generated type it travels as.
    type Proto;
    /// The message to send.
    fn to_proto(self) -> Self::Proto;
    /// The value a received message carries, or why it carries none.
    fn from_proto(proto: Self::Proto) -> Result<Self, WireError>;
}

/// A message field that must be present.
pub fn required<T>(field: Option<T>, name: &'static str) -> Result<T, WireError> {
    field.ok_or(WireError::Missing(name))
}

/// Every element decoded, or the first error.
pub fn from_all<T: Wire, C: FromIterator<T>>(protos: impl IntoIterator<Item = T::Proto>) -> Result<C, WireError> {
    protos.into_iter().map(T::from_proto).collect()
}

/// Every element encoded.
pub fn to_all<T: Wire>(values: impl IntoIterator<Item = T>) -> Vec<T::Proto> {
    values.into_iter().map(T::to_proto).collect()
}

/// An optional field decoded.
pub fn from_opt<T: Wire>(proto: Option<T::Proto>) -> Result<Option<T>, WireError> {
    proto.map(T::from_proto).transpose()
}

/// A count or page size from the wire. Limits saturate: a bound larger than this machine's
/// `usize` bounds nothing here either.
pub fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The start of a bad value, for an error message.
fn quote(s: &str) -> String {
    s.chars().take(QUOTE_LIMIT).collect()
}

impl Wire for Digest {
    type Proto = String;

    fn to_proto(self) -> String {
        self.to_string()
    }

    fn from_proto(s: String) -> Result<Digest, WireError> {
        s.parse().map_err(|reason| WireError::Digest { value: quote(&s), reason })
    }
}

// ---- errors and NotLeader in a status ----------------------------------------------------

/// A NotLeader answer: FAILED_PRECONDITION, with the leader's address when known.
pub fn not_leader_status(n: &NotLeader) -> Status {
    let mut md = MetadataMap::new();
    // An address that cannot be a metadata value is not one a client could dial either.
    if let Some(addr) = n.leader.as_deref().and_then(|a| AsciiMetadataValue::try_from(a).ok()) {
        md.insert(LEADER, addr);
    }
    Status::with_metadata(Code::FailedPrecondition, NOT_LEADER, md)
}

/// The NotLeader answer a status carries, if it is one.
pub fn not_leader_of(status: &Status) -> Option<NotLeader> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let leader = status.metadata().get(LEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    Some(NotLeader { leader })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::ErrorCode;

    #[test]
    fn registry_errors_are_not_not_leader_answers() {
        for code in ErrorCode::ALL {
            let status = status_of(RegistryError::new(code, "detail"));
            assert_eq!(not_leader_of(&status), None);
        }
    }

    #[test]
    fn not_leader_round_trips() {
        for leader in [Some("10.0.0.2:7001".to_string()), None] {
            let n = NotLeader { leader };
            let status = not_leader_status(&n);
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert_eq!(status.message(), NOT_LEADER);
            assert_eq!(not_leader_of(&status), Some(n));
            assert_eq!(registry_error_of(&status), None);
        }
        // A leader address that is not a valid metadata value is left out, not a panic.
        let status = not_leader_status(&NotLeader { leader: Some("bad\naddress".into()) });
        assert_eq!(not_leader_of(&status), Some(NotLeader { leader: None }));
    }

    #[test]
    fn digests_round_trip_and_bad_ones_are_refused() {
        let mut sha512 = berth_core::Algorithm::Sha512.hasher();
        sha512.update(b"x");
        for d in [Digest::sha256_of(b"x"), sha512.finish()] {
            assert_eq!(Digest::from_proto(d.clone().to_proto()), Ok(d));
        }
        let long = "x".repeat(10_000);
        for bad in ["", "sha256:abc", "md5:d41d8cd98f00b204e9800998ecf8427e", long.as_str()] {
            match Digest::from_proto(bad.to_string()) {
                Err(WireError::Digest { value, .. }) => assert!(value.len() <= QUOTE_LIMIT),
                other => panic!("{bad:?} decoded as {other:?}"),
            }
        }
        let status = Status::from(WireError::Missing("blob"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let e = RegistryError::from(WireError::Missing("blob"));
        assert_eq!((e.code, e.status), (ErrorCode::Unknown, 500));
    }

    #[test]
    fn counts_saturate() {
        assert_eq!(count(7), 7);
        assert_eq!(count(u64::MAX), usize::MAX);
    }
}
