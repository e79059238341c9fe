//! The router-wide form: a `Policy` on the layer makes every covered route idempotent, with the
//! attribute's wire behaviour (DESIGN.md sections 4 and 9).

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use http::StatusCode;
use idem_runtime::{Idempotency, MemoryStore, Policy, idempotent};
use idem_tests::support::{Ledger, keyed, send, unkeyed};

async fn plain(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("run {run}: {body}"))
}

#[idempotent(required = true)]
async fn attributed(State(ledger): State<Ledger>, body: String) -> (StatusCode, String) {
    let run = ledger.run().await;
    (StatusCode::CREATED, format!("attributed run {run}: {body}"))
}

fn app(idem: &Idempotency, policy: Policy, ledger: &Ledger) -> Router {
    Router::new()
        .route("/plain", post(plain))
        .route("/attributed", post(attributed))
        .with_state(ledger.clone())
        .layer(idem.layer().policy(policy))
}

#[tokio::test]
async fn smoke() {
    let store = MemoryStore::default();
    let idem = Idempotency::builder().store(store.clone()).build();
    let ledger = Ledger::new();
    let app = app(&idem, Policy::new(), &ledger);
    let first = send(&app, keyed("POST", "/plain", "k", "a")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: a");
    let again = send(&app, keyed("POST", "/plain", "k", "a")).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.text(), "run 1: a");
    let other = send(&app, keyed("POST", "/plain", "k", "b")).await;
    other.assert_problem(422, "idempotency-key-reused");
    let unkeyed_run = send(&app, unkeyed("POST", "/plain", "c")).await;
    assert_eq!(unkeyed_run.text(), "run 2: c");

    // The attribute: first request through the layer's claim, then its own.
    let a1 = send(&app, keyed("POST", "/attributed", "x", "a")).await;
    assert_eq!(a1.text(), "attributed run 3: a");
    let a2 = send(&app, keyed("POST", "/attributed", "x", "a")).await;
    assert!(a2.replayed());
    assert_eq!(a2.text(), "attributed run 3: a");
    let missing = send(&app, unkeyed("POST", "/attributed", "a")).await;
    missing.assert_problem(400, "idempotency-key-missing");
    assert_eq!(ledger.runs(), 3);
}
