//! An upload being staged: an append-only file and the running hashes of its bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use berth_core::{Algorithm, Digest, DigestHasher};

/// A staged upload: its file and the hash state of everything written to it so far.
///
/// SHA-256 (what clients verify) and BLAKE3 (the node's integrity checksum) are updated in
/// the same pass over each buffer, so every byte is read once. A SHA-512 digest is rare enough
/// that it is computed from the file when the upload finishes.
pub(crate) struct Staging {
    pub path: PathBuf,
    file: File,
    pub size: u64,
    sha256: DigestHasher,
    blake3: blake3::Hasher,
}

/// Hash state saved before an append, to undo it if the request fails part way.
pub(crate) struct Mark {
    size: u64,
    sha256: DigestHasher,
    blake3: blake3::Hasher,
}

impl Staging {
    /// Creates an empty staging file (fails if it exists).
    pub fn create(path: PathBuf) -> io::Result<Staging> {
        let file = OpenOptions::new().read(true).append(true).create_new(true).open(&path)?;
        Ok(Staging { path, file, size: 0, sha256: Algorithm::Sha256.hasher(), blake3: blake3::Hasher::new() })
    }

    /// Reopens a staging file left by an earlier process, rebuilding its hash state.
    pub fn reopen(path: PathBuf) -> io::Result<Staging> {
        let mut file = OpenOptions::new().read(true).append(true).open(&path)?;
        let mut sha256 = Algorithm::Sha256.hasher();
        let mut blake3 = blake3::Hasher::new();
        let size = hash_file(&mut file, |b| {
            sha256.update(b);
            blake3.update(b);
        })?;
        Ok(Staging { path, file, size, sha256, blake3 })
    }

    /// The state to return to if the next appends must be undone.
    pub fn mark(&self) -> Mark {
        Mark { size: self.size, sha256: self.sha256.clone(), blake3: self.blake3.clone() }
    }

    /// Undoes every append since `mark`.
    pub fn rollback(&mut self, mark: Mark) -> io::Result<()> {
        self.file.set_len(mark.size)?;
        self.size = mark.size;
        self.sha256 = mark.sha256;
        self.blake3 = mark.blake3;
        Ok(())
    }

    /// Hashes and appends one buffer.
    pub fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.sha256.update(buf);
        self.blake3.update(buf);
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Whether the staged bytes hash to `digest`, and their BLAKE3 checksum.
    pub fn verify(&mut self, digest: &Digest) -> io::Result<(bool, [u8; 32])> {
        let checksum = *self.blake3.finalize().as_bytes();
        let ok = match digest.algorithm() {
            Algorithm::Sha256 => self.sha256.clone().finish() == *digest,
            other => {
                let mut h = other.hasher();
                hash_file(&mut self.file, |b| h.update(b))?;
                h.finish() == *digest
            }
        };
        Ok((ok, checksum))
    }

    /// Flushes the staged bytes to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The whole staged content, for blobs small enough to go inline.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut out)?;
        Ok(out)
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

/// fsyncs a directory, making a rename or creation inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
