//! Concurrent duplicates, client disconnects over real TCP, draining on shutdown, record TTL,
//! leases and their takeover, and responses too large to record.
//!
//! Handlers are held at a [`Ledger`] gate instead of sleeping, so the tests do not depend on
//! timing except where time is the subject (TTL, leases), and there the margins are at least 3×.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use http::{StatusCode, header};
use idem_runtime::{Idempotency, IdempotencyContext, MemoryStore, idempotent};
use idem_tests::support::{
    IDEMPOTENCY_KEY, Ledger, PATIENCE, Reply, Server, hang_up_once_started, http1_request,
    idempotent_app, keyed, raw_exchange, send, send_until_not_in_progress, sending, start_send,
    wait_idle, wait_until, within,
};
use tokio::task::JoinSet;

#[idempotent(required = true)]
async fn slow(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

#[idempotent(required = true, wait = "2s")]
async fn slow_waiting(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

#[idempotent(required = true, wait = "1s")]
async fn slow_short_wait(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

fn gated_app(idem: &Idempotency, ledger: &Ledger) -> Router {
    let routes = Router::new()
        .route("/slow", post(slow))
        .route("/waiting", post(slow_waiting))
        .route("/short-wait", post(slow_short_wait));
    idempotent_app(idem, routes, ledger.clone())
}

/// Sends `request`, failing at once (rather than at the gate's timeout) if it starts another
/// execution beyond the `runs` already counted by `ledger`; `why` says what that would mean.
async fn send_expecting_no_run(
    app: &Router,
    request: http::Request<axum::body::Body>,
    (ledger, runs): (&Ledger, usize),
    why: &str,
) -> Reply {
    tokio::select! {
        reply = send(app, request) => reply,
        () = ledger.wait_started(runs + 1) => {
            panic!("a duplicate ran beside the first attempt (execution {}): {why}", runs + 1)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_once_and_the_others_get_409() {
    const N: usize = 20;
    let idem = Idempotency::builder().build();
    let ledger = Ledger::gated();
    let app = gated_app(&idem, &ledger);

    // All N at once: whichever acquires first runs (and is held at the gate); the others must be
    // answered while it runs.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut requests = JoinSet::new();
    for _ in 0..N {
        let (request, barrier) = (
            sending(&app, keyed("POST", "/slow", "dup", "pay 10")),
            Arc::clone(&barrier),
        );
        requests.spawn(async move {
            barrier.wait().await;
            request.await
        });
    }
    for _ in 0..N - 1 {
        let reply = within("a duplicate's answer", requests.join_next())
            .await
            .expect("a request")
            .expect("no panic");
        reply.assert_problem(409, "request-in-progress");
        assert!(reply.retry_after() >= 1, "409 carries Retry-After");
    }
    assert_eq!(ledger.runs(), 1, "exactly one execution");
    assert_eq!(requests.len(), 1, "the first one is still running");

    // A different body with the key in flight is still a mismatch, not a 409.
    send(&app, keyed("POST", "/slow", "dup", "pay 99"))
        .await
        .assert_problem(422, "idempotency-key-reused");

    ledger.open();
    let first = within("the first request", requests.join_next())
        .await
        .expect("a request")
        .expect("no panic");
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: pay 10");
    assert!(!first.replayed());

    let later = send(&app, keyed("POST", "/slow", "dup", "pay 10")).await;
    assert!(later.replayed());
    assert_eq!(later.body, first.body);
    assert_eq!(ledger.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_concurrent_duplicates_wait_and_replay_the_first_result() {
    const N: usize = 20;
    let idem = Idempotency::builder().build();
    let ledger = Ledger::gated();
    let app = gated_app(&idem, &ledger);

    let first = start_send(&app, &ledger, keyed("POST", "/waiting", "w", "x")).await;
    let mut duplicates = JoinSet::new();
    for _ in 1..N {
        duplicates.spawn(sending(&app, keyed("POST", "/waiting", "w", "x")));
    }
    // The duplicates are waiting (well within their 2 s), not answered with a 409.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(duplicates.len(), N - 1);
    assert!(
        duplicates.try_join_next().is_none(),
        "a duplicate answered while the first request still runs"
    );

    ledger.open();
    let first = within("the first request", first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let replies = within("the waiting duplicates", duplicates.join_all()).await;
    for reply in replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert!(reply.replayed());
        assert_eq!(reply.body, first.body);
    }
    assert_eq!(ledger.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_runs_out_is_a_409() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::gated();
    let app = gated_app(&idem, &ledger);

    let first = start_send(&app, &ledger, keyed("POST", "/short-wait", "w", "x")).await;
    let started = std::time::Instant::now();
    let duplicate = send(&app, keyed("POST", "/short-wait", "w", "x")).await;
    duplicate.assert_problem(409, "request-in-progress");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the duplicate gave up after {:?}, before its 1 s wait",
        started.elapsed()
    );
    ledger.open();
    let first = within("the first", first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(ledger.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_does_not_cancel_the_handler_and_the_retry_replays() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::gated();
    let server = Server::start(gated_app(&idem, &ledger)).await;
    let request = http1_request(
        "POST",
        "/slow",
        &[(IDEMPOTENCY_KEY, "gone"), ("content-type", "text/plain")],
        b"pay 7",
    );

    hang_up_once_started(server.addr, &ledger, &request).await;
    assert_eq!(idem.running(), 1, "the handler is still running");
    assert_eq!(ledger.finished(), 0);

    ledger.open();
    ledger.wait_finished(1).await;
    wait_idle(&idem).await;

    let retry = raw_exchange(server.addr, &request).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(
        retry.replayed(),
        "the disconnected request's result was recorded"
    );
    assert_eq!(retry.text(), "run 1: pay 7");
    assert_eq!(ledger.runs(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_first_request_and_replay_are_byte_identical() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let server = Server::start(gated_app(&idem, &ledger)).await;
    let request = http1_request("POST", "/slow", &[(IDEMPOTENCY_KEY, "tcp")], b"hello");
    let first = raw_exchange(server.addr, &request).await;
    let replay = raw_exchange(server.addr, &request).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert!(replay.replayed());
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body);
    assert_eq!(
        replay.header(header::CONTENT_TYPE),
        first.header(header::CONTENT_TYPE)
    );
    assert_eq!(ledger.runs(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_running_handlers_and_their_records() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::gated();
    let app = gated_app(&idem, &ledger);

    let first = start_send(&app, &ledger, keyed("POST", "/slow", "drain", "x")).await;
    // The client gives up: the handler keeps running, and shutdown must wait for it.
    first.abort();
    assert_eq!(idem.running(), 1);

    let draining = {
        let idem = idem.clone();
        tokio::spawn(async move { idem.shutdown().await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !draining.is_finished(),
        "shutdown returned while a handler was still running"
    );
    ledger.open();
    within("shutdown", draining).await.unwrap();
    assert_eq!(ledger.finished(), 1);
    assert_eq!(idem.running(), 0);

    // The runtime still serves after shutdown() returned, and the drained result was recorded.
    let retry = send(&app, keyed("POST", "/slow", "drain", "x")).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "run 1: x");
    assert_eq!(ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// Record TTL
// ---------------------------------------------------------------------------------------------

/// The macro's `ttl` argument: it expands to a `RouteConfig` with that ttl, handed to the store
/// with every record (the attribute accepts whole seconds only).
#[idempotent(required = true, ttl = "1s")]
async fn one_second_ttl(State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.run().await;
    format!("run {run}: {body}")
}

#[tokio::test]
async fn a_record_expires_after_its_ttl_and_the_key_runs_again() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let routes = Router::new().route("/ttl", post(one_second_ttl));
    let app = idempotent_app(&idem, routes, ledger);

    let first = send(&app, keyed("POST", "/ttl", "t", "x")).await;
    assert_eq!(first.text(), "run 1: x");
    let replay = send(&app, keyed("POST", "/ttl", "t", "x")).await;
    assert!(replay.replayed(), "replayed within the ttl");

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let after = send(&app, keyed("POST", "/ttl", "t", "x")).await;
    assert!(!after.replayed(), "the record outlived its ttl");
    assert_eq!(after.text(), "run 2: x", "`ttl = \"1s\"` expired");
    // Once expired, the key is free for any request, not only the same one.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let other = send(&app, keyed("POST", "/ttl", "t", "different")).await;
    assert_eq!(other.text(), "run 3: different");
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_keeps_a_slow_handler_exclusive_past_its_lease() {
    // Renewed every 100 ms, at 2/3 of the lease: 100 ms of slack for a loaded machine.
    let lease = Duration::from_millis(300);
    let idem = Idempotency::builder().lease(lease).build();
    let ledger = Ledger::gated();
    let app = gated_app(&idem, &ledger);

    let first = start_send(&app, &ledger, keyed("POST", "/slow", "hb", "x")).await;
    // Duplicates across 4× the lease: without renewal the lease would have lapsed long ago.
    let started = std::time::Instant::now();
    while started.elapsed() < lease * 4 {
        tokio::time::sleep(lease / 2).await;
        let duplicate = send_expecting_no_run(
            &app,
            keyed("POST", "/slow", "hb", "x"),
            (&ledger, 1),
            "the lease lapsed although the heartbeat should renew it",
        )
        .await;
        duplicate.assert_problem(409, "request-in-progress");
    }
    assert_eq!(ledger.runs(), 1, "the slow handler was duplicated");

    ledger.open();
    let first = within("the first", first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, keyed("POST", "/slow", "hb", "x")).await;
    assert!(replay.replayed());
    assert_eq!(ledger.runs(), 1);
}

/// The state of [`fenced`]: the ledger and the first attempt's context, kept to inspect later.
#[derive(Clone, Default)]
struct Fenced {
    ledger: Ledger,
    first_context: Arc<Mutex<Option<IdempotencyContext>>>,
}

/// The first attempt (epoch 1) is held at the gate; later ones run straight through.
#[idempotent(required = true)]
async fn fenced(context: IdempotencyContext, State(state): State<Fenced>, body: String) -> String {
    let epoch = context
        .epoch()
        .expect("an idempotent execution has an epoch");
    state.ledger.start();
    if epoch == 1 {
        *state.first_context.lock().unwrap() = Some(context.clone());
        state.ledger.pass_gate().await;
    }
    state.ledger.finish();
    format!("epoch {epoch}: {body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_run_time_a_retry_takes_over_with_epoch_2_and_the_late_result_is_refused() {
    let idem = Idempotency::builder()
        .lease(Duration::from_millis(100))
        .max_run_time(Duration::from_millis(150))
        .build();
    let state = Fenced {
        ledger: Ledger::gated(),
        ..Fenced::default()
    };
    let routes = Router::new().route("/fenced", post(fenced));
    let app = idempotent_app(&idem, routes, state.clone());

    let first = start_send(&app, &state.ledger, keyed("POST", "/fenced", "f", "x")).await;

    // Until the lease lapses (max_run_time + lease, ~250 ms) retries are 409; then one takes over.
    let (takeover, _) =
        send_until_not_in_progress(&app, || keyed("POST", "/fenced", "f", "x"), PATIENCE).await;
    assert_eq!(takeover.status, StatusCode::OK);
    assert_eq!(takeover.text(), "epoch 2: x");
    assert!(!takeover.replayed());

    // The first attempt, still running, can see that it lost its lease before it acts: another
    // attempt has already run with a higher epoch.
    let first_context = state.first_context.lock().unwrap().clone().unwrap();
    assert_eq!(first_context.epoch(), Some(1));
    // (Allowing up to 10× the lease for the runtime to notice.)
    wait_until(
        "a running attempt whose lease lapsed (and was taken over) to report lease_lost()",
        Duration::from_secs(1),
        || first_context.lease_lost(),
    )
    .await;

    // The stalled first attempt finishes late: its client still gets its own answer, but the
    // record is the winner's.
    state.ledger.open();
    let late = within("the first", first).await.unwrap();
    assert_eq!(late.text(), "epoch 1: x");
    wait_idle(&idem).await;
    assert!(
        first_context.lease_lost(),
        "the late attempt must see lease_lost()"
    );

    for _ in 0..2 {
        let replay = send(&app, keyed("POST", "/fenced", "f", "x")).await;
        assert!(replay.replayed());
        assert_eq!(replay.text(), "epoch 2: x", "replays serve the winner");
    }
    assert_eq!(state.ledger.runs(), 2);
}

/// A route lease of 1 s under a runtime lease of 30 s.
#[idempotent(required = true, lease = "1s")]
async fn short_lease(State(ledger): State<Ledger>, body: String) -> String {
    let run = ledger.start();
    if run == 1 {
        ledger.pass_gate().await;
    }
    ledger.finish();
    format!("run {run}: {body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_lease_argument_overrides_the_runtime_lease() {
    // The first attempt stalls past max_run_time; its key frees itself after the *route's* 1 s
    // lease, far sooner than the runtime's 30 s.
    let idem = Idempotency::builder()
        .lease(Duration::from_secs(30))
        .max_run_time(Duration::from_millis(100))
        .build();
    let ledger = Ledger::gated();
    let routes = Router::new().route("/short-lease", post(short_lease));
    let app = idempotent_app(&idem, routes, ledger.clone());
    let first = start_send(&app, &ledger, keyed("POST", "/short-lease", "l", "x")).await;
    let started = std::time::Instant::now();

    // Until the 1 s lease lapses retries are 409; then one takes over.
    let retry = || keyed("POST", "/short-lease", "l", "x");
    let (takeover, _) = send_until_not_in_progress(&app, retry, PATIENCE).await;
    assert_eq!(takeover.text(), "run 2: x");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "taken over after {:?}, before the lease could lapse",
        started.elapsed()
    );
    ledger.open();
    within("the first", first).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Responses too large to record, and status-only records
// ---------------------------------------------------------------------------------------------

#[idempotent(required = true)]
async fn large(State(ledger): State<Ledger>, _body: String) -> Vec<u8> {
    let run = ledger.run().await;
    let mut body = vec![b'x'; 10 * 1024];
    body[0] = b'0' + u8::try_from(run).unwrap();
    body
}

#[idempotent(required = true)]
async fn large_stream(State(ledger): State<Ledger>, _body: String) -> axum::body::Body {
    ledger.run().await;
    let chunks = (0..10).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1024]));
    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_response_over_the_limit_reaches_its_client_and_duplicates_get_409() {
    let store = MemoryStore::new(1 << 20);
    let idem = Idempotency::builder()
        .store(store.clone())
        .max_response_bytes(1024)
        .build();
    let ledger = Ledger::new();
    let routes = Router::new()
        .route("/large", post(large))
        .route("/large-stream", post(large_stream));
    let app = idempotent_app(&idem, routes, ledger.clone());

    for (route, byte) in [("/large", b'1'), ("/large-stream", b'y')] {
        let first = send(&app, keyed("POST", route, &route[1..], "x")).await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(
            first.body.len(),
            10 * 1024,
            "{route}: the first client gets it all"
        );
        assert_eq!(first.body[0], byte);
        assert!(first.body[1..].iter().all(|b| *b == first.body[1]));

        let runs = ledger.runs();
        for _ in 0..2 {
            let duplicate = send(&app, keyed("POST", route, &route[1..], "x")).await;
            duplicate.assert_problem(409, "result-unavailable");
        }
        assert_eq!(
            ledger.runs(),
            runs,
            "{route}: the handler must not run again"
        );
    }
}

#[idempotent(required = true, store_body = false)]
async fn secret(
    State(ledger): State<Ledger>,
    _body: String,
) -> (StatusCode, [(header::HeaderName, &'static str); 2], String) {
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

#[tokio::test]
async fn store_body_false_replays_status_and_location_without_the_body() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::new();
    let routes = Router::new().route("/secrets", post(secret));
    let app = idempotent_app(&idem, routes, ledger.clone());
    let first = send(&app, keyed("POST", "/secrets", "s", "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "{\"token\":\"one-time-1\"}");

    let replay = send(&app, keyed("POST", "/secrets", "s", "x")).await;
    assert!(replay.replayed());
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.header(header::LOCATION), Some("/secrets/1"));
    assert!(
        replay.body.is_empty(),
        "the secret body was stored: {:?}",
        replay.body
    );
    assert_eq!(
        replay.header(header::CONTENT_TYPE),
        None,
        "no content type for an empty body"
    );
    assert_eq!(ledger.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// A full embedded store
// ---------------------------------------------------------------------------------------------

/// Answers with as many bytes as the body asks for; held at the gate like the others.
#[idempotent(required = true)]
async fn sized(State(ledger): State<Ledger>, body: String) -> Vec<u8> {
    ledger.run().await;
    vec![b'r'; body.parse().expect("a length")]
}

fn sized_app(store: &MemoryStore, ledger: &Ledger) -> Router {
    let idem = Idempotency::builder().store(store.clone()).build();
    let routes = Router::new().route("/sized", post(sized));
    idempotent_app(&idem, routes, ledger.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_never_drops_an_in_flight_record() {
    // The store is bounded in bytes and may evict completed records (an evicted key behaves as
    // new), but an in-flight record is the only thing keeping a duplicate from running beside
    // the first attempt: it must never be evicted or refused admission.
    const CAPACITY: u64 = 64 * 1024;
    const RECORDS: u64 = 16;
    let scratch = MemoryStore::new(CAPACITY);
    send(
        &sized_app(&scratch, &Ledger::new()),
        keyed("POST", "/sized", "probe", "0"),
    )
    .await;
    let overhead = scratch.weighted_size();

    // Fill the store exactly with records that are often replayed (hot), as in production.
    let store = MemoryStore::new(CAPACITY);
    let warm = sized_app(&store, &Ledger::new());
    let body = (CAPACITY / RECORDS - overhead).to_string();
    let replay_all = || async {
        for i in 0..RECORDS {
            send(
                &warm,
                keyed("POST", "/sized", &format!("hot{i}"), body.clone()),
            )
            .await;
        }
    };
    for _ in 0..5 {
        replay_all().await;
    }
    assert_eq!(store.weighted_size(), CAPACITY, "the store is full");

    let ledger = Ledger::gated();
    let app = sized_app(&store, &ledger);
    let first = start_send(&app, &ledger, keyed("POST", "/sized", "new-key", "10")).await;
    // Ordinary traffic on other keys meanwhile (it also runs the cache's maintenance).
    for _ in 0..4 {
        replay_all().await;
    }

    let duplicate = send_expecting_no_run(
        &app,
        keyed("POST", "/sized", "new-key", "10"),
        (&ledger, 1),
        "the full MemoryStore dropped (or never admitted) the in-flight record",
    )
    .await;
    duplicate.assert_problem(409, "request-in-progress");

    ledger.open();
    let first = within("the first", first).await.unwrap();
    assert_eq!(first.body.len(), 10);
    let retry = send(&app, keyed("POST", "/sized", "new-key", "10")).await;
    assert!(
        retry.replayed(),
        "the first attempt's result was not recorded"
    );
    assert_eq!(ledger.runs(), 1);
}

#[tokio::test]
async fn every_409_problem_carries_retry_after() {
    // The problem contract: `Retry-After` on 409 and 503, whichever the cause (503: see
    // `wire.rs`).
    let idem = Idempotency::builder().max_response_bytes(1024).build();
    let ledger = Ledger::gated();
    let routes = Router::new()
        .route("/large", post(large))
        .route("/slow", post(slow));
    let app = idempotent_app(&idem, routes, ledger.clone());

    let first = start_send(&app, &ledger, keyed("POST", "/slow", "busy", "x")).await;
    let in_progress = send(&app, keyed("POST", "/slow", "busy", "x")).await;
    in_progress.assert_problem(409, "request-in-progress");
    assert!(in_progress.retry_after() >= 1);
    ledger.open();
    within("the first", first).await.unwrap();

    send(&app, keyed("POST", "/large", "big", "x")).await;
    let unavailable = send(&app, keyed("POST", "/large", "big", "x")).await;
    unavailable.assert_problem(409, "result-unavailable");
    assert!(
        unavailable.header(header::RETRY_AFTER).is_some(),
        "409 result-unavailable has no Retry-After"
    );
    assert!(unavailable.retry_after() >= 1);
}
