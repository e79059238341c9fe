//! The Redis store: the state machine as server-side Lua scripts, shared by a fleet.
//!
//! Each transition of [`Store`] (the four a request makes, and the three an operator makes) is
//! one `EVALSHA` round trip: the script reads the record, decides
//! and writes atomically on the Redis server, using the server's clock for lease deadlines. The
//! scripts are loaded when the store connects and reloaded transparently if Redis forgets them
//! (`NOSCRIPT` after a restart, a failover or `SCRIPT FLUSH`).
//!
//! ```no_run
//! # async fn run() -> Result<(), idem_runtime::store::StoreError> {
//! use std::time::Duration;
//! use idem_runtime::Idempotency;
//! use idem_runtime::store::{RedisConfig, RedisStore, TieredStore};
//!
//! let config = RedisConfig::new().response_timeout(Duration::from_millis(500));
//! let redis = RedisStore::connect("redis://127.0.0.1:6379/0", config).await?;
//! // Completed records are also kept in process memory, so most replays cost no round trip.
//! let idem = Idempotency::builder().store(TieredStore::new(redis)).build();
//! # drop(idem);
//! # Ok(())
//! # }
//! ```
//!
//! The user documentation (layout, settings, failover) is on [`RedisStore`].

mod scripts;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, IntoConnectionInfo, RedisError, ScriptInvocation, Value};

use self::scripts::{SCRIPTS, parse_acquired, parse_flag, parse_purged, parse_snapshot};
use super::{
    AcquireRequest, Acquired, CompleteRequest, InspectRequest, PurgeRequest, Purged,
    RecordSnapshot, ReleaseRequest, ReleaseStaleRequest, RenewRequest, Store, StoreError,
    StoreFuture,
};
use crate::fingerprint::RecordKey;

/// The prefix of every record's key name. The version changes when the record layout does (v1
/// was a hash per record).
const KEY_PREFIX: &str = "idem:v2:";

/// Durations sent to Redis are capped at about 31 years, so that deadlines computed in the scripts
/// stay exact integers.
const MAX_MILLIS: u64 = 1_000_000_000_000;

/// A store keeping records in Redis (standalone through a self-reconnecting
/// [`ConnectionManager`], or Redis Cluster with the `redis-cluster` feature), so that every
/// instance of a service sees the same records.
///
/// Put a [`TieredStore`](super::TieredStore) in front of it so that replays of recent results are
/// served from process memory.
///
/// # Constructors
///
/// * [`RedisStore::connect`]: from a URL (`redis://[user:password@]host:port/db`, `rediss://` for
///   TLS if the `redis` crate's TLS features are enabled in your build);
/// * [`RedisStore::from_client`]: from an existing [`redis::Client`](::redis::Client);
/// * [`RedisStore::from_connection`]: over any existing async connection, such as a
///   [`ConnectionManager`] you already share, or a cluster connection;
/// * [`RedisStore::connect_cluster`] (feature `redis-cluster`): from the cluster's seed nodes.
///
/// The connecting constructors check that Redis answers and load the scripts requests run, so a
/// misconfigured URL fails at start-up rather than on the first request.
///
/// # Records
///
/// One string value per record, named `idem:v2:{<64 hex digits>}`: the hex digits are the
/// [`RecordKey`] (SHA-256 of the scope and the client's key), so no client byte ever reaches a key
/// name, and the braces make them the Redis Cluster hash tag, so records spread over every slot.
/// The value is a fixed 81-byte header (`scripts::layout`), then, for a completed record, the
/// [encoded](crate::record::RecordedResult::encode) response:
///
/// | bytes | field |
/// |---|---|
/// | 0 | state: `i` in flight, `r` released (in flight, the lease ended), `c` completed |
/// | 1–32 | the request's fingerprint (SHA-256, raw) |
/// | 33–48 | the owner: the token of the attempt that holds (or completed) the record, raw |
/// | 49–64 | the epoch, 16 decimal digits |
/// | 65–80 | the lease deadline in milliseconds on the Redis server's clock, 16 decimal digits (zeros once completed) |
/// | 81– | the encoded response (completed only) |
///
/// One value rather than a hash keeps every transition to two or three commands inside its
/// script (`GET`, then `SET` with the expiry, plus `TIME` where a lease is compared or set).
///
/// An in-flight record lives for the route's ttl (at least its lease), so that a takeover still
/// sees its epoch and fingerprint; a completed record expires the route's ttl after completion.
///
/// To look at one key, use the runtime's [`Operator`](crate::operator::Operator) (by the key as
/// the client sent it and its scope): it reads the layout above through a script (plus `PTTL` for
/// the time left and `TIME` for the lease left), reports no creation time (the layout has none),
/// purges with `DEL` inside a script that leaves in-flight records alone, and releases a stuck
/// key only if its owner and lease deadline are still the ones inspected. By hand,
/// `PTTL idem:v2:{…}` shows how long a record has left and `DEL` purges one unconditionally
/// (with a [`TieredStore`](super::TieredStore) in front, instances may replay a purged record
/// from memory for up to [`TieredConfig::max_entry_ttl`](super::TieredConfig::max_entry_ttl)
/// longer).
///
/// # Timeouts and failures
///
/// Every transition has one budget, [`RedisConfig::response_timeout`] (default 1 s), covering
/// reconnecting if needed, reloading a missing script and the command itself; past it the
/// transition fails with [`StoreError::Timeout`]. The runtime answers `503 store-unavailable`
/// (or runs the handler unprotected when configured to fail open).
///
/// While Redis is down, transitions fail fast rather than waiting out the budget: a refused
/// connection is [`StoreError::Unavailable`] at once. The connection reconnects by itself: each
/// failure starts a new connection attempt (at most one at a time, shared by concurrent
/// requests), so the first request after Redis comes back succeeds, with the same store and
/// without restarting the service. A transition whose connection broke under it (Redis restarted
/// since the last command) is sent once more on the new connection, within the same budget.
///
/// That resend, like any command that timed out, may run a script twice. Every script is safe to
/// run again with the same owner token: acquiring twice returns the same epoch, completing twice
/// reports success, renewing or releasing twice changes nothing more.
///
/// # Redis settings
///
/// * **`maxmemory-policy noeviction`.** With an evicting policy (`allkeys-lru`, …) Redis may
///   silently drop an in-flight or completed record under memory pressure, and a retry then runs
///   the handler again. With `noeviction`, writes fail instead (`OOM`) and requests get `503`,
///   which keeps the guarantee. Size memory for `requests per ttl × (response size + ~200
///   bytes)`. The `volatile-*` policies also evict these records (they all have a ttl).
/// * **Persistence.** Without persistence, a Redis restart forgets every record: retries of requests
///   completed before the restart run again. `appendonly yes` with `appendfsync everysec` loses
///   at most about a second of records on a crash; RDB snapshots alone lose everything since
///   the last snapshot. Choose according to what a duplicate costs you.
/// * **A dedicated database or ACL user.** Keep records apart from other data (a separate
///   instance, a separate database number on standalone Redis, or at least an ACL user limited to
///   the key pattern and the commands the store and its scripts use):
///
///   ```text
///   ACL SETUSER idem on >secret resetkeys ~idem:* resetchannels -@all +evalsha +script|load
///       +get +set +pttl +time +ping
///   ```
///
///   and connect as `redis://idem:secret@host:6379/`. The operator's purge
///   ([`Operator::purge`](crate::operator::Operator::purge)) also needs `+del`: add it to this
///   user, or give operators a user of their own. On Redis 7.2 and later also allow
///   `+client|setinfo` (the client announces its name when it connects); a cluster client also
///   needs `+cluster|slots` (its topology queries). Two services that share a database share the key
///   space: a client reusing a key across them would get `422` from the second.
/// * **Version.** Redis 6.2 or later (7.x is tested); scripts use `TIME` before writing, which
///   needs script effects replication (the default since 5.0, the only mode since 7.0).
///
/// # Failover
///
/// Redis replication is asynchronous. When a primary fails and a replica is promoted (Sentinel,
/// Cluster, a managed service), writes acknowledged just before the failure may be lost: a record
/// acquired or completed in that window is gone from the new primary, so a retry may run the
/// handler again (the epoch restarts at 1, so fence side effects with the key itself, not only the
/// epoch, if that matters). During the failover requests get `503` until the new primary answers.
/// `WAIT`-style synchronous replication is not used: it would not make failover lossless either.
///
/// # Guarantee
///
/// Within the retention window, for one scoped key: a different payload never runs; while the
/// first attempt holds its lease, duplicates never run beside it; once the response is recorded,
/// duplicates get it and never run. A crash or a pause longer than the lease before the response
/// is recorded, or Redis losing data (see above), can let a retry run again; the epoch lets the
/// handler fence that.
pub struct RedisStore<C = ConnectionManager> {
    connection: C,
    config: RedisConfig,
}

/// How a [`RedisStore`] connects and how long it waits. Every setter states its default.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::store::RedisConfig;
///
/// let config = RedisConfig::new()
///     .connect_timeout(Duration::from_millis(500))
///     .response_timeout(Duration::from_millis(250));
/// # drop(config);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct RedisConfig {
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl RedisConfig {
    /// Default for [`RedisConfig::connect_timeout`]: 1 second.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default for [`RedisConfig::response_timeout`]: 1 second.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

    /// The defaults.
    pub const fn new() -> Self {
        Self {
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
        }
    }

    /// How long one attempt to open a connection may take. Default: 1 s.
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The whole budget of one transition (acquire, renew, complete or release): waiting for a
    /// connection, reloading a script Redis forgot, sending the command and reading the answer.
    /// Past it the transition fails with [`StoreError::Timeout`] (a `503` for an acquire). Keep it
    /// well below the lease. Default: 1 s.
    pub const fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The configured connect timeout.
    pub const fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The configured response timeout.
    pub const fn get_response_timeout(&self) -> Duration {
        self.response_timeout
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            // No retry loop inside a reconnection: while Redis is down a transition fails at once
            // instead of waiting out its budget, and the next one tries again.
            .set_number_of_retries(0)
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisStore {
    /// Connects to the standalone Redis at `url` (e.g. `redis://127.0.0.1:6379/0`) through a
    /// [`ConnectionManager`] that reconnects by itself, checks that Redis answers and loads the
    /// scripts.
    pub async fn connect(
        url: impl IntoConnectionInfo,
        config: RedisConfig,
    ) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|error| map_error(&error))?;
        Self::from_client(client, config).await
    }

    /// Like [`RedisStore::connect`], from an existing client.
    pub async fn from_client(client: Client, config: RedisConfig) -> Result<Self, StoreError> {
        let connect = ConnectionManager::new_with_config(client, config.manager_config());
        let connection =
            within(config.connect_timeout.max(config.response_timeout), connect).await?;
        let store = Self::from_connection(connection, config);
        store.load_scripts().await?;
        Ok(store)
    }

    /// The Redis key name of a record: `idem:v2:{<64 hex digits of the record key>}`. For
    /// operators and tests (`PTTL`, `DEL`, `GET`).
    pub fn key_name(key: &RecordKey) -> String {
        key_name(key)
    }
}

#[cfg(feature = "redis-cluster")]
impl RedisStore<::redis::cluster_async::ClusterConnection> {
    /// Connects to a Redis Cluster through any of its `nodes` (e.g.
    /// `["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]`), checks that it answers and loads
    /// the scripts on every primary. The cluster connection follows slot migrations and failovers
    /// and reconnects by itself.
    ///
    /// Records are single-key, hash-tagged by their own digest, so they spread evenly over the
    /// slots; when a primary is down, only the records in its slots fail (`503`).
    pub async fn connect_cluster<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
        config: RedisConfig,
    ) -> Result<Self, StoreError> {
        let client = ::redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.response_timeout)
            .build()
            .map_err(|error| map_error(&error))?;
        let connect = client.get_async_connection();
        let connection =
            within(config.connect_timeout.max(config.response_timeout), connect).await?;
        let store = Self::from_connection(connection, config);
        store.load_scripts().await?;
        Ok(store)
    }
}

/// A [`RedisStore`] over Redis Cluster (feature `redis-cluster`); build one with
/// [`RedisStore::connect_cluster`].
#[cfg(feature = "redis-cluster")]
pub type RedisClusterStore = RedisStore<::redis::cluster_async::ClusterConnection>;

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over an existing connection: a [`ConnectionManager`] (reconnects by itself), a
    /// cluster connection, or any other async connection that is cheap to clone (each transition
    /// clones it). The connection's own timeouts stay as configured; `config`'s response timeout
    /// bounds every transition on top of them (a [`ConnectionManager`] built with its default
    /// reconnection retries makes transitions wait while Redis is down, up to that budget;
    /// [`RedisStore::connect`] configures none, so they fail at once). Scripts are loaded on
    /// first use; call [`RedisStore::load_scripts`] to load them now.
    pub fn from_connection(connection: C, config: RedisConfig) -> Self {
        Self { connection, config }
    }

    /// Loads the four scripts requests run into Redis (on every primary of a cluster), so the
    /// first requests do not pay a `NOSCRIPT` round trip. The operator's three scripts (inspect,
    /// purge, release a stale lease), and any script Redis forgets later, are loaded on demand.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let load = async move {
            for script in SCRIPTS.for_requests() {
                script.prepare_invoke().load_async(&mut connection).await?;
            }
            Ok(())
        };
        within(self.config.response_timeout, load).await
    }

    /// The connection the store uses.
    pub fn connection(&self) -> &C {
        &self.connection
    }

    /// The store's configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Runs one script call within the response budget, sending it once more if the connection
    /// broke under it (the scripts are safe to run twice).
    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut connection = self.connection.clone();
        let call = async move {
            match invocation.invoke_async(&mut connection).await {
                Err(error)
                    if !error.is_timeout()
                        && (error.is_connection_dropped() || error.is_io_error()) =>
                {
                    invocation.invoke_async(&mut connection).await
                }
                reply => reply,
            }
        };
        within(self.config.response_timeout, call).await
    }
}

impl<C: Clone> Clone for RedisStore<C> {
    fn clone(&self) -> Self {
        Self {
            connection: self.connection.clone(),
            config: self.config,
        }
    }
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("connection", &std::any::type_name::<C>())
            .field("config", &self.config)
            .finish()
    }
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        StoreFuture::new(async move {
            let in_flight_ttl = request.retention.max(request.lease);
            let mut invocation = SCRIPTS.acquire.key(key_name(request.key));
            invocation
                .arg(&request.fingerprint.0[..])
                .arg(&request.owner.to_bytes()[..])
                .arg(millis(request.lease))
                .arg(millis(in_flight_ttl));
            parse_acquired(self.invoke(&invocation).await?)
        })
    }

    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async move {
            let mut invocation = SCRIPTS.renew.key(key_name(request.key));
            invocation
                .arg(&request.owner.to_bytes()[..])
                .arg(millis(request.lease));
            parse_flag(&self.invoke(&invocation).await?)
        })
    }

    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async move {
            let mut invocation = SCRIPTS.complete.key(key_name(request.key));
            invocation
                .arg(&request.owner.to_bytes()[..])
                .arg(request.result.encode().as_ref())
                .arg(millis(request.ttl));
            parse_flag(&self.invoke(&invocation).await?)
        })
    }

    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        StoreFuture::new(async move {
            let mut invocation = SCRIPTS.release.key(key_name(request.key));
            invocation.arg(&request.owner.to_bytes()[..]);
            parse_flag(&self.invoke(&invocation).await?).map(drop)
        })
    }

    fn inspect<'a>(
        &'a self,
        request: InspectRequest<'a>,
    ) -> StoreFuture<'a, Option<RecordSnapshot>> {
        StoreFuture::new(async move {
            let invocation = SCRIPTS.inspect.key(key_name(request.key));
            parse_snapshot(self.invoke(&invocation).await?)
        })
    }

    fn purge<'a>(&'a self, request: PurgeRequest<'a>) -> StoreFuture<'a, Purged> {
        StoreFuture::new(async move {
            let invocation = SCRIPTS.purge.key(key_name(request.key));
            parse_purged(&self.invoke(&invocation).await?)
        })
    }

    fn release_stale<'a>(&'a self, request: ReleaseStaleRequest<'a>) -> StoreFuture<'a, bool> {
        StoreFuture::new(async move {
            let mut invocation = SCRIPTS.release_stale.key(key_name(request.key));
            invocation
                .arg(&request.owner.to_bytes()[..])
                .arg(request.lease_deadline.0);
            parse_flag(&self.invoke(&invocation).await?)
        })
    }
}

fn key_name(key: &RecordKey) -> String {
    format!("{KEY_PREFIX}{{{}}}", key.to_hex())
}

/// Whole milliseconds, at least 1 (Redis deletes a key given a zero expiry) and at most
/// [`MAX_MILLIS`].
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_MILLIS)
}

/// Runs a Redis call within `budget`, mapping its errors.
async fn within<T>(
    budget: Duration,
    call: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(budget, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(map_error(&error)),
        Err(_) => Err(StoreError::Timeout),
    }
}

fn map_error(error: &RedisError) -> StoreError {
    if error.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Unavailable(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_fixed_length_and_hash_tagged() {
        let key = RecordKey([0xab; 32]);
        let name = key_name(&key);
        assert_eq!(name, format!("idem:v2:{{{}}}", "ab".repeat(32)));
        assert_eq!(name.len(), KEY_PREFIX.len() + 2 + 64);
    }

    #[test]
    fn arguments() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }
}
