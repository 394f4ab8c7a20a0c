//! `berth admin cluster`: forms and changes the metadata group through the `Cluster` gRPC
//! service of its nodes, following a node's answer to the leader where one is needed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_core::store::StorageChange;
use berth_proto::cluster as pb;
use berth_proto::cluster::cluster_client::ClusterClient;
use clap::Subcommand;
use serde_json::json;
use tonic::Code;

/// How long a command keeps looking for the leader (an election may be under way).
const FIND_LEADER_FOR: Duration = Duration::from_secs(15);

/// What to do with the metadata group.
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Makes the listed nodes (`--meta ID=ADDR,...`) the group's first voters, asking the first
    /// one (waiting up to 15 s for it to answer). Running it again changes nothing.
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
    /// The cluster as JSON: `meta`, each listed metadata node's view of the group, and
    /// `storage`, the placement map (as `storage` prints it).
    Status {
        /// Only the metadata nodes' views (asks no leader, so answers during an election).
        #[arg(long)]
        meta_only: bool,
    },
    /// The storage nodes registered with the group (the placement map), as JSON: per node its
    /// name, address, zone, capacity, state (live, dead, draining), milliseconds since its
    /// last heartbeat, the blobs and bytes it holds, and its re-replication and rebalance
    /// queue (`queued` blobs left to check, `checked`, copies made and dropped, bytes moved,
    /// rate in bytes per second) and its scrub (bytes checked this pass, passes, rate, damaged
    /// copies found and mended), as of that heartbeat.
    Storage,
    /// Moves a storage node's blobs to their other owners; it takes no new ones. Remove it
    /// once `storage` shows it holding none.
    Drain {
        /// The node's name.
        name: String,
    },
    /// Lets a draining storage node own its share of blobs again.
    Undrain {
        /// The node's name.
        name: String,
    },
    /// Takes a storage node out of the placement map for good (its name cannot register
    /// again). Refused while it holds blobs, unless it is dead or `--force` is given.
    Remove {
        /// The node's name.
        name: String,
        /// Remove it whatever it still holds.
        #[arg(long)]
        force: bool,
    },
}

/// The placement map as JSON, heartbeats as milliseconds ago.
fn storage_json(map: &berth_core::store::PlacementMap) -> serde_json::Value {
    let now = berth_core::now_ms();
    let nodes: Vec<_> = map
        .nodes
        .iter()
        .map(|n| {
            let s = &n.stats;
            json!({
                "name": n.name, "addr": n.addr, "zone": n.zone, "capacity": n.capacity,
                "state": n.state.name(), "ms_since_heartbeat": now.saturating_sub(n.seen_ms),
                "blobs": s.blobs, "bytes": s.bytes,
                "moving": {
                    "queued": s.queued, "checked": s.checked, "copies_made": s.copies_made,
                    "copies_dropped": s.copies_dropped, "bytes_moved": s.bytes_moved,
                    "bytes_per_second": s.move_rate,
                },
                "scrub": {
                    "bytes_checked": s.scrubbed, "passes": s.scrub_passes, "bytes_per_second": s.scrub_rate,
                    "damaged_found": s.damaged, "mended": s.mended,
                },
            })
        })
        .collect();
    json!({"version": map.version, "nodes": nodes})
}

/// A client of the metadata group at the listed nodes.
fn meta_client(nodes: &[String]) -> Result<berth_meta::client::MetaClient> {
    let nodes = nodes.iter().map(|n| split(n).1.to_string()).collect();
    Ok(berth_meta::client::MetaClient::new(nodes, berth_meta::client::MetaClientConfig::default())?)
}

/// How long `status` waits for the placement map (the group may have no majority).
const MAP_WAIT: Duration = Duration::from_secs(3);

/// Flags of `berth admin cluster`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Mutual TLS with the other roles.
    #[command(flatten)]
    pub cluster_tls: crate::config::ClusterTlsFlags,
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
    let channel = berth_proto::tls::endpoint(addr)
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

/// Makes one change to the storage nodes; prints `ok` (or `unchanged`).
async fn change_storage(nodes: &[String], change: StorageChange) -> Result<()> {
    use berth_core::MetaStore;
    let changed = meta_client(nodes)?.change_storage(change).await.map_err(|e| anyhow::anyhow!("{}", e.detail))?;
    println!("{}", if changed { "ok" } else { "unchanged" });
    Ok(())
}

/// Runs one cluster command.
pub async fn run(args: ClusterArgs) -> Result<()> {
    args.cluster_tls.install()?;
    match args.command {
        ClusterCmd::Init => {
            let mut members = vec![];
            for n in &args.meta {
                let (Some(id), addr) = split(n) else { bail!("init needs --meta ID=ADDR,...; got {n:?}") };
                members.push(pb::Member { id, addr: addr.to_string() });
            }
            // The first node may still be starting (a container beside it, say): keep trying
            // to reach it for a while.
            let first = members[0].addr.clone();
            let deadline = tokio::time::Instant::now() + FIND_LEADER_FOR;
            let mut c = loop {
                match client(&first).await {
                    Ok(c) => break c,
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            c.init(pb::InitRequest { members }).await.context("initializing the group")?;
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
        ClusterCmd::Status { meta_only } => {
            use berth_core::MetaStore;
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
            if meta_only {
                println!("{}", serde_json::to_string_pretty(&json!({"meta": out}))?);
                return Ok(());
            }
            let meta = meta_client(&args.meta)?;
            let storage = match tokio::time::timeout(MAP_WAIT, meta.placement()).await {
                Ok(Ok(map)) => storage_json(&map),
                Ok(Err(e)) => json!({"error": e.detail}),
                Err(_) => json!({"error": format!("no answer within {MAP_WAIT:?}")}),
            };
            println!("{}", serde_json::to_string_pretty(&json!({"meta": out, "storage": storage}))?);
        }
        ClusterCmd::Storage => {
            use berth_core::MetaStore;
            let map = meta_client(&args.meta)?.placement().await.map_err(|e| anyhow::anyhow!("{}", e.detail))?;
            println!("{}", serde_json::to_string_pretty(&storage_json(&map))?);
        }
        ClusterCmd::Drain { name } => change_storage(&args.meta, StorageChange::Drain { name }).await?,
        ClusterCmd::Undrain { name } => change_storage(&args.meta, StorageChange::Undrain { name }).await?,
        ClusterCmd::Remove { name, force } => change_storage(&args.meta, StorageChange::Remove { name, force }).await?,
    }
    Ok(())
}
