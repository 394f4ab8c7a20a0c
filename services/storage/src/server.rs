//! The storage node's gRPC service: a thin adapter from `proto/storage.proto` to a
//! [`BlobStore`] (the node's [`StorageEngine`](crate::StorageEngine)).
//!
//! Each call decodes its message, calls the store and encodes the answer; a refused call
//! answers the store's [`RegistryError`] through [`status_of`]. Request bodies reach the store
//! as a [`ByteStream`] frame by frame, and reads leave it in frames of at most [`FRAME_SIZE`]
//! bytes, so no call holds a whole blob. A request the contract does not allow (no header, a
//! header where data belongs, a bad digest) answers INVALID_ARGUMENT.
//!
//! The answers of the read calls are put on the wire here rather than by tonic, whose encoder
//! copies every message into a buffer of its own: a blob's bytes leave as they were read (see
//! [`StorageService`]).

use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use berth_core::{BlobStore, ByteStream, Digest, RegistryError};
use berth_proto::storage as pb;
use berth_proto::storage::storage_server::{Storage, StorageServer};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use http_body::Frame;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::framing::{Framed, Frames};
use crate::wire::{
    framed_len, frames, grpc_message, parse_digest, status_of, stored_to_proto, APPEND_PATH, EXPIRE_BATCH, LIST_PAGE,
    MAX_MESSAGE, PUT_PATH, PUT_SMALL_PATH, READ_PATH, READ_SMALL_PATH, SMALL_LIMIT,
};

/// The service over `store`, with message bounds set for [`FRAME_SIZE`] frames.
pub fn storage_server(store: Arc<dyn BlobStore>) -> StorageService {
    let rpc = Arc::new(StorageRpc { store, peers: Mutex::default() });
    let generated = StorageServer::from_arc(rpc.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    StorageService { rpc, generated }
}

/// The storage node's gRPC service as served: tonic's generated service, except for the calls
/// that carry blob bytes. The read calls' (`Read`, `ReadSmall`) answers go out as [`Framed`]
/// bodies, each data message as its prefix and then its bytes as the store gave them (a slice
/// of the segment read, or of a blob file's map), which HTTP/2 writes to the socket from where
/// they lie. The streamed writes' (`Put`, `PutSmall`, `UploadAppend`) requests are taken by
/// [`Frames`], each data message a slice of the HTTP/2 frame it arrived in. Through tonic's
/// encoder every byte a node serves was first copied into a buffer of the encoder's, and
/// through its decoder every byte it stores was copied into the decoder's. The handlers are
/// the same ones; only the framing differs, and the bytes on the wire are those tonic would
/// send.
#[derive(Clone)]
pub struct StorageService {
    rpc: Arc<StorageRpc>,
    generated: StorageServer<StorageRpc>,
}

impl tonic::server::NamedService for StorageService {
    const NAME: &'static str = <StorageServer<StorageRpc> as tonic::server::NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for StorageService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let rpc = self.rpc.clone();
        match req.uri().path() {
            READ_PATH => Box::pin(async move { Ok(read_answer(req, async |m| rpc.read(m).await).await) }),
            READ_SMALL_PATH => Box::pin(async move { Ok(read_answer(req, async |m| rpc.read_small(m).await).await) }),
            PUT_PATH => Box::pin(async move { Ok(write_answer(rpc.put_from(requested(req)).await)) }),
            PUT_SMALL_PATH => Box::pin(async move { Ok(write_answer(rpc.put_small_from(requested(req)).await)) }),
            APPEND_PATH => Box::pin(async move { Ok(write_answer(rpc.append_from(requested(req)).await)) }),
            _ => self.generated.call(req),
        }
    }
}

/// The answer to a read call: its request's one message given to `handler`, and what that
/// answers as a gRPC response, framed by [`Framed`]. A refusal (a malformed request, or the
/// handler's) is a trailers-only answer, as tonic sends one.
async fn read_answer<M: prost::Message + Default>(
    req: http::Request<tonic::body::Body>,
    handler: impl AsyncFnOnce(Request<M>) -> Result<Response<FrameStream>, Status>,
) -> http::Response<tonic::body::Body> {
    let (parts, body) = req.into_parts();
    let msg = match unary_message::<M>(body).await {
        Ok(m) => m,
        Err(st) => return st.into_http(),
    };
    let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
    let req = Request::from_parts(metadata, parts.extensions, msg);
    match handler(req).await {
        Ok(answer) => {
            let mut resp = http::Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(
                Framed::answer(answer.into_inner()),
            )));
            resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            resp
        }
        Err(st) => st.into_http(),
    }
}

/// The messages of a streamed write's request as [`Frames`] takes them off the wire; the
/// first failure (as tonic's server would report it) ends them.
fn requested<M: prost::Message + Default + 'static>(req: http::Request<tonic::body::Body>) -> Incoming<M> {
    stream::unfold(Some(Frames::request(req.into_body())), |frames| async move {
        let mut frames = frames?;
        match frames.message::<M>().await {
            Ok(Some(m)) => Some((Ok(m), Some(frames))),
            Ok(None) => None,
            Err(e) => Some((Err(e.into_status()), None)),
        }
    })
    .boxed()
}

/// The answer to a streamed write: the handler's reply as one message and an OK status, or its
/// refusal as a trailers-only answer (both as tonic answers).
fn write_answer<R: prost::Message>(handled: Result<R, Status>) -> http::Response<tonic::body::Body> {
    match handled {
        Ok(reply) => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert(Status::GRPC_STATUS, (Code::Ok as i32).into());
            let frames = [Ok::<_, Status>(Frame::data(grpc_message(&reply))), Ok(Frame::trailers(trailers))];
            let body = http_body_util::StreamBody::new(stream::iter(frames));
            let mut resp = http::Response::new(tonic::body::Body::new(body));
            resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            resp
        }
        Err(st) => st.into_http(),
    }
}

/// The messages of a streamed request, whether tonic's decoder or [`Frames`] took them.
type Incoming<M> = BoxStream<'static, Result<M, Status>>;

/// The one message of a unary request's body, refused as tonic's server refuses it: a body
/// with no message, more than one, a compressed one or one over [`MAX_MESSAGE`].
async fn unary_message<M: prost::Message + Default>(body: tonic::body::Body) -> Result<M, Status> {
    use http_body_util::BodyExt;
    let bytes = http_body_util::Limited::new(body, 5 + MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| Status::internal(format!("reading the request: {e}")))?
        .to_bytes();
    let n =
        framed_len(&bytes).map_err(Status::internal)?.ok_or_else(|| Status::internal("Missing request message."))?;
    if bytes.len() != n {
        return Err(Status::internal("the request is not one whole message"));
    }
    M::decode(bytes.slice(5..)).map_err(|e| Status::internal(format!("decoding the request: {e}")))
}

/// The gRPC handlers of a storage node.
pub struct StorageRpc {
    store: Arc<dyn BlobStore>,
    /// Clients of the other nodes this one has copied blobs to, by address.
    peers: Mutex<std::collections::HashMap<String, crate::client::StorageClient>>,
}

impl StorageRpc {
    /// `PutSmall`: the request's messages `s`.
    async fn put_small_from(&self, mut s: Incoming<pb::PutSmallRequest>) -> Result<pb::Stored, Status> {
        use pb::put_small_request::Part;
        let Some(pb::PutSmallRequest { part: Some(Part::Header(h)) }) = s.next().await.transpose()? else {
            return Err(Status::invalid_argument("the first message must be the header"));
        };
        let d = digest(&h.digest)?;
        if h.size > SMALL_LIMIT {
            return Err(Status::invalid_argument(format!("a small blob is at most {SMALL_LIMIT} bytes")));
        }
        let malformed = Malformed::default();
        let mut bytes = body(s, malformed.clone(), |m: pb::PutSmallRequest| match m.part {
            Some(Part::Data(d)) => BodyPart::Data(d),
            Some(Part::End(e)) => BodyPart::End(e.size),
            _ => BodyPart::Other,
        });
        // Bounded by SMALL_LIMIT: the store takes a small blob whole.
        let mut buf = BytesMut::with_capacity(h.size as usize);
        while let Some(chunk) = bytes.next().await {
            let chunk = match (chunk, malformed.take()) {
                (_, Some(why)) => return Err(Status::invalid_argument(why)),
                (Err(e), None) => return Err(Status::cancelled(format!("reading body: {e}"))),
                (Ok(c), None) => c,
            };
            if buf.len() as u64 + chunk.len() as u64 > h.size {
                return Err(Status::invalid_argument(format!("more than the {} bytes announced", h.size)));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() as u64 != h.size {
            return Err(Status::invalid_argument(format!("{} bytes announced, {} sent", h.size, buf.len())));
        }
        let stored = self.store.put_small(&d, buf.freeze()).await.map_err(status_of)?;
        Ok(stored_to_proto(stored))
    }

    /// `Put`: the request's messages `s`.
    async fn put_from(&self, mut s: Incoming<pb::PutRequest>) -> Result<pb::Stored, Status> {
        use pb::put_request::Part;
        let Some(pb::PutRequest { part: Some(Part::Header(h)) }) = s.next().await.transpose()? else {
            return Err(Status::invalid_argument("the first message must be the header"));
        };
        let d = digest(&h.digest)?;
        let malformed = Malformed::default();
        let bytes = body(s, malformed.clone(), |m: pb::PutRequest| match m.part {
            Some(Part::Data(d)) => BodyPart::Data(d),
            Some(Part::End(e)) => BodyPart::End(e.size),
            _ => BodyPart::Other,
        });
        let copy_of: Option<[u8; 32]> = match h.blake3.len() {
            0 => None,
            _ => Some(h.blake3[..].try_into().map_err(|_| Status::invalid_argument("a BLAKE3 has 32 bytes"))?),
        };
        let store = self.store.clone();
        let stored = malformed.answer(
            run_to_end(async move {
                match copy_of {
                    Some(b) => store.put_copy(&d, b, bytes, h.limit).await,
                    None => store.put(&d, bytes, h.limit).await,
                }
            })
            .await,
        )?;
        Ok(stored_to_proto(stored))
    }

    /// `UploadAppend`: the request's messages `s`.
    async fn append_from(&self, mut s: Incoming<pb::AppendRequest>) -> Result<pb::AppendReply, Status> {
        use pb::append_request::Part;
        let Some(pb::AppendRequest { part: Some(Part::Header(h)) }) = s.next().await.transpose()? else {
            return Err(Status::invalid_argument("the first message must be the header"));
        };
        let malformed = Malformed::default();
        let bytes = body(s, malformed.clone(), |m: pb::AppendRequest| match m.part {
            Some(Part::Data(d)) => BodyPart::Data(d),
            Some(Part::End(e)) => BodyPart::End(e.size),
            _ => BodyPart::Other,
        });
        let store = self.store.clone();
        let size = malformed
            .answer(run_to_end(async move { store.upload_append(&h.id, h.offset, bytes, h.limit).await }).await)?;
        Ok(pb::AppendReply { size, incarnation: self.incarnation() })
    }

    /// The node's incarnation, as its replies report it (0: its store has none).
    fn incarnation(&self) -> u64 {
        self.store.incarnation().unwrap_or(0)
    }

    /// The client of the node at `addr`, made on first use.
    fn peer(&self, addr: &str) -> Result<crate::client::StorageClient, RegistryError> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.get(addr) {
            return Ok(p.clone());
        }
        let p = crate::client::StorageClient::new(addr, crate::client::StorageClientConfig::default())
            .map_err(|e| RegistryError::new(berth_core::ErrorCode::Unknown, e.to_string()).with_status(503))?;
        peers.insert(addr.to_string(), p.clone());
        Ok(p)
    }

    /// Copies `d` (`size` bytes, held here) to the node at `target`.
    async fn copy_to(&self, d: &Digest, size: u64, target: &str) -> Result<berth_core::Stored, RegistryError> {
        let peer = self.peer(target)?;
        berth_core::store::copy_blob(&*self.store, &peer, d, size).await
    }

    /// Blob `d` (`size` bytes, held here) read whole once for `copies` copies of it, with its
    /// BLAKE3: when it is small enough to be held in memory (a segment blob) and goes to more
    /// than one node, which then share one read of it instead of each reading it again.
    /// `None` otherwise, and when the read fails: each copy then reads it on its own and
    /// reports its own failure.
    async fn read_once(&self, d: &Digest, size: u64, copies: usize) -> Option<(Option<[u8; 32]>, Bytes)> {
        if copies < 2 || size > crate::INLINE_THRESHOLD {
            return None;
        }
        let blake3 = self.store.blake3(d).await.ok()?;
        let bytes = self.store.read_small(d, size).await.ok()??;
        (bytes.len() as u64 == size).then_some((blake3, bytes))
    }

    /// Copies blob `d` (`size` bytes, held here) to every node of `targets` at once, each
    /// within `limit` if given (past it, that copy fails): the outcome per target, in order.
    async fn copies(
        &self,
        d: &Digest,
        size: u64,
        targets: Vec<String>,
        limit: Option<Duration>,
    ) -> Vec<pb::TransferOutcome> {
        // Within the copies' time, like each copy's own read: a read that stalls leaves the
        // copies to read for themselves, each within that time.
        let read = self.read_once(d, size, targets.len());
        let held = match limit {
            None => read.await,
            Some(limit) => tokio::time::timeout(limit, read).await.ok().flatten(),
        };
        let held = &held;
        let copies = targets.iter().map(|t| async move {
            let copy = async {
                match held {
                    Some((blake3, bytes)) => {
                        let body: ByteStream = stream::iter([Ok(bytes.clone())]).boxed();
                        berth_core::store::send_copy(&self.peer(t)?, d, *blake3, body, size).await
                    }
                    None => self.copy_to(d, size, t).await,
                }
            };
            match limit {
                None => copy.await,
                Some(limit) => tokio::time::timeout(limit, copy).await.unwrap_or_else(|_| {
                    Err(RegistryError::new(berth_core::ErrorCode::Unknown, format!("copy to {t} took over {limit:?}"))
                        .with_status(503))
                }),
            }
        });
        futures::future::join_all(copies)
            .await
            .into_iter()
            .zip(targets)
            .map(|(outcome, target)| match outcome {
                Ok(s) => pb::TransferOutcome { target, stored: Some(stored_to_proto(s)), ..Default::default() },
                Err(e) => {
                    let (error_code, error_status, error) = berth_proto::status::error_fields(e);
                    pb::TransferOutcome { target, stored: None, error_code, error_status, error }
                }
            })
            .collect()
    }
}

/// A frame stream of a read: a head, then data.
type FrameStream = BoxStream<'static, Result<pb::ReadFrame, Status>>;

/// A received digest, or INVALID_ARGUMENT.
fn digest(s: &str) -> Result<Digest, Status> {
    parse_digest(s).map_err(Status::invalid_argument)
}

/// A head frame.
fn head(found: bool, size: u64) -> pb::ReadFrame {
    pb::ReadFrame { part: Some(pb::read_frame::Part::Head(pb::ReadHead { found, size })) }
}

/// A data frame.
fn data(b: Bytes) -> pb::ReadFrame {
    pb::ReadFrame { part: Some(pb::read_frame::Part::Data(b)) }
}

/// What a client-streamed body found wrong with its frames, if anything. The store only sees
/// an io error and answers its own code; the handler answers INVALID_ARGUMENT instead.
#[derive(Clone, Default)]
struct Malformed(Arc<Mutex<Option<String>>>);

impl Malformed {
    fn set(&self, why: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// The store's answer, unless the body was malformed.
    fn answer<T>(&self, result: berth_core::error::Result<T>) -> Result<T, Status> {
        match (self.take(), result) {
            (Some(why), _) => Err(Status::invalid_argument(why)),
            (None, r) => r.map_err(status_of),
        }
    }
}

/// A message of a streamed body after its header.
enum BodyPart {
    /// Bytes.
    Data(Bytes),
    /// The end frame, with the number of bytes sent.
    End(u64),
    /// Anything else (a second header, an empty message).
    Other,
}

/// The data frames after a header as the store's body: `part` says what each message is. The
/// body ends cleanly only at an end frame that counts the bytes received and is the last
/// message; anything else ends it in an error (recorded in `malformed` when the peer broke the
/// contract rather than the connection).
fn body<T: Send + 'static>(frames: Incoming<T>, malformed: Malformed, part: fn(T) -> BodyPart) -> ByteStream {
    stream::unfold(Some((frames, 0u64)), move |state| {
        let malformed = malformed.clone();
        async move {
            let (mut s, got) = state?;
            let refuse = |why: String| {
                malformed.set(why.clone());
                Some((Err(io::Error::new(io::ErrorKind::InvalidData, why)), None))
            };
            let broken = |status: Status| Some((Err(io::Error::other(status)), None));
            match s.next().await.transpose() {
                Ok(Some(m)) => match part(m) {
                    BodyPart::Data(d) => {
                        let got = got + d.len() as u64;
                        Some((Ok(d), Some((s, got))))
                    }
                    BodyPart::End(n) if n == got => match s.next().await.transpose() {
                        Ok(None) => None,
                        Ok(Some(_)) => refuse("a message after the end frame".to_string()),
                        Err(status) => broken(status),
                    },
                    BodyPart::End(n) => refuse(format!("the end frame counts {n} bytes but {got} arrived")),
                    BodyPart::Other => refuse("a data or end frame was expected after the header".to_string()),
                },
                Ok(None) => refuse("the body stopped without its end frame".to_string()),
                Err(status) => broken(status),
            }
        }
    })
    .boxed()
}

/// Runs a store call that consumes a request body to its end in a task of its own. hyper drops
/// a handler whose client reset the stream; the task instead lets the store see the body fail
/// and roll back (an upload stays usable). It is bounded by its body, which ends with the
/// stream, and the handler awaits it whenever it is not dropped.
async fn run_to_end<T: Send + 'static>(
    call: impl std::future::Future<Output = berth_core::error::Result<T>> + Send + 'static,
) -> berth_core::error::Result<T> {
    tokio::spawn(berth_core::trace::inherit(call)).await.map_err(RegistryError::internal)?
}

/// The blob's bytes as data frames after a head announcing `size` of them; an io error ends
/// the stream with an error status, never a silent cut.
fn read_frames(size: u64, bytes: ByteStream) -> FrameStream {
    let data = bytes.flat_map(|chunk| match chunk {
        Ok(b) => stream::iter(frames(b).map(|f| Ok(data(f)))).left_stream(),
        Err(e) => stream::once(async move { Err(Status::internal(format!("reading blob: {e}"))) }).right_stream(),
    });
    stream::once(async move { Ok(head(true, size)) }).chain(data).boxed()
}

#[tonic::async_trait]
impl Storage for StorageRpc {
    type ReadStream = FrameStream;
    type ReadSmallStream = FrameStream;
    type ExpireUploadsStream = BoxStream<'static, Result<pb::UploadIds, Status>>;

    async fn stat(&self, req: Request<pb::BlobRef>) -> Result<Response<pb::StatReply>, Status> {
        let d = digest(&req.into_inner().digest)?;
        let stored = self.store.stat(&d).await.map_err(status_of)?;
        Ok(Response::new(pb::StatReply { stored: stored.map(stored_to_proto) }))
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<FrameStream>, Status> {
        let r = req.into_inner();
        let d = digest(&r.digest)?;
        let range = match (r.first, r.last) {
            (None, None) => None,
            (Some(first), Some(last)) if first <= last => Some((first, last)),
            _ => return Err(Status::invalid_argument("a range needs first <= last")),
        };
        // The head must announce the length, and only the index knows the whole blob's.
        let Some(stored) = self.store.stat(&d).await.map_err(status_of)? else {
            return Err(status_of(RegistryError::new(berth_core::ErrorCode::BlobUnknown, d.to_string())));
        };
        // The same clamp the engine applies, so the announced length is what it sends.
        let (first, end) = range.map_or((0, stored.size), |(f, l)| (f, l.saturating_add(1).min(stored.size)));
        let size = if stored.size == 0 { 0 } else { end.saturating_sub(first) };
        let bytes = self.store.read(&d, range).await.map_err(status_of)?;
        Ok(Response::new(read_frames(size, bytes)))
    }

    async fn read_small(&self, req: Request<pb::ReadSmallRequest>) -> Result<Response<FrameStream>, Status> {
        let r = req.into_inner();
        let d = digest(&r.digest)?;
        let reply = match self.store.read_small(&d, r.limit).await.map_err(status_of)? {
            None => stream::once(async { Ok(head(false, 0)) }).boxed(),
            Some(b) => {
                let size = b.len() as u64;
                stream::iter(std::iter::once(head(true, size)).chain(frames(b).map(data)).map(Ok)).boxed()
            }
        };
        Ok(Response::new(reply))
    }

    async fn put_small(&self, req: Request<Streaming<pb::PutSmallRequest>>) -> Result<Response<pb::Stored>, Status> {
        self.put_small_from(req.into_inner().boxed()).await.map(Response::new)
    }

    async fn put(&self, req: Request<Streaming<pb::PutRequest>>) -> Result<Response<pb::Stored>, Status> {
        self.put_from(req.into_inner().boxed()).await.map(Response::new)
    }

    async fn upload_start(&self, req: Request<pb::UploadRef>) -> Result<Response<pb::UploadStarted>, Status> {
        self.store.upload_start(&req.into_inner().id).await.map_err(status_of)?;
        Ok(Response::new(pb::UploadStarted { incarnation: self.incarnation() }))
    }

    async fn upload_append(
        &self,
        req: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        self.append_from(req.into_inner().boxed()).await.map(Response::new)
    }

    async fn upload_size(&self, req: Request<pb::UploadRef>) -> Result<Response<pb::UploadSizeReply>, Status> {
        let size = self.store.upload_size(&req.into_inner().id).await.map_err(status_of)?;
        Ok(Response::new(pb::UploadSizeReply { size }))
    }

    async fn upload_finish(&self, req: Request<pb::FinishRequest>) -> Result<Response<pb::FinishReply>, Status> {
        let r = req.into_inner();
        let d = digest(&r.digest)?;
        let stored = self.store.upload_finish(&r.id, &d).await.map_err(status_of)?;
        let copies = if stored.size <= r.copy_at_most {
            let copies = self.copies(&d, stored.size, r.copy_to, Some(berth_core::store::FINISH_COPY_TIME)).await;
            // Awaited: dropping a large blob's pages takes tens of milliseconds, little next to
            // copying it, and the push that made them pays for it rather than what runs next.
            self.store.note_copies_sent(&d).await;
            copies
        } else {
            // Too large to copy in this call: the frontend asks for a transfer next.
            vec![]
        };
        Ok(Response::new(pb::FinishReply { size: stored.size, stamp: stored.stamp, copies }))
    }

    async fn upload_cancel(&self, req: Request<pb::UploadRef>) -> Result<Response<pb::Empty>, Status> {
        self.store.upload_cancel(&req.into_inner().id).await.map_err(status_of)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn expire_uploads(
        &self,
        req: Request<pb::ExpireRequest>,
    ) -> Result<Response<Self::ExpireUploadsStream>, Status> {
        let idle = Duration::from_secs(req.into_inner().idle_seconds);
        let ids = self.store.expire_uploads(idle).await.map_err(status_of)?;
        let batches: Vec<pb::UploadIds> = ids.chunks(EXPIRE_BATCH).map(|c| pb::UploadIds { ids: c.to_vec() }).collect();
        Ok(Response::new(stream::iter(batches.into_iter().map(Ok)).boxed()))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteReply>, Status> {
        let r = req.into_inner();
        let d = digest(&r.digest)?;
        let done = self.store.delete(&d, r.upto).await.map_err(status_of)?;
        Ok(Response::new(pb::DeleteReply { stamp: done.stamp, size: done.bytes, kept: done.kept > 0 }))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let r = req.into_inner();
        let after = r.after.as_deref().map(digest).transpose()?;
        // A page, not the whole inventory: the reply must fit in one message.
        let n = usize::try_from(r.n).unwrap_or(usize::MAX).min(LIST_PAGE);
        let blobs = self.store.list(after.as_ref(), n).await.map_err(status_of)?;
        let blobs = blobs.into_iter().map(|(d, stamp)| pb::ListedBlob { digest: d.to_string(), stamp }).collect();
        Ok(Response::new(pb::ListReply { blobs }))
    }

    async fn transfer(&self, req: Request<pb::TransferRequest>) -> Result<Response<pb::TransferReply>, Status> {
        let r = req.into_inner();
        let d = digest(&r.digest)?;
        let Some(held) = self.store.stat(&d).await.map_err(status_of)? else {
            return Err(status_of(RegistryError::new(berth_core::ErrorCode::BlobUnknown, format!("{d} is not here"))));
        };
        let outcomes = self.copies(&d, held.size, r.targets, None).await;
        self.store.note_copies_sent(&d).await;
        Ok(Response::new(pb::TransferReply { outcomes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::SENT_APART;
    use crate::wire::FRAME_SIZE;

    /// A storage node served over gRPC on `addr` (port 0: any), with its data in `dir`.
    struct Served {
        engine: Arc<crate::StorageEngine>,
        addr: std::net::SocketAddr,
        /// Sending (or dropping) it stops the server.
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    fn serve(dir: &std::path::Path, addr: std::net::SocketAddr) -> Served {
        let engine = Arc::new(crate::StorageEngine::open(crate::StorageConfig { dir: dir.to_path_buf() }).unwrap());
        let incoming = tonic::transport::server::TcpIncoming::bind(addr).unwrap();
        let addr = incoming.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(storage_server(engine.clone()))
                .serve_with_incoming_shutdown(incoming, async {
                    stopped.await.ok();
                }),
        );
        Served { engine, addr, stop, server }
    }

    fn any_port() -> std::net::SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// A segment blob (up to 256 KiB) copied to several nodes is read once, with its BLAKE3;
    /// a single copy, a larger blob or a size that does not match reads per copy instead.
    #[tokio::test]
    async fn a_small_blob_is_read_once_for_all_of_its_copies() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            Arc::new(crate::StorageEngine::open(crate::StorageConfig { dir: dir.path().to_path_buf() }).unwrap());
        let rpc = StorageRpc { store: engine.clone(), peers: Mutex::default() };
        let mut stored = vec![];
        for size in [crate::INLINE_THRESHOLD as usize, crate::INLINE_THRESHOLD as usize + 1] {
            let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            let d = Digest::sha256_of(&data);
            engine.put_small(&d, Bytes::from(data.clone())).await.unwrap();
            stored.push((d, data));
        }
        let (small, data) = &stored[0];
        let size = data.len() as u64;
        let (blake3, bytes) = rpc.read_once(small, size, 2).await.expect("read once for two copies");
        assert_eq!(&bytes[..], &data[..]);
        assert_eq!(blake3, engine.blake3(small).await.unwrap());
        assert!(blake3.is_some(), "a copy is checked against the sender's BLAKE3");
        assert!(rpc.read_once(small, size, 1).await.is_none(), "one copy reads for itself");
        assert!(rpc.read_once(small, size - 1, 2).await.is_none(), "a size that does not match");
        let (large, data) = &stored[1];
        assert!(rpc.read_once(large, data.len() as u64, 2).await.is_none(), "a file blob is streamed per copy");
    }

    #[tokio::test]
    async fn reads_are_reframed_and_errors_end_the_stream() {
        let big = Bytes::from(vec![7u8; FRAME_SIZE * 2 + 1]);
        let src: ByteStream = stream::iter(vec![Ok(big), Err(io::Error::other("disk gone"))]).boxed();
        let out: Vec<Result<pb::ReadFrame, Status>> = read_frames(9, src).collect().await;
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].as_ref().ok(), Some(&head(true, 9)));
        let sizes: Vec<usize> = out[1..4]
            .iter()
            .map(|f| match f {
                Ok(pb::ReadFrame { part: Some(pb::read_frame::Part::Data(d)) }) => d.len(),
                _ => usize::MAX,
            })
            .collect();
        assert_eq!(sizes, vec![FRAME_SIZE, FRAME_SIZE, 1]);
        assert!(out[4].is_err());
    }

    /// A read answer leaves byte for byte as tonic's encoder would send it, with large data in
    /// a frame of its own that is the store's own bytes, not a copy; the end, or a failure,
    /// closes it with the status in the trailers.
    #[tokio::test]
    async fn read_answers_are_framed_as_tonic_would_without_copying_data() {
        use crate::wire::grpc_message;
        /// The frames of `messages` framed: the bytes, the data frames, the trailers.
        async fn framed(messages: Vec<Result<pb::ReadFrame, Status>>) -> (Vec<u8>, Vec<Bytes>, http::HeaderMap) {
            let (mut wire, mut datas, mut trailers) = (vec![], vec![], None);
            let mut body = Framed::answer(stream::iter(messages).boxed());
            while let Some(frame) = body.next().await {
                match frame.unwrap().into_data() {
                    Ok(d) => {
                        wire.extend_from_slice(&d);
                        datas.push(d);
                    }
                    Err(f) => trailers = Some(f.into_trailers().ok().unwrap()),
                }
            }
            (wire, datas, trailers.expect("trailers end the body"))
        }
        let big = Bytes::from(vec![5u8; FRAME_SIZE]);
        let edge = Bytes::from(vec![6u8; SENT_APART]);
        let msgs = [
            head(true, (5 + FRAME_SIZE + SENT_APART + 200) as u64),
            data(Bytes::from_static(b"short")),
            data(big.clone()),
            data(edge.clone()),
            data(Bytes::from(vec![7u8; 200])),
        ];
        let (wire, datas, trailers) = framed(msgs.iter().cloned().map(Ok).collect()).await;
        let tonic_wire: Vec<u8> = msgs.iter().flat_map(|m| grpc_message(m).to_vec()).collect();
        assert_eq!(wire, tonic_wire, "the bytes tonic would send");
        for sent in [&big, &edge] {
            assert!(datas.iter().any(|d| d.as_ptr() == sent.as_ptr() && d.len() == sent.len()), "data copied");
        }
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));

        let (wire, _, trailers) = framed(vec![Ok(head(true, 3)), Err(Status::internal("disk gone"))]).await;
        assert_eq!(wire, grpc_message(&head(true, 3)).to_vec());
        assert_eq!(
            Status::from_header_map(&trailers).map(|st| (st.code(), st.message().to_string())),
            Some((tonic::Code::Internal, "disk gone".to_string()))
        );
    }

    /// tonic's own client reads what the node frames by hand: blobs whole and in part, a
    /// small blob, an unknown blob and a refused request each as the contract says.
    /// The client's streamed writes, framed by hand, sent to tonic's own generated service
    /// (its decoder, not `Frames`): every write is stored as sent, including data messages
    /// sent apart from their prefix, and a refusal comes back as the store's error.
    #[tokio::test]
    async fn writes_framed_by_hand_are_read_by_a_tonic_server() {
        use crate::client::{StorageClient, StorageClientConfig};

        let dir = tempfile::tempdir().unwrap();
        let engine =
            Arc::new(crate::StorageEngine::open(crate::StorageConfig { dir: dir.path().to_path_buf() }).unwrap());
        let rpc = Arc::new(StorageRpc { store: engine.clone(), peers: Mutex::default() });
        let generated = StorageServer::from_arc(rpc).max_decoding_message_size(MAX_MESSAGE);
        let incoming = tonic::transport::server::TcpIncoming::bind(any_port()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tonic::transport::Server::builder().add_service(generated).serve_with_incoming_shutdown(
            incoming,
            async {
                stopped.await.ok();
            },
        ));
        let client = StorageClient::new(&addr.to_string(), StorageClientConfig::default()).unwrap();
        let blob = |size: usize| Bytes::from((0..size).map(|i| (i % 249) as u8).collect::<Vec<u8>>());
        // Whole puts: short data, data sent apart, and more than one data message.
        for size in [5, SENT_APART, FRAME_SIZE + SENT_APART + 3] {
            let data = blob(size);
            let d = Digest::sha256_of(&data);
            let body = stream::iter([Ok(data.slice(..size / 2)), Ok(data.slice(size / 2..))]).boxed();
            assert_eq!(client.put(&d, body, u64::MAX).await.unwrap().size, size as u64);
            assert_eq!(engine.read_small(&d, u64::MAX).await.unwrap().as_deref(), Some(&data[..]));
        }
        let small = blob(300);
        let d = Digest::sha256_of(&small);
        assert_eq!(client.put_small(&d, small.clone()).await.unwrap().size, 300);
        // An upload in two appends, then one at the wrong offset.
        let id = "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
        engine.upload_start(id).await.unwrap();
        let data = blob(100_000);
        let one = |b: Bytes| stream::iter([Ok(b)]).boxed();
        assert_eq!(client.upload_append(id, Some(0), one(data.slice(..60_000)), u64::MAX).await.unwrap(), 60_000);
        assert_eq!(client.upload_append(id, Some(60_000), one(data.slice(60_000..)), u64::MAX).await.unwrap(), 100_000);
        let wrong = client.upload_append(id, Some(5), one(data.slice(..10)), u64::MAX).await.unwrap_err();
        assert_eq!(wrong.code, berth_core::ErrorCode::BlobUploadInvalid, "{wrong}");
        let d = Digest::sha256_of(&data);
        assert_eq!(engine.upload_finish(id, &d).await.unwrap().size, 100_000);
        assert_eq!(engine.read_small(&d, u64::MAX).await.unwrap().as_deref(), Some(&data[..]));
    }

    #[tokio::test]
    async fn read_answers_framed_by_hand_are_read_by_a_tonic_client() {
        use berth_proto::storage::storage_client::StorageClient as Grpc;
        use pb::read_frame::Part;

        let dir = tempfile::tempdir().unwrap();
        let Served { engine, addr, stop: _stop, .. } = serve(dir.path(), any_port());
        let mut g = Grpc::connect(format!("http://{addr}")).await.unwrap();
        let mut blobs = vec![];
        for size in [3usize, 100_000, crate::INLINE_THRESHOLD as usize + 70_000] {
            let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let d = Digest::sha256_of(&bytes);
            engine.put(&d, stream::iter([Ok(Bytes::from(bytes.clone()))]).boxed(), u64::MAX).await.unwrap();
            blobs.push((d, bytes));
        }
        async fn answer(s: tonic::Streaming<pb::ReadFrame>) -> (Option<pb::ReadHead>, Vec<u8>) {
            let frames: Vec<pb::ReadFrame> = s.map(|f| f.unwrap()).collect().await;
            let mut frames = frames.into_iter();
            let head = match frames.next() {
                Some(pb::ReadFrame { part: Some(Part::Head(h)) }) => Some(h),
                _ => None,
            };
            let data = frames
                .flat_map(|f| match f.part {
                    Some(Part::Data(d)) => d.to_vec(),
                    _ => panic!("a second head"),
                })
                .collect();
            (head, data)
        }
        for (d, bytes) in &blobs {
            let whole = g.read(pb::ReadRequest { digest: d.to_string(), first: None, last: None }).await.unwrap();
            let (head, got) = answer(whole.into_inner()).await;
            assert_eq!(head, Some(pb::ReadHead { found: true, size: bytes.len() as u64 }));
            assert_eq!(&got, bytes);
            let last = bytes.len() as u64 - 1;
            let part = g.read(pb::ReadRequest { digest: d.to_string(), first: Some(1), last: Some(last) }).await;
            let (head, got) = answer(part.unwrap().into_inner()).await;
            assert_eq!(head, Some(pb::ReadHead { found: true, size: last }));
            assert_eq!(got, bytes[1..]);
        }
        let (small, bytes) = &blobs[1];
        let read = g.read_small(pb::ReadSmallRequest { digest: small.to_string(), limit: 1 << 20 }).await;
        assert_eq!(
            answer(read.unwrap().into_inner()).await,
            (Some(pb::ReadHead { found: true, size: 100_000 }), bytes.clone())
        );
        let unknown = Digest::sha256_of(b"nothing").to_string();
        let read = g.read_small(pb::ReadSmallRequest { digest: unknown.clone(), limit: 1 << 20 }).await;
        assert_eq!(answer(read.unwrap().into_inner()).await, (Some(pb::ReadHead { found: false, size: 0 }), vec![]));
        let err = g.read(pb::ReadRequest { digest: unknown, first: None, last: None }).await.unwrap_err();
        let refused = crate::wire::registry_error_of(&err).map(|e| e.code);
        assert_eq!(refused, Some(berth_core::ErrorCode::BlobUnknown), "{err}");
        let err = g.read(pb::ReadRequest { digest: "sha256:nope".into(), first: None, last: None }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }

    /// A read request that is not exactly one uncompressed message is refused unread.
    #[tokio::test]
    async fn a_read_request_must_be_one_whole_message() {
        use crate::wire::grpc_message;
        let msg =
            grpc_message(&pb::ReadRequest { digest: Digest::sha256_of(b"x").to_string(), first: None, last: None });
        let body = |b: Vec<u8>| tonic::body::Body::new(http_body_util::Full::new(Bytes::from(b)));
        let mut two = msg.to_vec();
        two.extend_from_slice(&msg);
        let mut compressed = msg.to_vec();
        compressed[0] = 1;
        for bad in [vec![], msg[..msg.len() - 1].to_vec(), two, compressed] {
            assert!(unary_message::<pb::ReadRequest>(body(bad)).await.is_err());
        }
        assert!(unary_message::<pb::ReadRequest>(body(msg.to_vec())).await.is_ok());
    }

    /// Requests that break the contract are refused as such and change nothing.
    #[tokio::test]
    async fn malformed_bodies_are_invalid_arguments() {
        use berth_proto::storage::storage_client::StorageClient as Grpc;
        use pb::append_request::Part;

        let dir = tempfile::tempdir().unwrap();
        let Served { engine, addr, stop: _stop, .. } = serve(dir.path(), any_port());
        let mut g = Grpc::connect(format!("http://{addr}")).await.unwrap();
        let id = "0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d0e";
        engine.upload_start(id).await.unwrap();
        let data = |d: &[u8]| pb::AppendRequest { part: Some(Part::Data(Bytes::copy_from_slice(d))) };
        let header = pb::AppendRequest {
            part: Some(Part::Header(pb::AppendHeader { id: id.to_string(), offset: None, limit: u64::MAX })),
        };
        let end = |size| pb::AppendRequest { part: Some(Part::End(pb::BodyEnd { size })) };
        let cases = [
            vec![data(b"no header")],
            vec![header.clone(), data(b"no end frame")],
            vec![header.clone(), data(b"abc"), end(4)],
            vec![header.clone(), data(b"abc"), end(3), data(b"after the end")],
        ];
        for case in cases {
            let err = g.upload_append(stream::iter(case)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert_eq!(engine.upload_size(id).await.unwrap(), Some(0));
        }
        let ok = g.upload_append(stream::iter(vec![header, data(b"abc"), end(3)])).await.unwrap();
        assert_eq!(ok.into_inner().size, 3);

        // A copy whose sender's BLAKE3 is not 32 bytes long.
        use pb::put_request::Part as PutPart;
        let d = Digest::sha256_of(b"abc");
        let put = vec![
            pb::PutRequest {
                part: Some(PutPart::Header(pb::PutHeader {
                    digest: d.to_string(),
                    limit: u64::MAX,
                    blake3: Bytes::from_static(b"short"),
                })),
            },
            pb::PutRequest { part: Some(PutPart::Data(Bytes::from_static(b"abc"))) },
            pb::PutRequest { part: Some(PutPart::End(pb::BodyEnd { size: 3 })) },
        ];
        let err = g.put(stream::iter(put)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert_eq!(engine.stat(&d).await.unwrap(), None);
    }

    /// Three nodes served over gRPC, and a router over clients of them that knows their
    /// addresses: the staging node finishes an upload and copies it to the other owners in
    /// the same call (or, past [`berth_core::store::COPY_WHILE_FINISHING`], by a transfer).
    #[tokio::test]
    async fn finishing_an_upload_copies_it_to_the_other_owners() {
        use crate::client::{StorageClient, StorageClientConfig};
        use crate::router::Replicated;

        let mut dirs = vec![];
        let mut stops = vec![];
        let mut engines = vec![];
        let mut nodes: Vec<(String, Arc<dyn BlobStore>)> = vec![];
        let mut addrs = vec![];
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let Served { engine, addr, stop, .. } = serve(dir.path(), any_port());
            let addr = addr.to_string();
            stops.push(stop);
            let client = StorageClient::new(&addr, StorageClientConfig::default()).unwrap();
            nodes.push((format!("node{i}"), Arc::new(client)));
            addrs.push(addr);
            engines.push(engine);
            dirs.push(dir);
        }
        let router =
            |nodes: Vec<(String, Arc<dyn BlobStore>)>| Replicated::new(nodes, 3, 2).unwrap().with_addrs(addrs.clone());
        let a = router(nodes.clone());
        let b = router(nodes);
        let body = |data: Vec<u8>| -> ByteStream { stream::iter(vec![Ok(Bytes::from(data))]).boxed() };
        let large = berth_core::store::COPY_WHILE_FINISHING as usize + 1;
        for (n, size) in [(1u8, 1000usize), (2, 300_000), (3, large)] {
            let data = vec![n; size];
            let d = Digest::sha256_of(&data);
            let id = format!("0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d0{n}");
            // Another frontend, told where the session is staged, goes straight there.
            let staging = a.upload_start(&id).await.unwrap().expect("the router names the staging node");
            b.upload_staged_at(&id, &staging);
            assert_eq!(b.upload_append(&id, Some(0), body(data.clone()), u64::MAX).await.unwrap(), size as u64);
            let stored = a.upload_finish(&id, &d).await.unwrap();
            assert_eq!(stored.size, size as u64);
            for (i, e) in engines.iter().enumerate() {
                assert_eq!(e.stat(&d).await.unwrap().map(|s| s.size), Some(size as u64), "copy {n} on node {i}");
                // Every copy holds the whole blob: the segment blob's copies, sent from one
                // read of it, and the file blob's, each read on its own.
                if size < large {
                    let held = e.read_small(&d, size as u64).await.unwrap();
                    assert!(held.as_deref() == Some(&data[..]), "copy {n} on node {i} holds other bytes");
                }
            }
        }
        // A digest mismatch is refused, and leaves a copy nowhere.
        let id = "0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d0f";
        let wrong = Digest::sha256_of(b"something else");
        a.upload_start(id).await.unwrap();
        a.upload_append(id, Some(0), body(vec![9; 500]), u64::MAX).await.unwrap();
        let e = a.upload_finish(id, &wrong).await.unwrap_err();
        assert_eq!(e.code, berth_core::ErrorCode::DigestInvalid);
        let what_was_sent = Digest::sha256_of(&[9; 500]);
        for e in &engines {
            assert!(e.stat(&what_was_sent).await.unwrap().is_none());
        }
    }

    /// An upload begun through one frontend without a call to its staging node (the router
    /// has heard the node's incarnation, which the id names) opens at its first call, made
    /// through another; once finished it stays ended; and an upload whose id names an
    /// incarnation the node no longer has (it restarted) is unknown, after which the frontend
    /// asks the node again.
    #[tokio::test]
    async fn an_upload_begun_without_a_call_opens_at_its_first_call() {
        use crate::client::{StorageClient, StorageClientConfig};
        use crate::router::Replicated;
        use berth_core::store::{incarnation_of, upload_id, Begun};
        use berth_core::ErrorCode;

        let dir = tempfile::tempdir().unwrap();
        let Served { engine, addr, stop: _stop, .. } = serve(dir.path(), any_port());
        let addr = addr.to_string();
        let frontend = || {
            let client = StorageClient::new(&addr, StorageClientConfig::default()).unwrap();
            Replicated::new(vec![("node0".to_string(), Arc::new(client) as Arc<dyn BlobStore>)], 1, 1).unwrap()
        };
        let (a, b) = (frontend(), frontend());
        // Each has called the node once: an answer over a connection made during the call
        // is not trusted for the node's incarnation.
        for f in [&a, &b] {
            assert_eq!(f.stat(&Digest::sha256_of(b"none")).await.unwrap(), None);
        }
        let body = |data: &[u8]| -> ByteStream { stream::iter(vec![Ok(Bytes::copy_from_slice(data))]).boxed() };
        let uuid = |n: u8| format!("5e55a0b1-0000-4000-8000-00000000000{n}");
        let node = Some("node0".to_string());

        // Nothing heard from the node yet: it is asked to open the area.
        let begun = a.upload_begin(&uuid(1)).await.unwrap();
        assert_eq!(begun, Begun { id: uuid(1), node: node.clone() });
        assert!(engine.upload_staged(&uuid(1)).await.unwrap());

        // Heard now: the next upload begins without a call, and opens at its first.
        let begun = a.upload_begin(&uuid(2)).await.unwrap();
        let id = begun.id.clone();
        assert_eq!(begun, Begun { id: upload_id(&uuid(2), engine.incarnation().unwrap()), node: node.clone() });
        assert_eq!(incarnation_of(&id), engine.incarnation());
        assert!(!engine.upload_staged(&id).await.unwrap(), "no call was made");
        b.upload_staged_at(&id, "node0");
        assert_eq!(b.upload_size(&id).await.unwrap(), Some(0));
        assert_eq!(b.upload_append(&id, Some(0), body(b"late"), u64::MAX).await.unwrap(), 4);
        assert_eq!(a.upload_finish(&id, &Digest::sha256_of(b"late")).await.unwrap().size, 4);
        let e = b.upload_append(&id, None, body(b"again"), u64::MAX).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::BlobUploadUnknown);

        // An empty blob: begun, then finished, with no call between.
        let id = a.upload_begin(&uuid(3)).await.unwrap().id;
        assert!(incarnation_of(&id).is_some());
        assert_eq!(a.upload_finish(&id, &Digest::sha256_of(b"")).await.unwrap().size, 0);

        // That unknown upload made the frontend forget the node's incarnation (a restart
        // would explain it): the next upload's area is opened by a call, whose answer tells
        // the incarnation again.
        assert_eq!(b.upload_begin(&uuid(4)).await.unwrap().id, uuid(4));
        assert!(incarnation_of(&b.upload_begin(&uuid(7)).await.unwrap().id).is_some());

        // An upload naming an incarnation the node no longer has: unknown at its first call.
        let stale = upload_id(&uuid(5), engine.incarnation().unwrap() ^ 2);
        b.upload_staged_at(&stale, "node0");
        let e = b.upload_append(&stale, Some(0), body(b"lost"), u64::MAX).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::BlobUploadUnknown);
        assert_eq!(b.upload_begin(&uuid(6)).await.unwrap().id, uuid(6));
        assert!(engine.upload_staged(&uuid(6)).await.unwrap());
    }

    /// A node that restarts loses its connections, and a client that heard its incarnation
    /// stops trusting it then, before any call: the next upload's area is opened by a call,
    /// to the new process, whose incarnation the client then hears.
    #[tokio::test]
    async fn a_client_stops_trusting_the_incarnation_of_a_node_that_went_away() {
        use crate::client::{StorageClient, StorageClientConfig};

        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let Served { engine: first, addr, stop, server } = serve(one.path(), any_port());
        let client = StorageClient::new(&addr.to_string(), StorageClientConfig::default()).unwrap();
        let id = |n: u8| format!("5e55a0b2-0000-4000-8000-00000000000{n}");
        for n in 1..=2 {
            client.upload_start(&id(n)).await.unwrap();
        }
        assert_eq!(client.incarnation(), first.incarnation());

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        drop(first);
        let started = std::time::Instant::now();
        while client.incarnation().is_some() {
            assert!(started.elapsed() < Duration::from_secs(5), "the incarnation of a node gone is still trusted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Served { engine: second, stop: _stop, .. } = serve(two.path(), addr);
        client.upload_start(&id(3)).await.unwrap();
        client.upload_start(&id(4)).await.unwrap();
        assert_eq!(client.incarnation(), second.incarnation());
        assert_ne!(second.incarnation(), None);
    }
}
