//! Issue 4's fault suite, part 2: app instances failing around a shared, real `redis-server`.
//! The instances are the payments example as child processes ([`PaymentsProcess`], with
//! `REDIS_URL`), killed (`SIGKILL`), paused (`SIGSTOP`/`SIGCONT`) and stopped (`SIGTERM`) for
//! real, plus in-process instances where the handler must show its epoch.
//!
//! A payments process keeps its payments in its own memory: `GET /payments` with the user's
//! token lists the payments that process created, which is how these tests count handler
//! executions per instance. The table of what each fault does is `docs/FAILURE_MODES.md`;
//! faults of Redis itself are in `faults_redis.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use http::StatusCode;
use idem_examples::payments::AuthUser;
use idem_runtime::fingerprint::RecordKey;
use idem_runtime::key::IdempotencyKey;
use idem_runtime::store::{RedisConfig, RedisStore, TieredStore};
use idem_runtime::{Idempotency, IdempotencyContext, idempotent, scope};
use idem_tests::process::PaymentsProcess;
use idem_tests::proxy::{Mode, Proxy};
use idem_tests::redis::RedisServer;
use idem_tests::support::{
    IDEMPOTENCY_KEY, Ledger, Reply, connect_and_write, http1_request, keyed, parse_http1_response,
    raw_exchange, request, send, wait_idle, within,
};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The user every request is made as.
const USER: &str = "ann";
const PAYMENT: &[u8] = br#"{"amount": 5, "currency": "EUR"}"#;
/// The bound on "answered quickly" (generous: a hang always trips it, a loaded machine never).
const QUICKLY: Duration = Duration::from_secs(3);

/// `POST /payments` as [`USER`] with `key`.
fn payment(key: &str) -> Vec<u8> {
    http1_request(
        "POST",
        "/payments",
        &[
            ("authorization", "Bearer ann"),
            ("content-type", "application/json"),
            (IDEMPOTENCY_KEY, key),
        ],
        PAYMENT,
    )
}

/// The payments `process` created for [`USER`].
async fn payments_of(process: &PaymentsProcess) -> Vec<serde_json::Value> {
    let list = http1_request("GET", "/payments", &[("authorization", "Bearer ann")], b"");
    let reply = raw_exchange(process.addr, &list).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.json().as_array().expect("a list").clone()
}

/// A payments process over the Redis at `url` with `IDEM_LEASE_MS = lease_ms` and
/// `PAYMENTS_PROCESSING_MS = processing_ms`.
async fn payments_over(url: &str, lease_ms: &str, processing_ms: &str) -> PaymentsProcess {
    PaymentsProcess::start(&[
        ("REDIS_URL", url),
        ("IDEM_LEASE_MS", lease_ms),
        ("PAYMENTS_PROCESSING_MS", processing_ms),
    ])
    .await
}

/// The Redis key of [`USER`]'s record for client key `key` (the payments route is scoped by user).
fn record_name(key: &str) -> String {
    let key = IdempotencyKey::parse_bytes(key.as_bytes()).expect("a valid key");
    RedisStore::key_name(&RecordKey::new(&scope(USER), &key))
}

/// Waits until some instance has acquired the record of `key` (so a duplicate cannot become the
/// first).
async fn wait_acquired(server: &RedisServer, key: &str) {
    let name = record_name(key);
    within(&format!("the record of {key:?} to be acquired"), async {
        while !server.query::<bool>(redis::cmd("EXISTS").arg(&name)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Sends `raw` to `addr` while the answer is `409 request-in-progress`, for at most `budget`;
/// returns the first other answer.
async fn until_not_in_progress(addr: std::net::SocketAddr, raw: &[u8], budget: Duration) -> Reply {
    let since = Instant::now();
    loop {
        let reply = raw_exchange(addr, raw).await;
        if reply.status != StatusCode::CONFLICT {
            return reply;
        }
        reply.assert_problem(409, "request-in-progress");
        assert!(
            since.elapsed() < budget,
            "still in progress after {budget:?}: the key is stuck beyond its lease"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads what the server sends on `stream` until it closes it.
async fn read_to_close(mut stream: TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    // A killed server may reset the connection: what arrived before counts.
    let _ = within("the connection to end", stream.read_to_end(&mut received)).await;
    received
}

#[track_caller]
fn assert_payment(reply: &Reply, replayed: bool) -> String {
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert_eq!(reply.replayed(), replayed, "replayed? {reply:?}");
    reply.json()["id"]
        .as_str()
        .expect("a payment id")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// 1. Redis killed and restarted under the payments binary

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payments_binary_answers_503_while_redis_is_down_and_recovers_without_a_restart() {
    let mut server = RedisServer::start();
    let payments = payments_over(&server.url(), "800", "0").await;
    assert_payment(
        &raw_exchange(payments.addr, &payment("before")).await,
        false,
    );

    server.kill();
    let started = Instant::now();
    let down = raw_exchange(payments.addr, &payment("down")).await;
    assert!(started.elapsed() < QUICKLY, "{:?}", started.elapsed());
    down.assert_problem(503, "store-unavailable");
    assert!(down.retry_after() >= 1);
    assert_eq!(
        payments_of(&payments).await.len(),
        1,
        "the handler did not run"
    );

    server.restart();
    let since = Instant::now();
    let up = loop {
        let reply = raw_exchange(payments.addr, &payment("down")).await;
        if reply.status != StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        assert!(since.elapsed() < QUICKLY, "not recovered after {QUICKLY:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = assert_payment(&up, false);
    let replay = raw_exchange(payments.addr, &payment("down")).await;
    assert_eq!(assert_payment(&replay, true), id);
    assert_eq!(payments_of(&payments).await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 5. An instance killed (SIGKILL) mid-handler

/// An in-process instance serving the payments route's contract (`POST /payments`, scoped by
/// user, the same fingerprint) with a handler that reports its epoch.
#[idempotent(required = true, ttl = "24h", scope = user_id)]
async fn payments_takeover(
    AuthUser(user_id): AuthUser,
    context: IdempotencyContext,
    State(ledger): State<Ledger>,
    _body: String,
) -> (StatusCode, String) {
    ledger.run().await;
    let epoch = context.epoch().unwrap_or(0);
    (StatusCode::CREATED, format!("{user_id} at epoch {epoch}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_payment_blocks_retries_until_its_lease_ends_then_one_runs_it() {
    const LEASE: Duration = Duration::from_millis(1500);
    let server = RedisServer::start();
    // `a` is killed long before its 60 s payment would be created.
    let a = payments_over(&server.url(), "1500", "60000").await;
    let b = payments_over(&server.url(), "1500", "0").await;
    let ledger = Ledger::new();
    let redis = RedisStore::connect(server.url(), RedisConfig::new())
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .store(TieredStore::new(redis))
        .lease(LEASE)
        .build();
    let takeover = Router::new()
        .route("/payments", post(payments_takeover))
        .with_state(ledger.clone())
        .layer(idem.layer());
    let as_ann = |key: &str| {
        request("POST", "/payments")
            .header("authorization", "Bearer ann")
            .header("content-type", "application/json")
            .header(IDEMPOTENCY_KEY, key)
            .body(PAYMENT.into())
            .unwrap()
    };

    let client_1 = connect_and_write(a.addr, &payment("k1")).await;
    let client_2 = connect_and_write(a.addr, &payment("k2")).await;
    wait_acquired(&server, "k1").await;
    wait_acquired(&server, "k2").await;
    a.kill().await;
    assert!(
        read_to_close(client_1).await.is_empty() && read_to_close(client_2).await.is_empty(),
        "the killed instance's clients got no answer"
    );

    // While the dead attempt's lease lives, retries elsewhere are 409 and do not run.
    raw_exchange(b.addr, &payment("k1"))
        .await
        .assert_problem(409, "request-in-progress");
    send(&takeover, as_ann("k2"))
        .await
        .assert_problem(409, "request-in-progress");
    assert!(payments_of(&b).await.is_empty());
    assert_eq!(ledger.runs(), 0);

    // Then the lease ends and a retry runs, once.
    let taken = until_not_in_progress(b.addr, &payment("k1"), LEASE + QUICKLY).await;
    let id = assert_payment(&taken, false);
    let since = Instant::now();
    let epoch_2 = loop {
        let reply = send(&takeover, as_ann("k2")).await;
        if reply.status != StatusCode::CONFLICT {
            break reply;
        }
        assert!(
            since.elapsed() < LEASE + QUICKLY,
            "k2 stuck beyond its lease"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(epoch_2.status, StatusCode::CREATED);
    assert_eq!(
        epoch_2.text(),
        "ann at epoch 2",
        "the takeover of a crashed attempt"
    );

    for _ in 0..2 {
        let replay = raw_exchange(b.addr, &payment("k1")).await;
        assert_eq!(assert_payment(&replay, true), id);
    }
    let payments = payments_of(&b).await;
    assert_eq!(payments.len(), 1, "the payment exists once: {payments:?}");
    assert_eq!(payments[0]["id"], id.as_str());
    // The epoch-2 result is everyone's now.
    let replay = raw_exchange(b.addr, &payment("k2")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, epoch_2.body);
    assert_eq!(ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// 6. An instance paused (SIGSTOP) past its lease

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_paused_past_its_lease_is_taken_over_and_its_late_completion_is_refused() {
    const LEASE: Duration = Duration::from_millis(600);
    let server = RedisServer::start();
    let a = payments_over(&server.url(), "600", "1500").await;
    let b = payments_over(&server.url(), "600", "0").await;

    let client = connect_and_write(a.addr, &payment("k")).await;
    wait_acquired(&server, "k").await;
    a.signal("STOP");
    let winner = until_not_in_progress(b.addr, &payment("k"), LEASE + QUICKLY).await;
    let winner_id = assert_payment(&winner, false);

    a.signal("CONT");
    // The paused attempt finishes: its own client gets its own payment…
    let late = parse_http1_response(&read_to_close(client).await);
    let late_id = assert_payment(&late, false);
    assert_ne!(late_id, winner_id);
    // …but its completion was refused: replays from both instances serve the winner.
    for process in [&a, &b, &a, &b] {
        let replay = raw_exchange(process.addr, &payment("k")).await;
        assert!(replay.replayed(), "{replay:?}");
        assert_eq!(replay.body, winner.body, "replays serve the winner");
    }
    // Without fencing, the late attempt's side effect happened too: each process created one
    // payment (see the next test for fencing with the epoch).
    assert_eq!(payments_of(&b).await.len(), 1);
    let a_payments = payments_of(&a).await;
    assert_eq!(a_payments.len(), 1);
    assert_eq!(a_payments[0]["id"], late_id.as_str());
}

/// The side effects of [`fenced_transfer`], fenced by epoch.
#[derive(Clone, Default)]
struct Fence {
    ledger: Ledger,
    /// The highest epoch that applied its side effect.
    highest: Arc<Mutex<u64>>,
    /// The epochs whose side effect was applied, in order.
    applied: Arc<Mutex<Vec<u64>>>,
    first_context: Arc<Mutex<Option<IdempotencyContext>>>,
}

/// Epoch 1 waits at the gate; the side effect is applied only by an attempt whose epoch is at
/// least the highest seen and that has not lost its lease.
#[idempotent(required = true)]
async fn fenced_transfer(
    context: IdempotencyContext,
    State(fence): State<Fence>,
    body: String,
) -> (StatusCode, String) {
    let epoch = context
        .epoch()
        .expect("an idempotent execution has an epoch");
    fence.ledger.start();
    if epoch == 1 {
        *fence.first_context.lock().unwrap() = Some(context.clone());
        fence.ledger.pass_gate().await;
    }
    let applied = {
        let mut highest = fence.highest.lock().unwrap();
        let current = epoch >= *highest && !context.lease_lost();
        if current {
            *highest = epoch;
            fence.applied.lock().unwrap().push(epoch);
        }
        current
    };
    fence.ledger.finish();
    let lost = context.lease_lost();
    let text = format!("{body}: epoch {epoch}, applied {applied}, lease lost {lost}");
    (StatusCode::CREATED, text)
}

async fn fenced_instance(url: &str, fence: &Fence, lease: Duration) -> (Idempotency, Router) {
    let config = RedisConfig::new()
        .response_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300));
    let redis = RedisStore::connect(url, config).await.unwrap();
    let idem = Idempotency::builder()
        .store(TieredStore::new(redis))
        .lease(lease)
        .build();
    let router = Router::new()
        .route("/transfer", post(fenced_transfer))
        .with_state(fence.clone())
        .layer(idem.layer());
    (idem, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_instance_loses_its_lease_and_the_epoch_fences_its_late_side_effect() {
    const LEASE: Duration = Duration::from_millis(600);
    let server = RedisServer::start();
    let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let fence = Fence {
        ledger: Ledger::gated(),
        ..Fence::default()
    };
    // `a` reaches Redis through the proxy, `b` directly.
    let (a_idem, a) = fenced_instance(&proxy.url(), &fence, LEASE).await;
    let (_, b) = fenced_instance(&server.url(), &fence, LEASE).await;
    let transfer = || keyed("POST", "/transfer", "t", "move 10");

    let first = {
        let a = a.clone();
        tokio::spawn(async move { send(&a, transfer()).await })
    };
    fence.ledger.wait_started(1).await;
    // `a` is cut off from Redis while its handler runs: its renewals go unanswered.
    proxy.set_mode(Mode::BlackHole);
    let since = Instant::now();
    let winner = loop {
        let reply = send(&b, transfer()).await;
        if reply.status != StatusCode::CONFLICT {
            break reply;
        }
        reply.assert_problem(409, "request-in-progress");
        assert!(since.elapsed() < LEASE + QUICKLY, "never taken over");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(winner.status, StatusCode::CREATED);
    assert_eq!(
        winner.text(),
        "move 10: epoch 2, applied true, lease lost false"
    );

    // The partition heals; `a` learns it lost its lease before it acts.
    proxy.set_mode(Mode::PassThrough);
    let context = fence.first_context.lock().unwrap().clone().unwrap();
    within("the first attempt to see lease_lost()", async {
        while !context.lease_lost() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    fence.ledger.open();
    let late = within("the first answer", first).await.unwrap();
    assert_eq!(late.status, StatusCode::CREATED);
    assert_eq!(
        late.text(),
        "move 10: epoch 1, applied false, lease lost true",
        "the stale attempt is fenced"
    );
    wait_idle(&a_idem).await;
    for router in [&a, &b] {
        let replay = send(router, transfer()).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, winner.body, "replays serve the winner");
    }
    assert_eq!(
        *fence.applied.lock().unwrap(),
        [2],
        "one side effect, epoch 2's"
    );
    assert_eq!(fence.ledger.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// 11. Graceful shutdown (SIGTERM) with a payment in flight, over Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_an_instance_finishes_its_payment_and_records_it_in_redis_before_it_exits() {
    let server = RedisServer::start();
    // The default 30 s lease: had `a` exited without recording, `b` would answer 409, not replay.
    let a = PaymentsProcess::start(&[
        ("REDIS_URL", server.url().as_str()),
        ("PAYMENTS_PROCESSING_MS", "1000"),
    ])
    .await;
    let b = PaymentsProcess::start(&[("REDIS_URL", server.url().as_str())]).await;

    let client = connect_and_write(a.addr, &payment("drain")).await;
    wait_acquired(&server, "drain").await;
    a.terminate();
    let answer = parse_http1_response(&read_to_close(client).await);
    let id = assert_payment(&answer, false);
    a.assert_clean_exit().await;

    let replay = raw_exchange(b.addr, &payment("drain")).await;
    assert_eq!(assert_payment(&replay, true), id, "a's result, from Redis");
    assert_eq!(replay.body, answer.body);
    assert!(payments_of(&b).await.is_empty(), "b never ran it");
}
