//! The Redis store against a real `redis-server` started by each test: the transitions and their
//! idempotency under retry, record layout and TTLs, failures, round trips, and two app instances
//! sharing one Redis through real routers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::routing::post;
use http::request::Parts;
use http::{Request, StatusCode};
use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope, scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::record::{RecordedResult, StoredResponse};
use idem_runtime::store::{
    AcquireRequest, Acquired, CompleteRequest, OwnerToken, RedisConfig, RedisStore, ReleaseRequest,
    RenewRequest, Store, StoreError, TieredConfig, TieredStore,
};
use idem_runtime::{Idempotency, IdempotencyContext, idempotent};
use idem_tests::instances::{RedisInstance, connect_redis, record_exists, record_key};
use idem_tests::redis::RedisServer;
use idem_tests::support::{IDEMPOTENCY_KEY, PATIENCE, Reply, request, wait_until};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Store-level helpers

fn print(body: &str) -> Fingerprint {
    Fingerprint::of(&http::Method::POST, "/", "/", "", body.as_bytes())
}

/// The arguments of `complete`, for a record acquired with the fingerprint `print("a")`.
fn done<'a>(
    key: &'a RecordKey,
    owner: OwnerToken,
    result: &'a Arc<RecordedResult>,
    ttl: Duration,
) -> CompleteRequest<'a> {
    static PRINT_A: std::sync::LazyLock<Fingerprint> = std::sync::LazyLock::new(|| print("a"));
    CompleteRequest::new(key, owner, &PRINT_A, result, ttl)
}

fn response(body: &'static str) -> Arc<RecordedResult> {
    Arc::new(RecordedResult::Response(StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![(
            http::header::LOCATION,
            http::HeaderValue::from_static("/p/1"),
        )],
        body: bytes::Bytes::from_static(body.as_bytes()),
    }))
}

async fn acquire(
    store: &impl Store,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
    lease: Duration,
    retention: Duration,
) -> Result<Acquired, StoreError> {
    let request = AcquireRequest::new(key, owner, fingerprint, lease, retention);
    store.acquire(request).await
}

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(60);

fn pttl(server: &RedisServer, key: &RecordKey) -> i64 {
    server.query(redis::cmd("PTTL").arg(RedisStore::key_name(key)))
}

/// A record as Redis holds it (the layout documented on `RedisStore`).
#[derive(Debug)]
struct RawRecord {
    state: u8,
    owner: [u8; 16],
    epoch: u64,
    lease_until: i64,
}

fn raw_record(server: &RedisServer, key: &RecordKey) -> Option<RawRecord> {
    let value: Option<Vec<u8>> = server.query(redis::cmd("GET").arg(RedisStore::key_name(key)));
    let value = value?;
    assert!(value.len() >= 81, "a record of {} bytes", value.len());
    let number = |range: std::ops::Range<usize>| -> i64 {
        std::str::from_utf8(&value[range]).unwrap().parse().unwrap()
    };
    Some(RawRecord {
        state: value[0],
        owner: value[33..49].try_into().unwrap(),
        epoch: u64::try_from(number(49..65)).unwrap(),
        lease_until: number(65..81),
    })
}

/// Writes `value` as the record of `key`, as a foreign writer or a corruption would.
fn overwrite(server: &RedisServer, key: &RecordKey, value: &[u8]) {
    let _: () = server.query(redis::cmd("SET").arg(RedisStore::key_name(key)).arg(value));
}

fn server_now_ms(server: &RedisServer) -> i64 {
    let (seconds, micros): (i64, i64) = server.query(&redis::cmd("TIME"));
    seconds * 1000 + micros / 1000
}

/// Commands the scripts run inside Redis: `INFO commandstats` counts them too.
const SCRIPT_INNER: &[&str] = &["time", "get", "set", "pttl"];

/// `EVALSHA` calls, and calls of every command a client sent (everything but the commands run
/// inside scripts and the `INFO` the measurement itself sends).
fn calls(server: &RedisServer) -> (u64, u64) {
    let stats = server.command_calls();
    let evalsha = stats.get("evalsha").copied().unwrap_or(0);
    let sent = stats
        .iter()
        .filter(|(name, _)| name.as_str() != "info" && !SCRIPT_INNER.contains(&name.as_str()))
        .map(|(_, calls)| calls)
        .sum();
    (evalsha, sent)
}

/// Commands run inside the scripts so far.
fn inner_calls(server: &RedisServer) -> u64 {
    let stats = server.command_calls();
    SCRIPT_INNER
        .iter()
        .map(|name| stats.get(*name).copied().unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The state machine

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transition_converges_when_retried() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let (k, fp) = (record_key("k"), print("a"));
    let (first, second) = (OwnerToken::generate(), OwnerToken::generate());

    let acquired = acquire(&store, &k, first, &fp, LEASE, RETENTION).await;
    assert!(matches!(acquired, Ok(Acquired::Execute { epoch: 1 })));
    // A retried acquire (the first may have timed out after executing) is ours again.
    let retried = acquire(&store, &k, first, &fp, LEASE, RETENTION).await;
    assert!(matches!(retried, Ok(Acquired::Execute { epoch: 1 })));
    match acquire(&store, &k, second, &fp, LEASE, RETENTION).await {
        Ok(Acquired::InFlight { lease_left }) => {
            assert!(lease_left > Duration::from_secs(29) && lease_left <= LEASE);
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    let mismatch = acquire(&store, &k, second, &print("b"), LEASE, RETENTION).await;
    assert!(matches!(mismatch, Ok(Acquired::Mismatch)));

    assert!(
        store
            .renew(RenewRequest::new(&k, first, LEASE))
            .await
            .unwrap()
    );
    assert!(
        store
            .renew(RenewRequest::new(&k, first, LEASE))
            .await
            .unwrap(),
        "renew twice"
    );
    assert!(
        !store
            .renew(RenewRequest::new(&k, second, LEASE))
            .await
            .unwrap()
    );
    store
        .release(ReleaseRequest::new(&k, second))
        .await
        .unwrap();
    let held = raw_record(&server, &k).unwrap();
    assert_eq!(
        (held.state, held.owner),
        (b'i', first.0.to_be_bytes()),
        "a stranger's release changes nothing"
    );

    let result = response("{\"id\":1}");
    let ttl = Duration::from_secs(60);
    assert!(
        !store
            .complete(done(&k, second, &result, ttl))
            .await
            .unwrap()
    );
    assert!(store.complete(done(&k, first, &result, ttl)).await.unwrap());
    assert!(
        store.complete(done(&k, first, &result, ttl)).await.unwrap(),
        "a repeated completion reports success"
    );
    assert!(
        !store
            .complete(done(&k, second, &result, ttl))
            .await
            .unwrap()
    );
    assert!(
        !store
            .renew(RenewRequest::new(&k, first, LEASE))
            .await
            .unwrap(),
        "completed"
    );
    store.release(ReleaseRequest::new(&k, first)).await.unwrap();

    match acquire(&store, &k, second, &fp, LEASE, RETENTION).await {
        Ok(Acquired::Completed { result: stored, .. }) => assert_eq!(stored, result),
        other => panic!("expected completed, got {other:?}"),
    }
    let mismatch = acquire(&store, &k, second, &print("b"), LEASE, RETENTION).await;
    assert!(matches!(mismatch, Ok(Acquired::Mismatch)));
    let completed = raw_record(&server, &k).unwrap();
    assert_eq!((completed.state, completed.epoch), (b'c', 1));
    assert_eq!(completed.lease_until, 0, "no lease once completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_the_lost_owner_is_refused() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let (k, fp) = (record_key("k"), print("a"));
    let (first, second) = (OwnerToken::generate(), OwnerToken::generate());
    let lease = Duration::from_millis(200);

    let acquired = acquire(&store, &k, first, &fp, lease, RETENTION).await;
    assert!(matches!(acquired, Ok(Acquired::Execute { epoch: 1 })));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let taken = acquire(&store, &k, second, &fp, lease, RETENTION).await;
    assert!(matches!(taken, Ok(Acquired::Execute { epoch: 2 })));
    let retried = acquire(&store, &k, second, &fp, lease, RETENTION).await;
    assert!(matches!(retried, Ok(Acquired::Execute { epoch: 2 })));
    // The first attempt resumes after its pause: it may neither renew, nor record, nor release.
    assert!(
        !store
            .renew(RenewRequest::new(&k, first, lease))
            .await
            .unwrap()
    );
    let late = response("late");
    assert!(
        !store
            .complete(done(&k, first, &late, RETENTION))
            .await
            .unwrap()
    );
    store.release(ReleaseRequest::new(&k, first)).await.unwrap();
    let winner = response("winner");
    assert!(
        store
            .complete(done(&k, second, &winner, RETENTION))
            .await
            .unwrap()
    );
    match acquire(&store, &k, first, &fp, lease, RETENTION).await {
        Ok(Acquired::Completed { result, .. }) => assert_eq!(result, winner),
        other => panic!("expected the winner's result, got {other:?}"),
    }
    assert_eq!(raw_record(&server, &k).unwrap().epoch, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_ends_the_lease_and_keeps_the_epoch() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let (k, fp) = (record_key("k"), print("a"));
    let (first, second, third) = (
        OwnerToken::generate(),
        OwnerToken::generate(),
        OwnerToken::generate(),
    );
    acquire(&store, &k, first, &fp, LEASE, RETENTION)
        .await
        .unwrap();
    store.release(ReleaseRequest::new(&k, first)).await.unwrap();
    store.release(ReleaseRequest::new(&k, first)).await.unwrap(); // released twice: harmless
    assert!(pttl(&server, &k) > 59_000, "the record is kept");
    let next = acquire(&store, &k, second, &fp, LEASE, RETENTION).await;
    assert!(matches!(next, Ok(Acquired::Execute { epoch: 2 })));
    // A stale release by the first owner changes nothing.
    store.release(ReleaseRequest::new(&k, first)).await.unwrap();
    let blocked = acquire(&store, &k, third, &fp, LEASE, RETENTION).await;
    assert!(matches!(blocked, Ok(Acquired::InFlight { .. })));
    store
        .release(ReleaseRequest::new(&k, second))
        .await
        .unwrap();
    let next = acquire(&store, &k, third, &fp, LEASE, RETENTION).await;
    assert!(matches!(next, Ok(Acquired::Execute { epoch: 3 })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_live_as_long_as_they_should() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let fp = print("a");
    let owner = OwnerToken::generate();

    // In flight: kept for the retention (the route's ttl), lease deadline on the server's clock.
    let k = record_key("retained");
    let lease = Duration::from_millis(300);
    acquire(&store, &k, owner, &fp, lease, RETENTION)
        .await
        .unwrap();
    let left = pttl(&server, &k);
    assert!((59_000..=60_000).contains(&left), "in-flight PTTL {left}");
    let lease_until = raw_record(&server, &k).unwrap().lease_until;
    let lease_left = lease_until - server_now_ms(&server);
    assert!(
        (0..=300).contains(&lease_left),
        "lease left {lease_left} ms"
    );

    // A retention shorter than the lease is raised to the lease; renewing extends both.
    let k = record_key("short");
    let retention = Duration::from_millis(100);
    acquire(&store, &k, owner, &fp, Duration::from_secs(5), retention)
        .await
        .unwrap();
    let left = pttl(&server, &k);
    assert!(
        (4_000..=5_000).contains(&left),
        "PTTL raised to the lease: {left}"
    );
    assert!(
        store
            .renew(RenewRequest::new(&k, owner, Duration::from_secs(10)))
            .await
            .unwrap()
    );
    let left = pttl(&server, &k);
    assert!((9_000..=10_000).contains(&left), "PTTL after renew: {left}");

    // Completed: kept for the ttl given to complete, reported by acquire in the same call.
    assert!(
        store
            .complete(done(&k, owner, &response("done"), Duration::from_secs(30)))
            .await
            .unwrap()
    );
    let left = pttl(&server, &k);
    assert!((29_000..=30_000).contains(&left), "completed PTTL {left}");
    match acquire(&store, &k, OwnerToken::generate(), &fp, lease, RETENTION).await {
        Ok(Acquired::Completed { ttl_left, .. }) => {
            assert!(ttl_left <= Duration::from_secs(30) && ttl_left > Duration::from_secs(29));
        }
        other => panic!("expected completed, got {other:?}"),
    }

    // And it is gone after its ttl.
    let k = record_key("brief");
    acquire(&store, &k, owner, &fp, lease, RETENTION)
        .await
        .unwrap();
    let brief = Duration::from_millis(100);
    assert!(
        store
            .complete(done(&k, owner, &response("x"), brief))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!record_exists(&server, &k));
    let other = print("other");
    let again = acquire(&store, &k, OwnerToken::generate(), &other, lease, RETENTION).await;
    assert!(matches!(again, Ok(Acquired::Execute { epoch: 1 })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_errors_not_panics() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let fp = print("a");
    let owner = OwnerToken::generate();

    // Values that are not records, each under its own key. `header(state, epoch)` is a valid
    // header for the request's fingerprint.
    let header = |state: u8, epoch: &[u8; 16]| {
        let mut value = vec![state];
        value.extend_from_slice(&fp.0);
        value.extend_from_slice(&[7; 16]);
        value.extend_from_slice(epoch);
        value.extend_from_slice(b"0000000000000001");
        value
    };
    let epoch_one = b"0000000000000001";
    let cases: [(&str, Vec<u8>); 6] = [
        (
            "garbage result",
            [header(b'c', epoch_one), b"garbage".to_vec()].concat(),
        ),
        ("no result", header(b'c', epoch_one)),
        ("unknown state", header(b'x', epoch_one)),
        ("no epoch", header(b'i', b"................")),
        ("epoch zero", header(b'i', b"0000000000000000")),
        ("truncated", header(b'i', epoch_one)[..40].to_vec()),
    ];
    for (case, value) in cases {
        let k = record_key(&case.replace(' ', "-"));
        overwrite(&server, &k, &value);
        let answer = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
        assert!(
            matches!(answer, Err(StoreError::Corrupt(_))),
            "{case}: {answer:?}"
        );
    }

    // A key of another type: acquire reports it, the owner-only transitions find nothing owned.
    let k = record_key("hash");
    let _: i64 = server.query(
        redis::cmd("HSET")
            .arg(RedisStore::key_name(&k))
            .arg("a")
            .arg("b"),
    );
    let answer = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
    assert!(matches!(answer, Err(StoreError::Corrupt(_))), "{answer:?}");
    assert!(
        !store
            .renew(RenewRequest::new(&k, owner, LEASE))
            .await
            .unwrap()
    );
    assert!(
        !store
            .complete(done(&k, owner, &response("x"), LEASE))
            .await
            .unwrap()
    );
    store.release(ReleaseRequest::new(&k, owner)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_scripts_are_reloaded_transparently() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let fp = print("a");
    let owner = OwnerToken::generate();
    let loads = || {
        server
            .command_calls()
            .get("script|load")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(loads(), 4, "connect loads the four scripts");

    let _: () = server.query(redis::cmd("SCRIPT").arg("FLUSH"));
    let k = record_key("k");
    let acquired = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
    assert!(matches!(acquired, Ok(Acquired::Execute { epoch: 1 })));
    assert_eq!(loads(), 5, "the acquire script was reloaded once");
    assert!(
        store
            .complete(done(&k, owner, &response("x"), RETENTION))
            .await
            .unwrap()
    );
    let replay = acquire(&store, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(matches!(replay, Ok(Acquired::Completed { .. })));
    assert_eq!(loads(), 6, "then the complete script, and nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_names_hold_no_client_bytes() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let fp = print("a");
    let hostile = [
        "\"{evil}\"",
        "\"idem:v2:{x}\"",
        "\"* ? [ ] \\\\ \\\" \"",
        "evil",
        &"e".repeat(255),
    ];
    for (i, raw) in hostile.iter().enumerate() {
        let key = IdempotencyKey::parse_bytes(raw.as_bytes()).unwrap();
        let scope = if i % 2 == 0 {
            Scope::NONE
        } else {
            scope("evil-user")
        };
        let record = RecordKey::new(&scope, &key);
        acquire(
            &store,
            &record,
            OwnerToken::generate(),
            &fp,
            LEASE,
            RETENTION,
        )
        .await
        .unwrap();
    }
    let keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*"));
    assert_eq!(keys.len(), hostile.len());
    for name in &keys {
        let digest = name
            .strip_prefix("idem:v2:{")
            .and_then(|rest| rest.strip_suffix('}'))
            .unwrap_or_else(|| panic!("unexpected key name {name}"));
        assert_eq!(digest.len(), 64, "{name}");
        assert!(
            digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{name}"
        );
        assert!(!name.contains("evil"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_fast_and_the_same_store_recovers() {
    let mut server = RedisServer::start();
    let store = connect_redis(&server.url()).await;
    let fp = print("a");
    // Refused connections fail at once, well within the 300 ms response timeout.
    let budget = Duration::from_millis(250);

    acquire(
        &store,
        &record_key("before"),
        OwnerToken::generate(),
        &fp,
        LEASE,
        RETENTION,
    )
    .await
    .unwrap();
    server.kill();
    for attempt in 0..3 {
        let started = Instant::now();
        let down = record_key("down");
        let answer = acquire(&store, &down, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
        let took = started.elapsed();
        assert!(
            matches!(
                answer,
                Err(StoreError::Timeout | StoreError::Unavailable(_))
            ),
            "attempt {attempt}: {answer:?}"
        );
        assert!(took < budget, "attempt {attempt} took {took:?}");
    }

    server.restart();
    let restarted = Instant::now();
    loop {
        match acquire(
            &store,
            &record_key("after"),
            OwnerToken::generate(),
            &fp,
            LEASE,
            RETENTION,
        )
        .await
        {
            Ok(acquired) => {
                assert!(matches!(acquired, Acquired::Execute { epoch: 1 }));
                break;
            }
            Err(error) => assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "not recovered after 5 s: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The restarted Redis is empty: the scripts were reloaded on demand.
    let owner = OwnerToken::generate();
    let k = record_key("after-restart");
    acquire(&store, &k, owner, &fp, LEASE, RETENTION)
        .await
        .unwrap();
    assert!(
        store
            .complete(done(&k, owner, &response("x"), RETENTION))
            .await
            .unwrap()
    );

    // Redis restarts while the store is idle: the broken connection is noticed by the next call,
    // which is sent again on a new connection and succeeds.
    server.restart();
    let k = record_key("idle-restart");
    let answer = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(answer, Ok(Acquired::Execute { epoch: 1 })),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_times_out_and_the_retried_call_converges() {
    let server = RedisServer::start();
    let store = connect_redis(&server.url()).await; // response timeout: 300 ms (COMMAND_TIMEOUT)
    let (k, fp, owner) = (record_key("k"), print("a"), OwnerToken::generate());
    server.pause();
    let started = Instant::now();
    let answer = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
    let took = started.elapsed();
    server.resume();
    assert!(matches!(answer, Err(StoreError::Timeout)), "{answer:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
    // The timed-out command runs once Redis wakes up…
    wait_until(
        "the timed-out acquire to run",
        Duration::from_secs(2),
        || raw_record(&server, &k).is_some(),
    )
    .await;
    // …and retrying it with the same owner converges instead of conflicting with itself.
    let retried = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(retried, Ok(Acquired::Execute { epoch: 1 })),
        "{retried:?}"
    );
    let other = acquire(&store, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(matches!(other, Ok(Acquired::InFlight { .. })), "{other:?}");
}

// ---------------------------------------------------------------------------------------------
// The tiered store in front of Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_records_never_outlive_their_redis_record() {
    let server = RedisServer::start();
    let tiered = TieredStore::new(connect_redis(&server.url()).await);
    let fp = print("a");

    // A record expiring in Redis before the cache's cap: the cache lets go no later.
    let k = record_key("short");
    let owner = OwnerToken::generate();
    acquire(&tiered, &k, owner, &fp, LEASE, RETENTION)
        .await
        .unwrap();
    let ttl = Duration::from_millis(300);
    assert!(
        tiered
            .complete(done(&k, owner, &response("x"), ttl))
            .await
            .unwrap()
    );
    // The first replay learns the record from Redis and caches it.
    let learned = acquire(&tiered, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(
        matches!(learned, Ok(Acquired::Completed { .. })),
        "{learned:?}"
    );
    assert_eq!(tiered.stats().entries, 1);
    let redis_left = pttl(&server, &k);
    match acquire(&tiered, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await {
        Ok(Acquired::Completed { ttl_left, .. }) => {
            let redis_left = Duration::from_millis(u64::try_from(redis_left).unwrap() + 1);
            assert!(
                ttl_left <= redis_left,
                "cache {ttl_left:?} > Redis {redis_left:?}"
            );
        }
        other => panic!("expected a cached replay, got {other:?}"),
    }
    assert_eq!(tiered.stats().hits, 1);
    // Watch the Redis record go, then ask the cache at once: it must have let go too.
    wait_until("the Redis record to expire", PATIENCE, || {
        !record_exists(&server, &k)
    })
    .await;
    let after = acquire(&tiered, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(
        matches!(after, Ok(Acquired::Execute { epoch: 1 })),
        "{after:?}"
    );

    // A long-lived record is cached for the cap at most, so an operator's purge propagates.
    let capped = TieredStore::with_config(
        connect_redis(&server.url()).await,
        TieredConfig::new().max_entry_ttl(Duration::from_millis(200)),
    );
    let k = record_key("purged");
    let owner = OwnerToken::generate();
    acquire(&capped, &k, owner, &fp, LEASE, RETENTION)
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);
    assert!(
        capped
            .complete(done(&k, owner, &response("x"), day))
            .await
            .unwrap()
    );
    let learned = acquire(&capped, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(
        matches!(learned, Ok(Acquired::Completed { .. })),
        "{learned:?}"
    );
    let _: i64 = server.query(redis::cmd("DEL").arg(RedisStore::key_name(&k)));
    let cached = acquire(&capped, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(
        matches!(cached, Ok(Acquired::Completed { .. })),
        "still cached"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let purged = acquire(&capped, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
    assert!(
        matches!(purged, Ok(Acquired::Execute { epoch: 1 })),
        "{purged:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Two app instances sharing one Redis, through real routers

/// The principal, from an `x-user` header (a stand-in for real authentication).
struct User(String);

impl<S: Send + Sync> FromRequestParts<S> for User {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, StatusCode> {
        parts
            .headers
            .get("x-user")
            .and_then(|value| value.to_str().ok())
            .map(|user| User(user.to_owned()))
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// The state of [`charge`] on one app instance.
struct Charges {
    name: &'static str,
    /// Runs per (user, key), shared by both instances.
    runs: Arc<Mutex<HashMap<(String, String), usize>>>,
    /// Executions started on this instance.
    started: AtomicUsize,
    /// Handlers whose body starts with `hold` wait for a permit here.
    gate: tokio::sync::Semaphore,
}

impl Charges {
    fn runs(&self, user: &str, key: &str) -> usize {
        let runs = self.runs.lock().unwrap();
        runs.get(&(user.to_owned(), key.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

#[idempotent(required = true, scope = user)]
async fn charge(
    User(user): User,
    State(instance): State<Arc<Charges>>,
    context: IdempotencyContext,
    body: String,
) -> (StatusCode, String) {
    let key = context.key().unwrap_or_default().to_owned();
    let run = {
        let mut runs = instance.runs.lock().unwrap();
        let count = runs.entry((user.clone(), key.clone())).or_default();
        *count += 1;
        *count
    };
    instance.started.fetch_add(1, Ordering::SeqCst);
    if body.starts_with("hold") {
        instance.gate.acquire().await.unwrap().forget();
    }
    if body.starts_with("storm") {
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let epoch = context.epoch().unwrap_or(0);
    let text = format!("{user} {body} by {} run {run} epoch {epoch}", instance.name);
    (StatusCode::CREATED, text)
}

/// One app instance serving [`charge`].
type App = RedisInstance<Arc<Charges>>;

const APP_LEASE: Duration = Duration::from_millis(300);

async fn app(
    server: &RedisServer,
    name: &'static str,
    runs: &Arc<Mutex<HashMap<(String, String), usize>>>,
    max_run_time: Duration,
) -> App {
    let runtime = Idempotency::builder()
        .lease(APP_LEASE)
        .max_run_time(max_run_time);
    let charges = Arc::new(Charges {
        name,
        runs: Arc::clone(runs),
        started: AtomicUsize::new(0),
        gate: tokio::sync::Semaphore::new(0),
    });
    let routes = Router::new().route("/charge", post(charge));
    RedisInstance::start(&server.url(), runtime, routes, charges).await
}

/// `POST /charge` as `user` with `key` and `body`.
fn charge_as(user: &str, key: &str, body: &str) -> Request<Body> {
    request("POST", "/charge")
        .header("x-user", user)
        .header(IDEMPOTENCY_KEY, key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// Sends [`charge_as`] to `app` on a task of its own and waits until its handler started (it may
/// then be held at the instance's gate).
async fn start_charge(app: &App, user: &str, key: &str, body: &str) -> JoinHandle<Reply> {
    let started = app.state.started.load(Ordering::SeqCst);
    let task = app.spawn_send(charge_as(user, key, body));
    wait_until("the handler to start", Duration::from_secs(5), || {
        app.state.started.load(Ordering::SeqCst) > started
    })
    .await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behave_as_one() {
    let server = RedisServer::start();
    let runs = Arc::default();
    // Instance `a` stops renewing leases after 150 ms, so a handler it holds longer loses its
    // lease (an app paused past its lease).
    let a = app(&server, "a", &runs, Duration::from_millis(150)).await;
    let b = app(&server, "b", &runs, Duration::from_secs(60)).await;
    b.state.gate.add_permits(1_000);

    replay_and_mismatch_across_instances(&a, &b).await;
    in_flight_across_instances(&a, &b).await;
    scopes_are_isolated_across_instances(&a, &b).await;
    a_storm_of_duplicates_runs_each_key_once(&a, &b).await;
    an_expired_lease_is_taken_over_by_the_other_instance(&a, &b).await;

    a.idem.shutdown().await;
    b.idem.shutdown().await;
}

async fn replay_and_mismatch_across_instances(a: &App, b: &App) {
    let first = a.send(charge_as("alice", "k1", "pay 10")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert_eq!(first.body, "alice pay 10 by a run 1 epoch 1");
    let again = b.send(charge_as("alice", "k1", "pay 10")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(a.state.runs("alice", "k1"), 1);

    let reused = b.send(charge_as("alice", "k1", "pay 99")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        reused.text().contains("idempotency-key-reused"),
        "{}",
        reused.text()
    );
    assert_eq!(a.state.runs("alice", "k1"), 1);
}

async fn in_flight_across_instances(a: &App, b: &App) {
    let held = start_charge(a, "alice", "k2", "hold 1").await;
    let busy = b.send(charge_as("alice", "k2", "hold 1")).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert!(busy.headers.contains_key(http::header::RETRY_AFTER));
    assert!(
        busy.text().contains("request-in-progress"),
        "{}",
        busy.text()
    );
    a.state.gate.add_permits(1);
    assert_eq!(held.await.unwrap().status, StatusCode::CREATED);
    let done = b.send(charge_as("alice", "k2", "hold 1")).await;
    assert!(done.replayed());
    assert_eq!(done.body, "alice hold 1 by a run 1 epoch 1");
}

async fn scopes_are_isolated_across_instances(a: &App, b: &App) {
    // The same key and request from another principal is another record.
    let bob = b.send(charge_as("bob", "k1", "pay 10")).await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.replayed());
    assert_eq!(bob.body, "bob pay 10 by b run 1 epoch 1");
    assert_eq!(
        a.send(charge_as("bob", "k1", "pay 10")).await.body,
        bob.body
    );
    let alice = a.send(charge_as("alice", "k1", "pay 10")).await;
    assert_eq!(alice.body, "alice pay 10 by a run 1 epoch 1");
}

async fn a_storm_of_duplicates_runs_each_key_once(a: &App, b: &App) {
    const KEYS: usize = 12;
    const COPIES: usize = 8;
    let mut storm = Vec::new();
    for copy in 0..COPIES {
        for key in 0..KEYS {
            let app = if (copy + key) % 2 == 0 { a } else { b };
            let request = charge_as("carol", &format!("s{key}"), &format!("storm {key}"));
            storm.push((key, app.spawn_send(request)));
        }
    }
    for (key, task) in storm {
        let status = task.await.unwrap().status;
        assert!(
            status == StatusCode::CREATED || status == StatusCode::CONFLICT,
            "key {key}: {status}"
        );
    }
    for key in 0..KEYS {
        let (name, body) = (format!("s{key}"), format!("storm {key}"));
        assert_eq!(a.state.runs("carol", &name), 1, "key {name}");
        let from_a = a.send(charge_as("carol", &name, &body)).await;
        let from_b = b.send(charge_as("carol", &name, &body)).await;
        assert!(from_a.replayed() && from_b.replayed());
        assert_eq!(from_a.body, from_b.body);
    }
}

/// `a` holds its handler past its lease; `b` takes over with epoch 2, and the late result of `a`
/// is not recorded.
async fn an_expired_lease_is_taken_over_by_the_other_instance(a: &App, b: &App) {
    let held = start_charge(a, "dave", "k3", "hold 2").await;
    let busy = b.send(charge_as("dave", "k3", "hold 2")).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    let retry = || charge_as("dave", "k3", "hold 2");
    let (winner, _) = b
        .send_until_not_in_progress(retry, Duration::from_secs(3))
        .await;
    assert_eq!(winner.status, StatusCode::CREATED);
    assert_eq!(winner.body, "dave hold 2 by b run 2 epoch 2");
    a.state.gate.add_permits(1);
    // The paused attempt's own client still gets its response…
    assert_eq!(held.await.unwrap().body, "dave hold 2 by a run 1 epoch 1");
    // …but every replay serves the winner.
    for app in [a, b] {
        let again = app.send(charge_as("dave", "k3", "hold 2")).await;
        assert!(again.replayed());
        assert_eq!(again.body, winner.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_are_at_the_floor() {
    let server = RedisServer::start();
    let runs = Arc::default();
    let a = app(&server, "a", &runs, Duration::from_secs(60)).await;
    let b = app(&server, "b", &runs, Duration::from_secs(60)).await;

    let (before, inner_before) = (calls(&server), inner_calls(&server));
    let first = a.send(charge_as("alice", "rt", "pay 1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let (after_first, inner_after_first) = (calls(&server), inner_calls(&server));
    assert_eq!(
        after_first.0 - before.0,
        2,
        "first execution: acquire + complete"
    );
    assert_eq!(after_first.1 - before.1, 2, "and no other command");
    assert_eq!(
        inner_after_first - inner_before,
        5,
        "inside the scripts: GET, TIME, SET to acquire; GET, SET to complete"
    );

    // The instance's own result is not cached: each instance's first replay asks Redis once.
    for (name, app) in [("a", &a), ("b", &b)] {
        let (before, inner_before) = (calls(&server), inner_calls(&server));
        let remote = app.send(charge_as("alice", "rt", "pay 1")).await;
        assert!(remote.replayed());
        assert_eq!(remote.body, first.body);
        let after = calls(&server);
        assert_eq!(
            after.0 - before.0,
            1,
            "{name}: replay from Redis, one acquire"
        );
        assert_eq!(after.1 - before.1, 1, "{name}: and no other command");
        assert_eq!(
            inner_calls(&server) - inner_before,
            2,
            "{name}: inside the acquire script: GET and PTTL"
        );
        assert_eq!(app.store.stats().entries, 1, "{name}: now cached");

        let cached = app.send(charge_as("alice", "rt", "pay 1")).await;
        assert!(cached.replayed());
        assert_eq!(cached.body, first.body);
        assert_eq!(
            calls(&server),
            after,
            "{name}: replay from moka, no round trip"
        );
    }

    // The same with an emptied cache on `a`.
    a.store.clear_cache();
    let before = calls(&server);
    assert!(a.send(charge_as("alice", "rt", "pay 1")).await.replayed());
    assert_eq!(calls(&server).0 - before.0, 1);
    assert_eq!(a.store.stats().entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_503_without_running_the_handler_then_recovers() {
    let mut server = RedisServer::start();
    let runs = Arc::default();
    let a = app(&server, "a", &runs, Duration::from_secs(60)).await;
    server.kill();
    let started = Instant::now();
    let down = a.send(charge_as("alice", "k", "pay 1")).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.text().contains("store-unavailable"), "{}", down.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.state.runs("alice", "k"), 0);

    server.restart();
    let restarted = Instant::now();
    let up = loop {
        let reply = a.send(charge_as("alice", "k", "pay 1")).await;
        if reply.status != StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "not recovered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(up.status, StatusCode::CREATED);
    assert_eq!(a.state.runs("alice", "k"), 1);
    assert!(a.send(charge_as("alice", "k", "pay 1")).await.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_is_enough() {
    let server = RedisServer::start();
    // The rule from `RedisStore`'s "Redis settings" docs.
    let rule = "on >secret resetkeys ~idem:* resetchannels -@all +evalsha +script|load \
                +get +set +pttl +time +ping";
    let _: () = server.query(
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("idem")
            .arg(rule.split(' ').collect::<Vec<_>>()),
    );
    let url = format!("redis://idem:secret@127.0.0.1:{}/", server.port());
    let store = RedisStore::connect(url.as_str(), RedisConfig::new())
        .await
        .unwrap();
    let (k, fp, owner) = (record_key("k"), print("a"), OwnerToken::generate());
    let lease = Duration::from_millis(100);
    acquire(&store, &k, owner, &fp, lease, RETENTION)
        .await
        .unwrap();
    assert!(
        store
            .renew(RenewRequest::new(&k, owner, lease))
            .await
            .unwrap()
    );
    store.release(ReleaseRequest::new(&k, owner)).await.unwrap();
    let next = OwnerToken::generate();
    let taken = acquire(&store, &k, next, &fp, lease, RETENTION).await;
    assert!(matches!(taken, Ok(Acquired::Execute { epoch: 2 })));
    assert!(
        store
            .complete(done(&k, next, &response("x"), RETENTION))
            .await
            .unwrap()
    );
    let replay = acquire(&store, &k, owner, &fp, lease, RETENTION).await;
    assert!(matches!(replay, Ok(Acquired::Completed { .. })));
    // And nothing else: the user cannot touch other keys.
    let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
    let denied: redis::RedisResult<()> = redis::cmd("SET")
        .arg(&["other", "a"])
        .query(&mut connection);
    assert!(denied.is_err());
}
