//! The router-wide form over a real Redis (each test starts its own `redis-server`), through
//! [`RedisInstance`]s: a runtime over a `TieredStore` in front of a `RedisStore`, with a
//! [`Policy`] on its layer. The same behaviours as `router_wide.rs` on the embedded store: first
//! execution, replay, `422`, `409`, released `5xx`; and what only a shared store shows: two
//! instances behaving as one, the round trips of each form, and records written by one form on
//! one instance replayed by the other form on another.

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::post;
use http::{HeaderName, Request, StatusCode, header};
use idem_runtime::fingerprint::{RecordKey, scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::{Idempotency, Policy, StorePolicy, idempotent};
use idem_tests::instances::{RedisInstance, record_exists, record_key};
use idem_tests::redis::RedisServer;
use idem_tests::support::{IDEMPOTENCY_KEY, Ledger, Reply, keyed, request, wait_idle, within};

// ---------------------------------------------------------------------------------------------
// Handlers and instances
// ---------------------------------------------------------------------------------------------

/// `201` with the body's text tagged with the execution number (a replay shows an old number) and
/// a `Location` naming the execution.
async fn create(
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, [(HeaderName, String); 1], String) {
    let run = ledger.run().await;
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/orders/{run}"))],
        format!("run {run}: {body}"),
    )
}

/// Answers with the status given in the body.
async fn echo_status(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    let status = StatusCode::from_u16(body.parse().expect("a status in the body")).unwrap();
    (status, format!("run {run}: {status}"))
}

/// Authentication in a parts extractor: `x-user: <id>`, else `401`.
struct AuthUser(String);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, StatusCode> {
        parts
            .headers
            .get("x-user")
            .and_then(|value| value.to_str().ok())
            .map(|user| Self(user.to_owned()))
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

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
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/orders/{run}"))],
        format!("run {run}: {user} {body}"),
    )
}

/// One app instance: the router-wide form over the Redis of `server`.
type App = RedisInstance<Ledger>;

/// `/orders` and `/status` (neither attributed) behind `policy`, on an instance over `server`,
/// counted by `ledger` (share it between instances to count the runs of the whole fleet).
async fn router_wide(server: &RedisServer, policy: Policy, ledger: &Ledger) -> App {
    let routes = Router::new()
        .route("/orders", post(create))
        .route("/status", post(echo_status));
    RedisInstance::start_router_wide(
        &server.url(),
        Idempotency::builder(),
        policy,
        routes,
        ledger.clone(),
    )
    .await
}

/// The policy scoping keys by the user, as the attribute's `scope = user` does.
fn scoped_by_user() -> Policy {
    Policy::new().scope_by::<AuthUser, _, _>(|AuthUser(user)| user.clone())
}

/// `POST /orders` as `user` with `key` and `body`.
fn order_as(user: &str, key: &str, body: &str) -> Request<Body> {
    request("POST", "/orders")
        .header("x-user", user)
        .header(IDEMPOTENCY_KEY, key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// The record key of client key `key` scoped by `user`.
fn user_record_key(user: &str, key: &str) -> RecordKey {
    let key = IdempotencyKey::parse_bytes(key.as_bytes()).expect("a valid key");
    RecordKey::new(&scope(user), &key)
}

/// `EVALSHA` calls so far: each store transition is one.
fn evalsha_calls(server: &RedisServer) -> u64 {
    server.command_calls().get("evalsha").copied().unwrap_or(0)
}

/// Asserts that `replay` repeats `first`: status, body and `Location`, marked replayed.
#[track_caller]
fn assert_replays(replay: &Reply, first: &Reply) {
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body, "byte-identical body");
    assert_eq!(
        replay.header(header::LOCATION),
        first.header(header::LOCATION)
    );
}

// ---------------------------------------------------------------------------------------------
// One instance
// ---------------------------------------------------------------------------------------------

/// A keyed request runs once and its record is in Redis; the replay comes from the instance's
/// cache and, with the cache cleared, from Redis, byte for byte; a different request with the key
/// is `422` and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_execution_replay_and_422_over_redis() {
    let server = RedisServer::start();
    let ledger = Ledger::new();
    let app = router_wide(&server, Policy::new(), &ledger).await;

    let first = app.send(keyed("POST", "/orders", "k", "pay 10")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: pay 10");
    assert!(!first.replayed());
    assert!(
        record_exists(&server, &record_key("k")),
        "recorded in Redis"
    );

    let cached = app.send(keyed("POST", "/orders", "k", "pay 10")).await;
    assert_replays(&cached, &first);
    app.store.clear_cache();
    let from_redis = app.send(keyed("POST", "/orders", "k", "pay 10")).await;
    assert_replays(&from_redis, &first);

    for different in [
        keyed("POST", "/orders", "k", "pay 99"),
        keyed("POST", "/orders?x=1", "k", "pay 10"),
        keyed("PATCH", "/orders", "k", "pay 10"),
    ] {
        app.send(different)
            .await
            .assert_problem(422, "idempotency-key-reused");
    }
    assert_eq!(ledger.runs(), 1);
}

/// While the first request runs (held at the gate), a duplicate is `409 request-in-progress` with
/// `Retry-After` and does not run; once the first finishes the duplicate replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_over_redis_is_a_409_then_a_replay() {
    let server = RedisServer::start();
    let ledger = Ledger::gated();
    let app = router_wide(&server, Policy::new(), &ledger).await;

    let first = app.start_send(keyed("POST", "/orders", "dup", "x")).await;
    let duplicate = app.send(keyed("POST", "/orders", "dup", "x")).await;
    duplicate.assert_problem(409, "request-in-progress");
    assert!(duplicate.retry_after() >= 1);
    assert_eq!(ledger.runs(), 1);

    ledger.open();
    let first = within("the first request", first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let later = app.send(keyed("POST", "/orders", "dup", "x")).await;
    assert_replays(&later, &first);
    assert_eq!(ledger.runs(), 1);
}

/// A `5xx` releases the key in Redis, so a retry runs again; under `store(StorePolicy::All)` it is
/// recorded and replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_over_redis_are_released_unless_the_policy_stores_them() {
    let server = RedisServer::start();
    let ledger = Ledger::new();
    let default = router_wide(&server, Policy::new(), &ledger).await;
    let status = |key: &str| keyed("POST", "/status", key, "503");

    let failed = default.send(status("s")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.text(), "run 1: 503 Service Unavailable");
    let retry = default.send(status("s")).await;
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "run 2: 503 Service Unavailable", "ran again");

    let all = router_wide(&server, Policy::new().store(StorePolicy::All), &ledger).await;
    let recorded = all.send(status("a")).await;
    assert_eq!(recorded.text(), "run 3: 503 Service Unavailable");
    all.store.clear_cache();
    let replay = all.send(status("a")).await;
    assert_replays(&replay, &recorded);
    assert_eq!(ledger.runs(), 3);
}

// ---------------------------------------------------------------------------------------------
// Two instances
// ---------------------------------------------------------------------------------------------

/// Two instances of a router-wide service over one Redis behave as one: a duplicate on the other
/// instance is `409` while the first runs and a replay once it finished, a reused key is `422` on
/// either, scopes from the policy keep users apart across instances, and a storm of duplicates
/// spread over both runs each key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behave_as_one_for_a_router_wide_route() {
    const KEYS: usize = 6;
    const COPIES: usize = 6;
    let server = RedisServer::start();
    let ledger = Ledger::gated();
    let a = router_wide(&server, scoped_by_user(), &ledger).await;
    let b = router_wide(&server, scoped_by_user(), &ledger).await;

    let held = a.start_send(order_as("ann", "k1", "pay 10")).await;
    b.send(order_as("ann", "k1", "pay 10"))
        .await
        .assert_problem(409, "request-in-progress");
    ledger.open();
    let first = within("the first request", held).await.unwrap();
    assert_eq!(first.text(), "run 1: pay 10");
    assert_replays(&b.send(order_as("ann", "k1", "pay 10")).await, &first);
    for app in [&a, &b] {
        app.send(order_as("ann", "k1", "pay 99"))
            .await
            .assert_problem(422, "idempotency-key-reused");
    }
    assert!(record_exists(&server, &user_record_key("ann", "k1")));

    let bob = b.send(order_as("bob", "k1", "pay 10")).await;
    assert!(!bob.replayed(), "bob must not get ann's response");
    assert_eq!(bob.text(), "run 2: pay 10");
    assert_replays(&a.send(order_as("bob", "k1", "pay 10")).await, &bob);
    assert_eq!(ledger.runs(), 2);

    let mut storm = Vec::new();
    for copy in 0..COPIES {
        for key in 0..KEYS {
            let app = if (copy + key) % 2 == 0 { &a } else { &b };
            let request = order_as("carol", &format!("s{key}"), &format!("storm {key}"));
            storm.push(app.spawn_send(request));
        }
    }
    for task in storm {
        let reply = within("a request of the storm", task).await.unwrap();
        assert!(
            reply.status == StatusCode::CREATED || reply.status == StatusCode::CONFLICT,
            "{reply:?}"
        );
    }
    wait_idle(&a.idem).await;
    wait_idle(&b.idem).await;
    assert_eq!(ledger.runs(), 2 + KEYS, "each key of the storm ran once");
    for key in 0..KEYS {
        let (name, body) = (format!("s{key}"), format!("storm {key}"));
        let from_a = a.send(order_as("carol", &name, &body)).await;
        let from_b = b.send(order_as("carol", &name, &body)).await;
        assert!(from_a.replayed() && from_b.replayed(), "{name}");
        assert_eq!(from_a.body, from_b.body);
    }
}

/// A router-wide route costs what an attributed one does: a first execution is 2 round trips
/// (acquire, complete), a replay from Redis 1, a replay from an instance's cache none. An attributed route under a policy scoped the same way costs the same 2 on its
/// first request: the attribute adopts the layer's claim instead of acquiring again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_are_the_attributes() {
    let server = RedisServer::start();
    let ledger = Ledger::new();
    let a = router_wide(&server, scoped_by_user(), &ledger).await;
    let b = router_wide(&server, scoped_by_user(), &ledger).await;

    let before = evalsha_calls(&server);
    let first = a.send(order_as("ann", "rt", "pay 1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    wait_idle(&a.idem).await;
    assert_eq!(evalsha_calls(&server) - before, 2, "acquire + complete");

    // An instance does not cache its own result: each instance's first replay asks Redis once,
    // the next ones none.
    for app in [&a, &b] {
        let before = evalsha_calls(&server);
        assert_replays(&app.send(order_as("ann", "rt", "pay 1")).await, &first);
        assert_eq!(evalsha_calls(&server) - before, 1, "a replay from Redis");
        let before = evalsha_calls(&server);
        assert_replays(&app.send(order_as("ann", "rt", "pay 1")).await, &first);
        assert_eq!(evalsha_calls(&server), before, "a replay from the cache");
    }

    let routes = Router::new().route("/orders", post(attributed_order));
    let attributed = RedisInstance::start_router_wide(
        &server.url(),
        Idempotency::builder(),
        scoped_by_user(),
        routes,
        ledger.clone(),
    )
    .await;
    let before = evalsha_calls(&server);
    let adopted = attributed.send(order_as("bob", "rt", "pay 1")).await;
    assert_eq!(adopted.status, StatusCode::CREATED);
    wait_idle(&attributed.idem).await;
    assert_eq!(
        evalsha_calls(&server) - before,
        2,
        "the layer's claim is adopted: acquire + complete"
    );
}

/// The two forms write identical records in Redis: the same route (method, path, scope) served
/// by one instance through the attribute and by another through the policy; a request recorded
/// by either is replayed by the other (status, body, `Location`), a different request with its
/// key is `422` on the other, and each key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_identical_across_forms_and_instances() {
    let server = RedisServer::start();
    let ledger = Ledger::new();
    let attribute = RedisInstance::start(
        &server.url(),
        Idempotency::builder(),
        Router::new().route("/orders", post(attributed_order)),
        ledger.clone(),
    )
    .await;
    let policy = RedisInstance::start_router_wide(
        &server.url(),
        Idempotency::builder(),
        scoped_by_user(),
        Router::new().route("/orders", post(plain_order)),
        ledger.clone(),
    )
    .await;

    for (key, (recorder, replayer)) in
        [("k1", (&attribute, &policy)), ("k2", (&policy, &attribute))]
    {
        let first = recorder.send(order_as("ann", key, "x")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(!first.replayed());
        assert!(
            record_exists(&server, &user_record_key("ann", key)),
            "{key}"
        );
        assert_replays(&replayer.send(order_as("ann", key, "x")).await, &first);
        replayer
            .send(order_as("ann", key, "y"))
            .await
            .assert_problem(422, "idempotency-key-reused");
    }
    assert_eq!(ledger.runs(), 2);
}
