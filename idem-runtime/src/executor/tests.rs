//! The executor against stores with faults, through a real `Router`.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::routing::post;
use http::{Request, StatusCode};
use tower::ServiceExt as _;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http_body_util::BodyExt as _;

use super::*;
use crate::config::{Idempotency, RouteConfig};
use crate::executor::IDEMPOTENT_UNPROTECTED;
use crate::extract::{IdempotencyContext, Idempotent};
use crate::fingerprint::Scope;
use crate::store::{
    AcquireRequest, Acquired, CompleteRequest, MemoryStore, ReleaseRequest, RenewRequest, Store,
    StoreError, StoreFuture,
};

/// A `MemoryStore` with faults: acquires that fail with `acquire_error`, renewals that fail,
/// and a count of the releases it receives.
#[derive(Default)]
struct Faulty {
    memory: MemoryStore,
    acquire_error: Option<fn() -> StoreError>,
    renewals_fail: bool,
    releases: Arc<AtomicUsize>,
}

fn refused() -> StoreError {
    StoreError::Unavailable("connection refused".into())
}

impl Store for Faulty {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        match self.acquire_error {
            Some(error) => StoreFuture::ready(Err(error())),
            None => self.memory.acquire(request),
        }
    }
    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        if self.renewals_fail {
            return StoreFuture::ready(Err(StoreError::Timeout));
        }
        self.memory.renew(request)
    }
    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        self.memory.complete(request)
    }
    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.memory.release(request)
    }
}

static RUNS: AtomicUsize = AtomicUsize::new(0);
static ROUTE: RouteConfig = RouteConfig::new("charge").required(true);

async fn charge(body: Idempotent<String>) -> Response {
    execute(body, &ROUTE, Scope::NONE, |body| async move {
        RUNS.fetch_add(1, Ordering::SeqCst);
        body
    })
    .await
}

async fn send(idem: &Idempotency) -> Response {
    let app = Router::new().route("/", post(charge)).layer(idem.layer());
    let request = Request::post("/")
        .header("idempotency-key", "k")
        .body(Body::from("x"))
        .unwrap();
    app.oneshot(request).await.unwrap()
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_unless_told_otherwise() {
    let unreachable = || Faulty {
        acquire_error: Some(refused),
        ..Faulty::default()
    };
    let closed = Idempotency::builder().store(unreachable()).build();
    let response = send(&closed).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
    assert_eq!(RUNS.load(Ordering::SeqCst), 0);

    let open = Idempotency::builder()
        .store(unreachable())
        .fail_open(true)
        .build();
    let response = send(&open).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[&IDEMPOTENT_UNPROTECTED], "true");
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}

static GATED: RouteConfig = RouteConfig::new("gated").required(true);
static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
static GATED_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Waits for `GATE`, then answers with its run count.
async fn gated(body: Idempotent<String>) -> Response {
    execute(body, &GATED, Scope::NONE, |_| async move {
        GATE.notified().await;
        format!("run {}", GATED_RUNS.fetch_add(1, Ordering::SeqCst) + 1)
    })
    .await
}

/// The handler runs in the request's own task; dropping that request mid-handler (what hyper
/// does when the client goes away) must hand the rest to a task of its own, which finishes the
/// handler and records its answer for the retry.
#[tokio::test]
async fn a_request_dropped_mid_handler_still_completes_and_records() {
    let idem = Idempotency::builder().build();
    let app = Router::new().route("/", post(gated)).layer(idem.layer());
    let request = || {
        Request::post("/")
            .header("idempotency-key", "dropped")
            .body(Body::from("x"))
            .unwrap()
    };
    let mut first = Box::pin(app.clone().oneshot(request()));
    for _ in 0..100 {
        if idem.running() > 0 {
            break;
        }
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        tokio::task::yield_now().await;
    }
    assert_eq!(idem.running(), 1, "the handler started");
    drop(first);
    assert_eq!(idem.running(), 1, "the attempt outlives its request");
    GATE.notify_one();
    idem.shutdown().await;
    assert_eq!(GATED_RUNS.load(Ordering::SeqCst), 1);

    let retry = app.oneshot(request()).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "run 1");
    assert_eq!(GATED_RUNS.load(Ordering::SeqCst), 1);
}

static LONG: RouteConfig = RouteConfig::new("long").required(true);

/// Reports whether its lease was lost soon after it started and once the lease ran out.
async fn long(context: IdempotencyContext, body: Idempotent<String>) -> Response {
    execute(body, &LONG, Scope::NONE, |_| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let early = context.lease_lost();
        tokio::time::sleep(Duration::from_millis(400)).await;
        format!("{early} {}", context.lease_lost())
    })
    .await
}

#[tokio::test]
async fn a_lease_whose_renewals_all_fail_is_lost_once_it_runs_out() {
    let idem = Idempotency::builder()
        .store(Faulty {
            renewals_fail: true,
            ..Faulty::default()
        })
        .lease(Duration::from_millis(150))
        .build();
    let app = Router::new().route("/", post(long)).layer(idem.layer());
    let request = Request::post("/")
        .header("idempotency-key", "k")
        .body(Body::from("x"))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "false true");
}

#[tokio::test]
async fn only_a_timed_out_acquire_is_released_and_only_once() {
    for (error, expected) in [
        (refused as fn() -> StoreError, 0),
        (|| StoreError::Timeout, 1),
    ] {
        let releases = Arc::new(AtomicUsize::new(0));
        let store = Faulty {
            acquire_error: Some(error),
            releases: Arc::clone(&releases),
            ..Faulty::default()
        };
        let idem = Idempotency::builder().store(store).build();
        let response = send(&idem).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        idem.shutdown().await;
        assert_eq!(releases.load(Ordering::SeqCst), expected, "{:?}", error());
    }
}
