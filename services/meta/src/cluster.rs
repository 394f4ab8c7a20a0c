//! The metadata group as a cluster: its membership, the leadership gate in front of the Meta
//! service, and the `Cluster` gRPC service that `berth admin cluster` talks to.
//!
//! Reads and writes are answered by the leader only, and only while it knows that it leads,
//! so a tag read through any frontend sees every write acknowledged before it.
//!
//! **How a leader knows: a lease, else a heartbeat round.** Every 100 ms the leader runs a
//! confirmation round (openraft's read-index: heartbeats sent after the round is asked for,
//! answered by a quorum). A follower that answered refuses to vote for anyone until
//! `election_timeout_max` (400 ms) after it *received* its heartbeat, so no other leader can
//! be elected, and no write acknowledged elsewhere, until 400 ms after the moment the round
//! was asked for. The gate answers without asking anyone while less than [`READ_LEASE`] (250 ms)
//! has passed since that moment, on a node that still leads in the same term; the round also
//! waited until the state applied an entry of this term (so it holds everything committed by
//! earlier leaders; the leader's own writes are applied before they are acknowledged). Past
//! the lease (the followers are slow or cut off) every read waits for a round of its own.
//!
//! The clock assumption: each node's monotonic clock runs at a rate within a third of every
//! other's (400 ms on a follower is more than 250 ms on the leader). Clocks need not agree
//! on the time; only elapsed durations are compared, each on one machine. A leader cut off
//! from its majority answers for at most the rest of its lease, then nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_proto::cluster as pb;
use berth_proto::cluster::cluster_server::{Cluster, ClusterServer};
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::raft::NodeId;
use crate::server::{Leadership, NotLeader};
use crate::wire::not_leader_status;
use crate::MetaService;

/// How long a leadership check may wait for a quorum's answer before the caller is told to
/// retry elsewhere: a few heartbeat rounds.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after the send time of a heartbeat that a quorum acknowledged the leader
/// answers reads without a new round (see the module's documentation).
pub const READ_LEASE: Duration = Duration::from_millis(250);

/// How long adding a member may take: catching up as a learner, then two membership entries.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A membership change that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Another node leads (or none does yet); ask it.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// The request itself is wrong (e.g. an empty membership, an unknown node).
    #[error("{0}")]
    Invalid(String),
    /// Raft failed or took too long.
    #[error("{0}")]
    Failed(String),
}

impl MetaService {
    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The leader as this node knows it: its id and gRPC address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// This node's view of the group, for metrics.
    pub fn raft_figures(&self) -> RaftFigures {
        let m = self.raft.metrics().borrow().clone();
        // The leader knows what each voter holds: the highest index a majority holds.
        let committed = m.replication.as_ref().map(|matched| {
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let mut held: Vec<u64> =
                voters.iter().map(|id| matched.get(id).copied().flatten().map_or(0, |l| l.index)).collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            held.get(voters.len() / 2).copied().unwrap_or(0)
        });
        RaftFigures {
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            leading: m.state == ServerState::Leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            committed_index: committed,
        }
    }

    fn not_leader(&self) -> NotLeader {
        NotLeader { leader: self.leader().filter(|(id, _)| *id != self.node_id).map(|(_, a)| a) }
    }

    /// Makes `members` (id → gRPC address) the group's first voters. Asked of one of them,
    /// once; asking again with the same members changes nothing.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), ClusterError> {
        if !members.contains_key(&self.node_id) {
            return Err(ClusterError::Invalid(format!("node {} must be one of the first members", self.node_id)));
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members.into_iter().map(|(id, a)| (id, BasicNode::new(a))).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Failed(e.to_string())),
        }
    }

    fn change_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ClusterError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ClusterError::NotLeader(self.not_leader()),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => ClusterError::Invalid(c.to_string()),
            other => ClusterError::Failed(other.to_string()),
        }
    }

    /// Adds node `id` at `addr`: first as a learner, which receives the log (or a snapshot)
    /// without voting, and once it has caught up, as a voter. On the leader only.
    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<(), ClusterError> {
        let work = async {
            self.raft.add_learner(id, BasicNode::new(addr), true).await.map_err(|e| self.change_error(e))?;
            let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            self.raft.change_membership(voters, false).await.map_err(|e| self.change_error(e))?;
            Ok(())
        };
        tokio::time::timeout(CHANGE_TIMEOUT, work)
            .await
            .map_err(|_| ClusterError::Failed(format!("adding node {id} took longer than {CHANGE_TIMEOUT:?}")))?
    }

    /// Removes node `id` from the group, voter or learner. On the leader only.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.voter_ids().any(|v| v == id) {
            let change = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
            self.raft.change_membership(change, false).await.map_err(|e| self.change_error(e))?;
        } else if membership.learner_ids().any(|l| l == id) {
            let change = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
            self.raft.change_membership(change, false).await.map_err(|e| self.change_error(e))?;
        } else {
            return Err(ClusterError::Invalid(format!("node {id} is not a member")));
        }
        Ok(())
    }

    /// Confirms that this node leads and that its state has applied every write committed
    /// before the call (a quorum answered a heartbeat of this term).
    pub async fn ensure_leader(&self) -> Result<(), NotLeader> {
        match tokio::time::timeout(CHECK_TIMEOUT, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(NotLeader { leader: f.leader_node.map(|n| n.addr) })
            }
            // No quorum answered, or the node is stopping: this node cannot answer.
            Ok(Err(_)) | Err(_) => Err(self.not_leader()),
        }
    }

    /// This node's view of the group.
    pub fn status(&self) -> pb::NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let member =
            |id: NodeId| pb::Member { id, addr: membership.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default() };
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        pb::NodeStatus {
            id: self.node_id,
            addr: membership.get_node(&self.node_id).map(|n| n.addr.clone()).unwrap_or_default(),
            state: state.into(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            voters: membership.voter_ids().map(member).collect(),
            learners: membership.learner_ids().map(member).collect(),
            replicated: m
                .replication
                .map(|r| r.into_iter().filter_map(|(id, l)| l.map(|l| (id, l.index))).collect())
                .unwrap_or_default(),
        }
    }
}

/// A metadata node's view of the Raft group (see [`MetaService::raft_figures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftFigures {
    /// Current term.
    pub term: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Whether it leads.
    pub leading: bool,
    /// Index of its last log entry.
    pub last_log_index: u64,
    /// Index of the last entry applied to its state.
    pub applied_index: u64,
    /// On the leader: the highest index a majority of voters holds.
    pub committed_index: Option<u64>,
}

/// The Meta service's gate on a cluster node: answer only as a confirmed leader.
///
/// Concurrent callers share confirmations: a caller waits for the next confirmation that
/// starts after it arrived (one heartbeat round for however many callers are waiting), never
/// for one already under way, whose quorum may predate the writes the caller has seen.
pub struct RaftGate {
    meta: MetaService,
    waiting: Arc<Mutex<Confirmations>>,
    lease: Arc<Mutex<Option<Lease>>>,
}

/// Until when this node may answer as leader of `term` without a heartbeat round.
#[derive(Clone, Copy)]
struct Lease {
    term: u64,
    until: Instant,
}

/// How often a leader renews its read lease (one heartbeat round each time).
const LEASE_RENEWAL: Duration = Duration::from_millis(100);

/// Keeps `lease` current while this node leads: every [`LEASE_RENEWAL`] a confirmation round
/// (openraft's read-index, whose heartbeats are sent after it is asked for); once a quorum has
/// answered, the lease runs [`READ_LEASE`] from the moment *before* the round was asked for,
/// which is earlier than any follower received its heartbeat, so the lease ends early, never
/// late. The round also waits until the state has applied an entry of this term.
async fn keep_lease(meta: MetaService, lease: Arc<Mutex<Option<Lease>>>) {
    let mut metrics = meta.raft.metrics();
    loop {
        let term = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader && m.current_leader == Some(meta.node_id)).then_some(m.current_term)
        };
        let next = match term {
            Some(term) => {
                let asked = Instant::now();
                match meta.ensure_leader().await {
                    Ok(()) if meta.raft.metrics().borrow().current_term == term => {
                        Some(Lease { term, until: asked + READ_LEASE })
                    }
                    _ => None,
                }
            }
            None => None,
        };
        if let Ok(mut l) = lease.lock() {
            *l = next;
        }
        if term.is_some() {
            tokio::time::sleep(LEASE_RENEWAL).await;
        } else if metrics.changed().await.is_err() {
            // The node is shutting down.
            return;
        }
    }
}

/// Callers waiting for the next confirmation, and whether a round is running.
#[derive(Default)]
struct Confirmations {
    running: bool,
    next: Vec<oneshot::Sender<Result<(), NotLeader>>>,
}

impl RaftGate {
    /// The gate of `meta`'s node.
    pub fn new(meta: MetaService) -> RaftGate {
        let lease = Arc::new(Mutex::new(None));
        tokio::spawn(keep_lease(meta.clone(), lease.clone()));
        RaftGate { meta, waiting: Arc::default(), lease }
    }

    /// Whether this node holds a read lease now: it leads in the lease's term, per the
    /// newest metrics (a step down shows there before the lease is renewed or dropped).
    fn leased(&self) -> bool {
        let Some(lease) = self.lease.lock().ok().and_then(|l| *l) else { return false };
        if Instant::now() >= lease.until {
            return false;
        }
        let metrics = self.meta.raft.metrics();
        let m = metrics.borrow();
        m.state == ServerState::Leader && m.current_term == lease.term && m.current_leader == Some(self.meta.node_id)
    }

    /// Runs confirmation rounds while callers wait for one.
    async fn confirm(meta: MetaService, waiting: Arc<Mutex<Confirmations>>) {
        loop {
            let batch = match waiting.lock() {
                Ok(mut w) if !w.next.is_empty() => std::mem::take(&mut w.next),
                Ok(mut w) => {
                    w.running = false;
                    return;
                }
                Err(_) => return,
            };
            let outcome = meta.ensure_leader().await;
            for caller in batch {
                // A caller that gave up waiting is gone; nothing to tell it.
                caller.send(outcome.clone()).ok();
            }
        }
    }
}

#[async_trait]
impl Leadership for RaftGate {
    async fn check(&self) -> Result<(), NotLeader> {
        if self.leased() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut w = self.waiting.lock().map_err(|_| self.meta.not_leader())?;
            w.next.push(tx);
            !std::mem::replace(&mut w.running, true)
        };
        if start {
            tokio::spawn(Self::confirm(self.meta.clone(), self.waiting.clone()));
        }
        rx.await.unwrap_or_else(|_| Err(self.meta.not_leader()))
    }
}

// ---- the Cluster service ------------------------------------------------------------------

/// The `Cluster` gRPC service of a metadata node.
pub struct ClusterRpc {
    meta: MetaService,
}

/// The service to add to the node's gRPC server.
pub fn cluster_server(meta: MetaService) -> ClusterServer<ClusterRpc> {
    ClusterServer::new(ClusterRpc { meta })
}

fn status_of(e: ClusterError) -> Status {
    match e {
        ClusterError::NotLeader(n) => not_leader_status(&n),
        ClusterError::Invalid(d) => Status::invalid_argument(d),
        ClusterError::Failed(d) => Status::unavailable(d),
    }
}

fn member(m: Option<pb::Member>) -> Result<(NodeId, String), Status> {
    let m = m.ok_or_else(|| Status::invalid_argument("a member is required"))?;
    if m.addr.is_empty() {
        return Err(Status::invalid_argument(format!("node {} needs an address", m.id)));
    }
    Ok((m.id, m.addr))
}

#[tonic::async_trait]
impl Cluster for ClusterRpc {
    async fn init(&self, req: Request<pb::InitRequest>) -> Result<Response<pb::Done>, Status> {
        let members =
            req.into_inner().members.into_iter().map(|m| member(Some(m))).collect::<Result<BTreeMap<_, _>, _>>()?;
        self.meta.initialize(members).await.map_err(status_of)?;
        Ok(Response::new(pb::Done {}))
    }

    async fn add_meta(&self, req: Request<pb::AddMetaRequest>) -> Result<Response<pb::Done>, Status> {
        let (id, addr) = member(req.into_inner().member)?;
        self.meta.add_member(id, addr).await.map_err(status_of)?;
        Ok(Response::new(pb::Done {}))
    }

    async fn remove_meta(&self, req: Request<pb::RemoveMetaRequest>) -> Result<Response<pb::Done>, Status> {
        self.meta.remove_member(req.into_inner().id).await.map_err(status_of)?;
        Ok(Response::new(pb::Done {}))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.meta.status()))
    }
}
