//! The two seams of the frontend: [`BlobStore`] for bytes and [`MetaStore`] for agreed state.
//!
//! Standalone wires the storage engine and a single-voter Raft group in process; the cluster
//! wires gRPC clients. Both return [`RegistryError`]s, already mapped to what a client sees.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::access::{AccessFacts, Grants, Identity, OrgRole, Perm, Principal, Scope, SourceRepo, Visibility};
use crate::error::Result;
use crate::Digest;

/// A body moving through Berth: chunks of bytes, never the whole blob at once.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// A verified blob as stored: its size and the stamp of the copy that holds it.
///
/// Stamps order copies: a storage node gives every copy it writes a stamp greater than any it
/// gave before, and gives an existing copy a fresh one whenever a write finds it already there.
/// Stamps are milliseconds of the node's clock (never going back, even across a restart).
/// Before garbage collection deletes a blob it raises the reap floor to a time, and then deletes
/// only copies stamped at or before the floor; a link of a blob no repository links that names
/// a stamp at or below the floor is refused, so a link can never succeed for bytes the collector
/// has taken, however the two race (see `berth_meta::state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Length in bytes.
    pub size: u64,
    /// The stamp of the copy.
    pub stamp: u64,
}

/// Packages listed per owner at most, and versions per package: listings are read whole and
/// paged by the caller.
pub const MAX_LISTED: usize = 10_000;

/// A package as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSummary {
    /// Its record.
    pub package: crate::access::Package,
    /// How many versions (manifests) it holds.
    pub versions: u64,
    /// When its newest version was pushed (ms since the epoch; its creation when it has none).
    pub updated_ms: u64,
}

/// A version of a package: a manifest, and the tags that name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    /// The manifest.
    pub record: ManifestRecord,
    /// Its tags, in order (of a deleted version: the tags it had when it was deleted).
    pub tags: Vec<String>,
    /// When it was deleted (ms since the epoch), if it is: it keeps its bytes and can be
    /// restored until it is purged.
    #[serde(default)]
    pub deleted_ms: Option<u64>,
    /// How many times it was pulled (manifest `GET`s by tag or digest), as of the frontends'
    /// last report.
    #[serde(default)]
    pub downloads: u64,
}

/// Pulls of one version counted by a frontend since its last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullCount {
    /// Repository.
    pub repo: String,
    /// The version's manifest digest.
    pub digest: String,
    /// Pulls.
    pub pulls: u64,
}

/// What a garbage collection run did, or in a dry run would do now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Only counted; nothing was changed.
    pub dry_run: bool,
    /// Blobs deleted (dry run: past the grace period, that a run would delete now).
    pub blobs: u64,
    /// Their bytes, one copy each.
    pub bytes: u64,
    /// Copies deleted across the storage nodes (not counted in a dry run).
    pub copies: u64,
    /// The disk space those copies held (not counted in a dry run).
    pub copy_bytes: u64,
    /// Copies left in place because a write gave them a fresh stamp during the run.
    pub kept: u64,
    /// Stored blobs no record knows of (a refused manifest's, a push cut short): noted as
    /// strays, and collected once they have been strays for the grace period.
    pub strays: u64,
    /// Their bytes, one copy each.
    pub stray_bytes: u64,
    /// Deletion rounds (at most a few hundred blobs each).
    pub rounds: u64,
    /// How long it took, in milliseconds.
    pub millis: u64,
}

/// What a deletion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Copies removed.
    pub copies: u32,
    /// The bytes they held.
    pub bytes: u64,
    /// Copies left in place because they were stamped after the limit given.
    pub kept: u32,
    /// The highest stamp among the copies removed.
    pub stamp: Option<u64>,
    /// Storage nodes that could not be asked (a router's deletion goes on without them).
    pub unreached: u32,
}

impl Deleted {
    /// Whether anything was removed.
    pub fn any(&self) -> bool {
        self.copies > 0
    }

    /// This deletion and `other` together.
    pub fn and(self, other: Deleted) -> Deleted {
        Deleted {
            copies: self.copies + other.copies,
            bytes: self.bytes + other.bytes,
            kept: self.kept + other.kept,
            stamp: self.stamp.max(other.stamp),
            unreached: self.unreached + other.unreached,
        }
    }
}

/// The largest blob [`BlobStore::upload_finish_copying`] copies in the same call: the call's
/// deadline allows for this much, and a larger blob is copied by a transfer sized to it.
pub const COPY_WHILE_FINISHING: u64 = 16 << 20;

/// How long a node gives each copy it makes while finishing an upload: a target that takes
/// longer is reported as failed, so that the call answers before the caller's deadline
/// (its usual time plus this) and a stalled target is never blamed on the staging node.
pub const FINISH_COPY_TIME: std::time::Duration = std::time::Duration::from_secs(16);

/// Copies blob `digest` (`size` bytes) from `from` to `to`: checked there against `from`'s
/// BLAKE3 of it when `from` keeps one ([`BlobStore::put_copy`]), else against the digest.
pub async fn copy_blob(from: &dyn BlobStore, to: &dyn BlobStore, digest: &Digest, size: u64) -> Result<Stored> {
    let blake3 = from.blake3(digest).await?;
    let body = from.read(digest, None).await?;
    send_copy(to, digest, blake3, body, size).await
}

/// Writes `body`, the `size` bytes of blob `digest` as a node that holds it read them, to
/// `to`: checked there against that node's BLAKE3 of them (`blake3`) when it keeps one, else
/// against the digest.
pub async fn send_copy(
    to: &dyn BlobStore,
    digest: &Digest,
    blake3: Option<[u8; 32]>,
    body: ByteStream,
    size: u64,
) -> Result<Stored> {
    match blake3 {
        Some(b) => to.put_copy(digest, b, body, size).await,
        None => to.put(digest, body, size).await,
    }
}

/// A finished upload as stored, and the outcome of each copy made with it, one per target
/// (`None`: the blob was too large to copy in the same call).
pub type FinishedCopies = (Stored, Option<Vec<Result<Stored>>>);

/// Bytes: verified blobs, and upload sessions being staged.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size and stamp of a stored blob, or `None`.
    async fn stat(&self, digest: &Digest) -> Result<Option<Stored>>;

    /// Streams a stored blob, whole or the inclusive byte range `(first, last)` (already
    /// checked against its size by the caller). `BLOB_UNKNOWN` if absent.
    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> Result<ByteStream>;

    /// A whole small blob (a manifest) in memory, or `None`; never more than `limit` bytes.
    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>>;

    /// Stores `data` under `digest` after checking it hashes to it; durable on return.
    async fn put_small(&self, digest: &Digest, data: Bytes) -> Result<Stored>;

    /// Streams a whole blob in (monolithic upload), verifying it hashes to `digest` and is at
    /// most `limit` bytes; durable on return.
    async fn put(&self, digest: &Digest, body: ByteStream, limit: u64) -> Result<Stored>;

    /// The BLAKE3 of a stored blob's bytes, where the store keeps one (a node's engine), or
    /// `None`: sent with a copy to another node, which checks what it receives against it.
    async fn blake3(&self, _digest: &Digest) -> Result<Option<[u8; 32]>> {
        Ok(None)
    }

    /// [`BlobStore::put`] of a copy sent by another node of the cluster, which verified the
    /// digest when it stored the bytes: they are checked against that node's `blake3` of them
    /// (computed here anyway, for the copy's integrity checksums) instead of being hashed again
    /// with the digest's algorithm. Stores that keep no BLAKE3 verify the digest as `put` does.
    async fn put_copy(&self, digest: &Digest, _blake3: [u8; 32], body: ByteStream, limit: u64) -> Result<Stored> {
        self.put(digest, body, limit).await
    }

    /// Opens an empty staging area for upload `id`. Returns the storage node (by name) it is
    /// staged on, for its session to record, when the store routes over several; `None` for a
    /// store that is one node.
    async fn upload_start(&self, id: &str) -> Result<Option<String>>;

    /// Begins an upload whose id starts with `uuid`: the id and where it is staged, for its
    /// session to record. The default opens its staging area at once
    /// ([`BlobStore::upload_start`]) under `uuid` itself; a store over storage nodes instead
    /// names the staging node's incarnation in the id ([`upload_id`]) when it knows it, and the
    /// area opens at the upload's first call, which saves a round trip.
    async fn upload_begin(&self, uuid: &str) -> Result<Begun> {
        Ok(Begun { id: uuid.to_string(), node: self.upload_start(uuid).await? })
    }

    /// This store's incarnation, when it has one (a storage node's engine, or a client that
    /// has heard its node's): a number drawn at every start of the node, except one after a
    /// graceful stop that kept every staged upload, so that an upload begun without opening
    /// its staging area is opened at its first call only while nothing staged can have been
    /// lost since it began, never again, empty, by a node that lost it. The default has none.
    fn incarnation(&self) -> Option<u64> {
        None
    }

    /// Appends `body` to upload `id`. With `offset`, the append must start exactly there
    /// (`416` otherwise). The upload may not grow past `limit`. Returns the new length.
    async fn upload_append(&self, id: &str, offset: Option<u64>, body: ByteStream, limit: u64) -> Result<u64>;

    /// Bytes received so far by upload `id`, or `None` when it is unknown or expired.
    async fn upload_size(&self, id: &str) -> Result<Option<u64>>;

    /// Whether upload `id` has a staging area here, answered without waiting for it (an append
    /// under way holds it for as long as its client sends): for housekeeping, which must not
    /// stall behind a slow client. The default asks [`BlobStore::upload_size`].
    async fn upload_staged(&self, id: &str) -> Result<bool> {
        Ok(self.upload_size(id).await?.is_some())
    }

    /// Verifies upload `id` against `digest` and makes it a durable blob. The upload is gone
    /// afterwards whatever the outcome, except when it is unknown.
    async fn upload_finish(&self, id: &str, digest: &Digest) -> Result<Stored>;

    /// Drops upload `id` and its staged bytes.
    async fn upload_cancel(&self, id: &str) -> Result<()>;

    /// Drops uploads that made no progress for `idle`; returns their ids.
    async fn expire_uploads(&self, idle: Duration) -> Result<Vec<String>>;

    /// Removes a blob and reclaims its space: every copy, or with `upto` only copies stamped at
    /// or before it (a copy written or found again since then is kept; see [`Stored`]).
    async fn delete(&self, digest: &Digest, upto: Option<u64>) -> Result<Deleted>;

    /// Stored blobs in digest order after `after`, at most `n`, with their stamps: the
    /// inventory that garbage collection compares with what the metadata service knows.
    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>>;

    /// Copies `digest` (`size` bytes) from this store straight to the storage nodes at
    /// `targets` (their gRPC addresses), each copy verified and made durable there as any
    /// write: the outcome per target, in order. `None` from a store that cannot reach other
    /// nodes (the default): the caller copies the bytes itself.
    async fn transfer(&self, digest: &Digest, size: u64, targets: &[String]) -> Result<Option<Vec<Result<Stored>>>> {
        let _ = (digest, size, targets);
        Ok(None)
    }

    /// A hint that this store has sent the copies of `digest` it was asked for (after a finish
    /// that copies, and after a transfer, whatever their outcome): a storage node that reads
    /// do not ask first for the blob lets its pages leave the page cache now. Calling it again
    /// is harmless. The default ignores it.
    async fn note_copies_sent(&self, digest: &Digest) {
        let _ = digest;
    }

    /// Whether this store can take writes now (`Err`: why not), for a frontend's readiness:
    /// a cluster's router needs at least its write quorum of storage nodes answering. A store
    /// that is one local node always can (the default).
    fn readiness(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Tells this store that upload `id` is staged on node `node` (as its session records), so
    /// that it goes straight there instead of asking the nodes. The default ignores it.
    fn upload_staged_at(&self, id: &str, node: &str) {
        let _ = (id, node);
    }

    /// Finishes upload `id` as blob `digest` (as [`BlobStore::upload_finish`]), then, when it
    /// is no larger than [`COPY_WHILE_FINISHING`], copies it straight to the storage nodes at
    /// `targets` (as [`BlobStore::transfer`]): one call where two would do. The blob as stored
    /// here, and the outcome per target in order (`None` when it was too large to copy in
    /// the same call). `None` from a store that cannot reach other nodes (the default), with
    /// nothing done: the caller finishes and copies itself.
    async fn upload_finish_copying(
        &self,
        id: &str,
        digest: &Digest,
        targets: &[String],
    ) -> Result<Option<FinishedCopies>> {
        let _ = (id, digest, targets);
        Ok(None)
    }
}

/// One manifest as the metadata service indexes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Digest of the manifest bytes.
    pub digest: Digest,
    /// Media type it was pushed with.
    pub media_type: String,
    /// Length of the manifest bytes.
    pub size: u64,
    /// The manifest this one refers to (`subject`), if any.
    pub subject: Option<Digest>,
    /// `artifactType`, or the config's media type for an image manifest without one.
    pub artifact_type: Option<String>,
    /// The manifest's own annotations.
    pub annotations: BTreeMap<String, String>,
    /// Blobs (config, layers) that must be linked in the repository.
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index) that must exist in the repository.
    pub manifests: Vec<Digest>,
    /// When it was pushed (milliseconds since the Unix epoch).
    pub pushed_at_ms: u64,
}

/// An upload session, recorded when it starts and removed when it completes or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSession {
    /// The session id (a UUID, or one naming its staging node's incarnation: see
    /// [`upload_id`]), also the staging area's name.
    pub id: String,
    /// Repository the blob will be linked into.
    pub repo: String,
    /// When it started (milliseconds since the Unix epoch).
    pub started_at_ms: u64,
    /// Who started it (the token subject), for the cap on open uploads per caller.
    #[serde(default)]
    pub owner: String,
    /// The storage node (by name) its bytes are staged on, so that any frontend goes straight
    /// there; `None` when it was not recorded (one node, or a session from before).
    #[serde(default)]
    pub staging: Option<String>,
}

/// An upload begun ([`BlobStore::upload_begin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    /// Its id.
    pub id: String,
    /// The storage node (by name) it is staged on, when the store routes over several.
    pub node: Option<String>,
}

/// The id of an upload whose id starts with `uuid` (36 characters), staged on a node in
/// `incarnation` without opening its area: the area opens at the upload's first call to that
/// node, and only while the node is in that incarnation (see [`BlobStore::incarnation`]).
pub fn upload_id(uuid: &str, incarnation: u64) -> String {
    format!("{uuid}-{incarnation:016x}")
}

/// The incarnation an upload id names ([`upload_id`]), if it names one.
pub fn incarnation_of(id: &str) -> Option<u64> {
    let (uuid, incarnation) = id.split_at_checked(UUID_LEN)?;
    let hex = incarnation.strip_prefix('-')?;
    if uuid.contains('-') && hex.len() == 16 {
        u64::from_str_radix(hex, 16).ok().filter(|i| *i != 0)
    } else {
        None
    }
}

/// The part of an upload id its staging node is ranked by: the UUID it begins with.
pub fn upload_uuid(id: &str) -> &str {
    match incarnation_of(id) {
        Some(_) => &id[..UUID_LEN],
        None => id,
    }
}

/// Characters of a UUID in its hyphenated form.
const UUID_LEN: usize = 36;

/// Who makes a push, as far as the package a first push creates goes: the write that starts a
/// push (an upload session, a manifest) carries it, and creates the repository's package when
/// it has none, or only a deleted one, as [`DirectoryChange::EnsurePackage`] does. A push with a
/// registry token costs no read of the package beforehand that way (a caller with Basic
/// credentials has its rights read on every request anyway), and a first push creates it in
/// the same write.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pusher {
    /// The source repository (`ORG/REPO`) a CI token pushes for: the new package is linked
    /// to it.
    pub source: Option<String>,
    /// The user who pushes: granted admin on the new package (outside the user's own
    /// namespace, where the owner administers everything already).
    pub creator: Option<String>,
}

impl Pusher {
    /// The pusher `identity` is.
    pub fn of(identity: &Identity) -> Pusher {
        match identity {
            Identity::Ci { source } => Pusher { source: Some(source.clone()), creator: None },
            Identity::User { name, .. } => Pusher { source: None, creator: Some(name.clone()) },
            Identity::Anonymous => Pusher::default(),
        }
    }
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name (also the user's namespace).
    pub name: String,
    /// Administers the whole registry.
    pub site_admin: bool,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
}

/// Whom a token acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenOwner {
    /// A personal access token of this user.
    User(String),
    /// A CI token bound to this source repository (`ORG/REPO`).
    Ci(String),
}

/// A stored token: never the secret itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id (part of the token string).
    pub id: String,
    /// Whom it acts for.
    pub owner: TokenOwner,
    /// A name for humans.
    pub name: String,
    /// Scopes (personal access tokens).
    pub scopes: Vec<Scope>,
    /// SHA-256 (hex) of the whole token string.
    pub sha256: String,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
    /// When it stops working (ms since the epoch), if ever.
    pub expires_ms: Option<u64>,
    /// Last time it authenticated a request (ms since the epoch; updated at most once a minute).
    pub last_used_ms: Option<u64>,
}

/// A public key that verifies registry tokens (Ed25519), as the metadata service keeps it for
/// every frontend. Private keys are never stored anywhere: each frontend makes its own at
/// start and on rotation, and publishes only the public half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicSigningKey {
    /// Key id, the `kid` of the tokens it verifies.
    pub kid: String,
    /// The public key, base64url without padding (a JWK's `x`).
    pub x: String,
    /// The frontend that signs with it (a restarted frontend retires its predecessor's keys).
    pub owner: String,
    /// When it was published (ms since the epoch).
    pub created_ms: u64,
    /// After this time (ms since the epoch) it verifies nothing: every token it signed has
    /// expired. `None` while it may still sign.
    pub retire_after_ms: Option<u64>,
}

/// A change to accounts, organizations, tokens or package settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectoryChange {
    /// Sets the token-signing key if none is set yet (the shared HMAC key of earlier
    /// versions; only replayed from old logs, never written now).
    InitSigningKey {
        /// Hex of the HMAC key.
        key: String,
    },
    /// Deletes the shared HMAC key of earlier versions from the state.
    DropLegacySigningKey,
    /// Publishes a frontend's new token-verifying key. Keys published earlier by the same
    /// frontend (the same `owner`) retire at `retire_after_ms`, once the tokens they signed
    /// have expired; keys retired before `now_ms` are removed.
    PublishKey {
        /// The new key.
        key: PublicSigningKey,
        /// When the replaced keys stop verifying (ms since the epoch).
        retire_after_ms: u64,
        /// Now (ms since the epoch).
        now_ms: u64,
    },
    /// Asks every frontend to replace its signing key.
    RotateKeys,
    /// Creates a user (answers false if it exists).
    CreateUser(User),
    /// Deletes a user and its tokens.
    DeleteUser(String),
    /// Stores a token.
    CreateToken(TokenRecord),
    /// Deletes a token.
    RevokeToken(String),
    /// Records a token's use.
    TouchToken {
        /// Token id.
        id: String,
        /// When (ms since the epoch).
        now_ms: u64,
    },
    /// Creates an organization with its first owner (false if it exists, or the name is a user's).
    CreateOrg {
        /// Organization name.
        name: String,
        /// First owner.
        owner: String,
    },
    /// Adds, changes or (with `None`) removes a member.
    SetOrgMember {
        /// Organization.
        org: String,
        /// User.
        user: String,
        /// Role.
        role: Option<OrgRole>,
    },
    /// Creates a team.
    CreateTeam {
        /// Organization.
        org: String,
        /// Team.
        team: String,
    },
    /// Adds or removes a team member.
    SetTeamMember {
        /// Organization.
        org: String,
        /// Team.
        team: String,
        /// User.
        user: String,
        /// Whether the user is in the team.
        member: bool,
    },
    /// Registers or updates a source repository.
    PutSourceRepo(SourceRepo),
    /// Creates a package on first push (private), linked to `source` if given; no-op if it exists.
    EnsurePackage {
        /// Repository.
        repo: String,
        /// Source repository to link (`ORG/REPO`).
        source: Option<String>,
        /// The user whose push creates it; granted admin on it.
        #[serde(default)]
        creator: Option<String>,
        /// When (ms since the epoch).
        now_ms: u64,
    },
    /// Links a package without a source to the source repository registered under `url`.
    LinkSourceByUrl {
        /// Repository.
        repo: String,
        /// The `org.opencontainers.image.source` value.
        url: String,
    },
    /// Changes a package's settings.
    UpdatePackage {
        /// Repository.
        repo: String,
        /// New visibility.
        visibility: Option<Visibility>,
        /// A grant to set (`Some`) or remove (`None`).
        grant: Option<(Principal, Option<Perm>)>,
        /// Whether to inherit the source repository's grants.
        inherit: Option<bool>,
    },
    // New variants go last (see the Raft command enum: bincode numbers them by position).
    /// Deletes a version of a package, restorably: it keeps its bytes and what it holds, and
    /// is hidden from pulls, tag lists and referrers until it is restored or purged.
    DeleteVersion {
        /// Repository.
        repo: String,
        /// The version's manifest digest.
        digest: String,
        /// When (ms since the epoch; the metadata leader sets it).
        now_ms: u64,
    },
    /// Restores a deleted version, with its tags where no later push took them; refused once
    /// it has been deleted for longer than `window_ms`.
    RestoreVersion {
        /// Repository.
        repo: String,
        /// The version's manifest digest.
        digest: String,
        /// How long deleted versions stay restorable (the metadata leader sets it).
        window_ms: u64,
        /// When (ms since the epoch; the metadata leader sets it).
        now_ms: u64,
    },
    /// Deletes a package, restorably: every version of it, and the package from listings.
    DeletePackage {
        /// Repository.
        repo: String,
        /// When (ms since the epoch; the metadata leader sets it).
        now_ms: u64,
    },
    /// Restores a deleted package with the versions deleted with it; refused once the name
    /// has been pushed to again, or after `window_ms`.
    RestorePackage {
        /// Repository.
        repo: String,
        /// How long deleted packages stay restorable (the metadata leader sets it).
        window_ms: u64,
        /// When (ms since the epoch; the metadata leader sets it).
        now_ms: u64,
    },
    /// Records what a push says of its package ([`crate::access::About`]: the fields given
    /// replace the old ones), and links the package to the source repository registered
    /// under the source URL, as [`DirectoryChange::LinkSourceByUrl`] does.
    DescribePackage {
        /// Repository.
        repo: String,
        /// What the push says.
        about: crate::access::About,
    },
    /// Adds pulls to versions' download counts (a frontend's report of the last seconds).
    CountPulls(Vec<PullCount>),
}

/// A storage node as it registers itself with the metadata service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageNode {
    /// Its name, stable across restarts and address changes: placement hashes it.
    pub name: String,
    /// The gRPC address frontends and other nodes reach it at.
    pub addr: String,
    /// Its zone (a rack, a data centre), if it has one: a blob's copies go to different
    /// zones while there are enough.
    pub zone: Option<String>,
    /// Bytes its disk holds.
    pub capacity: u64,
    /// When it last registered or sent a heartbeat (ms since the epoch, the leader's clock).
    pub seen_ms: u64,
    /// Whether it takes copies (set by the metadata service; a node registering sends
    /// [`NodeState::Live`], which a drain or removal outlasts).
    #[serde(default)]
    pub state: NodeState,
    /// What it holds and is moving, as of its last heartbeat.
    #[serde(default)]
    pub stats: NodeStats,
    /// The map version at which its state last changed (set by the metadata service).
    #[serde(default)]
    pub since_version: u64,
}

/// A storage node's part in placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Owns its rendezvous share of blobs.
    #[default]
    Live,
    /// Missed its heartbeats for longer than the dead time: owns nothing, its blobs' next
    /// owners take its copies from the survivors; a heartbeat brings it back.
    Dead,
    /// Asked to give its data away before removal: owns nothing, still serves what it holds
    /// and copies each blob to its owners before dropping it.
    Draining,
}

impl NodeState {
    /// Its name in the admin API and the wire format.
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Live => "live",
            NodeState::Dead => "dead",
            NodeState::Draining => "draining",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<NodeState> {
        match s {
            "" | "live" => Some(NodeState::Live),
            "dead" => Some(NodeState::Dead),
            "draining" => Some(NodeState::Draining),
            _ => None,
        }
    }
}

/// What a storage node holds and is moving (the re-replication and rebalance of its blobs),
/// as it reports in its heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Blobs it holds.
    pub blobs: u64,
    /// Bytes of those blobs.
    pub bytes: u64,
    /// Blobs of its current pass not yet checked against their owners.
    pub queued: u64,
    /// Blobs checked in its current (or last) pass.
    pub checked: u64,
    /// Copies it made for other owners since it started.
    pub copies_made: u64,
    /// Bytes of those copies.
    pub bytes_moved: u64,
    /// Copies it dropped since it started, each once every owner held the blob.
    pub copies_dropped: u64,
    /// Bytes per second it copied over its last pass that copied anything.
    pub move_rate: u64,
    /// The map version its last complete pass worked under (0: none yet): `blobs` and
    /// `queued` describe the node under that map only from then on.
    #[serde(default)]
    pub pass_version: u64,
    /// Bytes its scrub has re-read and checked in the current pass.
    #[serde(default)]
    pub scrubbed: u64,
    /// Scrub passes over everything it holds completed since it started.
    #[serde(default)]
    pub scrub_passes: u64,
    /// Bytes per second its scrub read over its last pass.
    #[serde(default)]
    pub scrub_rate: u64,
    /// Damaged copies it found (by scrub or by a read) and took out of service since it
    /// started.
    #[serde(default)]
    pub damaged: u64,
    /// Damaged copies its mender replaced from a good replica since it started (others are
    /// replaced by another node's placement pass or a frontend's repair first).
    #[serde(default)]
    pub mended: u64,
}

/// A change an administrator (or the metadata leader) makes to the storage nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageChange {
    /// Start moving a node's blobs to their other owners; it takes no new ones.
    Drain {
        /// The node.
        name: String,
    },
    /// Let a draining node own its share again.
    Undrain {
        /// The node.
        name: String,
    },
    /// Take a node out of the map. Refused unless it is drained (a pass it completed after
    /// the drain found it holding no blobs), or `force` is set.
    Remove {
        /// The node.
        name: String,
        /// Remove it whatever it holds.
        force: bool,
    },
    /// Declare nodes dead that the leader has not heard from for the dead time: each named
    /// with the heartbeat time the leader last saw, so that a node heard from since stays live.
    DeclareDead {
        /// `(name, seen_ms)` of each silent node.
        nodes: Vec<(String, u64)>,
    },
}

/// The storage nodes blobs are placed on, and a version that changes whenever a node joins or
/// changes its address, zone or capacity (heartbeats leave it as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMap {
    /// Raised by every change of the nodes.
    pub version: u64,
    /// The nodes, by name.
    pub nodes: Vec<StorageNode>,
}

/// Everything that must be agreed on: repositories, links, manifests, tags, upload sessions.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Makes `digest` (stored as `blob`) pullable from `repo`. Refused with `BLOB_UNKNOWN` when
    /// the collector is deleting it or has deleted the copy `blob` names.
    async fn link_blob(&self, repo: &str, digest: &Digest, blob: Stored) -> Result<()>;

    /// Size of `digest` if it is linked in `repo`.
    async fn blob_link(&self, repo: &str, digest: &Digest) -> Result<Option<u64>>;

    /// Removes the link; returns whether there was one. Refused (`DENIED`, 409) while a
    /// manifest of the repository references the blob, or when the blob is a manifest.
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool>;

    /// Commits a manifest (linking its bytes, stored as `bytes`, into `repo`) and points `tags`
    /// at it, in one write. Fails with `MANIFEST_BLOB_UNKNOWN` when a blob or child it needs is
    /// missing. With a `pusher`, the same write first creates the repository's package for it
    /// when there is none (see [`Pusher`]).
    async fn put_manifest(
        &self,
        repo: &str,
        record: ManifestRecord,
        tags: Vec<String>,
        bytes: Stored,
        pusher: Option<Pusher>,
    ) -> Result<()>;

    /// A manifest of `repo` by digest.
    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>>;

    /// Registers a storage node, or renews its heartbeat (`seen_ms` is set by the metadata
    /// service from its own clock).
    async fn register_storage(&self, node: StorageNode) -> Result<()>;

    /// The storage nodes blobs are placed on.
    async fn placement(&self) -> Result<PlacementMap>;

    /// Drains, removes or expires storage nodes; returns whether the map changed. Refused
    /// (`NAME_UNKNOWN`, 404) for a node not in the map, and (`DENIED`, 409) for removing a
    /// node that still holds blobs.
    async fn change_storage(&self, change: StorageChange) -> Result<bool>;

    /// Records blobs stored with fewer copies than the replica count (a write acknowledged by
    /// a quorum while an owner was down, or a read that found an owner without its copy), so
    /// that repair brings each back to every owner. Nothing records them in a store of one
    /// node, which never calls this.
    async fn note_short_copies(&self, digests: Vec<Digest>) -> Result<()>;

    /// Blobs recorded short of copies, in digest order after `after`, at most `n`.
    async fn short_copies(&self, after: Option<&Digest>, n: usize) -> Result<Vec<Digest>>;

    /// Clears the record of `digest` once every owner holds a copy.
    async fn copies_repaired(&self, digest: &Digest) -> Result<()>;

    /// What `tag` points at in `repo`.
    async fn tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>>;

    /// The manifest `tag` points at in `repo`: [`MetaStore::tag`] and
    /// [`MetaStore::manifest`] in one read (one call, where a call crosses the network).
    async fn tagged_manifest(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>>;

    /// Deletes a manifest and every tag pointing at it; returns whether it existed. Its config
    /// and layers stay linked for the grace period and are then collected unless another
    /// manifest references them; children of an index that are left untagged and unreferenced
    /// are deleted with it. Refused (`DENIED`, 409) while an index references the manifest.
    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool>;

    /// Deletes one tag; returns whether it existed.
    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool>;

    /// Tags of `repo` in lexical order after `last`, at most `n`; `None` if the repository is unknown.
    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Option<Vec<String>>>;

    /// Names of repositories that hold at least one manifest, in lexical order after `last`,
    /// at most `n`.
    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>>;

    /// Names of public repositories that hold at least one manifest, in lexical order after
    /// `last`, at most `n` (the anonymous catalog).
    async fn public_repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>>;

    /// Manifests of `repo` whose `subject` is `subject`, in digest order after `after`, at
    /// most `n`.
    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
    ) -> Result<Vec<ManifestRecord>>;

    /// Whether `repo` holds at least one manifest.
    async fn repo_exists(&self, repo: &str) -> Result<bool>;

    /// The packages of `owner` (repositories named `owner/...`), in name order, at most
    /// [`MAX_LISTED`].
    async fn packages_of(&self, owner: &str) -> Result<Vec<PackageSummary>>;

    /// The versions of the package `repo`, in digest order, at most [`MAX_LISTED`].
    async fn package_versions(&self, repo: &str) -> Result<Vec<PackageVersion>>;

    /// Records a new upload session, unless its owner has `at_most` open already
    /// (`TOOMANYREQUESTS`): the count and the check are one write, so concurrent starts
    /// cannot all slip under the cap. With a `pusher`, the same write first creates the
    /// session's repository's package for it when there is none (see [`Pusher`]).
    async fn create_upload(&self, session: UploadSession, at_most: usize, pusher: Option<Pusher>) -> Result<()>;

    /// An upload session by id.
    async fn upload(&self, id: &str) -> Result<Option<UploadSession>>;

    /// Upload sessions in id order after `after`, at most `n`.
    async fn uploads(&self, after: Option<&str>, n: usize) -> Result<Vec<UploadSession>>;

    /// Open upload sessions of `caller` (a token subject), counted up to `at_most` (the
    /// per-caller cap, so that the count costs no more than the cap).
    async fn uploads_of(&self, caller: &str, at_most: usize) -> Result<usize>;

    /// Ends a session; with `link`, links the finished blob into its repository in the same
    /// write.
    async fn end_upload(&self, id: &str, link: Option<(Digest, Stored)>) -> Result<()>;

    /// Runs garbage collection now, to the end of what it can collect (the metadata leader
    /// runs it; see `berth_meta::gc`), or with `dry_run` only reports what it would free.
    /// `UNSUPPORTED` where no collector runs.
    async fn collect_garbage(&self, dry_run: bool) -> Result<GcReport>;

    // ---- accounts and permissions ----------------------------------------------------------

    /// Applies a directory change; answers whether it changed anything (false: already so,
    /// or refused as a conflict, e.g. a name taken).
    async fn change_directory(&self, change: DirectoryChange) -> Result<bool>;

    /// Token-verifying keys published by frontends, retired ones included until removed.
    async fn signing_keys(&self) -> Result<Vec<PublicSigningKey>>;

    /// How many times every frontend was asked to rotate its signing key.
    async fn key_generation(&self) -> Result<u64>;

    /// Whether the shared HMAC key of earlier versions is still in the state.
    async fn has_legacy_signing_key(&self) -> Result<bool>;

    /// A user.
    async fn user(&self, name: &str) -> Result<Option<User>>;

    /// Every user.
    async fn users(&self) -> Result<Vec<User>>;

    /// A token by id.
    async fn token(&self, id: &str) -> Result<Option<TokenRecord>>;

    /// A user's tokens.
    async fn tokens_of(&self, user: &str) -> Result<Vec<TokenRecord>>;

    /// Members of an organization and their roles; `None` if it does not exist.
    async fn org_members(&self, org: &str) -> Result<Option<std::collections::BTreeMap<String, OrgRole>>>;

    /// A source repository.
    async fn source_repo(&self, org: &str, name: &str) -> Result<Option<SourceRepo>>;

    /// What bears on `who`'s access to `repo`.
    async fn access_facts(&self, who: &Identity, repo: &str) -> Result<AccessFacts>;
}

/// Grants written as `user:NAME=perm` / `team:ORG/TEAM=perm` pairs, for APIs and the CLI.
pub fn parse_grants(items: &[String]) -> std::result::Result<Grants, String> {
    items
        .iter()
        .map(|i| {
            let (p, perm) = i.rsplit_once('=').ok_or_else(|| format!("{i:?} is not PRINCIPAL=PERM"))?;
            Ok((p.parse()?, perm.parse()?))
        })
        .collect()
}

/// Upper bound of `n` in a tag or catalog listing; a larger request is trimmed to it.
pub const MAX_PAGE: usize = 10_000;

/// How long an idle upload session lives by default (the spec leaves it open; ten minutes is
/// what the issue asks and what users of slow CI links need).
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The default per-blob size limit: 10 GB, as GitHub's registry sets for a layer.
pub const DEFAULT_MAX_BLOB: u64 = 10_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_id_names_its_incarnation_and_ranks_by_its_uuid() {
        let uuid = "0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d0e";
        for incarnation in [1, 0x0123_4567_89ab_cdef, u64::MAX] {
            let id = upload_id(uuid, incarnation);
            assert_eq!(id.len(), 53);
            assert_eq!(incarnation_of(&id), Some(incarnation));
            assert_eq!(upload_uuid(&id), uuid);
        }
        // A plain UUID (a session opened at its start) names none, nor does anything else.
        for other in
            [uuid, "", "0b7c8d9e", &upload_id(uuid, 0), "0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d0e-zzzzzzzzzzzzzzzz"]
        {
            assert_eq!(incarnation_of(other), None, "{other}");
            assert_eq!(upload_uuid(other), other);
        }
        assert_eq!(incarnation_of("0b7c8d9e1f2a4b3c8d4e5f6a7b8c9d0e1234-0123456789abcdef"), None);
    }
}
