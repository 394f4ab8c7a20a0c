//! An upload being staged: its bytes (in memory while small, then in a file) and the running
//! hashes of them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::{Algorithm, Digest, DigestHasher};
use bytes::Bytes;

use crate::integrity::{Checksums, TreeHasher};

/// Bytes of small uploads held in memory across all uploads of a node; past it uploads go
/// to files from their first byte. Bounds what many idle sessions can pin.
pub(crate) const MEMORY_BUDGET: u64 = 64 * 1024 * 1024;

/// A staged upload: its bytes and the hash state of everything appended so far.
///
/// An upload stays in memory while it is no larger than [`crate::INLINE_THRESHOLD`] (and the
/// node's memory budget allows): such a blob ends up inline in RocksDB, so a staging file
/// would only be written, read back and unlinked. A larger upload spills to its file under
/// `uploads/`, which survives a restart; a small one in memory does not (the client starts
/// it again, as clients do after any failed upload).
///
/// SHA-256 (what clients verify) and BLAKE3 (the node's integrity checksums, unit by unit: see
/// [`crate::integrity`]) are updated in the same pass over each buffer, so every byte is read
/// once. A SHA-512 digest is rare enough
/// that it is computed from the staged bytes when the upload finishes.
pub(crate) struct Staging {
    pub path: PathBuf,
    file: Option<File>,
    /// The bytes while they are held in memory.
    memory: Memory,
    budget: Arc<AtomicU64>,
    pub size: u64,
    /// Last time bytes arrived (or the upload started).
    pub touched: SystemTime,
    /// `None` for a copy from another node, checked by its BLAKE3 instead (see
    /// [`Staging::verify_copy`]).
    sha256: Option<DigestHasher>,
    tree: TreeHasher,
    /// Bytes of the file whose writeback has been started (see [`WRITEBACK_STEP`]).
    written_back: u64,
    /// Whether the file's pages leave the page cache as soon as they are on the disk: a copy
    /// this node will not be read from first (see [`Staging::uncached`]).
    uncached: bool,
    /// Bytes of the file dropped from the page cache so far, when `uncached`.
    dropped: u64,
}

/// Bytes written to a staging file between two starts of their writeback. The kernel would
/// otherwise hold a large upload's pages dirty until the final fsync, which then waits for the
/// whole blob to reach the disk; started early, the disk writes while the network delivers and
/// the fsync finds little left to do.
const WRITEBACK_STEP: u64 = 8 * 1024 * 1024;

/// Smallest chunk held in memory as it was received, uncopied; a smaller one is copied at
/// once. A received chunk is a slice of the buffer it arrived in (a gRPC frame's decode buffer,
/// or hyper's read buffer in standalone) and keeps all of that buffer alive, which can be a few
/// times the chunk and is more than [`MEMORY_BUDGET`] counts. So a chunk is held uncopied only
/// while the call that brought it runs: a blob stored whole by one call (a copy from another
/// node, a monolithic PUT) reaches its segment with no copy made, and an upload that waits for
/// a later call is [`Staging::settle`]d first, its chunks copied into a buffer of their own.
const HELD_UNCOPIED: usize = 128 * 1024;

/// A staged upload's bytes in memory: the large chunks held as received (see
/// [`HELD_UNCOPIED`]), each after the small ones copied before it, then the small ones copied
/// since, in one buffer of its own.
#[derive(Default)]
struct Memory {
    /// Chunks held as received, each after the copied bytes that came before it.
    received: Vec<Bytes>,
    /// Bytes copied after the last of `received`.
    tail: Vec<u8>,
}

impl Memory {
    fn len(&self) -> u64 {
        self.received.iter().map(|c| c.len() as u64).sum::<u64>() + self.tail.len() as u64
    }

    /// Whether a chunk is held as received (after a rollback, perhaps only copied bytes that
    /// preceded one: settling them again costs a copy of a few bytes).
    fn holds_received(&self) -> bool {
        !self.received.is_empty()
    }

    fn push(&mut self, chunk: Bytes) {
        if chunk.len() < HELD_UNCOPIED {
            self.tail.extend_from_slice(&chunk);
            return;
        }
        if !self.tail.is_empty() {
            self.received.push(Bytes::from(std::mem::take(&mut self.tail)));
        }
        self.received.push(chunk);
    }

    /// The parts in order.
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.received.iter().map(|c| &c[..]).chain(std::iter::once(&self.tail[..]))
    }

    /// Keeps the first `len` bytes.
    fn truncate(&mut self, len: u64) {
        let mut keep = len as usize;
        self.received.retain_mut(|c| {
            c.truncate(keep);
            keep -= c.len();
            !c.is_empty()
        });
        self.tail.truncate(keep);
    }

    /// Everything in one buffer of its own (see [`Staging::settle`]).
    fn settle(&mut self) {
        if self.holds_received() {
            let whole = self.concat();
            *self = Memory { received: vec![], tail: whole };
        }
    }

    fn concat(&self) -> Vec<u8> {
        let mut whole = Vec::with_capacity(self.len() as usize);
        self.parts().for_each(|p| whole.extend_from_slice(p));
        whole
    }

    /// Everything, emptying it: with no copy when it is one part.
    fn take(&mut self) -> Bytes {
        let whole = match (self.received.len(), self.tail.is_empty()) {
            (0, _) => Bytes::from(std::mem::take(&mut self.tail)),
            (1, true) => self.received.pop().unwrap_or_default(),
            _ => Bytes::from(self.concat()),
        };
        *self = Memory::default();
        whole
    }
}

/// Hash state saved before an append, to undo it if the request fails part way.
pub(crate) struct Mark {
    size: u64,
    sha256: Option<DigestHasher>,
    tree: TreeHasher,
}

impl Staging {
    /// A new, empty upload whose file (if it needs one) will be `path`; `hash_digest` unless
    /// it is a copy from another node (checked by [`Staging::verify_copy`]).
    pub fn create(path: PathBuf, budget: Arc<AtomicU64>, hash_digest: bool) -> Staging {
        Staging {
            path,
            file: None,
            memory: Memory::default(),
            budget,
            size: 0,
            touched: SystemTime::now(),
            sha256: hash_digest.then(|| Algorithm::Sha256.hasher()),
            tree: TreeHasher::default(),
            written_back: 0,
            uncached: false,
            dropped: 0,
        }
    }

    /// Makes the staging file leave the page cache as it is written when `uncached`, a step
    /// behind its writeback: for a copy that reads will not ask this node for first, which
    /// would otherwise take as much page cache as the blob's size until memory runs short.
    /// Best effort: pages whose writeback has not finished a step later stay until the drop
    /// after the final fsync.
    pub fn uncached_if(mut self, uncached: bool) -> Staging {
        self.uncached = uncached;
        self
    }

    /// Reopens a staging file left by an earlier process, rebuilding its hash state.
    pub fn reopen(path: PathBuf, budget: Arc<AtomicU64>) -> io::Result<Staging> {
        let mut file = OpenOptions::new().read(true).append(true).open(&path)?;
        let mut sha256 = Algorithm::Sha256.hasher();
        let mut tree = TreeHasher::default();
        let size = hash_file(&mut file, |b| {
            sha256.update(b);
            tree.update(b);
        })?;
        let touched = file.metadata().and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now());
        let sha256 = Some(sha256);
        Ok(Staging {
            path,
            file: Some(file),
            memory: Memory::default(),
            budget,
            size,
            touched,
            sha256,
            tree,
            written_back: 0,
            uncached: false,
            dropped: 0,
        })
    }

    /// The state to return to if the next appends must be undone.
    pub fn mark(&self) -> Mark {
        Mark { size: self.size, sha256: self.sha256.clone(), tree: self.tree.clone() }
    }

    /// Undoes every append since `mark`.
    pub fn rollback(&mut self, mark: Mark) -> io::Result<()> {
        match &self.file {
            Some(f) => {
                f.set_len(mark.size)?;
                self.written_back = self.written_back.min(mark.size);
                self.dropped = self.dropped.min(mark.size);
            }
            None => {
                // Marks are taken between calls, on chunk boundaries: no chunk held as
                // received is left cut short, still holding the rest of its buffer.
                let drop = self.size - mark.size;
                self.memory.truncate(mark.size);
                self.budget.fetch_sub(drop, Ordering::Relaxed);
            }
        }
        self.size = mark.size;
        self.sha256 = mark.sha256;
        self.tree = mark.tree;
        Ok(())
    }

    /// Whether `more` bytes appended would still be held in memory, with no file to write.
    pub fn stays_in_memory(&self, more: u64) -> bool {
        self.file.is_none()
            && self.size + more <= crate::INLINE_THRESHOLD
            && self.budget.load(Ordering::Relaxed) + more <= MEMORY_BUDGET
    }

    /// Hashes and appends one chunk: in memory, uncopied when it is large (see
    /// [`HELD_UNCOPIED`]), or to the staging file.
    pub fn append(&mut self, chunk: Bytes) -> io::Result<()> {
        let buf = &chunk[..];
        if let Some(h) = &mut self.sha256 {
            h.update(buf);
        }
        self.tree.update(buf);
        let grown = self.size + buf.len() as u64;
        if self.file.is_none() {
            let fits = grown <= crate::INLINE_THRESHOLD
                && self.budget.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64 <= MEMORY_BUDGET;
            if fits {
                self.memory.push(chunk);
                self.size = grown;
                self.touched = SystemTime::now();
                return Ok(());
            }
            if grown <= crate::INLINE_THRESHOLD {
                self.budget.fetch_sub(buf.len() as u64, Ordering::Relaxed);
            }
            self.spill()?;
        }
        if let Some(f) = &mut self.file {
            f.write_all(buf)?;
            if grown - self.written_back >= WRITEBACK_STEP {
                start_writeback(f, self.written_back, grown - self.written_back);
                // The previous step's writeback has had a step's time to finish: its pages
                // are clean, and the kernel can hand them to the next step's writes.
                if self.uncached && self.written_back > self.dropped {
                    drop_cached(f, self.dropped, self.written_back - self.dropped);
                    self.dropped = self.written_back;
                }
                self.written_back = grown;
            }
        }
        self.size = grown;
        self.touched = SystemTime::now();
        Ok(())
    }

    /// Copies the chunks held as received into one buffer of the upload's own (see
    /// [`HELD_UNCOPIED`]): for an upload that stays staged after the call that brought them.
    pub fn settle(&mut self) {
        self.memory.settle();
    }

    /// Moves the bytes held in memory to the staging file.
    fn spill(&mut self) -> io::Result<()> {
        let mut f = OpenOptions::new().read(true).append(true).create_new(true).open(&self.path)?;
        for p in self.memory.parts() {
            f.write_all(p)?;
        }
        self.release_memory();
        self.file = Some(f);
        Ok(())
    }

    fn release_memory(&mut self) {
        self.budget.fetch_sub(self.memory.len(), Ordering::Relaxed);
        self.memory = Memory::default();
    }

    /// Whether the bytes are held in memory (no staging file).
    pub fn in_memory(&self) -> bool {
        self.file.is_none()
    }

    /// Whether [`Staging::verify`] of `digest` only finishes the hash run as the bytes came:
    /// they are in memory and `digest` is a SHA-256 one, hashed as they arrived.
    pub fn verifies_at_once(&self, digest: &Digest) -> bool {
        self.in_memory() && digest.algorithm() == Algorithm::Sha256 && self.sha256.is_some()
    }

    /// Whether the staged bytes hash to `digest`, and their integrity checksums.
    pub fn verify(&mut self, digest: &Digest) -> io::Result<(bool, Checksums)> {
        let checksum = self.checksums();
        let ok = match (digest.algorithm(), &self.sha256) {
            (Algorithm::Sha256, Some(h)) => h.clone().finish() == *digest,
            (other, _) => {
                let mut h = other.hasher();
                match &mut self.file {
                    Some(f) => {
                        hash_file(f, |b| h.update(b))?;
                    }
                    None => self.memory.parts().for_each(|p| h.update(p)),
                }
                h.finish() == *digest
            }
        };
        Ok((ok, checksum))
    }

    /// Whether the staged bytes are those a node sent as a copy of its blob whose BLAKE3 is
    /// `blake3`, and their integrity checksums.
    pub fn verify_copy(&self, blake3: &[u8; 32]) -> (bool, Checksums) {
        let checksum = self.checksums();
        (checksum.blake3 == *blake3, checksum)
    }

    /// The integrity checksums of the staged bytes.
    pub fn checksums(&self) -> Checksums {
        self.tree.finish()
    }

    /// Makes the staged bytes durable in their file, spilling them there first if need be.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.spill()?;
        }
        match &self.file {
            Some(f) => crate::timed_fsync(|| f.sync_data()),
            None => Ok(()),
        }
    }

    /// Whether the staged bytes leave the page cache once durable (see [`Staging::uncached`]).
    pub fn is_uncached(&self) -> bool {
        self.uncached
    }

    /// Drops the file's pages from the page cache; after [`Staging::sync`], all of them.
    pub fn drop_cached(&self) {
        if let Some(f) = &self.file {
            drop_all_cached(f);
        }
    }

    /// The whole staged content, for blobs small enough to go inline: with no copy when it is
    /// one chunk held as received, or only copied bytes.
    pub fn take_all(&mut self) -> io::Result<Bytes> {
        match &mut self.file {
            None => {
                self.budget.fetch_sub(self.memory.len(), Ordering::Relaxed);
                Ok(self.memory.take())
            }
            Some(f) => {
                let mut out = Vec::with_capacity(self.size as usize);
                f.seek(SeekFrom::Start(0))?;
                f.read_to_end(&mut out)?;
                Ok(Bytes::from(out))
            }
        }
    }

    /// Removes the staging file, if there is one.
    pub fn discard(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
        self.release_memory();
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.release_memory();
    }
}

fn hash_file(file: &mut File, mut feed: impl FnMut(&[u8])) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; crate::WRITE_BUFFER];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        feed(&buf[..n]);
        total += n as u64;
    }
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` to the disk, without
/// waiting for them. Durability still comes from the fsync at commit; this only moves the work
/// earlier. Failure is harmless (the fsync then does all of it), so it is ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for
    // the duration of the call because `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Asks the kernel to drop from the page cache the whole pages of `file` within `len` bytes
/// from `offset`. A partly covered page at either end stays: it holds bytes of a neighbour,
/// and the kernel would otherwise drop a partial last page of the file, which the next
/// append to it would then read back from the disk. Only clean pages go (dirty ones or ones
/// being written stay), so it never costs durability; a failure only leaves pages cached,
/// so it is ignored.
pub(crate) fn drop_cached(file: &File, offset: u64, len: u64) {
    let page = crate::page_size();
    let (first, end) = (offset.div_ceil(page) * page, (offset + len) / page * page);
    if end > first {
        fadvise_dont_need(file, first, end - first);
    }
}

/// Drops every clean page of `file` from the page cache: for a file nothing appends to.
pub(crate) fn drop_all_cached(file: &File) {
    fadvise_dont_need(file, 0, 0);
}

/// `posix_fadvise(DONTNEED)` over `len` bytes from `offset` (0: to the end of the file).
fn fadvise_dont_need(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open for the
    // duration of the call because `file` is borrowed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
    }
}

/// fsyncs a directory, making a rename or creation inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing the directory that holds each one it makes,
/// so that a blob renamed into it survives a crash together with every directory on its path.
pub(crate) fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    let mut missing = vec![];
    let mut at = dir;
    while !at.exists() {
        missing.push(at.to_path_buf());
        at = match at.parent() {
            Some(p) => p,
            None => break,
        };
    }
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging(dir: &Path, budget: &Arc<AtomicU64>) -> Staging {
        Staging::create(dir.join("upload"), budget.clone(), true)
    }

    #[test]
    fn a_large_chunk_is_held_as_received_and_a_small_one_copied() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(AtomicU64::new(0));
        let large = Bytes::from(vec![7u8; HELD_UNCOPIED]);
        let mut st = staging(dir.path(), &budget);
        st.append(large.clone()).unwrap();
        assert_eq!(budget.load(Ordering::Relaxed), HELD_UNCOPIED as u64);
        let taken = st.take_all().unwrap();
        assert_eq!(taken.as_ptr(), large.as_ptr(), "the one chunk comes back uncopied");
        assert_eq!(budget.load(Ordering::Relaxed), 0);

        let small = Bytes::from(vec![1u8; 100]);
        let mut st = staging(dir.path(), &budget);
        st.append(small.clone()).unwrap();
        assert!(!st.memory.holds_received(), "a small chunk does not keep its frame alive");
        drop(st);
        assert_eq!(budget.load(Ordering::Relaxed), 0, "dropping the upload gives its bytes back");

        // Settled, an upload that waits for its next call keeps no received buffer.
        let mut st = staging(dir.path(), &budget);
        st.append(small.clone()).unwrap();
        st.append(large.clone()).unwrap();
        st.settle();
        assert!(!st.memory.holds_received(), "the held chunk was copied");
        assert_eq!(budget.load(Ordering::Relaxed), (100 + HELD_UNCOPIED) as u64, "settling moves no budget");
        let settled = st.memory.tail.as_ptr();
        st.settle();
        assert_eq!(st.memory.tail.as_ptr(), settled, "nothing left to settle");
        let mut whole = small.to_vec();
        whole.extend_from_slice(&large);
        assert_eq!(&st.take_all().unwrap()[..], &whole[..]);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn small_chunks_are_copied_once() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(AtomicU64::new(0));
        let mut st = staging(dir.path(), &budget);
        for part in [&b"frames "[..], b"of a ", b"body"] {
            st.append(Bytes::copy_from_slice(part)).unwrap();
        }
        let buffer = st.memory.tail.as_ptr();
        let whole = st.take_all().unwrap();
        assert_eq!(&whole[..], b"frames of a body");
        assert_eq!(whole.as_ptr(), buffer, "the copied bytes come back as they are, not copied again");
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn chunks_held_in_memory_hash_roll_back_and_spill_as_one_stream() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(AtomicU64::new(0));
        let data: Vec<u8> = (0..crate::INLINE_THRESHOLD as usize).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b, c) = (&data[..HELD_UNCOPIED], &data[HELD_UNCOPIED..HELD_UNCOPIED + 10], &data[HELD_UNCOPIED + 10..]);

        let mut st = staging(dir.path(), &budget);
        let empty = st.mark();
        st.append(Bytes::copy_from_slice(a)).unwrap();
        st.rollback(empty).unwrap();
        assert_eq!((st.size, budget.load(Ordering::Relaxed), st.memory.len()), (0, 0, 0), "back to nothing");
        let nothing = st.mark();
        st.append(Bytes::from(vec![3u8; HELD_UNCOPIED])).unwrap();
        assert!(st.memory.holds_received());
        st.rollback(nothing).unwrap();
        assert!(!st.memory.holds_received(), "nothing is held once the held chunk is rolled back");
        st.append(Bytes::copy_from_slice(a)).unwrap();
        let mark = st.mark();
        st.append(Bytes::copy_from_slice(b)).unwrap();
        st.append(Bytes::from_static(b"not kept")).unwrap();
        st.rollback(mark).unwrap();
        assert_eq!((st.size, budget.load(Ordering::Relaxed)), (a.len() as u64, a.len() as u64));
        st.append(Bytes::copy_from_slice(b)).unwrap();
        st.append(Bytes::copy_from_slice(c)).unwrap();
        let full = st.mark();
        st.rollback(full).unwrap();
        assert_eq!(st.size, data.len() as u64, "a rollback to the end keeps everything");
        // A SHA-512 digest, which has no running hash, is computed over the chunks themselves.
        let mut h = Algorithm::Sha512.hasher();
        h.update(&data);
        let (ok, sums) = st.verify(&h.finish()).unwrap();
        assert!(ok, "the chunks hash as the whole blob");
        assert_eq!(&st.take_all().unwrap()[..], &data[..], "the chunks put together");
        assert_eq!(budget.load(Ordering::Relaxed), 0);

        // Spilled to the file (as a sync does), the chunks are written in order.
        let mut st = staging(dir.path(), &budget);
        st.append(Bytes::copy_from_slice(a)).unwrap();
        st.append(Bytes::copy_from_slice(&data[HELD_UNCOPIED..])).unwrap();
        st.sync().unwrap();
        assert_eq!(budget.load(Ordering::Relaxed), 0, "spilled bytes leave the memory budget");
        assert_eq!(fs::read(&st.path).unwrap(), data);
        assert_eq!(st.checksums(), sums);
        st.discard();
    }
}
