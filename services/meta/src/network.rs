//! The Raft transport between metadata nodes: openraft's messages over gRPC.
//!
//! openraft's own request and response types travel bincode-encoded in the `payload` of
//! [`RaftRequest`]/[`RaftReply`] (the library's types, so their schema stays the library's); a
//! snapshot chunk's bytes travel beside them in `data`. Channels are cached per address, since
//! openraft asks for a client at every replication stream, election and heartbeat round.

// openraft's error types are what its traits return; their size is not ours to change.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::conn::Conn;
use berth_proto::meta::raft_client::RaftClient;
use berth_proto::meta::raft_server::{Raft as RaftService, RaftServer};
use berth_proto::meta::{RaftReply, RaftRequest};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Request, Response, Status};

use crate::raft::{NodeId, TypeConfig};

/// Largest Raft message a node accepts: a batch of entries (each up to a few hundred commands)
/// or a snapshot chunk (1 MiB) with room to spare.
pub const MAX_RAFT_MESSAGE: usize = 64 << 20;

/// How long a connection attempt to a peer may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Time between retries of an unreachable peer.
const BACKOFF: Duration = Duration::from_millis(200);

/// gRPC channels to other metadata nodes, by address (cheap to clone).
#[derive(Clone, Default)]
pub struct Channels {
    by_addr: Arc<Mutex<HashMap<String, Conn>>>,
}

impl Channels {
    /// A channel to `addr` (`host:port`), connected lazily and reused.
    pub fn get(&self, addr: &str) -> Result<Conn, String> {
        let mut map = self.by_addr.lock().map_err(|_| "channel table poisoned".to_string())?;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = berth_proto::tls::endpoint(addr)
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = berth_proto::conn::lazy(&endpoint, CONNECT_TIMEOUT);
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

// ---- client side ----------------------------------------------------------------------------

/// openraft's network factory over gRPC.
#[derive(Clone, Default)]
pub struct GrpcNetwork {
    channels: Channels,
}

impl GrpcNetwork {
    /// A network sharing `channels` with the rest of the node.
    pub fn new(channels: Channels) -> GrpcNetwork {
        GrpcNetwork { channels }
    }
}

/// The connection to one peer.
pub struct GrpcPeer {
    target: NodeId,
    node: BasicNode,
    client: Result<RaftClient<Conn>, String>,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GrpcPeer {
        let client = self.channels.get(&node.addr).map(|c| {
            RaftClient::new(c).max_decoding_message_size(MAX_RAFT_MESSAGE).max_encoding_message_size(MAX_RAFT_MESSAGE)
        });
        GrpcPeer { target, node: node.clone(), client }
    }
}

/// Only a timeout is worth resending at once; anything else (refused, reset, a node that is
/// not a Berth metadata node) makes openraft back off first.
fn transport_error<E: std::error::Error>(s: Status) -> RPCError<NodeId, BasicNode, E> {
    match s.code() {
        Code::Cancelled | Code::DeadlineExceeded => RPCError::Network(NetworkError::new(&s)),
        _ => RPCError::Unreachable(Unreachable::new(&s)),
    }
}

fn encode_error<E: std::error::Error>(e: bincode::Error) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&e))
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl GrpcPeer {
    async fn call<Resp, E>(
        &mut self,
        rpc: Rpc,
        payload: Vec<u8>,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e.clone())))),
        };
        let mut req = Request::new(RaftRequest { payload, data });
        req.set_timeout(option.soft_ttl());
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(req).await,
            Rpc::Vote => client.vote(req).await,
            Rpc::InstallSnapshot => client.install_snapshot(req).await,
        }
        .map_err(transport_error::<E>)?;
        let answer: Result<Resp, E> = bincode::deserialize(&reply.into_inner().payload).map_err(encode_error::<E>)?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for GrpcPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let payload = bincode::serialize(&rpc).map_err(encode_error::<RaftError<NodeId>>)?;
        self.call(Rpc::AppendEntries, payload, vec![], &option).await
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        let data = std::mem::take(&mut rpc.data);
        let payload = bincode::serialize(&rpc).map_err(encode_error::<RaftError<NodeId, InstallSnapshotError>>)?;
        self.call(Rpc::InstallSnapshot, payload, data, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let payload = bincode::serialize(&rpc).map_err(encode_error::<RaftError<NodeId>>)?;
        self.call(Rpc::Vote, payload, vec![], &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(BACKOFF))
    }
}

// ---- server side ----------------------------------------------------------------------------

/// The `Raft` gRPC service of a metadata node: hands peers' messages to its Raft.
pub struct RaftRpc {
    raft: openraft::Raft<TypeConfig>,
}

/// The service to add to the node's gRPC server.
pub fn raft_server(raft: openraft::Raft<TypeConfig>) -> RaftServer<RaftRpc> {
    RaftServer::new(RaftRpc { raft })
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE)
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    bincode::deserialize(payload).map_err(|e| Status::invalid_argument(format!("raft message: {e}")))
}

fn reply<T: Serialize>(answer: &T) -> Result<Response<RaftReply>, Status> {
    let payload = bincode::serialize(answer).map_err(|e| Status::internal(format!("raft reply: {e}")))?;
    Ok(Response::new(RaftReply { payload }))
}

#[tonic::async_trait]
impl RaftService for RaftRpc {
    async fn append_entries(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.get_ref().payload)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<NodeId> = decode(&req.get_ref().payload)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let RaftRequest { payload, data } = req.into_inner();
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(&payload)?;
        rpc.data = data;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
