//! The tail of a first execution on a full embedded store, in process (no network, no load
//! generator): one task sends `N` requests with new keys through an `#[idempotent]` route, one after
//! the other, timing each, then retries the last 1 000 and counts how many were replayed.
//!
//! ```text
//! cargo run --release -p idem-bench --example first_execution_tail -- [N]   (default 400 000)
//! ```
//!
//! It prints the latency percentiles and the slowest requests with their index: the slow ones land
//! on every 64th write, where the writer runs the cache's maintenance (docs/BENCHMARKS.md).

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::post;
use http::{Request, StatusCode};
use idem_runtime::{Idempotency, idempotent};
use tower::ServiceExt as _;

#[idempotent(required = true)]
async fn create(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

fn request(key: u64) -> Request<Body> {
    Request::post("/create")
        .header("idempotency-key", format!("tail-{key}"))
        .body(Body::from(r#"{"amount":4200,"currency":"EUR"}"#))
        .expect("a valid request")
}

async fn send(app: &Router, key: u64) -> (bool, Duration) {
    let started = Instant::now();
    let response = app.clone().oneshot(request(key)).await.expect("infallible");
    let replayed = response.headers().contains_key("idempotent-replayed");
    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    (replayed, started.elapsed())
}

async fn run(n: u64) {
    let app = Router::new()
        .route("/create", post(create))
        .layer(Idempotency::builder().build().layer());
    let mut latencies = Vec::new();
    let mut slowest = Vec::new();
    for key in 0..n {
        let (_, took) = send(&app, key).await;
        latencies.push(took);
        slowest.push((took, key));
        if slowest.len() > 1000 {
            slowest.sort_unstable_by(|a, b| b.cmp(a));
            slowest.truncate(20);
        }
    }
    let mut replayed = 0;
    for key in n.saturating_sub(1000)..n {
        replayed += u32::from(send(&app, key).await.0);
    }
    latencies.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "{n} first executions: p50 {:?}, p99 {:?}, p99.9 {:?}, p99.99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        at(0.999),
        at(0.9999),
        at(1.0)
    );
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    for (took, key) in slowest.iter().take(12) {
        println!("  request {key} (key mod 64 = {}): {took:?}", key % 64);
    }
    println!("retries of the last 1000 keys replayed: {replayed}");
}

fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(400_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // On a worker, as a request is: the handler's task then runs beside it, not across threads.
    runtime
        .block_on(runtime.spawn(run(n.max(1))))
        .expect("the run finished");
}
