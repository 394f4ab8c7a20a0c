use super::*;
use berth_core::access::{Perm, Principal, Scope};
use berth_core::store::TokenOwner;

pub(crate) fn d(s: &str) -> Digest {
    Digest::sha256_of(s.as_bytes())
}

/// A stored copy with a stamp above any reap floor these tests reach.
fn stored(size: u64) -> Stored {
    Stored { size, stamp: 1_000 }
}

fn record(name: &str, blobs: Vec<Digest>, subject: Option<Digest>) -> ManifestRecord {
    ManifestRecord {
        digest: d(name),
        media_type: berth_core::manifest::OCI_MANIFEST.into(),
        size: 100,
        subject,
        artifact_type: Some("application/x-test".into()),
        annotations: Default::default(),
        blobs,
        manifests: vec![],
        pushed_at_ms: 1,
    }
}

fn index(name: &str, children: Vec<Digest>) -> ManifestRecord {
    ManifestRecord {
        media_type: berth_core::manifest::OCI_INDEX.into(),
        blobs: vec![],
        manifests: children,
        ..record(name, vec![], None)
    }
}

pub(crate) async fn open(dir: &std::path::Path) -> MetaService {
    MetaService::open_single(MetaConfig { dir: dir.to_path_buf(), node_id: 1, advertise: "127.0.0.1:0".into() })
        .await
        .unwrap()
}

#[tokio::test]
async fn links_manifests_tags_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = open(dir.path()).await;
        m.link_blob("a/b", &d("layer"), stored(5)).await.unwrap();
        let err = m
            .put_manifest("a/b", record("m1", vec![d("missing")], None), vec!["v1".into()], stored(100), None)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ManifestBlobUnknown);
        assert_eq!(m.manifest("a/b", &d("m1")).await.unwrap(), None);
        m.put_manifest(
            "a/b",
            record("m1", vec![d("layer")], None),
            vec!["v1".into(), "latest".into()],
            stored(100),
            None,
        )
        .await
        .unwrap();
        m.put_manifest("a/b", record("sig", vec![d("layer")], Some(d("m1"))), vec![], stored(100), None).await.unwrap();
        m.shutdown().await;
    }
    let m = open(dir.path()).await;
    assert_eq!(m.tag("a/b", "v1").await.unwrap(), Some(d("m1")));
    assert_eq!(m.tags("a/b", None, 10).await.unwrap(), Some(vec!["latest".to_string(), "v1".to_string()]));
    assert_eq!(m.tags("a/b", Some("latest"), 10).await.unwrap(), Some(vec!["v1".to_string()]));
    assert_eq!(m.tags("a/c", None, 10).await.unwrap(), None);
    assert_eq!(m.referrers("a/b", &d("m1"), None, 10).await.unwrap()[0].digest, d("sig"));
    assert_eq!(m.blob_link("a/b", &d("layer")).await.unwrap(), Some(5));
    assert_eq!(m.blob_link("a/b", &d("m1")).await.unwrap(), Some(100));
    assert_eq!(m.repositories(None, 10).await.unwrap(), vec!["a/b".to_string()]);
    assert!(m.delete_manifest("a/b", &d("m1")).await.unwrap());
    assert_eq!(m.tag("a/b", "v1").await.unwrap(), None);
    assert_eq!(m.tag("a/b", "latest").await.unwrap(), None);
    m.shutdown().await;
}

#[tokio::test]
async fn snapshot_purges_log_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = open(dir.path()).await;
        for i in 0..50 {
            m.link_blob("x/y", &d(&i.to_string()), stored(i)).await.unwrap();
        }
        m.snapshot().await.unwrap();
        let mut metrics = m.raft().metrics();
        let purged = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if metrics.borrow().snapshot.is_some() {
                    return metrics.borrow().snapshot;
                }
                metrics.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        assert!(purged.unwrap().index >= 50);
        m.shutdown().await;
    }
    assert!(dir.path().join("snapshot").exists());
    assert!(!dir.path().join("snapshot.tmp").exists());
    let m = open(dir.path()).await;
    assert_eq!(m.blob_link("x/y", &d("49")).await.unwrap(), Some(49));
    m.shutdown().await;
}

#[tokio::test]
async fn unlinked_blobs_are_fenced_then_reaped_and_stale_copies_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    m.link_blob("a/one", &d("b"), stored(1)).await.unwrap();
    m.link_blob("a/two", &d("b"), stored(1)).await.unwrap();
    assert!(m.unlink_blob("a/one", &d("b")).await.unwrap());
    assert!(m.begin_reap(Duration::from_secs(3600), 10).await.unwrap().fenced.is_empty(), "still linked in a/two");
    assert!(m.unlink_blob("a/two", &d("b")).await.unwrap());
    assert!(m.begin_reap(Duration::from_secs(3600), 10).await.unwrap().fenced.is_empty(), "within grace");
    assert_eq!(m.reap_preview(Duration::ZERO, 10).await.unwrap(), vec![d("b")], "a dry run sees it");
    let before = berth_core::now_ms();
    let reap = m.begin_reap(Duration::ZERO, 10).await.unwrap();
    assert_eq!(reap.fenced, vec![d("b")]);
    assert!(reap.floor >= before, "fencing raises the floor to the cutoff");
    // Fenced: no link while the bytes are being deleted.
    let err = m.link_blob("a/one", &d("b"), stored(1)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BlobUnknown);
    // A step that finds its predecessor's fence (a new leader's) deletes it again, under a
    // floor at least as high.
    let again = m.begin_reap(Duration::ZERO, 10).await.unwrap();
    assert_eq!(again.fenced, vec![d("b")]);
    assert!(again.floor >= reap.floor);
    m.blob_reaped(&d("b")).await.unwrap();
    // A push that found a copy the collector may have deleted carries its stamp: refused.
    let err = m.link_blob("a/one", &d("b"), Stored { size: 1, stamp: again.floor }).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BlobUnknown);
    // A copy written (or found and stamped again) after the floor links.
    m.link_blob("a/one", &d("b"), Stored { size: 1, stamp: again.floor + 1 }).await.unwrap();
    // Once linked somewhere, the bytes exist: a link with an older stamp is safe.
    m.link_blob("a/two", &d("b"), Stored { size: 1, stamp: 5 }).await.unwrap();
    m.shutdown().await;
}

#[tokio::test]
async fn manifests_hold_their_blobs_and_release_them_when_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    for b in ["cfg", "l1", "shared"] {
        m.link_blob("a/app", &d(b), stored(1)).await.unwrap();
    }
    m.put_manifest(
        "a/app",
        record("img1", vec![d("cfg"), d("l1"), d("shared")], None),
        vec!["v1".into()],
        stored(9),
        None,
    )
    .await
    .unwrap();
    m.put_manifest("a/app", record("img2", vec![d("shared")], None), vec!["v2".into()], stored(9), None).await.unwrap();
    // Referenced blobs and manifests' own bytes cannot be deleted as blobs.
    for b in ["l1", "shared", "img1"] {
        let e = m.unlink_blob("a/app", &d(b)).await.unwrap_err();
        assert_eq!((e.code, e.status), (ErrorCode::Denied, 409), "{b}");
    }
    // Loose links are kept within the grace period, and while an upload is in progress.
    assert!(m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced.is_empty());
    assert!(m.delete_manifest("a/app", &d("img1")).await.unwrap());
    let up =
        UploadSession { id: "u1".into(), repo: "a/app".into(), started_at_ms: 1, owner: "x".into(), staging: None };
    m.create_upload(up, 10, None).await.unwrap();
    let preview = m.reap_preview(Duration::ZERO, 10).await.unwrap();
    assert_eq!(preview, vec![d("img1")], "no loose link goes while uploading; the manifest's bytes do");
    assert_eq!(m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced, vec![d("img1")], "only the manifest's bytes");
    m.blob_reaped(&d("img1")).await.unwrap();
    m.end_upload("u1", None).await.unwrap();
    let mut preview = m.reap_preview(Duration::ZERO, 10).await.unwrap();
    preview.sort();
    let mut reaped = m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced;
    reaped.sort();
    let mut expected = vec![d("cfg"), d("l1")];
    expected.sort();
    assert_eq!(reaped, expected, "what only img1 held goes; what img2 holds stays");
    assert_eq!(preview, expected, "a dry run foresaw it");
    assert_eq!(m.blob_link("a/app", &d("shared")).await.unwrap(), Some(1));
    assert!(m.repo_exists("a/app").await.unwrap());
    assert!(m.delete_manifest("a/app", &d("img2")).await.unwrap());
    assert!(!m.repo_exists("a/app").await.unwrap(), "an emptied repository is gone");
    assert_eq!(m.tags("a/app", None, 10).await.unwrap(), None);
    assert!(m.repositories(None, 10).await.unwrap().is_empty());
    m.shutdown().await;
}

#[tokio::test]
async fn index_children_are_held_and_go_with_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    m.link_blob("a/multi", &d("layer"), stored(1)).await.unwrap();
    m.put_manifest("a/multi", record("amd64", vec![d("layer")], None), vec![], stored(9), None).await.unwrap();
    m.put_manifest("a/multi", record("arm64", vec![d("layer")], None), vec!["arm".into()], stored(9), None)
        .await
        .unwrap();
    m.put_manifest("a/multi", index("idx", vec![d("amd64"), d("arm64")]), vec!["v1".into()], stored(9), None)
        .await
        .unwrap();
    let e = m.delete_manifest("a/multi", &d("amd64")).await.unwrap_err();
    assert_eq!((e.code, e.status), (ErrorCode::Denied, 409));
    assert!(m.delete_manifest("a/multi", &d("idx")).await.unwrap());
    assert_eq!(m.manifest("a/multi", &d("amd64")).await.unwrap(), None, "untagged child goes with its index");
    assert!(m.manifest("a/multi", &d("arm64")).await.unwrap().is_some(), "a tagged child stays");
    m.shutdown().await;
}

#[tokio::test]
async fn commands_of_one_batch_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    m.link_blob("a/b", &d("layer"), stored(5)).await.unwrap();
    let put = Command::PutManifest {
        repo: "a/b".into(),
        record: record("m1", vec![d("layer")], None),
        tags: vec!["v1".into()],
        bytes: stored(100),
        now_ms: 1,
    };
    let delete = Command::DeleteManifest { repo: "a/b".into(), digest: d("m1"), now_ms: 2 };
    m.write(Command::Batch(vec![put, delete])).await.unwrap();
    assert_eq!(m.manifest("a/b", &d("m1")).await.unwrap(), None);
    assert_eq!(m.tag("a/b", "v1").await.unwrap(), None, "no tag left pointing at a deleted manifest");

    let user = User { name: "carol".into(), site_admin: false, created_ms: 1 };
    m.change_directory(DirectoryChange::CreateUser(user)).await.unwrap();
    let token = TokenRecord {
        id: "t1".into(),
        owner: TokenOwner::User("carol".into()),
        name: "t".into(),
        scopes: vec![Scope::ReadPackages],
        sha256: "00".into(),
        created_ms: 1,
        expires_ms: None,
        last_used_ms: None,
    };
    m.write(Command::Batch(vec![
        Command::Directory(DirectoryChange::CreateToken(token)),
        Command::Directory(DirectoryChange::DeleteUser("carol".into())),
    ]))
    .await
    .unwrap();
    assert_eq!(m.token("t1").await.unwrap(), None, "a token created beside its user's deletion goes with it");
    assert!(m.tokens_of("carol").await.unwrap().is_empty());
    m.shutdown().await;
}

#[tokio::test]
async fn upload_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let s = UploadSession {
        id: "u1".into(),
        repo: "r/s".into(),
        started_at_ms: 7,
        owner: "alice".into(),
        staging: Some("node-a".into()),
    };
    let before = berth_core::now_ms();
    m.create_upload(s.clone(), 2, None).await.unwrap();
    // The start is the service's own time, not the caller's.
    let got = m.upload("u1").await.unwrap().unwrap();
    assert!(got.started_at_ms >= before, "{got:?}");
    assert_eq!(got, UploadSession { started_at_ms: got.started_at_ms, ..s.clone() });
    assert_eq!(m.uploads_of("alice", 10).await.unwrap(), 1);
    // The cap on open sessions per owner is checked in the same write that records one.
    let second = UploadSession { id: "u2".into(), ..s.clone() };
    m.create_upload(second, 2, None).await.unwrap();
    let third = UploadSession { id: "u3".into(), ..s.clone() };
    let e = m.create_upload(third, 2, None).await.unwrap_err();
    assert_eq!((e.code, e.status), (ErrorCode::TooManyRequests, 429));
    assert_eq!(m.upload("u3").await.unwrap(), None, "a refused session is not recorded");
    m.create_upload(UploadSession { id: "u4".into(), owner: "bob".into(), ..s.clone() }, 2, None).await.unwrap();
    for id in ["u2", "u4"] {
        m.end_upload(id, None).await.unwrap();
    }
    m.end_upload("u1", Some((d("blob"), stored(3)))).await.unwrap();
    assert_eq!(m.upload("u1").await.unwrap(), None);
    assert_eq!(m.uploads_of("alice", 10).await.unwrap(), 0);
    assert_eq!(m.blob_link("r/s", &d("blob")).await.unwrap(), Some(3));
    assert_eq!(m.end_upload("u1", None).await.unwrap_err().code, ErrorCode::BlobUploadUnknown);
    m.shutdown().await;
}

#[tokio::test]
async fn strays_become_candidates_unless_known() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    m.link_blob("a/b", &d("known"), stored(1)).await.unwrap();
    m.put_manifest("a/b", record("img", vec![d("known")], None), vec![], stored(9), None).await.unwrap();
    let unknown = m.unknown_blobs(vec![d("known"), d("stray")]).await.unwrap();
    assert_eq!(unknown, vec![d("stray")]);
    m.note_strays(unknown).await.unwrap();
    assert_eq!(m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced, vec![d("stray")]);
    m.shutdown().await;
}

#[tokio::test]
async fn storage_nodes_register_and_the_map_version_moves_only_on_change() {
    use berth_core::store::StorageNode;
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let node = |name: &str, addr: &str| StorageNode {
        name: name.into(),
        addr: addr.into(),
        zone: Some("a".into()),
        capacity: 100,
        seen_ms: 0,
        state: Default::default(),
        stats: Default::default(),
        since_version: 0,
    };
    assert_eq!(m.placement().await.unwrap().nodes.len(), 0);
    m.register_storage(node("s1", "10.0.0.1:7100")).await.unwrap();
    m.register_storage(node("s2", "10.0.0.2:7100")).await.unwrap();
    let map = m.placement().await.unwrap();
    assert_eq!(map.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["s1", "s2"]);
    assert!(map.nodes.iter().all(|n| n.seen_ms > 0), "the service stamps the heartbeat");
    // A heartbeat changes nothing but the time seen.
    m.register_storage(node("s1", "10.0.0.1:7100")).await.unwrap();
    assert_eq!(m.placement().await.unwrap().version, map.version);
    // A new address is a change.
    m.register_storage(node("s1", "10.0.0.9:7100")).await.unwrap();
    let moved = m.placement().await.unwrap();
    assert!(moved.version > map.version);
    // A node under a new name at an address already known replaces the old entry.
    m.register_storage(node("s2-renamed", "10.0.0.2:7100")).await.unwrap();
    let renamed = m.placement().await.unwrap();
    assert_eq!(renamed.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["s1", "s2-renamed"]);
    assert!(renamed.version > moved.version);
    m.shutdown().await;
}

/// A node declared dead (as the leader last heard it) comes back with its next heartbeat, and
/// one heard from since the leader decided stays live; a drained node stays draining across
/// heartbeats and is removed only once a pass it completed after the drain found it empty; a
/// removed node's name cannot register again.
#[tokio::test]
async fn storage_nodes_die_come_back_drain_and_are_removed() {
    use berth_core::store::{NodeState, NodeStats, StorageChange, StorageNode};
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let node = |name: &str, blobs: u64, pass_version: u64| StorageNode {
        name: name.into(),
        addr: format!("{name}:7100"),
        zone: None,
        capacity: 100,
        seen_ms: 0,
        state: NodeState::Live,
        stats: NodeStats { blobs, pass_version, ..NodeStats::default() },
        since_version: 0,
    };
    let get = |map: &berth_core::store::PlacementMap, name: &str| map.nodes.iter().find(|n| n.name == name).cloned();
    m.register_storage(node("s1", 5, 0)).await.unwrap();
    m.register_storage(node("s2", 5, 0)).await.unwrap();
    let before = m.placement().await.unwrap();
    let (s1, s2) = (get(&before, "s1").unwrap(), get(&before, "s2").unwrap());
    // s2 was heard from after the leader decided (its heartbeat time moved on): it stays.
    let stale_s2 = s2.seen_ms - 1;
    let dead = StorageChange::DeclareDead { nodes: vec![("s1".into(), s1.seen_ms), ("s2".into(), stale_s2)] };
    assert!(m.change_storage(dead).await.unwrap());
    let expired = m.placement().await.unwrap();
    assert_eq!(get(&expired, "s1").unwrap().state, NodeState::Dead);
    assert_eq!(get(&expired, "s2").unwrap().state, NodeState::Live);
    assert!(expired.version > before.version);
    assert_eq!(get(&expired, "s1").unwrap().since_version, expired.version);
    // Undrain does not wake the dead; its own heartbeat does, and that changes the map.
    assert!(!m.change_storage(StorageChange::Undrain { name: "s1".into() }).await.unwrap());
    m.register_storage(node("s1", 5, 0)).await.unwrap();
    let back = m.placement().await.unwrap();
    assert_eq!(get(&back, "s1").unwrap().state, NodeState::Live);
    assert!(back.version > expired.version);

    // Draining outlasts heartbeats; removal waits for a pass after the drain that found nothing.
    assert!(m.change_storage(StorageChange::Drain { name: "s2".into() }).await.unwrap());
    let drained_at = m.placement().await.unwrap().version;
    m.register_storage(node("s2", 5, drained_at)).await.unwrap();
    assert_eq!(get(&m.placement().await.unwrap(), "s2").unwrap().state, NodeState::Draining);
    let refused = m.change_storage(StorageChange::Remove { name: "s2".into(), force: false }).await.unwrap_err();
    assert_eq!(refused.status, 409, "{refused:?}");
    // No blobs, but as counted before the drain (a restarted node reports nothing yet): refused.
    m.register_storage(node("s2", 0, drained_at - 1)).await.unwrap();
    assert!(m.change_storage(StorageChange::Remove { name: "s2".into(), force: false }).await.is_err());
    m.register_storage(node("s2", 0, drained_at)).await.unwrap();
    assert!(m.change_storage(StorageChange::Remove { name: "s2".into(), force: false }).await.unwrap());
    let removed = m.placement().await.unwrap();
    assert_eq!(removed.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["s1"]);
    let again = m.register_storage(node("s2", 0, 0)).await.unwrap_err();
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(m.placement().await.unwrap().nodes.len(), 1);
    // Unknown names; a live (or dead) node goes only by force.
    let unknown = m.change_storage(StorageChange::Drain { name: "nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code, ErrorCode::NameUnknown);
    assert!(m.change_storage(StorageChange::Remove { name: "s1".into(), force: false }).await.is_err());
    assert!(m.change_storage(StorageChange::Remove { name: "s1".into(), force: true }).await.unwrap());
    m.shutdown().await;
}

/// An upload entry written before the per-owner cap existed still applies (without a cap),
/// and one written now carries its cap in a field an earlier version ignores.
#[test]
fn upload_entries_of_before_and_after_the_cap_decode() {
    let old = r#"{"CreateUpload":{"session":{"id":"u1","repo":"a/b","started_at_ms":5,"owner":"x"}}}"#;
    let cmd: Command = serde_json::from_str(old).unwrap();
    let Command::CreateUpload { session, at_most } = cmd else { panic!("{cmd:?}") };
    assert_eq!((session.id.as_str(), session.staging, at_most), ("u1", None, 0));
    let new = Command::CreateUpload {
        session: UploadSession {
            id: "u2".into(),
            repo: "a/b".into(),
            started_at_ms: 6,
            owner: "x".into(),
            staging: Some("n1".into()),
        },
        at_most: 10,
    };
    let json = serde_json::to_value(&new).unwrap();
    assert_eq!(json["CreateUpload"]["at_most"], 10);
    assert_eq!(json["CreateUpload"]["session"]["staging"], "n1");
    assert_eq!(serde_json::from_value::<Command>(json).unwrap(), new);
}

#[tokio::test]
async fn deleted_versions_keep_what_they_hold_until_purged() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let pkg = |c: DirectoryChange| {
        let m = m.clone();
        async move { m.change_directory(c).await }
    };
    pkg(DirectoryChange::EnsurePackage { repo: "a/multi".into(), source: None, creator: None, now_ms: 1 })
        .await
        .unwrap();
    m.link_blob("a/multi", &d("layer"), stored(1)).await.unwrap();
    m.put_manifest("a/multi", record("amd64", vec![d("layer")], None), vec![], stored(9), None).await.unwrap();
    m.put_manifest("a/multi", record("arm64", vec![d("layer")], None), vec![], stored(9), None).await.unwrap();
    m.put_manifest("a/multi", index("idx", vec![d("amd64"), d("arm64")]), vec!["v1".into()], stored(9), None)
        .await
        .unwrap();
    let version =
        |name: &str| DirectoryChange::DeleteVersion { repo: "a/multi".into(), digest: d(name).to_string(), now_ms: 0 };
    let e = pkg(version("amd64")).await.unwrap_err();
    assert_eq!(e.status, 409, "a platform of a live index");
    assert!(pkg(DirectoryChange::DeletePackage { repo: "a/multi".into(), now_ms: 0 }).await.unwrap());
    assert_eq!(m.tagged_manifest("a/multi", "v1").await.unwrap(), None);
    assert_eq!(m.manifest("a/multi", &d("amd64")).await.unwrap(), None);
    assert!(m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced.is_empty(), "deleted versions hold their blobs");
    // Their own bytes too: not unlinked as a blob, not made loose by a link of the same digest.
    let e = m.unlink_blob("a/multi", &d("idx")).await.unwrap_err();
    assert_eq!(e.status, 409);
    m.link_blob("a/multi", &d("idx"), stored(9)).await.unwrap();
    assert_eq!(m.blob_link("a/multi", &d("idx")).await.unwrap(), None, "not served while deleted");
    assert!(m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced.is_empty());
    let versions = m.package_versions("a/multi").await.unwrap();
    assert!(versions.len() == 3 && versions.iter().all(|v| v.deleted_ms.is_some()));
    // Restoring the index restores its platforms with it.
    let restore = DirectoryChange::RestoreVersion {
        repo: "a/multi".into(),
        digest: d("idx").to_string(),
        window_ms: 0,
        now_ms: 0,
    };
    assert!(pkg(restore).await.unwrap());
    assert_eq!(m.tagged_manifest("a/multi", "v1").await.unwrap().map(|r| r.digest), Some(d("idx")));
    assert!(m.manifest("a/multi", &d("arm64")).await.unwrap().is_some());
    // Within the retention period nothing is purged; past it, everything, platforms after
    // their index, and then collection takes the blobs.
    assert!(pkg(DirectoryChange::DeletePackage { repo: "a/multi".into(), now_ms: 0 }).await.unwrap());
    assert_eq!(m.purge_deleted(Duration::from_secs(3600), 10).await.unwrap(), 0);
    let mut purged = 0;
    for _ in 0..3 {
        purged += m.purge_deleted(Duration::ZERO, 10).await.unwrap();
    }
    assert_eq!(purged, 3);
    assert!(m.package_versions("a/multi").await.unwrap().is_empty());
    let mut fenced = m.begin_reap(Duration::ZERO, 10).await.unwrap().fenced;
    fenced.sort();
    let mut all = vec![d("layer"), d("amd64"), d("arm64"), d("idx")];
    all.sort();
    assert_eq!(fenced, all);
    m.shutdown().await;
}

/// The write that starts a push creates its repository's package for the pusher in the same
/// write: administered by the user who pushes, linked to the source a CI token pushes for. A
/// live package is left as it is, a deleted one gives way to a new one, and a refused write
/// creates nothing.
#[tokio::test]
async fn a_push_creates_its_package_in_its_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let package = |repo: &'static str| {
        let m = m.clone();
        async move { m.access_facts(&Identity::Anonymous, repo).await.unwrap().package }
    };
    let admins = |p: &Package| p.grants.iter().filter(|(_, perm)| **perm == Perm::Admin).count();
    let mia = Pusher { source: None, creator: Some("mia".into()) };
    let ci = Pusher { source: Some("acme/web".into()), creator: None };
    let s = UploadSession {
        id: "u1".into(),
        repo: "acme/new".into(),
        started_at_ms: 0,
        owner: "mia".into(),
        staging: None,
    };

    m.create_upload(s.clone(), 1, Some(mia.clone())).await.unwrap();
    let p = package("acme/new").await.expect("the session's write created the package");
    assert_eq!(p.grants.get(&Principal::User("mia".into())), Some(&Perm::Admin), "{p:?}");
    assert_eq!((p.source.as_deref(), p.deleted_ms), (None, None));

    // Refused (the owner's cap), the write creates no package either.
    let other = UploadSession { id: "u2".into(), repo: "acme/other".into(), ..s.clone() };
    let e = m.create_upload(other, 1, Some(mia.clone())).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    assert_eq!(package("acme/other").await, None);

    // A manifest pushed by a CI token to a repository without a package.
    m.end_upload("u1", Some((d("layer"), stored(3)))).await.unwrap();
    let ci_up = UploadSession { id: "u3".into(), repo: "acme/ci".into(), owner: "ci:acme/web".into(), ..s.clone() };
    m.create_upload(ci_up, 0, None).await.unwrap();
    m.end_upload("u3", Some((d("layer"), stored(3)))).await.unwrap();
    assert_eq!(package("acme/ci").await, None, "a write without a pusher creates none");
    m.put_manifest("acme/ci", record("img", vec![d("layer")], None), vec!["v1".into()], stored(9), Some(ci.clone()))
        .await
        .unwrap();
    let p = package("acme/ci").await.expect("the manifest's write created the package");
    assert_eq!((p.source.as_deref(), admins(&p)), (Some("acme/web"), 0));

    // A live package stays as it is; a deleted one gives way to the pusher's.
    m.put_manifest("acme/new", record("img", vec![d("layer")], None), vec!["v1".into()], stored(9), Some(ci.clone()))
        .await
        .unwrap();
    assert_eq!(package("acme/new").await.unwrap().source, None, "the live package was kept");
    assert!(m.change_directory(DirectoryChange::DeletePackage { repo: "acme/new".into(), now_ms: 0 }).await.unwrap());
    let again = UploadSession { id: "u4".into(), repo: "acme/new".into(), owner: "ci:acme/web".into(), ..s.clone() };
    m.create_upload(again, 0, Some(ci)).await.unwrap();
    let p = package("acme/new").await.unwrap();
    assert_eq!((p.deleted_ms, p.source.as_deref(), admins(&p)), (None, Some("acme/web"), 0), "{p:?}");
    m.shutdown().await;
}

/// A push's first write travels (bincode, between nodes) and is kept (JSON, in the log) whole.
#[test]
fn a_pushed_write_encodes_both_ways() {
    let session =
        UploadSession { id: "u1".into(), repo: "a/b".into(), started_at_ms: 5, owner: "x".into(), staging: None };
    let cmd = Command::Pushed {
        pusher: Pusher { source: Some("a/src".into()), creator: Some("x".into()) },
        now_ms: 5,
        command: Box::new(Command::CreateUpload { session, at_most: 3 }),
    };
    let json = serde_json::to_vec(&cmd).unwrap();
    assert_eq!(serde_json::from_slice::<Command>(&json).unwrap(), cmd);
    let bin = bincode::serialize(&cmd).unwrap();
    assert_eq!(bincode::deserialize::<Command>(&bin).unwrap(), cmd);
}

/// Upload sessions are written behind (see [`sessions`]): one ended within the window writes
/// one command for the whole upload (the blob's link) or none (a cancel); the caller's cap
/// counts the sessions in memory; past the window they are on the log and end there; a
/// graceful stop writes the rest.
#[tokio::test]
async fn upload_sessions_are_written_behind() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let log = |m: &MetaService| m.raft().metrics().borrow().last_log_index.unwrap_or(0);
    let on_log = |m: &MetaService, id: &str| m.view.get::<UploadSession>(&key(b'u', &[id])).unwrap().is_some();
    let s = |id: &str| UploadSession {
        id: id.into(),
        repo: "acme/app".into(),
        started_at_ms: 0,
        owner: "mia".into(),
        staging: None,
    };
    let mia = Some(Pusher { source: None, creator: Some("mia".into()) });
    // A push's first session in a repository creates its package, on the log at once.
    m.create_upload(s("first"), 0, mia.clone()).await.unwrap();
    assert!(on_log(&m, "first"));
    m.end_upload("first", None).await.unwrap();

    let before = log(&m);
    m.create_upload(s("quick"), 10, mia.clone()).await.unwrap();
    assert_eq!(log(&m), before, "a new session is not on the log yet");
    assert_eq!(m.upload("quick").await.unwrap().map(|u| u.repo), Some("acme/app".to_string()));
    assert_eq!(m.uploads_of("mia", 10).await.unwrap(), 1);
    let listed: Vec<String> = m.uploads(None, 10).await.unwrap().into_iter().map(|u| u.id).collect();
    assert_eq!(listed, vec!["quick".to_string()], "listed with those on the log");
    m.end_upload("quick", Some((d("layer"), stored(3)))).await.unwrap();
    assert_eq!(log(&m), before + 1, "the whole upload wrote one command");
    assert!(m.blob_link("acme/app", &d("layer")).await.unwrap().is_some());
    assert_eq!(m.upload("quick").await.unwrap(), None);
    assert_eq!(m.uploads_of("mia", 10).await.unwrap(), 0);
    assert!(!on_log(&m, "quick"));

    m.create_upload(s("dropped"), 10, mia.clone()).await.unwrap();
    m.end_upload("dropped", None).await.unwrap();
    assert_eq!(log(&m), before + 1, "a cancel within the window writes nothing");

    m.create_upload(s("a"), 2, mia.clone()).await.unwrap();
    m.create_upload(s("b"), 2, mia.clone()).await.unwrap();
    let e = m.create_upload(s("c"), 2, mia.clone()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TooManyRequests, "the cap counts sessions in memory");

    let deadline = std::time::Instant::now() + sessions::WRITE_BEHIND * 5;
    while !(on_log(&m, "a") && on_log(&m, "b") && m.sessions.lock().is_empty()) {
        assert!(std::time::Instant::now() < deadline, "sessions past the window reach the log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(m.uploads_of("mia", 10).await.unwrap(), 2, "counted once, on the log");
    let e = m.create_upload(s("c"), 2, mia.clone()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    m.end_upload("a", Some((d("second"), stored(3)))).await.unwrap();
    assert!(!on_log(&m, "a"));
    assert!(m.blob_link("acme/app", &d("second")).await.unwrap().is_some());

    // Ended while on its way to the log: its end waits for its creation, so none is left.
    m.create_upload(s("racing"), 0, mia.clone()).await.unwrap();
    let sent = persist(&m.sessions, &m.writes, m.leading_term(), |_| true);
    assert_eq!(sent.len(), 1);
    let settling = tokio::spawn(settle(m.sessions.clone(), sent));
    m.end_upload("racing", Some((d("third"), stored(3)))).await.unwrap();
    settling.await.unwrap();
    assert!(!on_log(&m, "racing"), "no session is left behind");
    assert!(m.blob_link("acme/app", &d("third")).await.unwrap().is_some());
    assert_eq!(m.uploads_of("mia", 10).await.unwrap(), 1, "b alone is open");

    m.create_upload(s("kept"), 0, mia.clone()).await.unwrap();
    assert!(!on_log(&m, "kept"));
    m.shutdown().await;
    assert!(on_log(&m, "kept"), "a graceful stop writes the sessions in memory");
}
