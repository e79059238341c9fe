//! Criterion micro-benchmarks of idem's hot path: `cargo bench -p idem-runtime`.
//!
//! * `key/*`: parsing an `Idempotency-Key` header value (bare UUID, quoted sf-string);
//! * `fingerprint/*`: fingerprinting a 1 KiB and a 64 KiB body, and deriving a record key;
//! * `record/*`: encoding and decoding a recorded response (what Redis stores);
//! * `store/*`: an acquire that finds a completed record (the replay lookup) in the embedded store,
//!   and a `TieredStore` cache hit;
//! * `router/*`: a whole request through an axum `Router` with `tower::ServiceExt::oneshot` (no
//!   network): the bare route, a replay served from the embedded store and from a `TieredStore`'s
//!   moka cache, and a first execution on the embedded store.
//!
//! Figures and what they mean: docs/BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::record::{RecordedResult, StoredResponse};
use idem_runtime::store::{
    AcquireRequest, Acquired, CompleteRequest, MemoryStore, OwnerToken, Store, TieredConfig,
    TieredStore,
};
use idem_runtime::{Idempotency, idempotent};
use tower::ServiceExt as _;

const UUID: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let bare = HeaderValue::from_static(UUID);
    let quoted = HeaderValue::from_str(&format!("\"{UUID}\"")).expect("valid header value");
    group.bench_function("parse_bare_uuid", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(&bare)));
    });
    group.bench_function("parse_quoted_uuid", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(&quoted)));
    });
    group.finish();
}

fn fingerprints(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    for (name, len) in [("body_1KiB", 1 << 10), ("body_64KiB", 64 << 10)] {
        let body = vec![b'x'; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                Fingerprint::of(
                    black_box(&Method::POST),
                    "/payments",
                    "/payments",
                    "",
                    black_box(&body),
                )
            });
        });
    }
    group.throughput(Throughput::Elements(1));
    let key = IdempotencyKey::parse_bytes(UUID.as_bytes()).expect("valid key");
    let scope = idem_runtime::scope("user-42");
    group.bench_function("record_key_scoped", |b| {
        b.iter(|| RecordKey::new(black_box(&scope), black_box(&key)));
    });
    group.finish();
}

/// A typical recorded response: `201`, JSON, `Location`, a 100-byte body.
fn sample_result() -> RecordedResult {
    RecordedResult::Response(StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("location"),
                HeaderValue::from_static("/payments/pay_0001"),
            ),
        ],
        body: Bytes::from(vec![b'{'; 100]),
    })
}

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    let result = sample_result();
    let encoded = result.encode();
    group.bench_function("encode", |b| b.iter(|| black_box(&result).encode()));
    group.bench_function("decode", |b| {
        b.iter(|| RecordedResult::decode(black_box(&encoded)));
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let store = MemoryStore::default();
    let key = RecordKey::new(
        &Scope::NONE,
        &IdempotencyKey::parse_bytes(b"k").expect("valid key"),
    );
    let fingerprint = Fingerprint::of(&Method::POST, "/", "/", "", b"{}");
    let (lease, retention) = (Duration::from_secs(30), Duration::from_secs(3600));
    let request = |owner| AcquireRequest::new(&key, owner, &fingerprint, lease, retention);
    runtime.block_on(async {
        let owner = OwnerToken::generate();
        store.acquire(request(owner)).await.expect("acquire");
        store
            .complete(CompleteRequest::new(
                &key,
                owner,
                &fingerprint,
                &Arc::new(sample_result()),
                retention,
            ))
            .await
            .expect("complete");
    });
    group.bench_function("memory_acquire_completed", |b| {
        b.to_async(&runtime).iter(|| async {
            let acquired = store.acquire(request(OwnerToken::generate())).await;
            assert!(matches!(acquired, Ok(Acquired::Completed { .. })));
        });
    });

    // The moka hit of a TieredStore: a completed record answered from process memory (the inner
    // store, here a MemoryStore standing in for Redis, is not asked).
    let tiered = TieredStore::new(MemoryStore::default());
    runtime.block_on(async {
        let owner = OwnerToken::generate();
        tiered.acquire(request(owner)).await.expect("acquire");
        tiered
            .complete(CompleteRequest::new(
                &key,
                owner,
                &fingerprint,
                &Arc::new(sample_result()),
                retention,
            ))
            .await
            .expect("complete");
        // Its first replay asks the inner store and caches the record.
        tiered
            .acquire(request(OwnerToken::generate()))
            .await
            .expect("replay");
    });
    group.bench_function("tiered_moka_hit", |b| {
        b.to_async(&runtime).iter(|| async {
            let acquired = tiered.acquire(request(OwnerToken::generate())).await;
            assert!(matches!(acquired, Ok(Acquired::Completed { .. })));
        });
    });
    assert_eq!(
        tiered.stats().misses,
        2,
        "every benchmarked acquire was a hit"
    );

    group.finish();
}

/// A `TieredStore` hit on a cache at its 64 MiB bound (about 50 000 records, as after a stream of
/// first executions), cycling over 1 000 hot keys as a replay load does.
fn full_cache(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let fingerprint = Fingerprint::of(&Method::POST, "/", "/", "", b"{}");
    let keys: Vec<RecordKey> = (0..60_000_u32)
        .map(|i| {
            let name = format!("key-{i}");
            RecordKey::new(
                &Scope::NONE,
                &IdempotencyKey::parse_bytes(name.as_bytes()).expect("valid key"),
            )
        })
        .collect();
    let (lease, retention) = (Duration::from_secs(30), Duration::from_secs(3600));
    let acquire =
        |key| AcquireRequest::new(key, OwnerToken::generate(), &fingerprint, lease, retention);
    // The inner store keeps everything: a key the cache let go is still answered, as by Redis.
    // Every result is cached as it is recorded (the write-through setting), which fills the cache
    // with records nobody replays, as a stream of first executions and their retries would.
    let full = TieredStore::with_config(
        MemoryStore::new(1 << 30),
        TieredConfig::new().cache_own_results(true),
    );
    let sample = Arc::new(sample_result());
    runtime.block_on(async {
        for (i, key) in keys.iter().enumerate() {
            let request = acquire(key);
            full.acquire(request).await.expect("acquire");
            let done = CompleteRequest::new(key, request.owner, &fingerprint, &sample, retention);
            full.complete(done).await.expect("complete");
            // The hot keys are replayed all along, so the bound evicts the others.
            if i >= 1000 {
                full.acquire(acquire(&keys[i % 1000]))
                    .await
                    .expect("replay");
            }
        }
    });
    let misses = full.stats().misses;
    let mut next = 0;
    group.bench_function("tiered_moka_hit_full_cache", |b| {
        b.to_async(&runtime).iter(|| {
            next = (next + 1) % 1000;
            let request = acquire(&keys[next]);
            let full = &full;
            async move {
                let acquired = full.acquire(request).await;
                assert!(matches!(acquired, Ok(Acquired::Completed { .. })));
            }
        });
    });
    let stats = full.stats();
    assert!(
        stats.entries > 40_000,
        "the cache is at its bound: {stats:?}"
    );
    assert!(
        stats.misses - misses < 100,
        "the hot keys stay cached: {stats:?}"
    );
    group.finish();
}

async fn bare(body: String) -> String {
    body
}

#[idempotent]
async fn idempotent_echo(body: String) -> String {
    body
}

fn request(path: &str, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::post(path).header(header::CONTENT_TYPE, "text/plain");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Body::from("{\"amount\":100,\"currency\":\"EUR\"}"))
        .expect("valid request")
}

fn router(c: &mut Criterion) {
    let mut group = c.benchmark_group("router");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let idem = Idempotency::builder().build();
    let app = Router::new()
        .route("/bare", post(bare))
        .route("/idem", post(idempotent_echo))
        .layer(idem.layer());
    let first = runtime.block_on(app.clone().oneshot(request("/idem", Some(UUID))));
    assert_eq!(first.expect("infallible").status(), StatusCode::OK);
    // The production layout: moka in front of a shared store (a MemoryStore standing in for Redis).
    let tiered = Idempotency::builder()
        .store(TieredStore::new(MemoryStore::default()))
        .build();
    let tiered_app = Router::new()
        .route("/idem", post(idempotent_echo))
        .layer(tiered.layer());
    let first = runtime.block_on(tiered_app.clone().oneshot(request("/idem", Some(UUID))));
    assert_eq!(first.expect("infallible").status(), StatusCode::OK);

    group.bench_function("bare_oneshot", |b| {
        b.to_async(&runtime).iter_batched(
            || (app.clone(), request("/bare", None)),
            |(app, request)| async move {
                let response = app.oneshot(request).await.expect("infallible");
                assert_eq!(response.status(), StatusCode::OK);
                http_body_util::BodyExt::collect(response.into_body()).await
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("replay_from_memory_oneshot", |b| {
        b.to_async(&runtime).iter_batched(
            || (app.clone(), request("/idem", Some(UUID))),
            |(app, request)| async move {
                let response = app.oneshot(request).await.expect("infallible");
                assert!(response.headers().contains_key("idempotent-replayed"));
                http_body_util::BodyExt::collect(response.into_body()).await
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("replay_from_tiered_moka_oneshot", |b| {
        b.to_async(&runtime).iter_batched(
            || (tiered_app.clone(), request("/idem", Some(UUID))),
            |(app, request)| async move {
                let response = app.oneshot(request).await.expect("infallible");
                assert!(response.headers().contains_key("idempotent-replayed"));
                http_body_util::BodyExt::collect(response.into_body()).await
            },
            BatchSize::SmallInput,
        );
    });
    let mut n = 0_u64;
    group.bench_function("first_execution_memory_oneshot", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                n += 1;
                (app.clone(), request("/idem", Some(&format!("first-{n}"))))
            },
            |(app, request)| async move {
                let response = app.oneshot(request).await.expect("infallible");
                assert!(!response.headers().contains_key("idempotent-replayed"));
                http_body_util::BodyExt::collect(response.into_body()).await
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(
    benches,
    keys,
    fingerprints,
    records,
    stores,
    full_cache,
    router
);
criterion_main!(benches);
