//! The router-wide form (DESIGN.md section 9) on the embedded store: a [`Policy`] on idem's layer
//! makes every route it covers idempotent, and such a route behaves on the wire exactly like an
//! `#[idempotent]` one (section 4, `wire.rs` and `concurrency.rs`): the same problems, replays,
//! leases and records. Also what only the layer has: scopes from the request's parts, exempt
//! routes, the attribute overriding the policy (the layer's claim adopted or given back), nested
//! routers with policies of their own, the configurable key header, `Original-Request`,
//! `testing::FreshKeys`, and policy validation.
//!
//! The same behaviours over a real Redis are in `router_wide_redis.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::routing::post;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use idem_runtime::layer::PolicyError;
use idem_runtime::store::{
    AcquireRequest, Acquired, Cached, CompleteRequest, ReleaseRequest, RenewRequest, StoreFuture,
};
use idem_runtime::testing::FreshKeys;
use idem_runtime::{
    Idempotency, IdempotencyBuilder, IdempotencyContext, MemoryStore, Policy, Store, StorePolicy,
    idempotent,
};
use idem_tests::support::{
    IDEMPOTENCY_KEY, Ledger, PATIENCE, Reply, Server, hang_up_once_started, http1_request, keyed,
    raw_exchange, request, router_wide_app, send, send_until_not_in_progress, sending, start_send,
    unkeyed, wait_idle, wait_until, within,
};
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------------
// Handlers (none carries `#[idempotent]` unless its name says so) and fixtures
// ---------------------------------------------------------------------------------------------

/// `201` with the body's text tagged with the execution number (a replay shows an old number), a
/// `Location` naming the execution, and headers that must never be replayed.
async fn create(State(ledger): State<Ledger>, body: String) -> (StatusCode, HeaderMap, String) {
    let run = ledger.run().await;
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, HeaderValue::from(run));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.order+json"),
    );
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_static("session=s3cr3t"),
    );
    headers.insert("x-ratelimit-remaining", HeaderValue::from_static("99"));
    (StatusCode::CREATED, headers, format!("run {run}: {body}"))
}

/// [`create`] for routes with path parameters: answers with the last one.
async fn item(
    State(ledger): State<Ledger>,
    Path(params): Path<Vec<(String, String)>>,
    body: String,
) -> String {
    let run = ledger.run().await;
    let id = params.last().map(|(_, id)| id.as_str()).unwrap_or_default();
    format!("run {run}: {id} {body}")
}

/// Answers with the status given in the body.
async fn echo_status(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    let status = StatusCode::from_u16(body.parse().expect("a status in the body")).unwrap();
    (status, format!("run {run}: {status}"))
}

/// Panics on its first execution.
async fn panics_first(State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.run().await;
    assert!(
        run != 1,
        "the first execution panics (expected by the test)"
    );
    format!("run {run}: {body}")
}

/// 10 KiB, the first byte the execution number.
async fn large(State(ledger): State<Ledger>, _body: String) -> Vec<u8> {
    let run = ledger.run().await;
    let mut body = vec![b'x'; 10 * 1024];
    body[0] = b'0' + u8::try_from(run).unwrap();
    body
}

/// 10 KiB streamed in 1 KiB chunks.
async fn large_stream(State(ledger): State<Ledger>, _body: String) -> Body {
    ledger.run().await;
    let chunks = (0..10).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1024]));
    Body::from_stream(futures_util::stream::iter(chunks))
}

/// A one-time secret that must not be stored.
async fn secret(
    State(ledger): State<Ledger>,
    _body: String,
) -> (StatusCode, [(HeaderName, &'static str); 2], String) {
    let run = ledger.run().await;
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, "/secrets/1"),
            (header::CONTENT_TYPE, "application/json"),
        ],
        format!("{{\"token\":\"one-time-{run}\"}}"),
    )
}

/// Authentication in a parts extractor: `x-user: <id>`, else `401`.
struct AuthUser(String);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .headers
            .get("x-user")
            .and_then(|value| value.to_str().ok())
            .map(|user| Self(user.to_owned()))
            .ok_or((StatusCode::UNAUTHORIZED, "who are you?"))
    }
}

/// [`create`] for an authenticated user.
async fn create_as(
    AuthUser(user): AuthUser,
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {user} {body}"))
}

/// The attribute's own settings: key required, records kept 1 s, keys scoped by the user.
#[idempotent(required = true, ttl = "1s", scope = user)]
async fn attributed_account(
    AuthUser(user): AuthUser,
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {user} {body}"))
}

/// The attribute with the key optional, scoped by the user.
#[idempotent(scope = user)]
async fn attributed_optional(
    AuthUser(user): AuthUser,
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {user} {body}"))
}

/// The attribute with a required key, unscoped.
#[idempotent(required = true)]
async fn attributed_create(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

/// The routes most tests use, none of them attributed.
fn routes() -> Router<Ledger> {
    Router::new()
        .route(
            "/orders",
            post(create).patch(create).put(create).get(create),
        )
        .route("/items/{id}", post(item))
        .route("/status", post(echo_status))
        .route("/panics", post(panics_first))
        .route("/large", post(large))
        .route("/large-stream", post(large_stream))
        .route("/secrets", post(secret))
}

/// A router behind a policy, with its own ledger and in-memory store (kept to inspect).
struct Fixture {
    app: Router,
    ledger: Ledger,
    idem: Idempotency,
    store: MemoryStore,
}

impl Fixture {
    /// [`routes`] behind `policy`, on a default runtime.
    fn new(policy: Policy) -> Self {
        Self::with(Idempotency::builder(), policy, routes(), Ledger::new())
    }

    /// `routes` behind `policy`, on `runtime` over a fresh store, the handlers counted by `ledger`.
    fn with(
        runtime: IdempotencyBuilder,
        policy: Policy,
        routes: Router<Ledger>,
        ledger: Ledger,
    ) -> Self {
        let store = MemoryStore::new(1 << 20);
        let idem = runtime.store(store.clone()).build();
        let app = router_wide_app(&idem, policy, routes, ledger.clone());
        Self {
            app,
            ledger,
            idem,
            store,
        }
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        send(&self.app, request).await
    }

    /// Records in the store, completed, released or in flight.
    fn records(&self) -> u64 {
        self.store.len()
    }
}

/// `POST uri` as `user` (`x-user`), with `key` unless `None`, and `body`.
fn as_user(uri: &str, user: Option<&str>, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = request("POST", uri);
    if let Some(user) = user {
        builder = builder.header("x-user", user);
    }
    if let Some(key) = key {
        builder = builder.header(IDEMPOTENCY_KEY, key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

/// Sends `request`, failing at once (rather than at the gate's timeout) if it starts another
/// execution beyond the `runs` already counted by `ledger`.
async fn send_expecting_no_run(app: &Router, request: Request<Body>, ledger: &Ledger) -> Reply {
    let runs = ledger.runs();
    tokio::select! {
        reply = send(app, request) => reply,
        () = ledger.wait_started(runs + 1) => {
            panic!("a duplicate ran beside the first attempt (execution {})", runs + 1)
        }
    }
}

/// Store calls by kind, as [`Counting`] saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Calls {
    acquire: usize,
    renew: usize,
    complete: usize,
    release: usize,
}

impl Calls {
    fn round_trips(self) -> usize {
        self.acquire + self.renew + self.complete + self.release
    }
}

/// A [`MemoryStore`] that counts the calls that would be round trips to a remote store. Answers
/// from process memory ([`Store::cached`]) are passed through and not counted.
#[derive(Clone, Default)]
struct Counting {
    inner: MemoryStore,
    calls: Arc<Mutex<Calls>>,
}

impl Counting {
    fn calls(&self) -> Calls {
        *self.calls.lock().unwrap()
    }

    fn count(&self, call: impl FnOnce(&mut Calls)) {
        call(&mut self.calls.lock().unwrap());
    }
}

impl Store for Counting {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        self.count(|calls| calls.acquire += 1);
        self.inner.acquire(request)
    }

    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        self.count(|calls| calls.renew += 1);
        self.inner.renew(request)
    }

    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        self.count(|calls| calls.complete += 1);
        self.inner.complete(request)
    }

    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        self.count(|calls| calls.release += 1);
        self.inner.release(request)
    }

    fn cached(
        &self,
        key: &idem_runtime::fingerprint::RecordKey,
        fingerprint: &idem_runtime::fingerprint::Fingerprint,
    ) -> Option<Cached> {
        self.inner.cached(key, fingerprint)
    }
}

// ---------------------------------------------------------------------------------------------
// The wire behaviour of a router-wide route
// ---------------------------------------------------------------------------------------------

/// A keyed request runs once and is recorded; its replays repeat the status and body byte for
/// byte, with `Idempotent-Replayed: true` and the allow-listed headers (`Location`,
/// `Content-Type`), never a cookie or a per-request header; another key is another record.
#[tokio::test]
async fn the_first_request_runs_once_and_replays_are_byte_identical() {
    let fx = Fixture::new(Policy::new());
    let first = fx.send(keyed("POST", "/orders", "k1", "{\"a\":1}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: {\"a\":1}");
    assert!(!first.replayed(), "a first execution is not a replay");
    assert_eq!(first.header(header::SET_COOKIE), Some("session=s3cr3t"));
    assert_eq!(fx.records(), 1);

    for _ in 0..3 {
        let replay = fx.send(keyed("POST", "/orders", "k1", "{\"a\":1}")).await;
        assert!(replay.replayed());
        assert_eq!(replay.status, first.status);
        assert_eq!(replay.body, first.body, "byte-identical body");
        assert_eq!(replay.header(header::LOCATION), Some("1"));
        assert_eq!(
            replay.header(header::CONTENT_TYPE),
            Some("application/vnd.order+json")
        );
        for dropped in [header::SET_COOKIE.as_str(), "x-ratelimit-remaining"] {
            assert_eq!(
                replay.header(dropped),
                None,
                "`{dropped}` is never replayed"
            );
        }
    }
    assert_eq!(fx.ledger.runs(), 1);

    let other = fx.send(keyed("POST", "/orders", "k2", "{\"a\":1}")).await;
    assert_eq!(other.text(), "run 2: {\"a\":1}");
    assert!(!other.replayed());
    assert_eq!(fx.records(), 2);
}

/// The fingerprint covers method, route, path, query and body: a key reused for a request that
/// differs in any of them is `422 idempotency-key-reused` and runs nothing, and the original
/// request still replays.
#[tokio::test]
async fn the_same_key_on_a_different_request_is_a_422() {
    let fx = Fixture::new(Policy::new());
    let first = fx.send(keyed("POST", "/items/1?x=1", "k", "body")).await;
    assert_eq!(first.text(), "run 1: 1 body");
    let different = [
        ("body", keyed("POST", "/items/1?x=1", "k", "other")),
        ("empty body", keyed("POST", "/items/1?x=1", "k", "")),
        ("path", keyed("POST", "/items/2?x=1", "k", "body")),
        ("query", keyed("POST", "/items/1?x=2", "k", "body")),
        ("no query", keyed("POST", "/items/1", "k", "body")),
        ("route", keyed("POST", "/orders?x=1", "k", "body")),
    ];
    for (what, request) in different {
        let reply = fx.send(request).await;
        reply.assert_problem(422, "idempotency-key-reused");
        assert_eq!(fx.ledger.runs(), 1, "a different {what} must not run");
    }
    // The method is covered too (PATCH is in the default policy).
    fx.send(keyed("POST", "/orders", "m", "x")).await;
    fx.send(keyed("PATCH", "/orders", "m", "x"))
        .await
        .assert_problem(422, "idempotency-key-reused");
    let replay = fx.send(keyed("POST", "/items/1?x=1", "k", "body")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(fx.ledger.runs(), 2);
}

/// While the first request runs, a duplicate is `409 request-in-progress` with `Retry-After` (and
/// does not run); a different request with the key in flight is still a `422`; once the first
/// finishes, the duplicate replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_is_a_409_with_retry_after() {
    let fx = Fixture::with(
        Idempotency::builder(),
        Policy::new(),
        routes(),
        Ledger::gated(),
    );
    let first = start_send(&fx.app, &fx.ledger, keyed("POST", "/orders", "dup", "x")).await;
    for _ in 0..3 {
        let duplicate =
            send_expecting_no_run(&fx.app, keyed("POST", "/orders", "dup", "x"), &fx.ledger).await;
        duplicate.assert_problem(409, "request-in-progress");
        assert!(duplicate.retry_after() >= 1, "409 carries Retry-After");
    }
    fx.send(keyed("POST", "/orders", "dup", "y"))
        .await
        .assert_problem(422, "idempotency-key-reused");

    fx.ledger.open();
    let first = within("the first request", first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let later = fx.send(keyed("POST", "/orders", "dup", "x")).await;
    assert!(later.replayed());
    assert_eq!(later.body, first.body);
    assert_eq!(fx.ledger.runs(), 1);
}

/// With `Policy::wait`, concurrent duplicates wait for the first result instead of a `409`, and
/// then replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_concurrent_duplicates_wait_and_replay() {
    const DUPLICATES: usize = 5;
    let fx = Fixture::with(
        Idempotency::builder(),
        Policy::new().wait(Duration::from_secs(2)),
        routes(),
        Ledger::gated(),
    );
    let first = start_send(&fx.app, &fx.ledger, keyed("POST", "/orders", "w", "x")).await;
    let mut duplicates = JoinSet::new();
    for _ in 0..DUPLICATES {
        duplicates.spawn(sending(&fx.app, keyed("POST", "/orders", "w", "x")));
    }
    // Well within their 2 s, the duplicates are waiting, not answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        duplicates.try_join_next().is_none(),
        "a duplicate answered while the first request still runs"
    );

    fx.ledger.open();
    let first = within("the first request", first).await.unwrap();
    assert!(!first.replayed());
    for reply in within("the waiting duplicates", duplicates.join_all()).await {
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert!(reply.replayed());
        assert_eq!(reply.body, first.body);
    }
    assert_eq!(fx.ledger.runs(), 1);
}

/// Under `required(true)` a covered request without a key is `400 idempotency-key-missing`: the
/// handler does not run and nothing is recorded. Routes and methods the policy does not cover
/// still run without a key.
#[tokio::test]
async fn a_missing_key_under_a_required_policy_is_a_400() {
    let fx = Fixture::new(Policy::new().required(true));
    for method in ["POST", "PATCH"] {
        let reply = fx.send(unkeyed(method, "/orders", "x")).await;
        reply.assert_problem(400, "idempotency-key-missing");
    }
    assert_eq!((fx.ledger.runs(), fx.records()), (0, 0));
    let put = fx.send(unkeyed("PUT", "/orders", "x")).await;
    assert_eq!(put.status, StatusCode::CREATED, "PUT is not covered");
    let keyed_reply = fx.send(keyed("POST", "/orders", "k", "x")).await;
    assert_eq!(keyed_reply.status, StatusCode::CREATED);
}

/// Under the default policy (key optional) a request without a key runs every time, is never a
/// replay, and leaves no record.
#[tokio::test]
async fn a_missing_key_under_the_default_policy_runs_every_time_and_records_nothing() {
    let fx = Fixture::new(Policy::new());
    for run in 1..=3 {
        let reply = fx.send(unkeyed("POST", "/orders", "x")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.text(), format!("run {run}: x"));
        assert!(!reply.replayed());
    }
    assert_eq!(fx.records(), 0);
}

/// A malformed key on a covered route is `400 idempotency-key-invalid`, required or not, before
/// the handler and without a record.
#[tokio::test]
async fn an_invalid_key_is_a_400_before_the_handler() {
    for policy in [Policy::new(), Policy::new().required(true)] {
        let fx = Fixture::new(policy);
        let too_long = "k".repeat(256);
        let forms: [&[&[u8]]; 6] = [
            &[b""],
            &[b"a b"],
            &[b"\"unterminated"],
            &[too_long.as_bytes()],
            &["caf\u{e9}".as_bytes()],
            &[b"a", b"b"],
        ];
        for values in forms {
            let mut builder = request("POST", "/orders");
            for value in values {
                builder = builder.header(IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
            }
            let reply = fx.send(builder.body(Body::from("x")).unwrap()).await;
            reply.assert_problem(400, "idempotency-key-invalid");
        }
        assert_eq!((fx.ledger.runs(), fx.records()), (0, 0));
    }
}

/// Safe methods are never affected (DESIGN.md section 4): a `GET` with a key, even a malformed
/// one, runs every time and records nothing, and one without a key is not refused by a required
/// policy; also under a policy that lists `GET` among its methods (`Policy::methods`: safe
/// methods always pass through).
#[tokio::test]
async fn safe_methods_are_untouched_even_with_a_key() {
    assert_get_is_untouched(&Fixture::new(Policy::new().required(true))).await;
    let listing_get = Policy::new()
        .required(true)
        .methods([Method::GET, Method::POST]);
    assert_get_is_untouched(&Fixture::new(listing_get)).await;
}

/// Sends `GET /orders` with keys (a malformed one too) and without, checking that each runs and
/// nothing is recorded.
async fn assert_get_is_untouched(fx: &Fixture) {
    for (run, key) in [(1, "k"), (2, "k"), (3, "not a token")] {
        let reply = fx.send(keyed("GET", "/orders", key, "")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key:?}: {reply:?}");
        assert_eq!(reply.text(), format!("run {run}: "));
        assert!(!reply.replayed());
    }
    let no_key = fx.send(unkeyed("GET", "/orders", "")).await;
    assert_eq!(no_key.status, StatusCode::CREATED, "{no_key:?}");
    assert_eq!(fx.records(), 0);
}

/// The policy covers its methods only: under the default (`POST`, `PATCH`) a `PUT` with a reused
/// key runs every time; `Policy::methods([PUT])` covers `PUT` and leaves `POST` alone.
#[tokio::test]
async fn a_method_not_in_the_policy_is_untouched() {
    let fx = Fixture::new(Policy::new());
    for run in 1..=2 {
        let reply = fx.send(keyed("PUT", "/orders", "k", "x")).await;
        assert_eq!(reply.text(), format!("run {run}: x"));
        assert!(!reply.replayed());
    }
    fx.send(keyed("PATCH", "/orders", "p", "x")).await;
    assert!(
        fx.send(keyed("PATCH", "/orders", "p", "x"))
            .await
            .replayed()
    );
    assert_eq!(fx.records(), 1);

    let put_only = Fixture::new(Policy::new().methods([Method::PUT]));
    for run in 1..=2 {
        let post = put_only.send(keyed("POST", "/orders", "k", "x")).await;
        assert_eq!(post.text(), format!("run {run}: x"));
    }
    put_only.send(keyed("PUT", "/orders", "k", "x")).await;
    let again = put_only.send(keyed("PUT", "/orders", "k", "x")).await;
    assert!(again.replayed());
    assert_eq!(again.text(), "run 3: x");
}

/// Sends the same keyed request to `/status` twice and says whether the second was a replay
/// (checking that a replay repeats the first answer and that a non-replay ran again).
async fn second_is_replayed(fx: &Fixture, status: u16) -> bool {
    let key = format!("status-{status}");
    let before = fx.ledger.runs();
    let first = fx
        .send(keyed("POST", "/status", &key, status.to_string()))
        .await;
    assert_eq!(first.status.as_u16(), status);
    let second = fx
        .send(keyed("POST", "/status", &key, status.to_string()))
        .await;
    assert_eq!(second.status.as_u16(), status);
    if second.replayed() {
        assert_eq!(second.body, first.body);
        assert_eq!(fx.ledger.runs(), before + 1, "{status}: replayed");
        true
    } else {
        assert_ne!(second.body, first.body, "{status}: ran again");
        assert_eq!(fx.ledger.runs(), before + 2, "{status}: ran again");
        false
    }
}

/// By default a `5xx` (and the transient `408`/`429`) releases the key, so a retry runs again,
/// while other statuses are recorded; `store(StorePolicy::All)` records `5xx` too, and
/// `StorePolicy::Success` only `2xx`.
#[tokio::test]
async fn server_errors_are_released_unless_the_policy_stores_them() {
    let default = Fixture::new(Policy::new());
    for status in [500, 502, 503, 408, 429] {
        assert!(!second_is_replayed(&default, status).await, "{status}");
    }
    for status in [200, 201, 402, 422] {
        assert!(second_is_replayed(&default, status).await, "{status}");
    }
    let all = Fixture::new(Policy::new().store(StorePolicy::All));
    for status in [500, 503, 201] {
        assert!(second_is_replayed(&all, status).await, "{status}");
    }
    let success = Fixture::new(Policy::new().store(StorePolicy::Success));
    assert!(second_is_replayed(&success, 201).await);
    assert!(!second_is_replayed(&success, 422).await);
}

/// A handler that panics is `500 handler-panicked` and releases its key: the retry runs, and is
/// then replayed.
#[tokio::test]
async fn a_panicking_handler_is_a_500_problem_and_releases_the_key() {
    let fx = Fixture::new(Policy::new());
    let panicked = fx.send(keyed("POST", "/panics", "k", "x")).await;
    panicked.assert_problem(500, "handler-panicked");
    assert_eq!(fx.ledger.runs(), 1);

    let retry = fx.send(keyed("POST", "/panics", "k", "x")).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.text(), "run 2: x");
    assert!(!retry.replayed());
    let replay = fx.send(keyed("POST", "/panics", "k", "x")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, retry.body);
    assert_eq!(fx.ledger.runs(), 2);
}

/// A response larger than `max_response_bytes` (whole or streamed) reaches its client whole;
/// it is recorded as not replayable, so duplicates get `409 result-unavailable` and the handler
/// does not run again.
#[tokio::test]
async fn a_response_over_the_limit_reaches_its_client_and_duplicates_get_409() {
    let fx = Fixture::with(
        Idempotency::builder().max_response_bytes(1024),
        Policy::new(),
        routes(),
        Ledger::new(),
    );
    for (route, byte) in [("/large", b'1'), ("/large-stream", b'y')] {
        let first = fx.send(keyed("POST", route, &route[1..], "x")).await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(
            first.body.len(),
            10 * 1024,
            "{route}: the client gets it all"
        );
        assert_eq!(first.body[0], byte);
        let runs = fx.ledger.runs();
        for _ in 0..2 {
            let duplicate = fx.send(keyed("POST", route, &route[1..], "x")).await;
            let document = duplicate.assert_problem(409, "result-unavailable");
            assert!(duplicate.retry_after() >= 1, "{document}");
        }
        assert_eq!(fx.ledger.runs(), runs, "{route}: must not run again");
    }
}

/// `store_body(false)` records status and headers only: the replay has the status and
/// `Location`, an empty body and no `Content-Type`.
#[tokio::test]
async fn store_body_false_replays_status_and_location_without_the_body() {
    let fx = Fixture::new(Policy::new().store_body(false));
    let first = fx.send(keyed("POST", "/secrets", "s", "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "{\"token\":\"one-time-1\"}");

    let replay = fx.send(keyed("POST", "/secrets", "s", "x")).await;
    assert!(replay.replayed());
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.header(header::LOCATION), Some("/secrets/1"));
    assert!(replay.body.is_empty(), "the secret was stored: {replay:?}");
    assert_eq!(replay.header(header::CONTENT_TYPE), None);
    assert_eq!(fx.ledger.runs(), 1);
}

/// A record lives for the policy's ttl: replayed within it, and the key runs again (for any
/// request) once it expired.
#[tokio::test]
async fn a_record_expires_after_the_policy_ttl() {
    let fx = Fixture::new(Policy::new().ttl(Duration::from_millis(300)));
    let first = fx.send(keyed("POST", "/orders", "t", "x")).await;
    assert_eq!(first.text(), "run 1: x");
    assert!(fx.send(keyed("POST", "/orders", "t", "x")).await.replayed());

    tokio::time::sleep(Duration::from_millis(900)).await;
    let after = fx.send(keyed("POST", "/orders", "t", "other")).await;
    assert!(!after.replayed(), "the record outlived its 300 ms ttl");
    assert_eq!(after.text(), "run 2: other");
}

/// The state of [`fenced`]: the ledger and the first attempt's context, kept to inspect later.
#[derive(Clone, Default)]
struct Fenced {
    ledger: Ledger,
    first_context: Arc<Mutex<Option<IdempotencyContext>>>,
}

/// A handler without the attribute that reads its epoch: the first attempt (epoch 1) is held at
/// the gate, later ones run straight through.
async fn fenced(context: IdempotencyContext, State(state): State<Fenced>, body: String) -> String {
    let epoch = context
        .epoch()
        .expect("a router-wide execution has an epoch");
    state.ledger.start();
    if epoch == 1 {
        *state.first_context.lock().unwrap() = Some(context.clone());
        state.ledger.pass_gate().await;
    }
    state.ledger.finish();
    format!("epoch {epoch}: {body}")
}

/// A handler stalled past `max_run_time` loses the policy's lease: until it lapses duplicates are
/// `409`, then a retry takes over with epoch 2, which the (non-attributed) handler sees through
/// `IdempotencyContext`. The stalled attempt learns it lost the lease; its late result is not
/// recorded, and replays serve the winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_policy_lease_lapses_a_retry_takes_over_with_epoch_2() {
    let idem = Idempotency::builder()
        .max_run_time(Duration::from_millis(150))
        .build();
    let state = Fenced {
        ledger: Ledger::gated(),
        ..Fenced::default()
    };
    let policy = Policy::new().lease(Duration::from_millis(100));
    let routes = Router::new().route("/fenced", post(fenced));
    let app = router_wide_app(&idem, policy, routes, state.clone());

    let first = start_send(&app, &state.ledger, keyed("POST", "/fenced", "f", "x")).await;
    let (takeover, conflicts) =
        send_until_not_in_progress(&app, || keyed("POST", "/fenced", "f", "x"), PATIENCE).await;
    assert!(conflicts >= 1, "the lease held for a while");
    assert_eq!(takeover.status, StatusCode::OK);
    assert_eq!(takeover.text(), "epoch 2: x");
    assert!(!takeover.replayed());

    let first_context = state.first_context.lock().unwrap().clone().unwrap();
    assert_eq!(first_context.epoch(), Some(1));
    assert_eq!(first_context.key(), Some("f"));
    wait_until(
        "the stalled attempt to report lease_lost()",
        Duration::from_secs(1),
        || first_context.lease_lost(),
    )
    .await;

    state.ledger.open();
    let late = within("the first", first).await.unwrap();
    assert_eq!(late.text(), "epoch 1: x", "its own client still gets it");
    wait_idle(&idem).await;
    for _ in 0..2 {
        let replay = send(&app, keyed("POST", "/fenced", "f", "x")).await;
        assert!(replay.replayed());
        assert_eq!(replay.text(), "epoch 2: x", "replays serve the winner");
    }
    assert_eq!(state.ledger.runs(), 2);
}

/// Over real TCP, a client that hangs up mid-handler does not cancel a router-wide handler: it
/// finishes, its result is recorded, and the retry replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_does_not_cancel_the_handler_and_the_retry_replays() {
    let fx = Fixture::with(
        Idempotency::builder(),
        Policy::new(),
        routes(),
        Ledger::gated(),
    );
    let server = Server::start(fx.app.clone()).await;
    let request = http1_request("POST", "/orders", &[(IDEMPOTENCY_KEY, "gone")], b"pay 7");

    hang_up_once_started(server.addr, &fx.ledger, &request).await;
    assert_eq!(fx.idem.running(), 1, "the handler is still running");
    assert_eq!(fx.ledger.finished(), 0);

    fx.ledger.open();
    fx.ledger.wait_finished(1).await;
    wait_idle(&fx.idem).await;
    let retry = raw_exchange(server.addr, &request).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the disconnected request was recorded");
    assert_eq!(retry.text(), "run 1: pay 7");
    assert_eq!(fx.ledger.runs(), 1);
    server.stop().await;
}

/// `Idempotency::shutdown` waits for a router-wide handler whose client went away, and its result
/// is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_running_router_wide_handler() {
    let fx = Fixture::with(
        Idempotency::builder(),
        Policy::new(),
        routes(),
        Ledger::gated(),
    );
    let first = start_send(&fx.app, &fx.ledger, keyed("POST", "/orders", "drain", "x")).await;
    first.abort();
    assert_eq!(fx.idem.running(), 1);

    let draining = {
        let idem = fx.idem.clone();
        tokio::spawn(async move { idem.shutdown().await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !draining.is_finished(),
        "shutdown returned while a handler was still running"
    );
    fx.ledger.open();
    within("shutdown", draining).await.unwrap();
    assert_eq!((fx.ledger.finished(), fx.idem.running()), (1, 0));

    let retry = fx.send(keyed("POST", "/orders", "drain", "x")).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "run 1: x");
}

// ---------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------

/// The `x-user` header, as `Policy::scope_with` reads it.
fn user_header(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get("x-user")
        .and_then(|user| user.to_str().ok())
        .map(str::to_owned)
}

/// `scope_with` keeps two users' identical keys (same request) apart: each runs once and replays
/// its own response.
#[tokio::test]
async fn scope_with_keeps_two_users_identical_keys_apart() {
    let fx = Fixture::new(Policy::new().scope_with(user_header));
    let ann = fx
        .send(as_user("/orders", Some("ann"), Some("k"), "x"))
        .await;
    let bob = fx
        .send(as_user("/orders", Some("bob"), Some("k"), "x"))
        .await;
    assert_eq!(ann.text(), "run 1: x");
    assert_eq!(bob.text(), "run 2: x", "bob must not get ann's response");
    assert!(!bob.replayed());
    let ann_again = fx
        .send(as_user("/orders", Some("ann"), Some("k"), "x"))
        .await;
    let bob_again = fx
        .send(as_user("/orders", Some("bob"), Some("k"), "x"))
        .await;
    assert!(ann_again.replayed() && bob_again.replayed());
    assert_eq!(ann_again.body, ann.body);
    assert_eq!(bob_again.body, bob.body);
    assert_eq!((fx.ledger.runs(), fx.records()), (2, 2));
}

/// When `scope_with` finds nothing to scope by, the keyed request is refused with
/// `500 idempotency-scope-unavailable`: never a fallback to the global key space. The handler
/// does not run and nothing is recorded.
#[tokio::test]
async fn scope_with_returning_none_is_a_500_and_the_handler_does_not_run() {
    let fx = Fixture::new(Policy::new().scope_with(user_header));
    for _ in 0..2 {
        let reply = fx.send(as_user("/orders", None, Some("k"), "x")).await;
        reply.assert_problem(500, "idempotency-scope-unavailable");
    }
    assert_eq!((fx.ledger.runs(), fx.records()), (0, 0));
    let ann = fx
        .send(as_user("/orders", Some("ann"), Some("k"), "x"))
        .await;
    assert_eq!(ann.text(), "run 1: x");
}

/// `scope_by::<AuthUser>`: the extractor's rejection (`401`) is the response, the handler does not
/// run and nothing is recorded, so the authenticated request with the same key then runs (once).
#[tokio::test]
async fn a_scope_by_rejection_is_the_response_and_leaves_the_key_free() {
    let policy = Policy::new().scope_by::<AuthUser, _, _>(|AuthUser(user)| user.clone());
    let routes = Router::new().route("/orders", post(create_as));
    let fx = Fixture::with(Idempotency::builder(), policy, routes, Ledger::new());
    let rejected = fx.send(as_user("/orders", None, Some("k"), "x")).await;
    assert_eq!(rejected.status, StatusCode::UNAUTHORIZED);
    assert_eq!(rejected.text(), "who are you?");
    assert!(!rejected.replayed());
    assert_eq!((fx.ledger.runs(), fx.records()), (0, 0));

    let ann = fx
        .send(as_user("/orders", Some("ann"), Some("k"), "x"))
        .await;
    assert_eq!(ann.status, StatusCode::CREATED);
    assert_eq!(ann.text(), "run 1: ann x");
    let again = fx
        .send(as_user("/orders", Some("ann"), Some("k"), "x"))
        .await;
    assert!(again.replayed());
    let bob = fx
        .send(as_user("/orders", Some("bob"), Some("k"), "x"))
        .await;
    assert_eq!(bob.text(), "run 2: bob x", "scoped by the extracted user");
}

// ---------------------------------------------------------------------------------------------
// Routes the policy does not cover
// ---------------------------------------------------------------------------------------------

/// A route the policy exempts runs every time, even with the same key (and a required policy does
/// not ask it for one), while its neighbours stay covered.
#[tokio::test]
async fn an_exempt_route_runs_every_time() {
    let routes = routes().route("/webhooks/{provider}", post(item));
    let policy = Policy::new().required(true).exempt("/webhooks/{provider}");
    let fx = Fixture::with(Idempotency::builder(), policy, routes, Ledger::new());
    for run in 1..=2 {
        let reply = fx.send(keyed("POST", "/webhooks/stripe", "k", "x")).await;
        assert_eq!(reply.text(), format!("run {run}: stripe x"));
        assert!(!reply.replayed());
    }
    let keyless = fx.send(unkeyed("POST", "/webhooks/stripe", "x")).await;
    assert_eq!(keyless.text(), "run 3: stripe x");
    assert_eq!(fx.records(), 0);
    fx.send(unkeyed("POST", "/orders", "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    fx.send(keyed("POST", "/orders", "k", "x")).await;
    assert!(fx.send(keyed("POST", "/orders", "k", "x")).await.replayed());
}

/// axum applies a layer to the routes added before it: a route added after the policy's layer is
/// untouched, running every time with the same key.
#[tokio::test]
async fn a_route_added_after_the_layer_is_untouched() {
    let ledger = Ledger::new();
    let store = MemoryStore::new(1 << 20);
    let idem = Idempotency::builder().store(store.clone()).build();
    let app = Router::new()
        .route("/covered", post(create))
        .layer(idem.layer().policy(Policy::new().required(true)))
        .route("/late", post(create))
        .with_state(ledger.clone());
    let late = |body: &str| keyed("POST", "/late", "k", body.to_owned());
    assert_eq!(send(&app, late("x")).await.text(), "run 1: x");
    let again = send(&app, late("x")).await;
    assert!(!again.replayed());
    assert_eq!(again.text(), "run 2: x");
    assert_eq!(
        send(&app, unkeyed("POST", "/late", "x")).await.text(),
        "run 3: x"
    );
    assert_eq!(store.len(), 0);
    send(&app, keyed("POST", "/covered", "k", "x")).await;
    assert!(
        send(&app, keyed("POST", "/covered", "k", "x"))
            .await
            .replayed()
    );
}

// ---------------------------------------------------------------------------------------------
// The attribute overrides the policy
// ---------------------------------------------------------------------------------------------

/// An attributed handler at `/accounts` behind a policy, over a counting store, with a counter the
/// policy's scope hook may count its calls in.
struct Overridden {
    app: Router,
    ledger: Ledger,
    store: Counting,
    idem: Idempotency,
    scopings: Arc<AtomicUsize>,
}

impl Overridden {
    /// `attributed` behind the policy `policy` makes (given the scopings counter).
    fn new<H, T>(attributed: H, policy: impl FnOnce(&Arc<AtomicUsize>) -> Policy) -> Self
    where
        H: axum::handler::Handler<T, Ledger>,
        T: 'static,
    {
        let store = Counting::default();
        let idem = Idempotency::builder().store(store.clone()).build();
        let ledger = Ledger::new();
        let scopings = Arc::default();
        let routes = Router::new().route("/accounts", post(attributed));
        Self {
            app: router_wide_app(&idem, policy(&scopings), routes, ledger.clone()),
            ledger,
            store,
            idem,
            scopings,
        }
    }

    /// A policy scoped by the user as the attribute's `scope = user` is, counting its scopings.
    fn user_scoped(scopings: &Arc<AtomicUsize>) -> Policy {
        let scopings = Arc::clone(scopings);
        Policy::new().scope_by::<AuthUser, _, _>(move |AuthUser(user)| {
            scopings.fetch_add(1, Ordering::SeqCst);
            user.clone()
        })
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        send(&self.app, request).await
    }

    /// The store's calls once every handler and background release is done.
    async fn settled_calls(&self) -> Calls {
        wait_idle(&self.idem).await;
        self.store.calls()
    }
}

/// An `#[idempotent(required = true, ttl = "1s", scope = user)]` handler under an optional policy
/// scoped the same way: the first request is claimed by the layer and the claim adopted by the
/// attribute (one acquire, one complete: 2 round trips, as without the layer); replays work; the
/// attribute's `required` applies (keyless is `400` although the policy makes keys optional);
/// from the second request on the layer leaves the route to the attribute (its scope extractor no
/// longer runs); and the attribute's 1 s ttl, not the policy's 24 h, governs the adopted record.
#[tokio::test]
async fn the_attribute_overrides_the_policy_and_adopts_its_claim_with_the_same_scope() {
    let fx = Overridden::new(attributed_account, Overridden::user_scoped);

    let first = fx
        .send(as_user("/accounts", Some("ann"), Some("k1"), "x"))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: ann x");
    let calls = fx.settled_calls().await;
    assert_eq!(
        calls,
        Calls {
            acquire: 1,
            complete: 1,
            ..Calls::default()
        },
        "the claim is adopted: no second acquire, no release"
    );
    assert_eq!(calls.round_trips(), 2);
    assert_eq!(
        fx.scopings.load(Ordering::SeqCst),
        1,
        "the layer claimed it"
    );

    let replay = fx
        .send(as_user("/accounts", Some("ann"), Some("k1"), "x"))
        .await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    fx.send(as_user("/accounts", Some("ann"), Some("k1"), "y"))
        .await
        .assert_problem(422, "idempotency-key-reused");
    let bob = fx
        .send(as_user("/accounts", Some("bob"), Some("k1"), "x"))
        .await;
    assert_eq!(bob.text(), "run 2: bob x", "the attribute's scope");

    // The attribute requires a key, although the policy does not.
    fx.send(as_user("/accounts", Some("ann"), None, "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");

    let before = fx.settled_calls().await;
    let second = fx
        .send(as_user("/accounts", Some("ann"), Some("k2"), "x"))
        .await;
    assert_eq!(second.text(), "run 3: ann x");
    let after = fx.settled_calls().await;
    assert_eq!(after.acquire - before.acquire, 1);
    assert_eq!(after.complete - before.complete, 1);
    assert_eq!(after.release, before.release);
    assert_eq!(
        fx.scopings.load(Ordering::SeqCst),
        1,
        "the layer no longer handles the attributed route"
    );

    // The adopted record lives for the attribute's 1 s, not the policy's 24 h.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = fx
        .send(as_user("/accounts", Some("ann"), Some("k1"), "x"))
        .await;
    assert!(!expired.replayed(), "the attribute's ttl did not apply");
    assert_eq!(expired.text(), "run 4: ann x");
}

/// With a scope other than the attribute's (here none: the global key space), the layer's claim
/// names another record: the attribute gives it back and claims its own (acquire, release,
/// acquire, complete); the handler still runs exactly once and the retry replays. The next
/// request to the route is not claimed by the layer: one acquire, no release.
#[tokio::test]
async fn with_a_different_scope_the_claim_is_given_back_and_the_handler_runs_once() {
    let fx = Overridden::new(attributed_account, |_| Policy::new());
    let first = fx
        .send(as_user("/accounts", Some("ann"), Some("k1"), "x"))
        .await;
    assert_eq!(first.text(), "run 1: ann x");
    assert_eq!(
        fx.settled_calls().await,
        Calls {
            acquire: 2,
            complete: 1,
            release: 1,
            renew: 0,
        },
        "the layer's claim is released, the attribute's own record acquired"
    );
    let retry = fx
        .send(as_user("/accounts", Some("ann"), Some("k1"), "x"))
        .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    // The same key for bob is bob's record, not the global one the layer claimed.
    let bob = fx
        .send(as_user("/accounts", Some("bob"), Some("k1"), "x"))
        .await;
    assert_eq!(bob.text(), "run 2: bob x");
    assert_eq!(fx.ledger.runs(), 2);

    let before = fx.settled_calls().await;
    fx.send(as_user("/accounts", Some("ann"), Some("k2"), "x"))
        .await;
    let after = fx.settled_calls().await;
    assert_eq!(
        (
            after.acquire - before.acquire,
            after.release - before.release
        ),
        (1, 0),
        "the layer no longer claims for the attributed route"
    );
}

/// The policy's `required(true)` is checked at the layer for every route it covers, attributed
/// ones included (the module docs say so): an `#[idempotent(scope = user)]` handler that makes
/// the key optional still answers a keyless request with `400` under a required policy — before
/// and after the layer has handed the route over to the attribute. Exempting the route lets the
/// attribute make the key optional.
#[tokio::test]
async fn a_required_policy_is_checked_at_the_layer_even_for_an_optional_attribute() {
    let fx = Overridden::new(attributed_optional, |_| Policy::new().required(true));
    fx.send(as_user("/accounts", Some("ann"), None, "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    let keyed_reply = fx
        .send(as_user("/accounts", Some("ann"), Some("k"), "x"))
        .await;
    assert_eq!(keyed_reply.text(), "run 1: ann x");
    assert!(
        fx.send(as_user("/accounts", Some("ann"), Some("k"), "x"))
            .await
            .replayed()
    );
    // The route is now left to the attribute, but the policy's `required` still holds.
    fx.send(as_user("/accounts", Some("ann"), None, "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    assert_eq!(fx.ledger.runs(), 1);

    let exempt = Overridden::new(attributed_optional, |_| {
        Policy::new().required(true).exempt("/accounts")
    });
    for run in 1..=2 {
        let reply = exempt
            .send(as_user("/accounts", Some("ann"), None, "x"))
            .await;
        assert_eq!(reply.text(), format!("run {run}: ann x"));
    }
}

// ---------------------------------------------------------------------------------------------
// The two forms write the same records
// ---------------------------------------------------------------------------------------------

/// `POST /orders` through the attribute, scoped by the user.
#[idempotent(scope = user)]
async fn attributed_order(
    AuthUser(user): AuthUser,
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, [(HeaderName, String); 1], String) {
    order_response(&user, &ledger, &body).await
}

/// `POST /orders` without the attribute, for a policy scoped by the user.
async fn plain_order(
    AuthUser(user): AuthUser,
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, [(HeaderName, String); 1], String) {
    order_response(&user, &ledger, &body).await
}

async fn order_response(
    user: &str,
    ledger: &Ledger,
    body: &str,
) -> (StatusCode, [(HeaderName, String); 1], String) {
    let run = ledger.run().await;
    let location = format!("/orders/{run}");
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        format!("run {run}: {user} {body}"),
    )
}

/// The same route (method, path, scope) served by two routers over one store, once through the
/// attribute and once through the policy: a request recorded by either is replayed by the other
/// (status, body, `Location`), a different request with its key is `422` on the other, and each
/// key runs once.
#[tokio::test]
async fn the_attribute_and_the_policy_write_identical_records() {
    let store = MemoryStore::new(1 << 20);
    let ledger = Ledger::new();
    let attribute_idem = Idempotency::builder().store(store.clone()).build();
    let attribute = Router::new()
        .route("/orders", post(attributed_order))
        .with_state(ledger.clone())
        .layer(attribute_idem.layer());
    let policy_idem = Idempotency::builder().store(store.clone()).build();
    let policy = Policy::new().scope_by::<AuthUser, _, _>(|AuthUser(user)| user.clone());
    let routes = Router::new().route("/orders", post(plain_order));
    let router_wide = router_wide_app(&policy_idem, policy, routes, ledger.clone());

    for (key, (recorder, replayer)) in [
        ("k1", (&attribute, &router_wide)),
        ("k2", (&router_wide, &attribute)),
    ] {
        let first = send(recorder, as_user("/orders", Some("ann"), Some(key), "x")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(!first.replayed());
        let replay = send(replayer, as_user("/orders", Some("ann"), Some(key), "x")).await;
        assert!(replay.replayed(), "{key}: {replay:?}");
        assert_eq!(replay.status, first.status);
        assert_eq!(replay.body, first.body);
        assert_eq!(
            replay.header(header::LOCATION),
            first.header(header::LOCATION)
        );
        send(replayer, as_user("/orders", Some("ann"), Some(key), "y"))
            .await
            .assert_problem(422, "idempotency-key-reused");
        // Another user's same key is another record in both forms.
        let bob = send(replayer, as_user("/orders", Some("bob"), Some(key), "x")).await;
        assert!(!bob.replayed());
    }
    assert_eq!(
        ledger.runs(),
        4,
        "ann's two keys and bob's two keys, once each"
    );
}

// ---------------------------------------------------------------------------------------------
// Nested routers
// ---------------------------------------------------------------------------------------------

/// A nested router carrying its own policy (key required, 300 ms ttl) under an outer policy (key
/// optional, 24 h): on the nested routes the inner policy's settings apply (keyless is `400`,
/// records expire after 300 ms) while the outer routes keep the outer ones; the outer layer's
/// claim is adopted by the inner one (2 round trips for a first request); each key runs once.
#[tokio::test]
async fn a_nested_routers_policy_applies_under_an_outer_policy() {
    let store = Counting::default();
    let idem = Idempotency::builder().store(store.clone()).build();
    let ledger = Ledger::new();
    let inner = Router::new().route("/a", post(create)).layer(
        idem.layer()
            .policy(Policy::new().required(true).ttl(Duration::from_millis(300))),
    );
    let app = Router::new()
        .route("/top/{id}", post(item))
        .nest("/v2", inner)
        .with_state(ledger.clone())
        .layer(idem.layer().policy(Policy::new()));

    send(&app, unkeyed("POST", "/v2/a", "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    assert_eq!(
        send(&app, unkeyed("POST", "/top/1", "x")).await.text(),
        "run 1: 1 x",
        "the outer policy makes keys optional"
    );
    assert_eq!(ledger.runs(), 1);

    let nested = send(&app, keyed("POST", "/v2/a", "k", "x")).await;
    assert_eq!(nested.text(), "run 2: x");
    wait_idle(&idem).await;
    assert_eq!(
        store.calls(),
        Calls {
            acquire: 1,
            complete: 1,
            ..Calls::default()
        },
        "the outer claim is adopted by the inner policy"
    );
    let top = send(&app, keyed("POST", "/top/1", "t", "x")).await;
    for _ in 0..2 {
        assert!(
            send(&app, keyed("POST", "/v2/a", "k", "x"))
                .await
                .replayed()
        );
        assert!(
            send(&app, keyed("POST", "/top/1", "t", "x"))
                .await
                .replayed()
        );
    }
    assert_eq!(ledger.runs(), 3, "each key once per route");
    // A keyless request to the nested route is still refused once the outer layer has left it
    // to the inner one.
    send(&app, unkeyed("POST", "/v2/a", "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");

    tokio::time::sleep(Duration::from_millis(900)).await;
    let expired = send(&app, keyed("POST", "/v2/a", "k", "x")).await;
    assert!(!expired.replayed(), "the inner policy's 300 ms ttl applies");
    assert_eq!(expired.text(), "run 4: x");
    let kept = send(&app, keyed("POST", "/top/1", "t", "x")).await;
    assert!(kept.replayed(), "the outer policy's 24 h ttl applies");
    assert_eq!(kept.body, top.body);
}

/// An outer policy's `required(true)` holds for the routes of a nested router whose own policy
/// makes keys optional, as it does for an attributed route: the outer layer checks it for every
/// route it covers, before and after it has left the route to the inner policy.
#[tokio::test]
async fn an_outer_required_policy_holds_for_a_nested_route_with_an_optional_policy() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let inner = Router::new()
        .route("/a", post(create))
        .layer(idem.layer().policy(Policy::new()));
    let app = Router::new()
        .nest("/v2", inner)
        .with_state(ledger.clone())
        .layer(idem.layer().policy(Policy::new().required(true)));
    send(&app, unkeyed("POST", "/v2/a", "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    assert_eq!(
        send(&app, keyed("POST", "/v2/a", "k", "x")).await.text(),
        "run 1: x"
    );
    assert!(
        send(&app, keyed("POST", "/v2/a", "k", "x"))
            .await
            .replayed()
    );
    send(&app, unkeyed("POST", "/v2/a", "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    assert_eq!(ledger.runs(), 1);
}

/// `Policy::exempt` names a route as axum's `MatchedPath` does, which under `Router::nest` is the
/// whole path, prefix included: an inner router's policy exempts its webhook route as
/// `/v2/webhooks/{provider}`, which then runs every time with the same key.
#[tokio::test]
async fn under_router_nest_an_exempt_route_is_named_by_its_full_path() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let inner = Router::new()
        .route("/webhooks/{provider}", post(item))
        .route("/orders", post(create))
        .layer(
            idem.layer()
                .policy(Policy::new().exempt("/v2/webhooks/{provider}")),
        );
    let app = Router::new().nest("/v2", inner).with_state(ledger.clone());
    for run in 1..=2 {
        let reply = send(&app, keyed("POST", "/v2/webhooks/stripe", "k", "x")).await;
        assert_eq!(reply.text(), format!("run {run}: stripe x"));
    }
    send(&app, keyed("POST", "/v2/orders", "o", "x")).await;
    assert!(
        send(&app, keyed("POST", "/v2/orders", "o", "x"))
            .await
            .replayed()
    );
}

/// Under `Router::nest` the nested router sees its request's path without the prefix; the
/// fingerprint covers the original path: the same key on `/v2/a` and `/v2/b` is `422`, and so is
/// the same key for two tenants that the nested router sees as the same `/items/x`.
#[tokio::test]
async fn under_router_nest_the_fingerprint_covers_the_full_original_path() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let policy = || Policy::new().required(true);
    let versioned = Router::new()
        .route("/{name}", post(item))
        .layer(idem.layer().policy(policy()));
    let tenants = Router::new()
        .route("/items/{id}", post(item))
        .layer(idem.layer().policy(policy()));
    let app = Router::new()
        .nest("/v2", versioned)
        .nest("/t/{tenant}", tenants)
        .with_state(ledger.clone())
        .layer(idem.layer().policy(policy()));

    assert_eq!(
        send(&app, keyed("POST", "/v2/a", "k", "x")).await.text(),
        "run 1: a x"
    );
    send(&app, keyed("POST", "/v2/b", "k", "x"))
        .await
        .assert_problem(422, "idempotency-key-reused");

    let acme = send(&app, keyed("POST", "/t/acme/items/x", "t", "x")).await;
    assert_eq!(acme.text(), "run 2: x x");
    send(&app, keyed("POST", "/t/globex/items/x", "t", "x"))
        .await
        .assert_problem(422, "idempotency-key-reused");
    assert!(
        send(&app, keyed("POST", "/t/acme/items/x", "t", "x"))
            .await
            .replayed()
    );
    assert_eq!(ledger.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// Configurable headers
// ---------------------------------------------------------------------------------------------

/// The key header `IdempotencyBuilder::key_header` names.
static X_IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("x-idempotency-key");

/// With `key_header("x-idempotency-key")` both forms, the policy and the attribute, read the key
/// from it, and `Idempotency-Key` is ignored: a request carrying only that one (even malformed)
/// has no key.
#[tokio::test]
async fn a_configured_key_header_is_read_by_both_forms_and_idempotency_key_is_ignored() {
    let routes = routes().route("/attributed", post(attributed_create));
    let fx = Fixture::with(
        Idempotency::builder().key_header(X_IDEMPOTENCY_KEY.clone()),
        Policy::new(),
        routes,
        Ledger::new(),
    );
    let with_key = |uri: &str| {
        request("POST", uri)
            .header(&X_IDEMPOTENCY_KEY, &uri[1..])
            .body(Body::from("x"))
            .unwrap()
    };
    for uri in ["/orders", "/attributed"] {
        let first = fx.send(with_key(uri)).await;
        assert_eq!(first.status, StatusCode::CREATED, "{uri}: {first:?}");
        let again = fx.send(with_key(uri)).await;
        assert!(again.replayed(), "{uri}");
        assert_eq!(again.body, first.body);
    }
    assert_eq!(fx.ledger.runs(), 2);

    for value in ["orders", "a, b"] {
        let reply = fx.send(keyed("POST", "/orders", value, "x")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{value:?}: {reply:?}");
        assert!(
            !reply.replayed(),
            "`Idempotency-Key: {value}` is not the key"
        );
        fx.send(keyed("POST", "/attributed", value, "x"))
            .await
            .assert_problem(400, "idempotency-key-missing");
    }
    assert_eq!(fx.ledger.runs(), 4);
}

/// With `request_id_header("x-request-id")`, a first response carries no `Original-Request`, and
/// its replays (through the policy or the attribute) carry `Original-Request: <the first request's
/// id>`, whatever id the replayed request has.
#[tokio::test]
async fn replays_name_the_first_request_in_original_request() {
    let routes = routes().route("/attributed", post(attributed_create));
    let fx = Fixture::with(
        Idempotency::builder().request_id_header(HeaderName::from_static("x-request-id")),
        Policy::new(),
        routes,
        Ledger::new(),
    );
    for uri in ["/orders", "/attributed"] {
        let with_id = |id: Option<&str>| {
            let mut builder = request("POST", uri).header(IDEMPOTENCY_KEY, &uri[1..]);
            if let Some(id) = id {
                builder = builder.header("x-request-id", id);
            }
            builder.body(Body::from("x")).unwrap()
        };
        let first = fx.send(with_id(Some("req-1"))).await;
        assert_eq!(first.status, StatusCode::CREATED, "{uri}");
        assert_eq!(first.header("original-request"), None, "{uri}");
        for id in [Some("req-2"), None] {
            let replay = fx.send(with_id(id)).await;
            assert!(replay.replayed(), "{uri}");
            assert_eq!(replay.header("original-request"), Some("req-1"), "{uri}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// testing::FreshKeys
// ---------------------------------------------------------------------------------------------

/// In front of a policy that requires a key, `FreshKeys` gives every unkeyed request a new key: two
/// identical requests both run (`201`, no replay), where without it they are `400`. A request
/// with its own key keeps it, and replays. `FreshKeys::header` does the same for a configured
/// key header.
#[tokio::test]
async fn fresh_keys_gives_each_unkeyed_request_a_new_key() {
    let fx = Fixture::new(Policy::new().required(true));
    fx.send(unkeyed("POST", "/orders", "x"))
        .await
        .assert_problem(400, "idempotency-key-missing");
    let app = fx.app.clone().layer(FreshKeys::new());
    for run in 1..=2 {
        let reply = send(&app, unkeyed("POST", "/orders", "x")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.text(), format!("run {run}: x"));
        assert!(!reply.replayed());
    }
    assert_eq!(fx.records(), 2, "each under a key of its own");
    let own = send(&app, keyed("POST", "/orders", "mine", "x")).await;
    let again = send(&app, keyed("POST", "/orders", "mine", "x")).await;
    assert!(!own.replayed() && again.replayed());
    assert_eq!(again.body, own.body);

    let custom = Fixture::with(
        Idempotency::builder().key_header(X_IDEMPOTENCY_KEY.clone()),
        Policy::new().required(true),
        routes(),
        Ledger::new(),
    );
    let app = custom
        .app
        .clone()
        .layer(FreshKeys::header(X_IDEMPOTENCY_KEY.clone()));
    for run in 1..=2 {
        let reply = send(&app, unkeyed("POST", "/orders", "x")).await;
        assert_eq!(reply.text(), format!("run {run}: x"));
    }
}

// ---------------------------------------------------------------------------------------------
// Policy validation
// ---------------------------------------------------------------------------------------------

/// `Policy::validate` and `IdempotencyLayer::try_policy` refuse a zero ttl (and a zero lease or
/// wait, and no method) with an error naming it.
#[test]
fn an_invalid_policy_is_an_error() {
    let idem = Idempotency::builder().build();
    let zero_ttl = || Policy::new().ttl(Duration::ZERO);
    assert_eq!(zero_ttl().validate(), Err(PolicyError::ZeroDuration("ttl")));
    let error = idem.layer().try_policy(zero_ttl()).unwrap_err();
    assert_eq!(error, PolicyError::ZeroDuration("ttl"));
    assert_eq!(
        error.to_string(),
        "`ttl` cannot be zero: give the policy a positive duration"
    );
    for (policy, expected) in [
        (
            Policy::new().lease(Duration::ZERO),
            PolicyError::ZeroDuration("lease"),
        ),
        (
            Policy::new().wait(Duration::ZERO),
            PolicyError::ZeroDuration("wait"),
        ),
        (Policy::new().methods([]), PolicyError::NoMethod),
    ] {
        assert_eq!(idem.layer().try_policy(policy).unwrap_err(), expected);
    }
    assert!(idem.layer().try_policy(Policy::new()).is_ok());
}

/// `IdempotencyLayer::policy` panics on an invalid policy, with the reason: a router is built at
/// start-up, where a misconfiguration should stop the service.
#[test]
#[should_panic(
    expected = "idem: invalid router-wide policy: `ttl` cannot be zero: give the policy a positive duration"
)]
fn policy_panics_on_an_invalid_policy() {
    let idem = Idempotency::builder().build();
    let _ = idem.layer().policy(Policy::new().ttl(Duration::ZERO));
}
