//! Report-only rollout: a route (attribute `report_only = true`) or a router-wide policy
//! (`Policy::report_only(true)`) runs every request and never changes a response, while idem records
//! results and logs what it would have answered instead.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use http::StatusCode;
use idem_runtime::{Idempotency, MemoryStore, Policy, idempotent};
use idem_tests::support::{IDEMPOTENCY_KEY, Ledger, keyed, request, send, unkeyed};

#[idempotent(required = true, report_only = true)]
async fn reported(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

#[idempotent(report_only = true)]
async fn held(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

async fn plain(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

/// Log lines written while a test runs.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// The log of this test binary: `INFO` and above from every thread, captured by one global
    /// subscriber (a per-thread one can miss events when tests on other threads register the same
    /// callsites first).
    fn capture() -> &'static Self {
        static LINES: std::sync::OnceLock<Lines> = std::sync::OnceLock::new();
        LINES.get_or_init(|| {
            let lines = Self::default();
            let writer = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
            lines
        })
    }

    /// The `would` values of the report-only lines about `route`, in order.
    fn would(&self, route: &str) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter(|line| line.contains("report-only"))
            .filter(|line| {
                line.contains(&format!("route=\"{route}\""))
                    || line.contains(&format!("route={route} "))
            })
            .filter_map(|line| line.split("would=").nth(1))
            .map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_owned()
            })
            .collect()
    }
}

/// Every request runs and gets the handler's own response; what idem would have answered is
/// logged; results are still recorded, so turning enforcement on later replays them.
/// `label` is how the log names the route: the handler for the attribute, the matched path for a
/// policy.
async fn check(app: &Router, ledger: &Ledger, store: &MemoryStore, path: &str, label: &str) {
    let lines = Lines::capture();
    let first = send(app, keyed("POST", path, "k", "a")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: a");
    assert_eq!(store.len(), 1, "the first result is recorded");

    let duplicate = send(app, keyed("POST", path, "k", "a")).await;
    assert_eq!(
        duplicate.text(),
        "run 2: a",
        "a replay would have been sent; it ran"
    );
    assert!(!duplicate.replayed(), "the response is never changed");

    let reused = send(app, keyed("POST", path, "k", "b")).await;
    assert_eq!(reused.status, StatusCode::CREATED, "not 422");
    assert_eq!(reused.text(), "run 3: b");

    let missing = send(app, unkeyed("POST", path, "c")).await;
    assert_eq!(missing.status, StatusCode::CREATED, "not 400");

    let malformed = request("POST", path)
        .header(IDEMPOTENCY_KEY, "not a token")
        .body("d".into())
        .unwrap();
    let malformed = send(app, malformed).await;
    assert_eq!(malformed.status, StatusCode::CREATED, "not 400");
    assert_eq!(ledger.runs(), 5);
    assert_eq!(
        lines.would(label),
        ["replayed", "mismatch", "rejected", "rejected"],
        "what idem would have answered"
    );
}

#[tokio::test]
async fn a_report_only_route_runs_every_request_and_logs_what_it_would_have_done() {
    let store = MemoryStore::default();
    let idem = Idempotency::builder().store(store.clone()).build();
    let ledger = Ledger::new();
    let app = Router::new()
        .route("/reported", post(reported))
        .with_state(ledger.clone())
        .layer(idem.layer());
    check(&app, &ledger, &store, "/reported", "reported").await;
}

#[tokio::test]
async fn a_report_only_policy_runs_every_request_and_logs_what_it_would_have_done() {
    let store = MemoryStore::default();
    let idem = Idempotency::builder().store(store.clone()).build();
    let ledger = Ledger::new();
    let policy = Policy::new().required(true).report_only(true);
    let app = Router::new()
        .route("/plain", post(plain))
        .with_state(ledger.clone())
        .layer(idem.layer().policy(policy));
    check(&app, &ledger, &store, "/plain", "/plain").await;
}

/// A concurrent duplicate of a report-only route runs beside the first instead of getting `409`,
/// and the `409` it would have been is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_only_duplicate_in_flight_runs_instead_of_409() {
    let idem = Idempotency::builder().build();
    let ledger = Ledger::gated();
    let app = Router::new()
        .route("/held", post(held))
        .with_state(ledger.clone())
        .layer(idem.layer());
    let lines = Lines::capture();
    let first =
        idem_tests::support::start_send(&app, &ledger, keyed("POST", "/held", "k", "a")).await;
    let second = idem_tests::support::spawn_send(&app, keyed("POST", "/held", "k", "a"));
    ledger.wait_started(2).await;
    ledger.open();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(second.status, StatusCode::CREATED, "not 409");
    assert_eq!(lines.would("held"), ["conflict"]);
}
