//! The memory check: a million distinct keys through one instance whose local cache is bounded.
//!
//! Requests go through the whole app (`Router` → `#[idempotent]` → store) with
//! `tower::ServiceExt::oneshot`, `--concurrency` at a time on the server's 2-worker runtime: no
//! sockets, so the run takes seconds rather than minutes and the resident memory measured is the
//! app's. Resident memory is `VmRSS` from `/proc/self/status`, read after a small warm-up (the
//! "before") and after the last key; `VmHWM` is the peak.
//!
//! Every key is new, so every request is a first execution whose completed record enters the
//! bounded cache: the cache fills to its bound early and then evicts. (A `TieredStore` caches the
//! records it learns from Redis on a replay, not its own results: there each key is sent twice,
//! a first execution and then its retry, which Redis answers and the cache keeps.) The check passes when
//! resident memory grew by at most the bound plus `--allowance-mib` (a fixed overhead: allocator
//! slack, moka's frequency sketch and queues, the runtime's own buffers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use idem_runtime::Idempotency;
use idem_runtime::store::{MemoryStore, RedisConfig, RedisStore, Store, TieredConfig, TieredStore};
use tower::ServiceExt as _;

use crate::Options;
use crate::loadgen::BODY;
use crate::redis_server::RedisServer;

/// The store under test, kept concrete for its statistics.
enum Cache {
    Tiered(Arc<TieredStore<RedisStore>>),
    Memory(Arc<MemoryStore>),
}

impl Cache {
    /// `(entries, bytes charged against the bound)`.
    fn stats(&self) -> (u64, u64) {
        match self {
            Self::Tiered(store) => {
                let stats = store.stats();
                (stats.entries, stats.weighted_size)
            }
            Self::Memory(store) => (store.len(), store.weighted_size()),
        }
    }

    /// How many times each key is sent for its record to enter the cache: a `TieredStore`
    /// caches what it learns from Redis on a replay, not its own results.
    fn sends_per_key(&self) -> usize {
        match self {
            Self::Tiered(_) => 2,
            Self::Memory(_) => 1,
        }
    }

    fn shared(&self) -> Arc<dyn Store> {
        match self {
            Self::Tiered(store) => Arc::clone(store) as Arc<dyn Store>,
            Self::Memory(store) => Arc::clone(store) as Arc<dyn Store>,
        }
    }
}

/// Runs the memory check and prints its figures.
pub(crate) fn run(options: &Options) -> Result<(), String> {
    let bound = options.cache_mib << 20;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.server_threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let redis = match options.store.as_str() {
        "tiered" => Some(RedisServer::start(&options.redis_server)?),
        "memory" => None,
        other => return Err(format!("--store must be tiered or memory, not {other}")),
    };
    let cache = match &redis {
        Some(redis) => {
            let inner = runtime
                .block_on(RedisStore::connect(redis.url(), RedisConfig::new()))
                .map_err(|e| format!("connecting to redis-server: {e}"))?;
            // Entries live an hour, so that only the byte bound (not expiry) limits the cache.
            let config = TieredConfig::new()
                .capacity_bytes(bound)
                .max_entry_ttl(Duration::from_secs(3600));
            Cache::Tiered(Arc::new(TieredStore::with_config(inner, config)))
        }
        None => Cache::Memory(Arc::new(MemoryStore::new(bound))),
    };
    let idem = Idempotency::builder().shared_store(cache.shared()).build();
    let app = crate::server::app(&idem);

    let store_name = match cache {
        Cache::Tiered(_) => "TieredStore (moka) over Redis",
        Cache::Memory(_) => "MemoryStore (embedded)",
    };
    println!(
        "memory check: {store_name}, cache bound {} MiB, {} distinct keys, {} in flight",
        options.cache_mib, options.keys, options.concurrency
    );

    let next = Arc::new(AtomicU64::new(0));
    let warmup = 1_000.min(options.keys);
    let driver = Driver {
        app: &app,
        next: &next,
        concurrency: options.concurrency,
        sends: cache.sends_per_key(),
    };
    runtime.block_on(driver.drive(warmup))?;
    let before = status_kib("VmRSS:");
    println!(
        "| keys driven | VmRSS MiB | cache entries | cache weighted MiB | keys/s |\n|---:|---:|---:|---:|---:|"
    );
    print_progress(warmup, before, &cache, None);
    let step = (options.keys / 10).max(1);
    let mut done = warmup;
    while done < options.keys {
        let until = (done + step).min(options.keys);
        let started = Instant::now();
        runtime.block_on(driver.drive(until))?;
        #[allow(clippy::cast_precision_loss)]
        let speed = (until - done) as f64 / started.elapsed().as_secs_f64();
        done = until;
        print_progress(done, status_kib("VmRSS:"), &cache, Some(speed));
    }
    let after = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    let (entries, weighted) = cache.stats();
    let growth = after.saturating_sub(before);
    let allowed = (bound >> 10) + (options.allowance_mib << 10);
    println!();
    println!("VmRSS before:  {:>8.1} MiB", mib(before));
    println!("VmRSS after:   {:>8.1} MiB", mib(after));
    println!("VmHWM (peak):  {:>8.1} MiB", mib(peak));
    println!(
        "growth:        {:>8.1} MiB (bound {} MiB + fixed overhead allowance {} MiB = {} MiB)",
        mib(growth),
        options.cache_mib,
        options.allowance_mib,
        mib(allowed)
    );
    println!(
        "cache:         {entries} entries, {:.1} MiB charged against the bound",
        mib(weighted >> 10)
    );
    if let Some(redis) = &redis
        && let Some(used) = redis.used_memory()
    {
        println!(
            "redis-server:  used_memory {:.1} MiB (all {} records, outside this process)",
            mib(used >> 10),
            options.keys
        );
    }
    drop(app);
    runtime.shutdown_timeout(Duration::from_secs(1));
    if growth <= allowed {
        println!("memory check: met (growth ≤ bound + allowance)");
        Ok(())
    } else {
        Err(format!(
            "memory check MISSED: grew {:.1} MiB, more than {:.1} MiB",
            mib(growth),
            mib(allowed)
        ))
    }
}

/// Sends the keys of the memory check.
struct Driver<'a> {
    app: &'a Router,
    next: &'a Arc<AtomicU64>,
    concurrency: usize,
    /// How many times each key is sent: the first execution, then replays of it.
    sends: usize,
}

impl Driver<'_> {
    /// Sends keys `mem-{n}` for every n below `until` not sent yet, `concurrency` at a time.
    async fn drive(&self, until: u64) -> Result<(), String> {
        let tasks: Vec<_> = (0..self.concurrency)
            .map(|_| {
                let (app, next, sends) = (self.app.clone(), Arc::clone(self.next), self.sends);
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= until {
                            // Give the number back for the next step.
                            next.fetch_sub(1, Ordering::Relaxed);
                            return Ok(());
                        }
                        for attempt in 0..sends {
                            let replayed = send(&app, n).await?;
                            if replayed != (attempt > 0) {
                                return Err(format!(
                                    "key mem-{n}: attempt {attempt} replayed: {replayed}"
                                ));
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    }
}

/// Sends key `mem-{n}` once; whether the answer was a replay.
async fn send(app: &Router, n: u64) -> Result<bool, String> {
    let request = Request::post("/idem")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", format!("mem-{n}"))
        .body(Body::from(BODY))
        .map_err(|e| e.to_string())?;
    let response = app
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::CREATED {
        return Err(format!("key mem-{n}: status {}", response.status()));
    }
    let replayed = response.headers().contains_key("idempotent-replayed");
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(replayed)
}

fn print_progress(done: u64, rss: u64, cache: &Cache, speed: Option<f64>) {
    let (entries, weighted) = cache.stats();
    println!(
        "| {done} | {:.1} | {entries} | {:.1} | {} |",
        mib(rss),
        mib(weighted >> 10),
        speed.map_or_else(|| "warm-up".to_owned(), |s| format!("{s:.0}"))
    );
}

/// A `/proc/self/status` field in KiB (0 when unavailable).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

#[allow(clippy::cast_precision_loss)]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
