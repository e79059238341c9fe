//! The executor against stores with faults, through a real `Router`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
    /// While set, acquires are refused as by a store that is down.
    down: Arc<AtomicBool>,
    renewals_fail: bool,
    /// How long each renewal takes before the store acts on it.
    renew_delay: Duration,
    releases: Arc<AtomicUsize>,
}

fn refused() -> StoreError {
    StoreError::Unavailable("connection refused".into())
}

impl Store for Faulty {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        if self.down.load(Ordering::SeqCst) {
            return StoreFuture::ready(Err(refused()));
        }
        match self.acquire_error {
            Some(error) => StoreFuture::ready(Err(error())),
            None => self.memory.acquire(request),
        }
    }
    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        if self.renewals_fail {
            return StoreFuture::ready(Err(StoreError::Timeout));
        }
        if self.renew_delay.is_zero() {
            return self.memory.renew(request);
        }
        StoreFuture::new(async move {
            tokio::time::sleep(self.renew_delay).await;
            self.memory.renew(request).await
        })
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

static SLOW: RouteConfig = RouteConfig::new("slow").required(true);

async fn slow(body: Idempotent<String>) -> Response {
    execute(body, &SLOW, Scope::NONE, |_| async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        "done"
    })
    .await
}

/// The lease is renewed a third of the way into it, so a renewal that takes half a lease still
/// lands in time: a live, renewing owner never lets its key go. (With the first renewal two thirds
/// in, this store's renewal would land after the lease ended, and the probe would take over.)
#[tokio::test]
async fn a_slow_store_never_lets_a_live_renewing_lease_lapse() {
    let lease = Duration::from_millis(300);
    let memory = MemoryStore::default();
    let idem = Idempotency::builder()
        .store(Faulty {
            memory: memory.clone(),
            renew_delay: lease / 2,
            ..Faulty::default()
        })
        .lease(lease)
        .build();
    let app = Router::new().route("/", post(slow)).layer(idem.layer());
    let request = Request::post("/")
        .header("idempotency-key", "slow")
        .body(Body::from("x"))
        .unwrap();
    let first = tokio::spawn(app.oneshot(request));
    for _ in 0..1000 {
        if idem.running() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(idem.running(), 1, "the handler started");

    let key = crate::fingerprint::RecordKey::new(
        &Scope::NONE,
        &crate::key::IdempotencyKey::parse_bytes(b"slow").unwrap(),
    );
    let fingerprint = crate::fingerprint::Fingerprint::of(&http::Method::POST, "/", "/", "", b"x");
    let mut probes = 0;
    while !first.is_finished() {
        let probe = AcquireRequest::new(
            &key,
            crate::store::OwnerToken::generate(),
            &fingerprint,
            lease,
            Duration::from_mins(1),
        );
        match memory.acquire(probe).await.unwrap() {
            Acquired::InFlight { .. } => probes += 1,
            Acquired::Completed { .. } => break,
            other => panic!("after {probes} probes the live owner's key answered {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        probes > 50,
        "the probe ran through the handler ({probes} probes)"
    );
    let response = first.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

static DETACHABLE: RouteConfig = RouteConfig::new("detachable").required(true);
static DETACHABLE_GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
static DETACHABLE_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn detachable(body: Idempotent<String>) -> Response {
    execute(body, &DETACHABLE, Scope::NONE, |body| async move {
        DETACHABLE_RUNS.fetch_add(1, Ordering::SeqCst);
        DETACHABLE_GATE.notified().await;
        format!("recorded {body}")
    })
    .await
}

/// Requests whose clients went away leave handlers running in tasks of their own; at the bound,
/// new executions are refused before they start, and none of the detached ones is lost.
#[tokio::test]
async fn detached_handlers_are_bounded_and_none_is_lost() {
    let idem = Idempotency::builder().max_detached(2).build();
    let app = Router::new()
        .route("/", post(detachable))
        .layer(idem.layer());
    let request = |key: &str| {
        Request::post("/")
            .header("idempotency-key", key)
            .body(Body::from(key.to_owned()))
            .unwrap()
    };
    for (key, running) in [("a", 1), ("b", 2)] {
        let mut pending = Box::pin(app.clone().oneshot(request(key)));
        for _ in 0..100 {
            if idem.running() == running {
                break;
            }
            assert!(futures_util::poll!(pending.as_mut()).is_pending());
            tokio::task::yield_now().await;
        }
        assert_eq!(idem.running(), running, "the handler of {key} started");
        drop(pending); // the client went away
    }
    assert_eq!(idem.detached(), 2);

    let refused = app.clone().oneshot(request("c")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[http::header::RETRY_AFTER], "1");
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        document["type"],
        "https://idem.rs/problems/too-many-detached-handlers"
    );
    assert_eq!(DETACHABLE_RUNS.load(Ordering::SeqCst), 2, "c did not start");

    DETACHABLE_GATE.notify_waiters();
    idem.shutdown().await;
    assert_eq!(idem.detached(), 0);
    for key in ["a", "b"] {
        let retry = app.clone().oneshot(request(key)).await.unwrap();
        assert_eq!(retry.headers()["idempotent-replayed"], "true", "{key}");
        let body = retry.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("recorded {key}"));
    }
    let mut again = Box::pin(app.oneshot(request("c")));
    while DETACHABLE_RUNS.load(Ordering::SeqCst) < 3 {
        assert!(futures_util::poll!(again.as_mut()).is_pending());
        tokio::task::yield_now().await;
    }
    DETACHABLE_GATE.notify_waiters();
    let ran = again.await.unwrap();
    assert_eq!(ran.status(), StatusCode::OK);
}

/// Log lines written while a test runs, for asserting what was logged.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

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
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// During a store outage the log gets one line when it starts, one summary per interval while it
/// lasts, and one line when the store answers again: not a line per refused request.
#[tokio::test(start_paused = true)]
async fn a_store_outage_is_logged_once_then_summarised_then_closed() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let down = Arc::new(AtomicBool::new(true));
    let idem = Idempotency::builder()
        .store(Faulty {
            down: Arc::clone(&down),
            ..Faulty::default()
        })
        .build();
    let app = Router::new().route("/", post(slow)).layer(idem.layer());
    let request = |key: String| {
        Request::post("/")
            .header("idempotency-key", key)
            .body(Body::from("x"))
            .unwrap()
    };
    for i in 0..20 {
        let refused = app.clone().oneshot(request(format!("k{i}"))).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(lines.text().lines().count(), 1, "{}", lines.text());
    tokio::time::advance(crate::outage::SUMMARY_INTERVAL).await;
    let refused = app.clone().oneshot(request("late".into())).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    down.store(false, Ordering::SeqCst);
    let served = app.clone().oneshot(request("back".into())).await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let served = app.oneshot(request("after".into())).await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);

    let text = lines.text();
    let logged: Vec<&str> = text.lines().collect();
    assert_eq!(logged.len(), 3, "{text}");
    assert!(
        logged[0].contains("idempotency store unavailable"),
        "{text}"
    );
    assert!(
        logged[1].contains("still unavailable") && logged[1].contains("refused=20"),
        "{text}"
    );
    assert!(
        logged[2].contains("available again") && logged[2].contains("refused=21"),
        "{text}"
    );
}
