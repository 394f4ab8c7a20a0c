//! The writes of the metadata service, as Raft log entries, and what applying them answers.

use berth_core::store::{DirectoryChange, Pusher};
use berth_core::{Digest, ErrorCode, ManifestRecord, RegistryError, Stored, UploadSession};
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
        /// Its size and the stamp of its stored copy.
        blob: Stored,
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
        /// The manifest's bytes as stored.
        bytes: Stored,
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
    /// Record an upload session, unless its owner has `at_most` open already.
    CreateUpload {
        /// The session.
        session: UploadSession,
        /// The cap on the owner's open sessions (0, as in entries written before there was
        /// one: none). A node of an earlier version reads the entry without it.
        #[serde(default)]
        at_most: u64,
    },
    /// End an upload session, linking its blob when it completed.
    EndUpload {
        /// Session id.
        id: String,
        /// The finished blob as stored, if it completed.
        link: Option<(Digest, Stored)>,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// One step of garbage collection as earlier versions took it: remove loose links and fence
    /// unlinked blobs older than a cutoff, so that they can be deleted. Kept so that their log
    /// entries replay alike; this version writes [`Command::FenceForReap`].
    BeginReap {
        /// Links loose and blobs unlinked at or before this time (ms since the epoch) qualify.
        cutoff_ms: u64,
        /// At most this many.
        max: usize,
    },
    /// One step of garbage collection: remove loose links and fence unlinked blobs older than
    /// a cutoff, so that they can be deleted; when it fences any, the reap floor rises to the
    /// cutoff (only copies stamped at or before it are deleted, and no link names one).
    FenceForReap {
        /// Links loose and blobs unlinked at or before this time (ms since the epoch) qualify.
        cutoff_ms: u64,
        /// At most this many.
        max: usize,
    },
    /// A fenced blob's copies are deleted; lift the fence. Earlier versions raised the reap
    /// floor to `stamp` here, and their log entries still do when replayed; this version sends
    /// none.
    BlobReaped {
        /// Blob.
        digest: Digest,
        /// The stamp of the copy deleted, if there was one.
        stamp: Option<u64>,
    },
    /// Stored blobs the state may not know of; unknown ones become deletion candidates.
    NoteStrays {
        /// Blobs found in storage.
        digests: Vec<Digest>,
        /// Time of the request (ms since the epoch).
        now_ms: u64,
    },
    /// A change to accounts, organizations, tokens or package settings.
    Directory(DirectoryChange),
    /// Several independent commands in one log entry, applied in order; each succeeds or is
    /// refused on its own. Concurrent writers share one entry, and so one log fsync.
    Batch(Vec<Command>),
    /// A storage node registers itself, or renews its heartbeat.
    RegisterStorage {
        /// The node.
        node: berth_core::store::StorageNode,
        /// Time of the request (ms since the epoch, the leader's clock).
        now_ms: u64,
    },
    /// Blobs stored with fewer copies than wanted, to be repaired.
    NoteShortCopies {
        /// Blobs.
        digests: Vec<Digest>,
    },
    /// A storage node drained, put back, removed or declared dead.
    ChangeStorage {
        /// The change.
        change: berth_core::store::StorageChange,
        /// Time of the request (ms since the epoch, the leader's clock).
        now_ms: u64,
    },
    /// Every owner of a blob holds a copy again.
    CopiesRepaired {
        /// Blob.
        digest: Digest,
    },
    // New variants go last: Raft messages between nodes are bincode-encoded, which numbers
    // variants by position, and nodes of two versions share a group during an upgrade.
    /// Deletes for good at most `max` versions deleted (restorably) at or before `before_ms`.
    PurgeDeleted {
        /// Versions deleted at or before it go (ms since the epoch).
        before_ms: u64,
        /// At most this many.
        max: usize,
        /// Now (ms since the epoch): when the links they release become loose.
        now_ms: u64,
    },
    /// The write that starts a push (`CreateUpload` or `PutManifest`), after creating its
    /// repository's package for `pusher` when it has none or only a deleted one, as
    /// `DirectoryChange::EnsurePackage` does. Refused whole when `command` is refused.
    Pushed {
        /// Who pushes.
        pusher: Pusher,
        /// Time of the request (ms since the epoch, the leader's clock): the new package's
        /// creation.
        now_ms: u64,
        /// The write.
        command: Box<Command>,
    },
}

impl Command {
    /// Whether applying it takes only a few point reads and writes of the state, so that it
    /// may run on the calling task: the commands a push or a pull makes, alone or batched.
    /// Sweeps over many keys (garbage collection's, directory changes) go to the blocking pool.
    pub fn is_light(&self) -> bool {
        match self {
            Command::LinkBlob { .. }
            | Command::UnlinkBlob { .. }
            | Command::PutManifest { .. }
            | Command::DeleteManifest { .. }
            | Command::DeleteTag { .. }
            | Command::CreateUpload { .. }
            | Command::EndUpload { .. }
            | Command::BlobReaped { .. }
            | Command::RegisterStorage { .. }
            | Command::ChangeStorage { .. }
            | Command::CopiesRepaired { .. } => true,
            Command::Batch(cmds) => cmds.len() <= 256 && cmds.iter().all(Command::is_light),
            Command::Pushed { command, .. } => command.is_light(),
            _ => false,
        }
    }
}

/// What applying a [`Command`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Outcome {
    /// Done.
    #[default]
    Done,
    /// Done; whether the thing existed.
    Existed(bool),
    /// Done; what a garbage collection step did.
    Fenced {
        /// Blobs fenced for deletion (this step's and those earlier steps left).
        fenced: Vec<Digest>,
        /// The reap floor: only copies stamped at or before it may be deleted.
        floor: u64,
        /// Loose links removed.
        unlinked: usize,
    },
    /// The outcomes of a [`Command::Batch`], in order.
    Batch(Vec<Outcome>),
    /// Refused, with the error the client gets; nothing changed.
    Rejected {
        /// OCI error code.
        code: ErrorCode,
        /// Detail for humans.
        detail: String,
        /// HTTP status, when not the code's usual one.
        #[serde(default)]
        status: Option<u16>,
    },
    /// Done; how many deleted versions were purged.
    Purged(usize),
}

impl Outcome {
    /// A refusal.
    pub fn rejected(code: ErrorCode, detail: impl Into<String>) -> Outcome {
        Outcome::Rejected { code, detail: detail.into(), status: None }
    }

    /// A refusal with an HTTP status of its own (409 for a conflict with the state).
    pub fn refused(code: ErrorCode, status: u16, detail: impl Into<String>) -> Outcome {
        Outcome::Rejected { code, detail: detail.into(), status: Some(status) }
    }

    /// The refusal as an error, anything else as success.
    pub fn into_result(self) -> Result<Outcome, RegistryError> {
        match self {
            Outcome::Rejected { code, detail, status } => {
                let e = RegistryError::new(code, detail);
                Err(match status {
                    Some(s) => e.with_status(s),
                    None => e,
                })
            }
            other => Ok(other),
        }
    }
}
