//! The PostgreSQL store's state machine against a real server: every transition and its
//! convergence when retried, takeovers and their epochs, releases, replays and their time left,
//! expiry, corrupt rows, races between duplicates, locks held by others, a frozen server, and a
//! `TieredStore` in front.
//!
//! Every test starts its own server ([`PostgresServer::start`]) and stops it when it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::record::{RecordedResult, StoredResponse};
use idem_runtime::sqlx::{self, PgPool};
use idem_runtime::store::{
    AcquireRequest, Acquired, CompleteRequest, OwnerToken, PostgresConfig, PostgresStore,
    ReleaseRequest, RenewRequest, Store, StoreError, TieredStore,
};
use idem_tests::postgres::PostgresServer;
use idem_tests::support::within;

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);

fn key(name: &str) -> RecordKey {
    RecordKey::new(
        &Scope::NONE,
        &IdempotencyKey::parse_bytes(name.as_bytes()).unwrap(),
    )
}

fn print(body: &str) -> Fingerprint {
    Fingerprint::of(&http::Method::POST, "/", "/", "", body.as_bytes())
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap()
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

/// The store's answer to an acquire of `key` by `owner` with `fingerprint`.
async fn acquire(
    store: &impl Store,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
    lease: Duration,
    retention: Duration,
) -> Result<Acquired, StoreError> {
    let request = AcquireRequest::new(key, owner, fingerprint, lease, retention);
    within("an acquire", store.acquire(request)).await
}

async fn renew(store: &impl Store, key: &RecordKey, owner: OwnerToken) -> bool {
    within("a renew", store.renew(RenewRequest::new(key, owner, LEASE)))
        .await
        .unwrap()
}

async fn complete(
    store: &impl Store,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
    result: &Arc<RecordedResult>,
    ttl: Duration,
) -> bool {
    let request = CompleteRequest::new(key, owner, fingerprint, result, ttl);
    within("a complete", store.complete(request)).await.unwrap()
}

async fn release(store: &impl Store, key: &RecordKey, owner: OwnerToken) {
    within("a release", store.release(ReleaseRequest::new(key, owner)))
        .await
        .unwrap();
}

/// A record as the table holds it, with its times relative to the database's clock.
#[derive(Debug)]
struct Row {
    state: String,
    owner: Vec<u8>,
    epoch: i64,
    /// Whether the lease deadline has passed (`None` once completed).
    lease_over: Option<bool>,
    /// Milliseconds until `expires_at`.
    expires_in_ms: i64,
}

async fn row(pool: &PgPool, key: &RecordKey) -> Option<Row> {
    let query = sqlx::query_as::<_, (String, Vec<u8>, i64, Option<bool>, i64)>(
        "SELECT state, owner_token, epoch, lease_deadline <= clock_timestamp(), \
                (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint \
         FROM idem_records WHERE key = $1",
    )
    .bind(&key.0[..])
    .fetch_optional(pool);
    within("reading a record", query).await.unwrap().map(
        |(state, owner, epoch, lease_over, expires_in_ms)| Row {
            state,
            owner,
            epoch,
            lease_over,
            expires_in_ms,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transition_converges_when_retried() {
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let (k, fp) = (key("k"), print("a"));
    let (first, second) = (OwnerToken::generate(), OwnerToken::generate());

    let acquired = acquire(&store, &k, first, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(acquired, Ok(Acquired::Execute { epoch: 1 })),
        "{acquired:?}"
    );
    // A retried acquire (the first may have timed out after running) is ours again.
    let retried = acquire(&store, &k, first, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(retried, Ok(Acquired::Execute { epoch: 1 })),
        "{retried:?}"
    );
    match acquire(&store, &k, second, &fp, LEASE, RETENTION).await {
        Ok(Acquired::InFlight { lease_left }) => {
            assert!(lease_left > Duration::from_secs(28) && lease_left <= LEASE);
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    let mismatch = acquire(&store, &k, second, &print("b"), LEASE, RETENTION).await;
    assert!(matches!(mismatch, Ok(Acquired::Mismatch)), "{mismatch:?}");
    let held = row(store.pool(), &k).await.unwrap();
    assert_eq!((held.state.as_str(), held.epoch), ("in_flight", 1));
    assert_eq!(held.owner, first.to_bytes());
    // An in-flight record lives for its retention.
    assert!(
        (ms(RETENTION) - 5_000..=ms(RETENTION)).contains(&held.expires_in_ms),
        "{held:?}"
    );

    assert!(renew(&store, &k, first).await);
    assert!(renew(&store, &k, first).await, "renew twice");
    assert!(!renew(&store, &k, second).await, "a stranger cannot renew");
    release(&store, &k, second).await;
    assert_eq!(
        row(store.pool(), &k).await.unwrap().state,
        "in_flight",
        "a stranger's release changes nothing"
    );
    let result = response("paid");
    assert!(!complete(&store, &k, second, &fp, &result, TTL).await);
    assert_eq!(row(store.pool(), &k).await.unwrap().state, "in_flight");

    assert!(complete(&store, &k, first, &fp, &result, TTL).await);
    assert!(
        complete(&store, &k, first, &fp, &result, TTL).await,
        "complete twice"
    );
    let done = row(store.pool(), &k).await.unwrap();
    assert_eq!(
        (done.state.as_str(), done.epoch, done.lease_over),
        ("completed", 1, None)
    );
    assert_eq!(done.owner, first.to_bytes());
    assert!(done.expires_in_ms > ms(TTL) - 5_000, "{done:?}");

    for owner in [second, first, OwnerToken::generate()] {
        match acquire(&store, &k, owner, &fp, LEASE, RETENTION).await {
            Ok(Acquired::Completed {
                result: replayed,
                ttl_left,
            }) => {
                assert_eq!(replayed, result);
                assert!(ttl_left > Duration::from_secs(3595) && ttl_left <= TTL);
            }
            other => panic!("expected the replay, got {other:?}"),
        }
    }
    let mismatch = acquire(&store, &k, second, &print("b"), LEASE, RETENTION).await;
    assert!(matches!(mismatch, Ok(Acquired::Mismatch)), "{mismatch:?}");
    // Nothing moves a completed record.
    assert!(!renew(&store, &k, first).await);
    release(&store, &k, first).await;
    assert!(!complete(&store, &k, second, &fp, &response("other"), TTL).await);
    let unchanged = row(store.pool(), &k).await.unwrap();
    assert_eq!(
        (
            unchanged.state,
            unchanged.owner,
            unchanged.epoch,
            unchanged.lease_over
        ),
        (done.state, done.owner, done.epoch, done.lease_over)
    );
    assert!(unchanged.expires_in_ms <= done.expires_in_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_with_the_next_epoch_and_the_lost_owner_is_refused() {
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let (k, fp) = (key("k"), print("a"));
    let (first, second) = (OwnerToken::generate(), OwnerToken::generate());
    let short = Duration::from_millis(150);

    let acquired = acquire(&store, &k, first, &fp, short, RETENTION).await;
    assert!(matches!(acquired, Ok(Acquired::Execute { epoch: 1 })));
    let early = acquire(&store, &k, second, &fp, short, RETENTION).await;
    assert!(matches!(early, Ok(Acquired::InFlight { .. })), "{early:?}");
    tokio::time::sleep(short + Duration::from_millis(50)).await;
    assert_eq!(row(store.pool(), &k).await.unwrap().lease_over, Some(true));

    // The fingerprint outlives the lease: another request is still a mismatch.
    let other = acquire(&store, &k, second, &print("b"), LEASE, RETENTION).await;
    assert!(matches!(other, Ok(Acquired::Mismatch)), "{other:?}");
    let taken = acquire(&store, &k, second, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(taken, Ok(Acquired::Execute { epoch: 2 })),
        "{taken:?}"
    );
    let again = acquire(&store, &k, second, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(again, Ok(Acquired::Execute { epoch: 2 })),
        "converges: {again:?}"
    );
    let record = row(store.pool(), &k).await.unwrap();
    assert_eq!(
        (record.epoch, record.owner),
        (2, second.to_bytes().to_vec())
    );
    assert_eq!(record.lease_over, Some(false));

    // The first owner lost the record: it can neither renew, nor release, nor complete it.
    let first_is_back = acquire(&store, &k, first, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(first_is_back, Ok(Acquired::InFlight { .. })),
        "{first_is_back:?}"
    );
    assert!(!renew(&store, &k, first).await);
    release(&store, &k, first).await;
    assert!(!complete(&store, &k, first, &fp, &response("late"), TTL).await);
    assert_eq!(
        row(store.pool(), &k).await.unwrap().owner,
        second.to_bytes()
    );

    let winner = response("winner");
    assert!(complete(&store, &k, second, &fp, &winner, TTL).await);
    match acquire(&store, &k, first, &fp, LEASE, RETENTION).await {
        Ok(Acquired::Completed { result, .. }) => assert_eq!(result, winner),
        other => panic!("expected the winner's result, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_ends_the_lease_now_and_keeps_the_epoch() {
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let (k, fp) = (key("k"), print("a"));
    let owners: Vec<OwnerToken> = (0..3).map(|_| OwnerToken::generate()).collect();

    for (round, owner) in owners.iter().enumerate() {
        let expected = u64::try_from(round).unwrap() + 1;
        match acquire(&store, &k, *owner, &fp, LEASE, RETENTION).await {
            Ok(Acquired::Execute { epoch }) => assert_eq!(epoch, expected),
            other => panic!("round {round}: {other:?}"),
        }
        release(&store, &k, *owner).await;
        release(&store, &k, *owner).await;
        let released = row(store.pool(), &k).await.unwrap();
        assert_eq!(
            (released.state.as_str(), released.epoch, released.lease_over),
            ("released", i64::try_from(expected).unwrap(), Some(true))
        );
        // The released owner owns nothing any more.
        assert!(!renew(&store, &k, *owner).await);
        assert!(!complete(&store, &k, *owner, &fp, &response("x"), TTL).await);
    }
    // A released record keeps its fingerprint.
    let other = acquire(&store, &k, owners[0], &print("b"), LEASE, RETENTION).await;
    assert!(matches!(other, Ok(Acquired::Mismatch)), "{other:?}");
    // The owner that released may come back too: as the next attempt.
    let back = acquire(&store, &k, owners[2], &fp, LEASE, RETENTION).await;
    assert!(
        matches!(back, Ok(Acquired::Execute { epoch: 4 })),
        "{back:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_records_replay_until_they_expire_and_expired_records_are_absent() {
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let (k, fp) = (key("k"), print("a"));
    let owner = OwnerToken::generate();
    let ttl = Duration::from_millis(400);

    assert!(matches!(
        acquire(&store, &k, owner, &fp, LEASE, RETENTION).await,
        Ok(Acquired::Execute { epoch: 1 })
    ));
    assert!(complete(&store, &k, owner, &fp, &response("short"), ttl).await);
    match acquire(&store, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await {
        Ok(Acquired::Completed { ttl_left, .. }) => {
            assert!(
                ttl_left <= ttl && ttl_left > Duration::from_millis(200),
                "{ttl_left:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    // Past its expiry the row is still there (until the purge) but counts as absent: even
    // another request with the key runs, as the first attempt of a new record.
    assert!(row(store.pool(), &k).await.is_some());
    let later = OwnerToken::generate();
    let fresh = acquire(&store, &k, later, &print("b"), LEASE, RETENTION).await;
    assert!(
        matches!(fresh, Ok(Acquired::Execute { epoch: 1 })),
        "{fresh:?}"
    );
    let record = row(store.pool(), &k).await.unwrap();
    assert_eq!((record.state.as_str(), record.epoch), ("in_flight", 1));
    assert_eq!(record.owner, later.to_bytes());

    // An in-flight record whose retention ran out counts as absent too, and its owner lost it.
    let (stale, short) = (key("stale"), Duration::from_millis(100));
    assert!(matches!(
        acquire(&store, &stale, owner, &fp, short, short).await,
        Ok(Acquired::Execute { epoch: 1 })
    ));
    tokio::time::sleep(short + Duration::from_millis(50)).await;
    assert!(!renew(&store, &stale, owner).await);
    assert!(!complete(&store, &stale, owner, &fp, &response("late"), TTL).await);
    release(&store, &stale, owner).await;
    let fresh = acquire(&store, &stale, later, &print("c"), LEASE, RETENTION).await;
    assert!(
        matches!(fresh, Ok(Acquired::Execute { epoch: 1 })),
        "{fresh:?}"
    );

    // The retention is at least the lease, and a renewal keeps the record alive past it.
    let (long_lease, renewed) = (key("long-lease"), Duration::from_millis(300));
    assert!(matches!(
        acquire(
            &store,
            &long_lease,
            owner,
            &fp,
            renewed,
            Duration::from_millis(1)
        )
        .await,
        Ok(Acquired::Execute { epoch: 1 })
    ));
    let expires_in = row(store.pool(), &long_lease).await.unwrap().expires_in_ms;
    assert!((200..=300).contains(&expires_in), "{expires_in}");
    assert!(renew(&store, &long_lease, owner).await);
    let expires_in = row(store.pool(), &long_lease).await.unwrap().expires_in_ms;
    assert!(expires_in > 25_000, "{expires_in}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_errors_not_panics() {
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let (k, fp) = (key("k"), print("a"));
    let owner = OwnerToken::generate();
    acquire(&store, &k, owner, &fp, LEASE, RETENTION)
        .await
        .unwrap();
    assert!(complete(&store, &k, owner, &fp, &response("x"), TTL).await);

    for bytes in [&b""[..], b"\xff", b"\x00\x01\x02\x03", &[0xab; 300]] {
        let corrupt = sqlx::query("UPDATE idem_records SET result = $1 WHERE key = $2")
            .bind(bytes)
            .bind(&k.0[..]);
        within("corrupting", corrupt.execute(store.pool()))
            .await
            .unwrap();
        let answer = acquire(&store, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await;
        assert!(
            matches!(answer, Err(StoreError::Corrupt(_))),
            "{bytes:?}: {answer:?}"
        );
    }
    // The same store still serves other records.
    let other = acquire(&store, &key("other"), owner, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(other, Ok(Acquired::Execute { epoch: 1 })),
        "{other:?}"
    );
    // A table the functions cannot read is an error too, not a panic.
    server.psql(
        "postgres",
        "ALTER TABLE idem_records RENAME TO idem_records_moved",
    );
    let missing = acquire(&store, &key("third"), owner, &fp, LEASE, RETENTION).await;
    match missing {
        Err(StoreError::Unavailable(message)) => assert!(message.contains("42P01"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_get_one_owner() {
    const COPIES: usize = 24;
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let fp = print("a");

    // Twice: an absent record (the advisory lock decides), then a released one (the row lock).
    let k = key("race");
    for expected_epoch in [1, 2] {
        let barrier = Arc::new(tokio::sync::Barrier::new(COPIES));
        let tasks: Vec<_> = (0..COPIES)
            .map(|_| {
                let (store, barrier, k, fp) = (store.clone(), barrier.clone(), k, fp);
                tokio::spawn(async move {
                    let owner = OwnerToken::generate();
                    barrier.wait().await;
                    (
                        owner,
                        acquire(&store, &k, owner, &fp, LEASE, RETENTION).await,
                    )
                })
            })
            .collect();
        let mut owners = Vec::new();
        for task in tasks {
            match within("a racing acquire", task).await.unwrap() {
                (owner, Ok(Acquired::Execute { epoch })) => {
                    assert_eq!(epoch, expected_epoch);
                    owners.push(owner);
                }
                (_, Ok(Acquired::InFlight { lease_left })) => assert!(lease_left <= LEASE),
                (_, other) => panic!("{other:?}"),
            }
        }
        assert_eq!(owners.len(), 1, "exactly one owner");
        assert_eq!(
            row(store.pool(), &k).await.unwrap().owner,
            owners[0].to_bytes()
        );
        release(&store, &k, owners[0]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_another_transaction_holds_is_in_flight_at_once_or_times_out_its_owner() {
    let server = PostgresServer::start();
    let (lock_timeout, budget) = (LOCK_TIMEOUT, LOCK_BUDGET);
    let store = server.store(lock_config()).await;
    let (k, released, fp) = (key("k"), key("released"), print("a"));
    let owner = OwnerToken::generate();
    for record in [&k, &released] {
        acquire(&store, record, owner, &fp, LEASE, RETENTION)
            .await
            .unwrap();
    }
    release(&store, &released, owner).await;

    // Another transaction holds the records' rows (a claim whose handler is still running): an
    // acquire that would take one over answers in flight without waiting; the owner's renew,
    // complete and release wait at most the lock timeout.
    let mut holder = within("begin", store.pool().begin()).await.unwrap();
    let hold = sqlx::query("SELECT 1 FROM idem_records FOR UPDATE").execute(&mut *holder);
    within("locking the rows", hold).await.unwrap();
    let started = Instant::now();
    let busy = acquire(
        &store,
        &released,
        OwnerToken::generate(),
        &fp,
        LEASE,
        RETENTION,
    )
    .await;
    assert!(matches!(busy, Ok(Acquired::InFlight { .. })), "{busy:?}");
    assert!(started.elapsed() < lock_timeout, "{:?}", started.elapsed());
    let started = Instant::now();
    let renewal = store.renew(RenewRequest::new(&k, owner, LEASE)).await;
    let elapsed = started.elapsed();
    assert!(matches!(renewal, Err(StoreError::Timeout)), "{renewal:?}");
    assert!(elapsed >= lock_timeout && elapsed < budget, "{elapsed:?}");
    within("rollback", holder.rollback()).await.unwrap();
    assert!(renew(&store, &k, owner).await, "free again");

    // No lock_timeout leaked onto the pool's sessions.
    let setting: String = within(
        "the session's lock_timeout",
        sqlx::query_scalar("SHOW lock_timeout").fetch_one(store.pool()),
    )
    .await
    .unwrap();
    assert_eq!(setting, "0");
}

/// The config of the lock tests: a 100 ms lock timeout, a 600 ms budget.
const LOCK_TIMEOUT: Duration = Duration::from_millis(100);
const LOCK_BUDGET: Duration = Duration::from_millis(600);

fn lock_config() -> PostgresConfig {
    PostgresConfig::new()
        .lock_timeout(LOCK_TIMEOUT)
        .statement_timeout(Duration::from_millis(300))
        .acquire_timeout(Duration::from_millis(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_table_lock_times_every_transition_out_within_the_budget() {
    let server = PostgresServer::start();
    let store = server.store(lock_config()).await;
    let (k, fp) = (key("k"), print("a"));
    let owner = OwnerToken::generate();
    acquire(&store, &k, owner, &fp, LEASE, RETENTION)
        .await
        .unwrap();
    let (lock_timeout, budget) = (LOCK_TIMEOUT, LOCK_BUDGET);

    // An operator's lock on the whole table: every transition times out within its budget.
    let mut operator = within("begin", store.pool().begin()).await.unwrap();
    let lock =
        sqlx::query("LOCK TABLE idem_records IN ACCESS EXCLUSIVE MODE").execute(&mut *operator);
    within("locking the table", lock).await.unwrap();
    let result = response("x");
    let fresh = key("fresh");
    for (name, call) in [
        (
            "acquire",
            Box::pin(async {
                store
                    .acquire(AcquireRequest::new(&fresh, owner, &fp, LEASE, RETENTION))
                    .await
                    .map(drop)
            })
                as std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>,
        ),
        (
            "renew",
            Box::pin(async {
                store
                    .renew(RenewRequest::new(&k, owner, LEASE))
                    .await
                    .map(drop)
            }),
        ),
        (
            "complete",
            Box::pin(async {
                store
                    .complete(CompleteRequest::new(&k, owner, &fp, &result, TTL))
                    .await
                    .map(drop)
            }),
        ),
        (
            "release",
            Box::pin(async { store.release(ReleaseRequest::new(&k, owner)).await }),
        ),
    ] {
        let started = Instant::now();
        let outcome = call.await;
        let elapsed = started.elapsed();
        assert!(
            matches!(outcome, Err(StoreError::Timeout)),
            "{name}: {outcome:?}"
        );
        assert!(
            elapsed >= lock_timeout && elapsed < budget,
            "{name}: {elapsed:?}"
        );
    }
    within("rollback", operator.rollback()).await.unwrap();
    let free = acquire(&store, &fresh, owner, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(free, Ok(Acquired::Execute { epoch: 1 })),
        "{free:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_times_out_within_the_budget_and_the_store_recovers() {
    let server = PostgresServer::start();
    let config = PostgresConfig::new()
        .acquire_timeout(Duration::from_millis(200))
        .statement_timeout(Duration::from_millis(200));
    let store = server.store(config).await;
    let (k, fp) = (key("k"), print("a"));
    let owner = OwnerToken::generate();

    server.pause();
    let started = Instant::now();
    let frozen = acquire(&store, &k, owner, &fp, LEASE, RETENTION).await;
    let elapsed = started.elapsed();
    server.resume();
    assert!(matches!(frozen, Err(StoreError::Timeout)), "{frozen:?}");
    // Within the budget (acquire timeout + statement timeout, 400 ms), with room for a loaded
    // machine; it may end sooner, when the pool's wait for a connection is what timed out.
    assert!(elapsed < Duration::from_millis(700), "{elapsed:?}");
    // Whether or not the acquire reached the server (and ran once it resumed), a retry by the
    // same owner converges on epoch 1.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match acquire(&store, &k, owner, &fp, LEASE, RETENTION).await {
            Ok(Acquired::Execute { epoch }) => {
                assert_eq!(epoch, 1);
                break;
            }
            other => assert!(Instant::now() < deadline, "never recovered: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_store_serves_replays_from_memory_after_the_first() {
    let server = PostgresServer::start();
    let store = TieredStore::new(server.store(PostgresConfig::new()).await);
    let (k, fp) = (key("k"), print("a"));
    let owner = OwnerToken::generate();
    assert!(matches!(
        acquire(&store, &k, owner, &fp, LEASE, RETENTION).await,
        Ok(Acquired::Execute { epoch: 1 })
    ));
    let result = response("cached");
    assert!(complete(&store, &k, owner, &fp, &result, TTL).await);
    assert_eq!(store.stats().entries, 0, "own results are not cached");

    for _ in 0..3 {
        match acquire(&store, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await {
            Ok(Acquired::Completed {
                result: replayed, ..
            }) => assert_eq!(replayed, result),
            other => panic!("{other:?}"),
        }
    }
    let stats = store.stats();
    assert_eq!(
        (stats.misses, stats.hits, stats.entries),
        (2, 2, 1),
        "{stats:?}"
    );

    // Served from memory: even with the record gone from the database, the replay holds (for at
    // most `TieredConfig::max_entry_ttl`).
    server.psql("postgres", "DELETE FROM idem_records");
    assert!(matches!(
        acquire(&store, &k, OwnerToken::generate(), &fp, LEASE, RETENTION).await,
        Ok(Acquired::Completed { .. })
    ));
    assert!(matches!(
        store.cached(&k, &print("b")),
        Some(idem_runtime::store::Cached::Mismatch)
    ));
    assert_eq!(store.stats().hits, 4);
    let direct = acquire(store.inner(), &k, owner, &fp, LEASE, RETENTION).await;
    assert!(
        matches!(direct, Ok(Acquired::Execute { epoch: 1 })),
        "{direct:?}"
    );
}

/// `PostgresStore` is `Clone`, `Send` and `Sync`, and a store: what `Idempotency` needs.
#[test]
fn the_store_is_a_store() {
    fn is_store<S: Store + Clone>() {}
    is_store::<PostgresStore>();
}
