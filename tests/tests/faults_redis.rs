//! Issue 4's fault suite, part 1: faults between in-process app instances and a real
//! `redis-server` (started per test), injected with [`Proxy`] (refused, black-holed, slow or reset
//! connections), signals to Redis (`SIGSTOP`/`SIGCONT`) and Redis's own limits (`maxmemory`).
//!
//! Each test counts handler executions with a [`Ledger`] shared by every instance, checks the
//! statuses and problem types clients see, bounds the time to answer (generously: "within 3 s"),
//! and checks that no key stays blocked past its lease. The table of what each fault does is
//! `docs/FAILURE_MODES.md`. Process-level faults (instances killed, paused, stopped) are in
//! `faults_instances.rs`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use http::{Request, StatusCode};
use idem_runtime::{Idempotency, IdempotencyContext, idempotent};
use idem_tests::instances::{COMMAND_TIMEOUT, RedisInstance, record_exists, record_key};
use idem_tests::proxy::{Mode, Proxy};
use idem_tests::redis::RedisServer;
use idem_tests::support::{
    IDEMPOTENCY_KEY, Ledger, PATIENCE, Reply, Server, answered_within, hang_up_once_started,
    http1_request, keyed, wait_idle, wait_until,
};
use tokio::task::JoinHandle;

/// The bound on "answered quickly": ten command budgets, so a loaded machine never trips it,
/// while a hang (waiting for Redis indefinitely) always does.
const QUICKLY: Duration = Duration::from_secs(3);

#[idempotent(required = true)]
async fn pay(
    context: IdempotencyContext,
    State(ledger): State<Ledger>,
    body: String,
) -> (StatusCode, String) {
    let run = ledger.run().await;
    let epoch = context.epoch().unwrap_or(0);
    (
        StatusCode::CREATED,
        format!("run {run} epoch {epoch}: {body}"),
    )
}

/// Panics on the ledger's first execution.
#[idempotent(required = true)]
async fn panics_once(
    context: IdempotencyContext,
    State(ledger): State<Ledger>,
    body: String,
) -> String {
    let run = ledger.run().await;
    assert!(run > 1, "the first execution panics");
    let epoch = context.epoch().unwrap_or(0);
    format!("run {run} epoch {epoch}: {body}")
}

/// 10 KiB, over the instances' 1 KiB recording limit.
#[idempotent(required = true)]
async fn large(State(ledger): State<Ledger>, _body: String) -> Vec<u8> {
    ledger.run().await;
    vec![b'x'; 10 * 1024]
}

/// One app instance: `/pay`, `/panics` and `/large`, counting executions in a [`Ledger`] that
/// every instance of a test shares.
type Instance = RedisInstance<Ledger>;

/// An instance over the Redis at `url` (a [`Proxy`] or the server itself) with `lease`, the
/// harness's 300 ms command budgets and a 1 KiB recording limit, counting executions in `ledger`.
async fn instance(url: &str, ledger: &Ledger, lease: Duration) -> Instance {
    build(url, ledger, lease, false).await
}

/// The same, failing open: while Redis cannot be reached, handlers run unprotected.
async fn instance_failing_open(url: &str, ledger: &Ledger, lease: Duration) -> Instance {
    build(url, ledger, lease, true).await
}

async fn build(url: &str, ledger: &Ledger, lease: Duration, fail_open: bool) -> Instance {
    let runtime = Idempotency::builder()
        .lease(lease)
        .max_response_bytes(1024)
        .fail_open(fail_open);
    let routes = Router::new()
        .route("/pay", post(pay))
        .route("/panics", post(panics_once))
        .route("/large", post(large));
    RedisInstance::start(url, runtime, routes, ledger.clone()).await
}

/// Two instances over the same Redis.
async fn pair(url: &str, ledger: &Ledger, lease: Duration) -> (Instance, Instance) {
    (
        instance(url, ledger, lease).await,
        instance(url, ledger, lease).await,
    )
}

/// `POST /pay` with `key` and `body`, the request most of these tests send, to an [`Instance`].
trait Pay {
    /// Sends it.
    async fn pay(&self, key: &str, body: &str) -> Reply;
    /// Sends it on a task of its own once its handler started ([`RedisInstance::start_send`]).
    async fn start_pay(&self, key: &str, body: &str) -> JoinHandle<Reply>;
    /// Sends it while it is `409 request-in-progress`
    /// ([`RedisInstance::send_until_not_in_progress`]).
    async fn pay_until_not_in_progress(
        &self,
        key: &str,
        body: &str,
        budget: Duration,
    ) -> (Reply, usize);
}

impl Pay for Instance {
    async fn pay(&self, key: &str, body: &str) -> Reply {
        self.send(payment(key, body)).await
    }

    async fn start_pay(&self, key: &str, body: &str) -> JoinHandle<Reply> {
        self.start_send(payment(key, body)).await
    }

    async fn pay_until_not_in_progress(
        &self,
        key: &str,
        body: &str,
        budget: Duration,
    ) -> (Reply, usize) {
        self.send_until_not_in_progress(|| payment(key, body), budget)
            .await
    }
}

fn payment(key: &str, body: &str) -> Request<Body> {
    keyed("POST", "/pay", key, body.to_owned())
}

/// Redis with a proxy in front of it.
async fn redis_behind_proxy() -> (RedisServer, Proxy) {
    let server = RedisServer::start();
    let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
    (server, proxy)
}

#[track_caller]
fn assert_created(reply: &Reply, text: &str, replayed: bool) {
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert_eq!(reply.text(), text);
    assert_eq!(reply.replayed(), replayed, "replayed? {reply:?}");
}

// ---------------------------------------------------------------------------------------------
// 1. Redis down before the request, with the opt-in fail-open mode

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_open_runs_unprotected_while_redis_is_down_and_protects_again_once_it_is_back() {
    let mut server = RedisServer::start();
    let ledger = Ledger::new();
    let a = instance_failing_open(&server.url(), &ledger, Duration::from_secs(5)).await;
    server.kill();
    for run in 1..=2 {
        let reply = answered_within("an unprotected answer", QUICKLY, a.pay("open", "pay")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert_eq!(reply.header("idempotent-unprotected"), Some("true"));
        assert!(!reply.replayed());
        assert_eq!(ledger.runs(), run, "unprotected: every retry runs");
    }

    server.restart();
    let first = a.pay("open", "pay").await;
    assert_created(&first, "run 3 epoch 1: pay", false);
    assert_eq!(
        first.header("idempotent-unprotected"),
        None,
        "protected again"
    );
    assert_created(&a.pay("open", "pay").await, first.text(), true);
    assert_eq!(ledger.runs(), 3);
}

// ---------------------------------------------------------------------------------------------
// 2. Redis unreachable after the handler ran

/// Fault 2's set-up: instances `a` (behind the proxy) and `b` over one Redis; `a` runs the handler
/// of key `k` and Redis becomes unreachable from `a` before it finishes. Its client still gets
/// the real response, quickly.
struct CutAfterTheHandler {
    _server: RedisServer,
    proxy: Proxy,
    ledger: Ledger,
    a: Instance,
    b: Instance,
    first: Reply,
}

async fn cut_after_the_handler(lease: Duration) -> CutAfterTheHandler {
    let (server, proxy) = redis_behind_proxy().await;
    let ledger = Ledger::gated();
    let a = instance(&proxy.url(), &ledger, lease).await;
    let b = instance(&server.url(), &ledger, lease).await;

    let first = a.start_pay("k", "pay 1").await;
    proxy.cut();
    ledger.open();
    let first = answered_within("the first answer with Redis unreachable", QUICKLY, first)
        .await
        .unwrap();
    assert_created(&first, "run 1 epoch 1: pay 1", false);
    CutAfterTheHandler {
        _server: server,
        proxy,
        ledger,
        a,
        b,
        first,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_after_the_handler_ran_the_result_lands_when_it_returns_within_the_lease()
{
    const LEASE: Duration = Duration::from_millis(800);
    let CutAfterTheHandler {
        _server,
        proxy,
        ledger,
        a,
        b,
        first,
    } = cut_after_the_handler(LEASE).await;

    // Redis is back well within the lease: the result, kept by the instance, lands.
    proxy.set_mode(Mode::PassThrough);
    let (replay, _) = b
        .pay_until_not_in_progress("k", "pay 1", LEASE + QUICKLY)
        .await;
    assert_created(&replay, first.text(), true);
    assert_created(&a.pay("k", "pay 1").await, first.text(), true);
    assert_eq!(ledger.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_for_longer_than_the_lease_loses_the_result_and_a_retry_runs_with_epoch_2()
 {
    const LEASE: Duration = Duration::from_millis(500);
    let CutAfterTheHandler {
        _server,
        proxy,
        ledger,
        a,
        b,
        first: _,
    } = cut_after_the_handler(LEASE).await;

    // The outage outlasts the lease, and the instance's background attempts to record (which
    // stop when a lease would have ended): the result is lost.
    tokio::time::sleep(3 * LEASE).await;
    proxy.set_mode(Mode::PassThrough);
    wait_idle(&a.idem).await;
    let retry = b.pay("k", "pay 1").await;
    assert_created(&retry, "run 2 epoch 2: pay 1", false);
    assert_eq!(
        ledger.runs(),
        2,
        "the documented duplicate: the handler ran again"
    );
    // From then on the key is settled, on both instances.
    assert_created(&a.pay("k", "pay 1").await, retry.text(), true);
    assert_created(&b.pay("k", "pay 1").await, retry.text(), true);
    assert_eq!(ledger.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// 3. Redis slower than the command timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slower_than_the_timeout_during_acquire_is_a_quick_503_and_no_self_409_after() {
    const LEASE: Duration = Duration::from_millis(800);
    let (server, proxy) = redis_behind_proxy().await;
    let ledger = Ledger::new();
    let a = instance(&proxy.url(), &ledger, LEASE).await;

    proxy.set_mode(Mode::latency(2 * COMMAND_TIMEOUT));
    let slow = answered_within("the answer with Redis slow", QUICKLY, a.pay("k", "pay 1")).await;
    slow.assert_problem(503, "store-unavailable");
    assert!(slow.retry_after() >= 1);
    assert_eq!(ledger.runs(), 0, "the handler did not run");

    // The timed-out acquire still reaches Redis, late: wait for it to land.
    proxy.set_mode(Mode::PassThrough);
    wait_until("the late acquire to reach Redis", PATIENCE, || {
        record_exists(&server, &record_key("k"))
    })
    .await;
    // The client retries (within the abandoned attempt's lease).
    let (retry, self_conflicts) = a
        .pay_until_not_in_progress("k", "pay 1", LEASE + QUICKLY)
        .await;
    // Never stuck beyond the lease; the takeover of the abandoned attempt is epoch 2.
    assert_created(&retry, "run 1 epoch 2: pay 1", false);
    assert_eq!(ledger.runs(), 1);
    assert_eq!(
        self_conflicts, 0,
        "self-409: the acquire that timed out (the client got 503) landed late and left an \
         in-flight record nobody runs; the client's own retry got `409 request-in-progress` until \
         that lease expired (the runtime does not release a record whose acquire timed out)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slower_than_the_timeout_during_complete_still_answers_and_the_retry_replays() {
    const LEASE: Duration = Duration::from_millis(800);
    let (server, proxy) = redis_behind_proxy().await;
    let ledger = Ledger::gated();
    let a = instance(&proxy.url(), &ledger, LEASE).await;
    let b = instance(&server.url(), &ledger, LEASE).await;

    let first = a.start_pay("k", "pay 1").await;
    let latency = 2 * COMMAND_TIMEOUT;
    proxy.set_mode(Mode::latency(latency));
    ledger.open();
    let first = answered_within("the first answer with Redis slow", QUICKLY, first)
        .await
        .unwrap();
    assert_created(&first, "run 1 epoch 1: pay 1", false);

    // Latency gone, and the commands delayed by it delivered.
    proxy.set_mode(Mode::PassThrough);
    tokio::time::sleep(2 * latency).await;
    let (replay, conflicts) = b
        .pay_until_not_in_progress("k", "pay 1", LEASE + QUICKLY)
        .await;
    assert_eq!(conflicts, 0, "no 409 once Redis answers again");
    assert_created(&replay, first.text(), true);
    assert_created(&a.pay("k", "pay 1").await, first.text(), true);
    assert_eq!(ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. Redis paused (SIGSTOP) while a handler runs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_shorter_than_the_lease_the_handler_keeps_its_key_and_records_once() {
    const LEASE: Duration = Duration::from_millis(1200);
    let server = RedisServer::start();
    let ledger = Ledger::gated();
    let (a, b) = pair(&server.url(), &ledger, LEASE).await;

    let first = a.start_pay("k", "pay 1").await;
    let paused = Instant::now();
    server.pause();
    // A duplicate meanwhile cannot learn anything: 503, and it does not run.
    let duplicate = answered_within(
        "a duplicate with Redis paused",
        QUICKLY,
        b.pay("k", "pay 1"),
    )
    .await;
    duplicate.assert_problem(503, "store-unavailable");
    // A third of the lease, plus the duplicate's budget: at least one renewal fails.
    tokio::time::sleep((LEASE / 3).saturating_sub(paused.elapsed())).await;
    server.resume();

    // The lease held: a duplicate is still told the first is in progress.
    b.pay("k", "pay 1")
        .await
        .assert_problem(409, "request-in-progress");
    ledger.open();
    let first = answered_within("the first answer", QUICKLY, first)
        .await
        .unwrap();
    assert_created(&first, "run 1 epoch 1: pay 1", false);
    let (replay, _) = b.pay_until_not_in_progress("k", "pay 1", QUICKLY).await;
    assert_created(&replay, first.text(), true);
    assert_eq!(ledger.runs(), 1, "duplicates never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_longer_than_the_lease_nobody_takes_over_and_the_owner_still_records() {
    const LEASE: Duration = Duration::from_millis(600);
    let server = RedisServer::start();
    let ledger = Ledger::gated();
    let (a, b) = pair(&server.url(), &ledger, LEASE).await;

    let first = a.start_pay("k", "pay 1").await;
    server.pause();
    // Requests meanwhile (another key, so that their late acquire cannot race the owner's
    // renewals when Redis resumes) are 503 in bounded time.
    let probe = answered_within("a request with Redis paused", QUICKLY, b.pay("probe", "x")).await;
    probe.assert_problem(503, "store-unavailable");
    tokio::time::sleep(3 * LEASE).await;
    server.resume();

    // While Redis was stopped nobody could take over; the owner's renewals (queued during the
    // pause, then its next heartbeat) renew the lease again: renewals check ownership, not the
    // clock. So a duplicate is still refused, and the owner records.
    tokio::time::sleep(LEASE).await;
    b.pay("k", "pay 1")
        .await
        .assert_problem(409, "request-in-progress");
    ledger.open();
    let first = answered_within("the first answer", QUICKLY, first)
        .await
        .unwrap();
    assert_created(&first, "run 1 epoch 1: pay 1", false);
    let (replay, _) = b.pay_until_not_in_progress("k", "pay 1", QUICKLY).await;
    assert_created(&replay, first.text(), true);
    assert_eq!(ledger.runs(), 1);

    // The probe's key is not stuck either. Its timed-out acquire ran when Redis resumed (epoch 1,
    // an attempt nobody runs) and the release sent behind it freed the key, so the retry is
    // epoch 2.
    let (probe, _) = b
        .pay_until_not_in_progress("probe", "x", LEASE + QUICKLY)
        .await;
    assert_created(&probe, "run 2 epoch 2: x", false);
    assert_eq!(ledger.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// 7. Client disconnect mid-handler, 8. handler panic, 9. oversized response: over Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis_a_client_disconnect_does_not_cancel_the_handler_and_another_instance_replays() {
    let server = RedisServer::start();
    let ledger = Ledger::gated();
    let (a, b) = pair(&server.url(), &ledger, Duration::from_millis(800)).await;
    let http = Server::start(a.router.clone()).await;
    let request = http1_request(
        "POST",
        "/pay",
        &[(IDEMPOTENCY_KEY, "gone"), ("content-type", "text/plain")],
        b"pay 7",
    );
    hang_up_once_started(http.addr, &ledger, &request).await;
    assert_eq!(a.idem.running(), 1, "the handler is still running");
    ledger.open();
    ledger.wait_finished(1).await;
    wait_idle(&a.idem).await;

    assert_created(&b.pay("gone", "pay 7").await, "run 1 epoch 1: pay 7", true);
    assert_eq!(ledger.runs(), 1);
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis_a_panicking_handler_is_a_500_and_the_retry_runs_at_once() {
    let server = RedisServer::start();
    let ledger = Ledger::new();
    // A long lease: only the release can free the key in time.
    let (a, b) = pair(&server.url(), &ledger, Duration::from_secs(30)).await;

    let panicked = a.send(keyed("POST", "/panics", "p", "x")).await;
    panicked.assert_problem(500, "handler-panicked");
    let retry = answered_within(
        "the retry",
        QUICKLY,
        b.send(keyed("POST", "/panics", "p", "x")),
    )
    .await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert_eq!(retry.text(), "run 2 epoch 2: x", "released, not stuck");
    assert!(!retry.replayed());
    let replay = a.send(keyed("POST", "/panics", "p", "x")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, retry.body);
    assert_eq!(ledger.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis_a_response_over_the_limit_reaches_its_client_and_duplicates_get_409() {
    let server = RedisServer::start();
    let ledger = Ledger::new();
    let (a, b) = pair(&server.url(), &ledger, Duration::from_millis(800)).await;

    let first = a.send(keyed("POST", "/large", "big", "x")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.body.len(),
        10 * 1024,
        "the first client gets it whole"
    );
    assert!(first.body.iter().all(|byte| *byte == b'x'));
    for instance in [&a, &b, &a, &b] {
        instance
            .send(keyed("POST", "/large", "big", "x"))
            .await
            .assert_problem(409, "result-unavailable");
    }
    assert_eq!(ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// 10. Redis out of memory

fn set_maxmemory(server: &RedisServer, bytes: &str) {
    let _: () = server.query(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_is_a_503_that_writes_nothing_and_a_lost_completion_lands_after() {
    const LEASE: Duration = Duration::from_millis(1500);
    let server = RedisServer::start();
    let _: () = server.query(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction"),
    );
    let ledger = Ledger::gated();
    let (a, b) = pair(&server.url(), &ledger, LEASE).await;

    // Before the handler: refused, quickly, and nothing written.
    set_maxmemory(&server, "1");
    let full = answered_within("the answer with Redis full", QUICKLY, a.pay("oom", "x")).await;
    full.assert_problem(503, "store-unavailable");
    assert!(full.retry_after() >= 1);
    assert!(
        !record_exists(&server, &record_key("oom")),
        "nothing half-written"
    );
    assert_eq!(ledger.runs(), 0);
    set_maxmemory(&server, "0");
    ledger.open();
    let recovered = a.pay("oom", "x").await;
    assert_created(&recovered, "run 1 epoch 1: x", false);
    assert_created(&b.pay("oom", "x").await, recovered.text(), true);

    // After the handler: the client gets its answer, and the result lands once memory is back
    // (within the lease).
    let ledger_gate = Ledger::gated();
    let c = instance(&server.url(), &ledger_gate, LEASE).await;
    let d = instance(&server.url(), &ledger_gate, LEASE).await;
    let first = c.start_pay("late", "y").await;
    set_maxmemory(&server, "1");
    ledger_gate.open();
    let first = answered_within("the first answer with Redis full", QUICKLY, first)
        .await
        .unwrap();
    assert_created(&first, "run 1 epoch 1: y", false);
    set_maxmemory(&server, "0");
    let (replay, _) = d
        .pay_until_not_in_progress("late", "y", LEASE + QUICKLY)
        .await;
    assert_created(&replay, first.text(), true);
    assert_eq!(ledger_gate.runs(), 1);
}
