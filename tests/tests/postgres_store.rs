//! The PostgreSQL store's groundwork against a real server: the test harness itself, the schema
//! and its migrations (also from eight pools at once), the purge of expired records (also of
//! records the transitions wrote), and how timeouts and a crashed server surface as
//! `StoreError`s. The transitions themselves are in `postgres_transitions.rs`.
//!
//! Every test starts its own server ([`PostgresServer::start`]) and stops it when it ends.

use std::time::{Duration, Instant};

use std::sync::Arc;

use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::record::RecordedResult;
use idem_runtime::sqlx::{self, PgPool};
use idem_runtime::store::{
    AcquireRequest, Acquired, CompleteRequest, OwnerToken, PostgresConfig, PostgresStore, Store,
    StoreError,
};
use idem_tests::postgres::PostgresServer;
use idem_tests::support::within;

async fn store(server: &PostgresServer, config: PostgresConfig) -> PostgresStore {
    within("connecting", PostgresStore::connect(&server.url(), config))
        .await
        .unwrap()
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    within(sql, sqlx::query_scalar(sql).fetch_one(pool))
        .await
        .unwrap()
}

/// Inserts `count` completed records, each under a distinct key derived from `tag`, that expire
/// `expires_in_secs` from now on the database's clock (negative: already expired).
async fn insert_completed(pool: &PgPool, tag: &str, count: i32, expires_in_secs: f64) {
    let result = RecordedResult::TooLarge.encode();
    let insert = sqlx::query(
        "INSERT INTO idem_records \
             (key, state, owner_token, epoch, fingerprint, lease_deadline, expires_at, \
              completed_at, result) \
         SELECT sha256(convert_to($1 || i, 'UTF8')), 'completed', \
                substr(sha256(convert_to('owner' || i, 'UTF8')), 1, 16), 1, \
                sha256('request'::bytea), NULL, now() + make_interval(secs => $2), now(), $3 \
         FROM generate_series(1, $4) AS i",
    )
    .bind(tag)
    .bind(expires_in_secs)
    .bind(result.as_ref())
    .bind(count)
    .execute(pool);
    within("inserting records", insert).await.unwrap();
}

#[test]
fn the_harness_starts_a_server_and_removes_it() {
    let mut server = PostgresServer::start();
    assert!(server.is_running() && server.is_ready());
    assert_eq!(server.psql("postgres", "SELECT 1 + 1"), "2");
    assert_eq!(
        server.psql("postgres", "SHOW listen_addresses"),
        "127.0.0.1"
    );
    assert_eq!(server.psql("postgres", "SHOW fsync"), "off");
    let url = server.create_database("scratch");
    assert!(
        url.ends_with(&format!(":{}/scratch", server.port())),
        "{url}"
    );
    assert_eq!(
        server.psql("scratch", "SELECT current_database()"),
        "scratch"
    );
    let dir = server.dir().to_path_buf();
    assert!(dir.join("data").join("PG_VERSION").exists());

    server.stop();
    assert!(!server.is_running());
    assert!(!server.is_ready());
    assert!(server.log().contains("database system is shut down"));
    drop(server);
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// The version table lists every migration, and the transitions are functions of the schema.
async fn assert_the_versions_and_functions(pool: &PgPool) {
    let versions: Vec<(i64, String, Vec<u8>)> = within(
        "the version rows",
        sqlx::query_as(
            "SELECT version, description, checksum FROM idem_schema_migrations ORDER BY version",
        )
        .fetch_all(pool),
    )
    .await
    .unwrap();
    let described: Vec<(i64, &str)> = versions
        .iter()
        .map(|(version, description, _)| (*version, description.as_str()))
        .collect();
    assert_eq!(described, [(1, "idem_records"), (2, "idem_transitions")]);
    assert_eq!(versions.last().unwrap().0, PostgresStore::SCHEMA_VERSION);
    assert!(versions.iter().all(|(_, _, checksum)| checksum.len() == 32));
    // The transitions, one function each (and the helper they share).
    let functions: Vec<String> = within(
        "the functions",
        sqlx::query_scalar(
            "SELECT proname::text FROM pg_proc WHERE proname LIKE 'idem\\_%' ORDER BY proname",
        )
        .fetch_all(pool),
    )
    .await
    .unwrap();
    assert_eq!(
        functions,
        [
            "idem_acquire",
            "idem_complete",
            "idem_millis",
            "idem_release",
            "idem_renew"
        ]
    );
}

#[tokio::test]
async fn migrate_creates_the_schema_on_an_empty_database() {
    let server = PostgresServer::start();
    let store = store(&server, PostgresConfig::new()).await;
    let pool = store.pool();
    let tables = "SELECT count(*) FROM information_schema.tables \
                  WHERE table_name IN ('idem_records', 'idem_schema_migrations')";
    assert_eq!(scalar(pool, tables).await, 0);

    within("migrate", store.migrate()).await.unwrap();

    assert_eq!(scalar(pool, tables).await, 2);
    let columns: Vec<(String, String, String)> = within(
        "columns",
        sqlx::query_as(
            "SELECT column_name::text, data_type::text, is_nullable::text \
             FROM information_schema.columns \
             WHERE table_name = 'idem_records' ORDER BY ordinal_position",
        )
        .fetch_all(pool),
    )
    .await
    .unwrap();
    let column = |name: &str, data_type: &str, nullable: &str| {
        (name.to_owned(), data_type.to_owned(), nullable.to_owned())
    };
    let timestamp = "timestamp with time zone";
    assert_eq!(
        columns,
        [
            column("key", "bytea", "NO"),
            column("state", "text", "NO"),
            column("owner_token", "bytea", "NO"),
            column("epoch", "bigint", "NO"),
            column("fingerprint", "bytea", "NO"),
            column("lease_deadline", timestamp, "YES"),
            column("expires_at", timestamp, "NO"),
            column("created_at", timestamp, "NO"),
            column("completed_at", timestamp, "YES"),
            column("result", "bytea", "YES"),
        ]
    );
    let index: String = within(
        "the purge index",
        sqlx::query_scalar(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idem_records_expires_at'",
        )
        .fetch_one(pool),
    )
    .await
    .unwrap();
    assert!(index.contains("(expires_at)"), "{index}");
    let primary_key = "SELECT count(*) FROM pg_indexes \
                       WHERE indexname = 'idem_records_pkey' AND indexdef LIKE '%(key)'";
    assert_eq!(scalar(pool, primary_key).await, 1);

    assert_the_versions_and_functions(pool).await;

    // The constraints hold the record's shape: a well-formed row goes in, a client's raw key
    // (not a 32-byte digest) or a completed row without its result do not.
    insert_completed(pool, "ok", 1, 60.0).await;
    let bad_key = sqlx::query(
        "INSERT INTO idem_records (key, state, owner_token, epoch, fingerprint, \
             lease_deadline, expires_at) \
         VALUES ('order-42'::bytea, 'in_flight', substr(sha256('o'::bytea), 1, 16), 1, \
                 sha256('f'::bytea), now(), now() + interval '1 hour')",
    );
    let error = within("a bad key", bad_key.execute(pool))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("idem_records_key_length"),
        "{error}"
    );
    let no_result = sqlx::query(
        "INSERT INTO idem_records (key, state, owner_token, epoch, fingerprint, expires_at, \
             completed_at) \
         VALUES (sha256('k'::bytea), 'completed', substr(sha256('o'::bytea), 1, 16), 1, \
                 sha256('f'::bytea), now() + interval '1 hour', now())",
    );
    let error = within("a completed row without result", no_result.execute(pool))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("idem_records_result_once_completed"),
        "{error}"
    );
    // The result column carries the runtime's encoding as it is.
    let stored: Vec<u8> = within(
        "the result",
        sqlx::query_scalar("SELECT result FROM idem_records").fetch_one(pool),
    )
    .await
    .unwrap();
    assert_eq!(
        RecordedResult::decode(&stored).unwrap(),
        RecordedResult::TooLarge
    );
}

#[tokio::test]
async fn concurrent_migrations_apply_once_and_again_is_a_no_op() {
    const INSTANCES: usize = 8;
    let server = PostgresServer::start();
    // Eight instances, each with its own pool holding one open connection, released at once.
    let config = PostgresConfig::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5));
    let mut stores = Vec::new();
    for _ in 0..INSTANCES {
        stores.push(store(&server, config).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(INSTANCES));
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.migrate().await
            })
        })
        .collect();
    for task in tasks {
        let outcome = within("a concurrent migration", task).await.unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    let pool = stores[0].pool();
    let rows = "SELECT count(*) FROM idem_schema_migrations";
    assert_eq!(scalar(pool, rows).await, PostgresStore::SCHEMA_VERSION);
    let first = "SELECT count(*) FROM idem_schema_migrations WHERE version = 1";
    assert_eq!(scalar(pool, first).await, 1);

    // Again, with records in the table: nothing changes.
    insert_completed(pool, "kept", 3, 3600.0).await;
    let applied_at = "SELECT (extract(epoch FROM applied_at) * 1000000)::bigint \
                      FROM idem_schema_migrations WHERE version = 1";
    let before = scalar(pool, applied_at).await;
    for store in &stores {
        within("migrating again", store.migrate()).await.unwrap();
    }
    assert_eq!(scalar(pool, rows).await, PostgresStore::SCHEMA_VERSION);
    assert_eq!(scalar(pool, applied_at).await, before);
    assert_eq!(scalar(pool, "SELECT count(*) FROM idem_records").await, 3);
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let server = PostgresServer::start();
    let store = store(&server, PostgresConfig::new()).await;
    within("migrate", store.migrate()).await.unwrap();
    server.psql(
        "postgres",
        "UPDATE idem_schema_migrations SET checksum = sha256('other SQL'::bytea)",
    );
    match within("migrate", store.migrate()).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("0001_idem_records.sql"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn purge_deletes_only_expired_records_in_bounded_batches() {
    let server = PostgresServer::start();
    let store = store(&server, PostgresConfig::new().purge_batch_size(10)).await;
    within("migrate", store.migrate()).await.unwrap();
    let pool = store.pool();
    insert_completed(pool, "old", 25, -60.0).await;
    insert_completed(pool, "live", 5, 3600.0).await;
    let expired = "SELECT count(*) FROM idem_records WHERE expires_at < now()";
    let live = "SELECT count(*) FROM idem_records WHERE expires_at >= now()";

    let mut batches = Vec::new();
    for _ in 0..5 {
        let deleted = within("a purge", store.purge_expired()).await.unwrap();
        batches.push(deleted);
        if deleted == 0 {
            break;
        }
    }
    assert_eq!(batches, [10, 10, 5, 0]);
    assert_eq!(scalar(pool, expired).await, 0);
    assert_eq!(scalar(pool, live).await, 5);

    // A row another transaction holds (a request still working on it) is skipped, not waited
    // for, and purged once it is free.
    insert_completed(pool, "held", 2, -60.0).await;
    let mut holder = within("begin", pool.begin()).await.unwrap();
    let held =
        sqlx::query("SELECT key FROM idem_records WHERE expires_at < now() LIMIT 1 FOR UPDATE")
            .fetch_one(&mut *holder);
    within("locking a row", held).await.unwrap();
    let started = Instant::now();
    assert_eq!(within("a purge", store.purge_expired()).await.unwrap(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    within("commit", holder.commit()).await.unwrap();
    assert_eq!(within("a purge", store.purge_expired()).await.unwrap(), 1);
    assert_eq!(scalar(pool, live).await, 5);
}

async fn acquire(
    store: &PostgresStore,
    key: &RecordKey,
    owner: OwnerToken,
    fingerprint: &Fingerprint,
    lease: Duration,
    retention: Duration,
) -> Result<Acquired, StoreError> {
    let request = AcquireRequest::new(key, owner, fingerprint, lease, retention);
    within("an acquire", store.acquire(request)).await
}

#[tokio::test]
async fn purge_deletes_what_the_transitions_left_expired() {
    let server = PostgresServer::start();
    let store = server.store(PostgresConfig::new()).await;
    let key = |name: &str| {
        RecordKey::new(
            &Scope::NONE,
            &IdempotencyKey::parse_bytes(name.as_bytes()).unwrap(),
        )
    };
    let fingerprint = Fingerprint::of(&http::Method::POST, "/", "/", "", b"");
    let short = Duration::from_millis(100);
    let long = Duration::from_secs(3600);
    let result = Arc::new(RecordedResult::TooLarge);
    let take =
        |key, owner, lease, retention| acquire(&store, key, owner, &fingerprint, lease, retention);
    // Completed with a short ttl; in flight with a short retention; released; completed and
    // in flight for long.
    let (completed, abandoned, released) = (key("completed"), key("abandoned"), key("released"));
    let (kept, running) = (key("kept"), key("running"));
    for (record, ttl) in [(&completed, short), (&kept, long)] {
        let owner = OwnerToken::generate();
        take(record, owner, long, long).await.unwrap();
        let request = CompleteRequest::new(record, owner, &fingerprint, &result, ttl);
        assert!(within("a complete", store.complete(request)).await.unwrap());
    }
    take(&abandoned, OwnerToken::generate(), short, short)
        .await
        .unwrap();
    let owner = OwnerToken::generate();
    take(&released, owner, short, short).await.unwrap();
    let release = idem_runtime::store::ReleaseRequest::new(&released, owner);
    within("a release", store.release(release)).await.unwrap();
    take(&running, OwnerToken::generate(), long, long)
        .await
        .unwrap();

    tokio::time::sleep(short + Duration::from_millis(50)).await;
    assert_eq!(within("a purge", store.purge_expired()).await.unwrap(), 3);
    assert_eq!(within("a purge", store.purge_expired()).await.unwrap(), 0);
    let left = "SELECT count(*) FROM idem_records";
    assert_eq!(scalar(store.pool(), left).await, 2);
    // A purged key is new again; the others are as they were.
    for record in [&completed, &abandoned, &released] {
        let fresh = take(record, OwnerToken::generate(), long, long).await;
        assert!(
            matches!(fresh, Ok(Acquired::Execute { epoch: 1 })),
            "{fresh:?}"
        );
    }
    let replay = take(&kept, OwnerToken::generate(), long, long).await;
    assert!(
        matches!(replay, Ok(Acquired::Completed { .. })),
        "{replay:?}"
    );
    let busy = take(&running, OwnerToken::generate(), long, long).await;
    assert!(matches!(busy, Ok(Acquired::InFlight { .. })), "{busy:?}");
}

#[tokio::test]
async fn a_statement_past_its_timeout_is_a_store_timeout() {
    let server = PostgresServer::start();
    let config = PostgresConfig::new().statement_timeout(Duration::from_millis(200));
    let store = store(&server, config).await;
    within("migrate", store.migrate()).await.unwrap();
    insert_completed(store.pool(), "old", 3, -60.0).await;

    // A DBA's lock on the whole table: the purge's DELETE waits until PostgreSQL cancels it.
    let mut dba = within("begin", store.pool().begin()).await.unwrap();
    let lock = sqlx::query("LOCK TABLE idem_records IN ACCESS EXCLUSIVE MODE").execute(&mut *dba);
    within("locking the table", lock).await.unwrap();
    let started = Instant::now();
    let outcome = within("a purge", store.purge_expired()).await;
    assert!(matches!(outcome, Err(StoreError::Timeout)), "{outcome:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(1),
        "{elapsed:?}"
    );
    within("rollback", dba.rollback()).await.unwrap();
    assert_eq!(within("a purge", store.purge_expired()).await.unwrap(), 3);
}

#[tokio::test]
async fn a_frozen_server_is_a_store_timeout() {
    let server = PostgresServer::start();
    let config = PostgresConfig::new()
        .acquire_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_millis(300));
    let store = store(&server, config).await;
    within("migrate", store.migrate()).await.unwrap();

    server.pause();
    let started = Instant::now();
    let outcome = within("a purge", store.purge_expired()).await;
    let elapsed = started.elapsed();
    server.resume();
    assert!(matches!(outcome, Err(StoreError::Timeout)), "{outcome:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // Once it runs again, so does the store, without being rebuilt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.purge_expired().await.is_err() {
        assert!(Instant::now() < deadline, "the store never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_killed_server_restarts_with_its_data_and_the_store_recovers() {
    let mut server = PostgresServer::start();
    let config = PostgresConfig::new().acquire_timeout(Duration::from_millis(300));
    let store = store(&server, config).await;
    within("migrate", store.migrate()).await.unwrap();
    insert_completed(store.pool(), "kept", 4, 3600.0).await;
    let port = server.port();

    server.kill();
    assert!(!server.is_running());
    assert!(!server.is_ready());
    // The database refuses connections. The first call finds the pool's idle connection dead
    // (and fails at once), or, when the pool had already dropped it, waits while sqlx's pool
    // retries the refused connection until the acquire timeout; either way the store now knows
    // the database is down, and every later call fails at once.
    let started = Instant::now();
    let first = within("a purge", store.purge_expired()).await;
    assert!(first.is_err(), "{first:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for _ in 0..3 {
        let started = Instant::now();
        let outcome = within("a purge", store.purge_expired()).await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(250), "{elapsed:?}");
    }

    server.restart();
    assert_eq!(server.port(), port);
    assert!(server.is_ready());
    assert!(
        server.log().contains("not properly shut down"),
        "no crash recovery in the log:\n{}",
        server.log()
    );
    assert_eq!(
        server.psql("postgres", "SELECT count(*) FROM idem_records"),
        "4"
    );
    // The same store reconnects by itself (the pool drops the broken connections).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.purge_expired().await {
            Ok(deleted) => {
                assert_eq!(deleted, 0);
                break;
            }
            Err(error) => assert!(Instant::now() < deadline, "never recovered: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    within("migrate", store.migrate()).await.unwrap();
}
