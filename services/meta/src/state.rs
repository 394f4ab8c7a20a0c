//! The replicated state: its RocksDB keyspace, how commands change it, and how it is read.
//!
//! Everything lives in one column family, keyed by a one-byte kind and NUL-separated parts
//! (names, tags and digests never contain NUL), so each listing is a prefix scan in order:
//!
//! | key | value |
//! |---|---|
//! | `n` repo | number of manifests (the repository exists while it has one) |
//! | `l` repo `\0` digest | blob size (the blob is linked in the repository) |
//! | `h` repo `\0` digest | how many manifests of the repository reference the blob or child manifest |
//! | `q` repo `\0` digest | since when the link is loose (no manifest references it) |
//! | `x` time `\0` repo `\0` digest | (loose links by time; time is 8 bytes big-endian) |
//! | `w` repo | number of uploads in progress in the repository |
//! | `c` digest | number of repositories linking the blob |
//! | `o` digest | since when no repository links the blob (deletion candidate) |
//! | `y` time `\0` digest | (deletion candidates by time) |
//! | `f` digest | fenced: being deleted, cannot be linked |
//! | `z` | the reap floor: copies stamped at or before it may be deleted, and are never linked |
//! | `m` repo `\0` digest | [`ManifestRecord`] |
//! | `t` repo `\0` tag | manifest digest |
//! | `s` repo `\0` subject `\0` digest | (a referrer of subject) |
//! | `u` id | [`UploadSession`] |
//! | `v` caller | number of uploads in progress of a caller (a token subject) |
//! | `r` digest | (the blob has fewer copies than wanted: repair it) |
//! | `g` | the placement map: registered storage nodes and its version |
//! | `R` name | when a storage node was removed (its name cannot register again) |
//! | `A` | shared HMAC token key of earlier versions (removed at start) |
//! | `J` kid | [`PublicSigningKey`]: a frontend's token-verifying key |
//! | `G` | key generation: how many times frontends were asked to rotate |
//! | `U` user | [`User`] |
//! | `K` token id | [`TokenRecord`] |
//! | `k` user `\0` token id | (index of a user's tokens) |
//! | `O` org | creation time |
//! | `M` org `\0` user | [`OrgRole`] |
//! | `T` org `\0` team | (the team exists) |
//! | `N` org `\0` team `\0` user | (team membership) |
//! | `P` repo | [`Package`] |
//! | `D` repo `\0` digest | [`DeletedVersion`]: a version deleted restorably |
//! | `Y` time `\0` repo `\0` digest | (deleted versions by deletion time, for the purge) |
//! | `W` repo `\0` digest | how many times the version was pulled |
//! | `p` repo | (the package is public) |
//! | `S` org `\0` name | [`SourceRepo`] |
//! | `X` url | `ORG/NAME` of the source repository registered under it |
//! | `~a`, `~m` | last applied log id, last membership (Raft's own) |
//!
//! # Garbage collection
//! Reference counts, kept by the state machine in the same writes as the changes they count:
//! - A manifest of a repository *holds* its config and layers and, for an index, its child
//!   manifests (`h`); its own bytes are held by its record. A pushed blob that nothing holds is
//!   *loose* (`q`, `x`): an upload whose manifest has not come yet, a layer of a deleted image,
//!   a push abandoned half way. Deleting a blob that is held, or a manifest that an index
//!   holds, is refused; deleting a manifest releases what it held, and deletes the children
//!   it leaves untagged and unheld.
//! - A loose link is removed once it has been loose for the grace period, unless an upload is
//!   in progress in its repository (a slow multi-layer push keeps its first layers).
//! - A blob no repository links (`c` at zero) becomes a deletion candidate (`o`, `y`); after
//!   the grace period it is fenced (`f`), the storage engine deletes it, and the fence is
//!   lifted. Bytes that reached storage but no repository (a refused manifest, a crash between
//!   storing and linking) are found by comparing the storage inventory with `c`, `o` and `f`
//!   ([`Command::NoteStrays`]) and follow the same path.
//! - **The generation check.** Every stored copy has a stamp (see [`berth_core::Stored`]). The
//!   step that fences blobs raises the reap floor `z` to its cutoff (the time the candidates
//!   had to be unlinked by), and the collector then deletes, on every storage node that
//!   answers, only copies stamped at or before the floor ([`Command::FenceForReap`]). A link to a blob that no repository links is accepted only
//!   with a stamp above the floor. So a copy the collector may delete can never be linked, and a
//!   copy written (or found by a write, and re-stamped) after the cutoff is neither deleted nor
//!   refused: the fence refuses its link while the deletion runs, and after it the copy is a
//!   stray (collected a grace period later) or is linked by a push that retries. Raising the
//!   floor before any deletion, in the same write as the fence, is what lets a new leader take
//!   over a collection half done: nothing it or its predecessor deletes is above the floor.
//!
//! # Deleted versions
//! Deleting a version through the packages API moves its record from `m` to `D` and its tags
//! into the record: pulls, tag lists and referrers no longer see it, but everything it holds
//! stays held (and its own bytes linked), so collection leaves its blobs alone. A restore
//! moves it back, with each tag no later push has taken. [`Command::PurgeDeleted`] (a step of
//! the collector on the leader) deletes for good the versions deleted longer ago than the
//! retention period, as an OCI `DELETE` would; only then may collection take their blobs.

use std::collections::HashMap;
use std::sync::Arc;

use berth_core::access::{owner_of, OrgRole, Package, Perm, Principal, SourceRepo, Visibility};
use berth_core::store::{
    DirectoryChange, NodeState, PlacementMap, PublicSigningKey, StorageChange, StorageNode, TokenOwner, TokenRecord,
    User,
};
use berth_core::{Digest, ErrorCode, ManifestRecord, Stored, UploadSession};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::command::{Command, Outcome};

/// Column family of the replicated state.
pub const CF_STATE: &str = "state";
/// Key of the last applied log id.
pub const KEY_APPLIED: &[u8] = b"~a";
/// Key of the last applied membership.
pub const KEY_MEMBERSHIP: &[u8] = b"~m";

/// A version deleted restorably: its record and the tags it had.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeletedVersion {
    /// The manifest.
    pub record: ManifestRecord,
    /// Its tags when it was deleted.
    pub tags: Vec<String>,
    /// When it was deleted (ms since the epoch, the leader's clock).
    pub deleted_ms: u64,
}

/// Raw key-value pairs of a scan.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// One key-value pair as a RocksDB iterator yields it.
pub type RawEntry = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>;

/// Builds a key from a kind byte and parts separated by NUL.
pub fn key(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(kind);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// Errors of the state's storage (RocksDB or encoding); fatal for the Raft node.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored value did not decode.
    #[error("decoding: {0}")]
    Decode(#[from] serde_json::Error),
    /// The column family is missing.
    #[error("column family {0} missing")]
    NoFamily(&'static str),
}

/// Read access to the replicated state (shared by the state machine and readers).
#[derive(Clone)]
pub struct StateView {
    db: Arc<DB>,
}

impl StateView {
    /// A view over `db`, which must have the [`CF_STATE`] column family.
    pub fn new(db: Arc<DB>) -> StateView {
        StateView { db }
    }

    /// The underlying database.
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    fn cf(&self) -> Result<&rocksdb::ColumnFamily, StateError> {
        self.db.cf_handle(CF_STATE).ok_or(StateError::NoFamily(CF_STATE))
    }

    /// Raw value at `k`.
    pub fn raw(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get_cf(self.cf()?, k)?)
    }

    /// Whether `k` has a value (read without copying it).
    pub fn exists(&self, k: &[u8]) -> Result<bool, StateError> {
        Ok(self.db.get_pinned_cf(self.cf()?, k)?.is_some())
    }

    /// Decoded value at `k`.
    pub fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StateError> {
        match self.db.get_pinned_cf(self.cf()?, k)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Keys (with `prefix` stripped) and raw values under `prefix`, starting after `after`
    /// (a key suffix), at most `n`.
    pub fn scan(&self, prefix: &[u8], after: Option<&[u8]>, n: usize) -> Result<Pairs, StateError> {
        let mut start = prefix.to_vec();
        if let Some(a) = after {
            start.extend_from_slice(a);
        }
        let mut out = vec![];
        for item in self.db.iterator_cf(self.cf()?, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= n {
                break;
            }
            let rest = &k[prefix.len()..];
            if after.is_some_and(|a| rest == a) {
                continue;
            }
            out.push((rest.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// What a collection step with `cutoff_ms` would fence now, at most `limit`: the step
    /// itself applied to a transaction that is then dropped, so the two never disagree.
    pub fn reap_preview(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<Digest>, StateError> {
        let mut tx = Tx::new(self);
        match tx.apply(&Command::FenceForReap { cutoff_ms, max: limit })? {
            Outcome::Fenced { fenced, .. } => Ok(fenced),
            _ => Ok(vec![]),
        }
    }

    /// Key-value pairs from `start` on, in key order.
    pub fn iter_from<'s>(&'s self, start: &[u8]) -> Result<impl Iterator<Item = RawEntry> + 's, StateError> {
        Ok(self.db.iterator_cf(self.cf()?, IteratorMode::From(start, Direction::Forward)))
    }

    /// Every key-value pair of the state, Raft's own keys excluded (for snapshots).
    pub fn dump(&self, snap: &rocksdb::Snapshot<'_>) -> Result<Pairs, StateError> {
        let mut out = vec![];
        for item in snap.iterator_cf(self.cf()?, IteratorMode::Start) {
            let (k, v) = item?;
            if !k.starts_with(b"~") {
                out.push((k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// A user.
    pub fn user(&self, name: &str) -> Result<Option<User>, StateError> {
        self.get(&key(b'U', &[name]))
    }

    /// A manifest record.
    pub fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>, StateError> {
        self.get(&key(b'm', &[repo, &digest.to_string()]))
    }
}

/// One command's changes: reads see the command's own earlier writes; nothing reaches the
/// database until [`Tx::into_batch`].
pub struct Tx<'a> {
    view: &'a StateView,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    order: Vec<Vec<u8>>,
    /// For each command being applied (a batch nests its commands), what each of its writes
    /// replaced in the overlay, in order: undone backwards when the command is refused.
    undo: Vec<Vec<Replaced>>,
}

/// A key and the overlay entry a write replaced (`None`: the key was not in the overlay).
type Replaced = (Vec<u8>, Option<Option<Vec<u8>>>);

impl<'a> Tx<'a> {
    /// A transaction over `view`.
    pub fn new(view: &'a StateView) -> Tx<'a> {
        Tx { view, overlay: HashMap::new(), order: vec![], undo: vec![] }
    }

    fn exists(&self, k: &[u8]) -> Result<bool, StateError> {
        match self.overlay.get(k) {
            Some(v) => Ok(v.is_some()),
            None => self.view.exists(k),
        }
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StateError> {
        match self.overlay.get(k) {
            Some(Some(v)) => Ok(Some(serde_json::from_slice(v)?)),
            Some(None) => Ok(None),
            None => self.view.get(k),
        }
    }

    fn set(&mut self, k: Vec<u8>, v: Option<Vec<u8>>) {
        let replaced = self.overlay.insert(k.clone(), v);
        if replaced.is_none() {
            self.order.push(k.clone());
        }
        if let Some(frame) = self.undo.last_mut() {
            frame.push((k, replaced));
        }
    }

    fn put<T: Serialize>(&mut self, k: Vec<u8>, v: &T) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(v)?;
        self.set(k, Some(bytes));
        Ok(())
    }

    fn delete(&mut self, k: Vec<u8>) {
        self.set(k, None);
    }

    /// The changes as a write batch, with extra raw puts (Raft's applied state).
    pub fn into_batch(self, extra: &[(&[u8], Vec<u8>)]) -> Result<WriteBatch, StateError> {
        let cf = self.view.cf()?;
        let mut batch = WriteBatch::default();
        for k in self.order {
            match self.overlay.get(&k) {
                Some(Some(v)) => batch.put_cf(cf, &k, v),
                Some(None) => batch.delete_cf(cf, &k),
                None => {}
            }
        }
        for (k, v) in extra {
            batch.put_cf(cf, k, v);
        }
        Ok(batch)
    }

    // ---- reads that see this transaction's writes --------------------------------------------

    /// Keys under `prefix` (with the prefix stripped) and their values, in key order, as this
    /// transaction sees them: the database with the transaction's writes laid over it. Commands
    /// folded into one batch share the transaction, so each sees every earlier one's writes.
    fn scan(&self, prefix: &[u8], limit: usize) -> Result<Pairs, StateError> {
        let mut local: Vec<(&[u8], &Option<Vec<u8>>)> =
            self.overlay.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_slice(), v)).collect();
        local.sort_by(|a, b| a.0.cmp(b.0));
        let mut local = local.into_iter().peekable();
        let mut stored = self.view.iter_from(prefix)?.peekable();
        let mut out = vec![];
        while out.len() < limit {
            let next_stored = match stored.peek() {
                Some(Ok((k, _))) if k.starts_with(prefix) => Some(k.clone()),
                Some(Err(_)) => {
                    if let Some(Err(e)) = stored.next() {
                        return Err(e.into());
                    }
                    None
                }
                _ => None,
            };
            let take_local = match (&next_stored, local.peek()) {
                (None, None) => break,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some(s), Some((l, _))) => *l <= s.as_ref(),
            };
            if take_local {
                let Some((k, v)) = local.next() else { break };
                if next_stored.as_deref() == Some(k) {
                    stored.next();
                }
                if let Some(v) = v {
                    out.push((k[prefix.len()..].to_vec(), v.clone()));
                }
            } else if let Some(Ok((k, v))) = stored.next() {
                out.push((k[prefix.len()..].to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    fn count(&self, k: &[u8]) -> Result<u64, StateError> {
        Ok(self.get::<u64>(k)?.unwrap_or(0))
    }

    /// Records upload `session`, unless its owner has `at_most` (when not 0) open already.
    fn create_upload(&mut self, session: &UploadSession, at_most: u64) -> Result<Outcome, StateError> {
        let owner = key(b'v', &[&session.owner]);
        if at_most > 0 && self.count(&owner)? >= at_most {
            return Ok(Outcome::rejected(
                ErrorCode::TooManyRequests,
                format!("{at_most} uploads are open already; finish or cancel some"),
            ));
        }
        self.put(key(b'u', &[&session.id]), session)?;
        // Counters, not an index of sessions: a count read is one lookup, while a scan of a
        // range where sessions come and go walks every deleted key still there.
        self.add(key(b'w', &[&session.repo]), 1)?;
        self.add(owner, 1)?;
        Ok(Outcome::Done)
    }

    /// Adds `delta` to the counter at `k`, deleting it at zero; returns the new value.
    fn add(&mut self, k: Vec<u8>, delta: i64) -> Result<u64, StateError> {
        let n = self.count(&k)?.saturating_add_signed(delta);
        if n == 0 {
            self.delete(k);
        } else {
            self.put(k, &n)?;
        }
        Ok(n)
    }

    // ---- the commands ---------------------------------------------------------------------

    /// Applies one command; a refused command leaves no change behind.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, StateError> {
        let order = self.order.len();
        self.undo.push(vec![]);
        let outcome = self.apply_unchecked(cmd);
        let frame = self.undo.pop().unwrap_or_default();
        let outcome = outcome?;
        if matches!(outcome, Outcome::Rejected { .. }) {
            for (k, replaced) in frame.into_iter().rev() {
                match replaced {
                    Some(v) => self.overlay.insert(k, v),
                    None => self.overlay.remove(&k),
                };
            }
            self.order.truncate(order);
        } else if let Some(outer) = self.undo.last_mut() {
            // A refusal of the enclosing command must undo this one's writes too.
            outer.extend(frame);
        }
        Ok(outcome)
    }

    fn apply_unchecked(&mut self, cmd: &Command) -> Result<Outcome, StateError> {
        match cmd {
            Command::Batch(cmds) => cmds.iter().map(|c| self.apply(c)).collect::<Result<_, _>>().map(Outcome::Batch),
            Command::Directory(
                change @ (DirectoryChange::DeleteVersion { .. }
                | DirectoryChange::RestoreVersion { .. }
                | DirectoryChange::DeletePackage { .. }
                | DirectoryChange::RestorePackage { .. }
                | DirectoryChange::UpdatePackage { .. }),
            ) => self.package_change(change),
            Command::Directory(change) => self.directory(change).map(Outcome::Existed),
            Command::PurgeDeleted { before_ms, max, now_ms } => self.purge_deleted(*before_ms, *max, *now_ms),
            Command::LinkBlob { repo, digest, blob, now_ms } => {
                let linked = self.link(repo, digest, *blob)?;
                if linked == Outcome::Done {
                    self.mark_loose_unless_held(repo, digest, *now_ms)?;
                }
                Ok(linked)
            }
            Command::UnlinkBlob { repo, digest, now_ms } => self.unlink_blob(repo, digest, *now_ms),
            Command::PutManifest { repo, record, tags, bytes, .. } => self.put_manifest(repo, record, tags, *bytes),
            Command::DeleteManifest { repo, digest, now_ms } => self.delete_manifest(repo, digest, *now_ms),
            Command::DeleteTag { repo, tag } => {
                let k = key(b't', &[repo, tag]);
                let existed = self.exists(&k)?;
                self.delete(k);
                Ok(Outcome::Existed(existed))
            }
            Command::CreateUpload { session, at_most } => self.create_upload(session, *at_most),
            Command::Pushed { pusher, now_ms, command } => {
                let repo = match &**command {
                    Command::CreateUpload { session, .. } => &session.repo,
                    Command::PutManifest { repo, .. } => repo,
                    _ => {
                        return Ok(Outcome::rejected(
                            ErrorCode::Unsupported,
                            "a push starts with an upload session or a manifest",
                        ))
                    }
                };
                self.ensure_package(repo, pusher.source.clone(), pusher.creator.as_deref(), *now_ms)?;
                self.apply(command)
            }
            Command::EndUpload { id, link, now_ms } => {
                let k = key(b'u', &[id]);
                let Some(session) = self.get::<UploadSession>(&k)? else {
                    return Ok(Outcome::rejected(ErrorCode::BlobUploadUnknown, format!("upload {id} is unknown")));
                };
                if let Some((digest, blob)) = link {
                    let linked = self.link(&session.repo, digest, *blob)?;
                    if matches!(linked, Outcome::Rejected { .. }) {
                        return Ok(linked);
                    }
                    self.mark_loose_unless_held(&session.repo, digest, *now_ms)?;
                }
                self.delete(k);
                self.add(key(b'w', &[&session.repo]), -1)?;
                self.add(key(b'v', &[&session.owner]), -1)?;
                Ok(Outcome::Done)
            }
            Command::BeginReap { cutoff_ms, max } => self.begin_reap(*cutoff_ms, *max, false),
            Command::FenceForReap { cutoff_ms, max } => self.begin_reap(*cutoff_ms, *max, true),
            Command::RegisterStorage { node, now_ms } => self.register_storage(node, *now_ms),
            Command::ChangeStorage { change, now_ms } => self.change_storage(change, *now_ms),
            Command::NoteShortCopies { digests } => {
                for d in digests {
                    self.put(key(b'r', &[&d.to_string()]), &())?;
                }
                Ok(Outcome::Done)
            }
            Command::CopiesRepaired { digest } => {
                self.delete(key(b'r', &[&digest.to_string()]));
                Ok(Outcome::Done)
            }
            Command::BlobReaped { digest, stamp } => {
                // Its copies are gone on purpose: none is short any more.
                self.delete(key(b'r', &[&digest.to_string()]));
                self.delete(key(b'f', &[&digest.to_string()]));
                if let Some(stamp) = stamp {
                    if *stamp > self.count(b"z")? {
                        self.put(b"z".to_vec(), stamp)?;
                    }
                }
                Ok(Outcome::Done)
            }
            Command::NoteStrays { digests, now_ms } => {
                for d in digests {
                    let d = d.to_string();
                    let known = self.exists(&key(b'c', &[&d]))?
                        || self.exists(&key(b'o', &[&d]))?
                        || self.exists(&key(b'f', &[&d]))?;
                    if !known {
                        self.orphan(&d, *now_ms)?;
                    }
                }
                Ok(Outcome::Done)
            }
        }
    }

    /// Records that no repository links blob `d` since `since`.
    fn orphan(&mut self, d: &str, since: u64) -> Result<(), StateError> {
        self.put(key(b'o', &[d]), &since)?;
        self.put(time_key(b'y', since, &[d]), &())
    }

    fn unorphan(&mut self, d: &str) -> Result<(), StateError> {
        if let Some(since) = self.get::<u64>(&key(b'o', &[d]))? {
            self.delete(key(b'o', &[d]));
            self.delete(time_key(b'y', since, &[d]));
        }
        Ok(())
    }

    fn set_loose(&mut self, repo: &str, d: &str, since: Option<u64>) -> Result<(), StateError> {
        let qk = key(b'q', &[repo, d]);
        if let Some(old) = self.get::<u64>(&qk)? {
            self.delete(time_key(b'x', old, &[repo, d]));
        }
        match since {
            Some(t) => {
                self.put(qk, &t)?;
                self.put(time_key(b'x', t, &[repo, d]), &())?;
            }
            None => self.delete(qk),
        }
        Ok(())
    }

    /// A link nothing holds (a blob just uploaded, or re-uploaded) is loose from now.
    fn mark_loose_unless_held(&mut self, repo: &str, digest: &Digest, now_ms: u64) -> Result<(), StateError> {
        let d = digest.to_string();
        if !self.exists(&key(b'h', &[repo, &d]))?
            && !self.exists(&key(b'm', &[repo, &d]))?
            && !self.exists(&key(b'D', &[repo, &d]))?
        {
            self.set_loose(repo, &d, Some(now_ms))?;
        }
        Ok(())
    }

    fn link(&mut self, repo: &str, digest: &Digest, blob: Stored) -> Result<Outcome, StateError> {
        let d = digest.to_string();
        if self.exists(&key(b'f', &[&d]))? {
            return Ok(Outcome::rejected(
                ErrorCode::BlobUnknown,
                format!("blob {d} is being garbage collected; upload it again"),
            ));
        }
        let ck = key(b'c', &[&d]);
        let count = self.count(&ck)?;
        // Linked somewhere means not collected since; otherwise the copy must be younger than
        // every copy the collector has deleted.
        if count == 0 && blob.stamp <= self.count(b"z")? {
            return Ok(Outcome::rejected(
                ErrorCode::BlobUnknown,
                format!("blob {d} was garbage collected; upload it again"),
            ));
        }
        let lk = key(b'l', &[repo, &d]);
        if !self.exists(&lk)? {
            self.put(lk, &blob.size)?;
            self.put(ck, &(count + 1))?;
            self.unorphan(&d)?;
        }
        Ok(Outcome::Done)
    }

    /// Removes a link; the blob becomes a deletion candidate (as of `since`) when it was the last.
    fn unlink(&mut self, repo: &str, d: &str, since: u64) -> Result<bool, StateError> {
        let lk = key(b'l', &[repo, d]);
        if !self.exists(&lk)? {
            return Ok(false);
        }
        self.delete(lk);
        self.set_loose(repo, d, None)?;
        if self.add(key(b'c', &[d]), -1)? == 0 {
            self.orphan(d, since)?;
        }
        Ok(true)
    }

    fn unlink_blob(&mut self, repo: &str, digest: &Digest, now_ms: u64) -> Result<Outcome, StateError> {
        let d = digest.to_string();
        if self.exists(&key(b'm', &[repo, &d]))? || self.exists(&key(b'D', &[repo, &d]))? {
            return Ok(Outcome::refused(
                ErrorCode::Denied,
                409,
                format!("{d} is a manifest of {repo}: delete it as a manifest"),
            ));
        }
        let holders = self.count(&key(b'h', &[repo, &d]))?;
        if holders > 0 {
            return Ok(Outcome::refused(
                ErrorCode::Denied,
                409,
                format!("blob {d} is referenced by {holders} manifest(s) of {repo}: delete them first"),
            ));
        }
        Ok(Outcome::Existed(self.unlink(repo, &d, now_ms)?))
    }

    fn put_manifest(
        &mut self,
        repo: &str,
        record: &ManifestRecord,
        tags: &[String],
        bytes: Stored,
    ) -> Result<Outcome, StateError> {
        let d = record.digest.to_string();
        let mk = key(b'm', &[repo, &d]);
        // A deleted version pushed again is live again (it still holds what it held).
        self.revive(repo, &d)?;
        // A deleted package pushed to: the name is taken by a new package (a push's first write
        // creates it, with its pusher's rights, see `Command::Pushed`; this covers a manifest
        // written without a pusher).
        if self.get::<Package>(&key(b'P', &[repo]))?.is_some_and(|p| p.deleted_ms.is_some()) {
            self.replace_package(repo, None, None, record.pushed_at_ms)?;
        }
        if !self.exists(&mk)? {
            for b in &record.blobs {
                if !self.exists(&key(b'l', &[repo, &b.to_string()]))? {
                    return Ok(Outcome::rejected(ErrorCode::ManifestBlobUnknown, format!("blob {b} is not in {repo}")));
                }
            }
            for m in &record.manifests {
                if !self.exists(&key(b'm', &[repo, &m.to_string()]))? {
                    return Ok(Outcome::rejected(
                        ErrorCode::ManifestBlobUnknown,
                        format!("manifest {m} is not in {repo}"),
                    ));
                }
            }
            if let Outcome::Rejected { code, detail, .. } = self.link(repo, &record.digest, bytes)? {
                return Ok(Outcome::rejected(code, detail));
            }
            self.set_loose(repo, &d, None)?;
            for held in record.blobs.iter().chain(&record.manifests) {
                let h = held.to_string();
                self.add(key(b'h', &[repo, &h]), 1)?;
                self.set_loose(repo, &h, None)?;
            }
            self.put(mk, record)?;
            self.add(key(b'n', &[repo]), 1)?;
            if let Some(subject) = &record.subject {
                self.put(key(b's', &[repo, &subject.to_string(), &d]), &())?;
            }
        }
        for tag in tags {
            self.put(key(b't', &[repo, tag]), &d)?;
        }
        Ok(Outcome::Done)
    }

    /// Tags of `repo` pointing at manifest `d`.
    fn tags_of(&self, repo: &str, d: &str) -> Result<Vec<String>, StateError> {
        let mut out = vec![];
        for (tag, target) in self.scan(&key(b't', &[repo, ""]), usize::MAX)? {
            if serde_json::from_slice::<String>(&target)? == d {
                out.push(String::from_utf8_lossy(&tag).into_owned());
            }
        }
        Ok(out)
    }

    fn delete_manifest(&mut self, repo: &str, digest: &Digest, now_ms: u64) -> Result<Outcome, StateError> {
        let d = digest.to_string();
        if !self.exists(&key(b'm', &[repo, &d]))? {
            return Ok(Outcome::Existed(false));
        }
        let holders = self.count(&key(b'h', &[repo, &d]))?;
        if holders > 0 {
            return Ok(Outcome::refused(
                ErrorCode::Denied,
                409,
                format!("manifest {d} is referenced by {holders} index(es) of {repo}: delete them first"),
            ));
        }
        // Children an index leaves untagged and unreferenced go with it, and theirs with them.
        let mut doomed = vec![d];
        while let Some(d) = doomed.pop() {
            let mk = key(b'm', &[repo, &d]);
            let Some(record) = self.get::<ManifestRecord>(&mk)? else { continue };
            self.delete(mk);
            self.delete(key(b'W', &[repo, &d]));
            self.add(key(b'n', &[repo]), -1)?;
            if let Some(subject) = &record.subject {
                self.delete(key(b's', &[repo, &subject.to_string(), &d]));
            }
            for tag in self.tags_of(repo, &d)? {
                self.delete(key(b't', &[repo, &tag]));
            }
            self.unlink(repo, &d, now_ms)?;
            for b in &record.blobs {
                let b = b.to_string();
                if self.add(key(b'h', &[repo, &b]), -1)? == 0 && self.exists(&key(b'l', &[repo, &b]))? {
                    self.set_loose(repo, &b, Some(now_ms))?;
                }
            }
            for child in &record.manifests {
                let c = child.to_string();
                if self.add(key(b'h', &[repo, &c]), -1)? == 0 && self.tags_of(repo, &c)?.is_empty() {
                    doomed.push(c);
                }
            }
        }
        Ok(Outcome::Existed(true))
    }

    /// Whether an upload is in progress in `repo`.
    fn uploading(&self, repo: &str) -> Result<bool, StateError> {
        self.exists(&key(b'w', &[repo]))
    }

    /// A storage node registers itself, or renews its heartbeat: the map's version changes
    /// when the node is new, changed its address, zone or capacity, or comes back from dead.
    fn register_storage(&mut self, node: &StorageNode, now_ms: u64) -> Result<Outcome, StateError> {
        if self.exists(&key(b'R', &[&node.name]))? {
            return Ok(Outcome::refused(
                ErrorCode::Denied,
                409,
                format!("storage node {} was removed from the cluster: start it with a new name", node.name),
            ));
        }
        let mut map: PlacementMap = self.get(b"g")?.unwrap_or_default();
        let mut node = StorageNode { seen_ms: now_ms, ..node.clone() };
        // An address belongs to one node: a node that took a new name replaces its old
        // entry, so that no two "copies" of a blob land on one disk.
        let before = map.nodes.len();
        map.nodes.retain(|n| n.addr != node.addr || n.name == node.name);
        if map.nodes.len() != before {
            map.version += 1;
        }
        match map.nodes.iter_mut().find(|n| n.name == node.name) {
            Some(known) => {
                // A drain outlasts heartbeats and restarts; a dead node that is heard from
                // again is live.
                node.state = match known.state {
                    NodeState::Draining => NodeState::Draining,
                    NodeState::Live | NodeState::Dead => NodeState::Live,
                };
                let revived = known.state != node.state;
                let same =
                    known.addr == node.addr && known.zone == node.zone && known.capacity == node.capacity && !revived;
                node.since_version = known.since_version;
                if !same {
                    map.version += 1;
                }
                if revived {
                    node.since_version = map.version;
                }
                *known = node;
            }
            None => {
                map.version += 1;
                node.state = NodeState::Live;
                node.since_version = map.version;
                map.nodes.push(node);
                map.nodes.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        self.put(b"g".to_vec(), &map)?;
        Ok(Outcome::Done)
    }

    /// Drains, puts back, removes or declares dead storage nodes; answers whether the map
    /// changed. Every input is in the command, `now_ms` (the leader's clock) included.
    fn change_storage(&mut self, change: &StorageChange, now_ms: u64) -> Result<Outcome, StateError> {
        let mut map: PlacementMap = self.get(b"g")?.unwrap_or_default();
        let unknown = |name: &str| Outcome::rejected(ErrorCode::NameUnknown, format!("no storage node named {name}"));
        let next = map.version + 1;
        let changed = match change {
            StorageChange::Drain { name } => {
                let Some(node) = map.nodes.iter_mut().find(|n| &n.name == name) else { return Ok(unknown(name)) };
                let changed = node.state != NodeState::Draining;
                if changed {
                    node.state = NodeState::Draining;
                    node.since_version = next;
                }
                changed
            }
            StorageChange::Undrain { name } => {
                let Some(node) = map.nodes.iter_mut().find(|n| &n.name == name) else { return Ok(unknown(name)) };
                // Only a drain is undone: a dead node comes back by its own heartbeats.
                let changed = node.state == NodeState::Draining;
                if changed {
                    node.state = NodeState::Live;
                    node.since_version = next;
                }
                changed
            }
            StorageChange::Remove { name, force } => {
                let Some(node) = map.nodes.iter().find(|n| &n.name == name) else { return Ok(unknown(name)) };
                // Drained: a pass the node completed under the map of its drain (or a later
                // one) found it holding nothing. Figures from before that prove nothing.
                let s = &node.stats;
                let drained = node.state == NodeState::Draining
                    && s.pass_version >= node.since_version
                    && s.blobs == 0
                    && s.queued == 0;
                if !force && !drained {
                    return Ok(Outcome::refused(
                        ErrorCode::Denied,
                        409,
                        format!(
                            "storage node {name} is {} and may hold blobs ({} at its last complete pass): drain it \
                             and wait until it holds none, or remove it by force",
                            node.state.name(),
                            s.blobs
                        ),
                    ));
                }
                map.nodes.retain(|n| &n.name != name);
                // Its name is not taken back: a removed node still running would otherwise
                // register again and be given blobs.
                self.put(key(b'R', &[name]), &now_ms)?;
                true
            }
            StorageChange::DeclareDead { nodes } => {
                let mut changed = false;
                for (name, seen) in nodes {
                    // Only if not heard from since the leader decided.
                    if let Some(n) = map.nodes.iter_mut().find(|n| &n.name == name) {
                        if n.state == NodeState::Live && n.seen_ms == *seen {
                            n.state = NodeState::Dead;
                            n.since_version = next;
                            changed = true;
                        }
                    }
                }
                changed
            }
        };
        if changed {
            map.version += 1;
            self.put(b"g".to_vec(), &map)?;
        }
        Ok(Outcome::Existed(changed))
    }

    fn begin_reap(&mut self, cutoff_ms: u64, max: usize, raise_floor: bool) -> Result<Outcome, StateError> {
        // Loose links past the grace period go first, so that blobs they were the last link of
        // can be fenced in the same step. A sweep looks at a bounded number of them.
        let mut unlinked = 0;
        for (rest, _) in self.scan(b"x", max.saturating_mul(4))? {
            let Some((since, parts)) = split_time_key(&rest) else { continue };
            if since > cutoff_ms || unlinked >= max {
                break;
            }
            let Some((repo, d)) = parts.split_once('\0') else { continue };
            if self.uploading(repo)? {
                continue;
            }
            self.unlink(repo, d, since)?;
            unlinked += 1;
        }
        // Blobs fenced by an earlier sweep whose deletion did not finish come first.
        let mut fenced: Vec<Digest> =
            self.scan(b"f", max)?.into_iter().filter_map(|(d, _)| String::from_utf8_lossy(&d).parse().ok()).collect();
        for (rest, _) in self.scan(b"y", max)? {
            let Some((since, d)) = split_time_key(&rest) else { continue };
            if since > cutoff_ms || fenced.len() >= max {
                break;
            }
            self.unorphan(&d)?;
            let Ok(digest) = d.parse::<Digest>() else { continue };
            self.put(key(b'f', &[&d]), &())?;
            fenced.push(digest);
        }
        // The collector deletes only copies stamped at or before the floor, and no link names
        // such a copy from now on: a copy written or found again since the cutoff survives and
        // may still be linked. Raised only when there is something to delete, so that a quiet
        // registry's floor stays where its last deletion put it.
        let mut floor = self.count(b"z")?;
        if raise_floor && !fenced.is_empty() && cutoff_ms > floor {
            floor = cutoff_ms;
            self.put(b"z".to_vec(), &floor)?;
        }
        Ok(Outcome::Fenced { fenced, floor, unlinked })
    }

    /// Moves live version `d` of `repo` to the deleted ones (see the module docs).
    /// `tags`: its tags, when the caller has them (else they are looked up).
    fn hide(&mut self, repo: &str, d: &str, now_ms: u64, tags: Option<Vec<String>>) -> Result<bool, StateError> {
        let mk = key(b'm', &[repo, d]);
        let Some(record) = self.get::<ManifestRecord>(&mk)? else { return Ok(false) };
        let tags = match tags {
            Some(t) => t,
            None => self.tags_of(repo, d)?,
        };
        for tag in &tags {
            self.delete(key(b't', &[repo, tag]));
        }
        if let Some(subject) = &record.subject {
            self.delete(key(b's', &[repo, &subject.to_string(), d]));
        }
        self.delete(mk);
        self.add(key(b'n', &[repo]), -1)?;
        self.put(key(b'D', &[repo, d]), &DeletedVersion { record, tags, deleted_ms: now_ms })?;
        self.put(time_key(b'Y', now_ms, &[repo, d]), &())?;
        Ok(true)
    }

    /// Puts a new package in place of deleted package `repo`: private, without the old one's
    /// grants, source or description; administered by `creator` outside its own namespace.
    fn replace_package(
        &mut self,
        repo: &str,
        source: Option<String>,
        creator: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StateError> {
        self.delete(key(b'p', &[repo]));
        self.put(key(b'P', &[repo]), &new_package(repo, source, creator, now_ms))
    }

    /// Creates `repo`'s package for a push (linked to `source`, administered by `creator`)
    /// when it has none, or only a deleted one, whose name is free: a new package takes it.
    /// Whether it did.
    fn ensure_package(
        &mut self,
        repo: &str,
        source: Option<String>,
        creator: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, StateError> {
        let k = key(b'P', &[repo]);
        match self.get::<Package>(&k)? {
            Some(p) if p.deleted_ms.is_none() => Ok(false),
            Some(_) => self.replace_package(repo, source, creator, now_ms).map(|()| true),
            None => self.put(k, &new_package(repo, source, creator, now_ms)).map(|()| true),
        }
    }

    /// Moves deleted version `d` of `repo` back to the live ones, without its tags; returns
    /// what it was, or `None` when no such version is deleted.
    fn revive(&mut self, repo: &str, d: &str) -> Result<Option<DeletedVersion>, StateError> {
        let dk = key(b'D', &[repo, d]);
        let Some(v) = self.get::<DeletedVersion>(&dk)? else { return Ok(None) };
        self.delete(dk);
        self.delete(time_key(b'Y', v.deleted_ms, &[repo, d]));
        self.put(key(b'm', &[repo, d]), &v.record)?;
        self.add(key(b'n', &[repo]), 1)?;
        self.set_loose(repo, d, None)?;
        if let Some(subject) = &v.record.subject {
            self.put(key(b's', &[repo, &subject.to_string(), d]), &())?;
        }
        Ok(Some(v))
    }

    /// Revives deleted version `d` of `repo` with each of its tags that nothing took since,
    /// and the deleted platform manifests of an index with it (an index pulls only whole).
    fn restore(&mut self, repo: &str, d: &str) -> Result<bool, StateError> {
        let Some(v) = self.revive(repo, d)? else { return Ok(false) };
        for tag in &v.tags {
            let tk = key(b't', &[repo, tag]);
            if !self.exists(&tk)? {
                self.put(tk, &d)?;
            }
        }
        for child in &v.record.manifests {
            self.restore(repo, &child.to_string())?;
        }
        Ok(true)
    }

    /// Deleting and restoring versions and packages (see the module docs), and visibility
    /// changes (which may be refused).
    fn package_change(&mut self, change: &DirectoryChange) -> Result<Outcome, StateError> {
        let gone = |what: &str| Outcome::refused(ErrorCode::NameUnknown, 404, format!("{what} not found"));
        match change {
            DirectoryChange::DeleteVersion { repo, digest, now_ms } => {
                if !self.exists(&key(b'm', &[repo, digest]))? {
                    return Ok(gone("package version"));
                }
                let holders = self.count(&key(b'h', &[repo, digest]))?;
                if holders > 0 {
                    return Ok(Outcome::refused(
                        ErrorCode::Denied,
                        409,
                        format!("version {digest} is part of {holders} multi-platform version(s): delete them first"),
                    ));
                }
                if self.count(&key(b'n', &[repo]))? <= 1 {
                    return Ok(Outcome::refused(
                        ErrorCode::Denied,
                        400,
                        "You cannot delete the last version of a package. You must delete the package instead.",
                    ));
                }
                self.hide(repo, digest, *now_ms, None).map(Outcome::Existed)
            }
            DirectoryChange::RestoreVersion { repo, digest, window_ms, now_ms } => {
                let package = self.get::<Package>(&key(b'P', &[repo]))?;
                match self.get::<DeletedVersion>(&key(b'D', &[repo, digest]))? {
                    // A version of a package deleted before the name was taken again belongs
                    // to that package, which is gone.
                    Some(v)
                        if package.as_ref().is_some_and(|p| p.deleted_ms.is_none() && v.deleted_ms < p.created_ms) =>
                    {
                        return Ok(Outcome::refused(
                            ErrorCode::Denied,
                            409,
                            format!("the name {repo} has been taken again since this version's package was deleted"),
                        ));
                    }
                    Some(v) if v.deleted_ms.saturating_add(*window_ms) >= *now_ms => {}
                    _ => return Ok(gone("deleted package version")),
                }
                // Restoring a version of a deleted package restores the package.
                if let Some(mut p) = package {
                    if p.deleted_ms.take().is_some() {
                        self.put(key(b'P', &[repo]), &p)?;
                    }
                }
                self.restore(repo, digest).map(Outcome::Existed)
            }
            DirectoryChange::DeletePackage { repo, now_ms } => {
                let pk = key(b'P', &[repo]);
                let Some(mut p) = self.get::<Package>(&pk)?.filter(|p| p.deleted_ms.is_none()) else {
                    return Ok(gone("package"));
                };
                // Every version goes, those held by an index with it. The tags are read once.
                let mut tags: HashMap<String, Vec<String>> = HashMap::new();
                for (tag, target) in self.scan(&key(b't', &[repo, ""]), usize::MAX)? {
                    let target: String = serde_json::from_slice(&target)?;
                    tags.entry(target).or_default().push(String::from_utf8_lossy(&tag).into_owned());
                }
                let live: Vec<String> = self
                    .scan(&key(b'm', &[repo, ""]), usize::MAX)?
                    .into_iter()
                    .map(|(d, _)| String::from_utf8_lossy(&d).into_owned())
                    .collect();
                for d in live {
                    let t = tags.remove(&d).unwrap_or_default();
                    self.hide(repo, &d, *now_ms, Some(t))?;
                }
                p.deleted_ms = Some(*now_ms);
                self.put(pk, &p)?;
                Ok(Outcome::Existed(true))
            }
            DirectoryChange::RestorePackage { repo, window_ms, now_ms } => {
                let pk = key(b'P', &[repo]);
                let Some(mut p) = self.get::<Package>(&pk)? else { return Ok(gone("package")) };
                let Some(deleted_ms) = p.deleted_ms else {
                    return Ok(if self.count(&key(b'n', &[repo]))? > 0 {
                        Outcome::refused(
                            ErrorCode::Denied,
                            409,
                            format!("the name {repo} has been taken again since its package was deleted"),
                        )
                    } else {
                        gone("deleted package")
                    });
                };
                if deleted_ms.saturating_add(*window_ms) < *now_ms {
                    return Ok(gone("deleted package"));
                }
                // The versions deleted with the package come back; those deleted before it stay.
                let with_it: Vec<String> = self
                    .scan(&key(b'D', &[repo, ""]), usize::MAX)?
                    .into_iter()
                    .filter_map(|(d, v)| {
                        let v: DeletedVersion = serde_json::from_slice(&v).ok()?;
                        (v.deleted_ms >= deleted_ms).then(|| String::from_utf8_lossy(&d).into_owned())
                    })
                    .collect();
                for d in with_it {
                    self.restore(repo, &d)?;
                }
                p.deleted_ms = None;
                self.put(pk, &p)?;
                Ok(Outcome::Existed(true))
            }
            DirectoryChange::UpdatePackage { repo, visibility: Some(v), .. } if *v != Visibility::Public => {
                // As on GHCR, a package of an organization, once public, stays public.
                let public =
                    self.get::<Package>(&key(b'P', &[repo]))?.is_some_and(|p| p.visibility == Visibility::Public);
                if public && self.exists(&key(b'O', &[owner_of(repo)]))? {
                    return Ok(Outcome::refused(
                        ErrorCode::Denied,
                        409,
                        format!("{repo} is a public package of an organization: it stays public ({v:?} refused)"),
                    ));
                }
                self.directory(change).map(Outcome::Existed)
            }
            _ => self.directory(change).map(Outcome::Existed),
        }
    }

    /// Deletes for good, as an OCI `DELETE` would, at most `max` versions deleted at or before
    /// `before_ms`. A version an index still holds (the index deleted too, later) waits for it.
    fn purge_deleted(&mut self, before_ms: u64, max: usize, now_ms: u64) -> Result<Outcome, StateError> {
        let mut purged = 0;
        for (rest, _) in self.scan(b"Y", max.saturating_mul(4))? {
            let Some((since, parts)) = split_time_key(&rest) else { continue };
            if since > before_ms || purged >= max {
                break;
            }
            let Some((repo, d)) = parts.split_once('\0') else { continue };
            if self.count(&key(b'h', &[repo, d]))? > 0 {
                continue;
            }
            let Ok(digest) = d.parse::<Digest>() else { continue };
            if self.revive(repo, d)?.is_some() {
                self.delete_manifest(repo, &digest, now_ms)?;
                purged += 1;
            }
        }
        Ok(Outcome::Purged(purged))
    }

    /// Applies a directory change; answers whether it changed anything.
    fn directory(&mut self, change: &DirectoryChange) -> Result<bool, StateError> {
        match change {
            DirectoryChange::InitSigningKey { key: k } => {
                if self.exists(b"A")? {
                    return Ok(false);
                }
                self.put(b"A".to_vec(), k)?;
            }
            DirectoryChange::DropLegacySigningKey => {
                if !self.exists(b"A")? {
                    return Ok(false);
                }
                self.delete(b"A".to_vec());
            }
            DirectoryChange::PublishKey { key: k, retire_after_ms, now_ms } => {
                for (kid, v) in self.scan(b"J", usize::MAX)? {
                    let mut old: PublicSigningKey = serde_json::from_slice(&v)?;
                    let jk = [b"J".as_slice(), &kid].concat();
                    if old.retire_after_ms.is_some_and(|t| t < *now_ms) {
                        self.delete(jk);
                    } else if old.owner == k.owner && old.retire_after_ms.is_none() {
                        old.retire_after_ms = Some(*retire_after_ms);
                        self.put(jk, &old)?;
                    }
                }
                self.put(key(b'J', &[&k.kid]), k)?;
            }
            DirectoryChange::RotateKeys => {
                let generation = self.count(b"G")? + 1;
                self.put(b"G".to_vec(), &generation)?;
            }
            DirectoryChange::CreateUser(user) => {
                if self.exists(&key(b'U', &[&user.name]))? || self.exists(&key(b'O', &[&user.name]))? {
                    return Ok(false);
                }
                self.put(key(b'U', &[&user.name]), user)?;
            }
            DirectoryChange::DeleteUser(name) => {
                if !self.exists(&key(b'U', &[name]))? {
                    return Ok(false);
                }
                self.delete(key(b'U', &[name]));
                let prefix = key(b'k', &[name, ""]);
                for (id, _) in self.scan(&prefix, usize::MAX)? {
                    let id = String::from_utf8_lossy(&id).into_owned();
                    self.delete(key(b'K', &[&id]));
                    self.delete([prefix.as_slice(), id.as_bytes()].concat());
                }
            }
            DirectoryChange::CreateToken(t) => {
                if self.exists(&key(b'K', &[&t.id]))? {
                    return Ok(false);
                }
                if let TokenOwner::User(u) = &t.owner {
                    self.put(key(b'k', &[u, &t.id]), &())?;
                }
                self.put(key(b'K', &[&t.id]), t)?;
            }
            DirectoryChange::RevokeToken(id) => {
                let Some(t) = self.get::<TokenRecord>(&key(b'K', &[id]))? else { return Ok(false) };
                if let TokenOwner::User(u) = &t.owner {
                    self.delete(key(b'k', &[u, id]));
                }
                self.delete(key(b'K', &[id]));
            }
            DirectoryChange::TouchToken { id, now_ms } => {
                let Some(mut t) = self.get::<TokenRecord>(&key(b'K', &[id]))? else { return Ok(false) };
                t.last_used_ms = Some(*now_ms);
                self.put(key(b'K', &[id]), &t)?;
            }
            DirectoryChange::CreateOrg { name, owner } => {
                if self.exists(&key(b'O', &[name]))? || self.exists(&key(b'U', &[name]))? {
                    return Ok(false);
                }
                self.put(key(b'O', &[name]), &0u64)?;
                self.put(key(b'M', &[name, owner]), &OrgRole::Owner)?;
            }
            DirectoryChange::SetOrgMember { org, user, role } => {
                if !self.exists(&key(b'O', &[org]))? {
                    return Ok(false);
                }
                match role {
                    Some(r) => self.put(key(b'M', &[org, user]), r)?,
                    None => self.delete(key(b'M', &[org, user])),
                }
            }
            DirectoryChange::CreateTeam { org, team } => {
                if !self.exists(&key(b'O', &[org]))? || self.exists(&key(b'T', &[org, team]))? {
                    return Ok(false);
                }
                self.put(key(b'T', &[org, team]), &())?;
            }
            DirectoryChange::SetTeamMember { org, team, user, member } => {
                if !self.exists(&key(b'T', &[org, team]))? {
                    return Ok(false);
                }
                if *member {
                    self.put(key(b'N', &[org, team, user]), &())?;
                } else {
                    self.delete(key(b'N', &[org, team, user]));
                }
            }
            DirectoryChange::PutSourceRepo(repo) => {
                if !self.exists(&key(b'O', &[&repo.org]))? {
                    return Ok(false);
                }
                let k = key(b'S', &[&repo.org, &repo.name]);
                if let Some(old) = self.get::<SourceRepo>(&k)? {
                    self.delete(key(b'X', &[&old.url]));
                }
                self.put(key(b'X', &[&repo.url]), &format!("{}/{}", repo.org, repo.name))?;
                self.put(k, repo)?;
            }
            DirectoryChange::EnsurePackage { repo, source, creator, now_ms } => {
                return self.ensure_package(repo, source.clone(), creator.as_deref(), *now_ms);
            }
            DirectoryChange::LinkSourceByUrl { repo, url } => {
                let k = key(b'P', &[repo]);
                let Some(mut p) = self.get::<Package>(&k)? else { return Ok(false) };
                let Some(source) = self.get::<String>(&key(b'X', &[url]))? else { return Ok(false) };
                // Only a source of the package's own owner, and only once.
                if p.source.is_some() || owner_of(&source) != owner_of(repo) {
                    return Ok(false);
                }
                p.source = Some(source);
                self.put(k, &p)?;
            }
            DirectoryChange::UpdatePackage { repo, visibility, grant, inherit } => {
                let k = key(b'P', &[repo]);
                let Some(mut p) = self.get::<Package>(&k)? else { return Ok(false) };
                if let Some(v) = visibility {
                    p.visibility = *v;
                    // The anonymous catalog lists public packages from this index alone.
                    match v {
                        Visibility::Public => self.put(key(b'p', &[repo]), &())?,
                        _ => self.delete(key(b'p', &[repo])),
                    }
                }
                if let Some((who, perm)) = grant {
                    match perm {
                        Some(perm) => p.grants.insert(who.clone(), *perm),
                        None => p.grants.remove(who),
                    };
                }
                if let Some(i) = inherit {
                    p.inherit = *i;
                }
                self.put(k, &p)?;
            }
            DirectoryChange::DescribePackage { repo, about } => {
                let k = key(b'P', &[repo]);
                let Some(mut p) = self.get::<Package>(&k)? else { return Ok(false) };
                let old = p.about.clone();
                for (field, given) in [
                    (&mut p.about.description, &about.description),
                    (&mut p.about.license, &about.license),
                    (&mut p.about.source_url, &about.source_url),
                ] {
                    if given.is_some() {
                        field.clone_from(given);
                    }
                }
                // Linked to its source repository as by a LinkSourceByUrl, when one is
                // registered under the URL (of the package's own owner, once).
                let mut linked = false;
                if let Some(url) = &about.source_url {
                    if let Some(source) = self.get::<String>(&key(b'X', &[url]))? {
                        if p.source.is_none() && owner_of(&source) == owner_of(repo) {
                            p.source = Some(source);
                            linked = true;
                        }
                    }
                }
                if p.about == old && !linked {
                    return Ok(false);
                }
                self.put(k, &p)?;
            }
            DirectoryChange::CountPulls(counts) => {
                // Counts of versions deleted for good since the pulls are dropped.
                for c in counts {
                    let live = self.exists(&key(b'm', &[&c.repo, &c.digest]))?
                        || self.exists(&key(b'D', &[&c.repo, &c.digest]))?;
                    if live && c.pulls > 0 {
                        self.add(key(b'W', &[&c.repo, &c.digest]), i64::try_from(c.pulls).unwrap_or(i64::MAX))?;
                    }
                }
            }
            // Applied by `package_change`, which answers with refusals too.
            DirectoryChange::DeleteVersion { .. }
            | DirectoryChange::RestoreVersion { .. }
            | DirectoryChange::DeletePackage { .. }
            | DirectoryChange::RestorePackage { .. } => return Ok(false),
        }
        Ok(true)
    }
}

/// A new package of `repo`, private, linked to `source`, administered by `creator` (outside
/// the creator's own namespace, where the owner administers everything already).
fn new_package(repo: &str, source: Option<String>, creator: Option<&str>, now_ms: u64) -> Package {
    let grants = creator
        .filter(|c| *c != owner_of(repo))
        .map(|c| (Principal::User(c.to_string()), Perm::Admin))
        .into_iter()
        .collect();
    Package {
        name: repo.to_string(),
        visibility: Default::default(),
        grants,
        source,
        inherit: true,
        created_ms: now_ms,
        deleted_ms: None,
        about: Default::default(),
    }
}

/// A key of a time index: `kind`, the time as 8 big-endian bytes (so that keys sort by time),
/// then the parts separated by NUL.
fn time_key(kind: u8, time_ms: u64, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&key(0, parts)[1..]);
    k
}

/// The time and the parts (still NUL-separated) of a [`time_key`] with its kind stripped.
pub(crate) fn split_time_key(rest: &[u8]) -> Option<(u64, String)> {
    let time = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    Some((time, String::from_utf8_lossy(&rest[8..]).into_owned()))
}
