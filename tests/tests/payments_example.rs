//! The payments example against its contract (DESIGN.md section 8): in process through
//! `idem_examples::payments::app`, the real `payments` binary over TCP, stopped with SIGTERM, and
//! the server's timeouts and connection cap (`idem_examples::server`) over TCP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode, header};
use idem_examples::payments::{self, Settings};
use idem_examples::server::{self, ServerConfig};
use idem_runtime::Idempotency;
use idem_tests::process::PaymentsProcess;
use idem_tests::support::{
    IDEMPOTENCY_KEY, Reply, http1_request, raw_exchange, request, send, within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

fn app() -> Router {
    let idem = Idempotency::builder().build();
    payments::app(&idem, Settings::default())
}

/// A request as `user` (none: unauthenticated), with an optional key and a JSON body.
fn call(
    method: &str,
    uri: &str,
    user: Option<&str>,
    key: Option<&str>,
    body: &str,
) -> Request<Body> {
    let mut builder = request(method, uri);
    if let Some(user) = user {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {user}"));
    }
    if let Some(key) = key {
        builder = builder.header(IDEMPOTENCY_KEY, key);
    }
    if !body.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    builder.body(body.to_owned().into()).unwrap()
}

fn pay(user: Option<&str>, key: Option<&str>, body: &str) -> Request<Body> {
    call("POST", "/payments", user, key, body)
}

/// Asserts the example's own problem document (`https://payments.example/problems/<slug>`).
#[track_caller]
fn assert_app_problem(reply: &Reply, status: u16, slug: &str) {
    assert_eq!(reply.status.as_u16(), status, "{reply:?}");
    assert_eq!(
        reply.header(header::CONTENT_TYPE),
        Some("application/problem+json")
    );
    let document = reply.json();
    assert_eq!(
        document["type"],
        format!("https://payments.example/problems/{slug}")
    );
    assert_eq!(document["status"], status);
}

#[tokio::test]
async fn post_creates_a_payment_and_a_retry_replays_it() {
    let app = app();
    let body = r#"{"amount": 1250, "currency": "EUR"}"#;
    let created = send(&app, pay(Some("ann"), Some("p1"), body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert!(!created.replayed());
    let payment = created.json();
    let id = payment["id"].as_str().expect("an id").to_owned();
    assert_eq!(payment["amount"], 1250);
    assert_eq!(payment["currency"], "EUR");
    assert_eq!(payment["status"], "succeeded");
    let location = format!("/payments/{id}");
    assert_eq!(created.header(header::LOCATION), Some(location.as_str()));

    let replay = send(&app, pay(Some("ann"), Some("p1"), body)).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(replay.body, created.body, "byte-identical");
    assert_eq!(replay.header(header::LOCATION), Some(location.as_str()));
    assert_eq!(
        replay.header(header::CONTENT_TYPE),
        created.header(header::CONTENT_TYPE)
    );

    // One payment exists, however many retries.
    let list = send(&app, call("GET", "/payments", Some("ann"), None, "")).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json(), serde_json::json!([payment]));
    let one = send(&app, call("GET", &location, Some("ann"), None, "")).await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json(), payment);

    // The key with another body is a reuse.
    send(
        &app,
        pay(
            Some("ann"),
            Some("p1"),
            r#"{"amount": 99, "currency": "EUR"}"#,
        ),
    )
    .await
    .assert_problem(422, "idempotency-key-reused");
    // A new key is a new payment.
    let second = send(&app, pay(Some("ann"), Some("p2"), body)).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_ne!(second.json()["id"], payment["id"]);
    let list = send(&app, call("GET", "/payments", Some("ann"), None, "")).await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn authentication_runs_first_and_a_401_is_not_recorded() {
    let app = app();
    let body = r#"{"amount": 5, "currency": "USD"}"#;
    let unauthenticated = send(&app, pay(None, Some("a1"), body)).await;
    assert_app_problem(&unauthenticated, 401, "unauthorized");
    assert_eq!(
        unauthenticated.header(header::WWW_AUTHENTICATE),
        Some("Bearer")
    );
    let created = send(&app, pay(Some("ann"), Some("a1"), body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "the key stayed free");
    assert!(!created.replayed());
    for (method, uri) in [("GET", "/payments"), ("GET", "/payments/pay_1")] {
        let reply = send(&app, call(method, uri, None, None, "")).await;
        assert_app_problem(&reply, 401, "unauthorized");
    }
}

#[tokio::test]
async fn a_payment_without_a_key_is_refused() {
    let app = app();
    send(
        &app,
        pay(Some("ann"), None, r#"{"amount": 5, "currency": "USD"}"#),
    )
    .await
    .assert_problem(400, "idempotency-key-missing");
    let list = send(&app, call("GET", "/payments", Some("ann"), None, "")).await;
    assert_eq!(list.json(), serde_json::json!([]));
}

#[tokio::test]
async fn a_processor_outage_is_a_503_that_is_not_recorded() {
    let app = app();
    let body = r#"{"amount": 5, "currency": "XTS"}"#;
    for _ in 0..3 {
        let reply = send(&app, pay(Some("ann"), Some("x1"), body)).await;
        assert_app_problem(&reply, 503, "processor-unavailable");
        assert!(!reply.replayed(), "a transient failure runs again on retry");
        assert!(reply.retry_after() >= 1);
    }
}

#[tokio::test]
async fn a_declined_payment_is_a_402_that_is_recorded_and_replayed() {
    let app = app();
    let body = r#"{"amount": 1000001, "currency": "EUR"}"#;
    let declined = send(&app, pay(Some("ann"), Some("d1"), body)).await;
    assert_app_problem(&declined, 402, "declined");
    assert!(!declined.replayed());
    let replay = send(&app, pay(Some("ann"), Some("d1"), body)).await;
    assert_app_problem(&replay, 402, "declined");
    assert!(replay.replayed());
    assert_eq!(replay.body, declined.body);
    // The limit itself is accepted.
    let at_limit = send(
        &app,
        pay(
            Some("ann"),
            Some("d2"),
            r#"{"amount": 1000000, "currency": "EUR"}"#,
        ),
    )
    .await;
    assert_eq!(at_limit.status, StatusCode::CREATED);
}

#[tokio::test]
async fn invalid_bodies_are_4xx_and_a_corrected_retry_runs() {
    let app = app();
    let invalid = [
        "{",
        r#"{"amount": "5", "currency": "EUR"}"#,
        r#"{"amount": 5}"#,
        r#"{"amount": -5, "currency": "EUR"}"#,
        r#"{"amount": 5, "currency": "EUR", "extra": true}"#,
        r#"{"amount": 0, "currency": "EUR"}"#,
        r#"{"amount": 5, "currency": "eur"}"#,
        r#"{"amount": 5, "currency": "EURO"}"#,
    ];
    for (n, body) in invalid.iter().enumerate() {
        let reply = send(&app, pay(Some("ann"), Some(&format!("i{n}")), body)).await;
        assert!(reply.status.is_client_error(), "{body}: {reply:?}");
        assert_ne!(reply.status, StatusCode::PAYMENT_REQUIRED, "{body}");
    }
    // Rejected by the extractor: the key is free for the corrected body.
    let rejected = send(&app, pay(Some("ann"), Some("fix"), r#"{"amount": 5}"#)).await;
    assert!(rejected.status.is_client_error());
    let corrected = send(
        &app,
        pay(
            Some("ann"),
            Some("fix"),
            r#"{"amount": 5, "currency": "EUR"}"#,
        ),
    )
    .await;
    assert_eq!(corrected.status, StatusCode::CREATED);
    assert!(!corrected.replayed());
    let list = send(&app, call("GET", "/payments", Some("ann"), None, "")).await;
    assert_eq!(
        list.json().as_array().map(Vec::len),
        Some(1),
        "only the corrected payment exists"
    );
}

#[tokio::test]
async fn body_rejections_are_problem_documents_with_axums_statuses() {
    let app = app();
    // (body, content type, status, slug): axum's statuses, the example's problem documents.
    let cases = [
        ("{", Some("application/json"), 400, "malformed-json"),
        ("not json", Some("application/json"), 400, "malformed-json"),
        (
            r#"{"amount": 5, "currency": "EUR"}"#,
            None,
            415,
            "unsupported-media-type",
        ),
        (
            r#"{"amount": 5, "currency": "EUR"}"#,
            Some("text/plain"),
            415,
            "unsupported-media-type",
        ),
        (
            r#"{"amount": "5", "currency": "EUR"}"#,
            Some("application/json"),
            422,
            "invalid-payment",
        ),
        (
            r#"{"amount": 5}"#,
            Some("application/json"),
            422,
            "invalid-payment",
        ),
        (
            r#"{"amount": 5, "currency": "EUR", "extra": true}"#,
            Some("application/json"),
            422,
            "invalid-payment",
        ),
    ];
    for (n, (body, content_type, status, slug)) in cases.into_iter().enumerate() {
        let mut builder = request("POST", "/payments")
            .header(header::AUTHORIZATION, "Bearer ann")
            .header(IDEMPOTENCY_KEY, format!("bad-{n}"));
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let reply = send(&app, builder.body(body.to_owned().into()).unwrap()).await;
        assert_app_problem(&reply, status, slug);
        assert!(!reply.replayed(), "{body}");
        let detail = reply.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !detail.is_empty() && detail.len() <= 256 * 4,
            "{body}: {detail}"
        );
    }
    // A field name the size of the body is not echoed whole.
    let long_field = format!(
        r#"{{"amount": 5, "currency": "EUR", "{}": 1}}"#,
        "x".repeat(10_000)
    );
    let reply = send(&app, pay(Some("ann"), Some("long"), &long_field)).await;
    assert_app_problem(&reply, 422, "invalid-payment");
    assert!(reply.body.len() < 2_000, "{} bytes", reply.body.len());

    // The same documents without a key (PATCH's key is optional: the body is read by the
    // extractor itself, not through idem).
    let created = send(
        &app,
        pay(
            Some("ann"),
            Some("p"),
            r#"{"amount": 3, "currency": "EUR"}"#,
        ),
    )
    .await;
    let location = created.header(header::LOCATION).unwrap().to_owned();
    let syntax = send(&app, call("PATCH", &location, Some("ann"), None, "{")).await;
    assert_app_problem(&syntax, 400, "malformed-json");
    let data = send(
        &app,
        call("PATCH", &location, Some("ann"), None, r#"{"desc": 1}"#),
    )
    .await;
    assert_app_problem(&data, 422, "invalid-payment");
    let untyped = request("PATCH", &location)
        .header(header::AUTHORIZATION, "Bearer ann")
        .body(Body::from(r#"{"description": "x"}"#))
        .unwrap();
    assert_app_problem(&send(&app, untyped).await, 415, "unsupported-media-type");
}

/// Creates `count` payments for `user` (keys `{user}-{n}`) and returns their ids, oldest first.
async fn create_payments(app: &Router, user: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let key = format!("{user}-{n}");
        let body = format!(r#"{{"amount": {}, "currency": "EUR"}}"#, n + 1);
        let created = send(app, pay(Some(user), Some(&key), &body)).await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        ids.push(created.json()["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// The ids of a listing, which must be a bare JSON array of payments.
#[track_caller]
fn listed_ids(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply
        .json()
        .as_array()
        .expect("a bare JSON array")
        .iter()
        .map(|payment| payment["id"].as_str().expect("an id").to_owned())
        .collect()
}

async fn list(app: &Router, user: &str, query: &str) -> Reply {
    send(
        app,
        call("GET", &format!("/payments{query}"), Some(user), None, ""),
    )
    .await
}

#[tokio::test]
async fn listing_is_paginated_with_limit_and_starting_after() {
    let app = app();
    let ann = create_payments(&app, "ann", 105).await;
    let bob = create_payments(&app, "bob", 2).await;

    // Default 100, oldest first; `limit` up to 1000.
    assert_eq!(listed_ids(&list(&app, "ann", "").await), ann[..100]);
    assert_eq!(listed_ids(&list(&app, "ann", "?limit=1000").await), ann);
    assert_eq!(listed_ids(&list(&app, "ann", "?limit=2").await), ann[..2]);
    let after = format!("?limit=2&starting_after={}", ann[1]);
    assert_eq!(listed_ids(&list(&app, "ann", &after).await), ann[2..4]);
    let after = format!("?starting_after={}", ann[1]);
    assert_eq!(listed_ids(&list(&app, "ann", &after).await), ann[2..102]);
    let after_last = format!("?starting_after={}", ann[104]);
    assert!(listed_ids(&list(&app, "ann", &after_last).await).is_empty());
    assert_eq!(listed_ids(&list(&app, "bob", "?limit=1").await), bob[..1]);

    // Walking the pages visits every payment once, in order.
    let mut walked = Vec::new();
    let mut query = "?limit=40".to_owned();
    loop {
        let page = listed_ids(&list(&app, "ann", &query).await);
        walked.extend(page.iter().cloned());
        match page.last() {
            Some(last) if page.len() == 40 => query = format!("?limit=40&starting_after={last}"),
            _ => break,
        }
    }
    assert_eq!(walked, ann);

    for bad in [
        "0",
        "1001",
        "-1",
        "abc",
        "",
        "1.5",
        "99999999999999999999999",
    ] {
        let reply = list(&app, "ann", &format!("?limit={bad}")).await;
        assert_app_problem(&reply, 400, "invalid-limit");
    }
    // Another user's id is as unknown as an id that never existed.
    for cursor in [bob[0].as_str(), "pay_0000000000000000", ""] {
        let reply = list(&app, "ann", &format!("?starting_after={cursor}")).await;
        assert_app_problem(&reply, 400, "invalid-starting-after");
    }
    let twice = list(&app, "ann", "?limit=1&limit=2").await;
    assert_app_problem(&twice, 400, "invalid-query");
    // Authentication still comes first.
    let anonymous = send(&app, call("GET", "/payments?limit=0", None, None, "")).await;
    assert_app_problem(&anonymous, 401, "unauthorized");
}

#[tokio::test]
async fn the_ledger_keeps_only_the_newest_payments_up_to_its_capacity() {
    let idem = Idempotency::builder().build();
    let app = payments::app(
        &idem,
        Settings {
            ledger_capacity: 3,
            ..Settings::default()
        },
    );
    let ann = create_payments(&app, "ann", 2).await;
    let bob = create_payments(&app, "bob", 2).await;
    // Four payments, room for three: ann's first, the oldest, is gone.
    assert_eq!(listed_ids(&list(&app, "ann", "").await), ann[1..]);
    assert_eq!(listed_ids(&list(&app, "bob", "").await), bob);
    let dropped = format!("/payments/{}", ann[0]);
    let gone = send(&app, call("GET", &dropped, Some("ann"), None, "")).await;
    assert_app_problem(&gone, 404, "not-found");
    let update = r#"{"description": "x"}"#;
    let gone = send(&app, call("PATCH", &dropped, Some("ann"), None, update)).await;
    assert_app_problem(&gone, 404, "not-found");
    // Its record outlives it: the retry replays the 201 and charges nothing.
    let retry = send(
        &app,
        pay(
            Some("ann"),
            Some("ann-0"),
            r#"{"amount": 1, "currency": "EUR"}"#,
        ),
    )
    .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.json()["id"], ann[0].as_str());
    // A cursor that was dropped is unknown.
    let reply = list(&app, "ann", &format!("?starting_after={}", ann[0])).await;
    assert_app_problem(&reply, 400, "invalid-starting-after");

    // A flood from one user pushes everyone else's payments out, and the ledger stays at three.
    let carol = create_payments(&app, "carol", 10).await;
    assert_eq!(listed_ids(&list(&app, "carol", "").await), carol[7..]);
    for user in ["ann", "bob"] {
        assert!(listed_ids(&list(&app, user, "").await).is_empty(), "{user}");
    }
}

#[tokio::test]
async fn users_never_see_each_others_payments_or_records() {
    let app = app();
    let body = r#"{"amount": 7, "currency": "GBP"}"#;
    let ann = send(&app, pay(Some("ann"), Some("same"), body)).await;
    let bob = send(&app, pay(Some("bob"), Some("same"), body)).await;
    assert_eq!(ann.status, StatusCode::CREATED);
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.replayed(), "keys are scoped to the user");
    assert_ne!(ann.json()["id"], bob.json()["id"]);

    let ann_location = ann.header(header::LOCATION).unwrap().to_owned();
    let hidden = send(&app, call("GET", &ann_location, Some("bob"), None, "")).await;
    assert_app_problem(&hidden, 404, "not-found");
    let missing = send(
        &app,
        call("GET", "/payments/pay_nope", Some("ann"), None, ""),
    )
    .await;
    assert_app_problem(&missing, 404, "not-found");
    let bobs = send(&app, call("GET", "/payments", Some("bob"), None, "")).await;
    assert_eq!(bobs.json(), serde_json::json!([bob.json()]));
}

#[tokio::test]
async fn patch_updates_with_or_without_a_key() {
    let app = app();
    let created = send(
        &app,
        pay(
            Some("ann"),
            Some("c"),
            r#"{"amount": 3, "currency": "EUR"}"#,
        ),
    )
    .await;
    let location = created.header(header::LOCATION).unwrap().to_owned();

    let update = r#"{"description": "rent"}"#;
    let patched = send(
        &app,
        call("PATCH", &location, Some("ann"), Some("u1"), update),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.json()["description"], "rent");
    assert!(!patched.replayed());
    // Another change in between, then the keyed retry: it replays, it does not re-apply.
    let other = send(
        &app,
        call(
            "PATCH",
            &location,
            Some("ann"),
            None,
            r#"{"description": "food"}"#,
        ),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(!other.replayed());
    assert_eq!(other.json()["description"], "food");
    let replay = send(
        &app,
        call("PATCH", &location, Some("ann"), Some("u1"), update),
    )
    .await;
    assert!(replay.replayed());
    assert_eq!(replay.body, patched.body);
    let current = send(&app, call("GET", &location, Some("ann"), None, "")).await;
    assert_eq!(
        current.json()["description"],
        "food",
        "the replay did not re-apply"
    );

    // Without a key it runs every time.
    for _ in 0..2 {
        let unkeyed = send(&app, call("PATCH", &location, Some("ann"), None, update)).await;
        assert_eq!(unkeyed.status, StatusCode::OK);
        assert!(!unkeyed.replayed());
    }
    let foreign = send(
        &app,
        call("PATCH", &location, Some("bob"), Some("u2"), update),
    )
    .await;
    assert_app_problem(&foreign, 404, "not-found");
    let invalid = send(
        &app,
        call(
            "PATCH",
            &location,
            Some("ann"),
            Some("u3"),
            r#"{"desc": 1}"#,
        ),
    )
    .await;
    assert!(invalid.status.is_client_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_a_slow_payment_charge_once() {
    let idem = Idempotency::builder().build();
    let app = payments::app(
        &idem,
        Settings {
            processing: Duration::from_millis(300),
            ..Settings::default()
        },
    );
    let body = r#"{"amount": 10, "currency": "EUR"}"#;
    let first = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, pay(Some("ann"), Some("slow"), body)).await })
    };
    // Wait for the first request to hold the key, then retry while it is processing.
    within("the first request to take the key", async {
        while idem.running() == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    send(&app, pay(Some("ann"), Some("slow"), body))
        .await
        .assert_problem(409, "request-in-progress");
    let first = within("the first", first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, pay(Some("ann"), Some("slow"), body)).await;
    assert!(replay.replayed());
    let list = send(&app, call("GET", "/payments", Some("ann"), None, "")).await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(1));
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

const ANN_PAYS: [(&str, &str); 2] = [
    ("authorization", "Bearer ann"),
    ("content-type", "application/json"),
];

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payments_binary_serves_the_contract_and_stops_on_sigterm() {
    let payments = PaymentsProcess::start(&[]).await;
    let addr = payments.addr;
    let body = br#"{"amount": 42, "currency": "EUR"}"#;
    let [auth, json] = ANN_PAYS;
    let headers = [auth, json, (IDEMPOTENCY_KEY, "bin-1")];
    let request = http1_request("POST", "/payments", &headers, body);
    let created = raw_exchange(addr, &request).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created.header(header::LOCATION),
        Some(format!("/payments/{id}").as_str())
    );
    let replay = raw_exchange(addr, &request).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(replay.body, created.body);
    let missing = raw_exchange(addr, &http1_request("POST", "/payments", &ANN_PAYS, body)).await;
    missing.assert_problem(400, "idempotency-key-missing");
    let unauthenticated =
        raw_exchange(addr, &http1_request("POST", "/payments", &[json], body)).await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    let list = raw_exchange(addr, &http1_request("GET", "/payments", &[auth], b"")).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json().as_array().map(Vec::len), Some(1));
    let one = raw_exchange(
        addr,
        &http1_request("GET", &format!("/payments/{id}"), &[auth], b""),
    )
    .await;
    assert_eq!(one.json(), created.json());

    payments.terminate();
    payments.assert_clean_exit().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_the_binary_lets_a_running_payment_finish() {
    // The client of a slow payment goes away, then the process is told to stop: it must not exit
    // before the handler finished (and recorded), however the connection ended.
    const PROCESSING: Duration = Duration::from_millis(2000);
    let payments = PaymentsProcess::start(&[("PAYMENTS_PROCESSING_MS", "2000")]).await;
    let addr = payments.addr;
    let body = br#"{"amount": 5, "currency": "EUR"}"#;
    let [auth, json] = ANN_PAYS;
    let request = http1_request(
        "POST",
        "/payments",
        &[auth, json, (IDEMPOTENCY_KEY, "drain")],
        body,
    );
    let started = std::time::Instant::now();
    let client = idem_tests::support::connect_and_write(addr, &request).await;
    // Let the server take that request first (a duplicate sent too early could become the first).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Proof that the payment is being processed: a duplicate is told it is in progress.
    let in_progress = raw_exchange(addr, &request).await;
    in_progress.assert_problem(409, "request-in-progress");
    drop(client);
    payments.terminate();
    payments.assert_clean_exit().await;
    // The payment started after `started` and takes PROCESSING: a process that drains its running
    // handlers cannot have exited sooner.
    let exited = started.elapsed();
    assert!(
        exited >= PROCESSING,
        "payments exited {exited:?} after the request, before its {PROCESSING:?} payment finished"
    );
}

// ---------------------------------------------------------------------------------------------
// The server's timeouts and connection cap, over real TCP
// ---------------------------------------------------------------------------------------------

/// [`server::serve`] of the payments app on an ephemeral loopback port, stopped by
/// [`TestServer::stop`].
struct TestServer {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, app(), config, async {
            let _ = stopped.await;
        }));
        Self { addr, stop, task }
    }

    /// Stops the server and waits until it has returned.
    async fn stop(self) {
        let _ = self.stop.send(());
        within("the server to stop", self.task).await.unwrap();
    }
}

/// Connects, writes `bytes` and reads until the server closes the connection: what it sent and
/// how long after the write it closed.
async fn until_cut_off(addr: SocketAddr, bytes: Vec<u8>) -> (Vec<u8>, Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    read_until_closed(stream).await
}

async fn read_until_closed(mut stream: TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        // A reset (the server dropped what the client had sent) ends it as well as a close.
        match within(
            "the server to close the connection",
            stream.read(&mut chunk),
        )
        .await
        {
            Ok(0) | Err(_) => return (received, started.elapsed()),
            Ok(read) => received.extend_from_slice(&chunk[..read]),
        }
    }
}

/// Asserts that the server closed a connection `elapsed` after the client stopped, no sooner
/// than `timeout` (less the timer's slack) and not long after it.
#[track_caller]
fn assert_cut_off_by(what: &str, elapsed: Duration, timeout: Duration) {
    assert!(
        elapsed + Duration::from_millis(150) >= timeout,
        "{what}: closed after {elapsed:?}, before its {timeout:?} timeout"
    );
    assert!(
        elapsed <= timeout + Duration::from_secs(2),
        "{what}: closed only after {elapsed:?} (timeout {timeout:?})"
    );
}

/// A slowloris on a kept-alive connection: one whole request (as `loris`, who has no payment),
/// its response, then the next request head one byte every 100 ms, so that bytes keep flowing.
/// How long after the first response the server closed the connection.
async fn trickled_second_head(addr: SocketAddr) -> Duration {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = b"GET /payments HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer loris\r\n";
    stream.write_all(head).await.unwrap();
    stream.write_all(b"\r\n").await.unwrap();
    let mut received = Vec::new();
    let mut chunk = [0; 4096];
    while !received.ends_with(b"\r\n\r\n[]") {
        let read = within("the first response", stream.read(&mut chunk))
            .await
            .unwrap();
        assert_ne!(read, 0, "{:?}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..read]);
    }
    assert!(received.starts_with(b"HTTP/1.1 200 "));
    let (reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for byte in head.iter().cycle() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut reader = reader;
    loop {
        match within(
            "the server to close the connection",
            reader.read(&mut chunk),
        )
        .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    trickle.abort();
    started.elapsed()
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = length[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HTTP/2 connection's opening (preface, empty SETTINGS) and `GET path` as ann on stream 1.
fn h2_get(path: &str) -> Vec<u8> {
    // HPACK: each field a literal without indexing, with a literal name, no Huffman coding.
    let mut block = Vec::new();
    let fields = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("authorization", "Bearer ann"),
    ];
    for (name, value) in fields {
        block.push(0);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(h2_frame(0x4, 0, 0, &[]));
    // HEADERS with END_STREAM and END_HEADERS.
    bytes.extend(h2_frame(0x1, 0x5, 1, &block));
    bytes
}

/// The first byte of the header block of each HEADERS frame the server sent on `stream`.
fn h2_header_starts(mut bytes: &[u8], stream: u32) -> Vec<u8> {
    let mut starts = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        let Some(payload) = bytes.get(9..9 + length) else {
            break;
        };
        if bytes[3] == 0x1 && id == stream {
            starts.extend(payload.first());
        }
        bytes = &bytes[9 + length..];
    }
    starts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_silent_and_idle_clients_are_cut_off_while_others_are_served() {
    const HEADER_READ: Duration = Duration::from_millis(1000);
    const BODY: Duration = Duration::from_millis(1000);
    const IDLE: Duration = Duration::from_millis(1500);
    let server = TestServer::start(
        ServerConfig::new()
            .header_read_timeout(HEADER_READ)
            .request_body_timeout(BODY)
            .idle_timeout(IDLE),
    )
    .await;
    let addr = server.addr;
    let [auth, json] = ANN_PAYS;

    let silent = tokio::spawn(until_cut_off(addr, Vec::new()));
    let half_head = tokio::spawn(until_cut_off(
        addr,
        b"POST /payments HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer ann\r\n".to_vec(),
    ));
    let h2_preface_only = tokio::spawn(until_cut_off(addr, H2_PREFACE.to_vec()));
    // A payment whose body stops 50 bytes short of its Content-Length.
    let mut short = http1_request(
        "POST",
        "/payments",
        &[auth, json, (IDEMPOTENCY_KEY, "short")],
        &[b' '; 100],
    );
    short.truncate(short.len() - 50);
    let short_body = tokio::spawn(until_cut_off(addr, short));
    // Served, then kept alive without a next request.
    let kept_alive = tokio::spawn(until_cut_off(
        addr,
        b"GET /payments HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer ann\r\n\r\n".to_vec(),
    ));
    let h2_served = tokio::spawn(until_cut_off(addr, h2_get("/payments")));
    let slowloris = tokio::spawn(trickled_second_head(addr));

    // Meanwhile other clients are served as usual.
    let body = br#"{"amount": 5, "currency": "EUR"}"#;
    let pay = http1_request(
        "POST",
        "/payments",
        &[auth, json, (IDEMPOTENCY_KEY, "meanwhile")],
        body,
    );
    let created = raw_exchange(addr, &pay).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let listed = raw_exchange(addr, &http1_request("GET", "/payments", &[auth], b"")).await;
    assert_eq!(listed.json(), serde_json::json!([created.json()]));
    for (what, client) in [
        ("silent", &silent),
        ("half a head", &half_head),
        ("HTTP/2 preface only", &h2_preface_only),
        ("short body", &short_body),
    ] {
        assert!(
            !client.is_finished(),
            "{what}: cut off before the other clients were served"
        );
    }

    let (received, elapsed) = silent.await.unwrap();
    assert!(received.is_empty());
    assert_cut_off_by("silent", elapsed, HEADER_READ);
    let (received, elapsed) = half_head.await.unwrap();
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert_cut_off_by("half a head", elapsed, HEADER_READ);
    let (_, elapsed) = h2_preface_only.await.unwrap();
    assert_cut_off_by("HTTP/2 preface only", elapsed, HEADER_READ);
    // The body that never completes is refused, and nothing was charged.
    let (received, elapsed) = short_body.await.unwrap();
    assert!(
        received.starts_with(b"HTTP/1.1 400 "),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert_cut_off_by("short body", elapsed, BODY);
    // A kept-alive HTTP/1.1 connection gets the header read timeout for its next request.
    let (received, elapsed) = kept_alive.await.unwrap();
    assert!(received.starts_with(b"HTTP/1.1 200 "));
    assert_cut_off_by("kept alive", elapsed, HEADER_READ);
    // Bytes that keep trickling do not stretch the header read timeout.
    let elapsed = slowloris.await.unwrap();
    assert_cut_off_by("a trickled second head", elapsed, HEADER_READ);
    // An HTTP/2 connection idle after its request gets the idle timeout.
    let (received, elapsed) = h2_served.await.unwrap();
    // 0x88: HPACK's indexed `:status: 200`.
    assert_eq!(h2_header_starts(&received, 1), [0x88], "{received:?}");
    assert_cut_off_by("HTTP/2 after its request", elapsed, IDLE);

    let listed = raw_exchange(addr, &http1_request("GET", "/payments", &[auth], b"")).await;
    assert_eq!(
        listed.json().as_array().map(Vec::len),
        Some(1),
        "only the complete payment exists"
    );
    // The key of the body cut short stayed free.
    let retried = raw_exchange(
        addr,
        &http1_request(
            "POST",
            "/payments",
            &[auth, json, (IDEMPOTENCY_KEY, "short")],
            body,
        ),
    )
    .await;
    assert_eq!(retried.status, StatusCode::CREATED, "{retried:?}");
    assert!(!retried.replayed());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_wait_for_a_free_slot() {
    const HEADER_READ: Duration = Duration::from_millis(1000);
    let server = TestServer::start(
        ServerConfig::new()
            .max_connections(2)
            .header_read_timeout(HEADER_READ),
    )
    .await;
    let addr = server.addr;
    // Two silent connections take both slots (they connect first, so they are accepted first).
    let first = TcpStream::connect(addr).await.unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    let silent = [
        tokio::spawn(read_until_closed(first)),
        tokio::spawn(read_until_closed(second)),
    ];
    // A third client is served only once the header read timeout has freed a slot.
    let started = Instant::now();
    let [auth, _] = ANN_PAYS;
    let listed = raw_exchange(addr, &http1_request("GET", "/payments", &[auth], b"")).await;
    let waited = started.elapsed();
    assert_eq!(listed.status, StatusCode::OK);
    assert!(
        waited + Duration::from_millis(150) >= HEADER_READ,
        "served after {waited:?}: the cap of 2 did not hold it back"
    );
    for client in silent {
        let (received, elapsed) = within("a silent client", client).await.unwrap();
        assert!(received.is_empty());
        assert_cut_off_by("silent", elapsed, HEADER_READ);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Refunds: covered by the router-wide policy, no attribute
// ---------------------------------------------------------------------------------------------

fn refund(user: Option<&str>, payment: &str, key: Option<&str>, amount: u64) -> Request<Body> {
    let uri = format!("/payments/{payment}/refunds");
    call(
        "POST",
        &uri,
        user,
        key,
        &format!("{{\"amount\": {amount}}}"),
    )
}

/// Creates a payment of `amount` EUR for `user` and returns its id.
async fn paid(app: &Router, user: &str, key: &str, amount: u64) -> String {
    let body = format!("{{\"amount\": {amount}, \"currency\": \"EUR\"}}");
    let created = send(app, pay(Some(user), Some(key), &body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    created.json()["id"].as_str().expect("an id").to_owned()
}

/// `POST /payments/{id}/refunds` carries no attribute: the example's router-wide policy makes it
/// idempotent per user, records the deterministic `400 refund-exceeds-payment`, and leaves
/// requests without a key unprotected (the key is optional).
#[tokio::test]
async fn refunds_are_idempotent_through_the_router_wide_policy() {
    let app = app();
    let payment = paid(&app, "ann", "pay-r", 100).await;

    let first = send(&app, refund(Some("ann"), &payment, Some("r1"), 30)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let created = first.json();
    let refund_id = created["id"].as_str().expect("a refund id").to_owned();
    assert!(refund_id.starts_with("re_"), "{created}");
    assert_eq!(created["payment_id"], payment.as_str());
    assert_eq!(created["amount"], 30);
    assert_eq!(
        first.header(header::LOCATION),
        Some(format!("/payments/{payment}/refunds/{refund_id}").as_str())
    );
    assert!(!first.replayed());

    let retry = send(&app, refund(Some("ann"), &payment, Some("r1"), 30)).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body, "byte-identical");
    let reused = send(&app, refund(Some("ann"), &payment, Some("r1"), 31)).await;
    reused.assert_problem(422, "idempotency-key-reused");

    let exceeds = send(&app, refund(Some("ann"), &payment, Some("r2"), 80)).await;
    assert_app_problem(&exceeds, 400, "refund-exceeds-payment");
    let exceeds_again = send(&app, refund(Some("ann"), &payment, Some("r2"), 80)).await;
    assert!(exceeds_again.replayed(), "deterministic, so recorded");
    assert_eq!(exceeds_again.body, exceeds.body);

    // No key: the policy's key is optional, so each request runs.
    let unkeyed_one = send(&app, refund(Some("ann"), &payment, None, 10)).await;
    let unkeyed_two = send(&app, refund(Some("ann"), &payment, None, 10)).await;
    assert_eq!(unkeyed_one.status, StatusCode::CREATED);
    assert_eq!(unkeyed_two.status, StatusCode::CREATED);
    assert_ne!(unkeyed_one.json()["id"], unkeyed_two.json()["id"]);

    let listed = send(
        &app,
        call(
            "GET",
            &format!("/payments/{payment}/refunds"),
            Some("ann"),
            None,
            "",
        ),
    )
    .await;
    assert_eq!(listed.status, StatusCode::OK);
    let amounts: Vec<u64> = listed
        .json()
        .as_array()
        .expect("a bare array")
        .iter()
        .map(|refund| refund["amount"].as_u64().unwrap())
        .collect();
    assert_eq!(
        amounts,
        [30, 10, 10],
        "oldest first; the replays added nothing"
    );
}

/// Another user's payment and an unknown one are `404` for both refund routes; an
/// unauthenticated refund is the example's `401`, recorded nowhere: the same key then runs.
#[tokio::test]
async fn refunds_of_unknown_or_foreign_payments_are_404_and_401_records_nothing() {
    let app = app();
    let payment = paid(&app, "ann", "pay-f", 100).await;
    for (user, id) in [("bob", payment.as_str()), ("ann", "pay_unknown")] {
        let posted = send(&app, refund(Some(user), id, Some("f1"), 5)).await;
        assert_app_problem(&posted, 404, "not-found");
        let listed = send(
            &app,
            call(
                "GET",
                &format!("/payments/{id}/refunds"),
                Some(user),
                None,
                "",
            ),
        )
        .await;
        assert_app_problem(&listed, 404, "not-found");
    }
    let anonymous = send(&app, refund(None, &payment, Some("f2"), 5)).await;
    assert_app_problem(&anonymous, 401, "unauthorized");
    let authenticated = send(&app, refund(Some("ann"), &payment, Some("f2"), 5)).await;
    assert_eq!(
        authenticated.status,
        StatusCode::CREATED,
        "{authenticated:?}"
    );
    assert!(!authenticated.replayed());
}

/// Over real HTTP, against the `payments` binary: two users with the same key each get their own
/// refund (the policy scopes keys per user), and each retry replays its own.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_scopes_refund_keys_per_user() {
    let payments = PaymentsProcess::start(&[]).await;
    let addr = payments.addr;
    let mut refunds = Vec::new();
    for user in ["ann", "bob"] {
        let auth = format!("Bearer {user}");
        let json = ("content-type", "application/json");
        let pay_key = format!("pay-{user}");
        let body = br#"{"amount": 50, "currency": "EUR"}"#;
        let headers = [
            ("authorization", auth.as_str()),
            json,
            (IDEMPOTENCY_KEY, &pay_key),
        ];
        let created = raw_exchange(addr, &http1_request("POST", "/payments", &headers, body)).await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        let payment = created.json()["id"].as_str().unwrap().to_owned();
        let uri = format!("/payments/{payment}/refunds");
        let headers = [
            ("authorization", auth.as_str()),
            json,
            (IDEMPOTENCY_KEY, "same"),
        ];
        let request = http1_request("POST", &uri, &headers, br#"{"amount": 20}"#);
        let first = raw_exchange(addr, &request).await;
        assert_eq!(first.status, StatusCode::CREATED, "{user}: {first:?}");
        assert!(
            !first.replayed(),
            "{user}: the other user's key is not theirs"
        );
        let retry = raw_exchange(addr, &request).await;
        assert!(retry.replayed(), "{user}");
        assert_eq!(retry.body, first.body);
        refunds.push(first.json()["id"].as_str().unwrap().to_owned());
    }
    assert_ne!(refunds[0], refunds[1]);
    payments.terminate();
    payments.assert_clean_exit().await;
}

/// Runs the binary with `env` and expects it to stop at start-up: a failure exit code and a message
/// naming `every` word, without ever listening.
#[cfg(unix)]
async fn refuses_to_start(env: &[(&str, &str)], every: &[&str]) {
    let mut command = tokio::process::Command::new(idem_tests::process::payments_binary());
    command
        .env("IDEM_LISTEN", "127.0.0.1:0")
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = within("the binary to give up", command.output())
        .await
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout} {stderr}");
    assert!(!stdout.contains("listening on"), "{stdout}");
    for word in every {
        assert!(stderr.contains(word), "`{word}` not in {stderr}");
    }
}

/// DESIGN.md section 8: `DATABASE_URL` and `REDIS_URL` together, or a database that does not
/// answer, stop the service at start-up with a message.
#[cfg(unix)]
#[tokio::test]
async fn the_binary_refuses_both_stores_and_an_unreachable_database() {
    refuses_to_start(
        &[
            ("DATABASE_URL", "postgres://idem@127.0.0.1:1/idem"),
            ("REDIS_URL", "redis://127.0.0.1:1/"),
        ],
        &["DATABASE_URL", "REDIS_URL"],
    )
    .await;
    refuses_to_start(
        &[("DATABASE_URL", "postgres://idem@127.0.0.1:1/idem")],
        &["DATABASE_URL"],
    )
    .await;
}

/// With `DATABASE_URL`, the binary migrates idem's schema and keeps its records in PostgreSQL: a
/// retry is replayed from the database's record.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_keeps_its_records_in_postgresql_with_database_url() {
    let database = idem_tests::postgres::PostgresServer::start();
    let url = database.url();
    let payments = PaymentsProcess::start(&[("DATABASE_URL", url.as_str())]).await;
    let body = br#"{"amount": 7, "currency": "EUR"}"#;
    let [auth, json] = ANN_PAYS;
    let request = http1_request(
        "POST",
        "/payments",
        &[auth, json, (IDEMPOTENCY_KEY, "pg-1")],
        body,
    );
    let created = raw_exchange(payments.addr, &request).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let replay = raw_exchange(payments.addr, &request).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, created.body);
    let rows = database.psql("postgres", "SELECT count(*) FROM idem_records");
    assert_eq!(rows.trim(), "1", "one record in the database");
    payments.terminate();
    payments.assert_clean_exit().await;
}
