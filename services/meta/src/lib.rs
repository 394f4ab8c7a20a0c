//! The metadata service: everything the registry must agree on, replicated through one
//! openraft group whose log and state machine live in RocksDB.
//!
//! It owns repositories, blob-to-repository links, the manifest index (digest, media type,
//! size, subject, artifactType, annotations), tags, referrers and upload sessions. Writes are
//! [`Command`]s appended to the Raft log; once a majority has them (in standalone, the one
//! voter) they are applied to the state column family and the writer gets the [`Outcome`].
//! Reads go to the local state, which on the leader reflects every acknowledged write.
//!
//! Standalone runs a single-voter group; it is the same Raft, log, state machine, snapshots
//! and log purge that the cluster uses, with the gRPC network ([`network`]) that it never
//! needs to use.

pub mod client;
pub mod cluster;
pub mod command;
pub mod gc;
pub mod network;
pub mod raft;
pub mod server;
pub mod sessions;
pub mod state;
mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::access::{owner_of, AccessFacts, Identity, OrgRole, Package, SourceRepo};
use berth_core::error::Result;
use berth_core::store::{
    DirectoryChange, PlacementMap, PublicSigningKey, StorageChange, StorageNode, TokenRecord, User,
};
use berth_core::store::{GcReport, PackageSummary, PackageVersion, Pusher, MAX_LISTED};
use berth_core::{Digest, ErrorCode, ManifestRecord, MetaStore, RegistryError, Stored, UploadSession};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use tokio::sync::{mpsc, oneshot, Semaphore};

pub use command::{Command, Outcome};
use network::{Channels, GrpcNetwork};
use raft::{LogStore, NodeId, StateMachine, TypeConfig, CF_LOG, CF_RAFT};
use state::{key, StateView, CF_STATE};

/// Log entries between snapshots; after a snapshot the log before it is purged, so the log
/// on disk stays within about twice this many entries.
pub const SNAPSHOT_EVERY: u64 = 20_000;

/// How a metadata node starts.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// Directory of the node's RocksDB and snapshot; created if missing.
    pub dir: PathBuf,
    /// This node's Raft id.
    pub node_id: NodeId,
    /// Address peers reach it at (recorded in the membership).
    pub advertise: String,
}

/// Why the metadata service could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// RocksDB failed to open.
    #[error("opening the metadata database: {0}")]
    Db(#[from] rocksdb::Error),
    /// The directory could not be created.
    #[error("creating the metadata directory: {0}")]
    Io(#[from] std::io::Error),
    /// Raft failed to start or to elect this node.
    #[error("raft: {0}")]
    Raft(String),
}

/// Most commands one log entry carries.
const MAX_BATCH: usize = 512;

/// Entries being committed at once: the next one appends while the last one applies.
const BATCHES_IN_FLIGHT: usize = 4;

/// Commands waiting for the batcher.
const WRITE_QUEUE: usize = 4096;

/// A command and where its outcome goes.
type PendingWrite = (Command, oneshot::Sender<Result<Outcome>>);

/// A running metadata node.
#[derive(Clone)]
pub struct MetaService {
    raft: Raft<TypeConfig>,
    view: StateView,
    writes: mpsc::Sender<PendingWrite>,
    node_id: NodeId,
    /// Upload sessions this node accepted as leader and has not written to the log yet.
    sessions: Arc<sessions::Sessions>,
    /// The garbage collector that runs where this node leads, once one is given (its owner,
    /// the task that runs its rounds, holds it; the collector holds this service).
    collector: Arc<std::sync::OnceLock<std::sync::Weak<gc::Collector>>>,
}

/// Feeds Raft: every command that arrived while the previous entry was being committed goes
/// into the next entry, so concurrent writers share one log append and one fsync. openraft
/// appends once per client write, which under load makes the fsync, not the disk's
/// bandwidth, the limit.
async fn batch_writes(raft: Raft<TypeConfig>, mut rx: mpsc::Receiver<PendingWrite>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit_batch(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn commit_batch(raft: &Raft<TypeConfig>, batch: Vec<PendingWrite>) {
    let (mut cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
    metrics::counter!("berth_raft_proposals_total").increment(1);
    metrics::counter!("berth_raft_commands_total").increment(cmds.len() as u64);
    metrics::histogram!("berth_raft_proposal_batch_size").record(cmds.len() as f64);
    let cmd = match cmds.len() {
        1 => cmds.remove(0),
        _ => Command::Batch(cmds),
    };
    match raft.client_write(cmd).await {
        Ok(resp) => match resp.data {
            Outcome::Batch(outcomes) if outcomes.len() == replies.len() && replies.len() > 1 => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome.into_result());
                }
            }
            outcome => {
                for reply in replies {
                    let _ = reply.send(outcome.clone().into_result());
                }
            }
        },
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(unavailable(&e)));
            }
        }
    }
}

fn unavailable(e: &dyn std::fmt::Display) -> RegistryError {
    RegistryError::new(ErrorCode::Unknown, format!("metadata write failed: {e}")).with_status(503)
}

use berth_core::now_ms;

fn internal(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::internal(e)
}

impl MetaService {
    /// Opens the node's store and its Raft (not yet part of any group on a first start).
    async fn open_raft(config: &MetaConfig, channels: Channels) -> Result<(Raft<TypeConfig>, StateView), MetaError> {
        std::fs::create_dir_all(&config.dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_LOG, CF_RAFT, CF_STATE].map(|n| {
            // Small memtables bound the service's memory; the log is purged behind snapshots.
            let mut cf = Options::default();
            cf.set_write_buffer_size(8 << 20);
            cf.set_max_write_buffer_number(2);
            if n == CF_STATE {
                // Applying a command looks up keys that mostly are not there (a blob's first
                // link, its collection marks); Bloom filters answer those without a search of
                // the memtable's skip list or of every table's blocks.
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                cf.set_block_based_table_factory(&table);
                cf.set_memtable_prefix_bloom_ratio(0.1);
                cf.set_memtable_whole_key_filtering(true);
            }
            ColumnFamilyDescriptor::new(n, cf)
        });
        let db = Arc::new(DB::open_cf_descriptors(&opts, config.dir.join("db"), cfs)?);
        let view = StateView::new(db.clone());
        let log = LogStore::new(db.clone());
        let sm = StateMachine::new(view.clone(), config.dir.join("snapshot"));
        let raft_config = Config {
            cluster_name: "berth-meta".into(),
            // A leader's silence is noticed within about a second: a follower campaigns once
            // its lease (election_timeout_max) and its own election timeout have passed.
            // heartbeat_interval is also the deadline of every AppendEntries, the follower's
            // log fsync included, which takes a few ms on the disks Berth runs on.
            heartbeat_interval: 100,
            election_timeout_min: 250,
            election_timeout_max: 400,
            // Per snapshot chunk, the last one including the install (the default 200 ms
            // would keep a follower with a large state from ever catching up).
            install_snapshot_timeout: 30_000,
            snapshot_max_chunk_size: 1 << 20,
            // An entry may be a batch of hundreds of commands: keep a replication message small.
            max_payload_entries: 64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetaError::Raft(e.to_string()))?;
        let raft = Raft::new(config.node_id, Arc::new(raft_config), GrpcNetwork::new(channels), log, sm)
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))?;
        Ok((raft, view))
    }

    fn serving(raft: Raft<TypeConfig>, view: StateView, node_id: NodeId) -> MetaService {
        let (writes, rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(batch_writes(raft.clone(), rx));
        let sessions = Arc::<sessions::Sessions>::default();
        tokio::spawn(write_behind(Arc::downgrade(&sessions), writes.clone(), raft.clone()));
        MetaService { raft, view, writes, node_id, sessions, collector: Arc::default() }
    }

    /// Opens the node's store and starts a single-voter group (initialising it on first
    /// start), returning once this node leads it.
    pub async fn open_single(config: MetaConfig) -> Result<MetaService, MetaError> {
        let (raft, view) = Self::open_raft(&config, Channels::default()).await?;
        if !raft.is_initialized().await.map_err(|e| MetaError::Raft(e.to_string()))? {
            let members = BTreeMap::from([(config.node_id, BasicNode::new(config.advertise.clone()))]);
            raft.initialize(members).await.map_err(|e| MetaError::Raft(e.to_string()))?;
        }
        raft.wait(Some(Duration::from_secs(30)))
            .state(ServerState::Leader, "single voter becomes leader")
            .await
            .map_err(|e| MetaError::Raft(e.to_string()))?;
        Ok(Self::serving(raft, view, config.node_id))
    }

    /// Opens a node of a metadata group reached over gRPC through `channels`. A new node waits
    /// to be made a member ([`MetaService::initialize`] on one node, or `add_member` on the
    /// leader); a restarted one rejoins its group.
    pub async fn open_node(config: MetaConfig, channels: Channels) -> Result<MetaService, MetaError> {
        let (raft, view) = Self::open_raft(&config, channels).await?;
        Ok(Self::serving(raft, view, config.node_id))
    }

    /// Stops the Raft node, once the upload sessions in memory are on the log.
    pub async fn shutdown(&self) {
        self.write_sessions().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// Takes a snapshot now (and purges the log behind it), e.g. before a backup.
    pub async fn snapshot(&self) -> Result<()> {
        self.raft.trigger().snapshot().await.map_err(internal)
    }

    /// The term this node leads in, if it is the leader.
    pub fn leading_term(&self) -> Option<u64> {
        leading_term(&self.raft)
    }

    /// Writes every upload session in memory to the log, and waits (a few seconds at most)
    /// until they are committed. The writes go on after that wait, and clean up after
    /// themselves.
    pub async fn write_sessions(&self) {
        let (sessions, writes, raft) = (self.sessions.clone(), self.writes.clone(), self.raft.clone());
        let all = tokio::spawn(async move {
            let mut settling = vec![];
            loop {
                // The term as of each pass: a pass with the term of when it began would drop
                // the sessions of a later term this node has come to lead in meanwhile.
                let sent = persist(&sessions, &writes, leading_term(&raft), |_| true);
                settling.push(tokio::spawn(settle(sessions.clone(), sent)));
                // A full write queue left some for later.
                if sessions.lock().values().all(sessions::Pending::on_its_way) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            futures::future::join_all(settling).await;
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), all).await;
    }

    /// Where session `id` is, to be ended: taken out of memory, or on its way to the log. One
    /// of an earlier term is dropped (the session is then unknown).
    fn take_session(&self, id: &str) -> sessions::Found {
        let mut held = self.sessions.of_term(self.leading_term());
        match held.get(id).map(|p| p.written.clone()) {
            Some(Some(written)) => sessions::Found::Written(written),
            Some(None) => held.remove(id).map_or(sessions::Found::Elsewhere, sessions::Found::Taken),
            None => sessions::Found::Elsewhere,
        }
    }

    /// Whether `repo` has a package that is not deleted.
    async fn has_package(&self, repo: &str) -> Result<bool> {
        let k = key(b'P', &[repo]);
        self.read(move |v| Ok(v.get::<Package>(&k)?.is_some_and(|p| p.deleted_ms.is_none()))).await
    }

    /// Upload sessions of `owner` on the log.
    async fn uploads_on_log(&self, owner: &str) -> Result<usize> {
        let k = key(b'v', &[owner]);
        self.read(move |v| Ok(v.get::<u64>(&k)?.map_or(0, |n| n as usize))).await
    }

    /// The Raft handle, for metrics and membership changes.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    async fn write(&self, cmd: Command) -> Result<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.writes.send((cmd, tx)).await.map_err(|e| unavailable(&e))?;
        rx.await.map_err(|e| unavailable(&e))?
    }

    /// Runs a read of the local state on the calling task. The state is small and hot (its
    /// blocks sit in RocksDB's cache and the page cache), so a point read or a short scan takes
    /// microseconds; a hop to the blocking pool and back would cost more than the read.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateView) -> Result<T, state::StateError> + Send + 'static,
    ) -> Result<T> {
        f(&self.view).map_err(internal)
    }
}

/// Garbage collection's access to the state, on the node that runs the collector (the leader
/// of a cluster's metadata group, the only node of standalone); see [`gc`].
impl MetaService {
    /// Gives this node the collector that `berth admin gc` runs ([`MetaStore::collect_garbage`])
    /// for as long as the caller keeps it. The first one given stays.
    pub fn set_collector(&self, collector: &Arc<gc::Collector>) {
        if self.collector.set(Arc::downgrade(collector)).is_err() {
            tracing::warn!("a garbage collector was given twice; the first one stays");
        }
    }

    /// One step of garbage collection. Links that no manifest references and that have been
    /// loose for at least `grace` are removed (except in repositories with an upload in
    /// progress); then blobs no repository links, unlinked for at least `grace`, are fenced,
    /// at most `max`, together with those an earlier step fenced and no one finished. A fenced
    /// blob cannot be linked until [`MetaService::blob_reaped`] is called for it; only its
    /// copies stamped at or before the floor returned may be deleted.
    pub async fn begin_reap(&self, grace: Duration, max: usize) -> Result<gc::Reap> {
        // The collector spares repositories with uploads open, as the log counts them.
        self.write_sessions().await;
        let cutoff_ms = now_ms().saturating_sub(grace.as_millis() as u64);
        match self.write(Command::FenceForReap { cutoff_ms, max }).await? {
            Outcome::Fenced { fenced, floor, unlinked } => Ok(gc::Reap { fenced, floor, unlinked }),
            _ => Ok(gc::Reap::default()),
        }
    }

    /// Deletes for good at most `max` versions deleted through the packages API longer than
    /// `retention` ago; answers how many.
    pub async fn purge_deleted(&self, retention: Duration, max: usize) -> Result<usize> {
        let now = now_ms();
        let before_ms = now.saturating_sub(retention.as_millis() as u64);
        // A read first: most rounds have nothing to purge, and need no Raft write.
        let due = self
            .read(move |v| {
                Ok(v.scan(b"Y", None, 1)?
                    .first()
                    .and_then(|(rest, _)| state::split_time_key(rest))
                    .is_some_and(|(t, _)| t <= before_ms))
            })
            .await?;
        if !due {
            return Ok(0);
        }
        match self.write(Command::PurgeDeleted { before_ms, max, now_ms: now }).await? {
            Outcome::Purged(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// How long deleted versions stay restorable: the collector's setting where one runs.
    fn retention(&self) -> Duration {
        self.collector.get().and_then(std::sync::Weak::upgrade).map_or(gc::DEFAULT_RETENTION, |c| c.retention())
    }

    /// Every copy of `digest` at or below the floor is deleted: lifts its fence.
    pub async fn blob_reaped(&self, digest: &Digest) -> Result<()> {
        self.write(Command::BlobReaped { digest: digest.clone(), stamp: None }).await.map(|_| ())
    }

    /// Of `digests`, those the metadata service has no record of: linked nowhere, not a
    /// deletion candidate and not being deleted.
    pub async fn unknown_blobs(&self, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        self.read(move |v| {
            let mut out = vec![];
            for d in digests {
                let s = d.to_string();
                let known = v.raw(&key(b'c', &[&s]))?.is_some()
                    || v.raw(&key(b'o', &[&s]))?.is_some()
                    || v.raw(&key(b'f', &[&s]))?.is_some();
                if !known {
                    out.push(d);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Stored blobs the metadata service may not know of (bytes of a refused manifest, or of
    /// a push cut short by a crash): those it has no record of become deletion candidates.
    pub async fn note_strays(&self, digests: Vec<Digest>) -> Result<()> {
        self.write(Command::NoteStrays { digests, now_ms: now_ms() }).await.map(|_| ())
    }

    /// Whether storage node `name` was removed from the cluster (a removed node's name is
    /// not taken back).
    pub async fn storage_removed(&self, name: &str) -> Result<bool> {
        let k = key(b'R', &[name]);
        self.read(move |v| v.exists(&k)).await
    }

    /// Blobs linked in at least one repository, in digest order after `after`, at most `n`.
    pub async fn linked_blobs(&self, after: Option<&Digest>, n: usize) -> Result<Vec<Digest>> {
        let after = after.map(|d| d.to_string());
        let names = self.read(move |v| Ok(names(v.scan(b"c", after.as_deref().map(str::as_bytes), n)?))).await?;
        names.into_iter().map(|s| s.parse().map_err(internal)).collect()
    }

    /// What a [`MetaService::begin_reap`] step with `grace` would fence now, changing nothing
    /// (at most `limit`).
    pub async fn reap_preview(&self, grace: Duration, limit: usize) -> Result<Vec<Digest>> {
        self.write_sessions().await;
        let cutoff_ms = now_ms().saturating_sub(grace.as_millis() as u64);
        self.read(move |v| v.reap_preview(cutoff_ms, limit)).await
    }
}

/// The term `raft` leads in, if it is the leader.
fn leading_term(raft: &Raft<TypeConfig>) -> Option<u64> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    (m.state == ServerState::Leader).then_some(m.current_term)
}

/// A session sent to the log: its id, the outcome of its write, and the signal of its end.
type Sent = (String, oneshot::Receiver<Result<Outcome>>, tokio::sync::watch::Sender<bool>);

/// Sends the sessions in memory that `due` picks to the log, in the leader's write queue, and
/// marks them on their way; drops those of an earlier term. A full queue leaves the rest for
/// later.
fn persist(
    sessions: &sessions::Sessions,
    writes: &mpsc::Sender<PendingWrite>,
    term: Option<u64>,
    due: impl Fn(&sessions::Pending) -> bool,
) -> Vec<Sent> {
    let mut held = sessions.of_term(term);
    let mut sent = vec![];
    for (id, p) in held.iter_mut() {
        if p.on_its_way() || !due(p) {
            continue;
        }
        let create = Command::CreateUpload { session: p.session.clone(), at_most: 0 };
        let (tx, rx) = oneshot::channel();
        if writes.try_send((pushed(p.pusher.clone(), p.session.started_at_ms, create), tx)).is_err() {
            break;
        }
        let (done, written) = tokio::sync::watch::channel(false);
        p.written = Some(written);
        sent.push((id.clone(), rx, done));
    }
    sent
}

/// Waits for each session `sent` to the log, takes it out of memory and tells whoever waits
/// to end it.
async fn settle(sessions: Arc<sessions::Sessions>, sent: Vec<Sent>) {
    futures::future::join_all(sent.into_iter().map(|(id, rx, done)| {
        let sessions = sessions.clone();
        async move {
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(upload = %id, error = %e, "writing an upload session to the log"),
                Err(_) => tracing::warn!(upload = %id, "an upload session's write was dropped"),
            }
            sessions.lock().remove(&id);
            done.send_replace(true);
        }
    }))
    .await;
}

/// Writes each session in memory to the log once it has lasted [`sessions::WRITE_BEHIND`],
/// for as long as the service lives.
async fn write_behind(
    sessions: std::sync::Weak<sessions::Sessions>,
    writes: mpsc::Sender<PendingWrite>,
    raft: Raft<TypeConfig>,
) {
    let mut tick = tokio::time::interval(sessions::WRITE_BEHIND / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(sessions) = sessions.upgrade() else { return };
        let sent = persist(&sessions, &writes, leading_term(&raft), |p| p.since.elapsed() >= sessions::WRITE_BEHIND);
        if !sent.is_empty() {
            tokio::spawn(settle(sessions, sent));
        }
    }
}

/// `command`, made by `pusher` when there is one (see [`Command::Pushed`]).
fn pushed(pusher: Option<Pusher>, now_ms: u64, command: Command) -> Command {
    match pusher {
        Some(pusher) => Command::Pushed { pusher, now_ms, command: Box::new(command) },
        None => command,
    }
}

fn names(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<String> {
    pairs.into_iter().map(|(k, _)| String::from_utf8_lossy(&k).into_owned()).collect()
}

#[async_trait]
impl MetaStore for MetaService {
    async fn link_blob(&self, repo: &str, digest: &Digest, blob: Stored) -> Result<()> {
        self.write(Command::LinkBlob { repo: repo.into(), digest: digest.clone(), blob, now_ms: now_ms() }).await?;
        Ok(())
    }

    async fn blob_link(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let d = digest.to_string();
        let (k, deleted) = (key(b'l', &[repo, &d]), key(b'D', &[repo, &d]));
        // The bytes of a deleted version stay linked (for its restore) but are not served; only
        // a linked blob is looked up among them.
        self.read(move |v| match v.get(&k)? {
            Some(size) if v.raw(&deleted)?.is_none() => Ok(Some(size)),
            _ => Ok(None),
        })
        .await
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let o = self.write(Command::UnlinkBlob { repo: repo.into(), digest: digest.clone(), now_ms: now_ms() }).await?;
        Ok(o == Outcome::Existed(true))
    }

    async fn put_manifest(
        &self,
        repo: &str,
        record: ManifestRecord,
        tags: Vec<String>,
        bytes: Stored,
        pusher: Option<Pusher>,
    ) -> Result<()> {
        let now_ms = now_ms();
        let o = self
            .write(pushed(pusher, now_ms, Command::PutManifest { repo: repo.into(), record, tags, bytes, now_ms }))
            .await;
        o.map(|_| ()).map_err(|e| if e.code == ErrorCode::Unknown { e.with_status(503) } else { e })
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let (repo, digest) = (repo.to_string(), digest.clone());
        self.read(move |v| v.manifest(&repo, &digest)).await
    }

    async fn tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        let k = key(b't', &[repo, tag]);
        let d: Option<String> = self.read(move |v| v.get(&k)).await?;
        d.map(|s| s.parse().map_err(internal)).transpose()
    }

    async fn tagged_manifest(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>> {
        let (repo, k) = (repo.to_string(), key(b't', &[repo, tag]));
        self.read(move |v| {
            let Some(d) = v.get::<String>(&k)? else { return Ok(None) };
            v.get(&key(b'm', &[&repo, &d]))
        })
        .await
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let o =
            self.write(Command::DeleteManifest { repo: repo.into(), digest: digest.clone(), now_ms: now_ms() }).await?;
        Ok(o == Outcome::Existed(true))
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let o = self.write(Command::DeleteTag { repo: repo.into(), tag: tag.into() }).await?;
        Ok(o == Outcome::Existed(true))
    }

    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Option<Vec<String>>> {
        let repo = repo.to_string();
        let last = last.map(str::to_string);
        self.read(move |v| {
            if v.raw(&key(b'n', &[&repo]))?.is_none() {
                return Ok(None);
            }
            let prefix = key(b't', &[&repo, ""]);
            Ok(Some(names(v.scan(&prefix, last.as_deref().map(str::as_bytes), n)?)))
        })
        .await
    }

    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let last = last.map(str::to_string);
        self.read(move |v| Ok(names(v.scan(b"n", last.as_deref().map(str::as_bytes), n)?))).await
    }

    async fn public_repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let last = last.map(str::to_string);
        self.read(move |v| {
            let mut out = vec![];
            let mut after = last;
            // Public packages that were never pushed to (or whose manifests are all deleted)
            // are skipped; each round reads a page of the public index.
            while out.len() < n {
                let page = names(v.scan(b"p", after.as_deref().map(str::as_bytes), n)?);
                let exhausted = page.len() < n;
                for repo in page {
                    after = Some(repo.clone());
                    if out.len() < n && v.raw(&key(b'n', &[&repo]))?.is_some() {
                        out.push(repo);
                    }
                }
                if exhausted {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
    ) -> Result<Vec<ManifestRecord>> {
        let (repo, subject, after) = (repo.to_string(), subject.to_string(), after.map(Digest::to_string));
        self.read(move |v| {
            let prefix = key(b's', &[&repo, &subject, ""]);
            let mut out = vec![];
            for (d, _) in v.scan(&prefix, after.as_deref().map(str::as_bytes), n)? {
                let d = String::from_utf8_lossy(&d).into_owned();
                if let Some(r) = v.get::<ManifestRecord>(&key(b'm', &[&repo, &d]))? {
                    out.push(r);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn repo_exists(&self, repo: &str) -> Result<bool> {
        let k = key(b'n', &[repo]);
        self.read(move |v| Ok(v.raw(&k)?.is_some())).await
    }

    /// Kept in memory (see [`sessions`]) while this node leads; else written as any command,
    /// and refused as writes are on a node that does not lead.
    async fn create_upload(&self, session: UploadSession, at_most: usize, pusher: Option<Pusher>) -> Result<()> {
        // The session's start is the metadata service's time, as every time in a command is.
        let now_ms = now_ms();
        let session = UploadSession { started_at_ms: now_ms, ..session };
        // A push's first session in a repository without a package goes to the log at once:
        // its write creates the package, which the push's other requests then find.
        let term = match self.leading_term() {
            Some(term) if pusher.is_none() || self.has_package(&session.repo).await? => term,
            _ => {
                let create = Command::CreateUpload { session, at_most: at_most as u64 };
                return self.write(pushed(pusher, now_ms, create)).await.map(|_| ());
            }
        };
        let on_log = if at_most > 0 { self.uploads_on_log(&session.owner).await? } else { 0 };
        let mut held = self.sessions.of_term(Some(term));
        if at_most > 0 && on_log + held.count_of(&session.owner) >= at_most {
            return Err(RegistryError::new(
                ErrorCode::TooManyRequests,
                format!("{at_most} uploads are open already; finish or cancel some"),
            ));
        }
        let pending = sessions::Pending { session, pusher, since: std::time::Instant::now(), written: None };
        held.insert(pending.session.id.clone(), pending);
        Ok(())
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadSession>> {
        if let Some(p) = self.sessions.of_term(self.leading_term()).get(id) {
            return Ok(Some(p.session.clone()));
        }
        let k = key(b'u', &[id]);
        self.read(move |v| v.get(&k)).await
    }

    /// Sessions on the log and in memory, in id order.
    async fn uploads(&self, after: Option<&str>, n: usize) -> Result<Vec<UploadSession>> {
        let after = after.map(str::to_string);
        let mut in_memory: Vec<UploadSession> = self
            .sessions
            .of_term(self.leading_term())
            .values()
            .filter(|p| after.as_deref().is_none_or(|a| p.session.id.as_str() > a))
            .map(|p| p.session.clone())
            .collect();
        let scan_after = after.clone();
        let mut all: Vec<UploadSession> = self
            .read(move |v| {
                v.scan(b"u", scan_after.as_deref().map(str::as_bytes), n)?
                    .into_iter()
                    .map(|(_, s)| Ok(serde_json::from_slice(&s)?))
                    .collect::<Result<Vec<UploadSession>, state::StateError>>()
            })
            .await?;
        // One on its way to the log may be in both.
        in_memory.retain(|m| !all.iter().any(|s| s.id == m.id));
        all.append(&mut in_memory);
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.truncate(n);
        Ok(all)
    }

    async fn uploads_of(&self, caller: &str, at_most: usize) -> Result<usize> {
        let on_log = self.uploads_on_log(caller).await?;
        let in_memory = self.sessions.of_term(self.leading_term()).count_of(caller);
        Ok((on_log + in_memory).min(at_most))
    }

    /// A session still in memory ends there: a cancel writes nothing, a finish writes the
    /// blob's link (with the package first, when the push is the repository's first).
    async fn end_upload(&self, id: &str, link: Option<(Digest, Stored)>) -> Result<()> {
        let now_ms = now_ms();
        let p = match self.take_session(id) {
            sessions::Found::Taken(p) => p,
            found => {
                // On its way to the log: ended there once it is created there (batches of the
                // write queue may commit out of order, so waiting for the write is what keeps
                // the end behind the creation).
                if let sessions::Found::Written(mut written) = found {
                    let _ = tokio::time::timeout(Duration::from_secs(10), written.wait_for(|w| *w)).await;
                }
                return self.write(Command::EndUpload { id: id.into(), link, now_ms }).await.map(|_| ());
            }
        };
        let Some((digest, blob)) = link else { return Ok(()) };
        let repo = p.session.repo.clone();
        if p.pusher.is_some() && !self.has_package(&repo).await? {
            let create = Command::CreateUpload { session: p.session, at_most: 0 };
            self.write(pushed(p.pusher, now_ms, create)).await?;
            let end = Command::EndUpload { id: id.into(), link: Some((digest, blob)), now_ms };
            return self.write(end).await.map(|_| ());
        }
        self.write(Command::LinkBlob { repo, digest, blob, now_ms }).await.map(|_| ())
    }

    async fn packages_of(&self, owner: &str) -> Result<Vec<PackageSummary>> {
        let owner = owner.to_string();
        self.read(move |v| {
            let prefix = [b"P".as_slice(), owner.as_bytes(), b"/"].concat();
            let mut out = vec![];
            for (_, value) in v.scan(&prefix, None, MAX_LISTED)? {
                let package: Package = serde_json::from_slice(&value)?;
                if package.deleted_ms.is_some() {
                    continue;
                }
                let versions = v.get::<u64>(&key(b'n', &[&package.name]))?.unwrap_or(0);
                let mut updated_ms = package.created_ms;
                for (_, m) in v.scan(&key(b'm', &[&package.name, ""]), None, MAX_LISTED)? {
                    let record: ManifestRecord = serde_json::from_slice(&m)?;
                    updated_ms = updated_ms.max(record.pushed_at_ms);
                }
                out.push(PackageSummary { package, versions, updated_ms });
            }
            Ok(out)
        })
        .await
    }

    async fn package_versions(&self, repo: &str) -> Result<Vec<PackageVersion>> {
        let repo = repo.to_string();
        self.read(move |v| {
            let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (tag, d) in v.scan(&key(b't', &[&repo, ""]), None, usize::MAX)? {
                let d: String = serde_json::from_slice(&d)?;
                tags.entry(d).or_default().push(String::from_utf8_lossy(&tag).into_owned());
            }
            let mut out = vec![];
            for (_, m) in v.scan(&key(b'm', &[&repo, ""]), None, MAX_LISTED)? {
                let record: ManifestRecord = serde_json::from_slice(&m)?;
                let tags = tags.remove(&record.digest.to_string()).unwrap_or_default();
                out.push(PackageVersion { record, tags, deleted_ms: None, downloads: 0 });
            }
            // Versions deleted restorably, with the tags they had.
            for (_, d) in v.scan(&key(b'D', &[&repo, ""]), None, MAX_LISTED)? {
                let d: state::DeletedVersion = serde_json::from_slice(&d)?;
                out.push(PackageVersion {
                    record: d.record,
                    tags: d.tags,
                    deleted_ms: Some(d.deleted_ms),
                    downloads: 0,
                });
            }
            for version in &mut out {
                let digest = version.record.digest.to_string();
                version.downloads = v.get::<u64>(&key(b'W', &[&repo, &digest]))?.unwrap_or(0);
            }
            Ok(out)
        })
        .await
    }

    async fn collect_garbage(&self, dry_run: bool) -> Result<GcReport> {
        let Some(c) = self.collector.get().and_then(std::sync::Weak::upgrade) else {
            return Err(RegistryError::new(ErrorCode::Unsupported, "no garbage collector runs on this node"));
        };
        // Its own task: a caller that stops waiting does not stop the run half way.
        tokio::spawn(async move { c.collect(dry_run).await }).await.map_err(internal)?
    }

    async fn register_storage(&self, node: StorageNode) -> Result<()> {
        self.write(Command::RegisterStorage { node, now_ms: now_ms() }).await.map(|_| ())
    }

    async fn placement(&self) -> Result<PlacementMap> {
        self.read(|v| Ok(v.get(b"g")?.unwrap_or_default())).await
    }

    async fn change_storage(&self, change: StorageChange) -> Result<bool> {
        Ok(self.write(Command::ChangeStorage { change, now_ms: now_ms() }).await? == Outcome::Existed(true))
    }

    async fn note_short_copies(&self, digests: Vec<Digest>) -> Result<()> {
        self.write(Command::NoteShortCopies { digests }).await.map(|_| ())
    }

    async fn short_copies(&self, after: Option<&Digest>, n: usize) -> Result<Vec<Digest>> {
        let after = after.map(|d| d.to_string());
        let names = self.read(move |v| Ok(names(v.scan(b"r", after.as_deref().map(str::as_bytes), n)?))).await?;
        names.into_iter().map(|s| s.parse().map_err(internal)).collect()
    }

    async fn copies_repaired(&self, digest: &Digest) -> Result<()> {
        self.write(Command::CopiesRepaired { digest: digest.clone() }).await.map(|_| ())
    }

    async fn change_directory(&self, change: DirectoryChange) -> Result<bool> {
        // Deletions and restores are timed by this node (it leads), and judged against its
        // retention period.
        let now = now_ms();
        let window_ms = self.retention().as_millis() as u64;
        let change = match change {
            DirectoryChange::DeleteVersion { repo, digest, .. } => {
                DirectoryChange::DeleteVersion { repo, digest, now_ms: now }
            }
            DirectoryChange::RestoreVersion { repo, digest, .. } => {
                DirectoryChange::RestoreVersion { repo, digest, window_ms, now_ms: now }
            }
            DirectoryChange::DeletePackage { repo, .. } => DirectoryChange::DeletePackage { repo, now_ms: now },
            DirectoryChange::RestorePackage { repo, .. } => {
                DirectoryChange::RestorePackage { repo, window_ms, now_ms: now }
            }
            other => other,
        };
        Ok(self.write(Command::Directory(change)).await? == Outcome::Existed(true))
    }

    async fn signing_keys(&self) -> Result<Vec<PublicSigningKey>> {
        self.read(|v| {
            v.scan(b"J", None, usize::MAX)?.into_iter().map(|(_, k)| Ok(serde_json::from_slice(&k)?)).collect()
        })
        .await
    }

    async fn key_generation(&self) -> Result<u64> {
        self.read(|v| Ok(v.get(b"G")?.unwrap_or(0))).await
    }

    async fn has_legacy_signing_key(&self) -> Result<bool> {
        self.read(|v| Ok(v.raw(b"A")?.is_some())).await
    }

    async fn user(&self, name: &str) -> Result<Option<User>> {
        let name = name.to_string();
        self.read(move |v| v.user(&name)).await
    }

    async fn users(&self) -> Result<Vec<User>> {
        self.read(|v| {
            v.scan(b"U", None, usize::MAX)?.into_iter().map(|(_, u)| Ok(serde_json::from_slice(&u)?)).collect()
        })
        .await
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let k = key(b'K', &[id]);
        self.read(move |v| v.get(&k)).await
    }

    async fn tokens_of(&self, user: &str) -> Result<Vec<TokenRecord>> {
        let user = user.to_string();
        self.read(move |v| {
            let mut out = vec![];
            for (id, _) in v.scan(&key(b'k', &[&user, ""]), None, usize::MAX)? {
                if let Some(t) = v.get(&key(b'K', &[&String::from_utf8_lossy(&id)]))? {
                    out.push(t);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn org_members(&self, org: &str) -> Result<Option<BTreeMap<String, OrgRole>>> {
        let org = org.to_string();
        self.read(move |v| {
            if v.raw(&key(b'O', &[&org]))?.is_none() {
                return Ok(None);
            }
            let mut out = BTreeMap::new();
            for (user, role) in v.scan(&key(b'M', &[&org, ""]), None, usize::MAX)? {
                out.insert(String::from_utf8_lossy(&user).into_owned(), serde_json::from_slice(&role)?);
            }
            Ok(Some(out))
        })
        .await
    }

    async fn source_repo(&self, org: &str, name: &str) -> Result<Option<SourceRepo>> {
        let k = key(b'S', &[org, name]);
        self.read(move |v| v.get(&k)).await
    }

    async fn access_facts(&self, who: &Identity, repo: &str) -> Result<AccessFacts> {
        let (who, repo) = (who.clone(), repo.to_string());
        self.read(move |v| {
            let owner = owner_of(&repo);
            let mut facts = AccessFacts { owner_is_org: v.raw(&key(b'O', &[owner]))?.is_some(), ..Default::default() };
            if let (Identity::User { name, .. }, true) = (&who, facts.owner_is_org) {
                facts.org_role = v.get::<OrgRole>(&key(b'M', &[owner, name]))?;
                for (rest, _) in v.scan(&key(b'N', &[owner, ""]), None, usize::MAX)? {
                    let rest = String::from_utf8_lossy(&rest).into_owned();
                    if let Some((team, member)) = rest.split_once('\0') {
                        if member == name {
                            facts.teams.insert(team.to_string());
                        }
                    }
                }
            }
            facts.package = v.get::<Package>(&key(b'P', &[&repo]))?;
            if let Some(source) = facts.package.as_ref().and_then(|p| p.source.clone()) {
                if let Some((org, name)) = source.split_once('/') {
                    facts.source = v.get(&key(b'S', &[org, name]))?;
                }
            }
            Ok(facts)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
