//! Serving the API over TCP: hyper's HTTP/1 connections, with the limits a registry open to
//! many clients needs against ones that hold connections open without finishing requests.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Connection limits.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Time a client has to send a request's whole header (the first request of a connection,
    /// and each next one on a kept-alive connection); past it the connection is closed.
    pub header_read_timeout: Duration,
    /// Open connections one client address may hold; more are closed as they arrive.
    pub max_connections_per_ip: usize,
}

/// Default time to send a request header: generous for a slow link (headers are a few hundred
/// bytes), short enough that a client sending half a header frees its connection soon.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Default connections per client address: a CI fleet behind one NAT address pushes with
/// hundreds at once; one client cannot take all the process's descriptors.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1000;

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }
}

/// Open connections per client address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection counted against its address until dropped.
struct Counted {
    counts: Counts,
    ip: IpAddr,
}

impl Counted {
    fn take(counts: &Counts, ip: IpAddr, max: usize) -> Option<Counted> {
        let mut map = counts.lock().ok()?;
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Counted { counts: counts.clone(), ip })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

/// Longest wait, once the listener is closed, for connections accepted just before that to send
/// their first request (see [`serve`]).
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);

/// One connection counted among the accepted ones that have not sent a request yet, until its
/// first request arrives or it ends. hyper ends such a connection at once when told to shut
/// down, so a client whose request was on its way would see its connection close unanswered;
/// shutting down waits (briefly) for these to turn into requests.
struct Asking {
    unasked: Arc<AtomicUsize>,
    counted: AtomicBool,
}

impl Asking {
    fn new(unasked: &Arc<AtomicUsize>) -> Arc<Asking> {
        unasked.fetch_add(1, Ordering::Relaxed);
        Arc::new(Asking { unasked: unasked.clone(), counted: AtomicBool::new(true) })
    }

    /// The connection sent a request (or ended): it no longer counts. Every request of the
    /// connection passes here; after the first it is one plain load.
    fn asked(&self) {
        if self.counted.load(Ordering::Relaxed) && self.counted.swap(false, Ordering::Relaxed) {
            self.unasked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        self.asked();
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the requests in
/// flight to finish (the caller bounds that wait). With `tls`, connections speak HTTPS; the
/// handshake must finish within the header read timeout.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let counts: Counts = Arc::default();
    // Connections accepted that have not sent a request yet (see `Asking`).
    let unasked = Arc::<AtomicUsize>::default();
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait for connections to close.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(counted) = Counted::take(&counts, peer.ip(), limits.max_connections_per_ip) else {
            tracing::debug!(peer = %peer.ip(), "connection refused: too many from this address");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY");
        }
        // The service goes with the connection, so its `Asking` ends with it too.
        let asking = Asking::new(&unasked);
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(app.clone(), move |req| {
            asking.asked();
            req
        }));
        // The connection's task does the TLS handshake, if any, so a slow client holds up no other.
        let (tls, http, watcher) = (tls.clone(), http.clone(), graceful.watcher());
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _counted = counted;
            let served = match tls {
                None => watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await,
                Some(tls) => {
                    let stream = match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!(error = %e, peer = %peer.ip(), "TLS handshake failed"),
                        Err(_) => return tracing::debug!(peer = %peer.ip(), "TLS handshake timed out"),
                    };
                    watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // New connections are refused now (a client can retry those elsewhere); the ones accepted
    // a moment ago get their first request in before the rest is told to finish.
    let closed = Instant::now();
    while unasked.load(Ordering::Relaxed) > 0 && closed.elapsed() < FIRST_REQUEST_GRACE {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    graceful.shutdown().await;
    Ok(())
}
