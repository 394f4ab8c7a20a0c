//! The replicated state: its RocksDB keyspace, how commands change it, and how it is read.
//!
//! Everything lives in one column family, keyed by a one-byte kind and NUL-separated parts
//! (names, tags and digests never contain NUL), so each listing is a prefix scan in order:
//!
//! | key | value |
//! |---|---|
//! | `r` repo | first-push time |
//! | `l` repo `\0` digest | blob size (the blob is linked in the repository) |
//! | `c` digest | number of repositories linking the blob |
//! | `o` digest | time the last link went (unlinked blob, deletion candidate) |
//! | `f` digest | fenced: being deleted, cannot be linked |
//! | `m` repo `\0` digest | [`ManifestRecord`] |
//! | `t` repo `\0` tag | manifest digest |
//! | `s` repo `\0` subject `\0` digest | (a referrer of subject) |
//! | `u` id | [`UploadSession`] |
//! | `A` | token-signing key (hex) |
//! | `U` user | [`User`] |
//! | `K` token id | [`TokenRecord`] |
//! | `k` user `\0` token id | (index of a user's tokens) |
//! | `O` org | creation time |
//! | `M` org `\0` user | [`OrgRole`] |
//! | `T` org `\0` team | (the team exists) |
//! | `N` org `\0` team `\0` user | (team membership) |
//! | `P` repo | [`Package`] |
//! | `S` org `\0` name | [`SourceRepo`] |
//! | `X` url | `ORG/NAME` of the source repository registered under it |
//! | `~a`, `~m` | last applied log id, last membership (Raft's own) |

use std::collections::HashMap;
use std::sync::Arc;

use berth_core::access::{owner_of, OrgRole, Package, SourceRepo};
use berth_core::store::{DirectoryChange, TokenOwner, TokenRecord, User};
use berth_core::{Digest, ErrorCode, ManifestRecord, UploadSession};
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

/// Raw key-value pairs of a scan.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

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
}

impl<'a> Tx<'a> {
    /// A transaction over `view`.
    pub fn new(view: &'a StateView) -> Tx<'a> {
        Tx { view, overlay: HashMap::new(), order: vec![] }
    }

    fn raw(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self.overlay.get(k) {
            Some(v) => Ok(v.clone()),
            None => self.view.raw(k),
        }
    }

    fn exists(&self, k: &[u8]) -> Result<bool, StateError> {
        Ok(self.raw(k)?.is_some())
    }

    fn get<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StateError> {
        match self.raw(k)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn set(&mut self, k: Vec<u8>, v: Option<Vec<u8>>) {
        if !self.overlay.contains_key(&k) {
            self.order.push(k.clone());
        }
        self.overlay.insert(k, v);
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

    // ---- the commands ---------------------------------------------------------------------

    /// Applies one command; a refused command leaves no change behind.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, StateError> {
        let (overlay, order) = (self.overlay.clone(), self.order.len());
        let outcome = self.apply_unchecked(cmd)?;
        if matches!(outcome, Outcome::Rejected { .. }) {
            self.overlay = overlay;
            self.order.truncate(order);
        }
        Ok(outcome)
    }

    fn apply_unchecked(&mut self, cmd: &Command) -> Result<Outcome, StateError> {
        match cmd {
            Command::Batch(cmds) => cmds.iter().map(|c| self.apply(c)).collect::<Result<_, _>>().map(Outcome::Batch),
            Command::Directory(change) => self.directory(change).map(Outcome::Existed),
            Command::LinkBlob { repo, digest, size, now_ms } => self.link(repo, digest, *size, *now_ms),
            Command::UnlinkBlob { repo, digest, now_ms } => Ok(Outcome::Existed(self.unlink(repo, digest, *now_ms)?)),
            Command::PutManifest { repo, record, tags, now_ms } => self.put_manifest(repo, record, tags, *now_ms),
            Command::DeleteManifest { repo, digest, now_ms } => self.delete_manifest(repo, digest, *now_ms),
            Command::DeleteTag { repo, tag } => {
                let k = key(b't', &[repo, tag]);
                let existed = self.exists(&k)?;
                self.delete(k);
                Ok(Outcome::Existed(existed))
            }
            Command::CreateUpload { session } => {
                self.put(key(b'u', &[&session.id]), session)?;
                Ok(Outcome::Done)
            }
            Command::EndUpload { id, link, now_ms } => {
                let k = key(b'u', &[id]);
                let Some(session) = self.get::<UploadSession>(&k)? else {
                    return Ok(Outcome::rejected(ErrorCode::BlobUploadUnknown, format!("upload {id} is unknown")));
                };
                if let Some((digest, size)) = link {
                    let linked = self.link(&session.repo, digest, *size, *now_ms)?;
                    if matches!(linked, Outcome::Rejected { .. }) {
                        return Ok(linked);
                    }
                }
                self.delete(k);
                Ok(Outcome::Done)
            }
            Command::BeginReap { cutoff_ms, max } => self.begin_reap(*cutoff_ms, *max),
            Command::BlobReaped { digest } => {
                let d = digest.to_string();
                self.delete(key(b'f', &[&d]));
                if self.get::<u64>(&key(b'c', &[&d]))?.unwrap_or(0) == 0 {
                    self.delete(key(b'c', &[&d]));
                }
                Ok(Outcome::Done)
            }
        }
    }

    fn ensure_repo(&mut self, repo: &str, now_ms: u64) -> Result<(), StateError> {
        let k = key(b'r', &[repo]);
        if !self.exists(&k)? {
            self.put(k, &now_ms)?;
        }
        Ok(())
    }

    fn link(&mut self, repo: &str, digest: &Digest, size: u64, now_ms: u64) -> Result<Outcome, StateError> {
        let d = digest.to_string();
        if self.exists(&key(b'f', &[&d]))? {
            return Ok(Outcome::rejected(
                ErrorCode::BlobUnknown,
                format!("blob {d} is being deleted; upload it again"),
            ));
        }
        let lk = key(b'l', &[repo, &d]);
        if !self.exists(&lk)? {
            self.put(lk, &size)?;
            let ck = key(b'c', &[&d]);
            let count = self.get::<u64>(&ck)?.unwrap_or(0);
            self.put(ck, &(count + 1))?;
            self.delete(key(b'o', &[&d]));
        }
        self.ensure_repo(repo, now_ms)?;
        Ok(Outcome::Done)
    }

    fn unlink(&mut self, repo: &str, digest: &Digest, now_ms: u64) -> Result<bool, StateError> {
        let d = digest.to_string();
        let lk = key(b'l', &[repo, &d]);
        if !self.exists(&lk)? {
            return Ok(false);
        }
        self.delete(lk);
        let ck = key(b'c', &[&d]);
        let count = self.get::<u64>(&ck)?.unwrap_or(1).saturating_sub(1);
        self.put(ck, &count)?;
        if count == 0 {
            self.put(key(b'o', &[&d]), &now_ms)?;
        }
        Ok(true)
    }

    fn put_manifest(
        &mut self,
        repo: &str,
        record: &ManifestRecord,
        tags: &[String],
        now_ms: u64,
    ) -> Result<Outcome, StateError> {
        for b in &record.blobs {
            if !self.exists(&key(b'l', &[repo, &b.to_string()]))? {
                return Ok(Outcome::rejected(ErrorCode::ManifestBlobUnknown, format!("blob {b} is not in {repo}")));
            }
        }
        for m in &record.manifests {
            if !self.exists(&key(b'm', &[repo, &m.to_string()]))? {
                return Ok(Outcome::rejected(ErrorCode::ManifestBlobUnknown, format!("manifest {m} is not in {repo}")));
            }
        }
        let d = record.digest.to_string();
        if let Outcome::Rejected { detail, .. } = self.link(repo, &record.digest, record.size, now_ms)? {
            return Ok(Outcome::rejected(ErrorCode::Unknown, detail));
        }
        self.put(key(b'm', &[repo, &d]), record)?;
        if let Some(subject) = &record.subject {
            self.put(key(b's', &[repo, &subject.to_string(), &d]), &())?;
        }
        for tag in tags {
            self.put(key(b't', &[repo, tag]), &d)?;
        }
        Ok(Outcome::Done)
    }

    fn delete_manifest(&mut self, repo: &str, digest: &Digest, now_ms: u64) -> Result<Outcome, StateError> {
        let d = digest.to_string();
        let mk = key(b'm', &[repo, &d]);
        let Some(record) = self.get::<ManifestRecord>(&mk)? else {
            return Ok(Outcome::Existed(false));
        };
        self.delete(mk);
        if let Some(subject) = &record.subject {
            self.delete(key(b's', &[repo, &subject.to_string(), &d]));
        }
        let prefix = key(b't', &[repo, ""]);
        for (tag, target) in self.view.scan(&prefix, None, usize::MAX)? {
            if serde_json::from_slice::<String>(&target)? == d {
                self.delete([prefix.as_slice(), &tag].concat());
            }
        }
        self.unlink(repo, digest, now_ms)?;
        Ok(Outcome::Existed(true))
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
                for (id, _) in self.view.scan(&prefix, None, usize::MAX)? {
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
            DirectoryChange::EnsurePackage { repo, source, now_ms } => {
                let k = key(b'P', &[repo]);
                if self.exists(&k)? {
                    return Ok(false);
                }
                let p = Package {
                    name: repo.clone(),
                    visibility: Default::default(),
                    grants: Default::default(),
                    source: source.clone(),
                    inherit: true,
                    created_ms: *now_ms,
                };
                self.put(k, &p)?;
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
        }
        Ok(true)
    }

    fn begin_reap(&mut self, cutoff_ms: u64, max: usize) -> Result<Outcome, StateError> {
        // Blobs fenced by an earlier sweep whose deletion did not finish come first.
        let mut fenced: Vec<Digest> = self
            .view
            .scan(b"f", None, max)?
            .into_iter()
            .filter_map(|(d, _)| String::from_utf8_lossy(&d).parse().ok())
            .collect();
        for (d, since) in self.view.scan(b"o", None, usize::MAX)? {
            if fenced.len() >= max {
                break;
            }
            let since: u64 = serde_json::from_slice(&since)?;
            let d = String::from_utf8_lossy(&d).into_owned();
            if since > cutoff_ms || self.get::<u64>(&key(b'c', &[&d]))?.unwrap_or(0) > 0 {
                continue;
            }
            let Ok(digest) = d.parse::<Digest>() else {
                continue;
            };
            self.delete(key(b'o', &[&d]));
            self.put(key(b'f', &[&d]), &())?;
            fenced.push(digest);
        }
        Ok(Outcome::Fenced(fenced))
    }
}
