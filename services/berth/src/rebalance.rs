//! How a storage node keeps its blobs where placement wants them: re-replication after a node
//! dies, rebalance after one joins, and drain before one is removed, all by one pass.
//!
//! A pass walks the node's own inventory. For each blob it asks the blob's current owners
//! (the first R live nodes in placement order, see `berth_storage::placement`) whether they
//! hold it, and then:
//! - an **owner** copies the blob to every owner that lacks it, unless an owner ranked before
//!   it holds the blob (that one copies; so after a node dies, one survivor per blob sends
//!   the copy its new owner needs, not all of them);
//! - a **non-owner** (a draining node, or one whose blobs moved to a node that joined) copies
//!   the blob to the owners that lack it only when no owner holds it (else the first owner
//!   holding it does), and deletes its own copy once every owner has confirmed one: a copy is confirmed by its owner's stat (of the same size), or by the
//!   owner's answer to the write, which it gives only after checking the bytes (against the
//!   sending node's BLAKE3 of the blob) and fsyncing. Copies are dropped only while the map is still the one the pass worked under
//!   (it is read again first): two nodes working under different maps could otherwise each
//!   count on the other's copy and both drop theirs. A node that the map says is dead (it
//!   came back and its heartbeat is not in yet) runs no pass at all.
//!
//! A pass runs when the placement map's version changes (a node joined, died, came back, was
//! drained or removed), once more twice the grace time later (for copies written by frontends
//! still on the previous map), again shortly after a pass that left work undone (an owner did
//! not answer, a copy failed, a copy could not yet be dropped), and otherwise every check
//! interval. A pass leaves alone blobs stored within the grace time: the write that stored
//! one is still copying it to its owners (or has recorded it for repair), and a pass copying
//! it too would double the traffic of every push it overlaps.
//! Copies are paced to the bandwidth limit. What the pass finds and does is reported in the
//! node's heartbeats ([`NodeStats`]), which `berth admin cluster status` shows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use berth_core::store::{NodeState, NodeStats, PlacementMap};
use berth_core::{BlobStore, Digest, MetaStore};
use berth_storage::client::{StorageClient, StorageClientConfig};
use berth_storage::placement::Placement;
use futures::StreamExt;
use tokio::sync::watch;

/// Blobs listed per page of the inventory.
const PAGE: usize = 256;

/// Blobs checked at once.
const CHECKS_AT_ONCE: usize = 8;

/// How often the map is read to see whether a pass is due.
const MAP_CHECK: Duration = Duration::from_secs(2);

/// How soon a pass that left work undone is followed by another.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// How long copying a blob of `size` bytes may take: 10 s, plus a second per 8 MB (a slow
/// disk's rate); past it the copy counts as failed and the next pass tries again.
fn copy_time(size: u64) -> Duration {
    Duration::from_secs(10 + size / 8_000_000)
}

/// What the pass of one node needs.
pub struct Rebalancer {
    /// This node's blobs.
    pub local: Arc<dyn BlobStore>,
    /// The metadata group.
    pub meta: Arc<dyn MetaStore>,
    /// This node's name in the placement map.
    pub name: String,
    /// Copies per blob (R), as the frontends keep.
    pub replicas: usize,
    /// Bytes per second copies may take (0: no limit).
    pub bandwidth: u64,
    /// How often a pass runs when nothing changed.
    pub interval: Duration,
    /// How long a new blob is left to the write path that stored it (which copies it to its
    /// owners, or records it for repair): a pass skips blobs younger than this, and a map
    /// change is followed by one more pass twice this long after it, for the blobs written
    /// meanwhile by frontends still on the previous map.
    pub grace: Duration,
    /// What the node reports in its heartbeats.
    pub stats: Arc<Mutex<NodeStats>>,
}

/// What a pass left undone.
#[derive(Default)]
struct Undone {
    /// Blobs whose owners could not all be asked, or a copy failed.
    failed: u64,
    /// Copies held by a node that does not own them, not yet dropped.
    misplaced: u64,
}

/// Paces copies to a bandwidth: after each copy, waits until the bytes sent so far in the pass
/// took at least as long as the limit allows.
struct Pace {
    start: Instant,
    bytes: u64,
    limit: u64,
}

impl Pace {
    /// Counts `bytes` sent; returns how long to wait before sending more.
    fn sent(&mut self, bytes: u64) -> Duration {
        self.bytes += bytes;
        if self.limit == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.limit as f64);
        due.saturating_sub(self.start.elapsed())
    }
}

impl Rebalancer {
    fn update(&self, f: impl FnOnce(&mut NodeStats)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Runs passes until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut peers: HashMap<String, Arc<StorageClient>> = HashMap::new();
        let mut done_for: Option<u64> = None;
        let mut last_pass: Option<Instant> = None;
        // The map version last seen, when it was first seen (and that time in ms since the
        // epoch, as stamps count), and whether its settling pass ran.
        let mut seen: Option<(u64, Instant, u64, bool)> = None;
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            wait = MAP_CHECK;
            let map = match self.meta.placement().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the placement map");
                    continue;
                }
            };
            // A node not yet registered, or marked dead (it came back and its heartbeat has not
            // been applied yet), does not know what it owns: it neither copies nor drops.
            if !map.nodes.iter().any(|n| n.name == self.name && n.state != NodeState::Dead) {
                continue;
            }
            let (since, since_ms, settled) = match seen {
                Some((v, since, since_ms, settled)) if v == map.version => (since, since_ms, settled),
                _ => (Instant::now(), berth_core::now_ms(), false),
            };
            let settling = !settled && since.elapsed() >= 2 * self.grace;
            seen = Some((map.version, since, since_ms, settled || settling));
            let due =
                done_for != Some(map.version) || settling || last_pass.is_none_or(|t| t.elapsed() >= self.interval);
            if !due {
                continue;
            }
            let grace_ms = self.grace.as_millis() as u64;
            // Blobs stored up to this stamp are checked; younger ones are the write path's.
            let upto = if settling { since_ms + grace_ms } else { berth_core::now_ms().saturating_sub(grace_ms) };
            let started = Instant::now();
            tracing::debug!(version = map.version, upto, "placement pass");
            let undone = tokio::select! {
                u = self.pass(&map, &mut peers, upto) => u,
                _ = stop.wait_for(|s| *s) => return,
            };
            last_pass = Some(Instant::now());
            if undone.failed == 0 && undone.misplaced == 0 {
                done_for = Some(map.version);
                tracing::debug!(version = map.version, took = ?started.elapsed(), "placement pass done");
            } else {
                done_for = None;
                wait = RETRY_AFTER;
                tracing::info!(
                    version = map.version,
                    failed = undone.failed,
                    misplaced = undone.misplaced,
                    "placement pass left work; trying again shortly"
                );
            }
        }
    }

    /// The client of the node at `addr`.
    fn peer(peers: &mut HashMap<String, Arc<StorageClient>>, addr: &str) -> Option<Arc<StorageClient>> {
        if let Some(p) = peers.get(addr) {
            return Some(p.clone());
        }
        let p = Arc::new(StorageClient::new(addr, StorageClientConfig::default()).ok()?);
        peers.insert(addr.to_string(), p.clone());
        Some(p)
    }

    /// One pass over this node's inventory under `map`.
    async fn pass(&self, map: &PlacementMap, peers: &mut HashMap<String, Arc<StorageClient>>, upto: u64) -> Undone {
        let placement = Placement::of_map(map);
        let Some(me) = map.nodes.iter().position(|n| n.name == self.name) else { return Undone::default() };
        let clients: Vec<Option<Arc<StorageClient>>> = map
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| if i == me { None } else { Self::peer(peers, &n.addr) })
            .collect();

        // Count first (the index alone), so that progress has a total.
        let mut blobs = 0u64;
        let mut after: Option<Digest> = None;
        loop {
            let page = match self.local.list(after.as_ref(), PAGE * 4).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "listing this node's blobs");
                    return Undone { failed: 1, misplaced: 0 };
                }
            };
            blobs += page.len() as u64;
            if page.len() < PAGE * 4 {
                break;
            }
            after = page.last().map(|(d, _)| d.clone());
        }
        self.update(|s| {
            s.blobs = blobs;
            s.queued = blobs;
            s.checked = 0;
        });

        // Bytes of the blobs held here, summed as they are placed.
        let held = AtomicU64::new(0);
        let pace = Mutex::new(Pace { start: Instant::now(), bytes: 0, limit: self.bandwidth });
        let pass = Pass { upto, placement: &placement, me, clients: &clients, pace: &pace, held: &held };
        let mut undone = Undone::default();
        let mut after: Option<Digest> = None;
        loop {
            let page = match self.local.list(after.as_ref(), PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "listing this node's blobs");
                    undone.failed += 1;
                    break;
                }
            };
            // A bounded set of checks in flight, refilled as each ends.
            let mut outcomes = Vec::with_capacity(page.len());
            let mut running = futures::stream::FuturesUnordered::new();
            let mut todo = page.iter();
            loop {
                while running.len() < CHECKS_AT_ONCE {
                    let Some((d, _stamp)) = todo.next() else { break };
                    running.push(self.place(d, &pass));
                }
                match running.next().await {
                    Some(o) => outcomes.push(o),
                    None => break,
                }
            }
            let mut droppable = vec![];
            for o in outcomes {
                match o {
                    Outcome::Placed => {}
                    Outcome::Failed => undone.failed += 1,
                    Outcome::Misplaced => undone.misplaced += 1,
                    Outcome::Droppable(d, size) => droppable.push((d, size)),
                }
            }
            if !droppable.is_empty() {
                self.drop_copies(map.version, droppable, &held, &mut undone).await;
            }
            self.update(|s| {
                s.checked += page.len() as u64;
                s.queued = s.queued.saturating_sub(page.len() as u64);
            });
            if page.len() < PAGE {
                break;
            }
            after = page.last().map(|(d, _)| d.clone());
        }
        let pace = pace.into_inner().unwrap_or_else(PoisonError::into_inner);
        let secs = pace.start.elapsed().as_secs_f64();
        self.update(|s| {
            // The rate of the last pass that moved anything: a pass with nothing to move says
            // nothing about how fast this node moves data.
            if pace.bytes > 0 && secs > 0.0 {
                s.move_rate = (pace.bytes as f64 / secs) as u64;
            }
            s.queued = 0;
            s.bytes = held.load(Ordering::Relaxed);
            s.pass_version = map.version;
        });
        undone
    }

    /// Deletes copies this node holds but does not own, each confirmed at every owner, unless
    /// the map changed since the pass read it: owners confirmed under one map may be dropping
    /// their own copies under the next, so a pass drops nothing once its map is stale.
    async fn drop_copies(&self, version: u64, droppable: Vec<(Digest, u64)>, held: &AtomicU64, undone: &mut Undone) {
        match self.meta.placement().await {
            Ok(now) if now.version == version => {}
            _ => {
                undone.misplaced += droppable.len() as u64;
                return;
            }
        }
        for (d, size) in droppable {
            match self.local.delete(&d, None).await {
                Ok(_) => {
                    held.fetch_sub(size, Ordering::Relaxed);
                    self.update(|s| {
                        s.copies_dropped += 1;
                        s.blobs = s.blobs.saturating_sub(1);
                    });
                }
                Err(e) => {
                    undone.failed += 1;
                    tracing::warn!(digest = %d, error = %e, "dropping a copy its owners hold");
                }
            }
        }
    }

    /// Puts blob `d` (held here) where placement wants it.
    async fn place(&self, d: &Digest, pass: &Pass<'_>) -> Outcome {
        let Pass { upto, placement, me, clients, pace, held } = *pass;
        // Listed a moment ago; a blob deleted since (by the collector) needs nothing.
        let (size, stamp) = match self.local.stat(d).await {
            Ok(Some(stored)) => (stored.size, stored.stamp),
            Ok(None) => return Outcome::Placed,
            Err(_) => return Outcome::Failed,
        };
        held.fetch_add(size, Ordering::Relaxed);
        // Too young: its writer is still copying it to its owners.
        if stamp > upto {
            return Outcome::Placed;
        }
        let owners = placement.owners(d, self.replicas);
        let mine = owners.iter().position(|&o| o == me);
        // Who holds it: Some(true) holds, Some(false) lacks, None did not answer.
        let mut holds: Vec<Option<bool>> = Vec::with_capacity(owners.len());
        for &o in &owners {
            if o == me {
                holds.push(Some(true));
                continue;
            }
            let answer = match &clients[o] {
                // A copy of another size is no copy (it cannot pass a digest check anyway).
                Some(c) => match c.stat(d).await {
                    Ok(s) => Some(s.is_some_and(|s| s.size == size)),
                    Err(e) => {
                        tracing::debug!(digest = %d, error = %e, "asking an owner whether it holds a blob");
                        None
                    }
                },
                None => None,
            };
            holds.push(answer);
        }
        let mut failed = holds.iter().any(Option::is_none);
        // An owner leaves the copying to a holder ranked before it; a non-owner leaves it to
        // any owner that holds the blob (it drops its own copy once that one has copied), and
        // copies only a blob no owner holds (a drained node's, say): one copy per owner
        // lacking, not one from every holder.
        let copies_here = match mine {
            Some(k) => !holds[..k].contains(&Some(true)),
            None => !holds.contains(&Some(true)),
        };
        if copies_here {
            for (k, &o) in owners.iter().enumerate() {
                if holds[k] != Some(false) {
                    continue;
                }
                let Some(target) = &clients[o] else { continue };
                tracing::debug!(digest = %d, to = %o, "copying a blob to an owner that lacks it");
                // Checked there against this node's BLAKE3 of the blob (see put_copy).
                let copied = berth_core::store::copy_blob(&*self.local, &**target, d, size);
                let copied = match tokio::time::timeout(copy_time(size), copied).await {
                    Ok(c) => c,
                    Err(_) => Err(berth_core::RegistryError::new(
                        berth_core::ErrorCode::Unknown,
                        format!("copy took over {:?}", copy_time(size)),
                    )),
                };
                match copied {
                    Ok(_) => {
                        holds[k] = Some(true);
                        self.update(|s| {
                            s.copies_made += 1;
                            s.bytes_moved += size;
                        });
                        let wait = pace.lock().unwrap_or_else(PoisonError::into_inner).sent(size);
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(digest = %d, error = %e, "copying a blob to its owner");
                    }
                }
            }
        }
        if mine.is_some() {
            return if failed { Outcome::Failed } else { Outcome::Placed };
        }
        // Not an owner: drop the copy once every owner confirmed one.
        if owners.len() < self.replicas || !holds.iter().all(|h| *h == Some(true)) {
            return Outcome::Misplaced;
        }
        Outcome::Droppable(d.clone(), size)
    }
}

/// What a pass places each blob by.
#[derive(Clone, Copy)]
struct Pass<'a> {
    /// Blobs stamped after this are left to their writers.
    upto: u64,
    placement: &'a Placement,
    /// This node's index in the map.
    me: usize,
    /// Clients of the other nodes, by index (`None` for this one, or one unreachable).
    clients: &'a [Option<Arc<StorageClient>>],
    pace: &'a Mutex<Pace>,
    /// Bytes of the blobs held here, summed as they are placed.
    held: &'a AtomicU64,
}

/// What became of one blob in a pass.
enum Outcome {
    /// Where it should be (or nothing more can be done here).
    Placed,
    /// An owner did not answer, or a copy failed.
    Failed,
    /// Held here though this node does not own it, and not yet droppable.
    Misplaced,
    /// Held here though this node does not own it, and confirmed at every owner: the copy
    /// here can go (its size given).
    Droppable(Digest, u64),
}

/// Keeps telling `engine` which blobs reads ask this node (`name`) for first: those it is the
/// first owner of under the placement map, as frontends pick (`berth_storage::router`), so
/// that it lets the pages of its other copies leave the page cache. Follows the map every
/// [`MAP_CHECK`] until `stop`, apart from the placement passes, which can run for long. Until
/// the node is in the map and not dead, it tells nothing, and the engine keeps every copy.
/// Frontends given a fixed `--storage` list place by address, not by the map's names and
/// weights: behind those, this choice of copies is a guess (a cost in cache, never in data).
pub async fn follow_reads_first(
    engine: berth_storage::StorageEngine,
    meta: Arc<dyn MetaStore>,
    name: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut version = None;
    loop {
        if let Ok(map) = meta.placement().await {
            let me = map.nodes.iter().position(|n| n.name == name && n.state != NodeState::Dead);
            if let Some(me) = me.filter(|_| version != Some(map.version)) {
                version = Some(map.version);
                let placement = Placement::of_map(&map);
                engine.set_reads_first(Some(Arc::new(move |d: &Digest| placement.first_owner(d) == Some(me))));
                metrics::gauge!("berth_storage_reads_first_map_version").set(map.version as f64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(MAP_CHECK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
