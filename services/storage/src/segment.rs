//! Segments: append-only files that hold small blobs back to back.
//!
//! A small blob is written once, at the end of the active segment, and made durable by an
//! `fdatasync` that covers every append finished before it started (group commit): concurrent
//! pushes of many small blobs share one flush and write their bytes once. Its index entry
//! names the segment and offset. Keeping small blobs in RocksDB instead wrote them twice (WAL,
//! then the blob file at memtable flush) and copied them four times in user space; a file per
//! small blob costs an inode and a directory update each.
//!
//! A record is a header (`MAGIC`, key length u16, data length u32, little-endian), the key
//! (the digest) and the data. Headers make a segment readable without the index, which is
//! what compaction walks. A segment grows to [`SEGMENT_SIZE`], then the next one starts.
//! A crash can leave a torn record at the end of the active segment. No index entry points at
//! it (entries are written only after the flush that covers their record), so opening the
//! segments cuts the newest one back to its last whole record, and a segment's records can
//! always be walked from its start to its end.
//!
//! **One fsync per small blob.** The flush of its record is the only one a small blob waits
//! for: its index entry is written without a sync of its own, because a record carries its key
//! and the key is the digest of its bytes, so a lost entry can be made again from the segment.
//! The index writes of segment records and of deletions also record a low mark: a place in the
//! segments below which every record has its entry written already (or never will, its commit
//! having failed). Index writes
//! survive a crash as a prefix of the order they were made in (RocksDB's point-in-time
//! recovery), so after a power loss every record past the surviving low mark is read again at
//! open and indexed anew when its bytes hash to its key (see the engine's `recover_index`).
//! [`Segments::append`] returns a [`Pending`] that keeps its record above every low mark until
//! the entry is written or the commit given up.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::staging::sync_dir;

/// Size after which a segment is sealed and the next one starts.
pub(crate) const SEGMENT_SIZE: u64 = 64 << 20;

/// Most segment files kept open for reading. A large node has thousands of segments; keeping
/// all open would run into the process's file descriptor limit, which connections share.
const MAX_OPEN: usize = 256;

const MAGIC: [u8; 4] = *b"BSG1";
const HEADER: usize = 4 + 2 + 4;

/// One record of a segment, as compaction finds it.
pub(crate) struct Record {
    pub key: String,
    /// Offset of the data (after the header and key).
    pub offset: u64,
    pub len: u64,
}

impl Record {
    /// Offset just past the record.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

struct Active {
    id: u32,
    file: Arc<File>,
    len: u64,
    /// Records appended whose index entries are not written yet: (segment id, record start).
    pending: BTreeSet<(u32, u64)>,
}

/// Where a record written by [`Segments::write`] ends, for [`Segments::flush`].
pub(crate) struct Written {
    id: u32,
    file: Arc<File>,
    end: u64,
}

/// A place in the segments: (segment id, byte offset). Ordered as the segments are written.
pub(crate) type Mark = (u32, u64);

/// A record appended whose index entry is not written yet: while it lives, no low mark passes
/// the record. Dropped once the entry is written, or when the commit fails.
pub(crate) struct Pending<'a> {
    segments: &'a Segments,
    /// Where the record starts (its header).
    start: Mark,
    /// Where its data starts, in segment [`Pending::segment`].
    pub offset: u64,
}

impl Pending<'_> {
    /// The segment the record is in.
    pub fn segment(&self) -> u32 {
        self.start.0
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.segments.active.lock() {
            a.pending.remove(&self.start);
        }
    }
}

/// The segments of one node.
pub(crate) struct Segments {
    dir: PathBuf,
    active: Mutex<Active>,
    /// How far the active segment is known durable: (segment id, bytes).
    synced: Mutex<(u32, u64)>,
    /// Open files to read from, by segment id.
    readers: Mutex<HashMap<u32, Arc<File>>>,
}

fn lock_err<T>(_: T) -> io::Error {
    io::Error::other("segment lock poisoned")
}

fn name(id: u32) -> String {
    format!("{id:08}.seg")
}

/// Ids of the segment files in `dir`, in order.
fn segment_ids(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = vec![];
    for e in fs::read_dir(dir)? {
        let n = e?.file_name();
        if let Some(id) = n.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u32>().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn create(dir: &Path, id: u32) -> io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(dir.join(name(id)))?;
    sync_dir(dir)?;
    Ok(file)
}

impl Segments {
    /// Opens `dir` (created if missing); appends continue in the newest segment.
    pub fn open(dir: PathBuf) -> io::Result<Segments> {
        fs::create_dir_all(&dir)?;
        let (id, file) = match segment_ids(&dir)?.last().copied() {
            Some(id) => (id, OpenOptions::new().read(true).write(true).open(dir.join(name(id)))?),
            None => (1, create(&dir, 1)?),
        };
        let segments = Segments {
            dir,
            active: Mutex::new(Active { id, file: Arc::new(file), len: 0, pending: BTreeSet::new() }),
            synced: Mutex::new((id, 0)),
            readers: Mutex::new(HashMap::new()),
        };
        let whole = segments.records(id)?.last().map_or(0, Record::end);
        {
            let mut a = segments.active.lock().map_err(lock_err)?;
            if a.file.metadata()?.len() > whole {
                tracing::warn!(segment = id, keep = whole, "cutting a torn record off the end of a segment");
                a.file.set_len(whole)?;
                a.file.sync_all()?;
            }
            a.len = whole;
        }
        *segments.synced.lock().map_err(lock_err)? = (id, whole);
        Ok(segments)
    }

    /// Id of the segment appends go to now.
    pub fn active_id(&self) -> u32 {
        self.active.lock().map(|a| a.id).unwrap_or(0)
    }

    /// Ids of the segment files, in order.
    pub fn ids(&self) -> io::Result<Vec<u32>> {
        segment_ids(&self.dir)
    }

    /// The low mark an index write records beside the entries of `own` records (see the
    /// module docs): the start of the first other record still pending, or the end of the
    /// segments when there is none. Every record below it has its entry written already, so
    /// that write is ahead of this one in the index's order.
    pub fn low_mark(&self, own: &[&Pending<'_>]) -> io::Result<Mark> {
        let mut mine: Vec<Mark> = own.iter().map(|p| p.start).collect();
        mine.sort_unstable();
        let a = self.active.lock().map_err(lock_err)?;
        let first_other = a.pending.iter().find(|p| mine.binary_search(p).is_err()).copied();
        Ok(first_other.unwrap_or((a.id, a.len)))
    }

    /// Whether a record of segment `id` is still waiting for its index entry.
    pub fn pending_in(&self, id: u32) -> bool {
        self.active.lock().map(|a| a.pending.range((id, 0)..=(id, u64::MAX)).next().is_some()).unwrap_or(true)
    }

    /// Appends a record and returns once it is durable, pending until its index entry is
    /// written (see [`Pending`]).
    pub fn append(&self, key: &str, data: &[u8]) -> io::Result<Pending<'_>> {
        let (pending, written) = self.write(key, data)?;
        self.flush(&written)?;
        Ok(pending)
    }

    /// Appends a record without waiting for it to be durable: [`Segments::flush`] of the
    /// [`Written`] returned, or of one returned later, makes it so. Pending like
    /// [`Segments::append`]'s.
    pub fn write(&self, key: &str, data: &[u8]) -> io::Result<(Pending<'_>, Written)> {
        let key_len = u16::try_from(key.len()).map_err(io::Error::other)?;
        let data_len = u32::try_from(data.len()).map_err(io::Error::other)?;
        let mut head = Vec::with_capacity(HEADER + key.len());
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&key_len.to_le_bytes());
        head.extend_from_slice(&data_len.to_le_bytes());
        head.extend_from_slice(key.as_bytes());
        let total = (head.len() + data.len()) as u64;
        let (id, file, end, at) = {
            let mut a = self.active.lock().map_err(lock_err)?;
            if a.len > 0 && a.len + total > SEGMENT_SIZE {
                self.roll(&mut a)?;
            }
            let at = a.len;
            let written =
                a.file.write_all_at(&head, at).and_then(|()| a.file.write_all_at(data, at + head.len() as u64));
            if let Err(e) = written {
                // Nothing may follow a partial record: cut it off before the next append.
                let _ = a.file.set_len(at);
                return Err(e);
            }
            a.len += total;
            let id = a.id;
            a.pending.insert((id, at));
            (a.id, a.file.clone(), a.len, at)
        };
        let pending = Pending { segments: self, start: (id, at), offset: at + head.len() as u64 };
        Ok((pending, Written { id, file, end }))
    }

    /// Makes durable the record `written` names and every record written before it.
    pub fn flush(&self, written: &Written) -> io::Result<()> {
        self.sync_through(written.id, &written.file, written.end)
    }

    /// Drops the whole pages of `len` bytes of segment `id` from `offset` from the page cache
    /// (see `crate::staging::drop_cached`), once they are flushed.
    pub fn drop_cached(&self, id: u32, offset: u64, len: u64) -> io::Result<()> {
        let file = self.reader(id)?;
        crate::staging::drop_cached(&file, offset, len);
        Ok(())
    }

    /// Seals the active segment (flushed whole) and starts the next.
    fn roll(&self, a: &mut Active) -> io::Result<()> {
        crate::timed_fsync(|| a.file.sync_data())?;
        let id = a.id + 1;
        let file = create(&self.dir, id)?;
        a.id = id;
        a.file = Arc::new(file);
        a.len = 0;
        Ok(())
    }

    /// Makes segment `id` durable through `end`. Whoever flushes covers every append finished
    /// before the flush began; the others waiting on the lock then find themselves covered.
    fn sync_through(&self, id: u32, file: &File, end: u64) -> io::Result<()> {
        let mut synced = self.synced.lock().map_err(lock_err)?;
        if synced.0 > id || (synced.0 == id && synced.1 >= end) {
            return Ok(());
        }
        let (now_id, now_len) = {
            let a = self.active.lock().map_err(lock_err)?;
            (a.id, a.len)
        };
        if now_id != id {
            // Segment `id` was sealed since, and sealing flushed it whole.
            *synced = (now_id, 0);
            return Ok(());
        }
        crate::timed_fsync(|| file.sync_data())?;
        *synced = (id, now_len);
        Ok(())
    }

    fn reader(&self, id: u32) -> io::Result<Arc<File>> {
        if let Some(f) = self.readers.lock().map_err(lock_err)?.get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.dir.join(name(id)))?);
        let mut readers = self.readers.lock().map_err(lock_err)?;
        if readers.len() >= MAX_OPEN {
            // Any one will do: a reader still using it holds its own handle.
            if let Some(&old) = readers.keys().next() {
                readers.remove(&old);
            }
        }
        readers.insert(id, f.clone());
        Ok(f)
    }

    /// `len` bytes at `offset` of segment `id`. `NotFound` when the segment was compacted
    /// away meanwhile: the caller looks the blob up again.
    pub fn read(&self, id: u32, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let f = self.reader(id)?;
        read_exact_at_uninit(&f, len as usize, offset)
    }

    /// Like [`Segments::read`], but only from the page cache, so that it never waits for the
    /// disk and can run on the calling task: `None` when some of the bytes are not cached (or
    /// the kernel cannot tell), and the caller reads them on the blocking pool instead.
    pub fn read_cached(&self, id: u32, offset: u64, len: u64) -> io::Result<Option<Vec<u8>>> {
        use std::os::fd::AsRawFd;
        let f = self.reader(id)?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let at = i64::try_from(offset).map_err(io::Error::other)?;
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        // SAFETY: the one iovec points at the buffer's capacity of `len` bytes; only a read
        // that filled all of them is counted into its length below.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        if n as usize != len {
            return Ok(None);
        }
        // SAFETY: preadv2 wrote all `len` bytes.
        unsafe { buf.set_len(len) };
        Ok(Some(buf))
    }

    /// Bytes in segment `id`.
    pub fn size(&self, id: u32) -> io::Result<u64> {
        Ok(fs::metadata(self.dir.join(name(id)))?.len())
    }

    /// Every whole record of segment `id`, in order; stops at a torn or foreign tail.
    pub fn records(&self, id: u32) -> io::Result<Vec<Record>> {
        self.records_from(id, 0)
    }

    /// The whole records of segment `id` from the one starting at `at`.
    pub fn records_from(&self, id: u32, from: u64) -> io::Result<Vec<Record>> {
        let f = self.reader(id)?;
        let size = f.metadata()?.len();
        let mut out = vec![];
        let mut at = from;
        let mut head = [0u8; HEADER];
        while at + HEADER as u64 <= size {
            f.read_exact_at(&mut head, at)?;
            if head[..4] != MAGIC {
                break;
            }
            let key_len = u16::from_le_bytes([head[4], head[5]]) as u64;
            let len = u32::from_le_bytes([head[6], head[7], head[8], head[9]]) as u64;
            let offset = at + HEADER as u64 + key_len;
            if offset + len > size {
                break;
            }
            let mut key = vec![0u8; key_len as usize];
            f.read_exact_at(&mut key, at + HEADER as u64)?;
            let Ok(key) = String::from_utf8(key) else { break };
            out.push(Record { key, offset, len });
            at = offset + len;
        }
        Ok(out)
    }

    /// Deletes sealed segment `id`. Readers holding it open finish their reads.
    pub fn remove(&self, id: u32) -> io::Result<()> {
        self.readers.lock().map_err(lock_err)?.remove(&id);
        fs::remove_file(self.dir.join(name(id)))?;
        sync_dir(&self.dir)
    }
}

/// `len` bytes of `file` at `offset`, read into a buffer that is not zeroed first: the read
/// fills it whole or fails. (Zeroing 256 KiB before every read of a small blob was a twentieth
/// of a storage node's CPU while it served pulls.)
fn read_exact_at_uninit(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let mut done = 0usize;
    while done < len {
        let at = offset.checked_add(done as u64).and_then(|a| i64::try_from(a).ok());
        let at = at.ok_or_else(|| io::Error::other("segment offset out of range"))?;
        // SAFETY: pread writes at most `len - done` bytes at `done` into the buffer's capacity
        // of `len`; only bytes it reports written are counted into the length below.
        let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().add(done).cast(), len - done, at) };
        match n {
            n if n > 0 => {
                done += n as usize;
                // SAFETY: the first `done` bytes were written by pread.
                unsafe { buf.set_len(done) };
            }
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "segment ends before the record")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_segment_files_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path().to_path_buf()).unwrap();
        let at = segments.append("sha256:x", b"kept").unwrap().offset;
        for id in 2..(MAX_OPEN as u32 + 50) {
            File::create(dir.path().join(name(id))).unwrap();
            assert!(segments.read(id, 0, 0).unwrap().is_empty());
            assert!(segments.readers.lock().unwrap().len() <= MAX_OPEN);
        }
        assert_eq!(segments.read(1, at, 4).unwrap(), b"kept");
    }

    #[test]
    fn a_cached_read_gives_the_bytes_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path().to_path_buf()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let at = segments.append("sha256:y", &data).unwrap().offset;
        // Just written, so in the page cache: the whole record, or (where the kernel cannot
        // read without waiting) nothing, never a part.
        match segments.read_cached(1, at, data.len() as u64).unwrap() {
            Some(got) => assert_eq!(got, data),
            None => eprintln!("this kernel gave no cached read"),
        }
        // Past the end of the segment: not all there, so nothing.
        assert_eq!(segments.read_cached(1, at + 10, data.len() as u64).unwrap(), None);
    }

    #[test]
    fn the_low_mark_stays_below_every_record_not_yet_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path().to_path_buf()).unwrap();
        let a = segments.append("sha256:a", b"first").unwrap();
        let b = segments.append("sha256:b", b"second").unwrap();
        let end = (1, segments.active.lock().unwrap().len);
        // Writing b's entry: a is still pending, so the mark stays at a's start.
        assert_eq!(segments.low_mark(&[&b]).unwrap(), (1, 0));
        // Writing a's entry while b is pending: the mark is b's start.
        let b_start = b.start;
        assert!(b_start > (1, 0) && b_start < end);
        assert_eq!(segments.low_mark(&[&a]).unwrap(), b_start);
        drop(b);
        // Nothing else pending: the mark is the end of the segments.
        assert_eq!(segments.low_mark(&[&a]).unwrap(), end);
        drop(a);
        assert_eq!(segments.low_mark(&[]).unwrap(), end);
        // A record whose commit failed (dropped unindexed) no longer holds the mark back.
        let c = segments.append("sha256:c", b"third").unwrap();
        assert_eq!(segments.low_mark(&[]).unwrap(), c.start);
        drop(c);
        assert!(segments.low_mark(&[]).unwrap() > end);
    }
}
