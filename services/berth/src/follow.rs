//! Keeping a router over the storage nodes on the metadata group's current placement map (in
//! frontends, and on the metadata leader for garbage collection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_core::store::NodeState;
use berth_core::{BlobStore, MetaStore};
use berth_storage::client::{StorageClient, StorageClientConfig};
use berth_storage::placement::Member;
use berth_storage::router::{CurrentRouter, Replicated};
use tokio::sync::watch;

/// Which nodes of the map a router reaches, and how it places blobs on them.
#[derive(Clone, Copy)]
pub struct Following {
    pub replicas: usize,
    pub write_quorum: usize,
    /// Leave dead nodes out (their copies are neither read nor deleted).
    pub skip_dead: bool,
    /// How often to ask for the map.
    pub poll: Duration,
}

/// Keeps `router` on the current placement map until `stop` turns true: asks for the map every
/// `placement.poll` (at once at start) and, when its version changed, puts a router over its nodes
/// in place, keeping the connections to nodes it already knew.
pub async fn follow_placement(
    router: Arc<CurrentRouter>,
    meta: Arc<dyn MetaStore>,
    placement: Following,
    mut stop: watch::Receiver<bool>,
) {
    let mut clients: HashMap<String, Arc<StorageClient>> = HashMap::new();
    loop {
        match meta.placement().await {
            Ok(map) if !map.nodes.is_empty() && router.version() != Some(map.version) => {
                let mut nodes: Vec<(String, Arc<dyn BlobStore>)> = vec![];
                let mut members = vec![];
                let mut addrs = vec![];
                let mut kept = HashMap::new();
                for n in map.nodes.iter().filter(|n| !(placement.skip_dead && n.state == NodeState::Dead)) {
                    let client = match clients.get(&n.addr) {
                        Some(c) => c.clone(),
                        None => match StorageClient::new(&n.addr, StorageClientConfig::default()) {
                            Ok(c) => Arc::new(c),
                            Err(e) => {
                                tracing::warn!(node = %n.name, addr = %n.addr, error = %e, "a storage node's address");
                                continue;
                            }
                        },
                    };
                    kept.insert(n.addr.clone(), client.clone());
                    nodes.push((n.name.clone(), client));
                    members.push(Member::of_node(n));
                    addrs.push(n.addr.clone());
                }
                clients = kept;
                match Replicated::new(nodes, placement.replicas, placement.write_quorum) {
                    Ok(r) => {
                        router.set(
                            map.version,
                            r.with_members(members).with_addrs(addrs).with_repair_record(meta.clone()),
                        );
                        tracing::info!(version = map.version, nodes = map.nodes.len(), "placement map");
                    }
                    Err(e) => tracing::warn!(error = %e, "placement map"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "reading the placement map"),
        }
        tokio::select! {
            _ = tokio::time::sleep(placement.poll) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
