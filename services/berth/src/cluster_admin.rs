//! `berth admin cluster`: forms and changes the metadata group through the `Cluster` gRPC
//! service of its nodes, following a node's answer to the leader where one is needed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_proto::cluster as pb;
use berth_proto::cluster::cluster_client::ClusterClient;
use clap::Subcommand;
use serde_json::json;
use tonic::transport::Endpoint;
use tonic::Code;

/// How long a command keeps looking for the leader (an election may be under way).
const FIND_LEADER_FOR: Duration = Duration::from_secs(15);

/// What to do with the metadata group.
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Makes the listed nodes (`--meta ID=ADDR,...`) the group's first voters.
    Init,
    /// Adds a metadata node: as a learner until it has caught up, then as a voter.
    AddMeta {
        /// The new node's id.
        id: u64,
        /// Its gRPC address.
        addr: String,
    },
    /// Removes a metadata node from the group.
    RemoveMeta {
        /// The node's id.
        id: u64,
    },
    /// Each listed node's view of the group, as JSON.
    Status,
    /// The storage nodes registered with the group (the placement map), as JSON: name,
    /// address, zone, capacity and milliseconds since each one's last heartbeat.
    Storage,
}

/// Flags of `berth admin cluster`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Metadata nodes: `ADDR,...`, or `ID=ADDR,...` (ids are needed by `init`).
    #[arg(long, env = "BERTH_META", value_delimiter = ',', required = true)]
    pub meta: Vec<String>,
    #[command(subcommand)]
    pub command: ClusterCmd,
}

fn split(node: &str) -> (Option<u64>, &str) {
    match node.split_once('=') {
        Some((id, addr)) => (id.parse().ok(), addr),
        None => (None, node),
    }
}

async fn client(addr: &str) -> Result<ClusterClient<tonic::transport::Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad address {addr:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(90))
        .connect()
        .await
        .with_context(|| format!("reaching metadata node {addr}"))?;
    Ok(ClusterClient::new(channel))
}

/// Sends a leader-only request to the listed nodes until the leader takes it.
async fn on_leader<F, Fut>(nodes: &[String], mut call: F) -> Result<()>
where
    F: FnMut(ClusterClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + FIND_LEADER_FOR;
    let mut next: Option<String> = None;
    let mut i = 0;
    loop {
        let addr = next.take().unwrap_or_else(|| split(&nodes[i % nodes.len()]).1.to_string());
        i += 1;
        let outcome = match client(&addr).await {
            Ok(c) => call(c).await.map_err(|s| {
                if s.code() == Code::FailedPrecondition {
                    next = s.metadata().get("x-berth-leader").and_then(|v| v.to_str().ok()).map(str::to_string);
                }
                anyhow::anyhow!("{addr}: {}", s.message())
            }),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs one cluster command.
pub async fn run(args: ClusterArgs) -> Result<()> {
    match args.command {
        ClusterCmd::Init => {
            let mut members = vec![];
            for n in &args.meta {
                let (Some(id), addr) = split(n) else { bail!("init needs --meta ID=ADDR,...; got {n:?}") };
                members.push(pb::Member { id, addr: addr.to_string() });
            }
            let first = members[0].addr.clone();
            client(&first).await?.init(pb::InitRequest { members }).await.context("initializing the group")?;
            println!("ok");
        }
        ClusterCmd::AddMeta { id, addr } => {
            on_leader(&args.meta, |mut c| {
                let member = Some(pb::Member { id, addr: addr.clone() });
                async move { c.add_meta(pb::AddMetaRequest { member }).await.map(|_| ()) }
            })
            .await?;
            println!("ok");
        }
        ClusterCmd::RemoveMeta { id } => {
            on_leader(&args.meta, |mut c| async move { c.remove_meta(pb::RemoveMetaRequest { id }).await.map(|_| ()) })
                .await?;
            println!("ok");
        }
        ClusterCmd::Status => {
            let mut out = vec![];
            for n in &args.meta {
                let addr = split(n).1;
                let status = match client(addr).await {
                    Ok(mut c) => match c.status(pb::StatusRequest {}).await {
                        Ok(s) => {
                            let s = s.into_inner();
                            let members = |m: &[pb::Member]| -> Vec<_> {
                                m.iter().map(|m| json!({"id": m.id, "addr": m.addr})).collect()
                            };
                            json!({
                                "node": addr, "id": s.id, "state": s.state, "leader": s.leader, "term": s.term,
                                "last_log_index": s.last_log_index, "applied_index": s.applied_index,
                                "voters": members(&s.voters), "learners": members(&s.learners),
                                "replicated": s.replicated,
                            })
                        }
                        Err(e) => json!({"node": addr, "error": e.message()}),
                    },
                    Err(e) => json!({"node": addr, "error": format!("{e:#}")}),
                };
                out.push(status);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ClusterCmd::Storage => {
            use berth_core::MetaStore;
            let nodes = args.meta.iter().map(|n| split(n).1.to_string()).collect();
            let meta = berth_meta::client::MetaClient::new(nodes, berth_meta::client::MetaClientConfig::default())?;
            let map = meta.placement().await.map_err(|e| anyhow::anyhow!("{}", e.detail))?;
            let now = berth_core::now_ms();
            let nodes: Vec<_> = map
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.name, "addr": n.addr, "zone": n.zone, "capacity": n.capacity,
                        "ms_since_heartbeat": now.saturating_sub(n.seen_ms),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json!({"version": map.version, "nodes": nodes}))?);
        }
    }
    Ok(())
}
