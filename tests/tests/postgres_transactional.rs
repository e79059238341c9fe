//! The transactional claim against a real server: the record claimed in a transaction the
//! handler writes an application row in, then completed and committed with it; rolled back,
//! dropped, or cut off by a terminated backend, leaving nothing; duplicates answered at once
//! while it is open.
//!
//! `latency_figures` (ignored by default) prints the store's median latencies, plain and
//! transactional, beside the same transitions written as single CTE statements:
//!
//! ```text
//! cargo test --release -p idem-tests --test postgres_transactional -- --ignored --nocapture
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::record::{RecordedResult, StoredResponse};
use idem_runtime::sqlx::{self, PgPool, Postgres, Transaction};
use idem_runtime::store::{
    AcquireRequest, Acquired, CompleteRequest, OwnerToken, PostgresConfig, PostgresStore,
    ReleaseRequest, Store, StoreError, TransactionalClaim,
};
use idem_tests::postgres::PostgresServer;
use idem_tests::support::within;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn key(name: &str) -> RecordKey {
    RecordKey::new(
        &Scope::NONE,
        &IdempotencyKey::parse_bytes(name.as_bytes()).unwrap(),
    )
}

fn print(body: &str) -> Fingerprint {
    Fingerprint::of(
        &http::Method::POST,
        "/payments",
        "/payments",
        "",
        body.as_bytes(),
    )
}

fn response(body: &'static str) -> Arc<RecordedResult> {
    Arc::new(RecordedResult::Response(StoredResponse {
        status: StatusCode::CREATED,
        headers: Vec::new(),
        body: bytes::Bytes::from_static(body.as_bytes()),
    }))
}

/// A store with the application's own table beside idem's.
async fn store(server: &PostgresServer) -> PostgresStore {
    let store = server.store(PostgresConfig::new()).await;
    server.psql(
        "postgres",
        "CREATE TABLE payments (id text PRIMARY KEY, amount bigint NOT NULL)",
    );
    store
}

async fn claim(
    store: &PostgresStore,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
) -> TransactionalClaim {
    let request = AcquireRequest::new(key, owner, fingerprint, LEASE, TTL);
    within("a claim", store.claim_in_transaction(request))
        .await
        .unwrap()
}

/// The open transaction of an `Execute` claim, with its epoch.
#[track_caller]
fn execute(claim: TransactionalClaim) -> (u64, Transaction<'static, Postgres>) {
    match claim {
        TransactionalClaim::Execute { epoch, transaction } => (epoch, transaction),
        other => panic!("expected to execute, got {other:?}"),
    }
}

/// The handler's write: one payment row, in the claim's transaction.
async fn pay(transaction: &mut Transaction<'static, Postgres>, id: &str, amount: i64) {
    let insert = sqlx::query("INSERT INTO payments (id, amount) VALUES ($1, $2)")
        .bind(id)
        .bind(amount)
        .execute(&mut **transaction);
    within("the handler's insert", insert).await.unwrap();
}

async fn complete_in(
    store: &PostgresStore,
    transaction: Transaction<'static, Postgres>,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
    result: &Arc<RecordedResult>,
) -> Result<bool, StoreError> {
    let request = CompleteRequest::new(key, owner, fingerprint, result, TTL);
    within(
        "complete in transaction",
        store.complete_in_transaction(transaction, request),
    )
    .await
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    within(sql, sqlx::query_scalar(sql).fetch_one(pool))
        .await
        .unwrap()
}

async fn records(pool: &PgPool) -> i64 {
    count(pool, "SELECT count(*) FROM idem_records").await
}

async fn payments(pool: &PgPool) -> i64 {
    count(pool, "SELECT count(*) FROM payments").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_the_handlers_write_and_the_result_commit_together() {
    let server = PostgresServer::start();
    let store = store(&server).await;
    let (k, fp) = (key("pay-1"), print("10 EUR"));
    let owner = OwnerToken::generate();

    let (epoch, mut transaction) = execute(claim(&store, &k, owner, &fp).await);
    assert_eq!(epoch, 1);
    pay(&mut transaction, "p1", 10).await;
    // Nothing is visible outside the transaction yet.
    assert_eq!(
        (records(store.pool()).await, payments(store.pool()).await),
        (0, 0)
    );
    // The claim put `lock_timeout` back as the session had it: the handler's statements see
    // the application's settings, not idem's.
    let setting: String = within(
        "lock_timeout inside the claim",
        sqlx::query_scalar("SHOW lock_timeout").fetch_one(&mut *transaction),
    )
    .await
    .unwrap();
    assert_eq!(setting, "0");

    let result = response("p1 paid");
    assert!(
        complete_in(&store, transaction, &k, owner, &fp, &result)
            .await
            .unwrap()
    );
    assert_eq!(
        (records(store.pool()).await, payments(store.pool()).await),
        (1, 1)
    );
    let state: String = within(
        "the record's state",
        sqlx::query_scalar("SELECT state FROM idem_records").fetch_one(store.pool()),
    )
    .await
    .unwrap();
    assert_eq!(state, "completed");

    // Every duplicate replays it, transactional or plain; another request is a mismatch.
    match claim(&store, &k, OwnerToken::generate(), &fp).await {
        TransactionalClaim::Completed {
            result: replayed,
            ttl_left,
        } => {
            assert_eq!(replayed, result);
            assert!(ttl_left > Duration::from_secs(3590) && ttl_left <= TTL);
        }
        other => panic!("{other:?}"),
    }
    let plain = store
        .acquire(AcquireRequest::new(
            &k,
            OwnerToken::generate(),
            &fp,
            LEASE,
            TTL,
        ))
        .await;
    assert!(matches!(plain, Ok(Acquired::Completed { .. })), "{plain:?}");
    let other = claim(&store, &k, OwnerToken::generate(), &print("99 EUR")).await;
    assert!(matches!(other, TransactionalClaim::Mismatch), "{other:?}");
    assert_eq!(payments(store.pool()).await, 1);
    // The answers that are not `Execute` closed their transactions: every connection is back.
    wait_until_idle(store.pool()).await;
}

/// Waits until every connection of `pool` is back in it (transactions closed).
async fn wait_until_idle(pool: &PgPool) {
    within("the pool's connections to come back", async {
        while pool.num_idle() < pool.size() as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_rolled_back_leaves_nothing_and_the_key_is_free_at_once() {
    let server = PostgresServer::start();
    let store = store(&server).await;
    let (k, fp) = (key("pay-2"), print("20 EUR"));

    // Rolled back: the row and the record go, and the key is free at once.
    let (_, mut transaction) = execute(claim(&store, &k, OwnerToken::generate(), &fp).await);
    pay(&mut transaction, "p2", 20).await;
    within("rollback", transaction.rollback()).await.unwrap();
    let started = Instant::now();
    let (epoch, mut transaction) = execute(claim(&store, &k, OwnerToken::generate(), &fp).await);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        epoch, 1,
        "nothing of the first attempt is left, not even its epoch"
    );
    assert_eq!(
        (records(store.pool()).await, payments(store.pool()).await),
        (0, 0)
    );

    // Dropped (a panic): the same, once the pool has taken the connection back and sent the
    // rollback, a round trip later; meanwhile a duplicate is told in flight.
    pay(&mut transaction, "p2", 20).await;
    drop(transaction);
    let dropped = Instant::now();
    let transaction = loop {
        match claim(&store, &k, OwnerToken::generate(), &fp).await {
            TransactionalClaim::Execute { epoch, transaction } => {
                assert_eq!(epoch, 1);
                break transaction;
            }
            TransactionalClaim::InFlight { .. } => {
                assert!(dropped.elapsed() < Duration::from_millis(100), "still held");
                tokio::task::yield_now().await;
            }
            other => panic!("{other:?}"),
        }
    };
    println!(
        "a dropped claim freed its key after {:?}",
        dropped.elapsed()
    );
    within("rollback", transaction.rollback()).await.unwrap();
    assert_eq!(
        (records(store.pool()).await, payments(store.pool()).await),
        (0, 0)
    );

    // A claim that took over a released record and rolls back leaves it released, epoch kept.
    let plain_owner = OwnerToken::generate();
    let plain = store
        .acquire(AcquireRequest::new(&k, plain_owner, &fp, LEASE, TTL))
        .await;
    assert!(
        matches!(plain, Ok(Acquired::Execute { epoch: 1 })),
        "{plain:?}"
    );
    store
        .release(ReleaseRequest::new(&k, plain_owner))
        .await
        .unwrap();
    let (epoch, transaction) = execute(claim(&store, &k, OwnerToken::generate(), &fp).await);
    assert_eq!(epoch, 2);
    within("rollback", transaction.rollback()).await.unwrap();
    let (epoch, transaction) = execute(claim(&store, &k, OwnerToken::generate(), &fp).await);
    assert_eq!(epoch, 2, "the takeover rolled back with its transaction");
    within("rollback", transaction.rollback()).await.unwrap();
    let state: (String, i64) = within(
        "the record",
        sqlx::query_as("SELECT state, epoch FROM idem_records").fetch_one(store.pool()),
    )
    .await
    .unwrap();
    assert_eq!(state, ("released".to_owned(), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_of_an_open_claim_are_in_flight_at_once() {
    const DUPLICATES: usize = 10;
    let server = PostgresServer::start();
    let store = store(&server).await;
    let (k, fp) = (key("pay-3"), print("30 EUR"));
    let owner = OwnerToken::generate();
    let (_, mut transaction) = execute(claim(&store, &k, owner, &fp).await);
    pay(&mut transaction, "p3", 30).await;

    // Concurrent duplicates, transactional and plain, while the first one's handler runs.
    let started = Instant::now();
    let duplicates: Vec<_> = (0..DUPLICATES)
        .map(|copy| {
            let (store, k, fp) = (store.clone(), k, fp);
            tokio::spawn(async move {
                let owner = OwnerToken::generate();
                if copy % 2 == 0 {
                    match claim(&store, &k, owner, &fp).await {
                        TransactionalClaim::InFlight { lease_left } => lease_left,
                        other => panic!("{other:?}"),
                    }
                } else {
                    let request = AcquireRequest::new(&k, owner, &fp, LEASE, TTL);
                    match store.acquire(request).await {
                        Ok(Acquired::InFlight { lease_left }) => lease_left,
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    for duplicate in duplicates {
        let lease_left = within("a duplicate", duplicate).await.unwrap();
        assert_eq!(lease_left, LEASE, "the caller's own lease, as an estimate");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(500),
        "{DUPLICATES} duplicates took {elapsed:?}: they waited for the open claim"
    );

    let result = response("p3 paid");
    assert!(
        complete_in(&store, transaction, &k, owner, &fp, &result)
            .await
            .unwrap()
    );
    match claim(&store, &k, OwnerToken::generate(), &fp).await {
        TransactionalClaim::Completed {
            result: replayed, ..
        } => assert_eq!(replayed, result),
        other => panic!("{other:?}"),
    }
    assert_eq!(payments(store.pool()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_terminated_mid_transaction_leaves_no_record_and_the_key_is_free() {
    let server = PostgresServer::start();
    let store = store(&server).await;
    let (k, fp) = (key("pay-4"), print("40 EUR"));
    let owner = OwnerToken::generate();
    let (_, mut transaction) = execute(claim(&store, &k, owner, &fp).await);
    pay(&mut transaction, "p4", 40).await;
    let pid: i32 = within(
        "the backend's pid",
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *transaction),
    )
    .await
    .unwrap();

    // The backend dies with the transaction open (a crashed connection, an operator's
    // pg_terminate_backend): PostgreSQL rolls it back.
    let terminated: bool = within(
        "terminating the backend",
        sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(pid)
            .fetch_one(store.pool()),
    )
    .await
    .unwrap();
    assert!(terminated);
    assert_eq!(
        (records(store.pool()).await, payments(store.pool()).await),
        (0, 0)
    );
    let started = Instant::now();
    let (epoch, retry) = execute(claim(&store, &k, OwnerToken::generate(), &fp).await);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(epoch, 1);
    drop(retry);

    // The dead transaction's completion fails: nothing is recorded, the handler's response
    // must not go out as a success.
    let late = complete_in(&store, transaction, &k, owner, &fp, &response("late")).await;
    assert!(matches!(late, Err(StoreError::Unavailable(_))), "{late:?}");
    assert_eq!(
        (records(store.pool()).await, payments(store.pool()).await),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_meets_plain_records_like_an_acquire_and_completes_only_its_own() {
    let server = PostgresServer::start();
    let store = store(&server).await;
    let fp = print("50 EUR");

    // A plain attempt holding a live lease: in flight, with its time left.
    let (held, holder) = (key("held"), OwnerToken::generate());
    let lease = Duration::from_millis(200);
    let plain = store
        .acquire(AcquireRequest::new(&held, holder, &fp, lease, TTL))
        .await;
    assert!(
        matches!(plain, Ok(Acquired::Execute { epoch: 1 })),
        "{plain:?}"
    );
    match claim(&store, &held, OwnerToken::generate(), &fp).await {
        TransactionalClaim::InFlight { lease_left } => assert!(lease_left <= lease),
        other => panic!("{other:?}"),
    }
    // Once that lease lapsed, the claim takes over with the next epoch; the plain owner lost
    // the record.
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let claimer = OwnerToken::generate();
    let (epoch, mut transaction) = execute(claim(&store, &held, claimer, &fp).await);
    assert_eq!(epoch, 2);
    pay(&mut transaction, "p5", 50).await;
    // Completing in the transaction as someone else is refused, and rolls back.
    let stranger = complete_in(&store, transaction, &held, holder, &fp, &response("x")).await;
    assert!(matches!(stranger, Ok(false)), "{stranger:?}");
    assert_eq!(payments(store.pool()).await, 0);
    let (_, mut transaction) = execute(claim(&store, &held, claimer, &fp).await);
    pay(&mut transaction, "p5", 50).await;
    assert!(
        complete_in(
            &store,
            transaction,
            &held,
            claimer,
            &fp,
            &response("p5 paid")
        )
        .await
        .unwrap()
    );
    let late = store
        .complete(CompleteRequest::new(
            &held,
            holder,
            &fp,
            &response("late"),
            TTL,
        ))
        .await;
    assert!(matches!(late, Ok(false)), "{late:?}");

    // A handler whose own statement failed aborted the transaction: the completion fails and
    // nothing is recorded.
    let (broken, owner) = (key("broken"), OwnerToken::generate());
    let (_, mut transaction) = execute(claim(&store, &broken, owner, &fp).await);
    let duplicate = sqlx::query("INSERT INTO payments (id, amount) VALUES ('p5', 1)")
        .execute(&mut *transaction);
    let failed = within("the handler's failing insert", duplicate).await;
    assert!(failed.is_err(), "p5 exists already");
    let aborted = complete_in(&store, transaction, &broken, owner, &fp, &response("x")).await;
    assert!(
        matches!(aborted, Err(StoreError::Unavailable(_))),
        "{aborted:?}"
    );
    let left: i64 = within(
        "the broken key's record",
        sqlx::query_scalar("SELECT count(*) FROM idem_records WHERE key = $1")
            .bind(&broken.0[..])
            .fetch_one(store.pool()),
    )
    .await
    .unwrap();
    assert_eq!(left, 0);
}

// ---------------------------------------------------------------------------------------------
// Latency figures (printed, not asserted)

/// The acquire as the store sends it (`idem_acquire`), the lock timeout written in, so that it
/// binds the same five parameters as [`ACQUIRE_AS_CTE`].
const ACQUIRE_AS_FUNCTION: &str =
    "SELECT outcome, epoch, left_ms, result FROM idem_acquire($1, $2, $3, $4, $5, 50)";

/// `idem_acquire`'s first-execution and replay paths written as one statement with CTEs: the
/// read, and the insert when the read found nothing. It leaves out the takeovers and the race
/// the function handles by reading again, so it is a lower bound on what a full CTE acquire
/// would cost.
const ACQUIRE_AS_CTE: &str = "\
WITH seen AS (
    SELECT state, owner_token, epoch, fingerprint, expires_at, result
    FROM idem_records WHERE key = $1
), inserted AS (
    INSERT INTO idem_records (key, state, owner_token, epoch, fingerprint, lease_deadline,
                              expires_at)
    SELECT $1, 'in_flight', $2, 1, $3, clock_timestamp() + $4 * interval '1 millisecond',
           clock_timestamp() + greatest($4, $5) * interval '1 millisecond'
    WHERE NOT EXISTS (SELECT FROM seen)
    ON CONFLICT (key) DO NOTHING
    RETURNING epoch
)
SELECT CASE WHEN EXISTS (SELECT FROM inserted) THEN 'execute'
            WHEN seen.fingerprint <> $3 THEN 'mismatch'
            WHEN seen.state = 'completed' THEN 'completed'
            WHEN seen.owner_token = $2 THEN 'execute'
            ELSE 'in_flight' END AS outcome,
       coalesce((SELECT epoch FROM inserted), seen.epoch) AS epoch,
       idem_millis(seen.expires_at - clock_timestamp()) AS left_ms,
       seen.result
FROM (SELECT) AS one LEFT JOIN seen ON true";

/// The complete as the store sends it (`idem_complete`).
const COMPLETE_AS_FUNCTION: &str = "SELECT idem_complete($1, $2, $3, $4, 50)";

/// `idem_complete` as one statement with a CTE.
const COMPLETE_AS_CTE: &str = "\
WITH done AS (
    UPDATE idem_records
    SET state = 'completed', lease_deadline = NULL, completed_at = clock_timestamp(),
        expires_at = clock_timestamp() + $4 * interval '1 millisecond', result = $3
    WHERE key = $1 AND owner_token = $2 AND state = 'in_flight'
      AND expires_at > clock_timestamp()
    RETURNING 1
)
SELECT EXISTS (SELECT FROM done) OR EXISTS (
    SELECT FROM idem_records
    WHERE key = $1 AND owner_token = $2 AND state = 'completed'
      AND expires_at > clock_timestamp()
)";

/// An acquire sent as `sql` (one of the two forms above); its outcome.
async fn raw_acquire(
    pool: &PgPool,
    sql: &'static str,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
) -> String {
    let row: (String, Option<i64>, Option<i64>, Option<Vec<u8>>) = sqlx::query_as(sql)
        .bind(&key.0[..])
        .bind(&owner.to_bytes()[..])
        .bind(&fingerprint.0[..])
        .bind(30_000_i64)
        .bind(3_600_000_i64)
        .fetch_one(pool)
        .await
        .unwrap();
    row.0
}

/// A complete sent as `sql`; whether it recorded.
async fn raw_complete(
    pool: &PgPool,
    sql: &'static str,
    key: &RecordKey,
    owner: OwnerToken,
    encoded: &[u8],
) -> bool {
    sqlx::query_scalar(sql)
        .bind(&key.0[..])
        .bind(&owner.to_bytes()[..])
        .bind(encoded)
        .bind(3_600_000_i64)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Microseconds: the median and the 90th percentile of `samples`.
fn summary(samples: &mut [Duration]) -> (u128, u128) {
    samples.sort();
    let at = |percent: usize| samples[(samples.len() - 1) * percent / 100].as_micros();
    (at(50), at(90))
}

/// Times `call` into `samples`.
async fn timed<T>(samples: &mut Vec<Duration>, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let answer = call.await;
    samples.push(started.elapsed());
    answer
}

/// One list of samples per measured call, in the order they are printed.
const MEASURED: [&str; 12] = [
    "statement: SELECT 1 (a round trip through the pool)",
    "store: acquire, first execution",
    "store: complete",
    "store: acquire, replay",
    "store: claim_in_transaction (BEGIN + idem_acquire)",
    "store: complete_in_transaction (idem_complete + COMMIT)",
    "statement: idem_acquire, first execution",
    "statement: CTE acquire, first execution",
    "statement: idem_complete",
    "statement: CTE complete",
    "statement: idem_acquire, replay",
    "statement: CTE acquire, replay",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints latency figures; run with --ignored --nocapture (in --release)"]
async fn latency_figures() {
    const RUNS: usize = 2000;
    let server = PostgresServer::start();
    let store = store(&server).await;
    let pool = store.pool();
    let fp = print("latency");
    let result = response("{\"id\":\"p\",\"amount\":1200,\"currency\":\"EUR\"}");
    let encoded = result.encode();
    let mut samples: [Vec<Duration>; MEASURED.len()] = Default::default();

    // Interleaved, so that a slower moment of the machine weighs on every call alike; the
    // first tenth of the runs warms the connections' prepared statements up and is dropped.
    for run in 0..RUNS + RUNS / 10 {
        if run == RUNS / 10 {
            samples.iter_mut().for_each(Vec::clear);
        }
        let [
            floor,
            store_acquire,
            store_complete,
            store_replay,
            store_claim,
            store_complete_in,
            fn_acquire,
            cte_acquire,
            fn_complete,
            cte_complete,
            fn_replay,
            cte_replay,
        ] = &mut samples;

        let one = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
        assert_eq!(timed(floor, one).await.unwrap(), 1);

        let (k, owner) = (key(&format!("store-{run}")), OwnerToken::generate());
        let request = AcquireRequest::new(&k, owner, &fp, LEASE, TTL);
        let acquired = timed(store_acquire, store.acquire(request)).await;
        assert!(matches!(acquired, Ok(Acquired::Execute { epoch: 1 })));
        let request = CompleteRequest::new(&k, owner, &fp, &result, TTL);
        assert!(
            timed(store_complete, store.complete(request))
                .await
                .unwrap()
        );
        let request = AcquireRequest::new(&k, OwnerToken::generate(), &fp, LEASE, TTL);
        let replay = timed(store_replay, store.acquire(request)).await;
        assert!(matches!(replay, Ok(Acquired::Completed { .. })));

        let (k, owner) = (key(&format!("claim-{run}")), OwnerToken::generate());
        let request = AcquireRequest::new(&k, owner, &fp, LEASE, TTL);
        let claimed = timed(store_claim, store.claim_in_transaction(request)).await;
        let (_, transaction) = execute(claimed.unwrap());
        let request = CompleteRequest::new(&k, owner, &fp, &result, TTL);
        let completed = store.complete_in_transaction(transaction, request);
        assert!(timed(store_complete_in, completed).await.unwrap());

        let mut forms = [
            (
                "fn",
                fn_acquire,
                fn_complete,
                fn_replay,
                ACQUIRE_AS_FUNCTION,
                COMPLETE_AS_FUNCTION,
            ),
            (
                "cte",
                cte_acquire,
                cte_complete,
                cte_replay,
                ACQUIRE_AS_CTE,
                COMPLETE_AS_CTE,
            ),
        ];
        // Each form goes first every other run: the first one after the claim shares the CPU
        // with the pool's return of the claim's connection.
        if run % 2 == 1 {
            forms.reverse();
        }
        for (form, acquire, complete, replay, acquire_sql, complete_sql) in forms {
            let (k, owner) = (key(&format!("{form}-{run}")), OwnerToken::generate());
            let first = raw_acquire(pool, acquire_sql, &k, owner, &fp);
            assert_eq!(timed(acquire, first).await, "execute");
            let done = raw_complete(pool, complete_sql, &k, owner, &encoded);
            assert!(timed(complete, done).await);
            let again = raw_acquire(pool, acquire_sql, &k, OwnerToken::generate(), &fp);
            assert_eq!(timed(replay, again).await, "completed");
        }
    }

    println!("PostgreSQL store, {RUNS} runs each, microseconds (median / p90):");
    for (name, samples) in MEASURED.iter().zip(&mut samples) {
        let (median, p90) = summary(samples);
        println!("  {name:<64} {median:>6} / {p90:>6}");
    }
}
