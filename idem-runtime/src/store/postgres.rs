//! The PostgreSQL store: idempotency records in a table of the application's own database.
//!
//! ```no_run
//! # async fn run() -> Result<(), idem_runtime::store::StoreError> {
//! use std::time::Duration;
//! use idem_runtime::store::{PostgresConfig, PostgresStore};
//!
//! let config = PostgresConfig::new().statement_timeout(Duration::from_millis(500));
//! let store = PostgresStore::connect("postgres://app@127.0.0.1/app", config).await?;
//! // Creates or upgrades idem's tables; every instance may call it at start-up at once.
//! store.migrate().await?;
//! // Deletes at most one batch of expired records; call it again while it returns a full one.
//! let purged = store.purge_expired().await?;
//! # drop(purged);
//! # Ok(())
//! # }
//! ```
//!
//! This is the store's groundwork: the schema and its migrations, the purge of expired records
//! and how database errors become [`StoreError`]s. [`PostgresStore`] does not implement
//! [`Store`](super::Store) yet. The user documentation (layout, migrations, settings) is on
//! [`PostgresStore`].

use std::borrow::Cow;
use std::future::Future;
use std::str::FromStr as _;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::StoreError;
use crate::record::DecodeError;

/// A store keeping records in PostgreSQL, in a table of the application's own database, so that
/// every instance of a service sees the same records and (in time) a handler can record its
/// result in its own transaction.
///
/// Build one with [`PostgresStore::connect`] (a URL, a pool sized by [`PostgresConfig`]) or
/// [`PostgresStore::new`] (a [`PgPool`] you already have), then call
/// [`PostgresStore::migrate`] once at start-up.
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
/// | `expires_at` | `timestamptz` | when the row may be purged: the route's ttl after completion, its retention before; never before the lease deadline |
/// | `created_at` | `timestamptz` | when the key was first seen |
/// | `completed_at` | `timestamptz` | when the result was recorded; `NULL` until then |
/// | `result` | `bytea` | the [encoded](crate::record::RecordedResult::encode) result; `NULL` until completed |
///
/// `CHECK` constraints hold the lengths and the state rules (a lease exactly while not completed,
/// a result exactly once completed), and `idem_records_expires_at` indexes `expires_at` for the
/// purge. An operator can look at a key's record with `SELECT state, epoch, lease_deadline,
/// expires_at FROM idem_records WHERE key = '\x…'` and purge it with `DELETE`.
///
/// # Migrations
///
/// [`PostgresStore::migrate`] applies the migrations this version of idem ships
/// (`migrations/0001_idem_records.sql`, …, embedded in the binary) that the database lacks, and
/// records each in its own table, `idem_schema_migrations` (`version`, `description`,
/// `checksum`, `applied_at`). It never touches `_sqlx_migrations`, so it cannot collide with the
/// application's own `sqlx::migrate!` migrations: those would otherwise refuse to run beside
/// versions they do not know.
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
/// during a rolling upgrade (migrations only add).
///
/// The role that migrates needs `CREATE` on the schema. To keep DDL away from the service's own
/// role, run the migration from a deploy step with an owner role and grant the service `SELECT,
/// INSERT, UPDATE, DELETE` on `idem_records`.
///
/// # Purging
///
/// Expired rows stay until [`PostgresStore::purge_expired`] deletes them, at most
/// [`PostgresConfig::purge_batch_size`] per call, oldest first, skipping rows other transactions
/// hold locked (`FOR UPDATE SKIP LOCKED`), so a purge never waits on a running request and never
/// holds many locks for long. Run it periodically from one or more instances; a call that
/// returns a full batch means more may be left.
///
/// # Timeouts and failures
///
/// Each call has a budget: [`PostgresConfig::acquire_timeout`] to get a connection, then
/// [`PostgresConfig::statement_timeout`] per statement (set with `SET LOCAL`, so only idem's own
/// transactions see it, even on a pool shared with the application), and the whole call is
/// bounded on the client side too, in case the server stops answering. Errors become
/// [`StoreError`]s:
///
/// While the database is down, sqlx's pool keeps retrying a refused connection until the acquire
/// timeout, so each call then fails with [`StoreError::Timeout`] after that budget rather than
/// at once: keep it short. The pool reconnects by itself once the database is back; the same
/// store works again without being rebuilt.
///
/// | cause | error |
/// |---|---|
/// | no connection within the acquire timeout (also while the database is down); the statement timeout (SQLSTATE `57014`); the lock timeout (`55P03`); an I/O timeout; the client-side budget | [`StoreError::Timeout`] |
/// | a connection lost during the call, server shutting down (`57P01`…`57P03`), connection errors (`08…`), out of resources (`53…`), serialization failure (`40001`) or deadlock (`40P01`: safe to retry), any other database error (such as a missing table: run [`PostgresStore::migrate`]) | [`StoreError::Unavailable`] |
/// | a row or column that does not decode as a record | [`StoreError::Corrupt`] |
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    config: PostgresConfig,
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

    /// How long one of idem's statements may run on the server before PostgreSQL cancels it
    /// (`statement_timeout`, set with `SET LOCAL` in idem's own transactions only) and the call
    /// fails with [`StoreError::Timeout`]. Keep it well below the lease. Default: 1 s.
    pub const fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How long a state transition waits for a record's row lock held by another transaction (a
    /// concurrent duplicate whose handler is still running in its transaction) before giving
    /// up, so that a duplicate gets `409` at once instead of blocking (`lock_timeout`, set with
    /// `SET LOCAL`). It is read by the transitions of the [`Store`](super::Store)
    /// implementation, which this version does not have yet. Default: 50 ms.
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
    pub fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One embedded schema migration.
#[derive(Debug)]
struct Migration {
    /// Its number, from the file name; applied in ascending order.
    version: i64,
    /// The rest of the file name.
    description: &'static str,
    /// The file's SQL.
    sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL, with carriage returns left out so that a checkout with CRLF line
    /// endings has the same checksum.
    fn checksum(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for line in self.sql.split('\r') {
            hasher.update(line.as_bytes());
        }
        hasher.finalize().into()
    }
}

/// The migrations this version ships, oldest first: `migrations/<version>_<description>.sql`.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "idem_records",
    sql: include_str!("../../migrations/0001_idem_records.sql"),
}];

/// The version table, created (under the migration lock) before anything reads it.
const CREATE_VERSION_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS idem_schema_migrations (
    version     bigint      PRIMARY KEY,
    description text        NOT NULL,
    checksum    bytea       NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)";

/// One batch of the purge: the oldest expired rows no other transaction holds, then delete
/// those.
const PURGE_BATCH: &str = "\
DELETE FROM idem_records
WHERE key IN (
    SELECT key FROM idem_records
    WHERE expires_at < now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)";

impl PostgresStore {
    /// The schema version this build migrates to: the number of its newest migration.
    pub const SCHEMA_VERSION: i64 = 1;

    /// The key of the transaction-level advisory lock [`PostgresStore::migrate`] takes:
    /// `0x6964656d5f6d6967`, the bytes of `idem_mig`. An operator migrating by hand can take
    /// the same lock (`SELECT pg_advisory_xact_lock(7594306392080345447)`).
    pub const MIGRATION_LOCK_KEY: i64 = i64::from_be_bytes(*b"idem_mig");

    /// A store over an existing pool, which may be the one the application uses: idem's
    /// timeouts are set per transaction, never on the pool's sessions. Nothing is sent to the
    /// database until a call.
    pub fn new(pool: PgPool, config: PostgresConfig) -> Self {
        Self { pool, config }
    }

    /// Connects to the database at `url` (e.g. `postgres://app:secret@db.internal:5432/app`)
    /// through a pool sized by `config`, opening one connection now so that a misconfigured URL
    /// or an unreachable database fails at start-up. Does not migrate: call
    /// [`PostgresStore::migrate`].
    pub async fn connect(url: &str, config: PostgresConfig) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(into_store)?;
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

    /// Creates idem's tables or brings them up to [`PostgresStore::SCHEMA_VERSION`]; a no-op
    /// when they are up to date. Safe to call from every instance at once: see
    /// [Migrations](PostgresStore#migrations).
    ///
    /// Bounded by [`PostgresConfig::acquire_timeout`] plus [`PostgresConfig::migrate_timeout`].
    /// Fails with [`StoreError::Unavailable`] when an applied migration differs from the one
    /// this build ships.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let budget = self
            .config
            .acquire_timeout
            .saturating_add(self.config.migrate_timeout);
        within(budget, self.run_migrations()).await
    }

    async fn run_migrations(&self) -> Result<(), StoreError> {
        let mut transaction = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(into_store)?;
        let connection: &mut PgConnection = &mut transaction;
        set_statement_timeout(connection, self.config.migrate_timeout).await?;
        // Under this lock, and with READ COMMITTED (every statement sees what committed before
        // it started), the version table shows every migration applied by whoever held it before.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(Self::MIGRATION_LOCK_KEY)
            .execute(&mut *connection)
            .await
            .map_err(into_store)?;
        sqlx::raw_sql(CREATE_VERSION_TABLE)
            .execute(&mut *connection)
            .await
            .map_err(into_store)?;
        let applied: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT version, checksum FROM idem_schema_migrations")
                .fetch_all(&mut *connection)
                .await
                .map_err(into_store)?;
        for migration in pending(&applied)? {
            sqlx::raw_sql(migration.sql)
                .execute(&mut *connection)
                .await
                .map_err(into_store)?;
            sqlx::query(
                "INSERT INTO idem_schema_migrations (version, description, checksum) \
                 VALUES ($1, $2, $3)",
            )
            .bind(migration.version)
            .bind(migration.description)
            .bind(migration.checksum().as_slice())
            .execute(&mut *connection)
            .await
            .map_err(into_store)?;
        }
        transaction.commit().await.map_err(into_store)
    }

    /// Deletes at most [`PostgresConfig::purge_batch_size`] expired records (`expires_at` in the
    /// past on the database's clock), oldest first, skipping rows locked by other transactions,
    /// and returns how many it deleted. A full batch means more may be left: call again.
    ///
    /// Bounded by [`PostgresConfig::acquire_timeout`] plus
    /// [`PostgresConfig::statement_timeout`].
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let budget = self
            .config
            .acquire_timeout
            .saturating_add(self.config.statement_timeout);
        within(budget, self.purge_batch()).await
    }

    async fn purge_batch(&self) -> Result<u64, StoreError> {
        let mut transaction = self.pool.begin().await.map_err(into_store)?;
        let connection: &mut PgConnection = &mut transaction;
        set_statement_timeout(connection, self.config.statement_timeout).await?;
        let deleted = sqlx::query(PURGE_BATCH)
            .bind(i64::from(self.config.purge_batch_size))
            .execute(&mut *connection)
            .await
            .map_err(into_store)?
            .rows_affected();
        transaction.commit().await.map_err(into_store)?;
        Ok(deleted)
    }
}

/// The migrations of [`MIGRATIONS`] missing from `applied` (the version table's `version` and
/// `checksum` columns), oldest first. An applied migration whose checksum differs from the
/// embedded one is an error; applied versions this build does not know are ignored (a newer
/// build migrated the database).
fn pending(applied: &[(i64, Vec<u8>)]) -> Result<Vec<&'static Migration>, StoreError> {
    let mut pending = Vec::new();
    for migration in MIGRATIONS {
        match applied
            .iter()
            .find(|(version, _)| *version == migration.version)
        {
            None => pending.push(migration),
            Some((_, checksum)) if checksum.as_slice() == migration.checksum() => {}
            Some(_) => {
                return Err(StoreError::Unavailable(format!(
                    "idem schema migration {} ({}) was applied with different SQL than this \
                     build ships; restore the original migrations/{:04}_{}.sql",
                    migration.version,
                    migration.description,
                    migration.version,
                    migration.description
                )));
            }
        }
    }
    Ok(pending)
}

/// Sets `statement_timeout` for the rest of the current transaction only.
async fn set_statement_timeout(
    connection: &mut PgConnection,
    timeout: Duration,
) -> Result<(), StoreError> {
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(setting_millis(timeout))
        .execute(connection)
        .await
        .map(drop)
        .map_err(into_store)
}

/// A duration as a PostgreSQL time setting in milliseconds: at least 1 (0 would disable the
/// timeout) and at most `i32::MAX`, the largest the server accepts.
fn setting_millis(duration: Duration) -> String {
    let millis = duration
        .as_millis()
        .clamp(1, i32::MAX.unsigned_abs().into());
    millis.to_string()
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

/// [`map_error`] for `map_err`.
#[allow(clippy::needless_pass_by_value)]
fn into_store(error: sqlx::Error) -> StoreError {
    map_error(&error)
}

/// SQLSTATE `57014` `query_canceled`: the statement timeout (or a cancel request).
const QUERY_CANCELED: &str = "57014";
/// SQLSTATE `55P03` `lock_not_available`: the lock timeout, or `NOWAIT`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// What a sqlx error means for the caller (see the table in [`PostgresStore`]'s docs).
fn map_error(error: &sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::PoolTimedOut => StoreError::Timeout,
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => StoreError::Timeout,
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or(Cow::Borrowed("?????"));
            if code == QUERY_CANCELED || code == LOCK_NOT_AVAILABLE {
                return StoreError::Timeout;
            }
            StoreError::Unavailable(format!(
                "PostgreSQL error {code} ({}): {}",
                sqlstate_class(&code),
                database.message()
            ))
        }
        sqlx::Error::RowNotFound
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(DecodeError::new(
            "a row of idem_records does not have the record's columns and types",
        )),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// A few words on what a SQLSTATE's class means for idem, for [`StoreError::Unavailable`]'s
/// message.
fn sqlstate_class(code: &str) -> &'static str {
    match code.get(..2) {
        Some("08") => "connection failure",
        Some("40") => "transaction rolled back, safe to retry",
        Some("53") => "server out of resources",
        Some("57") => "server shutting down or not accepting connections",
        Some("42") => "missing or wrong schema: run PostgresStore::migrate",
        _ => "database error",
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with a given SQLSTATE, as PostgreSQL would report it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &'static str {
            "something happened"
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn database(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    fn unavailable(error: &sqlx::Error) -> String {
        match map_error(error) {
            StoreError::Unavailable(message) => message,
            other => panic!("{error:?} mapped to {other:?}"),
        }
    }

    #[test]
    fn timeouts_map_to_timeout() {
        for error in [
            sqlx::Error::PoolTimedOut,
            database(QUERY_CANCELED),
            database(LOCK_NOT_AVAILABLE),
            sqlx::Error::Io(std::io::ErrorKind::TimedOut.into()),
        ] {
            assert!(
                matches!(map_error(&error), StoreError::Timeout),
                "{error:?}"
            );
        }
    }

    #[test]
    fn connection_and_transient_failures_map_to_unavailable() {
        let serialization = unavailable(&database("40001"));
        assert!(serialization.contains("40001"), "{serialization}");
        assert!(serialization.contains("safe to retry"), "{serialization}");
        assert!(unavailable(&database("40P01")).contains("safe to retry"));
        assert!(unavailable(&database("57P01")).contains("shutting down"));
        assert!(unavailable(&database("08006")).contains("connection failure"));
        assert!(unavailable(&database("53300")).contains("out of resources"));
        assert!(unavailable(&database("42P01")).contains("migrate"));
        assert!(unavailable(&database("XX000")).contains("XX000"));
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(unavailable(&refused).contains("refused"));
        for error in [
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::Io(std::io::ErrorKind::UnexpectedEof.into()),
            sqlx::Error::Configuration("invalid port".into()),
        ] {
            unavailable(&error);
        }
    }

    #[test]
    fn undecodable_rows_map_to_corrupt() {
        for error in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("state".into()),
            sqlx::Error::ColumnIndexOutOfBounds { index: 9, len: 3 },
            sqlx::Error::Decode("not a bytea".into()),
            sqlx::Error::ColumnDecode {
                index: "epoch".into(),
                source: "out of range".into(),
            },
        ] {
            assert!(
                matches!(map_error(&error), StoreError::Corrupt(_)),
                "{error:?}"
            );
        }
    }

    #[test]
    fn the_embedded_migrations_are_the_migrations_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| std::path::Path::new(name).extension() == Some("sql".as_ref()))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.description))
            .collect();
        assert_eq!(files, embedded);
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i64::try_from(index).unwrap() + 1);
            let on_disk = std::fs::read_to_string(dir.join(&embedded[index])).unwrap();
            assert_eq!(on_disk, migration.sql);
        }
        assert_eq!(
            PostgresStore::SCHEMA_VERSION,
            MIGRATIONS.last().unwrap().version
        );
    }

    #[test]
    fn checksums_ignore_carriage_returns() {
        let lf = Migration {
            version: 1,
            description: "x",
            sql: "CREATE TABLE t ();\nSELECT 1;\n",
        };
        let crlf = Migration {
            sql: "CREATE TABLE t ();\r\nSELECT 1;\r\n",
            ..lf
        };
        let other = Migration {
            sql: "CREATE TABLE u ();\nSELECT 1;\n",
            ..lf
        };
        assert_eq!(lf.checksum(), crlf.checksum());
        assert_ne!(lf.checksum(), other.checksum());
    }

    #[test]
    fn pending_migrations() {
        let first = &MIGRATIONS[0];
        assert_eq!(pending(&[]).unwrap().len(), MIGRATIONS.len());
        let applied = vec![(first.version, first.checksum().to_vec())];
        assert!(pending(&applied).unwrap().iter().all(|m| m.version != 1));
        // A newer build's migration is left alone.
        let newer = vec![
            (first.version, first.checksum().to_vec()),
            (i64::MAX, vec![0; 32]),
        ];
        assert!(pending(&newer).is_ok());
        // An edited migration is refused.
        let edited = vec![(first.version, vec![0; 32])];
        match pending(&edited) {
            Err(StoreError::Unavailable(message)) => {
                assert!(message.contains("0001_idem_records.sql"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn settings_and_defaults() {
        assert_eq!(setting_millis(Duration::ZERO), "1");
        assert_eq!(setting_millis(Duration::from_micros(1500)), "1");
        assert_eq!(setting_millis(Duration::from_secs(2)), "2000");
        assert_eq!(setting_millis(Duration::MAX), i32::MAX.to_string());
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
    }
}
