//! The collector against a storage stand-in whose copies, stamps and failures the test sets:
//! a collection another leader fenced is finished, a copy stamped after the floor is kept, a
//! node that fails does not hold up the others, and a dry run foresees the run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use berth_core::{BlobStore, ByteStream, ErrorCode, MetaStore, RegistryError, Stored};
use bytes::Bytes;

use super::*;
use crate::tests::{d, open};

/// Copies on `nodes` storage nodes; `down` of them fail every call.
struct Nodes {
    copies: Mutex<BTreeMap<Digest, Stored>>,
    nodes: u32,
    down: AtomicU32,
}

impl Nodes {
    fn new(nodes: u32) -> Arc<Nodes> {
        Arc::new(Nodes { copies: Mutex::default(), nodes, down: AtomicU32::new(0) })
    }

    fn store(&self, d: &Digest, stamp: u64) {
        self.copies.lock().unwrap().insert(d.clone(), Stored { size: 100, stamp });
    }

    fn holds(&self, d: &Digest) -> bool {
        self.copies.lock().unwrap().contains_key(d)
    }
}

fn unsupported() -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported, "not in this stand-in")
}

#[async_trait]
impl BlobStore for Nodes {
    async fn stat(&self, digest: &Digest) -> Result<Option<Stored>> {
        Ok(self.copies.lock().unwrap().get(digest).copied())
    }
    async fn read(&self, _: &Digest, _: Option<(u64, u64)>) -> Result<ByteStream> {
        Err(unsupported())
    }
    async fn read_small(&self, _: &Digest, _: u64) -> Result<Option<Bytes>> {
        Err(unsupported())
    }
    async fn put_small(&self, _: &Digest, _: Bytes) -> Result<Stored> {
        Err(unsupported())
    }
    async fn put(&self, _: &Digest, _: ByteStream, _: u64) -> Result<Stored> {
        Err(unsupported())
    }
    async fn upload_start(&self, _: &str) -> Result<Option<String>> {
        Err(unsupported())
    }
    async fn upload_append(&self, _: &str, _: Option<u64>, _: ByteStream, _: u64) -> Result<u64> {
        Err(unsupported())
    }
    async fn upload_size(&self, _: &str) -> Result<Option<u64>> {
        Err(unsupported())
    }
    async fn upload_finish(&self, _: &str, _: &Digest) -> Result<Stored> {
        Err(unsupported())
    }
    async fn upload_cancel(&self, _: &str) -> Result<()> {
        Err(unsupported())
    }
    async fn expire_uploads(&self, _: Duration) -> Result<Vec<String>> {
        Ok(vec![])
    }
    /// As a router does: every node that answers deletes its copy (all copies of one blob
    /// share a stamp here); the others are counted unreached; none answering is an error.
    async fn delete(&self, digest: &Digest, upto: Option<u64>) -> Result<Deleted> {
        let down = self.down.load(Ordering::SeqCst);
        if down >= self.nodes {
            return Err(RegistryError::new(ErrorCode::Unknown, "no node answers").with_status(503));
        }
        let mut copies = self.copies.lock().unwrap();
        let up = self.nodes - down;
        let mut done = Deleted { unreached: down, ..Deleted::default() };
        match copies.get(digest).copied() {
            None => {}
            Some(s) if upto.is_some_and(|u| s.stamp > u) => done.kept = up,
            Some(s) => {
                done.copies = up;
                done.bytes = s.size * u64::from(up);
                done.stamp = Some(s.stamp);
                if down == 0 {
                    copies.remove(digest);
                }
            }
        }
        Ok(done)
    }
    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>> {
        let copies = self.copies.lock().unwrap();
        Ok(copies
            .iter()
            .filter(|(d, _)| after.is_none_or(|a| *d > a))
            .take(n)
            .map(|(d, s)| (d.clone(), s.stamp))
            .collect())
    }
}

/// The grace period of these tests.
const GRACE: Duration = Duration::from_millis(10);

/// Waits out the grace period.
async fn past_grace() {
    tokio::time::sleep(2 * GRACE).await;
}

/// A collector over `nodes` that runs only when asked.
fn collector(nodes: &Arc<Nodes>, m: &MetaService) -> Collector {
    Collector::new(nodes.clone(), m.clone(), GRACE, Some(Duration::ZERO))
}

/// Links `name` in a repository and unlinks it: a deletion candidate from now on.
async fn unlinked(m: &MetaService, nodes: &Nodes, name: &str) -> Digest {
    let digest = d(name);
    let stamp = now_ms();
    nodes.store(&digest, stamp);
    m.link_blob("a/b", &digest, Stored { size: 100, stamp }).await.unwrap();
    assert!(m.unlink_blob("a/b", &digest).await.unwrap());
    digest
}

#[tokio::test]
async fn a_collection_another_leader_fenced_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let nodes = Nodes::new(3);
    let gone = unlinked(&m, &nodes, "gone").await;
    past_grace().await;
    // The previous leader fenced it and stopped before deleting anything.
    let fenced = m.begin_reap(GRACE, 10).await.unwrap();
    assert_eq!(fenced.fenced, vec![gone.clone()]);
    let c = collector(&nodes, &m);
    assert_eq!(c.collect(true).await.unwrap().blobs, 1, "a dry run counts the fenced blob");
    let report = c.collect(false).await.unwrap();
    assert_eq!((report.blobs, report.copies, report.copy_bytes), (1, 3, 300));
    assert!(!nodes.holds(&gone));
    assert!(m.reap_preview(Duration::ZERO, 10).await.unwrap().is_empty(), "no fence is left");
    m.shutdown().await;
}

#[tokio::test]
async fn copies_stamped_after_the_floor_are_kept_and_become_strays() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let nodes = Nodes::new(3);
    let blob = unlinked(&m, &nodes, "rewritten").await;
    past_grace().await;
    m.begin_reap(GRACE, 10).await.unwrap();
    // A push writes the blob again before the deletion (its stamp: a second from now, later
    // than any cutoff of this test's run).
    let again = now_ms() + 1000;
    nodes.store(&blob, again);
    let c = collector(&nodes, &m);
    let report = c.collect(false).await.unwrap();
    assert_eq!((report.blobs, report.kept), (0, 3), "{report:?}");
    assert!(nodes.holds(&blob), "a copy above the floor is never deleted");
    // Its link is accepted (it is younger than the floor) ...
    m.link_blob("a/b", &blob, Stored { size: 100, stamp: again }).await.unwrap();
    // ... and a link naming a copy at the floor is refused.
    let other = unlinked(&m, &nodes, "other").await;
    past_grace().await;
    let floor = m.begin_reap(GRACE, 10).await.unwrap().floor;
    m.blob_reaped(&other).await.unwrap();
    let e = m.link_blob("c/d", &other, Stored { size: 100, stamp: floor }).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::BlobUnknown);
    m.shutdown().await;
}

#[tokio::test]
async fn a_node_that_fails_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let nodes = Nodes::new(3);
    let blob = unlinked(&m, &nodes, "partly").await;
    past_grace().await;
    let c = collector(&nodes, &m);
    // Every node down: the fence stays and the run says so.
    nodes.down.store(3, Ordering::SeqCst);
    let e = c.collect(false).await.unwrap_err();
    assert_eq!(e.status, 503, "{e:?}");
    assert_eq!(m.reap_preview(Duration::ZERO, 10).await.unwrap(), vec![blob.clone()], "still fenced");
    // One node down: the others delete and the fence is lifted; the copy left behind is a
    // stray once its node answers again, and goes in a later round.
    nodes.down.store(1, Ordering::SeqCst);
    let r = c.round().await.unwrap();
    assert_eq!((r.released, r.copies.copies, r.copies.unreached), (1, 2, 1), "{r:?}");
    assert!(m.reap_preview(Duration::ZERO, 10).await.unwrap().is_empty());
    nodes.down.store(0, Ordering::SeqCst);
    let r = c.round().await.unwrap();
    assert_eq!(r.strays, 1, "{r:?}");
    past_grace().await;
    c.round().await.unwrap();
    assert!(!nodes.holds(&blob), "the stray copy is collected");
    m.shutdown().await;
}
