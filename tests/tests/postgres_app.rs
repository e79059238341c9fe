//! Apps on the PostgreSQL store, through real routers (`#[idempotent]` handlers behind
//! `idem.layer()`): the wire behaviour (first request, replay, `422`, `409`, a `5xx` that
//! releases the key), two instances over one database behaving as one, a storm of concurrent
//! duplicates, and the database failing underneath (killed, stopped, a table locked): quick
//! `503`s without running the handler, and recovery without rebuilding the app.
//!
//! Every test starts its own server ([`PostgresServer::start`]) and stops it when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use http::StatusCode;
use idem_runtime::sqlx;
use idem_runtime::store::{PostgresConfig, Store, TieredStore};
use idem_runtime::{Idempotency, IdempotencyContext, idempotent};
use idem_tests::postgres::PostgresServer;
use idem_tests::support::{Ledger, Reply, keyed, send, wait_idle, within};

/// What the handlers of every instance share: executions per key, a gate for held handlers.
#[derive(Clone, Default)]
struct Shared {
    runs: Arc<Mutex<HashMap<String, usize>>>,
    held: Ledger,
    /// Executions of `/flaky`: the first answers `503`.
    flaky: Arc<AtomicUsize>,
}

impl Shared {
    fn runs(&self, key: &str) -> usize {
        self.runs.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    /// Counts an execution of `context`'s key; returns its number.
    fn count(&self, context: &IdempotencyContext) -> usize {
        let key = context.key().unwrap_or_default().to_owned();
        let mut runs = self.runs.lock().unwrap();
        let count = runs.entry(key).or_default();
        *count += 1;
        *count
    }
}

#[idempotent(required = true)]
async fn pay(
    context: IdempotencyContext,
    State(shared): State<Shared>,
    body: String,
) -> (StatusCode, String) {
    let run = shared.count(&context);
    if body.starts_with("storm") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let epoch = context.epoch().unwrap_or(0);
    (
        StatusCode::CREATED,
        format!("{body}: run {run} epoch {epoch}"),
    )
}

/// Waits at the shared gate before answering.
#[idempotent(required = true)]
async fn hold(
    context: IdempotencyContext,
    State(shared): State<Shared>,
    body: String,
) -> (StatusCode, String) {
    let run = shared.count(&context);
    shared.held.run().await;
    (StatusCode::CREATED, format!("{body}: held run {run}"))
}

/// `503` on its first execution, `201` after.
#[idempotent(required = true)]
async fn flaky(
    context: IdempotencyContext,
    State(shared): State<Shared>,
    body: String,
) -> (StatusCode, String) {
    shared.count(&context);
    let epoch = context.epoch().unwrap_or(0);
    if shared.flaky.fetch_add(1, Ordering::SeqCst) == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{body}: try again"),
        );
    }
    (StatusCode::CREATED, format!("{body}: epoch {epoch}"))
}

/// Each statement's budget here: a transition gets 300 ms to find a connection and 300 ms for
/// its statement.
const TIMEOUT: Duration = Duration::from_millis(300);
/// The budget of one transition, and the bound on "answered quickly" for a store failure.
const BUDGET: Duration = Duration::from_millis(600);

fn config() -> PostgresConfig {
    PostgresConfig::new()
        .acquire_timeout(TIMEOUT)
        .statement_timeout(TIMEOUT)
}

/// One app instance over the store given.
struct Instance {
    idem: Idempotency,
    router: Router,
}

impl Instance {
    fn new(store: impl Store, shared: &Shared) -> Self {
        let idem = Idempotency::builder()
            .store(store)
            .lease(Duration::from_secs(5))
            .build();
        let router = Router::new()
            .route("/pay", post(pay))
            .route("/hold", post(hold))
            .route("/flaky", post(flaky))
            .with_state(shared.clone())
            .layer(idem.layer());
        Self { idem, router }
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> Reply {
        send(&self.router, keyed("POST", path, key, body.to_owned())).await
    }

    fn spawn_post(&self, path: &str, key: &str, body: &str) -> tokio::task::JoinHandle<Reply> {
        let router = self.router.clone();
        let request = keyed("POST", path, key, body.to_owned());
        tokio::spawn(async move { send(&router, request).await })
    }
}

#[track_caller]
fn assert_created(reply: &Reply, text: &str, replayed: bool) {
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_eq!(reply.text(), text);
    assert_eq!(reply.replayed(), replayed, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_on_postgres_answers_like_any_other() {
    let server = PostgresServer::start();
    let shared = Shared {
        held: Ledger::gated(),
        ..Shared::default()
    };
    let app = Instance::new(TieredStore::new(server.store(config()).await), &shared);

    // The first request runs; its retries replay it; another body with the key is refused.
    let first = app.post("/pay", "k1", "pay 10").await;
    assert_created(&first, "pay 10: run 1 epoch 1", false);
    for _ in 0..2 {
        assert_created(&app.post("/pay", "k1", "pay 10").await, first.text(), true);
    }
    app.post("/pay", "k1", "pay 99")
        .await
        .assert_problem(422, "idempotency-key-reused");
    assert_eq!(shared.runs("k1"), 1);

    // While the first runs, a duplicate is `409` with `Retry-After`.
    let held = app.spawn_post("/hold", "k2", "hold");
    shared.held.wait_started(1).await;
    let busy = app.post("/hold", "k2", "hold").await;
    busy.assert_problem(409, "request-in-progress");
    assert!(busy.retry_after() >= 1);
    shared.held.open();
    assert_created(
        &within("the held request", held).await.unwrap(),
        "hold: held run 1",
        false,
    );
    assert_created(
        &app.post("/hold", "k2", "hold").await,
        "hold: held run 1",
        true,
    );
    assert_eq!(shared.runs("k2"), 1);

    // A `5xx` is not recorded: the key is released and the retry runs, as the next attempt.
    let failed = app.post("/flaky", "k3", "flaky").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!failed.replayed());
    assert_created(
        &app.post("/flaky", "k3", "flaky").await,
        "flaky: epoch 2",
        false,
    );
    assert_created(
        &app.post("/flaky", "k3", "flaky").await,
        "flaky: epoch 2",
        true,
    );
    assert_eq!(shared.runs("k3"), 2);

    wait_idle(&app.idem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_over_one_database_behave_as_one() {
    const KEYS: usize = 10;
    const COPIES: usize = 5;
    let server = PostgresServer::start();
    let shared = Shared {
        held: Ledger::gated(),
        ..Shared::default()
    };
    // Each instance with its own pool; one keeps completed records in memory too.
    let a = Instance::new(server.store(config()).await, &shared);
    let b = Instance::new(TieredStore::new(server.store(config()).await), &shared);

    let first = a.post("/pay", "k1", "pay 10").await;
    assert_created(&first, "pay 10: run 1 epoch 1", false);
    assert_created(&b.post("/pay", "k1", "pay 10").await, first.text(), true);
    b.post("/pay", "k1", "pay 99")
        .await
        .assert_problem(422, "idempotency-key-reused");

    let held = b.spawn_post("/hold", "k2", "hold");
    shared.held.wait_started(1).await;
    a.post("/hold", "k2", "hold")
        .await
        .assert_problem(409, "request-in-progress");
    shared.held.open();
    within("the held request", held).await.unwrap();
    assert_created(
        &a.post("/hold", "k2", "hold").await,
        "hold: held run 1",
        true,
    );

    // 50 concurrent requests over 10 keys, spread over both instances: each key runs once.
    let started = Instant::now();
    let mut storm = Vec::new();
    for copy in 0..COPIES {
        for key in 0..KEYS {
            let instance = if (copy + key) % 2 == 0 { &a } else { &b };
            let (name, body) = (format!("s{key}"), format!("storm {key}"));
            storm.push((key, instance.spawn_post("/pay", &name, &body)));
        }
    }
    for (key, task) in storm {
        let reply = within("a request of the storm", task).await.unwrap();
        assert!(
            reply.status == StatusCode::CREATED || reply.status == StatusCode::CONFLICT,
            "key {key}: {} {:?}",
            reply.status,
            reply.body
        );
    }
    let elapsed = started.elapsed();
    for key in 0..KEYS {
        let (name, body) = (format!("s{key}"), format!("storm {key}"));
        assert_eq!(shared.runs(&name), 1, "key {name} ran more than once");
        let expected = format!("{body}: run 1 epoch 1");
        assert_created(&a.post("/pay", &name, &body).await, &expected, true);
        assert_created(&b.post("/pay", &name, &body).await, &expected, true);
    }
    println!("the storm of {} requests took {elapsed:?}", KEYS * COPIES);

    wait_idle(&a.idem).await;
    wait_idle(&b.idem).await;
}

/// Sends `POST /pay` until it is not `503`, for at most five seconds.
async fn pay_until_available(app: &Instance, key: &str, body: &str) -> Reply {
    let since = Instant::now();
    loop {
        let reply = app.post("/pay", key, body).await;
        if reply.status != StatusCode::SERVICE_UNAVAILABLE {
            return reply;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `POST /pay` with `key` answers `503 store-unavailable` within [`BUDGET`], without running.
async fn assert_quick_503(app: &Instance, shared: &Shared, key: &str) {
    let started = Instant::now();
    let down = app.post("/pay", key, "pay 1").await;
    let elapsed = started.elapsed();
    down.assert_problem(503, "store-unavailable");
    assert!(down.retry_after() >= 1);
    assert!(elapsed < BUDGET, "{key}: answered after {elapsed:?}");
    assert_eq!(shared.runs(key), 0, "the handler ran without the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_killed_or_stopped_is_a_quick_503_and_the_same_app_recovers() {
    let mut server = PostgresServer::start();
    let shared = Shared::default();
    let app = Instance::new(TieredStore::new(server.store(config()).await), &shared);
    // A replay the instance keeps in memory.
    let kept = app.post("/pay", "kept", "pay 1").await;
    assert_created(&app.post("/pay", "kept", "pay 1").await, kept.text(), true);

    for (round, crash) in [true, false].into_iter().enumerate() {
        if crash {
            server.kill();
        } else {
            server.stop();
        }
        for attempt in 0..3 {
            assert_quick_503(&app, &shared, &format!("down-{round}-{attempt}")).await;
        }
        // What the instance holds in memory is still replayed.
        assert_created(&app.post("/pay", "kept", "pay 1").await, kept.text(), true);

        server.restart();
        let key = format!("back-{round}");
        let back = pay_until_available(&app, &key, "pay 1").await;
        assert_created(&back, "pay 1: run 1 epoch 1", false);
        assert_created(&app.post("/pay", &key, "pay 1").await, back.text(), true);
        // Nothing was left in flight by the refused requests: their keys run now.
        let retried = app.post("/pay", &format!("down-{round}-0"), "pay 1").await;
        assert_created(&retried, "pay 1: run 1 epoch 1", false);
    }
    wait_idle(&app.idem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_by_an_operator_is_a_503_within_the_budget() {
    let server = PostgresServer::start();
    let shared = Shared::default();
    let store = server.store(config()).await;
    let pool = store.pool().clone();
    let app = Instance::new(store, &shared);

    let mut operator = within("begin", pool.begin()).await.unwrap();
    let lock =
        sqlx::query("LOCK TABLE idem_records IN ACCESS EXCLUSIVE MODE").execute(&mut *operator);
    within("locking the table", lock).await.unwrap();
    assert_quick_503(&app, &shared, "locked").await;
    within("rollback", operator.rollback()).await.unwrap();

    let free = app.post("/pay", "locked", "pay 1").await;
    assert_created(&free, "pay 1: run 1 epoch 1", false);
    wait_idle(&app.idem).await;
}
