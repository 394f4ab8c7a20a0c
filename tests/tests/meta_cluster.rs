//! The metadata group as three `berth meta` processes on loopback: it forms, elects, replicates
//! over gRPC, survives SIGKILLs of its leader without losing an acknowledged write, and its
//! tag reads stay linearizable throughout (checked on the recorded history).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_core::{Digest, ManifestRecord, MetaStore, Stored};
use berth_meta::client::{MetaClient, MetaClientConfig};
use berth_tests::linearizability::{violations, History, Op};
use berth_tests::meta_group::MetaGroup;

const REPO: &str = "acme/app";
const TAG: &str = "live";
const KILLS: usize = 5;

fn manifest(k: u64) -> ManifestRecord {
    ManifestRecord {
        digest: Digest::sha256_of(format!("manifest {k}").as_bytes()),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 100,
        subject: None,
        artifact_type: None,
        annotations: Default::default(),
        blobs: vec![],
        manifests: vec![],
        pushed_at_ms: k,
    }
}

async fn writer(client: Arc<MetaClient>, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) && k < 100_000 {
        k += 1;
        let start = Instant::now();
        let stored = Stored { size: 100, stamp: u64::MAX / 2 };
        let acked = client.put_manifest(REPO, manifest(k), vec![TAG.into()], stored, None).await.is_ok();
        history.lock().unwrap().writes.push(Op { start, end: Instant::now(), value: Some(k), acked });
    }
}

async fn reader(client: Arc<MetaClient>, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let by_digest: std::collections::HashMap<Digest, u64> = (1..100_000).map(|k| (manifest(k).digest, k)).collect();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
        n += 1;
        let start = Instant::now();
        if let Ok(d) = client.tag(REPO, TAG).await {
            let value = d.map(|d| by_digest[&d]);
            history.lock().unwrap().reads.push(Op { start, end: Instant::now(), value, acked: true });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_lose_no_acknowledged_write_and_reads_stay_linearizable() {
    let mut g = MetaGroup::start(3);
    let nodes: Vec<String> = g.nodes.iter().map(|n| n.addr.clone()).collect();
    let config = MetaClientConfig { retry_for: Duration::from_secs(15), ..Default::default() };
    let client = Arc::new(MetaClient::new(nodes, config).unwrap());
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(client.clone(), history.clone(), stop.clone()));
    let readers: Vec<_> = (0..2).map(|_| tokio::spawn(reader(client.clone(), history.clone(), stop.clone()))).collect();

    let mut failovers = vec![];
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = tokio::task::block_in_place(|| g.wait_for_leader(Duration::from_secs(10))).expect("a leader");
        let victim = &mut g.nodes[leader as usize - 1];
        tokio::task::block_in_place(|| victim.kill());
        let killed = Instant::now();
        // The first write acknowledged after the old leader died was committed by a new one.
        let deadline = killed + Duration::from_secs(20);
        let first_ack = loop {
            let ack = history.lock().unwrap().writes.iter().filter(|w| w.acked && w.end > killed).map(|w| w.end).min();
            if let Some(t) = ack {
                break t;
            }
            assert!(Instant::now() < deadline, "no write acknowledged within 20 s of the leader's death");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        failovers.push(first_ack.duration_since(killed));
        tokio::task::block_in_place(|| g.nodes[leader as usize - 1].restart());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }

    // Every task is done: the history is final.
    let h = std::mem::take(&mut *history.lock().unwrap());
    let acked: Vec<u64> = h.writes.iter().filter(|w| w.acked).filter_map(|w| w.value).collect();
    let unacked = h.writes.len() - acked.len();
    // Nothing acknowledged is lost: every acknowledged manifest is there, the tag points at
    // the last write (acknowledged, or one whose answer was lost and that took effect).
    for k in &acked {
        let m = client.manifest(REPO, &manifest(*k).digest).await.unwrap();
        assert!(m.is_some(), "acknowledged write {k} is lost");
    }
    let last = h.writes.last().and_then(|w| w.value);
    let tag = client.tag(REPO, TAG).await.unwrap().map(|d| (1..=last.unwrap_or(0)).find(|k| manifest(*k).digest == d));
    assert!(tag.flatten() >= acked.last().copied(), "the tag went back behind an acknowledged write");
    let bad = violations(&h);
    let mut sorted = failovers.clone();
    sorted.sort();
    eprintln!(
        "meta group: {} writes acknowledged, {} unacknowledged (answer lost in a kill), {} reads; \
         leader kill to first acknowledged write: median {:?}, max {:?} (all: {:?}); {} linearizability violations",
        acked.len(),
        unacked,
        h.reads.len(),
        sorted[sorted.len() / 2],
        sorted.last().unwrap(),
        failovers,
        bad.len()
    );
    assert!(bad.is_empty(), "{bad:?}");
    assert!(acked.len() > 50, "too few writes to mean anything");
    // Every node is back and the group has three voters that agree on the log.
    let status = tokio::task::block_in_place(|| {
        let start = Instant::now();
        loop {
            let s = g.status();
            let applied: Vec<_> = s.iter().filter_map(|n| n["applied_index"].as_u64()).collect();
            if s.len() == 3 && applied.len() == 3 && applied.iter().all(|a| *a == applied[0]) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert_eq!(status.len(), 3, "{status:?}");
    assert!(status.iter().all(|n| n["voters"].as_array().map(Vec::len) == Some(3)), "{status:?}");
}

/// `berth admin cluster add-meta` makes a new node a learner, then a voter, while the group
/// serves; `remove-meta` takes it out again. Both may be asked of a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_while_the_group_serves() {
    use berth_tests::meta_group::{cluster_cli, MetaNode};
    let g = MetaGroup::start(3);
    let dir = tempfile::tempdir().unwrap();
    let fourth = MetaNode::start(4, "127.0.0.1:0", dir.path().join("meta4"));
    let nodes: Vec<String> = g.nodes.iter().map(|n| n.addr.clone()).collect();
    let client = MetaClient::new(nodes, MetaClientConfig::default()).unwrap();
    let stored = Stored { size: 100, stamp: u64::MAX / 2 };
    client.put_manifest(REPO, manifest(1), vec![TAG.into()], stored, None).await.unwrap();
    let leader = g.leader().unwrap();
    let follower = g.nodes.iter().find(|n| n.id != leader).unwrap().addr.clone();
    tokio::task::block_in_place(|| cluster_cli(&follower, &["add-meta", "4", &fourth.addr])).unwrap();
    let seen = tokio::task::block_in_place(|| cluster_cli(&fourth.addr, &["status"])).unwrap();
    let status: serde_json::Value = serde_json::from_str(&seen).unwrap();
    let voters: Vec<u64> =
        status["meta"][0]["voters"].as_array().unwrap().iter().filter_map(|v| v["id"].as_u64()).collect();
    assert_eq!(voters, vec![1, 2, 3, 4], "{seen}");
    // The new node has the state written before it joined.
    assert!(status["meta"][0]["applied_index"].as_u64().unwrap() >= 2, "{seen}");
    client.put_manifest(REPO, manifest(2), vec![TAG.into()], stored, None).await.unwrap();
    tokio::task::block_in_place(|| cluster_cli(&follower, &["remove-meta", "4"])).unwrap();
    let leader_addr = g.nodes[leader as usize - 1].addr.clone();
    let seen = tokio::task::block_in_place(|| cluster_cli(&leader_addr, &["status"])).unwrap();
    let status: serde_json::Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(status["meta"][0]["voters"].as_array().unwrap().len(), 3, "{seen}");
    assert_eq!(client.tag(REPO, TAG).await.unwrap(), Some(manifest(2).digest));
}

/// The leader cut off from the other two (iptables in its network namespace; clients still
/// reach it): it acknowledges no write from then on, the other two elect a leader that
/// acknowledges writes, and once that happened no read through the old leader returns the
/// old value. Healed, the old leader follows and serves the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_majority_acknowledges_nothing() {
    let Some(lan) = berth_tests::netns::Lan::create(3) else { return };
    let group = tokio::task::block_in_place(|| MetaGroup::start_on(&lan));
    let quick = MetaClientConfig {
        retry_for: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let all = MetaClient::new(group.nodes.iter().map(|n| n.addr.clone()).collect(), quick.clone()).unwrap();
    let stored = Stored { size: 100, stamp: u64::MAX / 2 };
    all.put_manifest(REPO, manifest(1), vec![TAG.into()], stored, None).await.expect("a write before the cut");
    let old = tokio::task::block_in_place(|| group.wait_for_leader(Duration::from_secs(10))).unwrap() as usize;
    let others: Vec<usize> = (1..=3).filter(|i| *i != old).collect();
    let through_old = MetaClient::new(vec![group.nodes[old - 1].addr.clone()], quick.clone()).unwrap();
    let through_others =
        MetaClient::new(others.iter().map(|i| group.nodes[i - 1].addr.clone()).collect(), quick).unwrap();
    let value = |d: Option<Digest>| d.and_then(|d| (1..=1000).find(|k| manifest(*k).digest == d));

    lan.cut(old, &others);
    let cut_at = Instant::now();
    // Writes through the old leader, and a new leader's first acknowledged write.
    let mut acked_by_old = vec![];
    let mut new_acked_at = None;
    let mut k = 100;
    while new_acked_at.is_none() && cut_at.elapsed() < Duration::from_secs(20) {
        k += 1;
        if through_old.put_manifest(REPO, manifest(k), vec![TAG.into()], stored, None).await.is_ok() {
            acked_by_old.push(k);
        }
        if through_others.put_manifest(REPO, manifest(2), vec![TAG.into()], stored, None).await.is_ok() {
            new_acked_at = Some(Instant::now());
        }
    }
    let new_acked_at = new_acked_at.expect("the other two elect a leader that acknowledges writes");
    eprintln!("leader cut off: a new leader acknowledged a write {:?} after the cut", new_acked_at - cut_at);
    assert!(acked_by_old.is_empty(), "the cut-off leader acknowledged writes {acked_by_old:?}");
    // After the new leader's write, reads through the old one fail or see it: never the old value.
    let mut stale = vec![];
    let mut answered = 0;
    while new_acked_at.elapsed() < Duration::from_secs(3) {
        match through_old.tag(REPO, TAG).await {
            Ok(d) if value(d.clone()) == Some(2) => answered += 1,
            Ok(d) => stale.push(value(d)),
            Err(_) => {}
        }
    }
    assert!(stale.is_empty(), "the cut-off leader answered stale reads {stale:?}");
    eprintln!("reads through the cut-off leader after the new write: {answered} saw it, the rest failed");

    lan.heal(old);
    let healed = Instant::now();
    loop {
        if let Ok(d) = through_old.tag(REPO, TAG).await {
            assert_eq!(value(d), Some(2), "the old leader, healed, serves what the new one committed");
            break;
        }
        assert!(healed.elapsed() < Duration::from_secs(20), "the old leader rejoins");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(group);
}
