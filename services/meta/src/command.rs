//! The writes of the metadata service, as Raft log entries, and what applying them answers.

use berth_core::store::DirectoryChange;
use berth_core::{Digest, ErrorCode, ManifestRecord, RegistryError, UploadSession};
use serde::{Deserialize, Serialize};

/// One state change, replicated through the Raft log and applied in log order.
///
/// Every input that affects the outcome travels in the command (times included), so applying
/// the log gives the same state on every node and on every replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Link a verified blob into a repository.
    LinkBlob {
        /// Repository.
        repo: String,
        /// Blob.
        digest: Digest,
        /// Blob size.
        size: u64,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// Remove a blob's link from a repository.
    UnlinkBlob {
        /// Repository.
        repo: String,
        /// Blob.
        digest: Digest,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// Commit a manifest and point tags at it.
    PutManifest {
        /// Repository.
        repo: String,
        /// The manifest's index entry.
        record: ManifestRecord,
        /// Tags to point at it.
        tags: Vec<String>,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// Delete a manifest and the tags pointing at it.
    DeleteManifest {
        /// Repository.
        repo: String,
        /// Manifest.
        digest: Digest,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// Delete one tag.
    DeleteTag {
        /// Repository.
        repo: String,
        /// Tag.
        tag: String,
    },
    /// Record an upload session.
    CreateUpload {
        /// The session.
        session: UploadSession,
    },
    /// End an upload session, linking its blob when it completed.
    EndUpload {
        /// Session id.
        id: String,
        /// The finished blob and its size, if it completed.
        link: Option<(Digest, u64)>,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// Fence unlinked blobs older than a cutoff so that they can be deleted.
    BeginReap {
        /// Blobs unlinked at or before this time (ms since the epoch) qualify.
        cutoff_ms: u64,
        /// At most this many.
        max: usize,
    },
    /// A fenced blob's bytes are gone; lift the fence.
    BlobReaped {
        /// Blob.
        digest: Digest,
    },
    /// A change to accounts, organizations, tokens or package settings.
    Directory(DirectoryChange),
    /// Several independent commands in one log entry, applied in order; each succeeds or is
    /// refused on its own. Concurrent writers share one entry, and so one log fsync.
    Batch(Vec<Command>),
}

/// What applying a [`Command`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Outcome {
    /// Done.
    #[default]
    Done,
    /// Done; whether the thing existed.
    Existed(bool),
    /// Done; blobs fenced for deletion.
    Fenced(Vec<Digest>),
    /// The outcomes of a [`Command::Batch`], in order.
    Batch(Vec<Outcome>),
    /// Refused, with the error the client gets; nothing changed.
    Rejected {
        /// OCI error code.
        code: ErrorCode,
        /// Detail for humans.
        detail: String,
    },
}

impl Outcome {
    /// A refusal.
    pub fn rejected(code: ErrorCode, detail: impl Into<String>) -> Outcome {
        Outcome::Rejected { code, detail: detail.into() }
    }

    /// The refusal as an error, anything else as success.
    pub fn into_result(self) -> Result<Outcome, RegistryError> {
        match self {
            Outcome::Rejected { code, detail } => Err(RegistryError::new(code, detail)),
            other => Ok(other),
        }
    }
}
