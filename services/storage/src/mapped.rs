//! Blob files read through a memory map, so that a pull copies each byte once (page cache to
//! socket) instead of twice (page cache to a buffer, buffer to socket).
//!
//! A blob file never changes once committed: it is only ever renamed into place and unlinked,
//! and an unlinked file stays mapped until the last reader lets go. So a map of it cannot shrink
//! under a reader (which would fault), and the bytes a reader sees are the verified ones.
//!
//! The pages a reader is about to send are mapped and faulted in on the blocking pool, one
//! chunk ahead of the socket, so that a blob not in the page cache makes a blocking thread wait for
//! the disk, never the thread serving the connection.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use bytes::Bytes;

/// A read-only shared mapping of part of a file.
pub(crate) struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and the bytes behind it never change (see the module
// docs); nothing in `Mapped` is tied to the thread that created it.
unsafe impl Send for Mapped {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for Mapped {}

/// Bytes `[offset, offset + len)` of `file` (which must hold them), mapped and faulted in:
/// reading them from the disk if they are not cached, so this belongs on the blocking pool.
///
/// Each chunk of a pull is mapped on its own and unmapped once sent, so a pull keeps only a
/// few chunks mapped and the process's resident size does not grow with the blob.
pub(crate) fn read_mapped(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let page = crate::page_size();
    let start = offset - offset % page;
    let lead = (offset - start) as usize;
    let map_len = lead + len;
    // SAFETY: a fresh read-only shared mapping of an open descriptor, checked for failure.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), start as i64)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let map = Mapped { ptr, len: map_len };
    let bytes = map.as_ref();
    let mut acc = 0u8;
    for i in (0..map_len).step_by(page as usize) {
        // SAFETY: `i` is within the mapping; a volatile read keeps the touch from being elided.
        acc ^= unsafe { std::ptr::read_volatile(bytes.as_ptr().add(i)) };
    }
    std::hint::black_box(acc);
    Ok(Bytes::from_owner(map).slice(lead..))
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns, once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}
