use super::*;
use berth_core::Algorithm;

fn engine() -> (tempfile::TempDir, StorageEngine) {
    let dir = tempfile::tempdir().unwrap();
    let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
    (dir, e)
}

fn body(parts: Vec<Vec<u8>>) -> ByteStream {
    futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p)))).boxed()
}

async fn collect(s: ByteStream) -> Vec<u8> {
    let mut out = vec![];
    let mut s = s;
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn chunked_upload_large_and_small() {
    let (_d, e) = engine();
    for n in [0usize, 10, INLINE_THRESHOLD as usize, INLINE_THRESHOLD as usize + 1, 3 * WRITE_BUFFER + 7] {
        let bytes = data(n);
        let digest = Digest::sha256_of(&bytes);
        let id = uuid::Uuid::new_v4().to_string();
        e.upload_start(&id).await.unwrap();
        let half = n / 2;
        assert_eq!(
            e.upload_append(&id, Some(0), body(vec![bytes[..half].to_vec()]), u64::MAX).await.unwrap(),
            half as u64
        );
        // A chunk that does not start where the upload ends is refused and changes nothing.
        let gap = e.upload_append(&id, Some(half as u64 + 1), body(vec![vec![1]]), u64::MAX).await.unwrap_err();
        assert_eq!(gap.status, 416);
        assert_eq!(e.upload_size(&id).await.unwrap(), Some(half as u64));
        e.upload_append(&id, Some(half as u64), body(vec![bytes[half..].to_vec()]), u64::MAX).await.unwrap();
        assert_eq!(e.upload_finish(&id, &digest).await.unwrap().size, n as u64);
        assert_eq!(e.upload_size(&id).await.unwrap(), None);
        assert_eq!(e.stat(&digest).await.unwrap().map(|b| b.size), Some(n as u64));
        assert_eq!(collect(e.read(&digest, None).await.unwrap()).await, bytes);
        if n > 10 {
            assert_eq!(collect(e.read(&digest, Some((3, 9))).await.unwrap()).await, bytes[3..=9].to_vec());
        }
        assert_eq!(e.scrub(&digest).await.unwrap(), Some(true));
    }
}

#[tokio::test]
async fn digest_mismatch_stores_nothing() {
    let (_d, e) = engine();
    let wrong = Digest::sha256_of(b"other");
    let err = e.put(&wrong, body(vec![data(1000)]), u64::MAX).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::DigestInvalid);
    assert_eq!(e.stat(&wrong).await.unwrap(), None);
    assert_eq!(e.stat(&Digest::sha256_of(&data(1000))).await.unwrap(), None);
}

#[tokio::test]
async fn sha512_is_verified() {
    let (_d, e) = engine();
    let bytes = data(500_000);
    let mut h = Algorithm::Sha512.hasher();
    h.update(&bytes);
    let digest = h.finish();
    assert_eq!(e.put(&digest, body(vec![bytes.clone()]), u64::MAX).await.unwrap().size, 500_000);
    assert_eq!(collect(e.read(&digest, None).await.unwrap()).await, bytes);
}

#[tokio::test]
async fn limit_refuses_and_rolls_back() {
    let (_d, e) = engine();
    let id = uuid::Uuid::new_v4().to_string();
    e.upload_start(&id).await.unwrap();
    e.upload_append(&id, None, body(vec![data(100)]), 150).await.unwrap();
    let err = e.upload_append(&id, None, body(vec![data(30), data(30)]), 150).await.unwrap_err();
    assert_eq!((err.code, err.status), (ErrorCode::SizeInvalid, 413));
    assert_eq!(e.upload_size(&id).await.unwrap(), Some(100));
    let digest = Digest::sha256_of(&data(100));
    assert_eq!(e.upload_finish(&id, &digest).await.unwrap().size, 100);
}

#[tokio::test]
async fn staged_upload_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let bytes = data(2 * WRITE_BUFFER + 5);
    {
        let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
        e.upload_start(&id).await.unwrap();
        e.upload_append(&id, None, body(vec![bytes[..WRITE_BUFFER].to_vec()]), u64::MAX).await.unwrap();
    }
    let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
    assert_eq!(e.upload_size(&id).await.unwrap(), Some(WRITE_BUFFER as u64));
    e.upload_append(&id, Some(WRITE_BUFFER as u64), body(vec![bytes[WRITE_BUFFER..].to_vec()]), u64::MAX)
        .await
        .unwrap();
    let digest = Digest::sha256_of(&bytes);
    e.upload_finish(&id, &digest).await.unwrap();
    assert_eq!(collect(e.read(&digest, None).await.unwrap()).await, bytes);
}

#[tokio::test]
async fn delete_reclaims_space() {
    let (d, e) = engine();
    let big = data(2 * 1024 * 1024);
    let digest = Digest::sha256_of(&big);
    e.put(&digest, body(vec![big]), u64::MAX).await.unwrap();
    let hex = digest.hex().to_string();
    let file = d.path().join("blobs/sha256").join(&hex[..2]).join(&hex);
    assert!(file.exists());
    let stored = e.stat(&digest).await.unwrap().unwrap();
    let taken = Deleted { copies: 1, bytes: 2 * 1024 * 1024, stamp: Some(stored.stamp), ..Deleted::default() };
    assert_eq!(e.delete(&digest, None).await.unwrap(), taken);
    assert!(!file.exists());
    assert_eq!(e.stat(&digest).await.unwrap(), None);
    assert!(!e.delete(&digest, None).await.unwrap().any());
    let small = Digest::sha256_of(b"hello");
    e.put_small(&small, Bytes::from_static(b"hello")).await.unwrap();
    assert!(e.delete(&small, None).await.unwrap().any());
    assert!(e.read(&small, None).await.is_err());
}

/// A deletion limited to copies stamped up to a time keeps a copy written (or found again by
/// a write) after it, large or small.
#[tokio::test]
async fn a_limited_delete_keeps_younger_copies() {
    let (_d, e) = engine();
    for bytes in [data(2 * 1024 * 1024), b"small".to_vec()] {
        let digest = Digest::sha256_of(&bytes);
        let first = e.put(&digest, body(vec![bytes.clone()]), u64::MAX).await.unwrap();
        let again = e.put(&digest, body(vec![bytes.clone()]), u64::MAX).await.unwrap();
        assert!(again.stamp > first.stamp);
        let kept = e.delete(&digest, Some(first.stamp)).await.unwrap();
        assert_eq!(kept, Deleted { kept: 1, ..Deleted::default() });
        assert_eq!(e.stat(&digest).await.unwrap(), Some(again));
        let done = e.delete(&digest, Some(again.stamp)).await.unwrap();
        let taken = Deleted { copies: 1, bytes: bytes.len() as u64, stamp: Some(again.stamp), ..Deleted::default() };
        assert_eq!(done, taken);
        assert_eq!(e.stat(&digest).await.unwrap(), None);
    }
}

#[tokio::test]
async fn damaged_file_fails_scrub() {
    let (d, e) = engine();
    let big = data(INLINE_THRESHOLD as usize * 2);
    let digest = Digest::sha256_of(&big);
    e.put(&digest, body(vec![big]), u64::MAX).await.unwrap();
    let hex = digest.hex().to_string();
    let file = d.path().join("blobs/sha256").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&file).unwrap();
    bytes[10] ^= 1;
    fs::write(&file, bytes).unwrap();
    assert_eq!(e.scrub(&digest).await.unwrap(), Some(false));
    // Taken out of service: not listed, not stated, recorded as damaged, the file kept aside.
    assert_eq!(e.stat(&digest).await.unwrap(), None);
    assert_eq!(e.damaged().await.unwrap().into_iter().map(|(d, _)| d).collect::<Vec<_>>(), vec![digest.clone()]);
    assert_eq!(fs::read_dir(d.path().join("quarantine")).unwrap().count(), 1);
    assert_eq!(e.scrub(&digest).await.unwrap(), None);
}

/// A read that meets a damaged unit sends every unit before it and no byte of it, then
/// fails; the copy is out of service from then on, and a good copy written again is served.
#[tokio::test]
async fn a_read_never_sends_damaged_bytes() {
    let (d, e) = engine();
    let unit = crate::integrity::UNIT as usize;
    let big = data(3 * unit + 1234);
    let digest = Digest::sha256_of(&big);
    e.put(&digest, body(vec![big.clone()]), u64::MAX).await.unwrap();
    let hex = digest.hex().to_string();
    let file = d.path().join("blobs/sha256").join(&hex[..2]).join(&hex);
    let mut bytes = fs::read(&file).unwrap();
    bytes[2 * unit + 77] ^= 0x40;
    fs::write(&file, bytes).unwrap();
    // A range within the intact units still reads.
    let head = collect(e.read(&digest, Some((100, unit as u64 + 5))).await.unwrap()).await;
    assert!(head == big[100..=unit + 5]);
    let mut s = e.read(&digest, None).await.unwrap();
    let mut got = vec![];
    let mut failed = false;
    while let Some(c) = s.next().await {
        match c {
            Ok(c) => got.extend_from_slice(&c),
            Err(err) => {
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the read ended in an error");
    assert_eq!(got.len(), 2 * unit, "the two intact units, nothing of the damaged one");
    assert!(got == big[..2 * unit]);
    assert_eq!(e.stat(&digest).await.unwrap(), None);
    assert_eq!(e.read(&digest, None).await.err().map(|e| e.code), Some(ErrorCode::BlobUnknown));
    assert_eq!(e.damaged().await.unwrap().len(), 1);
    // A good copy replaces it and clears the record.
    e.put(&digest, body(vec![big.clone()]), u64::MAX).await.unwrap();
    assert!(collect(e.read(&digest, None).await.unwrap()).await == big);
    assert!(e.damaged().await.unwrap().is_empty());
    assert_eq!(e.scrub(&digest).await.unwrap(), Some(true));

    // A small blob in a segment: a damaged byte makes it not stored here.
    let small = data(5000);
    let sd = Digest::sha256_of(&small);
    e.put(&sd, body(vec![small.clone()]), u64::MAX).await.unwrap();
    let Some(Location::Segment { segment, offset }) = e.entry(&sd).await.unwrap().map(|en| en.location) else {
        panic!("a small blob goes to a segment")
    };
    let seg = d.path().join("segments").join(format!("{segment:08}.seg"));
    let mut sb = fs::read(&seg).unwrap();
    sb[offset as usize + 10] ^= 1;
    fs::write(&seg, sb).unwrap();
    assert_eq!(e.read(&sd, None).await.err().map(|e| e.code), Some(ErrorCode::BlobUnknown));
    assert_eq!(e.read_small(&sd, u64::MAX).await.unwrap(), None);
    assert_eq!(e.stat(&sd).await.unwrap(), None);
}

#[tokio::test]
async fn idle_uploads_expire_and_bad_ids_are_unknown() {
    let (_d, e) = engine();
    let id = uuid::Uuid::new_v4().to_string();
    e.upload_start(&id).await.unwrap();
    assert!(e.expire_uploads(Duration::from_secs(3600)).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(e.expire_uploads(Duration::from_millis(1)).await.unwrap(), vec![id.clone()]);
    assert_eq!(e.upload_size(&id).await.unwrap(), None);
    let err = e.upload_append("../../etc", None, body(vec![]), 10).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BlobUploadUnknown);
}

/// An upload whose id names the node's incarnation opens at its first call, in that
/// incarnation only, and once ended (finished, cancelled, expired) is not opened again.
#[tokio::test]
async fn an_upload_opens_at_its_first_call_in_its_incarnation_only() {
    use berth_core::store::upload_id;
    let dir = tempfile::tempdir().unwrap();
    let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
    let now = e.incarnation().expect("an engine has an incarnation");
    let id = |incarnation: u64| upload_id(&uuid::Uuid::new_v4().to_string(), incarnation);

    // Another incarnation's (the node restarted since it began), or one naming none, stays
    // unknown.
    for unknown in [id(now ^ 2), uuid::Uuid::new_v4().to_string()] {
        assert_eq!(e.upload_size(&unknown).await.unwrap(), None);
        let err = e.upload_append(&unknown, Some(0), body(vec![data(10)]), u64::MAX).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BlobUploadUnknown);
    }

    // This incarnation's: opened empty by its first call.
    let late = id(now);
    assert_eq!(e.upload_size(&late).await.unwrap(), Some(0));
    let bytes = data(3000);
    e.upload_append(&late, Some(0), body(vec![bytes.clone()]), u64::MAX).await.unwrap();
    assert_eq!(e.upload_size(&late).await.unwrap(), Some(3000));
    let digest = Digest::sha256_of(&bytes);
    assert_eq!(e.upload_finish(&late, &digest).await.unwrap().size, 3000);
    // Finished: a late call finds it unknown instead of opening it again, empty.
    assert_eq!(e.upload_size(&late).await.unwrap(), None);
    let err = e.upload_append(&late, None, body(vec![data(10)]), u64::MAX).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BlobUploadUnknown);

    // Cancelled, and expired, likewise.
    let cancelled = id(now);
    e.upload_cancel(&cancelled).await.unwrap();
    assert_eq!(e.upload_size(&cancelled).await.unwrap(), None);
    let idle = id(now);
    e.upload_append(&idle, Some(0), body(vec![data(10)]), u64::MAX).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(e.expire_uploads(Duration::from_millis(1)).await.unwrap(), vec![idle.clone()]);
    assert_eq!(e.upload_size(&idle).await.unwrap(), None);

    // An empty blob needs no call before its finish.
    assert_eq!(e.upload_finish(&id(now), &Digest::sha256_of(b"")).await.unwrap().size, 0);

    // A restart draws another incarnation, so an upload held in memory and lost with the
    // restart is not opened again, empty.
    let lost = id(now);
    e.upload_append(&lost, Some(0), body(vec![data(100)]), u64::MAX).await.unwrap();
    drop(e);
    let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
    assert_ne!(e.incarnation(), Some(now));
    assert_eq!(e.upload_size(&lost).await.unwrap(), None);
}

/// A graceful stop that keeps every staged upload lets the next start go on in the same
/// incarnation, remembering which uploads ended: an upload begun before the stop and not
/// opened yet opens after it, and an ended one stays ended. Only the start right after:
/// a crash after it draws a new incarnation.
#[tokio::test]
async fn a_graceful_stop_keeps_the_incarnation_for_the_next_start() {
    use berth_core::store::upload_id;
    let dir = tempfile::tempdir().unwrap();
    let open = || StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
    let e = open();
    let now = e.incarnation().unwrap();
    let id = || upload_id(&uuid::Uuid::new_v4().to_string(), now);
    let (receiving, unopened, finished) = (id(), id(), id());
    e.upload_append(&receiving, Some(0), body(vec![data(100)]), u64::MAX).await.unwrap();
    e.upload_finish(&finished, &Digest::sha256_of(b"")).await.unwrap();
    assert_eq!(e.keep_staged_uploads().await.unwrap(), 1);
    drop(e);

    let e = open();
    assert_eq!(e.incarnation(), Some(now));
    assert_eq!(e.upload_size(&receiving).await.unwrap(), Some(100), "kept through the stop");
    assert_eq!(e.upload_size(&unopened).await.unwrap(), Some(0), "begun before the stop, opened after");
    assert_eq!(e.upload_size(&finished).await.unwrap(), None, "ended before the stop");
    drop(e);

    // No graceful stop this time.
    let e = open();
    assert_ne!(e.incarnation(), Some(now));
}

/// Bytes of segment files on disk.
fn segment_bytes(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir.join("segments")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn distinct(i: u64, n: usize) -> (Digest, Vec<u8>) {
    let mut bytes = data(n);
    bytes[..8].copy_from_slice(&i.to_le_bytes());
    (Digest::sha256_of(&bytes), bytes)
}

#[tokio::test]
async fn small_blobs_share_segments_and_deleted_ones_give_space_back() {
    let (d, e) = engine();
    // Enough small blobs to fill more than one segment, pushed concurrently as a CI fleet
    // would, so appends and their group-committed flushes interleave.
    let n = 2 * (crate::segment::SEGMENT_SIZE / INLINE_THRESHOLD) as usize + 40;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..n).map(|i| distinct(i as u64, INLINE_THRESHOLD as usize)).collect();
    futures::stream::iter(blobs.iter().cloned())
        .for_each_concurrent(16, |(digest, bytes)| {
            let e = e.clone();
            async move {
                e.put_small(&digest, Bytes::from(bytes)).await.unwrap();
            }
        })
        .await;
    let first = fs::read_dir(d.path().join("segments")).unwrap().count();
    assert!(first >= 3, "{n} blobs of {INLINE_THRESHOLD} bytes fill more than two segments: {first}");
    for (digest, bytes) in &blobs {
        assert!(matches!(e.entry(digest).await.unwrap().unwrap().location, Location::Segment { .. }));
        assert_eq!(&collect(e.read(digest, None).await.unwrap()).await, bytes);
    }
    // Deleting all but the last blob leaves the sealed segments mostly dead: they are compacted
    // away and only the kept blob's bytes and the active segment stay.
    let before = segment_bytes(d.path());
    let (keep, gone) = blobs.split_last().unwrap();
    for (g, _) in gone {
        assert!(e.delete(g, None).await.unwrap().any());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = segment_bytes(d.path());
        // Every sealed segment goes, not only the first to pass half dead; what compaction
        // copied lands in the active segment, which is never compacted.
        let sealed_left = (1..e.inner.segments.active_id()).any(|id| e.inner.segments.size(id).is_ok());
        if !sealed_left && now < before / 2 && !e.inner.compacting.load(Ordering::Acquire) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {now} of {before} bytes of segments after deleting: {:?}, compactable {:?}",
            fs::read_dir(d.path().join("segments")).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>(),
            e.inner.compactable()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(e.scrub(&keep.0).await.unwrap(), Some(true));
    assert_eq!(collect(e.read(&keep.0, Some((5, 20))).await.unwrap()).await, keep.1[5..=20].to_vec());
    assert_eq!(e.stat(&gone[0].0).await.unwrap(), None);
    assert!(e.read(&gone[0].0, None).await.is_err());
    // What is left survives a restart, and new blobs append after it.
    drop(e);
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    assert_eq!(e.scrub(&keep.0).await.unwrap(), Some(true));
    let (late, bytes) = distinct(u64::MAX, 1000);
    e.put_small(&late, Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(e.read_small(&late, 4096).await.unwrap().unwrap(), bytes);
    assert_eq!(e.scrub(&keep.0).await.unwrap(), Some(true));
}

#[tokio::test]
async fn segment_emptied_while_active_is_compacted_once_sealed() {
    let (d, e) = engine();
    let per_segment = crate::segment::SEGMENT_SIZE / INLINE_THRESHOLD;
    let first: Vec<(Digest, Vec<u8>)> = (0..per_segment - 10).map(|i| distinct(i, INLINE_THRESHOLD as usize)).collect();
    for (digest, bytes) in &first {
        e.put_small(digest, Bytes::from(bytes.clone())).await.unwrap();
    }
    // Deleted while their segment takes appends: nothing to compact yet.
    for (digest, _) in &first[..first.len() - 10] {
        assert!(e.delete(digest, None).await.unwrap().any());
    }
    assert!(d.path().join("segments/00000001.seg").exists());
    // Filling the segment seals it; by then most of it is dead, so it is compacted.
    for i in 0..per_segment {
        let (digest, bytes) = distinct(1000 + i, INLINE_THRESHOLD as usize);
        e.put_small(&digest, Bytes::from(bytes)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.path().join("segments/00000001.seg").exists() || e.inner.compacting.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "the sealed, mostly dead segment was not compacted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (digest, bytes) in &first[first.len() - 10..] {
        assert_eq!(&e.read_small(digest, 1 << 20).await.unwrap().unwrap(), bytes);
    }
}

/// A sealed segment found at least half dead when the engine opens (the node stopped before
/// the sweep its deletes asked for ran) is compacted without waiting for another delete.
#[tokio::test]
async fn segment_left_half_dead_is_compacted_at_open() {
    let d = tempfile::tempdir().unwrap();
    let per_segment = crate::segment::SEGMENT_SIZE / INLINE_THRESHOLD;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..per_segment + 1).map(|i| distinct(i, INLINE_THRESHOLD as usize)).collect();
    let kept = &blobs[per_segment as usize - 2..];
    {
        let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
        for (digest, bytes) in &blobs {
            e.put_small(digest, Bytes::from(bytes.clone())).await.unwrap();
        }
        assert!(e.inner.segments.active_id() > 1, "the first segment is sealed");
        // The sweep the roll asked for finds nothing to do.
        while e.inner.compacting.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Most of the first segment deleted as a delete does, but with the node stopping
        // before any sweep: entries gone, their bytes counted dead.
        let mut batch = WriteBatch::default();
        let mut dead = 0;
        for (digest, bytes) in &blobs[..per_segment as usize - 2] {
            let key = digest.to_string();
            batch.delete_cf(e.inner.cf(CF_BLOBS).unwrap(), &key);
            batch.delete_cf(e.inner.cf(CF_BLOBS).unwrap(), units_key(&key));
            dead += bytes.len() as u64;
        }
        batch.put_cf(e.inner.cf(CF_BLOBS).unwrap(), dead_key(1), dead.to_le_bytes());
        e.inner.index_write(batch, &[], true).unwrap();
        assert_eq!(e.inner.compactable().unwrap(), vec![1]);
    }
    let first = d.path().join("segments/00000001.seg");
    assert!(first.exists());
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while first.exists() || e.inner.compacting.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "the half-dead segment was not compacted after opening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (digest, bytes) in kept {
        assert_eq!(&e.read_small(digest, 1 << 20).await.unwrap().unwrap(), bytes);
    }
    for (digest, _) in &blobs[..3] {
        assert!(e.stat(digest).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn same_small_blob_pushed_at_once_is_stored_once() {
    let (d, e) = engine();
    // Hashed on the blocking pool, and (the smaller) on the calling task and committed by the
    // committer, whose batches take a blob once.
    for (n, size) in [(1, 100_000), (2, 30_000)] {
        let (digest, bytes) = distinct(7 + n as u64, size);
        futures::stream::iter(0..16)
            .for_each_concurrent(16, |_| {
                let (e, digest, bytes) = (e.clone(), digest.clone(), bytes.clone());
                async move {
                    e.put_small(&digest, Bytes::from(bytes)).await.unwrap();
                }
            })
            .await;
        assert_eq!(e.inner.segments.records(1).unwrap().len(), n);
        assert_eq!(e.read_small(&digest, 1 << 20).await.unwrap().unwrap(), bytes);
    }
    assert!(segment_bytes(d.path()) < 2 * 130_000);
    assert!(e.inner.committing.lock().unwrap().is_empty());
}

#[tokio::test]
async fn torn_segment_tail_is_cut_off_after_a_crash() {
    let (d, e) = engine();
    let (a, bytes) = distinct(1, 5000);
    e.put_small(&a, Bytes::from(bytes.clone())).await.unwrap();
    drop(e);
    // A crash mid-append leaves part of a record that no index entry names.
    let seg = fs::read_dir(d.path().join("segments")).unwrap().next().unwrap().unwrap().path();
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"BSG1\x47\x00\x00\x10").unwrap();
    drop(f);
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    let (b, more) = distinct(2, 7000);
    e.put_small(&b, Bytes::from(more.clone())).await.unwrap();
    assert_eq!(e.read_small(&a, 1 << 20).await.unwrap().unwrap(), bytes);
    assert_eq!(e.read_small(&b, 1 << 20).await.unwrap().unwrap(), more);
    // The torn bytes were cut off at open: the segment holds two whole records, end to end.
    let records = e.inner.segments.records(1).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].offset + records[1].len, fs::metadata(&seg).unwrap().len());
}

/// Bytes of the inline column family's blob files on disk.
fn blob_file_bytes(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir.join("index"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".blob"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Stores a small blob the way nodes did before segments: bytes in the `inline` column family.
fn put_inline(e: &StorageEngine, digest: &Digest, bytes: Vec<u8>) {
    let key = digest.to_string();
    let entry = BlobEntry {
        size: bytes.len() as u64,
        blake3: *blake3::hash(&bytes).as_bytes(),
        stamp: now_ms(),
        location: Location::Inline,
    };
    let mut batch = WriteBatch::default();
    batch.put_cf(e.inner.cf(CF_INLINE).unwrap(), &key, bytes);
    batch.put_cf(e.inner.cf(CF_BLOBS).unwrap(), &key, bincode::serialize(&entry).unwrap());
    e.inner.synced_write(batch).unwrap();
}

#[tokio::test]
async fn inline_blobs_of_earlier_nodes_are_served_and_give_their_space_back() {
    let (d, e) = engine();
    // RECLAIM_AFTER bytes of inline blobs and one more, each a different content: deleting all
    // but the last reaches the threshold with the last delete, so no delete races the reclaim
    // (one that lands after its compaction keeps its bytes until the next reclaim).
    let n = (RECLAIM_AFTER / INLINE_THRESHOLD) as usize + 1;
    let mut digests = vec![];
    for i in 0..n {
        let (digest, bytes) = distinct(i as u64, INLINE_THRESHOLD as usize);
        put_inline(&e, &digest, bytes);
        digests.push(digest);
    }
    let cf = e.inner.cf(CF_INLINE).unwrap();
    e.inner.db.flush_cf(cf).unwrap();
    let before = blob_file_bytes(d.path());
    assert!(before >= RECLAIM_AFTER, "inline blobs were written to blob files: {before} bytes");
    assert_eq!(collect(e.read(&digests[3], None).await.unwrap()).await, distinct(3, INLINE_THRESHOLD as usize).1);
    assert_eq!(e.scrub(&digests[3]).await.unwrap(), Some(true));
    // Keep the last one; deleting the rest reaches the threshold and starts a reclaim.
    let (keep, gone) = digests.split_last().unwrap();
    for g in gone {
        assert!(e.delete(g, None).await.unwrap().any());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = blob_file_bytes(d.path());
        if now < 4 * INLINE_THRESHOLD && !e.inner.reclaiming.load(Ordering::Acquire) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {now} bytes of blob files after deleting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was kept is intact, what was deleted is gone.
    assert_eq!(e.scrub(keep).await.unwrap(), Some(true));
    assert_eq!(e.stat(&gone[0]).await.unwrap(), None);
}

#[tokio::test]
async fn stamps_grow_are_renewed_by_a_second_write_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(300_000);
    let digest = Digest::sha256_of(&bytes);
    let small = Bytes::from_static(b"small blob");
    let small_digest = Digest::sha256_of(&small);
    let (first, again, deleted);
    {
        let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
        first = e.put(&digest, body(vec![bytes.clone()]), u64::MAX).await.unwrap();
        let s1 = e.put_small(&small_digest, small.clone()).await.unwrap();
        assert!(s1.stamp > first.stamp);
        // A write that finds the blob stored gives it a fresh stamp: the copy it links is
        // younger than any the collector could have deleted before.
        again = e.put(&digest, body(vec![bytes.clone()]), u64::MAX).await.unwrap();
        assert!(again.stamp > s1.stamp);
        assert_eq!(e.stat(&digest).await.unwrap(), Some(again));
        let s2 = e.put_small(&small_digest, small.clone()).await.unwrap();
        assert!(s2.stamp > again.stamp);
        assert!(e.delete(&small_digest, None).await.unwrap().any());
        deleted = s2.stamp;
        let listed = e.list(None, 10).await.unwrap();
        assert_eq!(listed, vec![(digest.clone(), again.stamp)]);
    }
    let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
    let after = e.put_small(&small_digest, small).await.unwrap();
    assert!(after.stamp > deleted, "stamps keep growing across a restart");
    assert_eq!(first.size, 300_000);
}

/// The unit checksums kept at commit fit the blob, so a read never derives them again.
#[tokio::test]
async fn kept_unit_sums_fit_the_blob() {
    let (_d, e) = engine();
    let unit = crate::integrity::UNIT as usize;
    for n in [10, INLINE_THRESHOLD as usize + 1, unit, unit + 1, 5 * unit + 3] {
        let bytes = data(n);
        let digest = Digest::sha256_of(&bytes);
        e.put(&digest, body(bytes.chunks(100_000).map(<[u8]>::to_vec).collect()), u64::MAX).await.unwrap();
        let entry = e.entry(&digest).await.unwrap().unwrap();
        let sums = e.inner.stored_sums(&digest.to_string(), n as u64).unwrap().expect("sums kept at commit");
        assert!(crate::integrity::units_match(&sums, n as u64, &entry.blake3), "{n} bytes");
    }
}

/// The index as a power failure can leave it: every write up to some point, the later ones
/// lost. A segment blob's entry is not synced, so this takes entries of acknowledged blobs with
/// it; opening the node makes them again from the segments, which were.
#[tokio::test]
async fn entries_a_power_failure_lost_are_made_again_from_the_segments() {
    let (d, e) = engine();
    let (a, a_bytes) = distinct(1, 5000);
    e.put_small(&a, Bytes::from(a_bytes.clone())).await.unwrap();
    let a_stamp = e.stat(&a).await.unwrap().unwrap().stamp;
    let saved = tempfile::tempdir().unwrap();
    let saved = saved.path().join("index");
    rocksdb::checkpoint::Checkpoint::new(&e.inner.db).unwrap().create_checkpoint(&saved).unwrap();
    // Acknowledged after that point (with no synced write, which would have kept the writes
    // before it): two small blobs, and one whose record is damaged on the disk below.
    let (b, b_bytes) = distinct(2, 70_000);
    let (c, c_bytes) = distinct(3, 3000);
    let (bad, bad_bytes) = distinct(4, 4000);
    for (digest, bytes) in [(&b, &b_bytes), (&c, &c_bytes), (&bad, &bad_bytes)] {
        e.put_small(digest, Bytes::from(bytes.clone())).await.unwrap();
    }
    let bad_at = match e.entry(&bad).await.unwrap().unwrap().location {
        Location::Segment { offset, .. } => offset,
        other => panic!("{other:?}"),
    };
    drop(e);
    fs::remove_dir_all(d.path().join("index")).unwrap();
    fs::rename(&saved, d.path().join("index")).unwrap();
    let seg = d.path().join("segments").join("00000001.seg");
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XX", bad_at + 10).unwrap();
    drop(f);

    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    for (digest, bytes) in [(&a, &a_bytes), (&b, &b_bytes), (&c, &c_bytes)] {
        assert_eq!(&e.read_small(digest, 1 << 20).await.unwrap().unwrap(), bytes);
        assert_eq!(e.scrub(digest).await.unwrap(), Some(true), "{digest}: entry and checksums made again");
        assert!(e.stat(digest).await.unwrap().unwrap().stamp >= a_stamp);
    }
    assert_eq!(e.stat(&a).await.unwrap().unwrap().stamp, a_stamp, "an entry that survived is left as it was");
    assert_eq!(e.stat(&bad).await.unwrap(), None, "a record whose bytes do not hash to its key is not served");
    let listed: Vec<Digest> = e.list(None, 10).await.unwrap().into_iter().map(|(d, _)| d).collect();
    assert_eq!(listed.len(), 3);
    // The damaged record counts as dead space in its segment.
    assert_eq!(e.inner.dead_in(1).unwrap(), bad_bytes.len() as u64);
    // Opening again finds nothing more to do: the low mark was written past the records.
    drop(e);
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    assert_eq!(e.inner.dead_in(1).unwrap(), bad_bytes.len() as u64);
    let (f, f_bytes) = distinct(5, 6000);
    e.put_small(&f, Bytes::from(f_bytes.clone())).await.unwrap();
    assert_eq!(e.read_small(&f, 1 << 20).await.unwrap().unwrap(), f_bytes);
}

/// When every index write survived (a stop, or a killed process: its writes are in the page
/// cache), opening leaves every entry as it was.
#[tokio::test]
async fn opening_after_a_stop_makes_no_entry_again() {
    let (d, e) = engine();
    let mut stamps = vec![];
    for i in 0..20 {
        let (digest, bytes) = distinct(i, 1000 + i as usize);
        stamps.push((digest.clone(), e.put_small(&digest, Bytes::from(bytes)).await.unwrap().stamp));
    }
    drop(e);
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    for (digest, stamp) in stamps {
        assert_eq!(e.stat(&digest).await.unwrap().unwrap().stamp, stamp);
    }
    assert_eq!(e.inner.dead_in(1).unwrap(), 0);
}

/// A copy from another node is checked against that node's BLAKE3 of the blob, not hashed
/// again with the digest's algorithm: the right bytes are stored and scrub clean, other bytes
/// are refused and leave nothing behind.
#[tokio::test]
async fn a_copy_is_checked_against_the_senders_blake3() {
    let (_d, source) = engine();
    let (_d2, e) = engine();
    let unit = crate::integrity::UNIT as usize;
    for n in [3000, INLINE_THRESHOLD as usize + 1, 3 * unit + 5] {
        let bytes = data(n);
        let digest = Digest::sha256_of(&bytes);
        source.put(&digest, body(vec![bytes.clone()]), u64::MAX).await.unwrap();
        let blake3 = source.blake3(&digest).await.unwrap().expect("the source keeps a BLAKE3");
        assert_eq!(&blake3, blake3::hash(&bytes).as_bytes());

        let mut other = bytes.clone();
        other[n / 2] ^= 1;
        let refused = e.put_copy(&digest, blake3, body(vec![other]), u64::MAX).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::DigestInvalid);
        assert_eq!(e.stat(&digest).await.unwrap(), None);

        let parts = bytes.chunks(100_000).map(<[u8]>::to_vec).collect();
        let stored = e.put_copy(&digest, blake3, body(parts), u64::MAX).await.unwrap();
        assert_eq!(stored.size, n as u64);
        assert!(collect(e.read(&digest, None).await.unwrap()).await == bytes);
        assert_eq!(e.scrub(&digest).await.unwrap(), Some(true));
    }
    assert!(e.inner.uploads.lock().unwrap().is_empty());
    assert_eq!(fs::read_dir(_d2.path().join("uploads")).unwrap().count(), 0, "no staging file left");
}

/// A segment blob deleted while another record's entry was still being written (so that the
/// low mark its own entry carried stayed below it) does not come back at the next open.
#[tokio::test]
async fn a_blob_deleted_before_a_stop_stays_deleted() {
    let (d, e) = engine();
    let held = e.inner.segments.append("sha256:held", b"a commit under way").unwrap();
    let (x, x_bytes) = distinct(1, 3000);
    e.put_small(&x, Bytes::from(x_bytes)).await.unwrap();
    drop(held);
    assert!(e.delete(&x, None).await.unwrap().any());
    drop(e);
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    assert_eq!(e.stat(&x).await.unwrap(), None);
}

/// Of the whole pages of blob `d`'s bytes, how many are in the page cache, and how many
/// there are.
async fn cached_pages(e: &StorageEngine, dir: &std::path::Path, d: &Digest) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let entry = e.entry(d).await.unwrap().unwrap();
    let (path, offset, len) = match entry.location {
        Location::Segment { segment, offset } => (dir.join(format!("segments/{segment:08}.seg")), offset, entry.size),
        Location::File => (e.inner.blob_path(d), 0, entry.size),
        Location::Inline => panic!("new blobs are not written inline"),
    };
    let page = crate::page_size();
    let (first, end) = (offset.div_ceil(page) * page, (offset + len) / page * page);
    assert!(end > first, "the blob holds no whole page");
    let f = std::fs::File::open(path).unwrap();
    let n = ((end - first) / page) as usize;
    let mut pages = vec![0u8; n];
    // SAFETY: a read-only shared mapping of an open file at a page-aligned offset, never
    // dereferenced; mincore writes one byte per page of it into `pages`, which has that many.
    unsafe {
        let len = n * page as usize;
        let at = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), first as i64);
        assert_ne!(at, libc::MAP_FAILED);
        assert_eq!(libc::mincore(at, len, pages.as_mut_ptr()), 0);
        libc::munmap(at, len);
    }
    (pages.iter().filter(|p| *p & 1 == 1).count(), n)
}

/// Whether `dir` is on a tmpfs, whose pages are the files themselves and never leave memory.
fn on_tmpfs(dir: &std::path::Path) -> bool {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs writes into the zeroed struct it is given, and reads the path's bytes.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC }
}

#[tokio::test]
async fn copies_not_read_first_here_leave_the_page_cache() {
    let (dir, e) = engine();
    if on_tmpfs(dir.path()) {
        eprintln!("skipped: the test directory is on a tmpfs");
        return;
    }
    // Small blobs go to segments; large ones to files, large enough for several writeback
    // steps, so that their pages also go while they are written.
    let sizes = [INLINE_THRESHOLD as usize, 20 << 20];
    // (bytes, written as a put (a copy from another node) or as an upload, read first here)
    let mut cases = vec![];
    for (k, &size) in sizes.iter().enumerate() {
        for put in [true, false] {
            for first in [true, false] {
                let salt = cases.len() as u8 + 1;
                let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 ^ salt).collect();
                cases.push((k, bytes, put, first));
            }
        }
    }
    let digests: Vec<Digest> = cases.iter().map(|(_, b, _, _)| Digest::sha256_of(b)).collect();
    let first: Vec<Digest> = cases.iter().zip(&digests).filter(|(c, _)| c.3).map(|(_, d)| d.clone()).collect();
    e.set_reads_first(Some(Arc::new(move |d: &Digest| first.contains(d))));
    for ((k, bytes, put, first), d) in cases.iter().zip(&digests) {
        let what = format!(
            "{} blob, {}, {}",
            ["small", "large"][*k],
            if *put { "put" } else { "upload" },
            if *first { "read first here" } else { "read first elsewhere" }
        );
        if *put {
            e.put(d, body(vec![bytes.clone()]), u64::MAX).await.unwrap();
        } else {
            let id = uuid::Uuid::new_v4().to_string();
            e.upload_start(&id).await.unwrap();
            for part in bytes.chunks(1 << 20) {
                e.upload_append(&id, None, body(vec![part.to_vec()]), u64::MAX).await.unwrap();
            }
            e.upload_finish(&id, d).await.unwrap();
            // An upload's blob stays cached until the copies this node sends of it are sent.
            let (cached, pages) = cached_pages(&e, dir.path(), d).await;
            assert_eq!(cached, pages, "{what}: its copies not sent yet");
            e.note_copies_sent(d).await;
        }
        let (cached, pages) = cached_pages(&e, dir.path(), d).await;
        if *first {
            assert_eq!(cached, pages, "{what}: stays cached");
        } else {
            assert_eq!(cached, 0, "{what}: left the page cache ({cached} of {pages} pages stayed)");
        }
        // Out of the cache is not out of reach.
        assert_eq!(collect(e.read(d, None).await.unwrap()).await, *bytes, "{what}");
    }
    // A read brings a copy back into the cache (it serves while the first owner is away); a
    // scrub of one read first elsewhere lets it go again.
    for d in cases.iter().zip(&digests).filter(|(c, _)| !c.3).map(|(_, d)| d) {
        collect(e.read(d, None).await.unwrap()).await;
        assert!(cached_pages(&e, dir.path(), d).await.0 > 0, "{d}: read back into the cache");
        assert_eq!(e.scrub(d).await.unwrap(), Some(true));
        assert_eq!(cached_pages(&e, dir.path(), d).await.0, 0, "{d}: scrubbed, and out of the cache again");
    }
    // Without being told, a node keeps every copy cached (one node, as standalone).
    e.set_reads_first(None);
    let more: Vec<u8> = (0..INLINE_THRESHOLD as usize).map(|i| (i % 241) as u8).collect();
    let d = Digest::sha256_of(&more);
    e.put(&d, body(vec![more]), u64::MAX).await.unwrap();
    let (cached, pages) = cached_pages(&e, dir.path(), &d).await;
    assert_eq!(cached, pages);
}

#[tokio::test]
async fn an_upload_left_for_its_next_call_keeps_no_received_buffer() {
    let (_d, e) = engine();
    let large = Bytes::from(data(INLINE_THRESHOLD as usize));
    let digest = Digest::sha256_of(&large);
    let id = uuid::Uuid::new_v4().to_string();
    e.upload_start(&id).await.unwrap();
    let chunk: ByteStream = futures::stream::iter([Ok(large.clone())]).boxed();
    e.upload_append(&id, Some(0), chunk, u64::MAX).await.unwrap();
    // Settled: the staged upload holds a copy, not the buffer the chunk came in.
    assert!(large.is_unique(), "the staged upload still holds the received chunk");
    assert_eq!(e.upload_finish(&id, &digest).await.unwrap().size, large.len() as u64);
    assert_eq!(collect(e.read(&digest, None).await.unwrap()).await, large.to_vec());
}

/// Small blobs committed at once through every path that hands them to the committer (whole
/// puts, `put_small`, uploads, copies from another node), each blob twice by two paths: every
/// blob is stored once and reads back whole, none stays locked or staged, and opening the node
/// again keeps every entry as it was and counts nothing dead (their batch's index write carried
/// the low mark past their records).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_blobs_committed_together_are_each_stored_once_and_indexed() {
    let (d, e) = engine();
    let blobs: Vec<(Digest, Vec<u8>)> = (0..48).map(|i| distinct(i, 1000 + (i as usize % 5) * 60_000)).collect();
    let pushes = (0..blobs.len() * 2).map(|j| {
        let (e, (digest, bytes)) = (e.clone(), blobs[j / 2].clone());
        tokio::spawn(async move {
            let stored = match j % 4 {
                0 => e.put(&digest, body(vec![bytes]), u64::MAX).await,
                1 if bytes.len() <= HASHED_ON_TASK => e.put_small(&digest, Bytes::from(bytes)).await,
                1 => e.put(&digest, body(bytes.chunks(50_000).map(<[u8]>::to_vec).collect()), u64::MAX).await,
                2 => {
                    let id = uuid::Uuid::new_v4().to_string();
                    e.upload_start(&id).await.unwrap();
                    e.upload_append(&id, Some(0), body(vec![bytes]), u64::MAX).await.unwrap();
                    e.upload_finish(&id, &digest).await
                }
                _ => e.put_copy(&digest, *blake3::hash(&bytes).as_bytes(), body(vec![bytes]), u64::MAX).await,
            };
            stored.unwrap_or_else(|err| panic!("push {j} of {digest}: {err:?}"))
        })
    });
    for stored in futures::future::join_all(pushes).await {
        stored.unwrap();
    }
    assert!(e.inner.committer.get().is_some(), "the committer runs");
    assert_eq!(e.inner.segments.records(1).unwrap().len(), blobs.len(), "each blob stored once");
    assert!(e.inner.committing.lock().unwrap().is_empty());
    assert!(e.inner.uploads.lock().unwrap().is_empty());
    let mut stamps = vec![];
    for (digest, bytes) in &blobs {
        assert_eq!(&collect(e.read(digest, None).await.unwrap()).await, bytes);
        assert_eq!(e.scrub(digest).await.unwrap(), Some(true));
        stamps.push(e.stat(digest).await.unwrap().unwrap().stamp);
    }
    drop(e);
    let e = StorageEngine::open(StorageConfig { dir: d.path().to_path_buf() }).unwrap();
    for ((digest, _), stamp) in blobs.iter().zip(stamps) {
        assert_eq!(e.stat(digest).await.unwrap().unwrap().stamp, stamp, "{digest}: entry left as it was");
    }
    assert_eq!(e.inner.dead_in(1).unwrap(), 0);
}

/// A blob that does not verify is refused by the committer's path as by the others, and its
/// batch's other blobs are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_blob_that_does_not_verify_is_refused_and_its_neighbours_stored() {
    let (_d, e) = engine();
    let (good, good_bytes) = distinct(1, 2000);
    let (bad, mut bad_bytes) = distinct(2, 2000);
    bad_bytes[100] ^= 1;
    let (copy, copy_bytes) = distinct(3, 3000);
    let (a, b, c) = tokio::join!(
        e.put(&good, body(vec![good_bytes.clone()]), u64::MAX),
        e.put_small(&bad, Bytes::from(bad_bytes)),
        e.put_copy(&copy, [7; 32], body(vec![copy_bytes]), u64::MAX),
    );
    assert_eq!(a.unwrap().size, 2000);
    assert_eq!(b.unwrap_err().code, ErrorCode::DigestInvalid);
    assert_eq!(c.unwrap_err().code, ErrorCode::DigestInvalid);
    assert_eq!(e.stat(&bad).await.unwrap(), None);
    assert_eq!(e.stat(&copy).await.unwrap(), None);
    assert_eq!(e.read_small(&good, 1 << 20).await.unwrap().unwrap(), good_bytes);
    assert_eq!(e.inner.segments.records(1).unwrap().len(), 1);
}
