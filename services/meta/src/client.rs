//! A [`MetaStore`] over gRPC: the metadata group as frontends and storage nodes see it.
//!
//! The client knows the metadata nodes' addresses and remembers which one leads. Every call
//! goes to the leader. A node that does not lead answers NotLeader, naming the leader when it
//! knows it, and the client follows. With no leader known, or a node out of reach, it tries
//! the next node after a short backoff, for a bounded time, then answers 503.
//!
//! A node that turned a call away unsent (no connection could be made, or it refused the call
//! unprocessed, as a node shutting down does) is passed over for a moment ([`DOWN_FOR`]):
//! calls do not go to it, nor follow a NotLeader that names it (a follower names the old
//! leader until it hears of an election), and the calls waiting on it try another node at
//! once: every read, and every write whose message has not left (see [`Unsent`]). A channel
//! makes one connection attempt for each call waiting on it, one after another, so before this
//! the calls waiting on a node that vanished (the address of a killed container times out)
//! waited a connect timeout each in turn, and a follower sent them back to wait again: under
//! a pull load, a read begun as the leader was killed ran out its 5 s.
//!
//! Retries never apply a write twice. A write is retried only when it certainly never reached a
//! leader: NotLeader, or no connection was made. A write that timed out, or whose connection
//! broke mid-call, may or may not have been applied; it is answered 503 and the caller
//! decides. Reads are retried after any transport failure.
//!
//! The hot calls of pushes and pulls go out in batches: concurrent reads share one ReadBatch
//! call, concurrent writes one WriteBatch call, each answered on its own. A batch of writes is
//! retried, or not, as one write is.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use berth_core::access::{AccessFacts, Identity, OrgRole, SourceRepo};
use berth_core::error::Result;
use berth_core::store::{
    DirectoryChange, GcReport, PackageSummary, PackageVersion, PlacementMap, PublicSigningKey, Pusher, StorageChange,
    StorageNode, TokenRecord, User,
};
use berth_core::trace;
use berth_core::{Digest, ErrorCode, ManifestRecord, MetaStore, RegistryError, Stored, UploadSession};
use berth_proto::conn::{Conn, Unsent};
use berth_proto::meta as pb;
use berth_proto::meta::meta_client::MetaClient as MetaGrpc;
use berth_proto::status::never_sent;
use prost::Message as _;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Response, Status};

use crate::wire::{count, from_all, from_opt, not_leader_of, registry_error_of, required, to_all, Wire, MAX_MESSAGE};

/// How long `berth admin gc` may run before its call gives up waiting (the run goes on).
const GC_RUN_TIMEOUT: Duration = Duration::from_secs(3600);

/// First pause before trying another node: about one Raft heartbeat, so a retry after a lost
/// leader usually finds the new one.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Longest pause between attempts. An election takes 0.5–1 s, and a call that began as the
/// leader died tries again at 0.05, 0.15, 0.35, 0.55, 0.75, 0.95… s, so it reaches a new
/// leader at most this long after it serves. At 400 ms the tries fell at 0.35, 0.75 and
/// 1.15 s, and a new leader ready just after 0.75 s waited for the third: 1.18–1.22 s from a
/// leader kill to the first acknowledged tag write through a frontend, 0.77–0.99 s at 200 ms.
/// A try costs a refused connection or a NotLeader answer.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The client's time limits.
#[derive(Debug, Clone)]
pub struct MetaClientConfig {
    /// How long one call may take, retries included, before it fails with 503.
    pub retry_for: Duration,
    /// How long one attempt waits for its answer.
    pub request_timeout: Duration,
    /// How long connecting to a node may take.
    pub connect_timeout: Duration,
}

impl Default for MetaClientConfig {
    /// Five seconds for a call covers a leader election with room to spare; half a second to
    /// connect is generous on a LAN and short enough to move on from a dead node.
    fn default() -> Self {
        MetaClientConfig {
            retry_for: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MetaClientError {
    /// The list of metadata nodes was empty.
    #[error("no metadata node addresses given")]
    NoNodes,
    /// An address is not a `host:port` a channel can dial.
    #[error("bad metadata node address {addr:?}: {source}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
}

/// How long a node that turned a call away unsent is passed over. Long enough for an
/// election among the others (0.5–1 s) to name the new leader; short enough that a node that
/// restarted is tried again soon. While every node is passed over, calls try them anyway.
const DOWN_FOR: Duration = Duration::from_secs(1);

/// Where the next call goes.
#[derive(Debug, Default)]
struct Route {
    /// The node believed to lead.
    leader: Option<String>,
    /// Index into the node list of the next node to try when no leader is known.
    next: usize,
    /// Nodes passed over ([`Calls::mark_down`]), each with the time until which it is.
    down: HashMap<String, Instant>,
}

impl Route {
    fn is_down(&self, addr: &str, now: Instant) -> bool {
        !self.down.is_empty() && self.down.get(addr).is_some_and(|until| now < *until)
    }
}

/// A [`MetaStore`] that calls the metadata group's leader over gRPC.
pub struct MetaClient(Arc<Calls>);

/// What a client's calls share: the nodes, the route to the leader, the channels and the
/// batches being gathered. Held in an `Arc` so that a batch is sent by a task of its own.
struct Calls {
    nodes: Vec<String>,
    config: MetaClientConfig,
    route: Mutex<Route>,
    /// Counts the marks of nodes as down ([`Calls::mark_down`]): every call watches it while
    /// it waits for an answer, to give up on a node another call found out of reach.
    downs: tokio::sync::watch::Sender<u64>,
    /// One lazily connected channel per address (the leader may name a node not in `nodes`).
    channels: Mutex<HashMap<String, Conn>>,
    /// Hot reads waiting to go out together ([`Calls::batched`]).
    reads: Mutex<Queue<Reads>>,
    /// Hot writes waiting to go out together.
    writes: Mutex<Queue<Writes>>,
}

/// Calls that go out together, several in one round trip ([`Calls::batched`]).
trait Batched: Sized + Send + 'static {
    /// What one call asks.
    type Ask: prost::Message + Send + 'static;
    /// One result of a batch's reply, as it travels.
    type Result: Send;
    /// What one call is answered.
    type Answer: Send + 'static;
    /// The calls of this kind waiting to go out.
    fn queue(calls: &Calls) -> &Mutex<Queue<Self>>;
    /// Sends `asks` as one call: the results, one per call in order.
    fn call(calls: &Calls, asks: Vec<Self::Ask>) -> impl Future<Output = Result<Vec<Self::Result>>> + Send;
    /// A caller's answer, from its result.
    fn answer(result: Self::Result) -> Result<Self::Answer>;
}

/// Where a call's answer goes.
type AnswerTo<B> = oneshot::Sender<Result<<B as Batched>::Answer>>;

/// A call waiting for a batch: what it asks, where its answer goes, and the ids of the
/// request it serves.
struct Waiting<B: Batched> {
    ask: B::Ask,
    to: AnswerTo<B>,
    ids: Option<trace::RequestIds>,
}

/// Calls taken together, and the ids of a request they serve (a traced one if any), for the
/// trace of the call that sends them.
struct Batch<B: Batched> {
    asks: Vec<B::Ask>,
    answers: Vec<AnswerTo<B>>,
    ids: Option<trace::RequestIds>,
}

/// Calls waiting for a batch, and how many batches are under way.
struct Queue<B: Batched> {
    waiting: Vec<Waiting<B>>,
    in_flight: usize,
}

impl<B: Batched> Default for Queue<B> {
    fn default() -> Self {
        Queue { waiting: vec![], in_flight: 0 }
    }
}

impl<B: Batched> Queue<B> {
    /// The next batch: the longest-waiting calls, at most [`BATCH_MAX`] of them and
    /// [`BATCH_BYTES`] encoded (a call larger than that goes alone), leaving out calls whose
    /// callers have given up (never sent, so dropping them is safe for writes too).
    fn next_batch(&mut self) -> Batch<B> {
        self.waiting.retain(|w| !w.to.is_closed());
        let (mut n, mut bytes) = (0, 0);
        while let Some(w) = self.waiting.get(n) {
            bytes += w.ask.encoded_len();
            if n == BATCH_MAX || (n > 0 && bytes > BATCH_BYTES) {
                break;
            }
            n += 1;
        }
        let mut batch = Batch { asks: Vec::with_capacity(n), answers: Vec::with_capacity(n), ids: None };
        for w in self.waiting.drain(..n) {
            if batch.ids.as_ref().is_none_or(|ids| !ids.sampled) {
                batch.ids = w.ids.or(batch.ids);
            }
            batch.asks.push(w.ask);
            batch.answers.push(w.to);
        }
        batch
    }
}

/// The hot reads: answered by the leader's state, repeatable.
struct Reads;

/// One answer of a read batch.
type ReadAnswer = pb::read_result::Result;

/// The hot writes: each committed or refused on its own; a batch whose answer was lost is
/// not sent again (see [`Kind::Write`]).
struct Writes;

/// Batches of each kind under way at once: more calls than this many round trips' worth wait
/// and go out together. Two keep a frontend's calls flowing while one batch is answered, and
/// make the batches under load large: on the 3/3/2 cluster, manifest-get served 8,658 and
/// 8,601 requests/s with two read batches against 6,728 and 6,588 with eight, and pull-images
/// 322 against 301 images/s; the leader answers fewer, larger calls.
const BATCHES_IN_FLIGHT: usize = 2;

/// Calls in one batch at most.
const BATCH_MAX: usize = 128;

/// Encoded bytes of the calls in one batch at most (a call larger than this goes alone): far
/// below [`MAX_MESSAGE`], so that a few large manifests put at once never make a batch that
/// the leader refuses whole.
const BATCH_BYTES: usize = 1 << 20;

/// A batch slot, held by the task sending batches. It gives the slot back itself when no call
/// is waiting; should it panic instead, the slot is given back when dropped, and the calls
/// waiting then are failed (their callers, and those of the batch it was sending, are told
/// so; later calls start batches again).
struct Slot<B: Batched> {
    calls: Arc<Calls>,
    held: bool,
    kind: std::marker::PhantomData<B>,
}

impl<B: Batched> Drop for Slot<B> {
    fn drop(&mut self) {
        if self.held {
            let mut queue = lock(B::queue(&self.calls));
            queue.in_flight -= 1;
            let stranded: Vec<_> = queue.waiting.drain(..).map(|w| w.to).collect();
            drop(queue);
            fail_all(stranded, RegistryError::internal("a batch of metadata calls failed to be sent"));
        }
    }
}

/// A batched call the leader refused, as the registry error it carries.
fn refused(e: pb::ReadError) -> RegistryError {
    berth_proto::status::error_from_fields(&e.code, e.status, e.detail)
}

impl Batched for Reads {
    type Ask = pb::Read;
    type Result = pb::ReadResult;
    type Answer = ReadAnswer;

    fn queue(calls: &Calls) -> &Mutex<Queue<Self>> {
        &calls.reads
    }

    async fn call(calls: &Calls, reads: Vec<pb::Read>) -> Result<Vec<pb::ReadResult>> {
        let reply = calls.read(pb::ReadBatchRequest { reads }, |mut c, r| async move { c.read_batch(r).await });
        Ok(reply.await?.results)
    }

    fn answer(result: pb::ReadResult) -> Result<ReadAnswer> {
        match result.result {
            Some(pb::read_result::Result::Error(e)) => Err(refused(e)),
            Some(answer) => Ok(answer),
            None => Err(RegistryError::internal("the metadata service sent an empty read result")),
        }
    }
}

impl Batched for Writes {
    type Ask = pb::Write;
    type Result = pb::WriteResult;
    type Answer = ();

    fn queue(calls: &Calls) -> &Mutex<Queue<Self>> {
        &calls.writes
    }

    async fn call(calls: &Calls, writes: Vec<pb::Write>) -> Result<Vec<pb::WriteResult>> {
        let reply = calls.write(pb::WriteBatchRequest { writes }, |mut c, r| async move { c.write_batch(r).await });
        Ok(reply.await?.results)
    }

    fn answer(result: pb::WriteResult) -> Result<()> {
        result.error.map_or(Ok(()), |e| Err(refused(e)))
    }
}

/// Whether a call may be repeated after a failure that may have reached the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Repeating it changes nothing.
    Read,
    /// Repeating it might apply it twice.
    Write,
}

/// What a failed attempt means for the call.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The node does not lead; it named the leader, or knows none.
    NotLeader(Option<String>),
    /// The request never reached the node's service: no connection could be made, or the
    /// node refused it unprocessed ([`never_sent`]).
    Unsent,
    /// The call was given up unanswered: a read, or a write whose message never left
    /// ([`Calls::unless_given_up`]).
    GaveUp,
    /// The request may have reached the node and the answer was lost.
    Lost,
    /// An answer: the call is over.
    Final(RegistryError),
}

/// Locks a mutex whose data stays consistent even if a holder panicked (each update is one
/// assignment), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often an idle or waiting connection to a metadata node is pinged: a node that vanished
/// without closing its connections (killed with its host, cut off the network) is given up
/// within [`KEEPALIVE`] + [`PING_TIMEOUT`], and the call that was waiting on it goes to
/// another node, instead of waiting out its whole timeout (the 5 s a call may retry for).
const KEEPALIVE: Duration = Duration::from_secs(1);

/// How long a ping may go unanswered. Pings are answered by the peer's connection task, not by
/// its request handlers, so a node busy with a slow fsync still answers them.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoint of a metadata node.
fn endpoint(addr: &str) -> std::result::Result<Endpoint, tonic::transport::Error> {
    Ok(berth_proto::tls::endpoint(addr)?
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// What a failed attempt means.
fn classify(status: &Status) -> Failure {
    if let Some(e) = registry_error_of(status) {
        return Failure::Final(e);
    }
    if let Some(n) = not_leader_of(status) {
        return Failure::NotLeader(n.leader);
    }
    if never_sent(status) {
        return Failure::Unsent;
    }
    match status.code() {
        // tonic reports its own timeouts as CANCELLED, a broken connection as UNAVAILABLE or
        // UNKNOWN.
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => Failure::Lost,
        // INVALID_ARGUMENT, UNIMPLEMENTED and the like: the two sides disagree on the contract.
        _ => Failure::Final(RegistryError::internal(format!("metadata service: {status}"))),
    }
}

/// A batch answered a read with an answer of another kind.
fn mismatched() -> RegistryError {
    RegistryError::internal("the metadata service answered a read with a result of another kind")
}

/// The answer when the metadata group cannot be reached in time.
fn unavailable(detail: impl std::fmt::Display) -> RegistryError {
    RegistryError::new(ErrorCode::Unknown, format!("metadata service unavailable: {detail}")).with_status(503)
}

impl MetaClient {
    /// A client of the metadata nodes at `nodes` (`host:port` each). Connects on first use.
    pub fn new(nodes: Vec<String>, config: MetaClientConfig) -> std::result::Result<MetaClient, MetaClientError> {
        if nodes.is_empty() {
            return Err(MetaClientError::NoNodes);
        }
        for addr in &nodes {
            endpoint(addr).map_err(|source| MetaClientError::Address { addr: addr.clone(), source })?;
        }
        Ok(MetaClient(Arc::new(Calls {
            nodes,
            config,
            route: Mutex::default(),
            downs: tokio::sync::watch::Sender::new(0),
            channels: Mutex::default(),
            reads: Mutex::default(),
            writes: Mutex::default(),
        })))
    }

    /// Asks `read` of the leader in a batch ([`Calls::batched`]).
    async fn batched_read(&self, read: pb::read::Read) -> Result<ReadAnswer> {
        Calls::batched::<Reads>(&self.0, pb::Read { read: Some(read) }).await
    }

    /// Sends `write` to the leader in a batch ([`Calls::batched`]).
    async fn batched_write(&self, write: pb::write::Write) -> Result<()> {
        Calls::batched::<Writes>(&self.0, pb::Write { write: Some(write) }).await
    }
}

/// Hands every caller of a batch the same failure.
fn fail_all<A>(answers: Vec<oneshot::Sender<Result<A>>>, e: RegistryError) {
    for to in answers {
        // A caller that gave up waiting is gone; nothing to tell it.
        to.send(Err(e.clone())).ok();
    }
}

impl Calls {
    /// Sends `ask` to the leader together with whatever other calls of its kind are waiting.
    /// While fewer than [`BATCHES_IN_FLIGHT`] batches are under way, the call starts a task
    /// that sends it (and any that join meanwhile) at once; otherwise it waits, and the next
    /// batch to end takes it along with every other call waiting, as one batch. Under load,
    /// many calls share one round trip and one leadership check; alone, a call goes out at
    /// once, by itself. The batch is sent by a task of its own, so a caller that gives up (its
    /// request dropped) takes no other caller's answer with it.
    async fn batched<B: Batched>(self: &Arc<Self>, ask: B::Ask) -> Result<B::Answer> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut queue = lock(B::queue(self));
            queue.waiting.push(Waiting { ask, to: tx, ids: trace::current() });
            if queue.in_flight < BATCHES_IN_FLIGHT {
                queue.in_flight += 1;
                Some(queue.next_batch())
            } else {
                None
            }
        };
        if let Some(batch) = start {
            let slot = Slot { calls: self.clone(), held: true, kind: std::marker::PhantomData };
            tokio::spawn(Self::send_batches::<B>(slot, batch));
        }
        rx.await.unwrap_or_else(|_| Err(RegistryError::internal("a batch of metadata calls was dropped unanswered")))
    }

    /// Sends `batch`, then the calls that have gathered meanwhile, until none are waiting;
    /// then gives its slot back.
    async fn send_batches<B: Batched>(mut slot: Slot<B>, mut batch: Batch<B>) {
        loop {
            slot.calls.send_batch(batch).await;
            let mut queue = lock(B::queue(&slot.calls));
            batch = queue.next_batch();
            if batch.asks.is_empty() {
                // Given back under the same lock that saw no call waiting: a call that queues
                // after it finds the slot free and starts a batch itself.
                queue.in_flight -= 1;
                drop(queue);
                slot.held = false;
                return;
            }
        }
    }

    /// Sends `batch` as one call, inside the trace of a request it serves, and hands each
    /// caller its answer.
    async fn send_batch<B: Batched>(&self, batch: Batch<B>) {
        let Batch { asks, answers, ids } = batch;
        let asked = asks.len();
        let call = B::call(self, asks);
        let reply = match ids {
            Some(ids) => trace::scope(ids, call).await,
            None => call.await,
        };
        match reply {
            Ok(results) if results.len() == asked => {
                for (to, result) in answers.into_iter().zip(results) {
                    // A caller that gave up waiting is gone; nothing to tell it.
                    to.send(B::answer(result)).ok();
                }
            }
            Ok(results) => {
                let e = format!("{asked} batched calls answered with {} results", results.len());
                fail_all(answers, RegistryError::internal(e));
            }
            Err(e) => fail_all(answers, e),
        }
    }

    /// The node the next call should try first: the leader, else the next node in the
    /// rotation, passing over nodes marked down unless all are.
    fn target(&self) -> String {
        let route = lock(&self.route);
        let now = Instant::now();
        if let Some(leader) = route.leader.as_ref().filter(|l| !route.is_down(l, now)) {
            return leader.clone();
        }
        let n = self.nodes.len();
        let mut rotation = (0..n).map(|i| &self.nodes[route.next.wrapping_add(i) % n]);
        let first = &self.nodes[route.next % n];
        rotation.find(|addr| !route.is_down(addr, now)).unwrap_or(first).clone()
    }

    /// Remembers a leader: a node that answered, or one a follower named.
    fn follow(&self, leader: &str) {
        let mut route = lock(&self.route);
        if route.leader.as_deref() != Some(leader) {
            route.leader = Some(leader.to_string());
        }
    }

    /// Remembers a node that answered as the leader, and that it is reachable.
    fn answered(&self, addr: &str) {
        let mut route = lock(&self.route);
        if route.leader.as_deref() != Some(addr) {
            route.leader = Some(addr.to_string());
        }
        if !route.down.is_empty() {
            route.down.remove(addr);
        }
    }

    /// Whether `addr` is passed over for now.
    fn is_down(&self, addr: &str) -> bool {
        lock(&self.route).is_down(addr, Instant::now())
    }

    /// Passes over `addr` for [`DOWN_FOR`], tells the calls waiting on it, and forgets its
    /// channel: a connection attempt the channel still makes for calls that gave up would
    /// answer the next call with its stale failure. A node already marked keeps its mark: only
    /// a failure after the mark ends marks it again.
    fn mark_down(&self, addr: &str) {
        let now = Instant::now();
        {
            let mut route = lock(&self.route);
            if route.is_down(addr, now) {
                return;
            }
            route.down.retain(|_, until| now < *until);
            route.down.insert(addr.to_string(), now + DOWN_FOR);
        }
        lock(&self.channels).remove(addr);
        self.downs.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits for `attempt`, a call to `target`, unless it may be given up unanswered: when
    /// `target` is marked down (`downs` changes and it is down), or when `deadline` passes. A
    /// read may be given up (asking it again changes nothing), and so may a write whose message
    /// has not left, `unsent` says (its body will refuse to hand it out). `None` when given up.
    async fn unless_given_up<A>(
        &self,
        kind: Kind,
        target: &str,
        downs: &mut tokio::sync::watch::Receiver<u64>,
        deadline: Instant,
        unsent: &Unsent,
        attempt: impl Future<Output = std::result::Result<A, Status>>,
    ) -> Option<std::result::Result<A, Status>> {
        let may_give_up = || kind == Kind::Read || unsent.give_up();
        let expired = tokio::time::sleep_until(deadline);
        tokio::pin!(attempt, expired);
        let mut past_deadline = false;
        loop {
            tokio::select! {
                biased;
                reply = &mut attempt => return Some(reply),
                Ok(()) = downs.changed() => {
                    if self.is_down(target) && may_give_up() {
                        return None;
                    }
                }
                () = &mut expired, if !past_deadline => {
                    past_deadline = true;
                    if may_give_up() {
                        return None;
                    }
                }
            }
        }
    }

    /// Gives up on `addr` for now: it is no longer the leader, and the rotation moves past it
    /// (only once, however many calls saw it fail together).
    fn pass(&self, addr: &str) {
        let mut route = lock(&self.route);
        if route.leader.as_deref() == Some(addr) {
            route.leader = None;
        }
        if self.nodes[route.next % self.nodes.len()] == addr {
            route.next = route.next.wrapping_add(1);
        }
    }

    /// The channel to `addr`, made on first use.
    fn channel(&self, addr: &str) -> std::result::Result<Conn, tonic::transport::Error> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = berth_proto::conn::lazy(&endpoint(addr)?, self.config.connect_timeout);
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Sends `msg` with `rpc` to the leader, following NotLeader answers and trying other nodes
    /// as [`Kind`] allows, until an answer or `retry_for` has passed.
    async fn call<Q, A, F, Fut>(&self, kind: Kind, msg: Q, rpc: F) -> Result<A>
    where
        Q: Clone + Send,
        F: Fn(MetaGrpc<Conn>, Request<Q>) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<Response<A>, Status>> + Send,
    {
        let deadline = Instant::now() + self.config.retry_for;
        let mut backoff = FIRST_BACKOFF;
        let mut downs = self.downs.subscribe();
        let mut target = self.target();
        let mut redirected = false;
        loop {
            // Marks seen from here on are those made after the target was checked.
            downs.borrow_and_update();
            if self.is_down(&target) {
                target = self.target();
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (failure, detail) = match self.channel(&target) {
                Ok(channel) => {
                    let unsent = Unsent::default();
                    let mut request = Request::new(msg.clone());
                    request.set_timeout(self.config.request_timeout.min(remaining));
                    request.extensions_mut().insert(unsent.clone());
                    berth_proto::carry(&mut request);
                    let client = MetaGrpc::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE);
                    let attempt = rpc(client, request);
                    match self.unless_given_up(kind, &target, &mut downs, deadline, &unsent, attempt).await {
                        Some(Ok(reply)) => {
                            self.answered(&target);
                            return Ok(reply.into_inner());
                        }
                        Some(Err(status)) => (classify(&status), status.to_string()),
                        None => (Failure::GaveUp, format!("gave up waiting for {target}")),
                    }
                }
                // Only a leader's name can be undialable (the node list was checked).
                Err(e) => (Failure::Unsent, format!("cannot dial {target:?}: {e}")),
            };
            let pause = match failure {
                Failure::Final(e) => return Err(e),
                Failure::Lost if kind == Kind::Write => {
                    return Err(unavailable(format!("a write to {target} may or may not have been applied: {detail}")));
                }
                Failure::NotLeader(Some(leader)) if leader != target && !self.is_down(&leader) => {
                    self.follow(&leader);
                    target = leader;
                    // Follow a fresh redirect at once; two in a row mean the nodes disagree
                    // (an election is under way), so pause like any other retry.
                    std::mem::replace(&mut redirected, true)
                }
                failure => {
                    tracing::debug!(node = %target, ?failure, %detail, "metadata call failed; trying another node");
                    if failure == Failure::Unsent {
                        self.mark_down(&target);
                    }
                    self.pass(&target);
                    target = self.target();
                    redirected = false;
                    true
                }
            };
            if pause {
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            if Instant::now() >= deadline {
                let waited = self.config.retry_for;
                return Err(unavailable(format!("no leader answered within {waited:?}; last failure: {detail}")));
            }
        }
    }

    /// A query: retried on any transport failure.
    async fn read<Q, A, F, Fut>(&self, msg: Q, rpc: F) -> Result<A>
    where
        Q: Clone + Send,
        F: Fn(MetaGrpc<Conn>, Request<Q>) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<Response<A>, Status>> + Send,
    {
        self.call(Kind::Read, msg, rpc).await
    }

    /// A command: retried only when it certainly reached no leader. A timeout or a connection
    /// broken mid-call is answered 503 although the write may have been applied.
    async fn write<Q, A, F, Fut>(&self, msg: Q, rpc: F) -> Result<A>
    where
        Q: Clone + Send,
        F: Fn(MetaGrpc<Conn>, Request<Q>) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<Response<A>, Status>> + Send,
    {
        self.call(Kind::Write, msg, rpc).await
    }
}

#[async_trait]
impl MetaStore for MetaClient {
    async fn link_blob(&self, repo: &str, digest: &Digest, blob: Stored) -> Result<()> {
        let msg = pb::LinkBlobRequest { repo: repo.into(), digest: digest.to_string(), blob: Some(blob.to_proto()) };
        self.batched_write(pb::write::Write::LinkBlob(msg)).await
    }

    async fn blob_link(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let msg = pb::BlobLinkRequest { repo: repo.into(), digest: digest.to_string() };
        match self.batched_read(pb::read::Read::BlobLink(msg)).await? {
            ReadAnswer::BlobLink(r) => Ok(r.size),
            _ => Err(mismatched()),
        }
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let msg = pb::UnlinkBlobRequest { repo: repo.into(), digest: digest.to_string() };
        Ok(self.0.write(msg, |mut c, r| async move { c.unlink_blob(r).await }).await?.existed)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        record: ManifestRecord,
        tags: Vec<String>,
        bytes: Stored,
        pusher: Option<Pusher>,
    ) -> Result<()> {
        let msg = pb::PutManifestRequest {
            repo: repo.into(),
            record: Some(record.to_proto()),
            tags,
            bytes: Some(bytes.to_proto()),
            pusher: pusher.map(Wire::to_proto),
        };
        self.batched_write(pb::write::Write::PutManifest(msg)).await
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let msg = pb::ManifestRequest { repo: repo.into(), digest: digest.to_string() };
        match self.batched_read(pb::read::Read::Manifest(msg)).await? {
            ReadAnswer::Manifest(r) => Ok(from_opt(r.record)?),
            _ => Err(mismatched()),
        }
    }

    async fn tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        let msg = pb::TagRequest { repo: repo.into(), tag: tag.into() };
        Ok(from_opt(self.0.read(msg, |mut c, r| async move { c.tag(r).await }).await?.digest)?)
    }

    async fn tagged_manifest(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>> {
        let msg = pb::TagRequest { repo: repo.into(), tag: tag.into() };
        match self.batched_read(pb::read::Read::TaggedManifest(msg)).await? {
            ReadAnswer::Manifest(r) => Ok(from_opt(r.record)?),
            _ => Err(mismatched()),
        }
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let msg = pb::DeleteManifestRequest { repo: repo.into(), digest: digest.to_string() };
        Ok(self.0.write(msg, |mut c, r| async move { c.delete_manifest(r).await }).await?.existed)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let msg = pb::DeleteTagRequest { repo: repo.into(), tag: tag.into() };
        Ok(self.0.write(msg, |mut c, r| async move { c.delete_tag(r).await }).await?.existed)
    }

    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Option<Vec<String>>> {
        let msg = pb::TagsRequest { repo: repo.into(), last: last.map(str::to_string), n: n as u64 };
        Ok(self.0.read(msg, |mut c, r| async move { c.tags(r).await }).await?.list.map(|l| l.tags))
    }

    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let msg = pb::RepositoriesRequest { last: last.map(str::to_string), n: n as u64 };
        Ok(self.0.read(msg, |mut c, r| async move { c.repositories(r).await }).await?.names)
    }

    async fn public_repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let msg = pb::PublicRepositoriesRequest { last: last.map(str::to_string), n: n as u64 };
        Ok(self.0.read(msg, |mut c, r| async move { c.public_repositories(r).await }).await?.names)
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&Digest>,
        n: usize,
    ) -> Result<Vec<ManifestRecord>> {
        let msg = pb::ReferrersRequest {
            repo: repo.into(),
            subject: subject.to_string(),
            after: after.map(Digest::to_string),
            n: n as u64,
        };
        let reply = self.0.read(msg, |mut c, r| async move { c.referrers(r).await }).await?;
        Ok(from_all::<ManifestRecord, _>(reply.records)?)
    }

    async fn repo_exists(&self, repo: &str) -> Result<bool> {
        let msg = pb::RepoExistsRequest { repo: repo.into() };
        Ok(self.0.read(msg, |mut c, r| async move { c.repo_exists(r).await }).await?.exists)
    }

    async fn create_upload(&self, session: UploadSession, at_most: usize, pusher: Option<Pusher>) -> Result<()> {
        let msg = pb::CreateUploadRequest {
            session: Some(session.to_proto()),
            at_most: at_most as u64,
            pusher: pusher.map(Wire::to_proto),
        };
        self.batched_write(pb::write::Write::CreateUpload(msg)).await
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadSession>> {
        let msg = pb::UploadRequest { id: id.into() };
        match self.batched_read(pb::read::Read::Upload(msg)).await? {
            ReadAnswer::Upload(r) => Ok(from_opt(r.session)?),
            _ => Err(mismatched()),
        }
    }

    async fn uploads(&self, after: Option<&str>, n: usize) -> Result<Vec<UploadSession>> {
        let msg = pb::UploadsRequest { after: after.map(str::to_string), n: n as u64 };
        let reply = self.0.read(msg, |mut c, r| async move { c.uploads(r).await }).await?;
        Ok(from_all::<UploadSession, _>(reply.sessions)?)
    }

    async fn uploads_of(&self, caller: &str, at_most: usize) -> Result<usize> {
        let msg = pb::UploadsOfRequest { caller: caller.into(), at_most: at_most as u64 };
        Ok(count(self.0.read(msg, |mut c, r| async move { c.uploads_of(r).await }).await?.count))
    }

    async fn end_upload(&self, id: &str, link: Option<(Digest, Stored)>) -> Result<()> {
        let msg = pb::EndUploadRequest { id: id.into(), link: link.map(Wire::to_proto) };
        self.batched_write(pb::write::Write::EndUpload(msg)).await
    }

    async fn packages_of(&self, owner: &str) -> Result<Vec<PackageSummary>> {
        let msg = pb::PackagesOfRequest { owner: owner.into() };
        let reply = self.0.read(msg, |mut c, r| async move { c.packages_of(r).await }).await?;
        Ok(from_all(reply.packages)?)
    }

    async fn package_versions(&self, repo: &str) -> Result<Vec<PackageVersion>> {
        let msg = pb::PackageVersionsRequest { repo: repo.into() };
        let reply = self.0.read(msg, |mut c, r| async move { c.package_versions(r).await }).await?;
        Ok(from_all(reply.versions)?)
    }

    async fn collect_garbage(&self, dry_run: bool) -> Result<GcReport> {
        let msg = pb::CollectGarbageRequest { dry_run };
        let r = self
            .0
            .write(msg, |mut c, mut r| async move {
                // A run deletes until nothing collectable is left: far longer than any other call.
                r.set_timeout(GC_RUN_TIMEOUT);
                c.collect_garbage(r).await
            })
            .await?;
        Ok(GcReport::from_proto(r)?)
    }

    async fn register_storage(&self, node: StorageNode) -> Result<()> {
        let msg = pb::RegisterStorageRequest { node: Some(node.to_proto()) };
        self.0.write(msg, |mut c, r| async move { c.register_storage(r).await }).await.map(|_| ())
    }

    async fn placement(&self) -> Result<PlacementMap> {
        let reply = self.0.read(pb::PlacementRequest {}, |mut c, r| async move { c.placement(r).await }).await?;
        Ok(PlacementMap::from_proto(reply)?)
    }

    async fn change_storage(&self, change: StorageChange) -> Result<bool> {
        let msg = change.to_proto();
        let reply = self.0.write(msg, |mut c, r| async move { c.change_storage(r).await }).await?;
        Ok(reply.changed)
    }

    async fn note_short_copies(&self, digests: Vec<Digest>) -> Result<()> {
        let msg = pb::NoteShortCopiesRequest { digests: to_all(digests) };
        self.0.write(msg, |mut c, r| async move { c.note_short_copies(r).await }).await.map(|_| ())
    }

    async fn short_copies(&self, after: Option<&Digest>, n: usize) -> Result<Vec<Digest>> {
        let msg = pb::ShortCopiesRequest { after: after.map(Digest::to_string), n: n as u64 };
        let reply = self.0.read(msg, |mut c, r| async move { c.short_copies(r).await }).await?;
        Ok(from_all::<Digest, _>(reply.digests)?)
    }

    async fn copies_repaired(&self, digest: &Digest) -> Result<()> {
        let msg = pb::CopiesRepairedRequest { digest: digest.to_string() };
        self.0.write(msg, |mut c, r| async move { c.copies_repaired(r).await }).await.map(|_| ())
    }

    async fn change_directory(&self, change: DirectoryChange) -> Result<bool> {
        let msg = pb::ChangeDirectoryRequest { change: Some(change.to_proto()) };
        Ok(self.0.write(msg, |mut c, r| async move { c.change_directory(r).await }).await?.changed)
    }

    async fn signing_keys(&self) -> Result<Vec<PublicSigningKey>> {
        let reply = self.0.read(pb::SigningKeysRequest {}, |mut c, r| async move { c.signing_keys(r).await }).await?;
        Ok(from_all::<PublicSigningKey, _>(reply.keys)?)
    }

    async fn key_generation(&self) -> Result<u64> {
        let msg = pb::KeyGenerationRequest {};
        Ok(self.0.read(msg, |mut c, r| async move { c.key_generation(r).await }).await?.generation)
    }

    async fn has_legacy_signing_key(&self) -> Result<bool> {
        let msg = pb::HasLegacySigningKeyRequest {};
        Ok(self.0.read(msg, |mut c, r| async move { c.has_legacy_signing_key(r).await }).await?.present)
    }

    async fn user(&self, name: &str) -> Result<Option<User>> {
        let msg = pb::UserRequest { name: name.into() };
        match self.batched_read(pb::read::Read::User(msg)).await? {
            ReadAnswer::User(r) => Ok(from_opt(r.user)?),
            _ => Err(mismatched()),
        }
    }

    async fn users(&self) -> Result<Vec<User>> {
        let reply = self.0.read(pb::UsersRequest {}, |mut c, r| async move { c.users(r).await }).await?;
        Ok(from_all::<User, _>(reply.users)?)
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let msg = pb::TokenRequest { id: id.into() };
        match self.batched_read(pb::read::Read::Token(msg)).await? {
            ReadAnswer::Token(r) => Ok(from_opt(r.token)?),
            _ => Err(mismatched()),
        }
    }

    async fn tokens_of(&self, user: &str) -> Result<Vec<TokenRecord>> {
        let msg = pb::TokensOfRequest { user: user.into() };
        let reply = self.0.read(msg, |mut c, r| async move { c.tokens_of(r).await }).await?;
        Ok(from_all::<TokenRecord, _>(reply.tokens)?)
    }

    async fn org_members(&self, org: &str) -> Result<Option<std::collections::BTreeMap<String, OrgRole>>> {
        let msg = pb::OrgMembersRequest { org: org.into() };
        Ok(from_opt(self.0.read(msg, |mut c, r| async move { c.org_members(r).await }).await?.members)?)
    }

    async fn source_repo(&self, org: &str, name: &str) -> Result<Option<SourceRepo>> {
        let msg = pb::SourceRepoRequest { org: org.into(), name: name.into() };
        Ok(from_opt(self.0.read(msg, |mut c, r| async move { c.source_repo(r).await }).await?.source)?)
    }

    async fn access_facts(&self, who: &Identity, repo: &str) -> Result<AccessFacts> {
        let msg = pb::AccessFactsRequest { who: Some(who.clone().to_proto()), repo: repo.into() };
        match self.batched_read(pb::read::Read::AccessFacts(msg)).await? {
            ReadAnswer::AccessFacts(r) => Ok(AccessFacts::from_proto(required(r.facts, "AccessFactsReply.facts")?)?),
            _ => Err(mismatched()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::NotLeader;
    use crate::wire::{not_leader_status, status_of};

    #[test]
    fn failures_are_classified() {
        let e = RegistryError::new(ErrorCode::ManifestBlobUnknown, "layer sha256:… is not linked");
        assert_eq!(classify(&status_of(e.clone())), Failure::Final(e));
        let redirect = not_leader_status(&NotLeader { leader: Some("10.0.0.2:7001".into()) });
        assert_eq!(classify(&redirect), Failure::NotLeader(Some("10.0.0.2:7001".into())));
        assert_eq!(classify(&not_leader_status(&NotLeader { leader: None })), Failure::NotLeader(None));
        for lost in [Status::cancelled("Timeout expired"), Status::unavailable("connection reset"), Status::unknown("")]
        {
            assert_eq!(classify(&lost), Failure::Lost, "{lost}");
        }
        for broken in [Status::invalid_argument("bad digest"), Status::unimplemented(""), Status::internal("")] {
            match classify(&broken) {
                Failure::Final(e) => assert_eq!((e.code, e.status), (ErrorCode::Unknown, 500)),
                other => panic!("{broken} classified as {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_known_unsent() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let config = MetaClientConfig::default();
        let channel = berth_proto::conn::lazy(&endpoint(&addr.to_string()).unwrap(), config.connect_timeout);
        let status = MetaGrpc::new(channel).key_generation(pb::KeyGenerationRequest {}).await.unwrap_err();
        assert_eq!(classify(&status), Failure::Unsent, "{status:?}");
    }

    #[tokio::test]
    async fn unreachable_nodes_give_503_within_the_budget() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let config = MetaClientConfig { retry_for: Duration::from_millis(300), ..Default::default() };
        let c = MetaClient::new(vec![addr.to_string()], config).unwrap();
        let started = std::time::Instant::now();
        let err = c.key_generation().await.unwrap_err();
        assert_eq!((err.code, err.status), (ErrorCode::Unknown, 503), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    }

    #[test]
    fn batches_are_bounded_in_calls_and_bytes_and_leave_out_callers_gone() {
        let mut q = Queue::<Writes>::default();
        let mut waiting_callers = vec![];
        let mut push = |q: &mut Queue<Writes>, bytes: usize, caller_waits: bool| {
            let (tx, rx) = oneshot::channel();
            if caller_waits {
                waiting_callers.push(rx);
            }
            let r = pb::LinkBlobRequest { repo: "r".repeat(bytes), digest: String::new(), blob: None };
            let ask = pb::Write { write: Some(pb::write::Write::LinkBlob(r)) };
            q.waiting.push(Waiting { ask, to: tx, ids: None });
        };
        // Two that together pass the byte bound, then one past it by itself.
        push(&mut q, 600_000, true);
        push(&mut q, 600_000, true);
        push(&mut q, 2 * BATCH_BYTES, true);
        // 200 small ones, a tenth of them given up by their callers.
        for i in 0..200 {
            push(&mut q, 10, i % 10 != 0);
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| Some(q.next_batch().asks.len()).filter(|n| *n > 0)).collect();
        assert_eq!(sizes, vec![1, 1, 1, BATCH_MAX, 180 - BATCH_MAX]);
    }

    #[test]
    fn bad_node_lists_are_refused() {
        assert!(matches!(MetaClient::new(vec![], MetaClientConfig::default()), Err(MetaClientError::NoNodes)));
        let bad = MetaClient::new(vec!["meta-1:7001".into(), "not an address".into()], MetaClientConfig::default());
        assert!(matches!(bad, Err(MetaClientError::Address { addr, .. }) if addr == "not an address"));
    }

    #[test]
    fn the_rotation_moves_past_a_failed_node_once() {
        let nodes = vec!["a:1".to_string(), "b:1".to_string(), "c:1".to_string()];
        let c = MetaClient::new(nodes, MetaClientConfig::default()).unwrap();
        assert_eq!(c.0.target(), "a:1");
        c.0.pass("a:1");
        c.0.pass("a:1");
        assert_eq!(c.0.target(), "b:1", "two calls that saw a:1 fail move the rotation once");
        c.0.follow("c:1");
        assert_eq!(c.0.target(), "c:1");
        c.0.pass("c:1");
        assert_eq!(c.0.target(), "b:1", "a failed leader is forgotten");
    }
}
