//! What the storage node's client and server agree on beyond `proto/storage.proto`: frame and
//! message bounds, digests in their string form, and registry errors carried in a gRPC status.
//!
//! Registry errors travel as `berth_proto::status` puts them in a status, for every service
//! alike.

use berth_core::{Digest, Stored};
pub use berth_proto::status::{registry_error_of, status_of};
use berth_proto::storage as pb;
use bytes::{BufMut, Bytes, BytesMut};

/// Largest data frame. Big enough that per-message overhead (framing, a poll, an allocation)
/// is small next to the bytes, small enough that a frame never stalls the HTTP/2 window for
/// long and memory per stream stays bounded; it is also the inline threshold, so a segment
/// blob always fits in one frame.
pub const FRAME_SIZE: usize = 256 * 1024;

/// Largest encoded message either side accepts: one full data frame plus room for the
/// protobuf tags and for the largest non-data message (a page of listed digests).
pub const MAX_MESSAGE: usize = FRAME_SIZE + 32 * 1024;

/// The path of the `Read` call: its answer is framed by hand on both sides (see
/// `server::StorageService` and `client::Frames`), so both name it here.
pub const READ_PATH: &str = "/berth.storage.v1.Storage/Read";

/// The path of the `ReadSmall` call, framed by hand like `Read`.
pub const READ_SMALL_PATH: &str = "/berth.storage.v1.Storage/ReadSmall";

/// The path of the `Put` call, whose request is framed by hand on both sides like the read
/// answers (see `framing`).
pub const PUT_PATH: &str = "/berth.storage.v1.Storage/Put";

/// The path of the `PutSmall` call, framed by hand like `Put`.
pub const PUT_SMALL_PATH: &str = "/berth.storage.v1.Storage/PutSmall";

/// The path of the `UploadAppend` call, framed by hand like `Put`.
pub const APPEND_PATH: &str = "/berth.storage.v1.Storage/UploadAppend";

/// Digests in one list reply. A sha512 digest with its stamp takes under 150 bytes encoded,
/// so a full page stays well inside [`MAX_MESSAGE`].
pub const LIST_PAGE: usize = 1000;

/// Upload ids in one expiry message: ids are at most a few dozen bytes, so a batch stays
/// well inside [`MAX_MESSAGE`].
pub const EXPIRE_BATCH: usize = 1000;

/// Largest blob `put_small` accepts over the wire: the server holds it whole before storing
/// it, so it is bounded by the largest manifest the registry accepts.
pub const SMALL_LIMIT: u64 = berth_core::manifest::MAX_MANIFEST_SIZE as u64;

/// Longest piece of a bad value quoted back in an error: enough to recognise it, never a
/// megabyte echoed into a log.
const QUOTE_LIMIT: usize = 80;

/// A digest received from the peer, or why it is not one.
pub fn parse_digest(s: &str) -> Result<Digest, String> {
    s.parse().map_err(|e| format!("bad digest {:?}: {e}", quote(s)))
}

/// The start of a bad value, for an error message.
fn quote(s: &str) -> String {
    s.chars().take(QUOTE_LIMIT).collect()
}

/// `data` cut into pieces of at most [`FRAME_SIZE`] bytes, without copying it.
pub fn frames(data: Bytes) -> impl Iterator<Item = Bytes> {
    let len = data.len();
    (0..len).step_by(FRAME_SIZE).map(move |at| data.slice(at..(at + FRAME_SIZE).min(len)))
}

/// `msg` as one gRPC message on the wire: uncompressed, its length, its bytes.
pub fn grpc_message(msg: &impl prost::Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + msg.encoded_len());
    put_grpc_message(&mut buf, msg);
    buf.freeze()
}

/// Appends `msg` to `buf` as one gRPC message (see [`grpc_message`]). A BytesMut grows as
/// needed, so encoding cannot run out of room.
pub fn put_grpc_message(buf: &mut BytesMut, msg: &impl prost::Message) {
    put_grpc_prefix(buf, msg.encoded_len());
    msg.encode_raw(buf);
}

/// Appends the 5-byte prefix of an uncompressed gRPC message of `len` bytes.
pub fn put_grpc_prefix(buf: &mut BytesMut, len: usize) {
    buf.put_u8(0);
    buf.put_u32(len as u32);
}

/// The length on the wire (prefix included) of the gRPC message `buf` starts with, once its
/// 5-byte prefix is there; an error for a compressed message (neither side compresses) or
/// one over [`MAX_MESSAGE`].
pub fn framed_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let Some(prefix) = buf.get(..5) else { return Ok(None) };
    if prefix[0] != 0 {
        return Err("a compressed message".into());
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("a message of {len} bytes"));
    }
    Ok(Some(5 + len))
}

/// A stored blob as its message.
pub fn stored_to_proto(s: Stored) -> pb::Stored {
    pb::Stored { size: s.size, stamp: s.stamp }
}

/// A stored blob from its message.
pub fn stored_from_proto(s: pb::Stored) -> Stored {
    Stored { size: s.size, stamp: s.stamp }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_bounded_and_complete() {
        let data = Bytes::from((0..FRAME_SIZE * 2 + 5).map(|i| i as u8).collect::<Vec<_>>());
        let parts: Vec<Bytes> = frames(data.clone()).collect();
        assert_eq!(parts.iter().map(Bytes::len).collect::<Vec<_>>(), vec![FRAME_SIZE, FRAME_SIZE, 5]);
        assert_eq!(parts.concat(), data.to_vec());
        assert_eq!(frames(Bytes::new()).count(), 0);
    }
}
