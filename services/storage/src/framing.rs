//! gRPC framing of the storage calls that carry blob bytes, done here rather than by tonic,
//! whose encoder and decoder each copy every message whole: [`Framed`] puts messages on the
//! wire with a large data field in a frame of its own, as the bytes it was given, and
//! [`Frames`] takes messages off the wire with a data field that lies within one received
//! frame as a slice of it. The bytes on the wire are those tonic sends and reads; a node's read
//! answers and the streamed writes (`Put`, `PutSmall`, `UploadAppend`) go both ways like this.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use berth_proto::storage as pb;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::{BoxStream, Stream, StreamExt};
use tonic::{Code, Status};

use crate::wire::{framed_len, put_grpc_message, put_grpc_prefix};

/// Data of at least this many bytes leaves in a frame of its own, after a frame with its
/// message's prefix; shorter data is copied in with its prefix (and with the head, or other
/// short messages ready at the same time), which costs less than another frame.
pub(crate) const SENT_APART: usize = 16 * 1024;

/// Messages as a gRPC body (a read's answer, or a streamed write's request): each message on
/// the wire as tonic's encoder puts it, but a data message of at least [`SENT_APART`] bytes as
/// two frames, its prefix (gRPC's and the protobuf field's) and then its bytes, uncopied.
/// tonic's encoder copies every message into a buffer of its own first. An answer's end, or
/// its failure, closes the body with the status in the trailers; a request's ends the body.
pub(crate) struct Framed<M> {
    /// The messages still to come; `None` once ended.
    messages: Option<BoxStream<'static, Result<M, Status>>>,
    /// Short messages and prefixes not yet sent.
    small: BytesMut,
    /// Frames ready to send, in order.
    ready: VecDeque<Bytes>,
    /// The trailers, once the messages have ended.
    trailers: Option<http::HeaderMap>,
    /// Whether the body ends with trailers (an answer) or without (a request).
    answer: bool,
}

/// The field number of the data in every message with data (a test checks it against prost's
/// encoding).
const DATA_FIELD: u32 = 2;

/// A message of a call that carries blob bytes: its `data` (field [`DATA_FIELD`] of a `oneof
/// part`), or something else (a header, a head, an end).
pub(crate) trait DataMessage: prost::Message + Sized + Send + 'static {
    /// The data, when the message is data.
    fn data(&self) -> Option<&Bytes>;
}

macro_rules! data_message {
    ($($message:ident => $part:ident),* $(,)?) => {$(
        impl DataMessage for pb::$message {
            fn data(&self) -> Option<&Bytes> {
                match &self.part {
                    Some(pb::$part::Part::Data(d)) => Some(d),
                    _ => None,
                }
            }
        }
    )*};
}

data_message!(ReadFrame => read_frame, PutRequest => put_request, PutSmallRequest => put_small_request, AppendRequest => append_request);

impl<M: DataMessage> Framed<M> {
    /// An answer of `messages`, ended by trailers with their status.
    pub(crate) fn answer(messages: BoxStream<'static, Result<M, Status>>) -> Framed<M> {
        Framed {
            messages: Some(messages),
            small: BytesMut::new(),
            ready: VecDeque::new(),
            trailers: None,
            answer: true,
        }
    }

    /// A request's body of `messages`.
    pub(crate) fn request(messages: impl Stream<Item = M> + Send + 'static) -> Framed<M> {
        Framed { answer: false, ..Framed::answer(messages.map(Ok).boxed()) }
    }

    fn put(&mut self, m: M) {
        match m.data() {
            Some(d) if d.len() >= SENT_APART => {
                put_grpc_prefix(&mut self.small, m.encoded_len());
                prost::encoding::encode_key(DATA_FIELD, prost::encoding::WireType::LengthDelimited, &mut self.small);
                prost::encoding::encode_varint(d.len() as u64, &mut self.small);
                let d = d.clone();
                self.flush();
                self.ready.push_back(d);
            }
            _ => put_grpc_message(&mut self.small, &m),
        }
    }

    fn flush(&mut self) {
        if !self.small.is_empty() {
            self.ready.push_back(self.small.split().freeze());
        }
    }

    /// Ends the body with `status`.
    fn end(&mut self, status: Status) {
        self.flush();
        self.messages = None;
        if !self.answer {
            return;
        }
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            // Only a message that cannot be a header value fails; the code always can be.
            trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
        }
        self.trailers = Some(trailers);
    }
}

impl<M: DataMessage> futures::Stream for Framed<M> {
    type Item = Result<http_body::Frame<Bytes>, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
            }
            let Some(messages) = self.messages.as_mut() else {
                return Poll::Ready(self.trailers.take().map(|t| Ok(http_body::Frame::trailers(t))));
            };
            match messages.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(m))) => self.put(m),
                Poll::Ready(Some(Err(st))) => self.end(st),
                Poll::Ready(None) => self.end(Status::ok("")),
                // Short messages wait only while more are ready at once.
                Poll::Pending if !self.small.is_empty() => self.flush(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The messages of a gRPC body (a call's answer, or a streamed request), taken one by one
/// from the HTTP/2 body without tonic's decoder. That decoder copies every frame it receives
/// into a buffer of its own before it decodes a message: a whole extra copy of every byte a
/// frontend pulls (under pull-images, `memmove` was 11% of a frontend's CPU), and of every
/// byte a node is sent to store. Here the received frames are held as they arrived, and a
/// message's data field that lies within one of them is a slice of it: the sender puts each
/// large data message's prefix and its bytes in frames of their own (see [`Framed`]), and a
/// message may as well lie whole in one frame. Only bytes of a field cut across frames are
/// copied, once.
pub(crate) struct Frames {
    body: tonic::body::Body,
    /// Received bytes not yet decoded, in the frames they arrived in (none empty).
    held: Pieces,
    ended: bool,
    /// A request's body, which ends with its stream; an answer ends with its status.
    request: bool,
}

/// Short frames (under [`SHORT_FRAME`] bytes) held at the back at most before they are put
/// together into one: a peer sending a message in tiny frames would otherwise hold a `Bytes`
/// (and its allocation) for each. Longer frames are never copied to put them together, so a
/// message arriving in many frames costs no copying beyond its short ones.
const HELD_FRAMES: usize = 64;

/// See [`HELD_FRAMES`].
const SHORT_FRAME: usize = 4096;

/// Why a body's messages could not be taken.
pub(crate) enum Unframed {
    /// The call failed (the peer's status, or the transport's).
    Status(Status),
    /// The body breaks gRPC's framing, or a message does not decode.
    Malformed(String),
}

impl Unframed {
    /// As the status tonic's server answers for it.
    pub(crate) fn into_status(self) -> Status {
        match self {
            Unframed::Status(st) => st,
            Unframed::Malformed(why) => Status::internal(why),
        }
    }
}

/// Bytes in the pieces they arrived in, read as one [`Buf`](bytes::Buf) whose
/// `copy_to_bytes` slices a piece when the bytes asked for lie within it: prost takes a
/// `bytes` field with `copy_to_bytes`, so a data field within one frame is not copied.
#[derive(Default)]
struct Pieces {
    parts: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl Pieces {
    /// Adds `b` at the back; once [`HELD_FRAMES`] short frames lie at the back, they become
    /// one piece.
    fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        self.parts.push_back(b);
        let short = self.parts.iter().rev().take_while(|p| p.len() < SHORT_FRAME).count();
        if short >= HELD_FRAMES {
            let mut joined = BytesMut::new();
            for p in self.parts.drain(self.parts.len() - short..) {
                joined.extend_from_slice(&p);
            }
            self.parts.push_back(joined.freeze());
        }
    }

    /// The first `n` bytes (at most all of them), taken off the front.
    fn split_to(&mut self, n: usize) -> Pieces {
        let mut taken = Pieces::default();
        while taken.len < n {
            let Some(front) = self.parts.front_mut() else { break };
            let want = n - taken.len;
            if front.len() <= want {
                let b = self.parts.pop_front().unwrap_or_default();
                self.len -= b.len();
                taken.push(b);
            } else {
                self.len -= want;
                taken.push(front.split_to(want));
            }
        }
        taken
    }

    /// The first `N` bytes, if there are that many.
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        let mut at = 0;
        for p in &self.parts {
            let n = p.len().min(N - at);
            out[at..at + n].copy_from_slice(&p[..n]);
            at += n;
            if at == N {
                return Some(out);
            }
        }
        None
    }
}

impl Buf for Pieces {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advanced past the end");
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else { break };
            if front.len() > cnt {
                front.advance(cnt);
                break;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let b = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.parts.pop_front();
                }
                b
            }
            _ => {
                assert!(len <= self.len, "copy_to_bytes past the end");
                let mut out = BytesMut::with_capacity(len);
                out.put(Buf::take(&mut *self, len));
                out.freeze()
            }
        }
    }
}

impl Frames {
    /// The answer in `body`; `ended` when the call's status came with its headers.
    pub(crate) fn answer(body: tonic::body::Body, ended: bool) -> Frames {
        Frames { body, held: Pieces::default(), ended, request: false }
    }

    /// The messages of a streamed request's `body`.
    pub(crate) fn request(body: tonic::body::Body) -> Frames {
        Frames { body, held: Pieces::default(), ended: false, request: true }
    }

    /// The next whole message's bytes (without its prefix), if they are all here.
    fn take(&mut self) -> Result<Option<Pieces>, Unframed> {
        let Some(prefix) = self.held.peek::<5>() else { return Ok(None) };
        let n = framed_len(&prefix).map_err(Unframed::Malformed)?.unwrap_or(usize::MAX);
        if self.held.len < n {
            return Ok(None);
        }
        let mut msg = self.held.split_to(n);
        msg.advance(5);
        Ok(Some(msg))
    }

    /// The body's one message: an error when it has none, or more than one (the answer to a
    /// streamed write).
    pub(crate) async fn only<M: prost::Message + Default>(&mut self) -> Result<M, Unframed> {
        let Some(m) = self.message::<M>().await? else {
            return Err(Unframed::Malformed("a body without its message".into()));
        };
        match self.message::<M>().await? {
            None => Ok(m),
            Some(_) => Err(Unframed::Malformed("a body of more than one message".into())),
        }
    }

    /// The next message, `None` once the body ended well.
    pub(crate) async fn message<M: prost::Message + Default>(&mut self) -> Result<Option<M>, Unframed> {
        use http_body_util::BodyExt;
        loop {
            if let Some(msg) = self.take()? {
                return M::decode(msg).map(Some).map_err(|e| Unframed::Malformed(e.to_string()));
            }
            if self.ended {
                return match self.held.len {
                    0 => Ok(None),
                    _ => Err(Unframed::Malformed("the body ended inside a message".into())),
                };
            }
            let Some(frame) = self.body.frame().await else {
                if self.request {
                    self.ended = true;
                    continue;
                }
                return Err(Unframed::Status(Status::internal("the answer ended without its status")));
            };
            let frame = frame.map_err(|e| Unframed::Status(Status::from_error(Box::new(e))))?;
            match frame.into_data() {
                Ok(data) => self.held.push(data),
                // A request's trailers say nothing the server reads.
                Err(_) if self.request => {}
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else { continue };
                    match Status::from_header_map(&trailers) {
                        Some(st) if st.code() != Code::Ok => return Err(Unframed::Status(st)),
                        Some(_) => self.ended = true,
                        None => return Err(Unframed::Malformed("trailers without grpc-status".into())),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{grpc_message, MAX_MESSAGE};
    use futures::stream;
    use tonic::Code;

    /// A read answer whose body arrives as `chunks`, then `trailers` if any.
    fn answer(chunks: Vec<Bytes>, trailers: Option<http::HeaderMap>) -> Frames {
        let mut frames: Vec<Result<http_body::Frame<Bytes>, Status>> =
            chunks.into_iter().map(|c| Ok(http_body::Frame::data(c))).collect();
        frames.extend(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
        let body = http_body_util::StreamBody::new(stream::iter(frames));
        Frames::answer(tonic::body::Body::new(body), false)
    }

    fn status(code: i32) -> Option<http::HeaderMap> {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.into());
        Some(t)
    }

    /// The messages of a head and two data frames, each with its 5-byte prefix, end to end.
    fn wire() -> (Vec<pb::ReadFrame>, Bytes) {
        use pb::read_frame::Part;
        let msgs = vec![
            pb::ReadFrame { part: Some(Part::Head(pb::ReadHead { found: true, size: 70_003 })) },
            pb::ReadFrame { part: Some(Part::Data(Bytes::from(vec![7u8; 70_000]))) },
            pb::ReadFrame { part: Some(Part::Data(Bytes::from_static(b"end"))) },
        ];
        let mut all = BytesMut::new();
        for m in &msgs {
            all.extend_from_slice(&grpc_message(m));
        }
        (msgs, all.freeze())
    }

    async fn all(mut f: Frames) -> Result<Vec<pb::ReadFrame>, Unframed> {
        let mut got = vec![];
        while let Some(m) = f.message::<pb::ReadFrame>().await? {
            got.push(m);
        }
        Ok(got)
    }

    #[tokio::test]
    async fn messages_come_whole_however_the_frames_cut_them() {
        let (msgs, wire) = wire();
        // One frame; cuts inside a prefix, inside a message's body, at every byte of the start,
        // and every 1000 bytes (a message put together from many frames).
        let mut cuts: Vec<Vec<usize>> = vec![vec![], vec![2], vec![20, 30_000], vec![wire.len() - 1]];
        cuts.push((1..40).collect());
        cuts.push((1..wire.len()).step_by(1000).collect());
        for at in cuts {
            let mut chunks = vec![];
            let mut from = 0;
            for &c in at.iter().chain([wire.len()].iter()) {
                chunks.push(wire.slice(from..c));
                from = c;
            }
            let got = all(answer(chunks, status(0))).await.ok().expect("a whole answer");
            assert_eq!(got, msgs, "cut at {at:?}");
        }
    }

    #[tokio::test]
    async fn a_message_within_one_frame_is_a_slice_of_it() {
        let (_, wire) = wire();
        let mut f = answer(vec![wire.clone()], status(0));
        f.message::<pb::ReadFrame>().await.ok().unwrap();
        let Some(pb::ReadFrame { part: Some(pb::read_frame::Part::Data(d)) }) =
            f.message::<pb::ReadFrame>().await.ok().unwrap()
        else {
            panic!("a data frame");
        };
        let within = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        assert!(within.contains(&(d.as_ptr() as usize)), "the data was copied");
    }

    /// As the node sends a large data message: its prefix in one frame (with the head before
    /// it), its bytes in the next. The data is that frame, not a copy of it.
    #[tokio::test]
    async fn data_in_a_frame_of_its_own_is_that_frame() {
        let (msgs, wire) = wire();
        let head_len = grpc_message(&msgs[0]).len();
        let data_at = head_len + 5 + 1 + prost::encoding::encoded_len_varint(70_000);
        let data = wire.slice(data_at..data_at + 70_000);
        let chunks = vec![wire.slice(..data_at), data.clone(), wire.slice(data_at + 70_000..)];
        let mut f = answer(chunks, status(0));
        assert_eq!(f.message::<pb::ReadFrame>().await.ok().unwrap().as_ref(), Some(&msgs[0]));
        let Some(pb::ReadFrame { part: Some(pb::read_frame::Part::Data(d)) }) =
            f.message::<pb::ReadFrame>().await.ok().unwrap()
        else {
            panic!("a data frame");
        };
        assert_eq!((d.as_ptr(), d.len()), (data.as_ptr(), data.len()), "the data was copied");
        assert_eq!(f.message::<pb::ReadFrame>().await.ok().unwrap().as_ref(), Some(&msgs[2]));
        assert!(matches!(f.message::<pb::ReadFrame>().await, Ok(None)));
    }

    #[tokio::test]
    async fn a_failed_or_cut_answer_is_an_error() {
        let (_, wire) = wire();
        // The node's status in the trailers, after some messages.
        match all(answer(vec![wire.clone()], status(Code::NotFound as i32))).await {
            Err(Unframed::Status(st)) => assert_eq!(st.code(), Code::NotFound),
            _ => panic!("the trailers' status"),
        }
        // No trailers: the call did not end well.
        assert!(matches!(all(answer(vec![wire.clone()], None)).await, Err(Unframed::Status(_))));
        // The status says OK but a message was cut short.
        let cut = wire.slice(..wire.len() - 1);
        assert!(matches!(all(answer(vec![cut], status(0))).await, Err(Unframed::Malformed(_))));
        // A compressed message, or one over the limit.
        let mut bad = BytesMut::from(&wire[..]);
        bad[0] = 1;
        assert!(matches!(all(answer(vec![bad.freeze()], status(0))).await, Err(Unframed::Malformed(_))));
        let mut huge = BytesMut::from(&[0u8][..]);
        huge.extend_from_slice(&(MAX_MESSAGE as u32 + 1).to_be_bytes());
        assert!(matches!(all(answer(vec![huge.freeze()], status(0))).await, Err(Unframed::Malformed(_))));
    }

    /// A request's body as [`Framed`] puts it on the wire: its frames, and whether it ended
    /// with trailers.
    async fn request_frames(messages: Vec<pb::PutRequest>) -> (Vec<Bytes>, bool) {
        let mut body = Framed::request(stream::iter(messages).boxed());
        let (mut frames, mut trailers) = (vec![], false);
        while let Some(f) = body.next().await {
            match f.unwrap().into_data() {
                Ok(d) => frames.push(d),
                Err(_) => trailers = true,
            }
        }
        (frames, trailers)
    }

    #[tokio::test]
    async fn requests_are_framed_as_tonic_would_with_large_data_uncopied() {
        use pb::put_request::Part;
        let large = Bytes::from(vec![3u8; SENT_APART]);
        let msgs = vec![
            pb::PutRequest {
                part: Some(Part::Header(pb::PutHeader { digest: "sha256:x".into(), limit: 9, blake3: Bytes::new() })),
            },
            pb::PutRequest { part: Some(Part::Data(Bytes::from_static(b"short"))) },
            pb::PutRequest { part: Some(Part::Data(large.clone())) },
            pb::PutRequest { part: Some(Part::End(pb::BodyEnd { size: 5 + SENT_APART as u64 })) },
        ];
        let (frames, trailers) = request_frames(msgs.clone()).await;
        let tonic: Vec<u8> = msgs.iter().flat_map(|m| grpc_message(m).to_vec()).collect();
        assert_eq!(frames.concat(), tonic, "the bytes tonic's encoder would send");
        assert!(!trailers, "a request's body ends without trailers");
        assert!(
            frames.iter().any(|f| (f.as_ptr(), f.len()) == (large.as_ptr(), large.len())),
            "the large data is sent as it was given"
        );
    }

    /// A request's body: its messages, ended by the end of the body (trailers, which a request
    /// may carry, say nothing); a body cut inside a message is malformed.
    #[tokio::test]
    async fn a_request_ends_with_its_body() {
        let (msgs, wire) = wire();
        let request = |chunks: Vec<Bytes>, trailers: Option<http::HeaderMap>| {
            let mut frames: Vec<Result<http_body::Frame<Bytes>, Status>> =
                chunks.into_iter().map(|c| Ok(http_body::Frame::data(c))).collect();
            frames.extend(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
            Frames::request(tonic::body::Body::new(http_body_util::StreamBody::new(stream::iter(frames))))
        };
        for trailers in [None, status(Code::NotFound as i32)] {
            let got = all(request(vec![wire.slice(..100), wire.slice(100..)], trailers)).await.ok();
            assert_eq!(got, Some(msgs.clone()));
        }
        let cut = request(vec![wire.slice(..wire.len() - 1)], None);
        assert!(matches!(all(cut).await, Err(Unframed::Malformed(_))));
        assert!(matches!(all(request(vec![], None)).await.ok().as_deref(), Some([])));
    }
}
