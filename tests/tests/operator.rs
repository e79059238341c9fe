//! The operator's view of one key through the runtime (`idem.operator()`), on every store: the
//! embedded `MemoryStore`, a `TieredStore` over it, `RedisStore` (plain and behind a
//! `TieredStore`) and a 3-master Redis Cluster, each started by the test. On each: inspect every
//! state; purge (a record in flight is left alone; a purged key runs again, also past a local
//! cache); release a stuck key (the next attempt gets epoch + 1); and a release racing a live
//! owner's renewal (refused; the owner completes). Then the admin router over `oneshot`, a store
//! without the operator's transitions, and the Redis ACL the purge needs.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::post;
use http::{Request, StatusCode};
use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope, scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::operator::{BodyView, KeyState, KeyView, OperatorError, ResultView};
use idem_runtime::record::{RecordedResult, StoredResponse};
use idem_runtime::store::{
    AcquireRequest, Acquired, Cached, CompleteRequest, MemoryStore, OwnerToken, Purged,
    RedisConfig, RedisStore, ReleaseRequest, RenewRequest, Store, StoreError, StoreFuture,
    TieredStore,
};
use idem_runtime::{Idempotency, admin, idempotent};
use idem_tests::redis::{RedisCluster, RedisServer};
use idem_tests::support::{Reply, keyed, send};

/// The leases and retention of the records the tests make by hand: long, so that nothing runs out
/// under a test.
const LEASE: Duration = Duration::from_secs(60);
const RETENTION: Duration = Duration::from_secs(120);

/// Rounds of the release-against-renewal race per store.
const RACES: usize = 25;

/// One store under test, reached as an operator reaches it: through a runtime.
struct Backend {
    name: &'static str,
    idem: Idempotency,
    /// Whether the store keeps completed records in process memory (`Store::cached` answers).
    caches_locally: bool,
}

impl Backend {
    fn new(name: &'static str, store: impl Store, caches_locally: bool) -> Self {
        Self {
            name,
            idem: Idempotency::builder().store(store).build(),
            caches_locally,
        }
    }

    /// This backend's client key for `what`: backends that share a server never share a record.
    fn key(&self, what: &str) -> String {
        format!("{}-{what}", self.name)
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.idem.store()
    }

    async fn acquire(&self, key: &RecordKey, owner: OwnerToken) -> Acquired {
        let request = AcquireRequest::new(key, owner, print(), LEASE, RETENTION);
        self.store().acquire(request).await.unwrap()
    }

    async fn renew(&self, key: &RecordKey, owner: OwnerToken) -> bool {
        let request = RenewRequest::new(key, owner, LEASE);
        self.store().renew(request).await.unwrap()
    }

    async fn complete(&self, key: &RecordKey, owner: OwnerToken, result: RecordedResult) -> bool {
        let result = Arc::new(result);
        let request = CompleteRequest::new(key, owner, print(), &result, RETENTION);
        self.store().complete(request).await.unwrap()
    }

    async fn inspect(&self, scope: &Scope, client_key: &str, body: bool) -> Option<KeyView> {
        self.idem
            .operator()
            .inspect(scope, client_key, body)
            .await
            .unwrap()
    }

    /// Every scenario, in turn.
    async fn check_everything(&self) {
        inspect_each_state(self).await;
        purge_leaves_in_flight_records_and_the_key_runs_again(self).await;
        a_purged_key_runs_again_through_a_router(self).await;
        release_stale_frees_a_stuck_key_with_the_next_epoch(self).await;
        a_release_racing_a_live_owners_renewal_is_refused(self).await;
        the_race_has_exactly_one_winner(self).await;
    }
}

/// The fingerprint of the records made by hand.
fn print() -> &'static Fingerprint {
    static PRINT: LazyLock<Fingerprint> =
        LazyLock::new(|| Fingerprint::of(&http::Method::POST, "/charges", "/charges", "", b"{}"));
    &PRINT
}

fn record_key(scope: &Scope, client_key: &str) -> RecordKey {
    RecordKey::new(
        scope,
        &IdempotencyKey::parse_bytes(client_key.as_bytes()).unwrap(),
    )
}

fn created() -> RecordedResult {
    RecordedResult::Response(StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![
            (
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            ),
            (
                http::header::LOCATION,
                http::HeaderValue::from_static("/charges/1"),
            ),
        ],
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

// ---------------------------------------------------------------------------------------------
// The scenarios, run on every store

/// In flight, released, completed (a response, and a too-large marker): what the view says, by
/// the key as the client sent it and in its scope only.
async fn inspect_each_state(b: &Backend) {
    let name = b.name;
    let alice = scope("alice");
    let client_key = b.key("states");
    let k = record_key(&alice, &client_key);
    assert!(
        b.inspect(&alice, &client_key, true).await.is_none(),
        "{name}"
    );

    let first = OwnerToken::generate();
    assert!(matches!(
        b.acquire(&k, first).await,
        Acquired::Execute { epoch: 1 }
    ));
    let view = b.inspect(&alice, &client_key, true).await.unwrap();
    assert_eq!(view.state, KeyState::InFlight, "{name}");
    assert_eq!((view.epoch, view.owner), (1, Some(first)), "{name}");
    assert_eq!(view.record_key, k.to_hex(), "{name}");
    assert_eq!(view.fingerprint, hex(&print().0), "{name}");
    let lease = view.lease.unwrap();
    assert!(
        (50_000..=60_000).contains(&lease.left_ms),
        "{name}: {lease:?}"
    );
    let expires = view.expires_in_ms.unwrap();
    assert!((110_000..=120_000).contains(&expires), "{name}: {expires}");
    assert_eq!(view.created_at_ms, None, "{name}: no backend here keeps it");
    assert!(view.result.is_none(), "{name}");
    // Quoted and bare are one key, as in a request; other scopes do not see it.
    let quoted = b.inspect(&alice, &format!("\"{client_key}\""), false).await;
    assert_eq!(quoted.unwrap().record_key, view.record_key, "{name}");
    assert!(b.inspect(&Scope::NONE, &client_key, false).await.is_none());
    assert!(b.inspect(&scope("bob"), &client_key, false).await.is_none());

    // Released: no lease; the epoch and owner stay.
    b.store()
        .release(ReleaseRequest::new(&k, first))
        .await
        .unwrap();
    let view = b.inspect(&alice, &client_key, false).await.unwrap();
    assert_eq!(view.state, KeyState::Released, "{name}");
    assert_eq!((view.epoch, view.owner), (1, Some(first)), "{name}");
    assert!(
        view.lease.is_none() && view.expires_in_ms.is_some(),
        "{name}"
    );

    // Completed by the next attempt: status and headers; the body only when asked.
    let second = OwnerToken::generate();
    assert!(matches!(
        b.acquire(&k, second).await,
        Acquired::Execute { epoch: 2 }
    ));
    assert!(b.complete(&k, second, created()).await, "{name}");
    let view = b.inspect(&alice, &client_key, false).await.unwrap();
    assert_eq!(view.state, KeyState::Completed, "{name}");
    assert_eq!((view.epoch, view.owner), (2, Some(second)), "{name}");
    assert!(view.lease.is_none(), "{name}");
    let Some(ResultView::Response(response)) = &view.result else {
        panic!("{name}: {view:?}");
    };
    assert_eq!(response.status, 201, "{name}");
    let headers: Vec<(&str, &str)> = response
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        headers,
        [
            ("content-type", "application/json"),
            ("location", "/charges/1")
        ],
        "{name}"
    );
    assert_eq!((response.body_len, &response.body), (8, &None), "{name}");
    let json = serde_json::to_value(&view).unwrap();
    assert_eq!(json["state"], "completed", "{name}");
    assert_eq!(json["owner"], format!("{:032x}", second.0), "{name}");
    assert!(json["result"]["body"].is_null(), "{name}: {json}");
    let with_body = b.inspect(&alice, &client_key, true).await.unwrap();
    let Some(ResultView::Response(response)) = &with_body.result else {
        panic!("{name}: {with_body:?}");
    };
    assert_eq!(
        response.body,
        Some(BodyView::Text("{\"id\":1}".into())),
        "{name}"
    );

    // A response too large to record shows as the marker it is.
    let too_large = b.key("too-large");
    let k = record_key(&alice, &too_large);
    let owner = OwnerToken::generate();
    b.acquire(&k, owner).await;
    assert!(b.complete(&k, owner, RecordedResult::TooLarge).await);
    let view = b.inspect(&alice, &too_large, true).await.unwrap();
    assert_eq!(view.result, Some(ResultView::TooLarge), "{name}");

    // Not a key a client could have sent.
    let invalid = b.idem.operator().inspect(&alice, "two words", false).await;
    assert!(
        matches!(invalid, Err(OperatorError::InvalidKey(_))),
        "{name}"
    );
}

/// A purge leaves a record in flight alone; it deletes a completed one, and the key runs again as
/// new, with epoch 1.
async fn purge_leaves_in_flight_records_and_the_key_runs_again(b: &Backend) {
    let name = b.name;
    let operator = b.idem.operator();
    let client_key = b.key("purged");
    let k = record_key(&Scope::NONE, &client_key);
    let owner = OwnerToken::generate();
    b.acquire(&k, owner).await;
    let purged = operator.purge(&Scope::NONE, &client_key).await.unwrap();
    assert_eq!(purged, Purged::InFlight, "{name}");
    let view = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    assert_eq!(
        (view.state, view.owner),
        (KeyState::InFlight, Some(owner)),
        "{name}"
    );
    assert!(
        b.complete(&k, owner, created()).await,
        "{name}: still the owner"
    );

    let purged = operator.purge(&Scope::NONE, &client_key).await.unwrap();
    assert_eq!(purged, Purged::Deleted, "{name}");
    assert!(b.inspect(&Scope::NONE, &client_key, false).await.is_none());
    let again = operator.purge(&Scope::NONE, &client_key).await.unwrap();
    assert_eq!(again, Purged::Absent, "{name}");
    assert!(
        matches!(
            b.acquire(&k, OwnerToken::generate()).await,
            Acquired::Execute { epoch: 1 }
        ),
        "{name}: the key runs again as new"
    );
}

#[idempotent(required = true, scope = user)]
async fn charge(
    Path(user): Path<String>,
    State(runs): State<Arc<AtomicUsize>>,
    body: String,
) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("{user}: {body}, run {run}"))
}

/// Through a router: a completed request is replayed (the second replay from a local cache where
/// the store has one); after a purge, the same request runs again, on this instance at once.
async fn a_purged_key_runs_again_through_a_router(b: &Backend) {
    let name = b.name;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/users/{user}/charges", post(charge))
        .with_state(Arc::clone(&runs))
        .layer(b.idem.layer());
    let client_key = b.key("charge");
    let pay = || keyed("POST", "/users/alice/charges", &client_key, "5 EUR");

    let first = send(&app, pay()).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "{name}: {}",
        first.text()
    );
    for _ in 0..2 {
        let replay = send(&app, pay()).await;
        assert!(replay.replayed() && replay.body == first.body, "{name}");
    }
    let k = record_key(&scope("alice"), &client_key);
    let fingerprint = Fingerprint::of(
        &http::Method::POST,
        "/users/{user}/charges",
        "/users/alice/charges",
        "",
        b"5 EUR",
    );
    assert_eq!(
        matches!(
            b.store().cached(&k, &fingerprint),
            Some(Cached::Completed { .. })
        ),
        b.caches_locally,
        "{name}: the record is in process memory where the store keeps copies"
    );

    let purged = b.idem.operator().purge(&scope("alice"), &client_key).await;
    assert_eq!(purged.unwrap(), Purged::Deleted, "{name}");
    assert!(
        b.store().cached(&k, &fingerprint).is_none(),
        "{name}: the local copy went with the record"
    );
    let again = send(&app, pay()).await;
    assert_eq!(again.status, StatusCode::CREATED, "{name}");
    assert!(!again.replayed(), "{name}: runs again");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "{name}");
    assert!(again.text().ends_with("run 2"), "{name}: {}", again.text());
    assert!(send(&app, pay()).await.replayed(), "{name}");
}

/// An owner that never completes nor renews: its key is freed by a release with the view
/// inspected, the record keeps its epoch, and the next attempt runs with epoch 2. The stale owner
/// can then neither renew nor complete.
async fn release_stale_frees_a_stuck_key_with_the_next_epoch(b: &Backend) {
    let name = b.name;
    let operator = b.idem.operator();
    let client_key = b.key("stuck");
    let k = record_key(&Scope::NONE, &client_key);
    let dead = OwnerToken::generate();
    b.acquire(&k, dead).await;
    assert!(
        matches!(
            b.acquire(&k, OwnerToken::generate()).await,
            Acquired::InFlight { .. }
        ),
        "{name}: stuck until its lease runs out"
    );
    let view = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    let released = operator.release_stale(&Scope::NONE, &client_key, &view);
    assert!(released.await.unwrap(), "{name}");
    let after = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    assert_eq!(
        (after.state, after.epoch, after.owner),
        (KeyState::Released, 1, Some(dead)),
        "{name}"
    );
    let repeated = operator.release_stale(&Scope::NONE, &client_key, &view);
    assert!(
        repeated.await.unwrap(),
        "{name}: a repeated release converges"
    );

    let next = OwnerToken::generate();
    assert!(
        matches!(b.acquire(&k, next).await, Acquired::Execute { epoch: 2 }),
        "{name}"
    );
    let stale = operator.release_stale(&Scope::NONE, &client_key, &view);
    assert!(
        !stale.await.unwrap(),
        "{name}: the old view frees nothing once taken over"
    );
    assert!(!b.renew(&k, dead).await, "{name}");
    assert!(!b.complete(&k, dead, created()).await, "{name}");
    assert!(b.complete(&k, next, created()).await, "{name}");
    let completed = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    let no_lease = operator.release_stale(&Scope::NONE, &client_key, &completed);
    assert!(
        matches!(no_lease.await, Err(OperatorError::NotInFlight)),
        "{name}"
    );
}

/// Inspect, then the owner renews (alive), then the release with the inspected view: refused, and
/// the owner completes as if nothing happened.
async fn a_release_racing_a_live_owners_renewal_is_refused(b: &Backend) {
    let name = b.name;
    let client_key = b.key("alive");
    let k = record_key(&Scope::NONE, &client_key);
    let owner = OwnerToken::generate();
    b.acquire(&k, owner).await;
    let view = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    // Past the millisecond of the acquire, so that the renewal moves a millisecond clock too.
    tokio::time::sleep(Duration::from_millis(3)).await;
    assert!(b.renew(&k, owner).await, "{name}");
    let operator = b.idem.operator();
    let refused = operator.release_stale(&Scope::NONE, &client_key, &view);
    assert!(!refused.await.unwrap(), "{name}: the owner renewed");
    let now = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    assert_eq!(
        (now.state, now.owner),
        (KeyState::InFlight, Some(owner)),
        "{name}"
    );
    assert_ne!(
        now.lease.map(|l| l.deadline),
        view.lease.map(|l| l.deadline),
        "{name}"
    );
    assert!(b.complete(&k, owner, created()).await, "{name}");
    let done = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
    assert_eq!((done.state, done.epoch), (KeyState::Completed, 1), "{name}");
}

/// The renewal and the release sent at once, on two worker threads, many times (each started
/// first in turn): exactly one of them wins, every time. When the renewal wins the owner completes; when the release wins the
/// owner has lost the key (its completion is refused) and the next attempt gets epoch 2.
async fn the_race_has_exactly_one_winner(b: &Backend) {
    let name = b.name;
    let mut release_wins = 0;
    for round in 0..RACES {
        let client_key = b.key(&format!("race-{round}"));
        let k = record_key(&Scope::NONE, &client_key);
        let owner = OwnerToken::generate();
        b.acquire(&k, owner).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let view = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
        let store = Arc::clone(b.store());
        let renewal = async move { store.renew(RenewRequest::new(&k, owner, LEASE)).await };
        let operator = b.idem.operator();
        let release = async move {
            operator
                .release_stale(&Scope::NONE, &client_key, &view)
                .await
        };
        // Started in either order: over one Redis connection, the first sent is the first run.
        let (renewal, release) = if round % 2 == 0 {
            (tokio::spawn(renewal), tokio::spawn(release))
        } else {
            let release = tokio::spawn(release);
            (tokio::spawn(renewal), release)
        };
        let renewed = renewal.await.unwrap().unwrap();
        let released = release.await.unwrap().unwrap();
        assert!(
            renewed != released,
            "{name}, round {round}: renewed {renewed}, released {released}"
        );
        if released {
            release_wins += 1;
            assert!(!b.complete(&k, owner, created()).await, "{name}");
            let next = b.acquire(&k, OwnerToken::generate()).await;
            assert!(matches!(next, Acquired::Execute { epoch: 2 }), "{name}");
        } else {
            assert!(b.complete(&k, owner, created()).await, "{name}");
        }
    }
    eprintln!("{name}: the release won {release_wins} of {RACES} races");
}

// ---------------------------------------------------------------------------------------------
// The stores

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_on_the_memory_store() {
    Backend::new("memory", MemoryStore::default(), true)
        .check_everything()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_on_a_tiered_store_over_memory() {
    Backend::new("tiered", TieredStore::new(MemoryStore::default()), true)
        .check_everything()
        .await;
}

async fn connect(url: &str) -> RedisStore {
    let config = RedisConfig::new().response_timeout(Duration::from_millis(500));
    RedisStore::connect(url, config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_on_redis_plain_and_behind_a_local_cache() {
    let server = RedisServer::start();
    Backend::new("redis", connect(&server.url()).await, false)
        .check_everything()
        .await;
    let tiered = TieredStore::new(connect(&server.url()).await);
    Backend::new("tiered-redis", tiered, true)
        .check_everything()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_on_redis_cluster() {
    let cluster = RedisCluster::start();
    let config = RedisConfig::new().response_timeout(Duration::from_millis(500));
    let store = RedisStore::connect_cluster(cluster.urls(), config)
        .await
        .unwrap();
    Backend::new("cluster", TieredStore::new(store), true)
        .check_everything()
        .await;
    // The records were spread over the masters, and every one was reached.
    for node in cluster.nodes() {
        let keys: Vec<String> = node.query(redis::cmd("KEYS").arg("idem:*"));
        assert!(!keys.is_empty(), "a master holds no record");
    }
}

// ---------------------------------------------------------------------------------------------
// The admin router

async fn call(app: &Router, method: &str, uri: &str, body: Option<serde_json::Value>) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(json) => {
            request = request.header("content-type", "application/json");
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    send(app, request.body(body).unwrap()).await
}

#[track_caller]
fn assert_problem(reply: &Reply, status: u16) -> serde_json::Value {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let problem = reply.json();
    assert_eq!(problem["status"], status);
    assert_eq!(problem["type"], "about:blank");
    assert!(problem["detail"].is_string());
    problem
}

#[tokio::test]
async fn the_admin_router_over_oneshot() {
    let idem = Idempotency::builder().build();
    let app: Router = admin::router(&idem);
    let k = record_key(&scope("alice"), "order-1");
    let uri = "/keys/order-1?scope=alice";
    assert_problem(&call(&app, "GET", uri, None).await, 404);

    let owner = OwnerToken::generate();
    let acquire = AcquireRequest::new(&k, owner, print(), LEASE, RETENTION);
    idem.store().acquire(acquire).await.unwrap();
    let inspected = call(&app, "GET", uri, None).await;
    assert_eq!(inspected.status, StatusCode::OK);
    assert_eq!(inspected.header("cache-control"), Some("no-store"));
    let view = inspected.json();
    assert_eq!(view["state"], "in_flight");
    assert_eq!(view["epoch"], 1);
    assert_eq!(view["record_key"], k.to_hex());
    // The quoted form of the key and a percent-encoded path name the same record; other scopes
    // and the global one do not.
    let quoted = call(&app, "GET", "/keys/%22order-1%22?scope=alice", None).await;
    assert_eq!(quoted.json()["record_key"], k.to_hex());
    assert_problem(&call(&app, "GET", "/keys/order-1", None).await, 404);
    assert_problem(
        &call(&app, "GET", "/keys/order-1?scope=bob", None).await,
        404,
    );
    assert_problem(&call(&app, "GET", "/keys/two%20words", None).await, 400);

    // In flight: never purged.
    assert_problem(&call(&app, "DELETE", uri, None).await, 409);
    // A release names the owner and lease deadline it inspected: another owner is refused.
    let release = "/keys/order-1/release?scope=alice";
    let wrong = serde_json::json!({
        "owner": format!("{:032x}", owner.0 + 1),
        "lease_deadline": view["lease"]["deadline"],
    });
    assert_problem(&call(&app, "POST", release, Some(wrong)).await, 409);
    let stale = serde_json::json!({
        "owner": view["owner"],
        "lease_deadline": view["lease"]["deadline"],
    });
    let released = call(&app, "POST", release, Some(stale)).await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.text());
    assert_eq!(released.json(), serde_json::json!({"released": true}));
    let bad_body = call(&app, "POST", release, Some(serde_json::json!({"owner": 1}))).await;
    assert!(bad_body.status.is_client_error());

    // Taken over and completed: the body only with `body=true`; then purged.
    let next = OwnerToken::generate();
    let acquire = AcquireRequest::new(&k, next, print(), LEASE, RETENTION);
    let taken = idem.store().acquire(acquire).await.unwrap();
    assert!(matches!(taken, Acquired::Execute { epoch: 2 }));
    let result = Arc::new(created());
    let complete = CompleteRequest::new(&k, next, print(), &result, RETENTION);
    assert!(idem.store().complete(complete).await.unwrap());
    let view = call(&app, "GET", uri, None).await.json();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["result"]["status"], 201);
    assert!(view["result"]["body"].is_null());
    let view = call(&app, "GET", "/keys/order-1?scope=alice&body=true", None)
        .await
        .json();
    assert_eq!(view["result"]["body"]["text"], "{\"id\":1}");
    let purged = call(&app, "DELETE", uri, None).await;
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(purged.json(), serde_json::json!({"purged": true}));
    assert_problem(&call(&app, "GET", uri, None).await, 404);
    assert_problem(&call(&app, "DELETE", uri, None).await, 404);
}

/// A store written before the operator's transitions: it still compiles, and the operator (and
/// the admin router, `501`) say it does not support them.
#[derive(Default)]
struct OlderStore(MemoryStore);

impl Store for OlderStore {
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

#[tokio::test]
async fn a_store_without_the_operators_transitions_says_so() {
    let idem = Idempotency::builder().store(OlderStore::default()).build();
    let inspected = idem.operator().inspect(&Scope::NONE, "k", false).await;
    assert!(matches!(
        inspected,
        Err(OperatorError::Store(StoreError::Unsupported("inspect")))
    ));
    let purged = idem.operator().purge(&Scope::NONE, "k").await;
    assert!(matches!(
        purged,
        Err(OperatorError::Store(StoreError::Unsupported("purge")))
    ));
    let app: Router = admin::router(&idem);
    let problem = assert_problem(&call(&app, "GET", "/keys/k", None).await, 501);
    assert!(problem["detail"].as_str().unwrap().contains("inspect"));
}

/// The ACL user of `RedisStore`'s docs serves requests; the operator's purge needs `+del` on top,
/// as the docs say, and inspect and release need nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_needs_del_for_purges() {
    let server = RedisServer::start();
    let documented = "on >secret resetkeys ~idem:* resetchannels -@all +evalsha +script|load \
                      +get +set +pttl +time +ping";
    for (user, rule) in [
        ("requests", documented.to_owned()),
        ("operator", format!("{documented} +del")),
    ] {
        let _: () = server.query(
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg(user)
                .arg(rule.split(' ').collect::<Vec<_>>()),
        );
    }
    let url = |user: &str| format!("redis://{user}:secret@127.0.0.1:{}/", server.port());
    for (user, may_purge) in [("requests", false), ("operator", true)] {
        let b = Backend::new("acl", connect(&url(user)).await, false);
        let client_key = format!("acl-{user}");
        let k = record_key(&Scope::NONE, &client_key);
        let owner = OwnerToken::generate();
        b.acquire(&k, owner).await;
        let view = b.inspect(&Scope::NONE, &client_key, false).await.unwrap();
        let operator = b.idem.operator();
        let released = operator.release_stale(&Scope::NONE, &client_key, &view);
        assert!(released.await.unwrap(), "{user}");
        let purged = operator.purge(&Scope::NONE, &client_key).await;
        assert_eq!(purged.is_ok(), may_purge, "{user}: {purged:?}");
    }
}
