//! The runtime handle, its builder, and per-route settings.
//!
//! ```
//! use std::time::Duration;
//! use idem_runtime::{Idempotency, store::MemoryStore};
//!
//! let idem = Idempotency::builder()
//!     .store(MemoryStore::new(128 << 20))
//!     .lease(Duration::from_secs(10))
//!     .max_response_bytes(256 << 10)
//!     .build();
//! let app: axum::Router = axum::Router::new()
//!     // .route("/payments", axum::routing::post(create_payment))
//!     .layer(idem.layer());
//! # drop(app);
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::Response;
use http::HeaderName;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TrackedFuture;

use crate::key::IDEMPOTENCY_KEY;
use crate::operator::Operator;
use crate::outage::OutageLog;
use crate::problem::{self, JsonProblems, Problem, RenderProblem};
use crate::record::DEFAULT_REPLAYED_HEADERS;
use crate::store::{MemoryStore, Store};

/// The idem runtime: the store, the defaults and the running handlers. Cheap to clone.
///
/// Build one with [`Idempotency::builder`], attach it to the router with
/// [`Idempotency::layer`], and after the server stops call [`Idempotency::shutdown`] so handlers
/// still running finish and record their results.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Runtime>,
}

/// What an [`Idempotency`] handle shares: the configuration and the running handlers.
struct Runtime {
    store: Arc<dyn Store>,
    lease: Duration,
    max_run_time: Duration,
    max_response_bytes: usize,
    replayed_headers: Vec<HeaderName>,
    problems: Box<dyn RenderProblem>,
    tasks: TaskTracker,
    fail_open: bool,
    key_header: HeaderName,
    request_id_header: Option<HeaderName>,
    max_detached: usize,
    /// Attempts running in a task of their own because their request was dropped.
    detached: AtomicUsize,
    outage: OutageLog,
}

impl Idempotency {
    /// Starts a builder with the documented defaults.
    pub fn builder() -> IdempotencyBuilder {
        IdempotencyBuilder::default()
    }

    /// The configured store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// An operator's view of single keys through this runtime's store: inspect one, purge it,
    /// release it from an owner that died. See [`crate::operator`].
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::{Idempotency, scope};
    ///
    /// let idem = Idempotency::builder().build();
    /// assert!(idem.operator().inspect(&scope("alice"), "order-42", false).await?.is_none());
    /// # Ok::<(), idem_runtime::operator::OperatorError>(())
    /// # }).unwrap();
    /// ```
    pub fn operator(&self) -> Operator {
        Operator::new(Arc::clone(&self.inner.store))
    }

    /// Handlers currently running (including ones whose client went away).
    pub fn running(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Handlers currently running whose request was dropped (the client went away, or the server
    /// timed the request out), bounded by [`IdempotencyBuilder::max_detached`].
    pub fn detached(&self) -> usize {
        self.inner.detached.load(Ordering::Acquire)
    }

    /// Waits until every running handler has finished and its result was recorded. Call it after
    /// the server has stopped accepting requests (after `axum::serve(…).with_graceful_shutdown(…)`
    /// returns): handlers keep running when their client disconnects, and this is how a process
    /// lets them finish before it exits.
    pub async fn shutdown(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.tasks.reopen();
    }

    /// Renders a problem with the configured renderer, adding the standard headers. Every problem
    /// the runtime answers with goes through here.
    pub fn problem_response(&self, problem: &Problem) -> Response {
        problem::render(self.inner.problems.as_ref(), problem)
    }

    /// The in-flight lease of `route`: its own, else the runtime's.
    pub(crate) fn lease_for(&self, route: &RouteConfig) -> Duration {
        route.lease.unwrap_or(self.inner.lease)
    }

    /// How long one execution keeps renewing its lease.
    pub(crate) fn max_run_time(&self) -> Duration {
        self.inner.max_run_time
    }

    /// The largest response body recorded for replay.
    pub(crate) fn max_response_bytes(&self) -> usize {
        self.inner.max_response_bytes
    }

    /// The response headers recorded and replayed.
    pub(crate) fn replayed_headers(&self) -> &[HeaderName] {
        &self.inner.replayed_headers
    }

    /// The request header that carries the key.
    pub(crate) fn key_header(&self) -> &HeaderName {
        &self.inner.key_header
    }

    /// The request header whose value is recorded with a result and sent back on its replays as
    /// `Original-Request`.
    pub(crate) fn request_id_header(&self) -> Option<&HeaderName> {
        self.inner.request_id_header.as_ref()
    }

    /// Whether a handler runs unprotected when the store cannot be reached.
    pub(crate) fn fails_open(&self) -> bool {
        self.inner.fail_open
    }

    /// Tracks `future` as a running handler: [`Idempotency::running`] counts it and
    /// [`Idempotency::shutdown`] waits for it.
    pub(crate) fn track<F: Future>(&self, future: F) -> TrackedFuture<F> {
        self.inner.tasks.track_future(future)
    }

    /// Whether as many handlers run detached from their requests as the runtime allows: new
    /// executions are then refused.
    pub(crate) fn detached_at_bound(&self) -> bool {
        self.detached() >= self.inner.max_detached
    }

    /// Counts an attempt that goes on in a task of its own until the guard is dropped.
    pub(crate) fn detach(&self) -> Detached {
        self.inner.detached.fetch_add(1, Ordering::AcqRel);
        Detached(self.clone())
    }

    /// Where store failures are logged without a line per request.
    pub(crate) fn outage(&self) -> &OutageLog {
        &self.inner.outage
    }

    /// Runs `future` in a task of its own that [`Idempotency::shutdown`] waits for.
    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.inner.tasks.spawn(future));
    }
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("lease", &self.inner.lease)
            .field("max_run_time", &self.inner.max_run_time)
            .field("max_response_bytes", &self.inner.max_response_bytes)
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

/// One attempt running detached from its request; see [`Idempotency::detach`].
pub(crate) struct Detached(Idempotency);

impl Drop for Detached {
    fn drop(&mut self) {
        self.0.inner.detached.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Builds an [`Idempotency`] runtime. Every setter states its default.
#[must_use]
pub struct IdempotencyBuilder {
    store: Option<Arc<dyn Store>>,
    lease: Duration,
    max_run_time: Duration,
    max_response_bytes: usize,
    replayed_headers: Vec<HeaderName>,
    problems: Option<Box<dyn RenderProblem>>,
    problem_base: Option<String>,
    fail_open: bool,
    key_header: HeaderName,
    request_id_header: Option<HeaderName>,
    max_detached: usize,
}

impl Default for IdempotencyBuilder {
    fn default() -> Self {
        Self {
            store: None,
            lease: Self::DEFAULT_LEASE,
            max_run_time: Self::DEFAULT_MAX_RUN_TIME,
            max_response_bytes: Self::DEFAULT_MAX_RESPONSE_BYTES,
            replayed_headers: DEFAULT_REPLAYED_HEADERS.to_vec(),
            problems: None,
            problem_base: None,
            fail_open: false,
            key_header: IDEMPOTENCY_KEY.clone(),
            request_id_header: None,
            max_detached: Self::DEFAULT_MAX_DETACHED,
        }
    }
}

impl IdempotencyBuilder {
    /// Default in-flight lease: 30 seconds.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// Default cap on how long a lease is renewed for one execution: 5 minutes.
    pub const DEFAULT_MAX_RUN_TIME: Duration = Duration::from_mins(5);
    /// Default largest recorded response body: 1 MiB.
    pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;
    /// Default bound on handlers running detached from their requests: 1024.
    pub const DEFAULT_MAX_DETACHED: usize = 1024;

    /// The record store. Default: a [`MemoryStore`] of [`MemoryStore::DEFAULT_CAPACITY_BYTES`]
    /// (single instance only).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store already behind an `Arc` (for sharing one store between runtimes).
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The in-flight lease: how long a crashed or stalled attempt blocks its key before a retry
    /// may take over. Renewed every third of its length while the handler runs. Routes override it
    /// with `#[idempotent(lease = "…")]`. Default: 30 s. Zero is raised to 1 ms.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// How long one execution keeps renewing its lease. A handler running longer loses its lease
    /// (a retry may then take over, with a higher epoch) and its late result is not recorded.
    /// Default: 5 minutes.
    pub fn max_run_time(mut self, max: Duration) -> Self {
        self.max_run_time = max;
        self
    }

    /// The largest response body recorded for replay. Larger responses still reach the first
    /// client whole; duplicates get `409 result-unavailable` (with `Retry-After` set to when the
    /// record expires). Default: 1 MiB.
    pub fn max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// Records and replays this response header too. Default allow-list:
    /// [`DEFAULT_REPLAYED_HEADERS`]. Credentials, cookies and hop-by-hop headers are never
    /// recorded.
    pub fn replay_header(mut self, name: HeaderName) -> Self {
        if !self.replayed_headers.contains(&name) {
            self.replayed_headers.push(name);
        }
        self
    }

    /// The base of problem `type` URIs. Default: [`problem::DEFAULT_PROBLEM_BASE`].
    pub fn problem_base(mut self, base: impl Into<String>) -> Self {
        self.problem_base = Some(base.into());
        self
    }

    /// Replaces how problem responses are rendered. Default: RFC 9457 JSON ([`JsonProblems`]).
    pub fn problem_renderer(mut self, renderer: impl RenderProblem) -> Self {
        self.problems = Some(Box::new(renderer));
        self
    }

    /// What happens when the store cannot be reached before a handler runs. `false` (the default)
    /// fails closed: `503 store-unavailable`, the handler does not run. `true` fails open: the
    /// handler runs **without idempotency** (a retry may run it again), the response carries
    /// `Idempotent-Unprotected: true`, and a warning is logged. Only for routes where a duplicate
    /// is cheaper than an outage.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// The request header that carries the key, for clients that send another name (some APIs
    /// use `X-Idempotency-Key`). Both forms, the attribute and the router-wide layer, read it.
    /// Default: `Idempotency-Key`.
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.key_header = name;
        self
    }

    /// A request header (for example `X-Request-Id`) whose value is recorded with each result and
    /// sent back on its replays as `Original-Request: <value>`, so that a replay can be traced to
    /// the request that produced it. The first response does not carry it. Default: none.
    pub fn request_id_header(mut self, name: HeaderName) -> Self {
        self.request_id_header = Some(name);
        self
    }

    /// The most handlers that may run detached from their requests at once.
    ///
    /// A handler whose client goes away (or whose request the server times out) is not cancelled:
    /// it runs to the end in a task of its own and records its result, so the client's retry gets
    /// it. Clients that send a request and close at once could otherwise start handlers without
    /// bound. While this many run detached, requests that would start a new handler are refused
    /// with `503 too-many-detached-handlers` and `Retry-After: 1` before the store is asked (no
    /// record is written); replays answered from process memory are still served, and no handler
    /// already running is ever cancelled, so no result being produced is lost. Default: 1024.
    pub fn max_detached(mut self, max: usize) -> Self {
        self.max_detached = max;
        self
    }

    /// Builds the runtime.
    pub fn build(self) -> Idempotency {
        let problems = self.problems.unwrap_or_else(|| {
            Box::new(
                self.problem_base
                    .map_or_else(JsonProblems::default, JsonProblems::new),
            )
        });
        Idempotency {
            inner: Arc::new(Runtime {
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryStore::default())),
                lease: self.lease,
                max_run_time: self.max_run_time,
                max_response_bytes: self.max_response_bytes,
                replayed_headers: self.replayed_headers,
                problems,
                tasks: TaskTracker::new(),
                fail_open: self.fail_open,
                key_header: self.key_header,
                request_id_header: self.request_id_header,
                max_detached: self.max_detached,
                detached: AtomicUsize::new(0),
                outage: OutageLog::default(),
            }),
        }
    }
}

/// Which handler responses are recorded and replayed. Responses that are not recorded release the
/// key, so a retry runs the handler again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StorePolicy {
    /// Every status below 500 except the transient `408`, `425` and `429` (the default,
    /// `store = "non-5xx"`): deterministic client errors such as a declined payment are replayed,
    /// server errors are retried.
    #[default]
    NonServerError,
    /// Only `2xx` (`store = "2xx"`).
    Success,
    /// Every status, `5xx` included, as Stripe does (`store = "all"`).
    All,
}

impl StorePolicy {
    /// Whether a response with `status` is recorded.
    pub fn records(self, status: http::StatusCode) -> bool {
        match self {
            Self::All => true,
            Self::Success => status.is_success(),
            Self::NonServerError => {
                !status.is_server_error() && !matches!(status.as_u16(), 408 | 425 | 429)
            }
        }
    }
}

/// The settings of one route as the executor holds them: the macro's `static`, or the copy a
/// router-wide policy shares between its requests.
#[derive(Debug, Clone)]
pub(crate) enum RouteRef {
    Static(&'static RouteConfig),
    Shared(Arc<RouteConfig>),
}

impl std::ops::Deref for RouteRef {
    type Target = RouteConfig;

    fn deref(&self) -> &RouteConfig {
        match self {
            Self::Static(route) => route,
            Self::Shared(route) => route,
        }
    }
}

/// The settings of one `#[idempotent]` route, built at compile time by the macro.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct RouteConfig {
    pub(crate) handler: &'static str,
    pub(crate) required: bool,
    pub(crate) ttl: Duration,
    pub(crate) lease: Option<Duration>,
    pub(crate) wait: Option<Duration>,
    pub(crate) store: StorePolicy,
    pub(crate) store_body: bool,
    pub(crate) report_only: bool,
}

impl RouteConfig {
    /// Default retention of completed records: 24 hours.
    pub const DEFAULT_TTL: Duration = Duration::from_hours(24);

    /// Defaults for the handler named `handler`: key optional, ttl 24 h, the runtime's lease,
    /// 409 at once on a concurrent duplicate, [`StorePolicy::NonServerError`], bodies recorded.
    pub const fn new(handler: &'static str) -> Self {
        Self {
            handler,
            required: false,
            ttl: Self::DEFAULT_TTL,
            lease: None,
            wait: None,
            store: StorePolicy::NonServerError,
            store_body: true,
            report_only: false,
        }
    }

    /// Whether a request without a key is rejected (`400 idempotency-key-missing`).
    pub const fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// How long a completed record is kept and replayed.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The in-flight lease for this route (overrides the runtime's).
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// A concurrent duplicate waits up to `wait` for the first result instead of `409` at once.
    pub const fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Which responses are recorded.
    pub const fn store(mut self, policy: StorePolicy) -> Self {
        self.store = policy;
        self
    }

    /// `false` records status and headers only: replays carry an empty body.
    pub const fn store_body(mut self, store_body: bool) -> Self {
        self.store_body = store_body;
        self
    }

    /// `true` runs every request and never changes a response: idem still records results and
    /// logs what it would have done (replay, `409`, `422`, `400`), for rolling it out on live
    /// traffic before enforcing it.
    pub const fn report_only(mut self, report_only: bool) -> Self {
        self.report_only = report_only;
        self
    }

    /// The handler's name, as traced.
    pub const fn handler(&self) -> &'static str {
        self.handler
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    #[test]
    fn store_policies() {
        let cases = [
            (200, true, true, true),
            (201, true, true, true),
            (302, true, false, true),
            (402, true, false, true),
            (422, true, false, true),
            (408, false, false, true),
            (429, false, false, true),
            (500, false, false, true),
            (503, false, false, true),
        ];
        for (status, non_5xx, success, all) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                StorePolicy::NonServerError.records(status),
                non_5xx,
                "{status}"
            );
            assert_eq!(StorePolicy::Success.records(status), success, "{status}");
            assert_eq!(StorePolicy::All.records(status), all, "{status}");
        }
    }
}
