use super::*;

fn d(s: &str) -> Digest {
    Digest::sha256_of(s.as_bytes())
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

async fn open(dir: &std::path::Path) -> MetaService {
    MetaService::open_single(MetaConfig { dir: dir.to_path_buf(), node_id: 1, advertise: "127.0.0.1:0".into() })
        .await
        .unwrap()
}

#[tokio::test]
async fn links_manifests_tags_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = open(dir.path()).await;
        m.link_blob("a/b", &d("layer"), 5).await.unwrap();
        let err = m.put_manifest("a/b", record("m1", vec![d("missing")], None), vec!["v1".into()]).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::ManifestBlobUnknown);
        assert_eq!(m.manifest("a/b", &d("m1")).await.unwrap(), None);
        m.put_manifest("a/b", record("m1", vec![d("layer")], None), vec!["v1".into(), "latest".into()]).await.unwrap();
        m.put_manifest("a/b", record("sig", vec![d("layer")], Some(d("m1"))), vec![]).await.unwrap();
        m.shutdown().await;
    }
    let m = open(dir.path()).await;
    assert_eq!(m.tag("a/b", "v1").await.unwrap(), Some(d("m1")));
    assert_eq!(m.tags("a/b", None, 10).await.unwrap(), Some(vec!["latest".to_string(), "v1".to_string()]));
    assert_eq!(m.tags("a/b", Some("latest"), 10).await.unwrap(), Some(vec!["v1".to_string()]));
    assert_eq!(m.tags("a/c", None, 10).await.unwrap(), None);
    assert_eq!(m.referrers("a/b", &d("m1")).await.unwrap()[0].digest, d("sig"));
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
            m.link_blob("x/y", &d(&i.to_string()), i).await.unwrap();
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
    let m = open(dir.path()).await;
    assert_eq!(m.blob_link("x/y", &d("49")).await.unwrap(), Some(49));
    m.shutdown().await;
}

#[tokio::test]
async fn unlinked_blobs_are_fenced_then_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    m.link_blob("a/one", &d("b"), 1).await.unwrap();
    m.link_blob("a/two", &d("b"), 1).await.unwrap();
    assert!(m.unlink_blob("a/one", &d("b")).await.unwrap());
    assert!(m.begin_reap(Duration::ZERO, 10).await.unwrap().is_empty(), "still linked in a/two");
    assert!(m.unlink_blob("a/two", &d("b")).await.unwrap());
    assert!(m.begin_reap(Duration::from_secs(3600), 10).await.unwrap().is_empty(), "within grace");
    assert_eq!(m.begin_reap(Duration::ZERO, 10).await.unwrap(), vec![d("b")]);
    let err = m.link_blob("a/one", &d("b"), 1).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BlobUnknown);
    m.blob_reaped(&d("b")).await.unwrap();
    m.link_blob("a/one", &d("b"), 1).await.unwrap();
    m.shutdown().await;
}

#[tokio::test]
async fn upload_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let s = UploadSession { id: "u1".into(), repo: "r/s".into(), started_at_ms: 7 };
    m.create_upload(s.clone()).await.unwrap();
    assert_eq!(m.upload("u1").await.unwrap(), Some(s));
    m.end_upload("u1", Some((d("blob"), 3))).await.unwrap();
    assert_eq!(m.upload("u1").await.unwrap(), None);
    assert_eq!(m.blob_link("r/s", &d("blob")).await.unwrap(), Some(3));
    assert_eq!(m.end_upload("u1", None).await.unwrap_err().code, ErrorCode::BlobUploadUnknown);
    m.shutdown().await;
}
