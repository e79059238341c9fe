//! The wire behaviour of `#[idempotent]` routes (DESIGN.md section 4), one request at a time,
//! through real `Router`s in process.
//!
//! Concurrency, connections, time (TTL, leases) and the response-size limit are in
//! `concurrency.rs`; the payments example in `payments_example.rs`.

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use idem_runtime::problem::Problem;
use idem_runtime::store::{
    AcquireRequest, Acquired, CompleteRequest, ReleaseRequest, RenewRequest, StoreError,
    StoreFuture,
};
use idem_runtime::{Idempotency, IdempotencyContext, MemoryStore, Store, idempotent};
use idem_tests::support::{IDEMPOTENCY_KEY, Ledger, Reply, keyed, request, send, unkeyed};
use serde::Deserialize;

// ---------------------------------------------------------------------------------------------
// Handlers and routers
// ---------------------------------------------------------------------------------------------

/// The body's text, tagged with the execution number: a replay shows an old number.
#[idempotent(required = true)]
async fn create(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

#[idempotent]
async fn optional(State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.run().await;
    format!("run {run}: {body}")
}

/// A router over `handler`-like routes with its own ledger and in-memory store (kept to inspect).
struct Fixture {
    app: Router,
    ledger: Ledger,
    store: MemoryStore,
}

impl Fixture {
    fn new(routes: Router<Ledger>) -> Self {
        let store = MemoryStore::new(1 << 20);
        let idem = Idempotency::builder().store(store.clone()).build();
        Self::with(routes, &idem, store)
    }

    fn with(routes: Router<Ledger>, idem: &Idempotency, store: MemoryStore) -> Self {
        let ledger = Ledger::new();
        let app = routes.with_state(ledger.clone()).layer(idem.layer());
        Self { app, ledger, store }
    }

    async fn send(&self, request: http::Request<axum::body::Body>) -> Reply {
        send(&self.app, request).await
    }

    /// Records in the store, completed or in flight.
    fn records(&self) -> u64 {
        self.store.len()
    }
}

fn create_routes() -> Router<Ledger> {
    Router::new().route("/create", post(create)).route(
        "/optional",
        post(optional)
            .get(optional)
            .head(optional)
            .options(optional)
            .delete(optional),
    )
}

// ---------------------------------------------------------------------------------------------
// Missing keys and safe methods
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_key_on_a_required_route_is_a_400_and_the_handler_does_not_run() {
    let fx = Fixture::new(create_routes());
    let reply = fx.send(unkeyed("POST", "/create", "hello")).await;
    reply.assert_problem(400, "idempotency-key-missing");
    assert_eq!(fx.ledger.runs(), 0);
    assert_eq!(fx.records(), 0);
}

#[tokio::test]
async fn a_missing_key_on_an_optional_route_runs_every_time_and_records_nothing() {
    let fx = Fixture::new(create_routes());
    for run in 1..=3 {
        let reply = fx.send(unkeyed("POST", "/optional", "hello")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), format!("run {run}: hello"));
        assert!(!reply.replayed());
    }
    assert_eq!(fx.ledger.runs(), 3);
    assert_eq!(fx.records(), 0);
}

#[tokio::test]
async fn safe_methods_are_never_affected() {
    let fx = Fixture::new(create_routes());
    // A key on GET is ignored: no replay, no record, even a malformed key is no error.
    for (run, key) in [(1, "k"), (2, "k"), (3, "not a token")] {
        let reply = fx.send(keyed("GET", "/optional", key, "")).await;
        assert_eq!(reply.status, StatusCode::OK, "{key:?}");
        assert_eq!(reply.text(), format!("run {run}: "));
        assert!(!reply.replayed());
    }
    for method in ["HEAD", "OPTIONS"] {
        let reply = fx.send(keyed(method, "/optional", "k", "")).await;
        assert!(!reply.replayed(), "{method}");
    }
    assert_eq!(fx.records(), 0);
    // The key `k` is still free for an unsafe request.
    let reply = fx.send(keyed("POST", "/optional", "k", "")).await;
    assert_eq!(reply.text(), format!("run {}: ", fx.ledger.runs()));
    assert!(
        fx.send(keyed("POST", "/optional", "k", ""))
            .await
            .replayed()
    );
    // DELETE is not safe: it takes part.
    let delete = fx.send(keyed("DELETE", "/optional", "d", "")).await;
    assert!(!delete.replayed());
    let again = fx.send(keyed("DELETE", "/optional", "d", "")).await;
    assert!(again.replayed());
    assert_eq!(again.body, delete.body);
}

// ---------------------------------------------------------------------------------------------
// Key syntax
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_malformed_key_form_is_a_400_before_the_handler() {
    let fx = Fixture::new(create_routes());
    let too_long = "k".repeat(256);
    let too_long_quoted = format!("\"{}\"", "k".repeat(256));
    let forms: Vec<(&str, Vec<&[u8]>)> = vec![
        ("empty", vec![b""]),
        ("only spaces", vec![b"   "]),
        ("empty sf-string", vec![b"\"\""]),
        ("256 bytes", vec![too_long.as_bytes()]),
        ("256 bytes quoted", vec![too_long_quoted.as_bytes()]),
        ("tab inside", vec![b"a\tb"]),
        ("tab inside quotes", vec![b"\"a\tb\""]),
        ("non-ASCII", vec!["caf\u{e9}".as_bytes()]),
        ("non-ASCII quoted", vec!["\"caf\u{e9}\"".as_bytes()]),
        ("obs-text byte", vec![b"a\xffb"]),
        ("comma list", vec![b"a, b"]),
        ("sf-string list", vec![b"\"a\", \"b\""]),
        ("space inside a token", vec![b"a b"]),
        ("delimiters", vec![b"{key}"]),
        ("unterminated", vec![b"\"abc"]),
        ("text after the quote", vec![b"\"abc\"d"]),
        ("bad escape", vec![b"\"a\\nb\""]),
        ("trailing backslash", vec![b"\"abc\\\""]),
        ("two field lines", vec![b"a", b"a"]),
        ("two different field lines", vec![b"a", b"b"]),
    ];
    for (what, values) in forms {
        // Required or not, a key that is present must be valid.
        for uri in ["/create", "/optional"] {
            let mut builder = request("POST", uri);
            for value in &values {
                let value = HeaderValue::from_bytes(value).expect("a byte sequence HTTP allows");
                builder = builder.header(IDEMPOTENCY_KEY, value);
            }
            let reply = fx.send(builder.body("x".into()).unwrap()).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{what} on {uri}");
            reply.assert_problem(400, "idempotency-key-invalid");
        }
    }
    assert_eq!(fx.ledger.runs(), 0, "no malformed key may run the handler");
    assert_eq!(fx.records(), 0, "no malformed key may create a record");
}

#[tokio::test]
async fn keys_at_the_length_limit_and_in_every_valid_form_are_accepted() {
    let fx = Fixture::new(create_routes());
    let max = "k".repeat(255);
    let max_quoted = format!("\"{}\"", "q".repeat(255));
    let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let valid = [
        max.as_str(),
        max_quoted.as_str(),
        uuid,
        "1-starts-with-a-digit",
        "a!#$%&'*+-.^_`|~z",
        "\"with space and \\\"escapes\\\\\"",
        "  padded  ",
    ];
    for (run, key) in valid.iter().enumerate() {
        let reply = fx.send(keyed("POST", "/create", key, "x")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key:?}: {reply:?}");
        assert_eq!(reply.text(), format!("run {}: x", run + 1), "{key:?}");
        let again = fx.send(keyed("POST", "/create", key, "x")).await;
        assert!(again.replayed(), "{key:?} replays");
        assert_eq!(again.body, reply.body, "{key:?}");
    }
    assert_eq!(fx.ledger.runs(), valid.len());
}

#[tokio::test]
async fn quoted_and_bare_forms_name_the_same_key() {
    let fx = Fixture::new(create_routes());
    let first = fx.send(keyed("POST", "/create", "\"abc\"", "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let bare = fx.send(keyed("POST", "/create", "abc", "x")).await;
    assert!(bare.replayed(), "`abc` is the key `\"abc\"`");
    assert_eq!(bare.body, first.body);

    let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let unquoted = fx.send(keyed("POST", "/create", uuid, "x")).await;
    assert_eq!(unquoted.status, StatusCode::CREATED);
    assert!(!unquoted.replayed());
    let quoted = fx
        .send(keyed("POST", "/create", &format!("\"{uuid}\""), "x"))
        .await;
    assert!(quoted.replayed());
    assert_eq!(quoted.body, unquoted.body);
    assert_eq!(fx.ledger.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// First request and replay
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_first_request_runs_once_and_the_replay_is_byte_identical() {
    let fx = Fixture::new(create_routes());
    let first = fx.send(keyed("POST", "/create", "k1", "{\"a\":1}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: {\"a\":1}");
    assert!(!first.replayed(), "a first execution is not a replay");
    assert_eq!(fx.records(), 1);

    for _ in 0..3 {
        let replay = fx.send(keyed("POST", "/create", "k1", "{\"a\":1}")).await;
        assert_eq!(replay.status, first.status);
        assert_eq!(replay.body, first.body, "byte-identical body");
        assert!(replay.replayed());
    }
    assert_eq!(fx.ledger.runs(), 1);

    // Another key is another record.
    let other = fx.send(keyed("POST", "/create", "k2", "{\"a\":1}")).await;
    assert_eq!(other.text(), "run 2: {\"a\":1}");
    assert!(!other.replayed());
}

#[idempotent]
async fn with_headers(
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let run = ledger.run().await;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_static("session=s3cr3t"),
    );
    headers.insert(header::LOCATION, HeaderValue::from_static("/things/1"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.thing+json"),
    );
    headers.insert("x-request-id", HeaderValue::from(run));
    headers.insert(
        header::DATE,
        HeaderValue::from_static("Tue, 01 Jul 2025 10:00:00 GMT"),
    );
    headers.insert("x-ratelimit-remaining", HeaderValue::from_static("99"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    (
        StatusCode::CREATED,
        headers,
        format!("{{\"run\":{run},\"body\":{body}}}"),
    )
}

#[tokio::test]
async fn replays_keep_only_allow_listed_headers() {
    let fx = Fixture::new(Router::new().route("/things", post(with_headers)));
    let first = fx.send(keyed("POST", "/things", "k", "1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header(header::SET_COOKIE), Some("session=s3cr3t"));
    assert_eq!(first.header("x-request-id"), Some("1"));

    let replay = fx.send(keyed("POST", "/things", "k", "1")).await;
    assert!(replay.replayed());
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.header(header::LOCATION), Some("/things/1"));
    assert_eq!(
        replay.header(header::CONTENT_TYPE),
        Some("application/vnd.thing+json")
    );
    for dropped in [
        header::SET_COOKIE.as_str(),
        "x-request-id",
        header::DATE.as_str(),
        "x-ratelimit-remaining",
        header::CONNECTION.as_str(),
        header::WWW_AUTHENTICATE.as_str(),
    ] {
        assert_eq!(
            replay.header(dropped),
            None,
            "`{dropped}` must not be replayed"
        );
    }
    assert_eq!(fx.ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// Key reuse for a different request
// ---------------------------------------------------------------------------------------------

#[idempotent(required = true)]
async fn item(State(ledger): State<Ledger>, Path(id): Path<String>, body: String) -> String {
    let run = ledger.run().await;
    format!("run {run}: {id} {body}")
}

#[tokio::test]
async fn the_same_key_on_a_different_request_is_a_422() {
    let fx = Fixture::new(
        Router::new()
            .route("/items/{id}", post(item).put(item))
            .route("/other/{id}", post(item)),
    );
    let first = fx.send(keyed("POST", "/items/1?x=1", "k", "body")).await;
    assert_eq!(first.text(), "run 1: 1 body");

    let different = [
        ("body", keyed("POST", "/items/1?x=1", "k", "other body")),
        ("empty body", keyed("POST", "/items/1?x=1", "k", "")),
        ("path", keyed("POST", "/items/2?x=1", "k", "body")),
        ("query", keyed("POST", "/items/1?x=2", "k", "body")),
        ("no query", keyed("POST", "/items/1", "k", "body")),
        ("method", keyed("PUT", "/items/1?x=1", "k", "body")),
        ("route", keyed("POST", "/other/1?x=1", "k", "body")),
    ];
    for (what, request) in different {
        let reply = fx.send(request).await;
        reply.assert_problem(422, "idempotency-key-reused");
        assert_eq!(fx.ledger.runs(), 1, "a different {what} must not run");
    }
    // The original request still replays.
    let replay = fx.send(keyed("POST", "/items/1?x=1", "k", "body")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
}

// ---------------------------------------------------------------------------------------------
// Rejections before the handler
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Order {
    amount: u64,
}

/// Authentication in a parts extractor: `x-user: <id>`, else 401.
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

#[idempotent(required = true)]
async fn order(
    AuthUser(user): AuthUser,
    State(ledger): State<Ledger>,
    Json(order): Json<Order>,
) -> (StatusCode, String) {
    let run = ledger.run().await;
    (
        StatusCode::CREATED,
        format!("run {run}: {user} ordered {}", order.amount),
    )
}

fn order_request(key: &str, user: Option<&str>, body: &str) -> http::Request<axum::body::Body> {
    let mut builder = request("POST", "/orders")
        .header(IDEMPOTENCY_KEY, key)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(user) = user {
        builder = builder.header("x-user", user);
    }
    builder.body(body.to_owned().into()).unwrap()
}

#[tokio::test]
async fn a_rejected_request_leaves_the_key_free() {
    let fx = Fixture::new(
        Router::new()
            .route("/orders", post(order))
            .layer(DefaultBodyLimit::max(64)),
    );
    let rejected = [
        (
            "bad JSON",
            order_request("k", Some("ann"), "{\"amount\":"),
            400,
        ),
        (
            "wrong shape",
            order_request("k", Some("ann"), "{\"amount\":\"x\"}"),
            422,
        ),
        (
            "no content type",
            {
                let mut r = order_request("k", Some("ann"), "{\"amount\":5}");
                r.headers_mut().remove(header::CONTENT_TYPE);
                r
            },
            415,
        ),
        (
            "no authentication",
            order_request("k", None, "{\"amount\":5}"),
            401,
        ),
        (
            "body over the limit",
            order_request(
                "k",
                Some("ann"),
                &format!("{{\"amount\":5{}}}", " ".repeat(100)),
            ),
            413,
        ),
    ];
    for (what, request, status) in rejected {
        let reply = fx.send(request).await;
        assert_eq!(reply.status.as_u16(), status, "{what}: {reply:?}");
        assert!(!reply.replayed());
        assert_eq!(fx.ledger.runs(), 0, "{what} must not run the handler");
        assert_eq!(fx.records(), 0, "{what} must not create a record");
    }
    // The corrected retry with the same key runs normally, and only once.
    let ok = fx
        .send(order_request("k", Some("ann"), "{\"amount\":5}"))
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(ok.text(), "run 1: ann ordered 5");
    assert!(!ok.replayed());
    let replay = fx
        .send(order_request("k", Some("ann"), "{\"amount\":5}"))
        .await;
    assert!(replay.replayed());
    assert_eq!(fx.ledger.runs(), 1);
}

/// What idem answers itself when it cannot buffer the body to fingerprint it is a problem document
/// like its other errors: `413 payload-too-large` past the route's body limit (declared or found
/// while reading), `400 request-body-unreadable` when the body fails mid-read. Neither runs the
/// handler or records anything.
#[tokio::test]
async fn a_body_idem_cannot_buffer_is_a_problem_document() {
    let fx = Fixture::new(
        Router::new()
            .route("/orders", post(order))
            .layer(DefaultBodyLimit::max(64)),
    );
    let declared = order_request("k", Some("ann"), &" ".repeat(100));
    let chunked = {
        let chunks = ["{\"amount\":5", &" ".repeat(100), "}"]
            .map(|chunk| Ok::<_, std::io::Error>(bytes::Bytes::from(chunk.to_owned())));
        let mut request = order_request("k", Some("ann"), "");
        *request.body_mut() = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
        request
    };
    let broken = {
        let chunks = [
            Ok(bytes::Bytes::from_static(b"{\"amount\"")),
            Err(std::io::Error::other("the client went away")),
        ];
        let mut request = order_request("k", Some("ann"), "");
        *request.body_mut() = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
        request
    };
    for (what, request, status, slug) in [
        (
            "declared length over the limit",
            declared,
            413,
            "payload-too-large",
        ),
        ("streamed past the limit", chunked, 413, "payload-too-large"),
        ("failed mid-read", broken, 400, "request-body-unreadable"),
    ] {
        let reply = fx.send(request).await;
        let document = reply.assert_problem(status, slug);
        assert!(
            document["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
        assert_eq!(fx.ledger.runs(), 0, "{what} must not run the handler");
        assert_eq!(fx.records(), 0, "{what} must not create a record");
    }
}

// ---------------------------------------------------------------------------------------------
// Which responses are recorded
// ---------------------------------------------------------------------------------------------

/// Answers with the status given in the body.
async fn echo_status(ledger: &Ledger, body: &str) -> (StatusCode, String) {
    let run = ledger.run().await;
    let status = StatusCode::from_u16(body.parse().expect("a status in the body")).unwrap();
    (status, format!("run {run}: {status}"))
}

#[idempotent]
async fn status_default(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    echo_status(&ledger, &body).await
}

#[idempotent(store = "all")]
async fn status_all(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    echo_status(&ledger, &body).await
}

#[idempotent(store = "2xx")]
async fn status_2xx(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    echo_status(&ledger, &body).await
}

fn status_routes() -> Fixture {
    Fixture::new(
        Router::new()
            .route("/default", post(status_default))
            .route("/all", post(status_all))
            .route("/2xx", post(status_2xx)),
    )
}

/// Sends the same keyed request twice and says whether the second was a replay, checking that a
/// replay repeats the first answer and that a non-replay ran the handler again.
async fn second_is_replayed(fx: &Fixture, route: &str, status: u16) -> bool {
    let key = format!("{}-{status}", route.trim_start_matches('/'));
    let body = status.to_string();
    let before = fx.ledger.runs();
    let first = fx.send(keyed("POST", route, &key, body.clone())).await;
    assert_eq!(first.status.as_u16(), status);
    assert!(!first.replayed());
    let second = fx.send(keyed("POST", route, &key, body)).await;
    assert_eq!(second.status.as_u16(), status, "{route} {status}");
    if second.replayed() {
        assert_eq!(second.body, first.body);
        assert_eq!(fx.ledger.runs(), before + 1, "{route} {status}: replayed");
        true
    } else {
        assert_ne!(second.body, first.body, "{route} {status}: ran again");
        assert_eq!(fx.ledger.runs(), before + 2, "{route} {status}: ran again");
        false
    }
}

#[tokio::test]
async fn server_errors_are_not_recorded_and_a_retry_runs_again() {
    let fx = status_routes();
    for status in [500, 502, 503, 504] {
        assert!(
            !second_is_replayed(&fx, "/default", status).await,
            "{status}"
        );
    }
}

#[tokio::test]
async fn deterministic_client_errors_are_recorded_and_replayed() {
    let fx = status_routes();
    for status in [200, 201, 204, 400, 402, 404, 409, 422] {
        assert!(
            second_is_replayed(&fx, "/default", status).await,
            "{status}"
        );
    }
}

#[tokio::test]
async fn transient_client_errors_are_not_recorded_by_default() {
    let fx = status_routes();
    for status in [408, 425, 429] {
        assert!(
            !second_is_replayed(&fx, "/default", status).await,
            "{status}"
        );
    }
}

#[tokio::test]
async fn store_all_records_server_errors() {
    let fx = status_routes();
    for status in [201, 402, 429, 500, 503] {
        assert!(second_is_replayed(&fx, "/all", status).await, "{status}");
    }
}

#[tokio::test]
async fn store_2xx_records_only_successes() {
    let fx = status_routes();
    assert!(second_is_replayed(&fx, "/2xx", 201).await);
    for status in [302, 402, 422, 500] {
        assert!(!second_is_replayed(&fx, "/2xx", status).await, "{status}");
    }
}

// ---------------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------------

#[idempotent(required = true)]
async fn panics_first(State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.run().await;
    assert!(
        run != 1,
        "the first execution panics (expected by the test)"
    );
    format!("run {run}: {body}")
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_problem_and_releases_the_key() {
    let fx = Fixture::new(Router::new().route("/panics", post(panics_first)));
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

// ---------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------

#[idempotent(required = true, scope = user)]
async fn scoped(AuthUser(user): AuthUser, State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.run().await;
    format!("run {run}: {user} {body}")
}

#[idempotent(required = true)]
async fn unscoped(AuthUser(user): AuthUser, State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.run().await;
    format!("run {run}: {user} {body}")
}

fn as_user(uri: &str, user: &str, key: &str) -> http::Request<axum::body::Body> {
    request("POST", uri)
        .header("x-user", user)
        .header(IDEMPOTENCY_KEY, key)
        .body("same body".into())
        .unwrap()
}

#[tokio::test]
async fn a_scoped_key_is_private_to_its_principal() {
    let fx = Fixture::new(Router::new().route("/scoped", post(scoped)));
    let ann = fx.send(as_user("/scoped", "ann", "shared-key")).await;
    let bob = fx.send(as_user("/scoped", "bob", "shared-key")).await;
    assert_eq!(ann.text(), "run 1: ann same body");
    assert_eq!(
        bob.text(),
        "run 2: bob same body",
        "bob must not get ann's response"
    );
    assert!(!bob.replayed());

    let ann_again = fx.send(as_user("/scoped", "ann", "shared-key")).await;
    let bob_again = fx.send(as_user("/scoped", "bob", "shared-key")).await;
    assert!(ann_again.replayed() && bob_again.replayed());
    assert_eq!(ann_again.body, ann.body);
    assert_eq!(bob_again.body, bob.body);
    assert_eq!(fx.ledger.runs(), 2);
    assert_eq!(fx.records(), 2);
}

#[tokio::test]
async fn an_unscoped_key_is_shared_between_principals() {
    // The documented risk of routes without `scope`: one global key space.
    let fx = Fixture::new(Router::new().route("/unscoped", post(unscoped)));
    let ann = fx.send(as_user("/unscoped", "ann", "shared-key")).await;
    let bob = fx.send(as_user("/unscoped", "bob", "shared-key")).await;
    assert_eq!(ann.text(), "run 1: ann same body");
    assert!(bob.replayed(), "unscoped: bob gets ann's recorded response");
    assert_eq!(bob.body, ann.body);
    assert_eq!(fx.ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// The handler's idempotency context
// ---------------------------------------------------------------------------------------------

#[idempotent]
async fn context(
    context: IdempotencyContext,
    State(ledger): State<Ledger>,
    _body: String,
) -> Json<serde_json::Value> {
    ledger.run().await;
    Json(serde_json::json!({
        "key": context.key(),
        "epoch": context.epoch(),
        "lease_lost": context.lease_lost(),
    }))
}

#[tokio::test]
async fn the_handler_sees_its_key_and_epoch_only_inside_idempotent_execution() {
    let fx = Fixture::new(Router::new().route("/context", post(context).get(context)));
    let keyed_reply = fx.send(keyed("POST", "/context", "\"my-key\"", "")).await;
    assert_eq!(
        keyed_reply.json(),
        serde_json::json!({"key": "my-key", "epoch": 1, "lease_lost": false})
    );
    let none = serde_json::json!({"key": null, "epoch": null, "lease_lost": false});
    let no_key = fx.send(unkeyed("POST", "/context", "")).await;
    assert_eq!(no_key.json(), none, "no key: not idempotent");
    let safe = fx.send(keyed("GET", "/context", "my-key", "")).await;
    assert_eq!(safe.json(), none, "safe method: not idempotent");
}

// ---------------------------------------------------------------------------------------------
// Wiring, problems, store failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_route_without_the_layer_fails_loudly_and_does_not_run() {
    let ledger = Ledger::new();
    let app = Router::new()
        .route("/create", post(create))
        .with_state(ledger.clone());
    for request in [
        keyed("POST", "/create", "k", "x"),
        unkeyed("POST", "/create", "x"),
    ] {
        let reply = send(&app, request).await;
        reply.assert_problem(500, "idempotency-not-configured");
    }
    assert_eq!(
        ledger.runs(),
        0,
        "an unwired route must never run unprotected"
    );
}

#[tokio::test]
async fn a_layer_added_before_the_route_does_not_cover_it() {
    // `Router::layer` wraps only the routes added before it: the late route is unwired and says so.
    let ledger = Ledger::new();
    let idem = Idempotency::builder().build();
    let app = Router::new()
        .route("/covered", post(create))
        .layer(idem.layer())
        .route("/late", post(create))
        .with_state(ledger.clone());
    let covered = send(&app, keyed("POST", "/covered", "k", "x")).await;
    assert_eq!(covered.status, StatusCode::CREATED);
    let late = send(&app, keyed("POST", "/late", "k", "x")).await;
    late.assert_problem(500, "idempotency-not-configured");
    assert_eq!(ledger.runs(), 1);
}

/// A store that is never reachable.
struct Unreachable;

impl Store for Unreachable {
    fn acquire<'a>(&'a self, _: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        StoreFuture::new(async { Err(StoreError::Unavailable("connection refused".into())) })
    }

    fn renew<'a>(&'a self, _: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async { Err(StoreError::Unavailable("connection refused".into())) })
    }

    fn complete<'a>(&'a self, _: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async { Err(StoreError::Unavailable("connection refused".into())) })
    }

    fn release<'a>(&'a self, _: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        StoreFuture::new(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
}

#[tokio::test]
async fn an_unreachable_store_is_a_503_with_retry_after_and_the_handler_does_not_run() {
    let idem = Idempotency::builder().store(Unreachable).build();
    let fx = Fixture::with(create_routes(), &idem, MemoryStore::new(1));
    for _ in 0..2 {
        let reply = fx.send(keyed("POST", "/create", "k", "x")).await;
        reply.assert_problem(503, "store-unavailable");
        assert!(reply.retry_after() >= 1);
    }
    assert_eq!(fx.ledger.runs(), 0);
    // Requests that do not use the store are unaffected.
    let no_key = fx.send(unkeyed("POST", "/optional", "x")).await;
    assert_eq!(no_key.status, StatusCode::OK);
    let safe = fx.send(keyed("GET", "/optional", "k", "")).await;
    assert_eq!(safe.status, StatusCode::OK);
}

#[tokio::test]
async fn the_problem_base_is_configurable() {
    let base = "https://errors.example.com/idem/";
    let idem = Idempotency::builder().problem_base(base).build();
    let fx = Fixture::with(create_routes(), &idem, MemoryStore::new(1));
    let reply = fx.send(unkeyed("POST", "/create", "x")).await;
    reply.assert_problem_under(base, 400, "idempotency-key-missing");
    let reply = fx.send(keyed("POST", "/create", "a, b", "x")).await;
    reply.assert_problem_under(base, 400, "idempotency-key-invalid");
}

#[tokio::test]
async fn a_custom_problem_renderer_is_used_and_idem_keeps_its_headers() {
    let idem = Idempotency::builder()
        .problem_renderer(|problem: &Problem| -> Response {
            (
                problem.status(),
                [(header::CONTENT_TYPE, "text/plain")],
                format!(
                    "custom {} {}",
                    problem.status().as_u16(),
                    problem.kind().slug()
                ),
            )
                .into_response()
        })
        .build();
    let fx = Fixture::with(create_routes(), &idem, MemoryStore::new(1));
    let reply = fx.send(unkeyed("POST", "/create", "x")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.text(), "custom 400 idempotency-key-missing");
    assert_eq!(reply.header(header::CONTENT_TYPE), Some("text/plain"));
    assert_eq!(reply.header(header::CACHE_CONTROL), Some("no-store"));

    fx.send(keyed("POST", "/create", "k", "x")).await;
    let reused = fx.send(keyed("POST", "/create", "k", "y")).await;
    assert_eq!(reused.text(), "custom 422 idempotency-key-reused");
    assert_eq!(fx.ledger.runs(), 1);

    let unreachable = Idempotency::builder()
        .store(Unreachable)
        .problem_renderer(|problem: &Problem| -> Response {
            (problem.status(), problem.kind().slug()).into_response()
        })
        .build();
    let fx = Fixture::with(create_routes(), &unreachable, MemoryStore::new(1));
    let reply = fx.send(keyed("POST", "/create", "k", "x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "store-unavailable");
    assert!(
        reply.retry_after() >= 1,
        "idem adds Retry-After to custom bodies"
    );
    assert_eq!(reply.header(header::CACHE_CONTROL), Some("no-store"));
}

// ---------------------------------------------------------------------------------------------
// Nested routers
// ---------------------------------------------------------------------------------------------

/// Like [`item`], for routes with more than one path parameter: answers with the last one.
#[idempotent(required = true)]
async fn nested_item(
    State(ledger): State<Ledger>,
    Path(params): Path<Vec<(String, String)>>,
    body: String,
) -> String {
    let run = ledger.run().await;
    let id = params.last().map(|(_, id)| id.as_str()).unwrap_or_default();
    format!("run {run}: {id} {body}")
}

#[tokio::test]
async fn under_router_nest_the_fingerprint_uses_the_original_path() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let items: Router<Ledger> = Router::new().route("/items/{id}", post(nested_item));
    let app = Router::new()
        .nest("/v1/a", items.clone())
        .nest("/v1/{tenant}", items)
        .with_state(ledger.clone())
        .layer(idem.layer());

    let first = send(&app, keyed("POST", "/v1/a/items/x", "k", "body")).await;
    assert_eq!(first.text(), "run 1: x body");
    let reply = send(&app, keyed("POST", "/v1/a/items/y", "k", "body")).await;
    reply.assert_problem(422, "idempotency-key-reused");

    // Two tenants under one nested route template: the nested router sees `/items/x` for both,
    // so only the original path tells them apart.
    let acme = send(&app, keyed("POST", "/v1/acme/items/x", "t", "body")).await;
    assert_eq!(acme.text(), "run 2: x body");
    let globex = send(&app, keyed("POST", "/v1/globex/items/x", "t", "body")).await;
    globex.assert_problem(422, "idempotency-key-reused");
    let acme_again = send(&app, keyed("POST", "/v1/acme/items/x", "t", "body")).await;
    assert!(acme_again.replayed());
    assert_eq!(ledger.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// Handler shapes
// ---------------------------------------------------------------------------------------------

#[idempotent(required = true)]
async fn no_parameters() -> &'static str {
    "no parameters"
}

#[idempotent(required = true)]
async fn path_last(State(ledger): State<Ledger>, Path(id): Path<u64>) -> String {
    let run = ledger.run().await;
    format!("run {run}: {id}")
}

#[tokio::test]
async fn handlers_without_a_body_extractor_still_fingerprint_the_body() {
    let fx = Fixture::new(
        Router::new()
            .route("/none", post(no_parameters))
            .route("/path/{id}", post(path_last)),
    );
    let first = fx.send(keyed("POST", "/none", "k", "a")).await;
    assert_eq!(first.text(), "no parameters");
    assert!(fx.send(keyed("POST", "/none", "k", "a")).await.replayed());
    fx.send(keyed("POST", "/none", "k", "b"))
        .await
        .assert_problem(422, "idempotency-key-reused");

    let first = fx.send(keyed("POST", "/path/7", "p", "a")).await;
    assert_eq!(first.text(), "run 1: 7");
    assert!(fx.send(keyed("POST", "/path/7", "p", "a")).await.replayed());
    fx.send(keyed("POST", "/path/7", "p", "b"))
        .await
        .assert_problem(422, "idempotency-key-reused");
    fx.send(unkeyed("POST", "/path/7", ""))
        .await
        .assert_problem(400, "idempotency-key-missing");
    assert_eq!(fx.ledger.runs(), 1);
}

#[tokio::test]
async fn get_routes_next_to_idempotent_ones_are_untouched() {
    let fx = Fixture::new(create_routes().route("/plain", get(|| async { "plain" })));
    let reply = fx.send(unkeyed("GET", "/plain", "")).await;
    assert_eq!(reply.text(), "plain");
    assert!(!reply.replayed());
}

#[tokio::test]
async fn replay_header_extends_the_allow_list_but_never_to_credentials() {
    let idem = Idempotency::builder()
        .replay_header(http::HeaderName::from_static("x-request-id"))
        .replay_header(header::SET_COOKIE)
        .replay_header(header::WWW_AUTHENTICATE)
        .build();
    let fx = Fixture::with(
        Router::new().route("/things", post(with_headers)),
        &idem,
        MemoryStore::new(1),
    );
    let first = fx.send(keyed("POST", "/things", "k", "1")).await;
    let replay = fx.send(keyed("POST", "/things", "k", "1")).await;
    assert!(replay.replayed());
    assert_eq!(replay.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(replay.header(header::LOCATION), Some("/things/1"));
    assert_eq!(
        replay.header(header::SET_COOKIE),
        None,
        "cookies are never replayed"
    );
    assert_eq!(replay.header(header::WWW_AUTHENTICATE), None);
}

#[tokio::test]
async fn fail_open_runs_unprotected_and_says_so() {
    let idem = Idempotency::builder()
        .store(Unreachable)
        .fail_open(true)
        .build();
    let fx = Fixture::with(create_routes(), &idem, MemoryStore::new(1));
    for run in 1..=2 {
        let reply = fx.send(keyed("POST", "/create", "k", "x")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.text(), format!("run {run}: x"));
        assert_eq!(reply.header("idempotent-unprotected"), Some("true"));
        assert!(!reply.replayed());
    }
}

#[idempotent(required = true)]
async fn failing_body(State(ledger): State<Ledger>, _body: String) -> axum::body::Body {
    let run = ledger.run().await;
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok(format!("run {run} part 1;")),
        Err(std::io::Error::other("the response stream broke")),
    ];
    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_response_body_that_fails_is_not_recorded_and_the_key_is_released() {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let fx = Fixture::new(Router::new().route("/fails", post(failing_body)));
    for run in 1..=2 {
        let response = fx
            .app
            .clone()
            .oneshot(keyed("POST", "/fails", "k", "x"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers().get("idempotent-replayed"), None);
        let body = response.into_body().collect().await;
        assert!(body.is_err(), "the client sees the body fail");
        assert_eq!(fx.ledger.runs(), run, "a retry runs again");
    }
}

// ---------------------------------------------------------------------------------------------
// The wrapped extractor runs only when it has to
// ---------------------------------------------------------------------------------------------

/// How many times [`Counted`] ran, per test (each test uses its own `x-counter` slot).
static EXTRACTIONS: [std::sync::atomic::AtomicUsize; 2] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 2];

/// A body extractor that counts its runs and, like `Json` with `Content-Type`, rejects a request
/// without `x-valid: yes` whatever its body.
struct Counted(String);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Counted {
    type Rejection = (StatusCode, &'static str);

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let slot = request
            .headers()
            .get("x-counter")
            .and_then(|value| value.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        EXTRACTIONS[slot].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if request
            .headers()
            .get("x-valid")
            .is_none_or(|value| value != "yes")
        {
            return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "x-valid: yes expected"));
        }
        let body = String::from_request(request, state)
            .await
            .map_err(|_| (StatusCode::BAD_REQUEST, "not text"))?;
        Ok(Self(body))
    }
}

#[idempotent(required = true)]
async fn counted(State(ledger): State<Ledger>, Counted(body): Counted) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

fn counted_request(
    slot: usize,
    key: &str,
    valid: bool,
    body: &str,
) -> http::Request<axum::body::Body> {
    let mut builder = request("POST", "/counted")
        .header(IDEMPOTENCY_KEY, key)
        .header("x-counter", slot.to_string());
    if valid {
        builder = builder.header("x-valid", "yes");
    }
    builder.body(body.to_owned().into()).unwrap()
}

fn extractions(slot: usize) -> usize {
    EXTRACTIONS[slot].load(std::sync::atomic::Ordering::SeqCst)
}

/// The embedded store answers completed records from memory: a replay neither runs the handler
/// nor its extractor (the body is not parsed again), so a retry carrying the same request but a
/// header the extractor would now refuse still gets the recorded answer. A request the extractor
/// rejects before any record exists leaves the key free.
#[tokio::test]
async fn a_replay_from_memory_does_not_run_the_wrapped_extractor() {
    const SLOT: usize = 0;
    let fx = Fixture::new(Router::new().route("/counted", post(counted)));

    let rejected = fx.send(counted_request(SLOT, "k", false, "five")).await;
    assert_eq!(rejected.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        (extractions(SLOT), fx.ledger.runs(), fx.records()),
        (1, 0, 0)
    );

    let first = fx.send(counted_request(SLOT, "k", true, "five")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: five");
    assert_eq!(extractions(SLOT), 2);

    for valid in [true, false] {
        let replay = fx.send(counted_request(SLOT, "k", valid, "five")).await;
        assert!(replay.replayed(), "valid: {valid}");
        assert_eq!(replay.body, first.body);
    }
    let reused = fx.send(counted_request(SLOT, "k", true, "six")).await;
    reused.assert_problem(422, "idempotency-key-reused");
    assert_eq!(
        (extractions(SLOT), fx.ledger.runs()),
        (2, 1),
        "answered from memory: neither the extractor nor the handler ran again"
    );
}

/// A store that holds nothing in process memory (like Redis): every acquire asks it.
#[derive(Clone, Default)]
struct Remote(MemoryStore);

impl Store for Remote {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        self.0.acquire(request)
    }
    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        self.0.renew(request)
    }
    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        self.0.complete(request)
    }
    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        self.0.release(request)
    }
}

/// Without an answer from memory the extractor runs before the store is asked (a request it
/// rejects never reaches the store), and the store's replay still skips the handler.
#[tokio::test]
async fn without_an_answer_from_memory_the_extractor_runs_before_the_store() {
    const SLOT: usize = 1;
    let remote = Remote::default();
    let idem = Idempotency::builder().store(remote.clone()).build();
    let fx = Fixture::with(
        Router::new().route("/counted", post(counted)),
        &idem,
        remote.0,
    );
    let first = fx.send(counted_request(SLOT, "k", true, "five")).await;
    assert_eq!(first.text(), "run 1: five");
    let replay = fx.send(counted_request(SLOT, "k", true, "five")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!((extractions(SLOT), fx.ledger.runs()), (2, 1));

    let rejected = fx.send(counted_request(SLOT, "k", false, "five")).await;
    assert_eq!(rejected.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!((extractions(SLOT), fx.ledger.runs()), (3, 1));
}

#[derive(Deserialize)]
struct Import {
    tenant: String,
    rows: u64,
}

/// The scope comes out of the wrapped extractor itself: it runs before the lookup.
#[idempotent(required = true, scope = tenant)]
async fn import(
    State(ledger): State<Ledger>,
    Json(Import { tenant, rows }): Json<Import>,
) -> String {
    let run = ledger.run().await;
    format!("run {run}: {rows} rows for {tenant}")
}

#[tokio::test]
async fn a_scope_taken_from_the_body_keeps_principals_apart() {
    let fx = Fixture::new(Router::new().route("/import", post(import)));
    let send = |tenant: &str, rows: u64| {
        let request = request("POST", "/import")
            .header(IDEMPOTENCY_KEY, "shared-key")
            .header(header::CONTENT_TYPE, "application/json")
            .body(format!("{{\"tenant\":\"{tenant}\",\"rows\":{rows}}}").into())
            .unwrap();
        fx.send(request)
    };
    let ann = send("ann", 3).await;
    let bob = send("bob", 3).await;
    assert_eq!(ann.text(), "run 1: 3 rows for ann");
    assert_eq!(bob.text(), "run 2: 3 rows for bob");
    let ann_again = send("ann", 3).await;
    assert!(ann_again.replayed());
    assert_eq!(ann_again.body, ann.body);
    send("ann", 4)
        .await
        .assert_problem(422, "idempotency-key-reused");

    let malformed = request("POST", "/import")
        .header(IDEMPOTENCY_KEY, "other-key")
        .header(header::CONTENT_TYPE, "application/json")
        .body("{\"tenant\":".into())
        .unwrap();
    assert_eq!(fx.send(malformed).await.status, StatusCode::BAD_REQUEST);
    assert_eq!((fx.ledger.runs(), fx.records()), (2, 2));
}
