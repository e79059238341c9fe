//! Helpers shared by the behaviour tests (`tests/tests/*.rs`): assembling an app
//! ([`idempotent_app`], or [`router_wide_app`] for the router-wide form), building and sending
//! requests in process (at once, on a task of their own, or again while they are in progress) or
//! over raw TCP, reading replies, checking problem documents, bounded waits ([`within`],
//! [`answered_within`], [`wait_until`]), and a [`Ledger`]
//! that counts handler executions and can hold a handler at a gate.
//!
//! ```no_run
//! # async fn demo(app: axum::Router) {
//! use idem_tests::support::{keyed, send};
//!
//! let first = send(&app, keyed("POST", "/orders", "k1", "{}")).await;
//! let again = send(&app, keyed("POST", "/orders", "k1", "{}")).await;
//! assert!(!first.replayed() && again.replayed());
//! assert_eq!(first.body, again.body);
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use idem_runtime::{Idempotency, Policy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How long any single wait in a test may take before it fails: generous, so a loaded 2-core
/// machine never trips it, and still short enough that a hang is reported quickly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The default base of idem's problem `type` URIs.
pub const PROBLEM_BASE: &str = "https://idem.rs/problems/";

/// How often [`wait_until`] looks at its condition again.
const POLL: Duration = Duration::from_millis(2);

/// The pause between the attempts of [`send_until_not_in_progress`].
const RETRY: Duration = Duration::from_millis(25);

/// Awaits `future`, failing the test with `what` if it takes longer than [`PATIENCE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"))
}

/// Awaits `future`, failing the test if it takes `bound` or longer (or hangs past [`PATIENCE`]):
/// for "answered quickly" checks, where the time taken is part of what the test asserts.
pub async fn answered_within<F: Future>(what: &str, bound: Duration, future: F) -> F::Output {
    let started = Instant::now();
    let output = within(what, future).await;
    let took = started.elapsed();
    assert!(took < bound, "{what} took {took:?}, more than {bound:?}");
    output
}

/// Looks at `condition` every few milliseconds until it holds, failing the test with `what` (what
/// the test waits for) if that takes longer than `bound`. For state the test cannot await, such as
/// a counter or a record in Redis.
pub async fn wait_until(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as UTF-8 text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("the body is UTF-8")
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("the body is not JSON ({error}): {:?}", self.body))
    }

    /// One header as text, if present.
    pub fn header(&self, name: impl http::header::AsHeaderName) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("the header is visible ASCII"))
    }

    /// Whether the reply carries `Idempotent-Replayed: true`.
    pub fn replayed(&self) -> bool {
        match self.header("idempotent-replayed") {
            None => false,
            Some("true") => true,
            Some(other) => panic!("unexpected Idempotent-Replayed value {other:?}"),
        }
    }

    /// Asserts that this reply is idem's RFC 9457 problem `slug` (under the default base) with
    /// `status`: the media type, `Cache-Control: no-store`, the `status` member equal to the HTTP
    /// status, an absolute `type` URI, a `title` and a `detail`. Returns the document.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, slug: &str) -> serde_json::Value {
        self.assert_problem_under(PROBLEM_BASE, status, slug)
    }

    /// [`Reply::assert_problem`] for a configured problem base.
    #[track_caller]
    pub fn assert_problem_under(&self, base: &str, status: u16, slug: &str) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected a {status} `{slug}` problem, got {} with body {:?}",
            self.status,
            self.body
        );
        assert_eq!(
            self.header(header::CONTENT_TYPE),
            Some("application/problem+json"),
            "problem media type"
        );
        assert_eq!(
            self.header(header::CACHE_CONTROL),
            Some("no-store"),
            "problems are never cached"
        );
        assert!(
            !self.replayed(),
            "idem's own problems are never marked replayed"
        );
        let document = self.json();
        assert_eq!(document["type"], format!("{base}{slug}"), "{document}");
        let type_uri = document["type"].as_str().unwrap_or_default();
        assert!(
            type_uri.starts_with("https://") || type_uri.starts_with("http://"),
            "`type` must be an absolute URI: {type_uri}"
        );
        assert_eq!(document["status"], status, "`status` member: {document}");
        assert!(
            document["title"].as_str().is_some_and(|t| !t.is_empty()),
            "`title`: {document}"
        );
        assert!(
            document["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "`detail`: {document}"
        );
        document
    }

    /// The `Retry-After` header as whole seconds; fails the test when it is absent or malformed.
    #[track_caller]
    pub fn retry_after(&self) -> u64 {
        let value = self
            .header(header::RETRY_AFTER)
            .unwrap_or_else(|| panic!("no Retry-After on {} {:?}", self.status, self.body));
        value
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After is not delta-seconds: {value:?}"))
    }
}

/// Sends `request` through `app` in process (`tower::ServiceExt::oneshot`) and reads the reply.
pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = within("a response", app.clone().oneshot(request))
        .await
        .expect("routers are infallible");
    let (parts, body) = response.into_parts();
    let body = within("the response body", body.collect())
        .await
        .expect("the response body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The sending of `request` through `app` as a future of its own (holding a clone of `app`), to
/// spawn: `JoinSet::spawn(sending(…))`, or see [`spawn_send`].
pub fn sending(app: &Router, request: Request<Body>) -> impl Future<Output = Reply> + Send + use<> {
    let app = app.clone();
    async move { send(&app, request).await }
}

/// [`send`] on a task of its own, so that the test can act while the request runs (and await,
/// abort or drop it).
pub fn spawn_send(app: &Router, request: Request<Body>) -> JoinHandle<Reply> {
    tokio::spawn(sending(app, request))
}

/// [`spawn_send`], then waits until the handler execution the request starts is counted by
/// `ledger` (the next one after those already counted): with a gated ledger, the request is then
/// held at the gate, in flight, until [`Ledger::open`].
pub async fn start_send(
    app: &Router,
    ledger: &Ledger,
    request: Request<Body>,
) -> JoinHandle<Reply> {
    let next = ledger.runs() + 1;
    let task = spawn_send(app, request);
    ledger.wait_started(next).await;
    task
}

/// Sends `request()` through `app` again and again (every 25 ms) while the answer is `409
/// request-in-progress`, failing the test if that lasts longer than `budget` (a key stuck beyond
/// its lease). Returns the first other answer and how many 409s came before it.
pub async fn send_until_not_in_progress(
    app: &Router,
    request: impl Fn() -> Request<Body>,
    budget: Duration,
) -> (Reply, usize) {
    let since = Instant::now();
    let mut conflicts = 0;
    loop {
        let request = request();
        let key = request.headers().get(IDEMPOTENCY_KEY).cloned();
        let reply = send(app, request).await;
        if reply.status != StatusCode::CONFLICT {
            return (reply, conflicts);
        }
        reply.assert_problem(409, "request-in-progress");
        conflicts += 1;
        assert!(
            since.elapsed() < budget,
            "key {key:?} still in progress after {budget:?}: stuck beyond its lease"
        );
        tokio::time::sleep(RETRY).await;
    }
}

/// `routes` given their `state`, behind `idem`'s layer: how the tests assemble an app.
pub fn idempotent_app<S>(idem: &Idempotency, routes: Router<S>, state: S) -> Router
where
    S: Clone + Send + Sync + 'static,
{
    routes.with_state(state).layer(idem.layer())
}

/// `routes` given their `state`, behind `idem`'s layer carrying `policy`: every route the policy
/// covers is idempotent without the attribute (the router-wide form).
pub fn router_wide_app<S>(idem: &Idempotency, policy: Policy, routes: Router<S>, state: S) -> Router
where
    S: Clone + Send + Sync + 'static,
{
    routes.with_state(state).layer(idem.layer().policy(policy))
}

/// A request with `method`, `uri`, an `Idempotency-Key` (used verbatim as the header value) and
/// a body.
pub fn keyed(method: &str, uri: &str, key: &str, body: impl Into<Body>) -> Request<Body> {
    request(method, uri)
        .header(IDEMPOTENCY_KEY, key)
        .body(body.into())
        .expect("a valid request")
}

/// A request without an `Idempotency-Key`.
pub fn unkeyed(method: &str, uri: &str, body: impl Into<Body>) -> Request<Body> {
    request(method, uri)
        .body(body.into())
        .expect("a valid request")
}

/// A request builder for `method` and `uri`, to add headers to.
pub fn request(method: &str, uri: &str) -> http::request::Builder {
    Request::builder().method(method).uri(uri)
}

/// Counts a handler's executions, and can hold them at a gate until the test opens it.
///
/// A handler calls [`Ledger::run`] (or [`Ledger::start`], [`Ledger::pass_gate`] and
/// [`Ledger::finish`] separately); the test waits for [`Ledger::wait_started`] /
/// [`Ledger::wait_finished`] instead of sleeping.
#[derive(Clone, Debug)]
pub struct Ledger(Arc<LedgerState>);

#[derive(Debug)]
struct LedgerState {
    started: watch::Sender<usize>,
    finished: watch::Sender<usize>,
    gate_open: watch::Sender<bool>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// A ledger whose gate is open: handlers run straight through.
    pub fn new() -> Self {
        Self(Arc::new(LedgerState {
            started: watch::Sender::new(0),
            finished: watch::Sender::new(0),
            gate_open: watch::Sender::new(true),
        }))
    }

    /// A ledger whose gate is closed: handlers wait in [`Ledger::pass_gate`] until [`Ledger::open`].
    pub fn gated() -> Self {
        let ledger = Self::new();
        ledger.0.gate_open.send_replace(false);
        ledger
    }

    /// Records that an execution started; returns its number (1 for the first).
    pub fn start(&self) -> usize {
        let mut number = 0;
        self.0.started.send_modify(|started| {
            *started += 1;
            number = *started;
        });
        number
    }

    /// Waits until the gate is open.
    pub async fn pass_gate(&self) {
        let mut open = self.0.gate_open.subscribe();
        open.wait_for(|open| *open)
            .await
            .expect("the ledger owns the sender");
    }

    /// Records that an execution finished.
    pub fn finish(&self) {
        self.0.finished.send_modify(|finished| *finished += 1);
    }

    /// [`start`](Ledger::start), [`pass_gate`](Ledger::pass_gate), [`finish`](Ledger::finish):
    /// one whole execution. Returns its number.
    pub async fn run(&self) -> usize {
        let number = self.start();
        self.pass_gate().await;
        self.finish();
        number
    }

    /// Opens the gate: every held handler continues.
    pub fn open(&self) {
        self.0.gate_open.send_replace(true);
    }

    /// How many executions started.
    pub fn runs(&self) -> usize {
        *self.0.started.borrow()
    }

    /// How many executions finished.
    pub fn finished(&self) -> usize {
        *self.0.finished.borrow()
    }

    /// Waits until at least `n` executions started.
    pub async fn wait_started(&self, n: usize) {
        Self::wait_count(&self.0.started, n, "start").await;
    }

    /// Waits until at least `n` executions finished.
    pub async fn wait_finished(&self, n: usize) {
        Self::wait_count(&self.0.finished, n, "finish").await;
    }

    async fn wait_count(count: &watch::Sender<usize>, n: usize, event: &str) {
        let mut count = count.subscribe();
        within(
            &format!("{n} handler execution(s) to {event}"),
            count.wait_for(|count| *count >= n),
        )
        .await
        .expect("the ledger owns the sender");
    }
}

/// Waits until `idem` has no handler running (every result recorded or released).
pub async fn wait_idle(idem: &Idempotency) {
    wait_until("the running handlers to drain", PATIENCE, || {
        idem.running() == 0
    })
    .await;
}

/// A real HTTP/1.1 server on `127.0.0.1:0`, stopped gracefully by [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `app` with `axum::serve` on an ephemeral loopback port.
    pub async fn start(app: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("axum::serve");
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Stops accepting, waits for open connections to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("the server to stop", &mut self.task)
            .await
            .expect("the server task");
    }
}

/// The bytes of an HTTP/1.1 request with `Connection: close` and a `Content-Length`.
pub fn http1_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        raw.extend([*name, ": ", *value, "\r\n"]);
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// Opens a connection to `addr` and writes `raw` (a whole request) without reading the answer.
pub async fn connect_and_write(addr: SocketAddr, raw: &[u8]) -> TcpStream {
    let mut stream = within("connecting", TcpStream::connect(addr))
        .await
        .expect("connect");
    within("writing the request", stream.write_all(raw))
        .await
        .expect("write the request");
    stream
}

/// A client that hangs up mid-handler: writes `raw` (a whole request) to `addr`, waits until
/// `ledger` counts the execution it starts, closes the connection, and gives the server 200 ms to
/// notice and drop the request's future. What is left of the handler then runs on a task of its
/// own, and must live on: the test checks that next.
pub async fn hang_up_once_started(addr: SocketAddr, ledger: &Ledger, raw: &[u8]) {
    let next = ledger.runs() + 1;
    let client = connect_and_write(addr, raw).await;
    ledger.wait_started(next).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Sends `raw` on a fresh connection and reads the response until the server closes it.
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut stream = connect_and_write(addr, raw).await;
    let mut received = Vec::new();
    within("the response", stream.read_to_end(&mut received))
        .await
        .expect("read the response");
    parse_http1_response(&received)
}

/// Parses a whole HTTP/1.1 response (`Content-Length`, chunked, or delimited by the close).
pub fn parse_http1_response(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).expect("an ASCII response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("bad header line {line:?}"));
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).expect("a header name"),
            HeaderValue::from_str(value.trim()).expect("a header value"),
        );
    }
    let rest = &raw[split + 4..];
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let body = if chunked {
        decode_chunked(rest)
    } else if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length: usize = length
            .to_str()
            .ok()
            .and_then(|l| l.parse().ok())
            .expect("length");
        assert!(rest.len() >= length, "truncated body");
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body: Bytes::from(body),
    }
}

fn decode_chunked(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .expect("a chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("ASCII chunk size");
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).expect("a hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// The bytes of an HTTP/1.1 `POST`-style request whose header lines are raw bytes, for input no
/// `&str` can carry (obs-text, bare CR or LF, NUL). Adds `host`, `connection: close` and a
/// `content-length` matching `body`; each of `lines` is one whole line without its CRLF.
pub fn http1_request_bytes(method: &str, path: &str, lines: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for line in lines {
        raw.extend_from_slice(line);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(body);
    raw
}
