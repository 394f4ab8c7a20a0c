//! Channels for calls between roles, sending each call in as few TCP segments as it can.
//!
//! A call made through a plain tonic channel reaches the wire in two or three writes: its
//! HEADERS frame alone (a new HTTP/2 stream gets its send capacity only once the connection
//! task has written the headers, so the request's body waits a turn), then its DATA, then an
//! empty DATA frame ending the stream (the body says it has ended only when polled again;
//! h2 sends a large DATA frame by itself, so the end cannot join it). Every write is a
//! syscall and a loopback segment, and every segment can wake the process at the other end,
//! whose handler cannot start before the end of the stream arrives anyway. Two changes make
//! it one write:
//!
//! - [`Gathered`], under the connection: before the first write of a flush, the connection
//!   task lets the tasks it woke run first (once), so that the body of a call it just opened
//!   is queued by the time it writes, and goes out with the headers. Not over TLS: rustls
//!   takes a write's bytes at once whatever the socket does, so a yield there gathers nothing,
//!   and a TLS channel keeps tonic's own connector.
//! - [`Conn`], over the channel: a request's body looks one frame ahead, so that its last
//!   DATA frame carries the end of the stream.
//!
//! Traced on a frontend of a cluster pushing small images, its writes per answer read fell
//! from 3.5 to 1.3 on its connection to the metadata leader and from 3.5 to 1.9 on those to
//! storage nodes (a call streaming a blob's chunks still writes as its chunks come).
//!
//! A channel also counts the connections it has made and lost ([`Conn::connection_changes`]):
//! a peer that restarts cannot keep a connection across it, so an answer received while the
//! count stays the same came from the process that answers now.
//!
//! A caller that stops waiting for a call can learn whether its message was sent: it puts an
//! [`Unsent`] in the request's extensions, and the body takes it before handing out the
//! message ([`Unsent::give_up`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tonic::body::Body;
use tonic::codegen::http::{Request, Uri};
use tonic::codegen::Service;
use tonic::transport::channel::ResponseFuture;
use tonic::transport::{Channel, Endpoint};

/// A channel to one peer: tonic's [`Channel`] over a [`Gathered`] connection, whose
/// requests' bodies say they have ended with their last frame (see the module docs).
#[derive(Clone, Debug)]
pub struct Conn {
    channel: Channel,
    changes: Arc<AtomicU64>,
}

impl Conn {
    /// How many connections this channel has made and lost so far (each counts twice: when
    /// made and when gone). While it stays the same, calls go over one connection to one
    /// process of the peer.
    pub fn connection_changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }
}

/// A channel to `endpoint`, connected on first use, each TCP connection attempt given up after
/// `connect_timeout`. Give `endpoint` no connect timeout of its own: tonic would time the
/// whole connection (TLS included) with it and report running out as an error that does not
/// say the call was never sent (see [`crate::status::never_sent`]), where a timed out attempt
/// here is a connection error like a refused one. TCP_NODELAY is set (every caller in the
/// cluster wants its calls sent at once).
pub fn lazy(endpoint: &Endpoint, connect_timeout: Duration) -> Conn {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let changes = Arc::new(AtomicU64::new(0));
    // tonic puts TLS over the connector's connections when the endpoint asks for it.
    let channel = if endpoint.uri().scheme_str() == Some("https") {
        endpoint.connect_with_connector_lazy(Counted { connect: http, changes: changes.clone() })
    } else {
        endpoint.connect_with_connector_lazy(Counted { connect: Connect(http), changes: changes.clone() })
    };
    Conn { channel, changes }
}

impl Service<Request<Body>> for Conn {
    type Response = <Channel as Service<Request<Body>>>::Response;
    type Error = tonic::transport::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let unsent = request.extensions().get::<Unsent>().cloned();
        self.channel.call(request.map(|body| Body::new(LookAhead { body, next: None, ended: false, unsent })))
    }
}

/// Whether a call's message has been handed to its connection, decided once: either its body
/// hands it out first, or its caller gives the call up first and the body refuses to (an
/// error that resets the stream, so the peer's handler never has the message). Put one in a
/// request's extensions; [`Unsent::give_up`] tells the caller which came first.
#[derive(Clone, Debug, Default)]
pub struct Unsent(Arc<AtomicU8>);

const WAITING: u8 = 0;
const SENT: u8 = 1;
const GIVEN_UP: u8 = 2;

impl Unsent {
    /// Gives the call up unless its message was handed out: true if it never will be.
    pub fn give_up(&self) -> bool {
        self.settle(GIVEN_UP)
    }

    /// Settles the call as `to` unless it was settled otherwise: whether it is `to` now.
    fn settle(&self, to: u8) -> bool {
        match self.0.compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(was) => was == to,
        }
    }
}

/// Makes TCP connections, each [`Gathered`].
#[derive(Clone)]
struct Connect(HttpConnector);

type Connecting = Pin<Box<dyn Future<Output = Result<Gathered<TokioIo<tokio::net::TcpStream>>, BoxError>> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for Connect {
    type Response = Gathered<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(Gathered { io: connecting.await?, yielded: false }) })
    }
}

/// A connector whose connections are counted when made and when dropped (see
/// [`Conn::connection_changes`]).
#[derive(Clone)]
struct Counted<C> {
    connect: C,
    changes: Arc<AtomicU64>,
}

impl<C> Service<Uri> for Counted<C>
where
    C: Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Watched<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connect.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.connect.call(uri);
        let changes = self.changes.clone();
        Box::pin(async move {
            let io = connecting.await.map_err(Into::into)?;
            changes.fetch_add(1, Ordering::AcqRel);
            Ok(Watched { io, changes })
        })
    }
}

/// A connection that counts itself gone when dropped: the connection task drops it as soon as
/// the peer closes it or it fails.
pub struct Watched<T> {
    io: T,
    changes: Arc<AtomicU64>,
}

impl<T> Drop for Watched<T> {
    fn drop(&mut self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection whose writer yields once before the first write after each flush, so that
/// what the tasks it woke would send goes out in the same write (see the module docs).
///
/// Yielding is waking itself and answering `Pending`: the runtime then polls it again after
/// the tasks already woken, as `tokio::task::yield_now` does. Nothing is held back: no byte
/// is taken until it is written, and a connection that is not flushed between writes yields
/// only once.
pub struct Gathered<T> {
    io: T,
    yielded: bool,
}

impl<T> Gathered<T> {
    fn hold(&mut self, cx: &mut Context<'_>) -> bool {
        if self.yielded {
            return false;
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        true
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Gathered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Gathered<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.hold(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.hold(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.yielded = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request body that, having handed out a DATA frame, asks for the next one at once, so
/// that it can say with that frame whether the body has ended (hyper then ends the stream
/// with it instead of with a frame of its own).
struct LookAhead {
    body: Body,
    next: Option<Result<Frame<Bytes>, tonic::Status>>,
    ended: bool,
    /// Taken before the first frame is handed out (see [`Unsent`]).
    unsent: Option<Unsent>,
}

impl http_body::Body for LookAhead {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if let Some(unsent) = this.unsent.take() {
            if !unsent.settle(SENT) {
                this.ended = true;
                return Poll::Ready(Some(Err(tonic::Status::cancelled("the call was given up before it was sent"))));
            }
        }
        let frame = match this.next.take() {
            Some(frame) => frame,
            None if this.ended => return Poll::Ready(None),
            None => match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(frame)) => frame,
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        if frame.as_ref().is_ok_and(Frame::is_data) {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(next)) => this.next = Some(next),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.next.is_none() && (self.ended || self.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.next {
            Some(Ok(frame)) => {
                let ahead = frame.data_ref().map_or(0, |d| d.len() as u64);
                let rest = self.body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + ahead);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
            Some(Err(_)) => SizeHint::default(),
            None if self.ended => SizeHint::with_exact(0),
            None => self.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use http_body::Body as _;

    fn frames(body: LookAhead) -> Vec<(Bytes, bool)> {
        let mut body = Box::pin(body);
        let mut out = vec![];
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
            out.push((frame.unwrap().into_data().unwrap(), body.is_end_stream()));
        }
        out
    }

    #[test]
    fn the_last_frame_says_the_body_has_ended() {
        let chunks = ["a", "bc", "def"].map(|s| Ok::<_, tonic::Status>(Frame::data(Bytes::from(s))));
        let stream = futures::stream::iter(chunks);
        let body = Body::new(http_body_util::StreamBody::new(stream));
        let got = frames(LookAhead { body, next: None, ended: false, unsent: None });
        assert_eq!(got, vec![("a".into(), false), ("bc".into(), false), ("def".into(), true)]);
    }

    fn stream(chunks: &[&'static str]) -> Body {
        let chunks: Vec<_> = chunks.iter().map(|s| Ok::<_, tonic::Status>(Frame::data(Bytes::from(*s)))).collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(chunks)))
    }

    #[test]
    fn a_call_given_up_first_never_hands_out_its_message() {
        let unsent = Unsent::default();
        assert!(unsent.give_up());
        assert!(unsent.give_up(), "a call given up stays given up");
        let body = LookAhead { body: stream(&["message"]), next: None, ended: false, unsent: Some(unsent) };
        let mut body = Box::pin(body);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Err(status))) => assert_eq!(status.code(), tonic::Code::Cancelled),
            other => panic!("the body handed out {other:?}"),
        }
        assert!(matches!(body.as_mut().poll_frame(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn a_call_whose_message_was_handed_out_cannot_be_given_up() {
        let unsent = Unsent::default();
        let body = LookAhead { body: stream(&["a", "b"]), next: None, ended: false, unsent: Some(unsent.clone()) };
        assert_eq!(frames(body), vec![("a".into(), false), ("b".into(), true)]);
        assert!(!unsent.give_up());
    }

    #[test]
    fn a_body_still_waiting_has_not_ended() {
        let first = futures::stream::iter([Ok::<_, tonic::Status>(Frame::data(Bytes::from("x")))]);
        let stream = first.chain(futures::stream::pending());
        let body = Body::new(http_body_util::StreamBody::new(stream));
        assert_eq!(frames(LookAhead { body, next: None, ended: false, unsent: None }), vec![("x".into(), false)]);
    }
}
