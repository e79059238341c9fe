//! The record store: the idempotency state machine behind one trait.
//!
//! A record moves through the states below, and only through the transitions of [`Store`]:
//!
//! ```text
//!              acquire (absent)                 complete (owner)
//!   absent ───────────────────────▶ in-flight ───────────────────▶ completed ──▶ expires after ttl
//!     ▲                              │  ▲  │                            │
//!     │      renew (owner): extend   │  │  │ release (owner), or        │
//!     │                              ▼  │  ▼ release_stale (operator)   │
//!     │                  lease expired or released: the next acquire    │
//!     │                  takes over with epoch + 1                      │
//!     │                                                                 │
//!     └──────── purge (operator): a completed or released record ───────┘
//! ```
//!
//! * **acquire**(owner, fingerprint): absent → in-flight with epoch 1; a different fingerprint →
//!   [`Acquired::Mismatch`]; completed → [`Acquired::Completed`] with the recorded result; a live
//!   lease of another owner → [`Acquired::InFlight`]; the same owner → [`Acquired::Execute`] again
//!   (a retried command converges); an expired or released lease → taken over with epoch + 1.
//! * **renew**(owner): extends the lease if the caller still owns it.
//! * **complete**(owner, result): records the result if the caller still owns the record; repeating
//!   it is harmless.
//! * **release**(owner): ends the lease now without deleting the record, so epochs stay monotonic.
//!
//! Three more serve an operator looking at one key ([`crate::operator`]), never a request:
//!
//! * **inspect**: reads the record ([`RecordSnapshot`]) and changes nothing.
//! * **`release_stale`**(owner, lease deadline): the release above, on behalf of an owner known to
//!   be dead, and only if the record is still in flight under that owner **and** that lease
//!   deadline, both as inspected. A live owner renews its lease every third of it, which moves
//!   the deadline: an operator who inspects, gives the owner that long, and releases with what
//!   they inspected never takes the key from a live owner (the release is refused and the owner
//!   completes as usual). Like release it keeps the epoch: the next acquire gets epoch + 1.
//! * **purge**: deletes a settled record (completed or released) so that the key runs again as
//!   new, with epoch 1 (a purge forgets the epoch with the rest). An in-flight record is never
//!   purged ([`Purged::InFlight`]): deleting it would let a duplicate run beside a live owner, or
//!   reuse the epoch of a stalled one; release it first.
//!
//! The three have default bodies answering [`StoreError::Unsupported`], so a store written before
//! them still compiles; each backend of this crate implements them.
//!
//! Every transition must be atomic and safe to run twice, because a command that timed out may still
//! have executed. Beside the transitions, [`Store::cached`] answers from process memory, without
//! waiting, for records a store holds **completed** there ([`Cached`]).
//!
//! Each backend keeps its transitions in one file: [`MemoryStore`] (embedded, one instance),
//! `RedisStore` (feature `redis`, shared by a fleet) and [`TieredStore`] (completed records in
//! process memory in front of another store).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope};
//! use idem_runtime::key::IdempotencyKey;
//! use idem_runtime::store::{AcquireRequest, Acquired, MemoryStore, OwnerToken, Store};
//!
//! let store = MemoryStore::new(1 << 20);
//! let key = RecordKey::new(&Scope::NONE, &IdempotencyKey::parse_bytes(b"k").unwrap());
//! let fingerprint = Fingerprint::of(&http::Method::POST, "/", "/", "", b"");
//! let (lease, retention) = (Duration::from_secs(30), Duration::from_secs(3600));
//! let (first, second) = (OwnerToken::generate(), OwnerToken::generate());
//! let acquire = |owner| AcquireRequest::new(&key, owner, &fingerprint, lease, retention);
//! assert!(matches!(store.acquire(acquire(first)).await?, Acquired::Execute { epoch: 1 }));
//! assert!(matches!(store.acquire(acquire(second)).await?, Acquired::InFlight { .. }));
//! # Ok::<(), idem_runtime::store::StoreError>(())
//! # }).unwrap();
//! ```

mod cache;
mod memory;
mod owner;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod tiered;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

#[cfg(feature = "postgres")]
pub use self::postgres::{PostgresConfig, PostgresStore, TransactionalClaim};
#[cfg(feature = "redis-cluster")]
pub use self::redis::RedisClusterStore;
#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisStore};
pub use memory::MemoryStore;
pub use owner::OwnerToken;
pub use tiered::{TieredConfig, TieredStats, TieredStore};

use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;

/// The idempotency state machine. See the [module docs](self) for the transitions.
///
/// Each transition takes one request struct and returns a [`StoreFuture`]. Implementations must
/// make each transition atomic and idempotent for the same owner. The trait is object safe, so a
/// runtime holds any store as `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    /// Tries to take ownership of the record for `request.owner`.
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired>;

    /// Extends the lease; `Ok(false)` when `request.owner` no longer owns the record.
    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool>;

    /// Records the result and keeps it for `request.ttl`; `Ok(false)` when `request.owner` no
    /// longer owns the record (the result is then discarded).
    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool>;

    /// Ends `request.owner`'s lease now, keeping the record (and its epoch) so the next acquire
    /// takes over.
    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()>;

    /// Answers from process memory, without waiting, for a record this store holds **completed**
    /// there. `None` (the default) in every other case, and then [`acquire`](Store::acquire)
    /// decides.
    ///
    /// The executor asks this before anything else, so a replay from memory skips the handler's
    /// extractor (no parsing of the body) and the acquire; when it misses, the executor's acquire
    /// says so ([`AcquireRequest::memory_checked`]) so the store does not look again. Completed
    /// records never change until they expire, so answering from a copy is safe; a store must
    /// never answer for a record that is in flight or released.
    fn cached(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Cached> {
        let _ = (key, fingerprint);
        None
    }

    /// Reads the record as it is now, for an operator: `Ok(None)` when there is none (never
    /// written, expired or purged). Changes nothing, and asks the store's authority (a cache in
    /// front never answers it).
    ///
    /// The default answers [`StoreError::Unsupported`].
    fn inspect<'a>(
        &'a self,
        request: InspectRequest<'a>,
    ) -> StoreFuture<'a, Option<RecordSnapshot>> {
        let _ = request;
        StoreFuture::ready(Err(StoreError::Unsupported("inspect")))
    }

    /// Deletes a completed or released record, for an operator, so that the key runs again as
    /// new (epoch 1). An in-flight record is left alone ([`Purged::InFlight`]), whatever its lease:
    /// release it first ([`Store::release_stale`]). A store with copies in process memory drops
    /// its own copy too.
    ///
    /// The default answers [`StoreError::Unsupported`].
    fn purge<'a>(&'a self, request: PurgeRequest<'a>) -> StoreFuture<'a, Purged> {
        let _ = request;
        StoreFuture::ready(Err(StoreError::Unsupported("purge")))
    }

    /// Releases an in-flight record for an operator who knows its owner is dead, as
    /// [`release`](Store::release) would for `request.owner`, but only if the record is still in
    /// flight under that owner **and** its lease still ends at `request.lease_deadline` (both as
    /// [`inspect`](Store::inspect) reported them). `Ok(true)`: the record is released from that
    /// owner (by this call, by a repeat of it, or by the owner's own release), and the next
    /// acquire takes over with epoch + 1. `Ok(false)`: refused, because the owner renewed since
    /// (it is alive), another attempt took over, or the record completed, expired or was purged.
    ///
    /// The default answers [`StoreError::Unsupported`].
    fn release_stale<'a>(&'a self, request: ReleaseStaleRequest<'a>) -> StoreFuture<'a, bool> {
        let _ = request;
        StoreFuture::ready(Err(StoreError::Unsupported("release_stale")))
    }
}

/// A claim made inside a transaction the handler writes through, so that the claim, the handler's
/// writes and the recorded response commit together or not at all (PostgreSQL's transactional
/// mode). A store that offers it gives the handler an extractor that puts a [`TransactionHandle`]
/// in the request; the executor then claims, records and commits through the handle instead of the
/// store's own transitions.
///
/// Unlike a lease, an open transaction needs no renewal: it holds the record until it commits or
/// rolls back, and a crashed instance's transaction rolls back by itself, freeing the key at once.
pub trait Transactional: Send + Sync + 'static {
    /// Opens the transaction (if the handler has not already) and claims the record in it, with
    /// [`Store::acquire`]'s answers. A claim that does not answer `Execute` leaves no
    /// transaction open.
    fn claim<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired>;

    /// Records `record` (when given) in the transaction and commits it: `Ok(true)` committed,
    /// `Ok(false)` the record is no longer the caller's (rolled back). Without a transaction (the
    /// handler never asked for one) it is `Ok(true)` and does nothing.
    fn commit<'a>(&'a self, record: Option<CompleteRequest<'a>>) -> StoreFuture<'a, bool>;

    /// Rolls the transaction back, if one is open: the handler's writes and the claim vanish.
    fn rollback(&self) -> StoreFuture<'_, ()>;
}

/// The [`Transactional`] claim of one request, as a store's extractor leaves it in the request's
/// extensions for the executor.
#[derive(Clone)]
pub struct TransactionHandle(pub Arc<dyn Transactional>);

impl std::fmt::Debug for TransactionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransactionHandle")
    }
}

/// The arguments of [`Store::acquire`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AcquireRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The attempt that wants to run the handler.
    pub owner: OwnerToken,
    /// The request's fingerprint, compared with the record's.
    pub fingerprint: &'a Fingerprint,
    /// How long the in-flight lease lasts unless renewed.
    pub lease: Duration,
    /// How long an in-flight record is kept at most (the route's ttl): long enough that a later
    /// takeover still sees the epoch and the fingerprint.
    pub retention: Duration,
    /// The caller asked [`Store::cached`] for this record just before and got no answer, so a store
    /// with a memory tier goes straight to its authority instead of looking again. `false` from
    /// [`AcquireRequest::new`].
    pub memory_checked: bool,
}

impl<'a> AcquireRequest<'a> {
    /// An acquire of `key` for `owner`, not preceded by [`Store::cached`].
    pub fn new(
        key: &'a RecordKey,
        owner: OwnerToken,
        fingerprint: &'a Fingerprint,
        lease: Duration,
        retention: Duration,
    ) -> Self {
        Self {
            key,
            owner,
            fingerprint,
            lease,
            retention,
            memory_checked: false,
        }
    }

    /// Marks the request as following a [`Store::cached`] that had no answer.
    #[must_use]
    pub fn after_memory_miss(mut self) -> Self {
        self.memory_checked = true;
        self
    }
}

/// The arguments of [`Store::renew`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RenewRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The attempt running the handler.
    pub owner: OwnerToken,
    /// The new lease, from now.
    pub lease: Duration,
}

impl<'a> RenewRequest<'a> {
    /// A renewal of `owner`'s lease on `key` for `lease` from now.
    pub fn new(key: &'a RecordKey, owner: OwnerToken, lease: Duration) -> Self {
        Self { key, owner, lease }
    }
}

/// The arguments of [`Store::complete`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CompleteRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The attempt that ran the handler.
    pub owner: OwnerToken,
    /// The fingerprint the attempt acquired the record with (a store that caches completed
    /// records needs it; the record itself already holds it).
    pub fingerprint: &'a Fingerprint,
    /// What to replay.
    pub result: &'a Arc<RecordedResult>,
    /// How long the completed record is kept (the route's ttl).
    pub ttl: Duration,
}

impl<'a> CompleteRequest<'a> {
    /// A completion of `key` by `owner`, keeping `result` for `ttl`.
    pub fn new(
        key: &'a RecordKey,
        owner: OwnerToken,
        fingerprint: &'a Fingerprint,
        result: &'a Arc<RecordedResult>,
        ttl: Duration,
    ) -> Self {
        Self {
            key,
            owner,
            fingerprint,
            result,
            ttl,
        }
    }
}

/// The arguments of [`Store::release`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ReleaseRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The attempt giving the record up.
    pub owner: OwnerToken,
}

impl<'a> ReleaseRequest<'a> {
    /// A release of `key` by `owner`.
    pub fn new(key: &'a RecordKey, owner: OwnerToken) -> Self {
        Self { key, owner }
    }
}

/// The arguments of [`Store::inspect`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct InspectRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
}

impl<'a> InspectRequest<'a> {
    /// An inspection of `key`.
    pub fn new(key: &'a RecordKey) -> Self {
        Self { key }
    }
}

/// The arguments of [`Store::purge`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PurgeRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
}

impl<'a> PurgeRequest<'a> {
    /// A purge of `key`.
    pub fn new(key: &'a RecordKey) -> Self {
        Self { key }
    }
}

/// The arguments of [`Store::release_stale`]: the owner and lease deadline an operator inspected.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ReleaseStaleRequest<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The owner the inspection saw holding the lease.
    pub owner: OwnerToken,
    /// The lease deadline the inspection saw.
    pub lease_deadline: LeaseDeadline,
}

impl<'a> ReleaseStaleRequest<'a> {
    /// A release of `key` from `owner`, if its lease still ends at `lease_deadline`.
    pub fn new(key: &'a RecordKey, owner: OwnerToken, lease_deadline: LeaseDeadline) -> Self {
        Self {
            key,
            owner,
            lease_deadline,
        }
    }
}

/// The answer of [`Store::acquire`].
#[derive(Debug, Clone)]
pub enum Acquired {
    /// The caller owns the record and runs the handler. `epoch` counts the attempts that have
    /// owned this record (1 for the first); it is the fencing number handlers can use.
    Execute {
        /// The attempt number.
        epoch: u64,
    },
    /// The record is completed: replay this result.
    Completed {
        /// The recorded result.
        result: Arc<RecordedResult>,
        /// How long the record still lives.
        ttl_left: Duration,
    },
    /// The key was first used with a different fingerprint.
    Mismatch,
    /// Another attempt holds a live lease.
    InFlight {
        /// Time left on that lease.
        lease_left: Duration,
    },
}

/// The answer of [`Store::cached`]: what process memory can say about a **completed** record.
#[derive(Debug, Clone)]
pub enum Cached {
    /// The same request: replay this result.
    Completed {
        /// The recorded result.
        result: Arc<RecordedResult>,
        /// How long the record still lives.
        ttl_left: Duration,
    },
    /// The key was first used with a different fingerprint.
    Mismatch,
}

/// What [`Store::inspect`] reports about one record.
///
/// What each backend knows:
///
/// | field | [`MemoryStore`] | `RedisStore` |
/// |---|---|---|
/// | `state`, `fingerprint`, `epoch` | yes | yes |
/// | `owner` | yes | yes |
/// | `lease` (in flight) | deadline in microseconds of the process's monotonic clock | deadline in milliseconds of the Redis server's clock (Unix time) |
/// | `ttl_left` | yes | yes (`PTTL`; `None` if an operator removed the expiry) |
/// | `created_at` | `None`: not kept | `None`: not in the record layout |
///
/// A [`TieredStore`] reports what its inner store does.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::fingerprint::Fingerprint;
/// use idem_runtime::store::{LeaseDeadline, LeaseSnapshot, OwnerToken, RecordSnapshot, RecordState};
///
/// // A store of your own builds its snapshots like this.
/// let fingerprint = Fingerprint::of(&http::Method::POST, "/", "/", "", b"");
/// let lease = LeaseSnapshot::new(LeaseDeadline(1_700_000_030_000), Duration::from_secs(12));
/// let snapshot = RecordSnapshot::new(RecordState::InFlight { lease }, fingerprint, 1)
///     .with_owner(OwnerToken::generate())
///     .with_ttl_left(Duration::from_secs(3600));
/// assert_eq!(snapshot.lease(), Some(&lease));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RecordSnapshot {
    /// In flight, released or completed, with what each state holds.
    pub state: RecordState,
    /// The fingerprint of the request that first used the key.
    pub fingerprint: Fingerprint,
    /// The attempt that holds (or last held) the record: 1 for the first.
    pub epoch: u64,
    /// That attempt's owner token, where the store keeps it.
    pub owner: Option<OwnerToken>,
    /// How long until the record is forgotten; `None` when it has no expiry.
    pub ttl_left: Option<Duration>,
    /// When the key was first used, where the store keeps it.
    pub created_at: Option<SystemTime>,
}

impl RecordSnapshot {
    /// A snapshot with no owner, expiry or creation time.
    pub fn new(state: RecordState, fingerprint: Fingerprint, epoch: u64) -> Self {
        Self {
            state,
            fingerprint,
            epoch,
            owner: None,
            ttl_left: None,
            created_at: None,
        }
    }

    /// Sets [`RecordSnapshot::owner`].
    #[must_use]
    pub fn with_owner(mut self, owner: OwnerToken) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Sets [`RecordSnapshot::ttl_left`].
    #[must_use]
    pub fn with_ttl_left(mut self, ttl_left: Duration) -> Self {
        self.ttl_left = Some(ttl_left);
        self
    }

    /// Sets [`RecordSnapshot::created_at`].
    #[must_use]
    pub fn with_created_at(mut self, created_at: SystemTime) -> Self {
        self.created_at = Some(created_at);
        self
    }

    /// The lease of an in-flight record.
    pub fn lease(&self) -> Option<&LeaseSnapshot> {
        match &self.state {
            RecordState::InFlight { lease } => Some(lease),
            _ => None,
        }
    }

    /// The result of a completed record.
    pub fn result(&self) -> Option<&Arc<RecordedResult>> {
        match &self.state {
            RecordState::Completed { result } => Some(result),
            _ => None,
        }
    }
}

/// The state of an inspected record.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RecordState {
    /// An attempt owns the record. Its lease may have run out (`lease.left` is zero): the owner
    /// stopped renewing, and the next acquire takes over.
    InFlight {
        /// The lease.
        lease: LeaseSnapshot,
    },
    /// The owner gave the record up (its handler failed, or an operator released it): the next
    /// acquire takes over with the next epoch.
    Released,
    /// The result is recorded and replayed.
    Completed {
        /// What is replayed (or [`RecordedResult::TooLarge`], the marker of a response too large
        /// to record).
        result: Arc<RecordedResult>,
    },
}

/// The lease of an in-flight record as [`Store::inspect`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseSnapshot {
    /// When the lease ends, as the store keeps it: what [`Store::release_stale`] compares.
    pub deadline: LeaseDeadline,
    /// How long the lease had left when inspected; zero once it ran out.
    pub left: Duration,
}

impl LeaseSnapshot {
    /// A lease ending at `deadline`, `left` from now.
    pub fn new(deadline: LeaseDeadline, left: Duration) -> Self {
        Self { deadline, left }
    }
}

/// When a lease ends, in the store's own clock and unit: milliseconds of the Redis server's clock
/// (Unix time) for `RedisStore`, microseconds of the process's monotonic clock since the store
/// was created for [`MemoryStore`]. Compare it, do not read a date into it: every renewal moves
/// it, which is how [`Store::release_stale`] tells a live owner from a dead one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LeaseDeadline(pub u64);

/// The answer of [`Store::purge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purged {
    /// The record was deleted: the key runs again as new.
    Deleted,
    /// There was no record (or a repeated purge already deleted it).
    Absent,
    /// The record is in flight and was left alone: release it first.
    InFlight,
}

impl From<Cached> for Acquired {
    fn from(cached: Cached) -> Self {
        match cached {
            Cached::Completed { result, ttl_left } => Self::Completed { result, ttl_left },
            Cached::Mismatch => Self::Mismatch,
        }
    }
}

/// A store operation failed. The request is answered `503 store-unavailable` (fail closed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within its time budget.
    #[error("the idempotency store timed out")]
    Timeout,
    /// The store could not be reached or refused the command.
    #[error("the idempotency store is unavailable: {0}")]
    Unavailable(String),
    /// The store returned a value that is not a valid record.
    #[error(transparent)]
    Corrupt(#[from] crate::record::DecodeError),
    /// The store does not implement this operation (an operator's operation on a store written
    /// before it existed).
    #[error("the idempotency store does not support `{0}`")]
    Unsupported(&'static str),
}

/// The future every [`Store`] transition returns: an answer known at once (an in-process store,
/// no allocation) or a boxed future (a store that waits for the network).
///
/// Like the standard library's futures, it panics if polled again after it completed.
#[must_use = "futures do nothing unless polled"]
pub struct StoreFuture<'a, T>(Answer<'a, T>);

enum Answer<'a, T> {
    Ready(Option<Result<T, StoreError>>),
    Waiting(Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>),
}

impl<'a, T> StoreFuture<'a, T> {
    /// An answer known now.
    pub fn ready(answer: Result<T, StoreError>) -> Self {
        Self(Answer::Ready(Some(answer)))
    }

    /// An answer `future` will give.
    pub fn new(future: impl Future<Output = Result<T, StoreError>> + Send + 'a) -> Self {
        Self(Answer::Waiting(Box::pin(future)))
    }
}

impl<T: Unpin> Future for StoreFuture<'_, T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Answer::Ready(answer) => Poll::Ready(
                answer
                    .take()
                    .expect("`StoreFuture` polled after completion"),
            ),
            Answer::Waiting(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for StoreFuture<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0 {
            Answer::Ready(Some(_)) => "ready",
            Answer::Ready(None) => "done",
            Answer::Waiting(_) => "waiting",
        };
        f.debug_tuple("StoreFuture").field(&state).finish()
    }
}

/// What the stores' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{AcquireRequest, Acquired, CompleteRequest, OwnerToken, Store};
    use crate::fingerprint::{Fingerprint, RecordKey, Scope};
    use crate::key::IdempotencyKey;
    use crate::record::RecordedResult;

    /// The record key of the unscoped client key `name`.
    pub(crate) fn key(name: &str) -> RecordKey {
        RecordKey::new(
            &Scope::NONE,
            &IdempotencyKey::parse_bytes(name.as_bytes()).unwrap(),
        )
    }

    /// The fingerprint of a `POST /` with `body`.
    pub(crate) fn print(body: &str) -> Fingerprint {
        Fingerprint::of(&http::Method::POST, "/", "/", "", body.as_bytes())
    }

    /// Acquires with a one-minute retention and unwraps the store's answer.
    pub(crate) async fn acquire(
        store: &impl Store,
        key: &RecordKey,
        owner: OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Acquired {
        let request = AcquireRequest::new(key, owner, fingerprint, lease, Duration::from_mins(1));
        store.acquire(request).await.unwrap()
    }

    /// Completes the record and unwraps the store's answer.
    pub(crate) async fn complete(
        store: &impl Store,
        key: &RecordKey,
        owner: OwnerToken,
        fingerprint: &Fingerprint,
        result: &Arc<RecordedResult>,
        ttl: Duration,
    ) -> bool {
        let request = CompleteRequest::new(key, owner, fingerprint, result, ttl);
        store.complete(request).await.unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_answer_needs_no_waiting() {
        let answer: StoreFuture<'_, u8> = StoreFuture::ready(Ok(7));
        assert_eq!(answer.await.unwrap(), 7);
        let waiting: StoreFuture<'_, u8> = StoreFuture::new(async { Err(StoreError::Timeout) });
        assert!(matches!(waiting.await, Err(StoreError::Timeout)));
    }

    #[test]
    #[should_panic(expected = "polled after completion")]
    fn polling_a_finished_answer_panics_like_std() {
        let mut answer: StoreFuture<'_, ()> = StoreFuture::ready(Ok(()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut answer).poll(&mut cx).is_ready());
        let _ = Pin::new(&mut answer).poll(&mut cx);
    }
}
