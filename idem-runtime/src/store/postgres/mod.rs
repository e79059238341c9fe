//! The PostgreSQL store: idempotency records in a table of the application's own database.
//!
//! ```no_run
//! # async fn run() -> Result<(), idem_runtime::store::StoreError> {
//! use std::time::Duration;
//! use idem_runtime::Idempotency;
//! use idem_runtime::store::{PostgresConfig, PostgresStore, TieredStore};
//!
//! let config = PostgresConfig::new().statement_timeout(Duration::from_millis(500));
//! let store = PostgresStore::connect("postgres://app@127.0.0.1/app", config).await?;
//! // Creates or upgrades idem's tables and functions; every instance may call it at start-up.
//! store.migrate().await?;
//! // Completed records are also kept in process memory, so most replays cost no round trip.
//! let idem = Idempotency::builder().store(TieredStore::new(store.clone())).build();
//! // Now and then: deletes at most one batch of expired records.
//! let purged = store.purge_expired().await?;
//! # drop((idem, purged));
//! # Ok(())
//! # }
//! ```
//!
//! Each transition of [`Store`] is one round trip: one prepared statement calling one PL/pgSQL
//! function of the schema, which reads, decides and writes atomically on the database's clock.
//! Beside the plain store, [`PostgresStore::claim_in_transaction`] claims a record inside a
//! transaction that the handler then writes in, and [`PostgresStore::complete_in_transaction`]
//! records the result in it and commits: the claim, the handler's writes and the result commit
//! together or not at all.
//!
//! The files: this one (the store, its settings, running a statement within its budget),
//! `sql.rs` (every statement sent, the parsing of the answers), `transaction.rs` (the
//! transactional claim), `migrate.rs` (the embedded migrations and their runner),
//! `reachability.rs` (failing fast while the database refuses connections), `error.rs` (sqlx
//! errors as [`StoreError`]s); the SQL itself in `idem-runtime/migrations/*.sql`. The user
//! documentation (layout, transitions, migrations, settings, failures) is on [`PostgresStore`].

mod error;
mod migrate;
mod reachability;
mod sql;
mod transaction;

use std::future::Future;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};

use self::error::{into_store, is_broken, map_error};
use self::reachability::Reachability;
pub use self::transaction::TransactionalClaim;
use super::{
    AcquireRequest, Acquired, CompleteRequest, ReleaseRequest, RenewRequest, Store, StoreError,
    StoreFuture,
};

/// A store keeping records in PostgreSQL, in a table of the application's own database, so that
/// every instance of a service sees the same records and a handler can record its result in its
/// own transaction.
///
/// Build one with [`PostgresStore::connect`] (a URL, a pool sized by [`PostgresConfig`]) or
/// [`PostgresStore::new`] (a [`PgPool`] you already have), then call
/// [`PostgresStore::migrate`] once at start-up. Put a [`TieredStore`](super::TieredStore) in
/// front of it so that replays of recent results are served from process memory.
///
/// # Records
///
/// One row per scoped key in `idem_records`, in the first schema of the connection's
/// `search_path` (usually `public`; give idem's role a `search_path` of its own schema to keep
/// the tables apart). The schema is in `idem-runtime/migrations/*.sql`, readable as it is:
///
/// | column | type | meaning |
/// |---|---|---|
/// | `key` | `bytea`, primary key | the [`RecordKey`](crate::fingerprint::RecordKey): SHA-256 of the scope and the client's key (32 bytes); no client byte is ever stored |
/// | `state` | `text` | `in_flight` (an attempt holds the lease), `released` (the lease was given up early; the next acquire takes over) or `completed` |
/// | `owner_token` | `bytea` | the [`OwnerToken`](super::OwnerToken) of the attempt that holds or completed the record, 16 bytes big-endian |
/// | `epoch` | `bigint` | the attempts that have owned the record, 1 for the first: the fencing number |
/// | `fingerprint` | `bytea` | SHA-256 of the request the key was first used with (32 bytes) |
/// | `lease_deadline` | `timestamptz` | when the lease ends (or ended), on the database's clock; `NULL` once completed |
/// | `expires_at` | `timestamptz` | when the record ends: the route's ttl after completion, its retention before; never before the lease deadline. A row past it is treated as absent, and purged |
/// | `created_at` | `timestamptz` | when the key was first seen |
/// | `completed_at` | `timestamptz` | when the result was recorded; `NULL` until then |
/// | `result` | `bytea` | the [encoded](crate::record::RecordedResult::encode) result; `NULL` until completed |
///
/// `CHECK` constraints hold the lengths and the state rules (a lease exactly while not completed,
/// a result exactly once completed), and `idem_records_expires_at` indexes `expires_at` for the
/// purge. An operator can look at a key's record with `SELECT state, epoch, lease_deadline,
/// expires_at FROM idem_records WHERE key = '\x…'` and purge it with `DELETE` (with a
/// [`TieredStore`](super::TieredStore) in front, instances may replay it from memory for up to
/// [`TieredConfig::max_entry_ttl`](super::TieredConfig::max_entry_ttl) longer).
///
/// # Transitions
///
/// Each transition is one round trip: a prepared statement calling one function of
/// `migrations/0002_idem_transitions.sql` with bound parameters (never a value spliced into SQL).
/// A function call is one statement, so it is atomic; it reads the clock once with
/// `clock_timestamp()` (the database's clock, the same for every instance), and it first sets
/// `lock_timeout` for its own transaction only.
///
/// | transition | statement | what it does |
/// |---|---|---|
/// | acquire | `SELECT outcome, epoch, left_ms, result FROM idem_acquire(key, owner, fingerprint, lease_ms, retention_ms, lock_timeout_ms)` | Reads the row without locking it and answers from that read: another fingerprint → `mismatch`; completed → `completed` with the result and the time it has left; in flight for the same owner → `execute` with the same epoch (a retried call converges); in flight under a live lease → `in_flight` with the time left. Otherwise it writes: an absent record (or one past `expires_at`, which counts as absent) becomes `in_flight` with epoch 1; a released one, or one whose lease ended, is taken over with epoch + 1, keeping its fingerprint. |
/// | renew | `SELECT idem_renew(key, owner, lease_ms, lock_timeout_ms)` | `UPDATE` of the lease deadline to now + lease (and `expires_at` to at least that), only where the caller owns the record in flight. |
/// | complete | `SELECT idem_complete(key, owner, result, ttl_ms, lock_timeout_ms)` | `UPDATE` to `completed` with the result, expiring ttl from now, only where the caller owns the record in flight; `true` also when the same owner already completed it. |
/// | release | `SELECT idem_release(key, owner, lock_timeout_ms)` | `UPDATE` to `released`, the lease ending now, only where the caller owns the record in flight; epoch and fingerprint stay, so the next acquire takes over with epoch + 1. |
///
/// An acquire never waits for another transaction. It inserts under a transaction-level advisory
/// lock on the key taken with `pg_try_advisory_xact_lock`, and changes an existing row under its
/// row lock taken with `FOR UPDATE SKIP LOCKED`: when either is held elsewhere (a duplicate
/// inserting at the same instant, or a [transactional claim](PostgresStore::claim_in_transaction)
/// still open), the answer is `InFlight` at once, with the caller's own lease as the estimate of
/// the time left. Renew, complete and release wait for a row lock at most the lock timeout.
///
/// Every transition is safe to run twice with the same owner, since a call that timed out may
/// still have run: acquiring again returns the same epoch, completing again returns `true`,
/// renewing again extends the lease again, releasing again finds nothing to release.
///
/// Why functions rather than one statement with CTEs, measured (`docs/BENCHMARKS.md`,
/// "PostgreSQL store"): statements with CTEs covering only the first execution and the replay
/// (no takeover, no race) answered 6–20 µs sooner out of about 200 µs end to end, and within 3 %
/// on the server alone (`pgbench`). A complete CTE acquire would add the takeover branches to
/// that, could not bound its lock waits (`lock_timeout` cannot be set before the first lock of
/// the same statement), and would have to answer `InFlight` whenever its parts, which share one
/// snapshot, disagree with a row that changed under them, where a function simply reads again.
/// The functions keep the state machine in one readable piece for a few percent.
///
/// # Migrations
///
/// [`PostgresStore::migrate`] applies the migrations this version of idem ships
/// (`migrations/0001_idem_records.sql`, `0002_idem_transitions.sql`, …, embedded in the
/// binary) that the database lacks, and records each in its own table, `idem_schema_migrations`
/// (`version`, `description`, `checksum`, `applied_at`). It never touches `_sqlx_migrations`, so
/// it cannot collide with the application's own `sqlx::migrate!` migrations: those would
/// otherwise refuse to run beside versions they do not know.
///
/// Every instance may call it at start-up at the same time. It runs in one `READ COMMITTED`
/// transaction that first takes a transaction-level advisory lock,
/// `pg_advisory_xact_lock(`[`MIGRATION_LOCK_KEY`](PostgresStore::MIGRATION_LOCK_KEY)`)`: the
/// callers run one after the other, each reading the version table only once it holds the lock,
/// so the first applies what is missing and the others find nothing left to do. The lock is
/// released at commit or rollback, also when the connection dies, so a crashed instance never
/// leaves it behind; and PostgreSQL's DDL is transactional, so a failed migration leaves nothing
/// half-applied. A migration whose SQL differs from the one recorded (its checksum) fails the
/// call; versions newer than this binary knows are left alone, so an older instance still starts
/// during a rolling upgrade (migrations only add: a transition whose signature or meaning changes
/// becomes a function of a new name, and the old one stays for the older instances).
///
/// The role that migrates needs `CREATE` on the schema. To keep DDL away from the service's own
/// role, run the migration from a deploy step with an owner role and grant the service `SELECT,
/// INSERT, UPDATE, DELETE` on `idem_records` and `EXECUTE` on the `idem_*` functions (the
/// default for `PUBLIC`).
///
/// # Purging
///
/// Expired rows stay until [`PostgresStore::purge_expired`] deletes them, at most
/// [`PostgresConfig::purge_batch_size`] per call, oldest first, skipping rows other transactions
/// hold locked (`FOR UPDATE SKIP LOCKED`), so a purge never waits on a running request and never
/// holds many locks for long. Run it periodically from one or more instances; a call that
/// returns a full batch means more may be left. Until then an expired row behaves as absent.
///
/// # Timeouts and failures
///
/// Each transition has one budget on the client's clock, [`PostgresConfig::acquire_timeout`] plus
/// [`PostgresConfig::statement_timeout`], covering getting a connection (opening one if needed)
/// and the statement; past it the transition fails with [`StoreError::Timeout`] (a `503` for an
/// acquire), however the server behaves. On the server, each function bounds its lock waits by
/// [`PostgresConfig::lock_timeout`], set for its own transaction only. The transitions do not set
/// PostgreSQL's `statement_timeout`: sqlx sends one statement per round trip and a function
/// cannot arm the timeout of the statement that runs it, so it would take a second round trip
/// per transition; a single-row statement whose lock waits are bounded only runs long on a
/// server that is stalled, which the client-side budget covers. [`PostgresStore::migrate`] and
/// [`PostgresStore::purge_expired`], which scan, set it with `SET LOCAL` (their own transactions
/// only, even on a pool shared with the application).
///
/// The pool [`PostgresStore::connect`] builds does not ping a connection before handing it out
/// ([`PostgresConfig::pool_options`]): that ping would cost a round trip per transition. A
/// connection that died while idle (the database restarted, a proxy dropped it) is found when a
/// transition uses it, and the transition runs again on another connection within its budget,
/// which is safe since every transition is. sqlx's pool retries a refused connection until the
/// acquire timeout, as if the database were still starting; so the store notes when the
/// database looks down (a connection found broken, or a pool that could not open a connection
/// in time) and from then on checks with a connection of its own before using the pool: while
/// the database refuses connections, transitions fail with [`StoreError::Unavailable`] at once,
/// and the first check that connects lets the pool work again. The same store recovers by itself
/// once the database is back; nothing needs rebuilding.
///
/// | cause | error |
/// |---|---|
/// | no connection within the acquire timeout; the transition's budget spent; the statement timeout (SQLSTATE `57014`, purge and migrate); the lock timeout (`55P03`); an I/O timeout | [`StoreError::Timeout`] |
/// | the database refusing connections or shutting down (`57P01`…`57P03`), connection errors (`08…`), out of resources (`53…`), serialization failure (`40001`) or deadlock (`40P01`: safe to retry), any other database error (such as a missing table or function: run [`PostgresStore::migrate`]) | [`StoreError::Unavailable`] |
/// | a row or column that does not decode as a record, such as a `result` that is not a recorded result | [`StoreError::Corrupt`] |
///
/// # Guarantee
///
/// As a plain store, the same as every store's: within the retention window, for one scoped key,
/// a different payload never runs; while the first attempt holds its lease, duplicates never run
/// beside it; once the response is recorded, duplicates get it and never run. A crash or a pause
/// longer than the lease before the response is recorded can let a retry run again; the epoch
/// lets the handler fence that. Records are as durable as the database's commits
/// (`synchronous_commit`, replication). With the [transactional claim](TransactionalClaim) the
/// handler's own writes in the database commit with the record or not at all, which closes that
/// window for them.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    config: PostgresConfig,
    reachability: Arc<Reachability>,
}

/// How a [`PostgresStore`] sizes its pool and how long it waits. Every setter states its
/// default.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::store::PostgresConfig;
///
/// let config = PostgresConfig::new()
///     .acquire_timeout(Duration::from_millis(500))
///     .lock_timeout(Duration::from_millis(20))
///     .purge_batch_size(500);
/// # drop(config);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct PostgresConfig {
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    lock_timeout: Duration,
    migrate_timeout: Duration,
    purge_batch_size: u32,
}

impl PostgresConfig {
    /// Default for [`PostgresConfig::max_connections`]: 10.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
    /// Default for [`PostgresConfig::acquire_timeout`]: 1 second.
    pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default for [`PostgresConfig::statement_timeout`]: 1 second.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default for [`PostgresConfig::lock_timeout`]: 50 milliseconds.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_millis(50);
    /// Default for [`PostgresConfig::migrate_timeout`]: 60 seconds.
    pub const DEFAULT_MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default for [`PostgresConfig::purge_batch_size`]: 1000 records.
    pub const DEFAULT_PURGE_BATCH_SIZE: u32 = 1000;

    /// The defaults.
    pub const fn new() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: Self::DEFAULT_ACQUIRE_TIMEOUT,
            statement_timeout: Self::DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
            migrate_timeout: Self::DEFAULT_MIGRATE_TIMEOUT,
            purge_batch_size: Self::DEFAULT_PURGE_BATCH_SIZE,
        }
    }

    /// The most connections the pool [`PostgresStore::connect`] builds opens at once (at least
    /// 1). A store built with [`PostgresStore::new`] uses its pool as it is. Default: 10.
    pub const fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = if max == 0 { 1 } else { max };
        self
    }

    /// How long a call may wait for a connection from the pool, including opening a new one,
    /// before it fails with [`StoreError::Timeout`] (the pool budget: with every connection busy,
    /// requests get `503` rather than queueing without end). Applied by the pool
    /// [`PostgresStore::connect`] builds, and by every call as part of its client-side budget.
    /// Default: 1 s.
    pub const fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long one statement may take: on the client's clock for each transition (its budget is
    /// the acquire timeout plus this), and as PostgreSQL's `statement_timeout` (set with `SET
    /// LOCAL`, in idem's own transactions only) for [`PostgresStore::purge_expired`]. Past it the
    /// call fails with [`StoreError::Timeout`]. Keep it well below the lease. Default: 1 s.
    pub const fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How long one of idem's statements waits for a lock before failing with
    /// [`StoreError::Timeout`] (PostgreSQL's `lock_timeout`, set inside each transition for its
    /// own transaction only): a table an operator locked, or a record another transaction is
    /// changing under a renew, complete or release. An acquire or a claim never waits for a
    /// record's lock: a record another transaction holds (a duplicate's claim whose handler is
    /// still running in its transaction) answers [`Acquired::InFlight`] at once. Default: 50 ms.
    pub const fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The statement timeout of [`PostgresStore::migrate`]'s transaction, which includes waiting
    /// for another instance's migration to finish: longer than the store's, since creating an
    /// index on a large table takes time. Default: 60 s.
    pub const fn migrate_timeout(mut self, timeout: Duration) -> Self {
        self.migrate_timeout = timeout;
        self
    }

    /// The most records one [`PostgresStore::purge_expired`] call deletes (at least 1), which
    /// bounds how long it holds row locks and how much it writes at once. Default: 1000.
    pub const fn purge_batch_size(mut self, batch: u32) -> Self {
        self.purge_batch_size = if batch == 0 { 1 } else { batch };
        self
    }

    /// The configured maximum number of connections.
    pub const fn get_max_connections(&self) -> u32 {
        self.max_connections
    }

    /// The configured acquire timeout.
    pub const fn get_acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// The configured statement timeout.
    pub const fn get_statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// The configured lock timeout.
    pub const fn get_lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// The configured migration timeout.
    pub const fn get_migrate_timeout(&self) -> Duration {
        self.migrate_timeout
    }

    /// The configured purge batch size.
    pub const fn get_purge_batch_size(&self) -> u32 {
        self.purge_batch_size
    }

    /// Pool options with this configuration's size and acquire timeout, for building a pool
    /// with connect options of your own and handing it to [`PostgresStore::new`].
    ///
    /// They turn sqlx's `test_before_acquire` off: that ping of every connection taken from the
    /// pool would cost a round trip per transition, doubling a first execution's. A connection
    /// that died while idle is found when used instead, and the transition runs again on another
    /// one (see [Timeouts and failures](PostgresStore#timeouts-and-failures)).
    pub fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(false)
    }

    /// The budget of one transition on the client's clock.
    const fn transition_budget(&self) -> Duration {
        self.acquire_timeout.saturating_add(self.statement_timeout)
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PostgresStore {
    /// The schema version this build migrates to: the number of its newest migration.
    pub const SCHEMA_VERSION: i64 = 2;

    /// The key of the transaction-level advisory lock [`PostgresStore::migrate`] takes:
    /// `0x6964656d5f6d6967`, the bytes of `idem_mig`. An operator migrating by hand can take
    /// the same lock (`SELECT pg_advisory_xact_lock(7594306392080345447)`).
    pub const MIGRATION_LOCK_KEY: i64 = i64::from_be_bytes(*b"idem_mig");

    /// A store over an existing pool, which may be the one the application uses: idem's
    /// timeouts are set per transaction, never on the pool's sessions. Nothing is sent to the
    /// database until a call. A pool built from [`PostgresConfig::pool_options`] saves a round
    /// trip per transition over sqlx's defaults.
    pub fn new(pool: PgPool, config: PostgresConfig) -> Self {
        Self {
            pool,
            config,
            reachability: Arc::default(),
        }
    }

    /// Connects to the database at `url` (e.g. `postgres://app:secret@db.internal:5432/app`)
    /// through a pool built from [`PostgresConfig::pool_options`], opening one connection now so
    /// that a misconfigured URL or an unreachable database fails at start-up. Its connections
    /// announce themselves as `application_name` `idem` (in `pg_stat_activity`) unless the URL
    /// names one. Does not migrate: call [`PostgresStore::migrate`].
    pub async fn connect(url: &str, config: PostgresConfig) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url).map_err(into_store)?;
        if options.get_application_name().is_none() {
            options = options.application_name("idem");
        }
        let connect = async {
            config
                .pool_options()
                .connect_with(options)
                .await
                .map_err(into_store)
        };
        let pool = within(config.acquire_timeout, connect).await?;
        Ok(Self::new(pool, config))
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The store's configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    /// Creates idem's tables and functions or brings them up to
    /// [`PostgresStore::SCHEMA_VERSION`]; a no-op when they are up to date. Safe to call from
    /// every instance at once: see [Migrations](PostgresStore#migrations).
    ///
    /// Bounded by [`PostgresConfig::acquire_timeout`] plus [`PostgresConfig::migrate_timeout`].
    /// Fails with [`StoreError::Unavailable`] when an applied migration differs from the one
    /// this build ships.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let budget = self
            .config
            .acquire_timeout
            .saturating_add(self.config.migrate_timeout);
        let run = migrate::run(
            &self.pool,
            Self::MIGRATION_LOCK_KEY,
            self.config.migrate_timeout,
        );
        within(budget, run).await
    }

    /// Deletes at most [`PostgresConfig::purge_batch_size`] expired records (`expires_at` in the
    /// past on the database's clock), oldest first, skipping rows locked by other transactions,
    /// and returns how many it deleted. A full batch means more may be left: call again.
    ///
    /// Bounded by [`PostgresConfig::acquire_timeout`] plus
    /// [`PostgresConfig::statement_timeout`], and failing fast while the database refuses
    /// connections, like a transition.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        // Safe to run again on another connection: a batch deletes only expired rows.
        self.retrying(|| async move {
            let mut transaction = self.pool.begin().await?;
            let connection: &mut PgConnection = &mut transaction;
            sql::statement_timeout(self.config.statement_timeout)
                .execute(&mut *connection)
                .await?;
            let deleted = sqlx::query(sql::PURGE_BATCH)
                .bind(i64::from(self.config.purge_batch_size))
                .execute(&mut *connection)
                .await?
                .rows_affected();
            transaction.commit().await?;
            Ok(deleted)
        })
        .await
    }

    /// Runs one transition's statement on a connection from the pool: see [`Self::retrying`].
    async fn transition(
        &self,
        statement: impl Fn() -> sql::Statement,
    ) -> Result<PgRow, StoreError> {
        self.retrying(|| {
            let statement = statement();
            async move {
                let mut connection = self.pool.acquire().await?;
                statement.fetch_one(&mut *connection).await
            }
        })
        .await
    }

    /// Runs `call` within the transition budget. While the database looks down, it first checks
    /// that it accepts connections (failing fast if not); when `call` fails on a connection
    /// that turns out broken, it runs again on another (every transition is safe to run twice),
    /// at most once per connection the pool may hold.
    async fn retrying<T, F>(&self, call: impl Fn() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        let attempts = async {
            let mut broken = 0;
            loop {
                self.reachability.check(&self.pool).await?;
                match call().await {
                    Err(error) if is_broken(&error) && broken < self.max_connections() => {
                        broken += 1;
                        self.reachability.suspect();
                    }
                    answer => return answer.map_err(|error| self.failed(&error)),
                }
            }
        };
        within(self.config.transition_budget(), attempts).await
    }

    /// `error` as a [`StoreError`], noting on the way whether the database looks down: a pool
    /// that had room for another connection and could not open one within the acquire timeout
    /// was being refused (or could not reach the server).
    fn failed(&self, error: &sqlx::Error) -> StoreError {
        let refused =
            matches!(error, sqlx::Error::PoolTimedOut) && self.pool.size() < self.max_connections();
        if refused || is_broken(error) {
            self.reachability.suspect();
        }
        map_error(error)
    }

    fn max_connections(&self) -> u32 {
        self.pool.options().get_max_connections()
    }
}

impl Store for PostgresStore {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        StoreFuture::new(async move {
            let lock_timeout = self.config.lock_timeout;
            let row = self
                .transition(|| sql::acquire(&request, lock_timeout))
                .await?;
            sql::parse_acquired(&row)
        })
    }

    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async move {
            let lock_timeout = self.config.lock_timeout;
            let row = self
                .transition(|| sql::renew(&request, lock_timeout))
                .await?;
            sql::parse_flag(&row)
        })
    }

    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async move {
            let (lock_timeout, encoded) = (self.config.lock_timeout, request.result.encode());
            let row = self
                .transition(|| sql::complete(&request, &encoded, lock_timeout))
                .await?;
            sql::parse_flag(&row)
        })
    }

    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        StoreFuture::new(async move {
            let lock_timeout = self.config.lock_timeout;
            let row = self
                .transition(|| sql::release(&request, lock_timeout))
                .await?;
            sql::parse_flag(&row).map(drop)
        })
    }
}

/// Runs a call within `budget` on the client's clock, in case the server stops answering.
async fn within<T>(
    budget: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(budget, call)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_defaults() {
        assert_eq!(PostgresStore::MIGRATION_LOCK_KEY, 7_594_306_392_080_345_447);
        let config = PostgresConfig::new().purge_batch_size(0).max_connections(0);
        assert_eq!(config.get_purge_batch_size(), 1);
        assert_eq!(config.get_max_connections(), 1);
        assert_eq!(PostgresConfig::default(), PostgresConfig::new());
        let options = PostgresConfig::new()
            .acquire_timeout(Duration::from_millis(300))
            .pool_options();
        assert_eq!(options.get_acquire_timeout(), Duration::from_millis(300));
        assert_eq!(
            options.get_max_connections(),
            PostgresConfig::DEFAULT_MAX_CONNECTIONS
        );
        assert!(!options.get_test_before_acquire());
        let budget = PostgresConfig::new()
            .acquire_timeout(Duration::from_millis(300))
            .statement_timeout(Duration::from_millis(200))
            .transition_budget();
        assert_eq!(budget, Duration::from_millis(500));
        assert_eq!(
            PostgresConfig::new()
                .acquire_timeout(Duration::MAX)
                .transition_budget(),
            Duration::MAX
        );
    }
}
