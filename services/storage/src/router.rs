//! A [`BlobStore`] over several storage nodes: each blob on its R owners by rendezvous
//! hashing ([`crate::placement`]), a write acknowledged once W of them have it durably, reads
//! from the first owner that has the blob.
//!
//! A node that failed a call is passed over for a moment ([`DOWN_FOR`]), so that the next node
//! in rendezvous order stands in for it. An upload is staged on the first node up in the
//! ranking of its id, which its session records (the name [`BlobStore::upload_begin`]
//! answers; the id names the node's incarnation when the area is left to open at the upload's
//! first call; a frontend told nothing asks the nodes in that order); finishing it verifies the
//! digest there, and that node copies the blob to the blob's other owners in the same call
//! (node to node; through the router for stores that are not nodes).
//!
//! Copies short of R: a write acknowledged by W ≤ k < R owners, and a read that found an owner
//! without its copy, are recorded in the metadata service ([`Replicated::with_repair_record`])
//! before the write is acknowledged; [`Replicated::repair`] copies such a blob from a node
//! that holds it to every owner lacking it (the receiving node checks the copy as it is
//! written: against the sending node's BLAKE3 of the blob when nodes copy between themselves,
//! see [`BlobStore::put_copy`], else against the digest), and the record is cleared once
//! every owner holds one.
//!
//! Stamps: a write reports the lowest stamp among the copies it wrote, so that if any of them
//! is later taken by the collector, whose reap floor then covers that copy's stamp, a link
//! naming the write is refused; a delete reports the highest stamp it took. Comparing copies
//! of different nodes this way is safe whatever their clocks; skewed clocks can only make a
//! link be refused needlessly (the client pushes again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_core::error::Result;
use berth_core::store::{upload_id, upload_uuid, Begun};
use berth_core::{BlobStore, ByteStream, Deleted, Digest, ErrorCode, MetaStore, RegistryError, Stored};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::placement::{Member, Placement};

/// How long a node that failed a call is passed over.
pub const DOWN_FOR: Duration = Duration::from_secs(2);

/// Chunks of a streamed write buffered per copy: a slow node holds back the others by at
/// most this many chunks, and memory stays bounded.
const TEE_DEPTH: usize = 4;

/// One storage node as the router sees it.
struct Node {
    name: String,
    store: Arc<dyn BlobStore>,
    down_until: Mutex<Option<Instant>>,
}

/// How a blob's copies stand ([`Replicated::audit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Every owner holds a copy.
    Whole,
    /// Some node holds a copy, but not every owner: repair can make it whole.
    Short,
    /// No owner holds one, and some other node did not answer.
    Unanswered,
    /// No node holds a copy.
    Lost,
}

/// Blob bytes spread over storage nodes.
pub struct Replicated {
    nodes: Vec<Node>,
    placement: Placement,
    /// The nodes' gRPC addresses, when they are nodes of a cluster: a node then copies a blob
    /// straight to the others ([`BlobStore::transfer`]).
    addrs: Option<Vec<String>>,
    replicas: usize,
    write_quorum: usize,
    /// Where uploads this frontend has seen are staged.
    staged: Mutex<HashMap<String, usize>>,
    /// Where blobs short of copies are recorded for repair.
    repairs: Option<Arc<dyn MetaStore>>,
    /// When reads last recorded a blob as short of copies.
    noted: Mutex<HashMap<Digest, Instant>>,
}

/// How long after a read recorded a blob as short of copies another read records it again.
const NOTE_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// Blobs whose recording time is remembered; past this the memory starts over.
const NOTED_REMEMBERED: usize = 10_000;

/// A request body lent to the attempts of one call. What the attempts read from it is kept,
/// up to [`REPLAY_LIMIT`] bytes, so that an attempt that never reached the node (the client
/// reads a little ahead while it connects) can be followed by another that sends the body
/// whole: the kept chunks first, then the rest.
struct Lender {
    body: ByteStream,
    kept: Vec<Bytes>,
    kept_bytes: usize,
    /// More was read than can be kept: no attempt can follow.
    overflowed: bool,
}

/// What an attempt reads first may be sent again: a little more than a storage client reads
/// ahead before its connection is up (a few frames).
const REPLAY_LIMIT: usize = 1 << 20;

/// One attempt's view of a [`Lender`]: the kept chunks, then the body.
struct LentBody {
    lender: Arc<Mutex<Lender>>,
    at: usize,
}

impl futures::Stream for LentBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut l = this.lender.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(chunk) = l.kept.get(this.at).cloned() {
            this.at += 1;
            return std::task::Poll::Ready(Some(Ok(chunk)));
        }
        let next = l.body.poll_next_unpin(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &next {
            if !l.overflowed && l.kept_bytes + chunk.len() <= REPLAY_LIMIT {
                l.kept_bytes += chunk.len();
                l.kept.push(chunk.clone());
                this.at += 1;
            } else {
                l.overflowed = true;
                l.kept = Vec::new();
            }
        }
        next
    }
}

/// How long calls about an upload wait for its staging node while it refuses connections:
/// longer than a node takes to restart (a rolling restart, an upgrade), short of the request
/// timeouts clients give up at.
const STAGING_RETURN: Duration = Duration::from_secs(20);

/// Uploads whose staging node is remembered; past this the memory starts over (a forgotten
/// upload is found again by asking the nodes in order).
const STAGED_REMEMBERED: usize = 100_000;

fn unavailable(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::Unknown, detail).with_status(503)
}

/// Whether an error says the node, not the request, is the problem.
fn node_failure(e: &RegistryError) -> bool {
    e.code == ErrorCode::Unknown
}

impl Replicated {
    /// A router over `nodes` (name, store) keeping `replicas` copies of each blob and
    /// acknowledging writes once `write_quorum` of them are durable. With fewer nodes than
    /// `replicas`, every node holds every blob and each write is recorded as short of copies
    /// (repaired once enough nodes exist); with fewer than `write_quorum`, writes are refused.
    pub fn new(
        nodes: Vec<(String, Arc<dyn BlobStore>)>,
        replicas: usize,
        write_quorum: usize,
    ) -> std::result::Result<Replicated, String> {
        if nodes.is_empty() {
            return Err("no storage nodes".into());
        }
        let replicas = replicas.max(1);
        if write_quorum == 0 || write_quorum > replicas {
            return Err(format!("the write quorum must be between 1 and the replica count ({replicas})"));
        }
        let placement = Placement::new(nodes.iter().map(|(n, _)| Member::named(n.clone())).collect());
        let nodes = nodes.into_iter().map(|(name, store)| Node { name, store, down_until: Mutex::new(None) }).collect();
        Ok(Replicated {
            nodes,
            placement,
            addrs: None,
            replicas,
            write_quorum,
            staged: Mutex::new(HashMap::new()),
            repairs: None,
            noted: Mutex::new(HashMap::new()),
        })
    }

    /// Gives the nodes zones and weights (`members`, in the order the nodes were given): a
    /// blob's copies go to different zones while there are enough, and each node owns a share
    /// of blobs equal to its share of the weight ([`Placement`]).
    ///
    /// # Panics
    /// When `members` does not name the nodes in order: the caller built the two lists apart.
    pub fn with_members(mut self, members: Vec<Member>) -> Replicated {
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, nodes, "one member per storage node, in order");
        self.placement = Placement::new(members);
        self
    }

    /// Gives the nodes their gRPC addresses (in the order they were given), so that copies
    /// go from node to node instead of through this router.
    ///
    /// # Panics
    /// When `addrs` does not have one entry per node: the caller built the two lists apart.
    pub fn with_addrs(mut self, addrs: Vec<String>) -> Replicated {
        assert_eq!(addrs.len(), self.nodes.len(), "one address per storage node");
        self.addrs = Some(addrs);
        self
    }

    /// Copies `digest` (of `size` bytes) from node `from` to nodes `to`: straight from node to
    /// node when it can, else through this router. The outcome per target, in order.
    async fn copy(&self, digest: &Digest, size: u64, from: usize, to: &[usize]) -> Vec<(usize, Result<Stored>)> {
        if let Some(addrs) = &self.addrs {
            let targets: Vec<String> = to.iter().map(|i| addrs[*i].clone()).collect();
            match self.nodes[from].store.transfer(digest, size, &targets).await {
                Ok(Some(outcomes)) => return to.iter().copied().zip(outcomes).collect(),
                Ok(None) => {}
                // The source failed, not the targets: no copy was made, and only the source
                // is passed over for a while.
                Err(e) => {
                    tracing::warn!(%digest, node = %self.nodes[from].name, error = %e, "copying a blob from a node");
                    self.mark(from, &Err::<(), _>(e));
                    return vec![];
                }
            }
        }
        let copies = to.iter().map(|&i| async move {
            let r = berth_core::store::copy_blob(&*self.nodes[from].store, &*self.nodes[i].store, digest, size).await;
            (i, r)
        });
        futures::future::join_all(copies).await
    }

    /// The placement order of `digest`: its owners first, then the nodes that stand in.
    fn placement(&self, digest: &Digest) -> Vec<usize> {
        self.placement.placed(digest, self.replicas)
    }

    /// Records blobs short of copies in `meta`, for [`Replicated::repair`]. Without it, a
    /// write with fewer than R copies is refused (503), never acknowledged unrecorded.
    pub fn with_repair_record(mut self, meta: Arc<dyn MetaStore>) -> Replicated {
        self.repairs = Some(meta);
        self
    }

    /// Whether reads should record `digest` as short of copies now: not when this router did
    /// so within [`NOTE_AGAIN_AFTER`] (every read of such a blob would otherwise be a write to
    /// the metadata group until it is repaired).
    fn first_note_in_a_while(&self, digest: &Digest) -> bool {
        let Ok(mut noted) = self.noted.lock() else { return true };
        let now = Instant::now();
        if noted.get(digest).is_some_and(|t| now.duration_since(*t) < NOTE_AGAIN_AFTER) {
            return false;
        }
        if noted.len() >= NOTED_REMEMBERED {
            noted.clear();
        }
        noted.insert(digest.clone(), now);
        true
    }

    /// Records `digest` as short of copies.
    async fn note_short(&self, digest: &Digest) -> Result<()> {
        match &self.repairs {
            Some(meta) => meta.note_short_copies(vec![digest.clone()]).await,
            None => Err(unavailable(format!("{digest} has fewer copies than wanted and nowhere to record it"))),
        }
    }

    /// How many storage nodes this router reaches.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether upload `id` is staged on any of this router's nodes, asked all at once:
    /// `Some(false)` only when every node answered within `wait` that it is not. A node that
    /// did not answer (down, or holding the upload for an append under way) leaves it unknown.
    pub async fn staged_anywhere(&self, id: &str, wait: Duration) -> Option<bool> {
        let asked = self.nodes.iter().map(|n| tokio::time::timeout(wait, n.store.upload_size(id)));
        let answers = futures::future::join_all(asked).await;
        if answers.iter().any(|a| matches!(a, Ok(Ok(Some(_))))) {
            return Some(true);
        }
        answers.iter().all(|a| matches!(a, Ok(Ok(None)))).then_some(false)
    }

    /// How the copies of `digest` stand against its owners: asks its R owners, and when none
    /// has it, every other node.
    pub async fn audit(&self, digest: &Digest) -> Audit {
        let ranking = self.placement(digest);
        let r = self.replicas.min(ranking.len());
        let (owners, others) = ranking.split_at(r);
        let stat = |i: usize| async move {
            let r = self.nodes[i].store.stat(digest).await;
            self.mark(i, &r);
            r
        };
        let mut held = 0;
        let mut unanswered = false;
        for r in futures::future::join_all(owners.iter().map(|&i| stat(i))).await {
            match r {
                Ok(Some(_)) => held += 1,
                Ok(None) => {}
                Err(_) => unanswered = true,
            }
        }
        if held == r && self.nodes.len() >= self.replicas {
            return Audit::Whole;
        }
        if held > 0 {
            return Audit::Short;
        }
        for r in futures::future::join_all(others.iter().map(|&i| stat(i))).await {
            match r {
                Ok(Some(_)) => return Audit::Short,
                Ok(None) => {}
                Err(_) => unanswered = true,
            }
        }
        if unanswered {
            Audit::Unanswered
        } else {
            Audit::Lost
        }
    }

    /// Brings `digest` back to a copy on each of its R owners, copying from any node that has
    /// one. `Ok(true)` once every owner holds a copy; `Ok(false)` when that cannot be done now
    /// (an owner is down, or no node has a copy to copy from).
    pub async fn repair(&self, digest: &Digest) -> Result<bool> {
        if self.nodes.len() < self.replicas {
            // Not enough nodes for R copies yet: keep the record until there are.
            return Ok(false);
        }
        let ranking = self.placement(digest);
        let owners = &ranking[..self.replicas];
        let mut source = None;
        let mut missing = vec![];
        let mut unanswered = false;
        for &i in &ranking {
            if self.is_down(i) {
                if owners.contains(&i) {
                    return Ok(false);
                }
                unanswered = true;
                continue;
            }
            let r = self.nodes[i].store.stat(digest).await;
            self.mark(i, &r);
            match r {
                Ok(Some(s)) => {
                    // Prefer an owner's copy; any will do.
                    if source.is_none() || owners.contains(&i) && !source.is_some_and(|(j, _)| owners.contains(&j)) {
                        source = Some((i, s));
                    }
                }
                Ok(None) if owners.contains(&i) => missing.push(i),
                Ok(None) => {}
                Err(e) if node_failure(&e) && owners.contains(&i) => return Ok(false),
                Err(e) if node_failure(&e) => unanswered = true,
                Err(e) => return Err(e),
            }
        }
        // No copy anywhere: when every node answered, the blob is gone (collected), and there
        // is nothing to do; else the copy may be on a node that did not answer.
        let Some((from, stored)) = source else {
            if !unanswered {
                tracing::warn!(%digest, "no node holds a copy of a blob recorded short of copies; dropping the record");
            }
            return Ok(!unanswered);
        };
        if missing.is_empty() {
            return Ok(true);
        }
        let copies = self.copy(digest, stored.size, from, &missing).await;
        if copies.len() < missing.len() {
            return Ok(false);
        }
        for (i, r) in copies {
            self.mark(i, &r);
            r?;
        }
        Ok(true)
    }

    fn is_down(&self, i: usize) -> bool {
        self.nodes[i].down_until.lock().map(|d| d.is_some_and(|t| t > Instant::now())).unwrap_or(false)
    }

    fn mark(&self, i: usize, result: &Result<impl Sized>) {
        let down = matches!(result, Err(e) if node_failure(e));
        if let Ok(mut d) = self.nodes[i].down_until.lock() {
            *d = down.then(|| Instant::now() + DOWN_FOR);
        }
        if down {
            tracing::warn!(node = %self.nodes[i].name, "storage node failed a call; passing it over for a moment");
        }
    }

    /// Calls upload staging node `i`, and while it refuses connections (it is restarting; an
    /// upload's staged bytes are on its disk alone) calls again, for up to [`STAGING_RETURN`].
    /// Only calls that never reached it are repeated, so any call may be.
    async fn at_staging<T, F, Fut>(&self, i: usize, mut call: F) -> Result<T>
    where
        F: FnMut(Arc<dyn BlobStore>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + STAGING_RETURN;
        let mut pause = Duration::from_millis(100);
        loop {
            let r = call(self.nodes[i].store.clone()).await;
            self.mark(i, &r);
            match &r {
                Err(e) if crate::client::not_reached(e) && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                _ => return r,
            }
        }
    }

    /// Nodes in rendezvous order for `digest`, the ones believed up first.
    fn order(&self, digest: &Digest) -> Vec<usize> {
        let (up, down): (Vec<usize>, Vec<usize>) = self.placement(digest).into_iter().partition(|i| !self.is_down(*i));
        up.into_iter().chain(down).collect()
    }

    /// Nodes in the order an upload is staged on them: the first up one in the ranking of
    /// the UUID its id begins with takes it, so a frontend that was not told where finds it
    /// by asking in order.
    fn upload_order(&self, id: &str) -> Vec<usize> {
        self.placement.ranked(&Digest::sha256_of(upload_uuid(id).as_bytes()))
    }

    fn remember(&self, id: &str, node: Option<usize>) {
        if let Ok(mut m) = self.staged.lock() {
            match node {
                Some(i) => {
                    if m.len() >= STAGED_REMEMBERED {
                        m.clear();
                    }
                    m.insert(id.to_string(), i);
                }
                None => {
                    m.remove(id);
                }
            }
        }
    }

    /// The node upload `id` is staged on: remembered, or the first in its order that has it.
    async fn staging(&self, id: &str) -> usize {
        if let Some(i) = self.staged.lock().ok().and_then(|m| m.get(id).copied()) {
            return i;
        }
        let order = self.upload_order(id);
        for &i in &order {
            let r = self.nodes[i].store.upload_size(id).await;
            self.mark(i, &r);
            if let Ok(Some(_)) = r {
                self.remember(id, Some(i));
                return i;
            }
        }
        order[0]
    }

    /// Asks nodes in order until one has the blob.
    async fn first_found<T, F, Fut>(&self, digest: &Digest, ask: F) -> Result<Option<T>>
    where
        F: FnMut(Arc<dyn BlobStore>) -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        Ok(self.first_found_at(digest, ask).await?.map(|(_, v)| v))
    }

    /// [`Replicated::first_found`], with the stores in order after the one that answered.
    async fn first_found_at<T, F, Fut>(
        &self,
        digest: &Digest,
        mut ask: F,
    ) -> Result<Option<(Vec<Arc<dyn BlobStore>>, T)>>
    where
        F: FnMut(Arc<dyn BlobStore>) -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let order = self.order(digest);
        let mut failure = None;
        let owners: Vec<usize> = self.placement(digest).into_iter().take(self.replicas).collect();
        let mut lacking = false;
        for (at, &i) in order.iter().enumerate() {
            let r = ask(self.nodes[i].store.clone()).await;
            self.mark(i, &r);
            match r {
                Ok(Some(v)) => {
                    if lacking && self.first_note_in_a_while(digest) {
                        // An owner up and without its copy: have it repaired, without holding
                        // up this read.
                        if let Some(meta) = self.repairs.clone() {
                            let d = digest.clone();
                            tokio::spawn(async move { meta.note_short_copies(vec![d]).await });
                        }
                    }
                    let rest = order[at + 1..].iter().map(|j| self.nodes[*j].store.clone()).collect();
                    return Ok(Some((rest, v)));
                }
                Ok(None) => lacking |= owners.contains(&i),
                Err(e) if node_failure(&e) => failure = Some(e),
                Err(e) => return Err(e),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Combines the outcomes of writing copies of `digest`: the lowest stamp once enough are
    /// durable, recorded for repair when fewer than R are.
    async fn settle(&self, digest: &Digest, outcomes: Vec<(usize, Result<Stored>)>) -> Result<Stored> {
        // Copies count towards R only at the blob's owners by placement: a copy on a node
        // standing in for an owner that is down keeps the write durable, and the owner's
        // missing copy is recorded all the same.
        let owners: Vec<usize> = self.placement(digest).into_iter().take(self.replicas).collect();
        let copies = outcomes.iter().filter(|(i, r)| r.is_ok() && owners.contains(i)).count();
        let (stored, _) = self.quorum(outcomes)?;
        if copies < self.replicas {
            tracing::warn!(%digest, copies, replicas = self.replicas, "blob stored with fewer copies than wanted");
            self.note_short(digest).await?;
        }
        Ok(stored)
    }

    /// The lowest stamp and the number of copies written, once enough are durable.
    fn quorum(&self, outcomes: Vec<(usize, Result<Stored>)>) -> Result<(Stored, usize)> {
        let mut stored: Option<Stored> = None;
        let mut acked = 0;
        let mut failure = None;
        for (i, r) in outcomes {
            self.mark(i, &r);
            match r {
                Ok(s) => {
                    acked += 1;
                    stored = Some(match stored {
                        Some(prev) => Stored { size: s.size, stamp: prev.stamp.min(s.stamp) },
                        None => s,
                    });
                }
                // The request itself is refused (a digest mismatch, a size over the limit):
                // every node would say the same.
                Err(e) if !node_failure(&e) => return Err(e),
                Err(e) => failure = Some(e),
            }
        }
        match stored {
            Some(s) if acked >= self.write_quorum => Ok((s, acked)),
            _ => Err(unavailable(format!(
                "{acked} of {} copies written, {} needed: {}",
                self.replicas,
                self.write_quorum,
                failure.map(|e| e.detail).unwrap_or_default()
            ))),
        }
    }

    /// Whether node `from` is one of `digest`'s owners (the first R up in its order), and the
    /// other owners, which a copy made on `from` goes to.
    fn owners_besides(&self, digest: &Digest, from: usize) -> (bool, Vec<usize>) {
        let owners: Vec<usize> = self.order(digest).into_iter().take(self.replicas).collect();
        (owners.contains(&from), owners.into_iter().filter(|i| *i != from).collect())
    }

    /// Settles a write of `digest` whose first copy (`first`) is on node `from` and whose
    /// other copies ended as `copies`. Only owners' copies count towards R; a copy left where
    /// an upload was staged does not.
    async fn settle_from(
        &self,
        digest: &Digest,
        (from, first, from_owns): (usize, Stored, bool),
        copies: Vec<(usize, Result<Stored>)>,
    ) -> Result<Stored> {
        let mut outcomes = if from_owns { vec![(from, Ok(first))] } else { vec![] };
        outcomes.extend(copies);
        self.settle(digest, outcomes).await
    }

    /// Copies a finished upload from the node it was staged on to the blob's other owners.
    async fn replicate(&self, digest: &Digest, from: usize, first: Stored) -> Result<Stored> {
        let (from_owns, others) = self.owners_besides(digest, from);
        let copies = self.copy(digest, first.size, from, &others).await;
        self.settle_from(digest, (from, first, from_owns), copies).await
    }
}

#[async_trait]
impl BlobStore for Replicated {
    async fn stat(&self, digest: &Digest) -> Result<Option<Stored>> {
        self.first_found(digest, |s| async move { s.stat(digest).await }).await
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> Result<ByteStream> {
        let found = self
            .first_found_at(digest, |s| async move {
                match s.read(digest, range).await {
                    Ok(stream) => Ok(Some(stream)),
                    Err(e) if e.code == ErrorCode::BlobUnknown => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let (rest, stream) = found.ok_or_else(|| RegistryError::new(ErrorCode::BlobUnknown, digest.to_string()))?;
        Ok(resuming(stream, digest.clone(), range, rest))
    }

    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>> {
        self.first_found(digest, |s| async move { s.read_small(digest, limit).await }).await
    }

    async fn put_small(&self, digest: &Digest, data: Bytes) -> Result<Stored> {
        let owners: Vec<usize> = self.order(digest).into_iter().take(self.replicas).collect();
        let writes = owners.into_iter().map(|i| {
            let data = data.clone();
            async move { (i, self.nodes[i].store.put_small(digest, data).await) }
        });
        self.settle(digest, futures::future::join_all(writes).await).await
    }

    async fn put(&self, digest: &Digest, body: ByteStream, limit: u64) -> Result<Stored> {
        let owners: Vec<usize> = self.order(digest).into_iter().take(self.replicas).collect();
        // One channel per copy; the body is read once and each chunk handed to every copy.
        let mut senders = vec![];
        let mut writes = vec![];
        for i in owners {
            let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(TEE_DEPTH);
            senders.push(tx);
            let stream: ByteStream =
                futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }).boxed();
            let store = self.nodes[i].store.clone();
            let digest = digest.clone();
            writes.push(tokio::spawn(berth_core::trace::inherit(async move {
                (i, store.put(&digest, stream, limit).await)
            })));
        }
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let failed = chunk.is_err();
            let mut alive = vec![];
            for tx in senders {
                let c = match &chunk {
                    Ok(b) => Ok(b.clone()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                // A copy whose write has ended (failed) no longer takes chunks.
                if tx.send(c).await.is_ok() {
                    alive.push(tx);
                }
            }
            senders = alive;
            if failed || senders.is_empty() {
                break;
            }
        }
        drop(senders);
        let mut outcomes = vec![];
        for w in writes {
            match w.await {
                Ok(o) => outcomes.push(o),
                Err(e) => return Err(RegistryError::internal(e)),
            }
        }
        self.settle(digest, outcomes).await
    }

    async fn upload_start(&self, id: &str) -> Result<Option<String>> {
        let mut failure = unavailable("no storage node is up to stage an upload");
        for i in self.upload_order(id) {
            if self.is_down(i) {
                continue;
            }
            let r = self.nodes[i].store.upload_start(id).await;
            self.mark(i, &r);
            match r {
                Ok(_) => {
                    self.remember(id, Some(i));
                    return Ok(Some(self.nodes[i].name.clone()));
                }
                Err(e) if node_failure(&e) => failure = e,
                Err(e) => return Err(e),
            }
        }
        Err(failure)
    }

    /// Stages the upload on the first node up in the ranking of `uuid`, without a call to the
    /// node when this router has heard its incarnation: the id then names it, and the node
    /// opens the staging area at the upload's first call. Else the node is asked to open it
    /// now ([`BlobStore::upload_start`]).
    async fn upload_begin(&self, uuid: &str) -> Result<Begun> {
        let first_up = self.upload_order(uuid).into_iter().find(|i| !self.is_down(*i));
        if let Some(i) = first_up {
            if let Some(incarnation) = self.nodes[i].store.incarnation() {
                let id = upload_id(uuid, incarnation);
                self.remember(&id, Some(i));
                return Ok(Begun { id, node: Some(self.nodes[i].name.clone()) });
            }
        }
        Ok(Begun { id: uuid.to_string(), node: self.upload_start(uuid).await? })
    }

    fn readiness(&self) -> std::result::Result<(), String> {
        let up = (0..self.nodes.len()).filter(|i| !self.is_down(*i)).count();
        if up >= self.write_quorum {
            Ok(())
        } else {
            Err(format!("{up} of {} storage nodes answer; writes need {}", self.nodes.len(), self.write_quorum))
        }
    }

    fn upload_staged_at(&self, id: &str, node: &str) {
        // A node no longer in the map is left to the search by asking.
        if let Some(i) = self.nodes.iter().position(|n| n.name == node) {
            self.remember(id, Some(i));
        }
    }

    async fn upload_append(&self, id: &str, offset: Option<u64>, body: ByteStream, limit: u64) -> Result<u64> {
        let i = self.staging(id).await;
        // The body is lent to each attempt: one that never reached the node (it is restarting)
        // is followed by another that sends it whole, unless more was read than can be sent
        // again: then its failure is no longer one that is safe to repeat.
        let lender = Arc::new(Mutex::new(Lender { body, kept: vec![], kept_bytes: 0, overflowed: false }));
        self.at_staging(i, |n| {
            let lender = lender.clone();
            async move {
                let lent = LentBody { lender: lender.clone(), at: 0 };
                let r = n.upload_append(id, offset, Box::pin(lent), limit).await;
                let overflowed = lender.lock().map(|l| l.overflowed).unwrap_or(true);
                r.map_err(|mut e| {
                    e.unsent &= !overflowed;
                    e
                })
            }
        })
        .await
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>> {
        let i = self.staging(id).await;
        self.at_staging(i, |n| async move { n.upload_size(id).await }).await
    }

    async fn upload_finish(&self, id: &str, digest: &Digest) -> Result<Stored> {
        let i = self.staging(id).await;
        // The staging node finishes and copies to the other owners in one call when it can.
        if let Some(addrs) = &self.addrs {
            let (i_owns, others) = self.owners_besides(digest, i);
            let targets: Vec<String> = others.iter().map(|o| addrs[*o].clone()).collect();
            let r = self
                .at_staging(i, |n| {
                    let targets = targets.clone();
                    async move { n.upload_finish_copying(id, digest, &targets).await }
                })
                .await;
            self.remember(id, None);
            match r {
                Ok(Some((first, Some(copies)))) => {
                    let copies = others.into_iter().zip(copies).collect();
                    return self.settle_from(digest, (i, first, i_owns), copies).await;
                }
                Ok(Some((first, None))) => return self.replicate(digest, i, first).await,
                Ok(None) => {}
                Err(e) => {
                    // The call failed, but the node may have finished the upload before: then
                    // the blob is there and is copied as after any finish.
                    if node_failure(&e) {
                        if let Ok(Some(first)) = self.nodes[i].store.stat(digest).await {
                            self.mark(i, &Ok::<(), RegistryError>(()));
                            return self.replicate(digest, i, first).await;
                        }
                    }
                    return Err(e);
                }
            }
        }
        let r = self.at_staging(i, |n| async move { n.upload_finish(id, digest).await }).await;
        self.remember(id, None);
        self.replicate(digest, i, r?).await
    }

    async fn upload_cancel(&self, id: &str) -> Result<()> {
        let i = self.staging(id).await;
        let r = self.at_staging(i, |n| async move { n.upload_cancel(id).await }).await;
        self.remember(id, None);
        r
    }

    async fn expire_uploads(&self, idle: Duration) -> Result<Vec<String>> {
        let mut out = vec![];
        for n in &self.nodes {
            out.extend(n.store.expire_uploads(idle).await?);
        }
        Ok(out)
    }

    /// Deletes on every node, all at once. A node that fails is counted `unreached` (its copy
    /// stays); only when every node fails is the deletion an error.
    async fn delete(&self, digest: &Digest, upto: Option<u64>) -> Result<Deleted> {
        let each = self.nodes.iter().enumerate().map(|(i, n)| async move {
            let r = n.store.delete(digest, upto).await;
            self.mark(i, &r);
            r
        });
        let mut done = Deleted::default();
        let mut failure = None;
        for r in futures::future::join_all(each).await {
            match r {
                Ok(d) => done = done.and(d),
                Err(e) => {
                    done.unreached += 1;
                    failure = Some(e);
                }
            }
        }
        match failure {
            Some(e) if done.unreached as usize == self.nodes.len() => Err(e),
            _ => Ok(done),
        }
    }

    /// The inventories of the nodes that answer, merged; an error only when none answers.
    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>> {
        let mut all: Vec<(Digest, u64)> = vec![];
        let mut failure = None;
        for (i, node) in self.nodes.iter().enumerate() {
            let r = node.store.list(after, n).await;
            self.mark(i, &r);
            match r {
                Ok(page) => all.extend(page),
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "listing a storage node's blobs");
                    failure = Some(e);
                }
            }
        }
        if let (Some(e), true) = (failure, all.is_empty()) {
            return Err(e);
        }
        all.sort();
        // One entry per blob, with its lowest stamp (as a write would report it).
        all.dedup_by(|b, a| a.0 == b.0);
        all.truncate(n);
        Ok(all)
    }
}

/// A read that, when its node fails mid-stream, goes on from the next store in `rest` at the
/// offset reached, so the reader sees one unbroken body. Only when no store can go on does the
/// stream end with the first failure.
fn resuming(first: ByteStream, digest: Digest, range: Option<(u64, u64)>, rest: Vec<Arc<dyn BlobStore>>) -> ByteStream {
    struct Resume {
        current: ByteStream,
        digest: Digest,
        /// The next byte to send, and the last one wanted (`None`: to the end).
        next: u64,
        last: Option<u64>,
        rest: std::collections::VecDeque<Arc<dyn BlobStore>>,
    }
    let start = Resume {
        current: first,
        digest,
        next: range.map_or(0, |(f, _)| f),
        last: range.map(|(_, l)| l),
        rest: rest.into(),
    };
    futures::stream::unfold(Some(start), |state| async move {
        let mut s = state?;
        let mut failure: Option<std::io::Error> = None;
        loop {
            match s.current.next().await {
                Some(Ok(chunk)) => {
                    s.next += chunk.len() as u64;
                    return Some((Ok(chunk), Some(s)));
                }
                None => return None,
                Some(Err(e)) => {
                    if s.last.is_some_and(|l| s.next > l) {
                        // Every byte wanted was sent; only the stream's end went wrong.
                        return None;
                    }
                    tracing::warn!(digest = %s.digest, offset = s.next, error = %e, "a read failed mid-stream");
                    let first = failure.get_or_insert(e);
                    let mut switched = false;
                    while let Some(store) = s.rest.pop_front() {
                        let last = match s.last {
                            Some(l) => l,
                            None => match store.stat(&s.digest).await {
                                Ok(Some(b)) if b.size > s.next => b.size - 1,
                                // Nothing is left to send.
                                Ok(Some(_)) => return None,
                                _ => continue,
                            },
                        };
                        if let Ok(stream) = store.read(&s.digest, Some((s.next, last))).await {
                            s.current = stream;
                            switched = true;
                            break;
                        }
                    }
                    if !switched {
                        let e = std::io::Error::new(first.kind(), first.to_string());
                        return Some((Err(e), None));
                    }
                }
            }
        }
    })
    .boxed()
}

/// The router of the current placement map: replaced as a whole when the map changes (a node
/// joins, moves or changes zone), each call going to the router current when it starts. Until
/// the first map arrives, every call answers 503.
#[derive(Default)]
pub struct CurrentRouter {
    current: std::sync::RwLock<Option<(u64, Arc<Replicated>)>>,
}

impl CurrentRouter {
    /// Makes `router` current, for placement map `version`.
    pub fn set(&self, version: u64, router: Replicated) {
        if let Ok(mut c) = self.current.write() {
            *c = Some((version, Arc::new(router)));
        }
    }

    /// The version of the current placement map, if there is one.
    pub fn version(&self) -> Option<u64> {
        self.current.read().ok().and_then(|c| c.as_ref().map(|(v, _)| *v))
    }

    /// The current router.
    pub fn get(&self) -> Result<Arc<Replicated>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, r)| r.clone()))
            .ok_or_else(|| unavailable("no storage node has registered yet"))
    }
}

#[async_trait]
impl BlobStore for CurrentRouter {
    async fn stat(&self, digest: &Digest) -> Result<Option<Stored>> {
        self.get()?.stat(digest).await
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> Result<ByteStream> {
        self.get()?.read(digest, range).await
    }

    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>> {
        self.get()?.read_small(digest, limit).await
    }

    async fn put_small(&self, digest: &Digest, data: Bytes) -> Result<Stored> {
        self.get()?.put_small(digest, data).await
    }

    async fn put(&self, digest: &Digest, body: ByteStream, limit: u64) -> Result<Stored> {
        self.get()?.put(digest, body, limit).await
    }

    async fn upload_start(&self, id: &str) -> Result<Option<String>> {
        self.get()?.upload_start(id).await
    }

    fn readiness(&self) -> std::result::Result<(), String> {
        self.get().map_err(|e| e.detail)?.readiness()
    }

    async fn upload_begin(&self, uuid: &str) -> Result<Begun> {
        self.get()?.upload_begin(uuid).await
    }

    fn upload_staged_at(&self, id: &str, node: &str) {
        if let Ok(r) = self.get() {
            r.upload_staged_at(id, node);
        }
    }

    async fn upload_append(&self, id: &str, offset: Option<u64>, body: ByteStream, limit: u64) -> Result<u64> {
        self.get()?.upload_append(id, offset, body, limit).await
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>> {
        self.get()?.upload_size(id).await
    }

    async fn upload_finish(&self, id: &str, digest: &Digest) -> Result<Stored> {
        self.get()?.upload_finish(id, digest).await
    }

    async fn upload_cancel(&self, id: &str) -> Result<()> {
        self.get()?.upload_cancel(id).await
    }

    async fn expire_uploads(&self, idle: Duration) -> Result<Vec<String>> {
        self.get()?.expire_uploads(idle).await
    }

    async fn delete(&self, digest: &Digest, upto: Option<u64>) -> Result<Deleted> {
        self.get()?.delete(digest, upto).await
    }

    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>> {
        self.get()?.list(after, n).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StorageConfig, StorageEngine};

    /// Storage nodes as the router takes them: a name and a store.
    type Nodes = Vec<(String, Arc<dyn BlobStore>)>;

    fn engines(n: usize) -> (Vec<tempfile::TempDir>, Nodes) {
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let nodes = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
                (format!("node{i}"), Arc::new(e) as Arc<dyn BlobStore>)
            })
            .collect();
        (dirs, nodes)
    }

    fn body(data: &[u8]) -> ByteStream {
        let chunks: Vec<std::io::Result<Bytes>> = data.chunks(100_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures::stream::iter(chunks).boxed()
    }

    #[tokio::test]
    async fn writes_reach_r_nodes_and_reads_find_them() {
        let (_dirs, nodes) = engines(4);
        let stores: Vec<Arc<dyn BlobStore>> = nodes.iter().map(|(_, s)| s.clone()).collect();
        let r = Replicated::new(nodes, 3, 2).unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::sha256_of(&data);
        let stored = r.put(&d, body(&data), u64::MAX).await.unwrap();
        assert_eq!(stored.size, 700_000);
        let mut copies = 0;
        for s in &stores {
            if let Some(c) = s.stat(&d).await.unwrap() {
                copies += 1;
                assert!(c.stamp >= stored.stamp, "the reported stamp is the lowest of the copies");
            }
        }
        assert_eq!(copies, 3);
        let mut got = vec![];
        let mut s = r.read(&d, None).await.unwrap();
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, data);
        // An upload staged on one node ends with R copies too.
        let small = Bytes::from_static(b"a small blob");
        let sd = Digest::sha256_of(&small);
        r.upload_start("u-1").await.unwrap();
        r.upload_append("u-1", Some(0), body(&small), u64::MAX).await.unwrap();
        r.upload_finish("u-1", &sd).await.unwrap();
        let mut copies = 0;
        for s in &stores {
            copies += usize::from(s.stat(&sd).await.unwrap().is_some());
        }
        assert_eq!(copies, 3);
        // A wrong digest is refused as such, not as a node failure.
        let wrong = Digest::sha256_of(b"other");
        let e = r.put(&wrong, body(&data), u64::MAX).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        assert_eq!(r.delete(&d, None).await.unwrap().copies, 3);
        assert!(r.stat(&d).await.unwrap().is_none());
    }

    /// A store whose reads, while `broken`, fail after `after` bytes.
    struct Flaky {
        inner: Arc<dyn BlobStore>,
        after: usize,
        broken: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl BlobStore for Flaky {
        async fn stat(&self, d: &Digest) -> Result<Option<Stored>> {
            self.inner.stat(d).await
        }
        async fn read(&self, d: &Digest, range: Option<(u64, u64)>) -> Result<ByteStream> {
            let inner = self.inner.read(d, range).await?;
            if !self.broken.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(inner);
            }
            let cut = futures::stream::unfold((inner, self.after, false), |(mut inner, left, over)| async move {
                if over {
                    return None;
                }
                if left == 0 {
                    return Some((Err(std::io::Error::other("the disk went away")), (inner, 0, true)));
                }
                match inner.next().await {
                    Some(Ok(c)) => {
                        let n = c.len().min(left);
                        Some((Ok(c.slice(..n)), (inner, left - n, false)))
                    }
                    Some(Err(e)) => Some((Err(e), (inner, left, true))),
                    None => None,
                }
            })
            .boxed();
            Ok(cut)
        }
        async fn read_small(&self, d: &Digest, limit: u64) -> Result<Option<Bytes>> {
            self.inner.read_small(d, limit).await
        }
        async fn put_small(&self, d: &Digest, data: Bytes) -> Result<Stored> {
            self.inner.put_small(d, data).await
        }
        async fn put(&self, d: &Digest, body: ByteStream, limit: u64) -> Result<Stored> {
            self.inner.put(d, body, limit).await
        }
        async fn upload_start(&self, id: &str) -> Result<Option<String>> {
            self.inner.upload_start(id).await
        }
        async fn upload_append(&self, id: &str, offset: Option<u64>, body: ByteStream, limit: u64) -> Result<u64> {
            self.inner.upload_append(id, offset, body, limit).await
        }
        async fn upload_size(&self, id: &str) -> Result<Option<u64>> {
            self.inner.upload_size(id).await
        }
        async fn upload_finish(&self, id: &str, d: &Digest) -> Result<Stored> {
            self.inner.upload_finish(id, d).await
        }
        async fn upload_cancel(&self, id: &str) -> Result<()> {
            self.inner.upload_cancel(id).await
        }
        async fn expire_uploads(&self, idle: Duration) -> Result<Vec<String>> {
            self.inner.expire_uploads(idle).await
        }
        async fn delete(&self, d: &Digest, upto: Option<u64>) -> Result<Deleted> {
            self.inner.delete(d, upto).await
        }
        async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>> {
            self.inner.list(after, n).await
        }
    }

    async fn collect(mut s: ByteStream) -> std::io::Result<Vec<u8>> {
        let mut out = vec![];
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_read_that_breaks_mid_stream_goes_on_from_another_copy() {
        use std::sync::atomic::Ordering;
        let (_dirs, nodes) = engines(3);
        let names: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
        let flaky: Vec<Arc<Flaky>> = nodes
            .into_iter()
            .map(|(_, inner)| Arc::new(Flaky { inner, after: 400_000, broken: false.into() }))
            .collect();
        let stores: Nodes = names.iter().cloned().zip(flaky.iter().map(|f| f.clone() as Arc<dyn BlobStore>)).collect();
        let r = Replicated::new(stores, 3, 2).unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let d = Digest::sha256_of(&data);
        r.put(&d, body(&data), u64::MAX).await.unwrap();
        // The node a read goes to first breaks 400 kB in; the reader notices nothing.
        let first = Placement::of_names(&names).placed(&d, 3)[0];
        flaky[first].broken.store(true, Ordering::Relaxed);
        let got = collect(r.read(&d, None).await.unwrap()).await;
        let got = got.map(|g| (g.len(), g.iter().zip(&data).position(|(a, b)| a != b)));
        assert_eq!(got.unwrap(), (data.len(), None));
        assert!(collect(r.read(&d, Some((100_000, 899_999))).await.unwrap()).await.unwrap() == data[100_000..900_000]);
        // Every copy breaks (each 400 kB further on than the last): the body still arrives whole.
        for f in &flaky {
            f.broken.store(true, Ordering::Relaxed);
        }
        assert!(collect(r.read(&d, None).await.unwrap()).await.unwrap() == data);
        // Breaking before the end on every copy: the stream ends in an error, never short.
        let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let bd = Digest::sha256_of(&big);
        for f in &flaky {
            f.broken.store(false, Ordering::Relaxed);
        }
        r.put(&bd, body(&big), u64::MAX).await.unwrap();
        for f in &flaky {
            f.broken.store(true, Ordering::Relaxed);
        }
        assert!(collect(r.read(&bd, None).await.unwrap()).await.is_err());
    }

    #[tokio::test]
    async fn reads_record_a_short_blob_once_in_a_while() {
        let (_dirs, nodes) = engines(3);
        let r = Replicated::new(nodes, 3, 2).unwrap();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        assert!(r.first_note_in_a_while(&a));
        assert!(!r.first_note_in_a_while(&a), "noted again at once");
        assert!(r.first_note_in_a_while(&b));
    }

    /// A copy that fails while the staging node finishes an upload is blamed on its target:
    /// the target is passed over, the staging node is not, and the copies that were made stay.
    #[tokio::test]
    async fn a_copy_that_fails_while_finishing_is_blamed_on_its_target() {
        use crate::client::{StorageClient, StorageClientConfig};
        use tonic::transport::server::TcpIncoming;

        let (_dirs, engines) = engines(2);
        let mut nodes: Nodes = vec![];
        let mut addrs = vec![];
        for (name, engine) in &engines {
            let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = incoming.local_addr().unwrap().to_string();
            let svc = crate::server::storage_server(engine.clone());
            tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
            nodes.push((name.clone(), Arc::new(StorageClient::new(&addr, StorageClientConfig::default()).unwrap())));
            addrs.push(addr);
        }
        // A third node whose port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        nodes.push(("node2".into(), Arc::new(StorageClient::new(&closed, StorageClientConfig::default()).unwrap())));
        addrs.push(closed);
        let r = Replicated::new(nodes, 3, 2).unwrap().with_addrs(addrs);
        // An upload staged on a live node, so that the dead one is only a copy's target.
        let id = (0..100)
            .map(|n| format!("0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d{n:02}"))
            .find(|id| r.upload_order(id)[0] != 2)
            .unwrap();
        let data = vec![5u8; 2000];
        let d = Digest::sha256_of(&data);
        r.upload_start(&id).await.unwrap();
        let staging = r.upload_order(&id)[0];
        r.upload_append(&id, Some(0), body(&data), u64::MAX).await.unwrap();
        // Two copies are durable, the third failed; with nowhere to record it, the push is
        // refused rather than acknowledged short.
        let e = r.upload_finish(&id, &d).await.unwrap_err();
        assert_eq!(e.status, 503, "{e:?}");
        assert!(r.is_down(2), "the target that failed is passed over");
        assert!(!r.is_down(staging), "the staging node is not blamed for its target");
        for (name, engine) in &engines {
            assert_eq!(engine.stat(&d).await.unwrap().map(|s| s.size), Some(2000), "copy on {name}");
        }
    }

    /// An upload's staging node that refuses connections (restarting) is waited for: the
    /// chunk sent meanwhile arrives whole once it is back, and the upload finishes.
    #[tokio::test]
    async fn an_upload_waits_for_its_staging_node_to_come_back() {
        use crate::client::{StorageClient, StorageClientConfig};
        use tonic::transport::server::TcpIncoming;

        let (_dirs, engines) = engines(1);
        let (name, engine) = engines[0].clone();
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let client = StorageClient::new(&addr.to_string(), StorageClientConfig::default()).unwrap();
        let r = Replicated::new(vec![(name.clone(), Arc::new(client))], 1, 1).unwrap();
        let id = "0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d00";
        engine.upload_start(id).await.unwrap();
        r.upload_staged_at(id, &name);
        let serving = engine.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let incoming = TcpIncoming::bind(addr).unwrap();
            let svc = crate::server::storage_server(serving);
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await
        });
        let data = vec![7u8; 300_000];
        let d = Digest::sha256_of(&data);
        let started = Instant::now();
        assert_eq!(r.upload_append(id, Some(0), body(&data), u64::MAX).await.unwrap(), 300_000);
        assert!(started.elapsed() >= Duration::from_millis(500), "the node was down for the first attempts");
        assert_eq!(r.upload_finish(id, &d).await.unwrap().size, 300_000);
        assert_eq!(engine.stat(&d).await.unwrap().map(|s| s.size), Some(300_000));
    }
}
