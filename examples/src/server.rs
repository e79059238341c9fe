//! Serving a [`Router`] over TCP with the timeouts and limits a production service sets, which
//! `axum::serve` does not: a slow or silent client is cut off instead of holding a connection,
//! a descriptor and memory forever.
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_examples::server::{self, ServerConfig};
//!
//! # async fn demo(app: axum::Router, idem: idem_runtime::Idempotency) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! let config = ServerConfig::new().request_body_timeout(Duration::from_secs(10));
//! server::serve(listener, app, config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await;
//! // Then let handlers whose clients went away finish and record.
//! idem.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! | limit | default | what it stops | how |
//! |---|---|---|---|
//! | [header read timeout](ServerConfig::header_read_timeout) | 10 s | a client that sends nothing, or its request head slowly (slowloris); on HTTP/1.1 also a kept-alive connection that sends no next request | hyper's HTTP/1 `header_read_timeout` ([`hyper_util::server::conn::auto::Builder`] with a Tokio timer) for each request head; for a connection's first request, whatever its protocol, a watchdog here |
//! | [request body timeout](ServerConfig::request_body_timeout) | 30 s | a body that stops short of its `Content-Length`, or trickles | [`tower_http::timeout::RequestBodyDeadline`]: the whole body must arrive within it, or reading it fails and the request is refused |
//! | [idle timeout](ServerConfig::idle_timeout) | 60 s | a connection with no request running that neither reads nor writes (an HTTP/2 connection left open, a client that stops reading its response) | a watchdog here: no byte read or written for that long → closed |
//! | [connection cap](ServerConfig::max_connections) | 1024 | more open connections than the process has descriptors | a semaphore taken before `accept`: past the cap, new connections wait in the kernel's backlog, holding no descriptor of this process |
//!
//! Request bodies are also bounded in size by axum's `DefaultBodyLimit` (2 MiB), and a request
//! head by hyper (about 400 KiB, 100 header lines). A handler's own run time is not limited here:
//! cutting a payment off mid-way would not stop its side effect (idem finishes it anyway).
//!
//! On shutdown the server stops accepting, tells every connection to finish its running requests
//! and close ([`hyper_util::server::graceful::GracefulShutdown`]), and returns once they have: the
//! timeouts above bound how long a slow client can delay that.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt as _;
use tower_http::timeout::RequestBodyDeadline;

/// The timeouts and limits of [`serve`]. Every setter states its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct ServerConfig {
    header_read_timeout: Duration,
    request_body_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerConfig {
    /// Default header read timeout: 10 seconds.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default request body timeout: 30 seconds.
    pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default idle timeout: 60 seconds.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default connection cap: 1024 connections open at once.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

    /// The defaults.
    pub const fn new() -> Self {
        Self {
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            request_body_timeout: Self::DEFAULT_REQUEST_BODY_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// How long a client has to send a whole request head: a new connection's first request, of
    /// any protocol, from when it was accepted; every later HTTP/1.1 request from when the
    /// connection starts waiting for it (so it is also how long a kept-alive HTTP/1.1 connection
    /// may stay idle). Past it the connection is closed without an answer. Default: 10 s.
    pub const fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// How long a request's whole body may take to arrive, from when its head was read. Past it
    /// reading the body fails: the request is refused (`400`) and the connection closed. Default:
    /// 30 s.
    pub const fn request_body_timeout(mut self, timeout: Duration) -> Self {
        self.request_body_timeout = timeout;
        self
    }

    /// How long a connection that has served a request and runs none may go without reading or
    /// writing a byte before it is closed. Default: 60 s.
    pub const fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How many connections may be open at once; more wait in the listener's backlog until one
    /// closes. Keep it below the process's descriptor limit (`ulimit -n`) less what else the
    /// process opens. Default: 1024. Zero is raised to 1.
    pub const fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = if max == 0 { 1 } else { max };
        self
    }
}

/// Serves `app` on `listener` with `config`'s timeouts and limits, HTTP/1.1 and HTTP/2 (prior
/// knowledge), until `shutdown` completes; then stops accepting and returns once every open
/// connection has finished its running requests.
///
/// Accept errors never stop the server: a connection that failed before it was accepted is
/// skipped, and any other error (out of descriptors, say) is logged and retried a second later.
pub async fn serve<F>(listener: TcpListener, app: Router, config: ServerConfig, shutdown: F)
where
    F: Future<Output = ()>,
{
    let app = RequestBodyDeadline::new(app, config.request_body_timeout);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, slot) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        tokio::spawn(serve_connection(
            stream,
            slot,
            Arc::clone(&builder),
            app.clone(),
            graceful.watcher(),
            config,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Takes a free slot, then accepts a connection into it.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (TcpStream, OwnedSemaphorePermit) {
    // The slot first: with every slot taken, new connections wait in the kernel's backlog, where
    // they hold no descriptor of this process.
    let slot = Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return (stream, slot),
            // That connection failed before it was accepted; the next one is unaffected.
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                tracing::error!(%error, "cannot accept connections; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, the watchdog finds it idle, or shutdown has let it finish.
async fn serve_connection(
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: RequestBodyDeadline<Router>,
    watcher: Watcher,
    config: ServerConfig,
) {
    // Small responses go out at once rather than waiting for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(TrackedIo {
        stream,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let running = activity.request_started();
            let app = app.clone();
            async move {
                let response: Result<Response<Body>, Infallible> = app.oneshot(request).await;
                drop(running);
                response
            }
        })
    };
    let connection = watcher.watch(builder.serve_connection(io, service));
    tokio::select! {
        served = connection => {
            if let Err(error) = served {
                tracing::debug!(%error, "connection closed with an error");
            }
        }
        () = activity.idle(&config) => {
            tracing::debug!("closing a connection that stayed idle past its timeout");
        }
    }
    drop(slot);
}

/// What the watchdog of one connection knows: when bytes last moved, whether a request is
/// running, whether one ever started.
#[derive(Debug)]
struct Activity {
    accepted: Instant,
    /// When bytes were last read or written, or a request finished: milliseconds after
    /// `accepted`.
    last_active: AtomicU64,
    running: AtomicUsize,
    had_request: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            last_active: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            had_request: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active.fetch_max(elapsed, Ordering::Relaxed);
    }

    fn request_started(self: &Arc<Self>) -> RunningRequest {
        self.had_request.store(true, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningRequest(Arc::clone(self))
    }

    /// When the connection is due to be closed, if nothing moves before then; `None` while a
    /// request runs (the request body timeout and the handler bound that time).
    fn deadline(&self, config: &ServerConfig) -> Option<Instant> {
        if self.running.load(Ordering::Relaxed) > 0 {
            None
        } else if !self.had_request.load(Ordering::Relaxed) {
            // The first request head must arrive in time whatever the protocol: hyper's HTTP/1
            // timer only starts once the protocol is known, and HTTP/2 has none.
            Some(self.accepted + config.header_read_timeout)
        } else {
            let last = Duration::from_millis(self.last_active.load(Ordering::Relaxed));
            Some(self.accepted + last + config.idle_timeout)
        }
    }

    /// Completes once the connection is due to be closed.
    async fn idle(&self, config: &ServerConfig) {
        loop {
            match self.deadline(config) {
                Some(deadline) if deadline <= Instant::now() => return,
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                // Looked at again later; a request that finishes meanwhile counts as activity,
                // so its connection still gets a whole idle timeout after it.
                None => tokio::time::sleep(config.idle_timeout).await,
            }
        }
    }
}

/// A request being served on a connection; its end counts as activity.
struct RunningRequest(Arc<Activity>);

impl Drop for RunningRequest {
    fn drop(&mut self) {
        self.0.touch();
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that records in its [`Activity`] each time bytes are read or written.
struct TrackedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
