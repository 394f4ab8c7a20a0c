//! A [`BlobStore`] over gRPC: one storage node as a frontend (or a router over many nodes)
//! sees it.
//!
//! Unary calls carry a deadline ([`StorageClientConfig::request_timeout`]). Streams have no
//! overall deadline, since a 10 GB layer takes as long as it takes, but fail once the node
//! makes no progress for [`StorageClientConfig::frame_timeout`]: a read waiting for its next
//! frame, a write whose next frame the node does not take, or a write waiting for its answer.
//! A read checks that the bytes received add up to the length the node announced, so a cut
//! stream always ends in an error. Registry errors come back exactly as the node's store
//! returned them; a node out of reach is a 503.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use berth_core::error::Result;
use berth_core::store::{FinishedCopies, COPY_WHILE_FINISHING, FINISH_COPY_TIME};
use berth_core::{BlobStore, ByteStream, Deleted, Digest, ErrorCode, RegistryError, Stored};
use berth_proto::conn::Conn;
use berth_proto::status::never_sent;
use berth_proto::storage as pb;
use berth_proto::storage::storage_client::StorageClient as StorageGrpc;
use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::future::FutureExt;
use futures::stream::{self, StreamExt};
use futures::SinkExt;
use tonic::{Code, Request, Status, Streaming};

use crate::framing::{DataMessage, Framed, Frames, Unframed};
use crate::wire::{
    frames, grpc_message, parse_digest, registry_error_of, stored_from_proto, APPEND_PATH, LIST_PAGE, MAX_MESSAGE,
    PUT_PATH, PUT_SMALL_PATH, READ_PATH, READ_SMALL_PATH, SMALL_LIMIT,
};

/// The client's time limits.
#[derive(Debug, Clone)]
pub struct StorageClientConfig {
    /// How long a unary call, or a stream's first answer, may take.
    pub request_timeout: Duration,
    /// How long connecting to the node may take.
    pub connect_timeout: Duration,
    /// How long a stream may go without progress on the node's side before it fails.
    pub frame_timeout: Duration,
}

impl Default for StorageClientConfig {
    /// Five seconds covers an fsync on a busy disk; half a second to connect is generous on a
    /// LAN and short enough to move on to another replica; thirty seconds without a frame
    /// means the node is stuck, not slow.
    fn default() -> Self {
        StorageClientConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
            frame_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StorageClientError {
    /// The address is not a `host:port` a channel can dial.
    #[error("bad storage node address {addr:?}: {source}")]
    Address {
        /// The address given.
        addr: String,
        /// What the transport said.
        source: tonic::transport::Error,
    },
}

/// One storage node, reached over gRPC. Connects on first use and reconnects as needed.
#[derive(Clone)]
pub struct StorageClient {
    addr: String,
    grpc: StorageGrpc<Conn>,
    /// The channel `grpc` calls over, for its connection count.
    conn: Conn,
    config: StorageClientConfig,
    /// The node's incarnation as a reply reported it, with the channel's connection count
    /// ([`Conn::connection_changes`]) it holds for: once the connection it came over is gone,
    /// the node may have restarted. `None` when none has, or since a call failed in a way a
    /// restart would explain (see [`BlobStore::incarnation`]).
    incarnation: Arc<Mutex<Option<(u64, u64)>>>,
}

/// HTTP/2 flow control of a storage channel: a stream may have 4 MiB in flight (sixteen read
/// frames, so a blob streams without waiting for window updates), a connection 16 MiB (the
/// most a node's answers can hold in this process's buffers per connection).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame a storage channel takes: a 256 KiB read frame in a few frames
/// rather than sixteen of the default 16 KiB.
pub const MAX_FRAME: u32 = 1 << 20;

/// How often a storage channel pings its node. A node that stops answering without closing
/// the connection (killed with its host, cut off the network) loses it within [`KEEPALIVE`] +
/// [`PING_TIMEOUT`], which also stops the node's incarnation being trusted (see
/// [`StorageClient::incarnation`]), so that uploads no longer begin there without a call.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// How long a ping may go unanswered (the node's connection task answers it, not its
/// handlers, so a node busy with fsyncs still does).
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `e` is a call to a node that never reached it (see [`RegistryError::unsent`]).
pub(crate) fn not_reached(e: &RegistryError) -> bool {
    e.unsent
}

impl StorageClient {
    /// A client of the node at `addr` (`host:port`).
    pub fn new(addr: &str, config: StorageClientConfig) -> std::result::Result<StorageClient, StorageClientError> {
        let bad = |source| StorageClientError::Address { addr: addr.to_string(), source };
        let endpoint = berth_proto::tls::endpoint(addr)
            .map_err(bad)?
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = berth_proto::conn::lazy(&endpoint, config.connect_timeout);
        let grpc = StorageGrpc::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(StorageClient {
            addr: addr.to_string(),
            grpc,
            conn: channel,
            config,
            incarnation: Arc::new(Mutex::new(None)),
        })
    }

    /// The node's address, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A request carrying the unary deadline.
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.config.request_timeout);
        berth_proto::carry(&mut r);
        r
    }

    /// The registry error a failed call means. One that a restart of the node would explain
    /// (an unknown upload, the node out of reach) forgets the node's incarnation, so that the
    /// next upload to begin there asks the node for it.
    fn failure(&self, status: Status) -> RegistryError {
        let e = self.failure_of(status);
        if e.code == ErrorCode::BlobUploadUnknown || e.status == 503 {
            self.forget_incarnation();
        }
        e
    }

    fn forget_incarnation(&self) {
        if let Ok(mut i) = self.incarnation.lock() {
            *i = None;
        }
    }

    /// The channel's connection count, taken before a call whose answer may report the
    /// node's incarnation.
    fn connection(&self) -> u64 {
        self.conn.connection_changes()
    }

    /// The node's incarnation `reported` in the answer to a call begun at connection count
    /// `before`: kept only when the count has not changed since, so that the answer came over
    /// the connection calls go over now (an answer over a connection made during the call is
    /// dropped; the next call's is kept). 0 is a node of an earlier version's.
    fn heard(&self, before: u64, reported: u64) {
        if reported == 0 || self.connection() != before {
            return;
        }
        if let Ok(mut i) = self.incarnation.lock() {
            *i = Some((reported, before));
        }
    }

    fn failure_of(&self, status: Status) -> RegistryError {
        if let Some(e) = registry_error_of(&status) {
            return e;
        }
        if never_sent(&status) {
            return RegistryError::new(ErrorCode::Unknown, format!("storage node {} not reached: {status}", self.addr))
                .with_status(503)
                .marked_unsent();
        }
        match status.code() {
            // tonic reports its own timeouts as CANCELLED, a refused or broken connection as
            // UNAVAILABLE or UNKNOWN.
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => self.unavailable(status),
            // INVALID_ARGUMENT, UNIMPLEMENTED and the like: the two sides disagree on the contract.
            _ => RegistryError::internal(format!("storage node {}: {status}", self.addr)),
        }
    }

    /// The answer when the node cannot be reached or stalls.
    fn unavailable(&self, detail: impl std::fmt::Display) -> RegistryError {
        RegistryError::new(ErrorCode::Unknown, format!("storage node {} unavailable: {detail}", self.addr))
            .with_status(503)
    }

    /// An answer that breaks the contract.
    fn malformed(&self, detail: impl std::fmt::Display) -> RegistryError {
        RegistryError::internal(format!("malformed answer from storage node {}: {detail}", self.addr))
    }

    /// The outcome of each copy a node made, one per target in order.
    fn outcomes(&self, outcomes: Vec<pb::TransferOutcome>, targets: &[String]) -> Result<Vec<Result<Stored>>> {
        if outcomes.len() != targets.len() {
            return Err(self.malformed(format!("{} outcomes for {} targets", outcomes.len(), targets.len())));
        }
        Ok(outcomes
            .into_iter()
            .map(|o| match o.stored {
                Some(s) => Ok(stored_from_proto(s)),
                None => {
                    let detail = format!("{}: {}", o.target, o.error);
                    Err(berth_proto::status::error_from_fields(&o.error_code, o.error_status, detail))
                }
            })
            .collect())
    }

    /// The next message of a streamed answer, or a stall after [`StorageClientConfig::frame_timeout`].
    async fn next<T>(&self, s: &mut Streaming<T>) -> Result<Option<T>> {
        self.in_frame_time(async { s.message().await.map_err(|st| self.failure(st)) }).await
    }

    /// The next message of a read answer, or a stall after [`StorageClientConfig::frame_timeout`].
    async fn next_frame(&self, s: &mut Frames) -> Result<Option<pb::ReadFrame>> {
        self.in_frame_time(async { s.message().await.map_err(|e| self.unframed(e)) }).await
    }

    /// What `next` answers, or a stall once the node has sent nothing for
    /// [`StorageClientConfig::frame_timeout`].
    async fn in_frame_time<T>(&self, next: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.config.frame_timeout, next)
            .await
            .unwrap_or_else(|_| Err(self.unavailable("stream stalled")))
    }

    /// Opens a read call (`Read` or `ReadSmall`) sending `msg`.
    async fn open_read(&self, path: &'static str, msg: impl prost::Message) -> Result<Frames> {
        let body = tonic::body::Body::new(http_body_util::Full::new(grpc_message(&msg)));
        self.call_framed(path, self.request(()), body).await.map_err(|e| self.unframed(e))
    }

    /// Sends the call at `path` with `body` as its request and the metadata of `meta`, without
    /// tonic's encoder or decoder (see `framing`): the messages of its answer.
    async fn call_framed(
        &self,
        path: &'static str,
        meta: Request<()>,
        body: tonic::body::Body,
    ) -> std::result::Result<Frames, Unframed> {
        let mut http = http::Request::new(body);
        *http.method_mut() = http::Method::POST;
        *http.uri_mut() = http::Uri::from_static(path);
        *http.version_mut() = http::Version::HTTP_2;
        *http.headers_mut() = meta.into_parts().0.into_headers();
        http.headers_mut().insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        http.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        let resp = tower::ServiceExt::oneshot(self.conn.clone(), http)
            .await
            .map_err(|e| Unframed::Status(Status::from_error(Box::new(e))))?;
        // A status among the headers is a trailers-only answer: an error, or no message at all.
        let trailers_only = Status::from_header_map(resp.headers());
        if let Some(st) = trailers_only.as_ref().filter(|st| st.code() != Code::Ok) {
            return Err(Unframed::Status(st.clone()));
        }
        if resp.status() != http::StatusCode::OK {
            return Err(Unframed::Malformed(format!("HTTP status {}", resp.status())));
        }
        Ok(Frames::answer(resp.into_body(), trailers_only.is_some()))
    }

    /// The registry error of a call whose messages could not be taken.
    fn unframed(&self, e: Unframed) -> RegistryError {
        match e {
            Unframed::Status(st) => self.failure(st),
            Unframed::Malformed(why) => self.malformed(why),
        }
    }

    /// A streamed write's call at `path`: the messages of `rx` as its request, framed by
    /// [`Framed`] (a data message's bytes go out as they were given, not copied into an
    /// encoder's buffer), and the one message of its answer.
    async fn call_streaming<M: DataMessage, R: prost::Message + Default>(
        &self,
        path: &'static str,
        rx: mpsc::Receiver<M>,
    ) -> std::result::Result<R, Unframed> {
        // No deadline: a stream takes as long as its bytes do (see the module docs).
        let mut meta = Request::new(());
        berth_proto::carry(&mut meta);
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(Framed::request(rx)));
        self.call_framed(path, meta, body).await?.only().await
    }

    /// The head of a read answer.
    async fn read_head(&self, s: &mut Frames) -> Result<pb::ReadHead> {
        match self.next_frame(s).await? {
            Some(pb::ReadFrame { part: Some(pb::read_frame::Part::Head(h)) }) => Ok(h),
            _ => Err(self.malformed("a read must start with its head")),
        }
    }

    /// A whole blob sent to the node: checked there against `digest`, or against `copy_of`
    /// (this node's BLAKE3 of a blob it holds, see [`BlobStore::put_copy`]).
    async fn send_put(
        &self,
        digest: &Digest,
        copy_of: Option<[u8; 32]>,
        body: ByteStream,
        limit: u64,
    ) -> Result<Stored> {
        use pb::put_request::Part;
        let blake3 = copy_of.map(|b| Bytes::copy_from_slice(&b)).unwrap_or_default();
        let header =
            pb::PutRequest { part: Some(Part::Header(pb::PutHeader { digest: digest.to_string(), limit, blake3 })) };
        let wire = BodyWire {
            data: |d| pb::PutRequest { part: Some(Part::Data(d)) },
            end: |size| pb::PutRequest { part: Some(Part::End(pb::BodyEnd { size })) },
        };
        let r = self.clone().send_body(PUT_PATH, header, body, wire).await?;
        Ok(stored_from_proto(r))
    }

    /// Sends `header`, then `body` in frames, then an end frame as the call at `path`, and
    /// waits for the answer. A body that fails sends no end frame, so the node keeps nothing of it;
    /// a node that stops taking frames, or answering after the last, fails the call with a
    /// 503. At most [`WRITE_AHEAD`] frames wait in memory.
    async fn send_body<M: DataMessage, R: prost::Message + Default>(
        self,
        path: &'static str,
        header: M,
        body: ByteStream,
        wire: BodyWire<M>,
    ) -> Result<R> {
        let (tx, rx) = mpsc::channel(WRITE_AHEAD);
        let mut rpc = self.call_streaming::<M, R>(path, rx).boxed();
        let pumped = tokio::select! {
            // The node may refuse before taking the whole body (a wrong offset, the limit).
            r = &mut rpc => return self.answer(r),
            p = pump(tx, header, body, wire, self.config.frame_timeout) => p,
        };
        match pumped {
            Err(Pump::Body(e)) => {
                // The engine's own answer to a failing body, so both wirings agree.
                Err(RegistryError::reading_body(e))
            }
            Err(Pump::Stalled) => Err(self.unavailable("node stopped taking data")),
            Ok(()) | Err(Pump::Closed) => match tokio::time::timeout(self.config.frame_timeout, rpc).await {
                Ok(r) => self.answer(r),
                Err(_) => Err(self.unavailable("no answer after the body")),
            },
        }
    }

    /// The reply of a streamed write, or the registry error its failure means.
    fn answer<R>(&self, r: std::result::Result<R, Unframed>) -> Result<R> {
        r.map_err(|e| self.unframed(e))
    }
}

// ---- streamed writes ---------------------------------------------------------------------

/// Frames queued for a write beyond what HTTP/2 holds: enough to keep the connection busy
/// while the body produces the next chunk, few enough to bound memory per write (one more
/// frame is held by the request body, which looks a frame ahead: see `berth_proto::conn`).
const WRITE_AHEAD: usize = 2;

/// How a body's data and end frames are made into messages of one call.
struct BodyWire<M> {
    /// A data frame.
    data: fn(Bytes) -> M,
    /// The end frame, counting the bytes sent.
    end: fn(u64) -> M,
}

/// Why a write's body stopped before its end frame.
enum Pump {
    /// The body failed.
    Body(io::Error),
    /// The node took no frame for too long.
    Stalled,
    /// The call ended (the node answered or the connection broke); its answer says how.
    Closed,
}

/// Sends `header`, the body cut into frames and the end frame into `tx`. Dropping `tx` before
/// the end frame is sent is harmless: the node refuses a body without one.
async fn pump<M>(
    mut tx: mpsc::Sender<M>,
    header: M,
    mut body: ByteStream,
    wire: BodyWire<M>,
    frame_timeout: Duration,
) -> std::result::Result<(), Pump> {
    let send = async |tx: &mut mpsc::Sender<M>, m: M| match tokio::time::timeout(frame_timeout, tx.send(m)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Pump::Closed),
        Err(_) => Err(Pump::Stalled),
    };
    send(&mut tx, header).await?;
    let mut sent = 0u64;
    while let Some(chunk) = body.next().await {
        for frame in frames(chunk.map_err(Pump::Body)?) {
            sent += frame.len() as u64;
            send(&mut tx, (wire.data)(frame)).await?;
        }
    }
    send(&mut tx, (wire.end)(sent)).await
}

// ---- streamed reads ----------------------------------------------------------------------

/// The data frames of a read as a body that ends in an error unless exactly `size` bytes
/// arrived.
fn incoming(client: StorageClient, s: Frames, size: u64) -> ByteStream {
    stream::unfold(Some((client, s, size)), move |state| async move {
        let (client, mut s, left) = state?;
        let cut = |e: RegistryError| Some((Err(io::Error::other(e)), None));
        match client.next_frame(&mut s).await {
            Ok(Some(pb::ReadFrame { part: Some(pb::read_frame::Part::Data(d)) })) => {
                if d.len() as u64 > left {
                    let e = client.malformed(format!("more than the {size} bytes announced"));
                    return cut(e);
                }
                let left = left - d.len() as u64;
                Some((Ok(d), Some((client, s, left))))
            }
            Ok(Some(_)) => cut(client.malformed("a read frame without data")),
            Ok(None) if left == 0 => None,
            Ok(None) => {
                let e = client.unavailable(format!("read ended {left} bytes short of {size}"));
                Some((Err(io::Error::new(io::ErrorKind::UnexpectedEof, e)), None))
            }
            Err(e) => cut(e),
        }
    })
    .boxed()
}

#[async_trait]
impl BlobStore for StorageClient {
    async fn stat(&self, digest: &Digest) -> Result<Option<Stored>> {
        let req = self.request(pb::BlobRef { digest: digest.to_string() });
        let r = self.grpc.clone().stat(req).await.map_err(|s| self.failure(s))?.into_inner();
        Ok(r.stored.map(stored_from_proto))
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> Result<ByteStream> {
        let (first, last) = range.map_or((None, None), |(f, l)| (Some(f), Some(l)));
        let msg = pb::ReadRequest { digest: digest.to_string(), first, last };
        let mut s = self.open_read(READ_PATH, msg).await?;
        let head = self.read_head(&mut s).await?;
        if !head.found {
            return Err(RegistryError::new(ErrorCode::BlobUnknown, digest.to_string()));
        }
        Ok(incoming(self.clone(), s, head.size))
    }

    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>> {
        let msg = pb::ReadSmallRequest { digest: digest.to_string(), limit };
        let mut s = self.open_read(READ_SMALL_PATH, msg).await?;
        let head = self.read_head(&mut s).await?;
        if !head.found {
            return Ok(None);
        }
        if head.size > limit {
            return Err(self.malformed(format!("{} bytes announced, over the limit of {limit}", head.size)));
        }
        // Bounded by `limit`, which the caller chose to hold in memory.
        let mut buf = BytesMut::with_capacity(usize::try_from(head.size).unwrap_or(0));
        let mut body = incoming(self.clone(), s, head.size);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| match e.into_inner().map(|e| e.downcast::<RegistryError>()) {
                Some(Ok(e)) => *e,
                Some(Err(e)) => RegistryError::internal(e),
                None => RegistryError::internal("read failed"),
            })?;
            buf.extend_from_slice(&chunk);
        }
        Ok(Some(buf.freeze()))
    }

    async fn put_small(&self, digest: &Digest, data: Bytes) -> Result<Stored> {
        use pb::put_small_request::Part;
        let size = data.len() as u64;
        if size > SMALL_LIMIT {
            return Err(RegistryError::new(
                ErrorCode::SizeInvalid,
                format!("a small blob is at most {SMALL_LIMIT} bytes, not {size}"),
            ));
        }
        let header =
            pb::PutSmallRequest { part: Some(Part::Header(pb::PutSmallHeader { digest: digest.to_string(), size })) };
        let body = stream::once(async move { Ok(data) }).boxed();
        let wire = BodyWire {
            data: |d| pb::PutSmallRequest { part: Some(Part::Data(d)) },
            end: |size| pb::PutSmallRequest { part: Some(Part::End(pb::BodyEnd { size })) },
        };
        let r = self.clone().send_body(PUT_SMALL_PATH, header, body, wire).await?;
        Ok(stored_from_proto(r))
    }

    async fn put(&self, digest: &Digest, body: ByteStream, limit: u64) -> Result<Stored> {
        self.send_put(digest, None, body, limit).await
    }

    async fn put_copy(&self, digest: &Digest, blake3: [u8; 32], body: ByteStream, limit: u64) -> Result<Stored> {
        self.send_put(digest, Some(blake3), body, limit).await
    }

    async fn upload_start(&self, id: &str) -> Result<Option<String>> {
        let req = self.request(pb::UploadRef { id: id.to_string() });
        let before = self.connection();
        let r = self.grpc.clone().upload_start(req).await.map_err(|s| self.failure(s))?.into_inner();
        self.heard(before, r.incarnation);
        // The node's name is its router's to give (the node is one node).
        Ok(None)
    }

    fn incarnation(&self) -> Option<u64> {
        let (incarnation, at) = (*self.incarnation.lock().ok()?)?;
        (at == self.connection()).then_some(incarnation)
    }

    async fn upload_append(&self, id: &str, offset: Option<u64>, body: ByteStream, limit: u64) -> Result<u64> {
        use pb::append_request::Part;
        let header = pb::AppendHeader { id: id.to_string(), offset, limit };
        let header = pb::AppendRequest { part: Some(Part::Header(header)) };
        let wire = BodyWire {
            data: |d| pb::AppendRequest { part: Some(Part::Data(d)) },
            end: |size| pb::AppendRequest { part: Some(Part::End(pb::BodyEnd { size })) },
        };
        let before = self.connection();
        let r: pb::AppendReply = self.clone().send_body(APPEND_PATH, header, body, wire).await?;
        self.heard(before, r.incarnation);
        Ok(r.size)
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>> {
        let req = self.request(pb::UploadRef { id: id.to_string() });
        let size = self.grpc.clone().upload_size(req).await.map_err(|s| self.failure(s))?.into_inner().size;
        if size.is_none() {
            // Unknown, as in `failure`.
            self.forget_incarnation();
        }
        Ok(size)
    }

    async fn upload_finish(&self, id: &str, digest: &Digest) -> Result<Stored> {
        let req = self.request(pb::FinishRequest {
            id: id.to_string(),
            digest: digest.to_string(),
            copy_to: vec![],
            copy_at_most: 0,
        });
        let r = self.grpc.clone().upload_finish(req).await.map_err(|s| self.failure(s))?.into_inner();
        Ok(Stored { size: r.size, stamp: r.stamp })
    }

    async fn upload_finish_copying(
        &self,
        id: &str,
        digest: &Digest,
        targets: &[String],
    ) -> Result<Option<FinishedCopies>> {
        let mut req = Request::new(pb::FinishRequest {
            id: id.to_string(),
            digest: digest.to_string(),
            copy_to: targets.to_vec(),
            copy_at_most: COPY_WHILE_FINISHING,
        });
        // The usual time for the finish, and the time the node gives its copies (a copy that
        // takes longer comes back as failed, not as this call's failure).
        req.set_timeout(self.config.request_timeout + FINISH_COPY_TIME);
        berth_proto::carry(&mut req);
        let r = self.grpc.clone().upload_finish(req).await.map_err(|s| self.failure(s))?.into_inner();
        let stored = Stored { size: r.size, stamp: r.stamp };
        if stored.size > COPY_WHILE_FINISHING {
            return Ok(Some((stored, None)));
        }
        Ok(Some((stored, Some(self.outcomes(r.copies, targets)?))))
    }

    async fn upload_cancel(&self, id: &str) -> Result<()> {
        let req = self.request(pb::UploadRef { id: id.to_string() });
        self.grpc.clone().upload_cancel(req).await.map_err(|s| self.failure(s))?;
        Ok(())
    }

    async fn expire_uploads(&self, idle: Duration) -> Result<Vec<String>> {
        // Rounded up: an upload is never expired before it has been idle for `idle`.
        let idle_seconds = idle.as_secs() + u64::from(idle.subsec_nanos() > 0);
        let req = self.request(pb::ExpireRequest { idle_seconds });
        let mut s = self.grpc.clone().expire_uploads(req).await.map_err(|st| self.failure(st))?.into_inner();
        let mut ids = vec![];
        while let Some(batch) = self.next(&mut s).await? {
            ids.extend(batch.ids);
        }
        Ok(ids)
    }

    async fn delete(&self, digest: &Digest, upto: Option<u64>) -> Result<Deleted> {
        let req = self.request(pb::DeleteRequest { digest: digest.to_string(), upto });
        let r = self.grpc.clone().delete(req).await.map_err(|s| self.failure(s))?.into_inner();
        let copies = u32::from(r.stamp.is_some());
        Ok(Deleted { copies, bytes: r.size, kept: u32::from(r.kept), stamp: r.stamp, unreached: 0 })
    }

    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<(Digest, u64)>> {
        let mut out: Vec<(Digest, u64)> = vec![];
        let mut after = after.cloned();
        // The node answers in pages that fit one message; a short page is the end.
        while out.len() < n {
            let page = (n - out.len()).min(LIST_PAGE);
            let req = self.request(pb::ListRequest { after: after.as_ref().map(Digest::to_string), n: page as u64 });
            let blobs = self.grpc.clone().list(req).await.map_err(|s| self.failure(s))?.into_inner().blobs;
            let got = blobs.len();
            for b in blobs {
                out.push((parse_digest(&b.digest).map_err(|e| self.malformed(e))?, b.stamp));
            }
            if got < page {
                break;
            }
            after = out.last().map(|(d, _)| d.clone());
        }
        Ok(out)
    }

    async fn transfer(&self, digest: &Digest, size: u64, targets: &[String]) -> Result<Option<Vec<Result<Stored>>>> {
        // The copies stream in frames (each bounded by the frame timeout on the nodes); the
        // call as a whole gets the usual time plus a second per MiB, so a large layer is not
        // cut off while it moves at any sensible rate.
        let mut req = Request::new(pb::TransferRequest { digest: digest.to_string(), targets: targets.to_vec() });
        req.set_timeout(self.config.request_timeout + Duration::from_secs(size >> 20));
        berth_proto::carry(&mut req);
        let reply = self.grpc.clone().transfer(req).await.map_err(|s| self.failure(s))?.into_inner();
        Ok(Some(self.outcomes(reply.outcomes, targets)?))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use berth_core::BlobStore;
    use tokio::sync::oneshot;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::Server;

    use super::*;
    use crate::server::storage_server;
    use crate::wire::FRAME_SIZE;
    use crate::{StorageConfig, StorageEngine};

    /// A storage node serving a fresh engine on a loopback port; stops when dropped.
    struct Node {
        addr: SocketAddr,
        _dir: tempfile::TempDir,
        _stop: oneshot::Sender<()>,
    }

    async fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let engine = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap().with_nodelay(Some(true));
        let addr = incoming.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = storage_server(Arc::new(engine));
        tokio::spawn(async move {
            Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    stopped.await.ok();
                })
                .await
                .unwrap();
        });
        Node { addr, _dir: dir, _stop: stop }
    }

    fn client(addr: SocketAddr) -> StorageClient {
        StorageClient::new(&addr.to_string(), StorageClientConfig::default()).unwrap()
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// A body of uneven chunks, some larger than a frame.
    fn body(bytes: &[u8], chunk: usize) -> ByteStream {
        let parts: Vec<io::Result<Bytes>> = bytes.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        stream::iter(parts).boxed()
    }

    async fn collect(s: ByteStream) -> io::Result<Vec<u8>> {
        let mut s = s;
        let mut out = vec![];
        while let Some(c) = s.next().await {
            let c = c?;
            assert!(c.len() <= FRAME_SIZE);
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn blobs_stream_through_in_frames() {
        let n = node().await;
        let c = client(n.addr);
        let bytes = data(3 * 1024 * 1024);
        let digest = Digest::sha256_of(&bytes);
        let stored = c.put(&digest, body(&bytes, 700_000), u64::MAX).await.unwrap();
        assert_eq!(stored.size, bytes.len() as u64);
        assert_eq!(c.stat(&digest).await.unwrap(), Some(stored));

        assert_eq!(collect(c.read(&digest, None).await.unwrap()).await.unwrap(), bytes);
        let last = bytes.len() as u64 - 1;
        for (first, end) in [(0, FRAME_SIZE as u64 - 1), (1_000_000, 2_100_000), (last, last)] {
            let got = collect(c.read(&digest, Some((first, end))).await.unwrap()).await.unwrap();
            assert_eq!(got, bytes[first as usize..=end as usize].to_vec(), "range {first}-{end}");
        }

        let unknown = Digest::sha256_of(b"nobody stored this");
        let err = c.read(&unknown, None).await.err().unwrap();
        assert_eq!((err.code, err.status), (ErrorCode::BlobUnknown, 404));
        assert_eq!(c.stat(&unknown).await.unwrap(), None);

        // A wrong digest is refused by the node and comes back as the engine said it.
        let err = c.put(&unknown, body(&bytes[..1000], 100), u64::MAX).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DigestInvalid);
    }

    #[tokio::test]
    async fn small_blobs_are_bounded() {
        let n = node().await;
        let c = client(n.addr);
        // Larger than one frame, as a big manifest may be.
        let bytes = Bytes::from(data(FRAME_SIZE + 10));
        let digest = Digest::sha256_of(&bytes);
        let stored = c.put_small(&digest, bytes.clone()).await.unwrap();
        assert_eq!(c.stat(&digest).await.unwrap(), Some(stored));
        assert_eq!(c.read_small(&digest, bytes.len() as u64).await.unwrap(), Some(bytes.clone()));
        let over = c.read_small(&digest, 100).await.unwrap_err();
        assert_eq!(over.code, ErrorCode::Unknown);
        assert_eq!(c.read_small(&Digest::sha256_of(b"x"), 100).await.unwrap(), None);
    }

    #[tokio::test]
    async fn chunked_upload_and_inventory() {
        let n = node().await;
        let c = client(n.addr);
        let bytes = data(1_500_000);
        let digest = Digest::sha256_of(&bytes);
        let id = "3f0c2f5e-6f55-4d0e-9a55-0e4f4c1d2b10";
        c.upload_start(id).await.unwrap();
        assert_eq!(c.upload_append(id, Some(0), body(&bytes[..600_000], 300_000), u64::MAX).await.unwrap(), 600_000);

        // The engine's refusal, code, status and detail alike.
        let engine_says = RegistryError::chunk_out_of_order(5, 600_000);
        let err = c.upload_append(id, Some(5), body(&bytes[600_000..], 300_000), u64::MAX).await.unwrap_err();
        assert_eq!(err, engine_says);
        assert_eq!(c.upload_size(id).await.unwrap(), Some(600_000));

        let end = c.upload_append(id, Some(600_000), body(&bytes[600_000..], 400_000), u64::MAX).await.unwrap();
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(c.upload_size(id).await.unwrap(), Some(bytes.len() as u64));

        // A wrong digest consumes the upload; the error is the engine's, exactly.
        let wrong = Digest::sha256_of(b"other");
        let err = c.upload_finish(id, &wrong).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DigestInvalid);
        let id2 = "8a1e0f43-3d5c-4b8e-8c8e-6e2f6b7c9d01";
        c.upload_start(id2).await.unwrap();
        c.upload_append(id2, None, body(&bytes, 1_000_000), u64::MAX).await.unwrap();
        let direct = {
            let dir = tempfile::tempdir().unwrap();
            let e = StorageEngine::open(StorageConfig { dir: dir.path().to_path_buf() }).unwrap();
            e.upload_start(id2).await.unwrap();
            e.upload_append(id2, None, body(&bytes, 1_000_000), u64::MAX).await.unwrap();
            e.upload_finish(id2, &wrong).await.unwrap_err()
        };
        assert_eq!(c.upload_finish(id2, &wrong).await.unwrap_err(), direct);

        let id3 = "c2d7b3a4-1f0e-4c6d-b5a9-7e8f9a0b1c2d";
        c.upload_start(id3).await.unwrap();
        c.upload_append(id3, Some(0), body(&bytes, 250_000), u64::MAX).await.unwrap();
        let stored = c.upload_finish(id3, &digest).await.unwrap();
        assert_eq!(stored.size, bytes.len() as u64);
        assert_eq!(c.upload_size(id3).await.unwrap(), None);
        assert_eq!(collect(c.read(&digest, None).await.unwrap()).await.unwrap(), bytes);

        let id4 = "d3e8c4b5-2a1f-4d7e-86b0-8f9a0b1c2d3e";
        c.upload_start(id4).await.unwrap();
        c.upload_append(id4, None, body(b"abc", 3), u64::MAX).await.unwrap();
        c.upload_cancel(id4).await.unwrap();
        assert_eq!(c.upload_size(id4).await.unwrap(), None);

        // A body that fails mid-way leaves the upload as it was.
        let id5 = "e4f9d5c6-3b2a-4e8f-97c1-9a0b1c2d3e4f";
        c.upload_start(id5).await.unwrap();
        c.upload_append(id5, None, body(b"abc", 3), u64::MAX).await.unwrap();
        let failing: ByteStream =
            stream::iter(vec![Ok(Bytes::from(data(400_000))), Err(io::Error::other("client went away"))]).boxed();
        let err = c.upload_append(id5, None, failing, u64::MAX).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BlobUploadInvalid);
        assert_eq!(c.upload_size(id5).await.unwrap(), Some(3));
        assert_eq!(c.expire_uploads(Duration::ZERO).await.unwrap(), vec![id5.to_string()]);

        let small = Bytes::from_static(b"{}");
        let small_digest = Digest::sha256_of(&small);
        let small_stored = c.put_small(&small_digest, small).await.unwrap();
        let mut expected = vec![(digest.clone(), stored.stamp), (small_digest.clone(), small_stored.stamp)];
        expected.sort();
        assert_eq!(c.list(None, 10).await.unwrap(), expected);
        assert_eq!(c.list(Some(&expected[0].0), 10).await.unwrap(), expected[1..].to_vec());
        assert_eq!(c.list(None, 1).await.unwrap(), expected[..1].to_vec());

        // A delete limited to older copies keeps it; an unlimited one takes it, once.
        let kept = Deleted { kept: 1, ..Deleted::default() };
        assert_eq!(c.delete(&digest, Some(stored.stamp - 1)).await.unwrap(), kept);
        let taken = Deleted { copies: 1, bytes: stored.size, stamp: Some(stored.stamp), ..Deleted::default() };
        assert_eq!(c.delete(&digest, None).await.unwrap(), taken);
        assert_eq!(c.delete(&digest, None).await.unwrap(), Deleted::default());
        assert_eq!(c.read(&digest, None).await.err().map(|e| e.code), Some(ErrorCode::BlobUnknown));
    }

    #[tokio::test]
    async fn a_node_out_of_reach_is_a_503() {
        // A port that was just free: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let c = client(addr);
        let started = std::time::Instant::now();
        let err = c.stat(&Digest::sha256_of(b"x")).await.unwrap_err();
        assert_eq!((err.code, err.status), (ErrorCode::Unknown, 503), "{err}");
        let err = c.put(&Digest::sha256_of(b"x"), body(b"x", 1), u64::MAX).await.unwrap_err();
        assert_eq!((err.code, err.status), (ErrorCode::Unknown, 503), "{err}");
        assert!(started.elapsed() < StorageClientConfig::default().request_timeout);
    }

    #[tokio::test]
    async fn a_cut_read_fails_instead_of_ending_short() {
        use berth_proto::storage::storage_server::StorageServer;
        use tonic::Response;

        /// A node that announces more bytes than it sends.
        struct Liar;
        #[tonic::async_trait]
        impl berth_proto::storage::storage_server::Storage for Liar {
            type ReadStream = futures::stream::BoxStream<'static, std::result::Result<pb::ReadFrame, Status>>;
            type ReadSmallStream = Self::ReadStream;
            type ExpireUploadsStream = futures::stream::BoxStream<'static, std::result::Result<pb::UploadIds, Status>>;
            async fn read(
                &self,
                _: Request<pb::ReadRequest>,
            ) -> std::result::Result<Response<Self::ReadStream>, Status> {
                let head =
                    pb::ReadFrame { part: Some(pb::read_frame::Part::Head(pb::ReadHead { found: true, size: 10 })) };
                let data = pb::ReadFrame { part: Some(pb::read_frame::Part::Data(Bytes::from(vec![1; 4]))) };
                Ok(Response::new(stream::iter(vec![Ok(head), Ok(data)]).boxed()))
            }
            async fn stat(&self, _: Request<pb::BlobRef>) -> std::result::Result<Response<pb::StatReply>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn read_small(
                &self,
                _: Request<pb::ReadSmallRequest>,
            ) -> std::result::Result<Response<Self::ReadSmallStream>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn put_small(
                &self,
                _: Request<Streaming<pb::PutSmallRequest>>,
            ) -> std::result::Result<Response<pb::Stored>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn put(
                &self,
                _: Request<Streaming<pb::PutRequest>>,
            ) -> std::result::Result<Response<pb::Stored>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn upload_start(
                &self,
                _: Request<pb::UploadRef>,
            ) -> std::result::Result<Response<pb::UploadStarted>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn upload_append(
                &self,
                _: Request<Streaming<pb::AppendRequest>>,
            ) -> std::result::Result<Response<pb::AppendReply>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn upload_size(
                &self,
                _: Request<pb::UploadRef>,
            ) -> std::result::Result<Response<pb::UploadSizeReply>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn upload_finish(
                &self,
                _: Request<pb::FinishRequest>,
            ) -> std::result::Result<Response<pb::FinishReply>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn upload_cancel(
                &self,
                _: Request<pb::UploadRef>,
            ) -> std::result::Result<Response<pb::Empty>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn expire_uploads(
                &self,
                _: Request<pb::ExpireRequest>,
            ) -> std::result::Result<Response<Self::ExpireUploadsStream>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn delete(
                &self,
                _: Request<pb::DeleteRequest>,
            ) -> std::result::Result<Response<pb::DeleteReply>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn list(&self, _: Request<pb::ListRequest>) -> std::result::Result<Response<pb::ListReply>, Status> {
                Err(Status::unimplemented(""))
            }
            async fn transfer(
                &self,
                _: Request<pb::TransferRequest>,
            ) -> std::result::Result<Response<pb::TransferReply>, Status> {
                Err(Status::unimplemented(""))
            }
        }

        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let (_stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(Server::builder().add_service(StorageServer::new(Liar)).serve_with_incoming_shutdown(
            incoming,
            async move {
                stopped.await.ok();
            },
        ));
        let c = client(addr);
        let err = collect(c.read(&Digest::sha256_of(b"x"), None).await.unwrap()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
