//! The embedded store: the state machine in process memory, for one instance.
//!
//! Records in flight and settled records live apart. An in-flight record is the only thing that
//! keeps a duplicate from running beside the first attempt, so it sits in a plain map that never
//! evicts (its size is bounded by the handlers running at once: each entry leaves when its owner
//! completes or releases it). Completed and released records sit in a [`moka`] cache bounded in
//! bytes, from which they may be evicted early; a replay is one lookup there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::{
    AcquireRequest, Acquired, CompleteRequest, KeyHasher, OwnerToken, Store, StoreError,
    StoreFuture, record_cache,
};
use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;

/// Shards of the in-flight map: requests on different keys rarely wait for the same lock.
const SHARDS: usize = 16;

/// The in-process store: the default when no other store is configured.
///
/// Completed records live in a [`moka`] cache bounded in bytes (the recorded responses plus a
/// fixed overhead per record) and expire on their own deadline, the route's ttl. When the bound
/// is reached the least recently used completed records are evicted early (never the newest,
/// which are the ones a retry is about to ask for), and an evicted key behaves as new; size the
/// bound for your traffic (`records per ttl × (average response size + 1 KiB)`).
/// Records in flight are never evicted. It serves one instance; a fleet needs a shared store.
///
/// ```
/// use idem_runtime::{Idempotency, store::MemoryStore};
///
/// let idem = Idempotency::builder().store(MemoryStore::new(256 << 20)).build();
/// # drop(idem);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shards: Arc<[Shard; SHARDS]>,
    settled: Cache<RecordKey, Settled, KeyHasher>,
}

/// The records in flight of one slice of the key space.
struct Shard {
    in_flight: Mutex<HashMap<RecordKey, InFlight, KeyHasher>>,
    /// Bumped, under the lock, after each record of this shard enters the settled cache: an
    /// acquire that saw the cache before taking the lock knows whether to look again.
    settled_writes: AtomicU64,
}

/// A record some attempt owns (or owned, until its lease is taken over).
struct InFlight {
    fingerprint: Fingerprint,
    epoch: u64,
    owner: OwnerToken,
    lease_until: Instant,
    /// When the record is forgotten even if its owner never returns (the route's ttl).
    expires_at: Instant,
}

/// A record nobody owns: completed, or released for a retry to take over.
#[derive(Clone)]
struct Settled {
    fingerprint: Fingerprint,
    epoch: u64,
    expires_at: Instant,
    /// `Some` for a completed record, with the owner that completed it (so that a repeated
    /// `complete` converges); `None` for a released one.
    completed: Option<(OwnerToken, Arc<RecordedResult>)>,
}

struct SettledExpiry;

impl moka::Expiry<RecordKey, Settled> for SettledExpiry {
    fn expire_after_create(
        &self,
        _: &RecordKey,
        record: &Settled,
        now: Instant,
    ) -> Option<Duration> {
        Some(record.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &RecordKey,
        record: &Settled,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(record.expires_at.saturating_duration_since(now))
    }
}

impl MemoryStore {
    /// The default bound: 64 MiB.
    pub const DEFAULT_CAPACITY_BYTES: u64 = 64 << 20;

    /// A store holding at most about `capacity_bytes` of settled records.
    pub fn new(capacity_bytes: u64) -> Self {
        let settled = record_cache(capacity_bytes, |record: &Settled| {
            record
                .completed
                .as_ref()
                .map_or(0, |(_, result)| result.weight())
        })
        .expire_after(SettledExpiry)
        .build_with_hasher(KeyHasher::builder());
        Self {
            shards: Arc::new(std::array::from_fn(|_| Shard {
                in_flight: Mutex::new(HashMap::with_hasher(KeyHasher::builder())),
                settled_writes: AtomicU64::new(0),
            })),
            settled,
        }
    }

    /// The number of records held, in flight or settled (approximate until the cache's pending
    /// maintenance has run).
    pub fn len(&self) -> u64 {
        self.settled.run_pending_tasks();
        let in_flight: usize = self
            .shards
            .iter()
            .map(|shard| lock(&shard.in_flight).len())
            .sum();
        self.settled.entry_count() + in_flight as u64
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes charged against the bound by settled records (approximate until pending
    /// maintenance has run).
    pub fn weighted_size(&self) -> u64 {
        self.settled.run_pending_tasks();
        self.settled.weighted_size()
    }

    /// The shard of `key`. Completing and releasing move a record from its in-flight map to the
    /// settled cache while holding the shard's lock, so an acquire holding it sees one or the
    /// other.
    fn shard(&self, key: &RecordKey) -> &Shard {
        &self.shards[usize::from(key.0[0]) % SHARDS]
    }

    /// The settled record of `key`, if it is still alive.
    fn settled(&self, key: &RecordKey, now: Instant) -> Option<Settled> {
        self.settled
            .get(key)
            .filter(|record| record.expires_at > now)
    }
}

/// No transition panics while holding a lock, and each leaves the map consistent at every step,
/// so a poisoned lock is still safe to use.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY_BYTES)
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("settled", &self.settled.entry_count())
            .field("weighted_size", &self.settled.weighted_size())
            .finish_non_exhaustive()
    }
}

/// The answer for a settled record: replay it, refuse a different request, or (released) let
/// the caller take it over.
fn settled_answer(record: &Settled, fingerprint: &Fingerprint, now: Instant) -> Option<Acquired> {
    if record.fingerprint != *fingerprint {
        return Some(Acquired::Mismatch);
    }
    record
        .completed
        .as_ref()
        .map(|(_, result)| Acquired::Completed {
            result: Arc::clone(result),
            ttl_left: record.expires_at.saturating_duration_since(now),
        })
}

impl MemoryStore {
    fn cached_now(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Acquired> {
        let now = Instant::now();
        let record = self.settled(key, now)?;
        // A released record is not an answer: the acquire takes it over.
        record.completed.as_ref()?;
        settled_answer(&record, fingerprint, now)
    }

    fn acquire_now(&self, request: &AcquireRequest<'_>) -> Acquired {
        let now = Instant::now();
        let shard = self.shard(request.key);
        let writes = shard.settled_writes.load(Ordering::Acquire);
        // A completed record never changes until it expires: replays need no lock.
        let seen = self.settled(request.key, now);
        if let Some(answer) = seen
            .as_ref()
            .and_then(|record| settled_answer(record, request.fingerprint, now))
        {
            return answer;
        }
        let mut in_flight = lock(&shard.in_flight);
        if let Some(record) = in_flight
            .get_mut(request.key)
            .filter(|record| record.expires_at > now)
        {
            if record.fingerprint != *request.fingerprint {
                return Acquired::Mismatch;
            }
            if record.owner != request.owner {
                if record.lease_until > now {
                    return Acquired::InFlight {
                        lease_left: record.lease_until - now,
                    };
                }
                // The owner stalled or died: take over with the next epoch.
                record.epoch += 1;
                record.owner = request.owner;
                record.lease_until = now + request.lease;
                record.expires_at = record.expires_at.max(now + request.lease);
            }
            return Acquired::Execute {
                epoch: record.epoch,
            };
        }
        // Not in flight: the settled cache decides. What was seen before the lock still holds
        // unless a record of this shard was settled since (a miss costs moka allocations).
        let settled = if shard.settled_writes.load(Ordering::Acquire) == writes {
            seen
        } else {
            self.settled(request.key, now)
        };
        if let Some(answer) = settled
            .as_ref()
            .and_then(|record| settled_answer(record, request.fingerprint, now))
        {
            return answer;
        }
        let (epoch, expires_at) = match settled {
            // Released: the next attempt, keeping the record's deadline.
            Some(released) => (
                released.epoch + 1,
                released.expires_at.max(now + request.lease),
            ),
            None => (1, now + request.retention.max(request.lease)),
        };
        in_flight.insert(
            *request.key,
            InFlight {
                fingerprint: *request.fingerprint,
                epoch,
                owner: request.owner,
                lease_until: now + request.lease,
                expires_at,
            },
        );
        Acquired::Execute { epoch }
    }

    fn renew_now(&self, key: &RecordKey, owner: OwnerToken, lease: Duration) -> bool {
        let now = Instant::now();
        let mut in_flight = lock(&self.shard(key).in_flight);
        match in_flight.get_mut(key) {
            Some(record) if record.owner == owner && record.expires_at > now => {
                record.lease_until = now + lease;
                record.expires_at = record.expires_at.max(record.lease_until);
                true
            }
            _ => false,
        }
    }

    fn complete_now(&self, request: &CompleteRequest<'_>) -> bool {
        let now = Instant::now();
        let shard = self.shard(request.key);
        let mut in_flight = lock(&shard.in_flight);
        match in_flight.get(request.key) {
            Some(record) if record.owner == request.owner => {
                let owned = record.expires_at > now;
                if owned {
                    let completed = Settled {
                        fingerprint: record.fingerprint,
                        epoch: record.epoch,
                        expires_at: now + request.ttl,
                        completed: Some((request.owner, Arc::clone(request.result))),
                    };
                    self.settled.insert(*request.key, completed);
                    shard.settled_writes.fetch_add(1, Ordering::Release);
                }
                // An expired record is forgotten either way, as it would have been by its ttl.
                in_flight.remove(request.key);
                owned
            }
            Some(_) => false,
            // Completing twice (a retried command) converges; a record completed by another
            // owner was not ours.
            None => self.settled(request.key, now).is_some_and(|record| {
                record
                    .completed
                    .is_some_and(|(completer, _)| completer == request.owner)
            }),
        }
    }

    fn release_now(&self, key: &RecordKey, owner: OwnerToken) {
        let now = Instant::now();
        let shard = self.shard(key);
        let mut in_flight = lock(&shard.in_flight);
        if in_flight
            .get(key)
            .is_some_and(|record| record.owner == owner)
            && let Some(record) = in_flight.remove(key)
            && record.expires_at > now
        {
            let released = Settled {
                fingerprint: record.fingerprint,
                epoch: record.epoch,
                expires_at: record.expires_at,
                completed: None,
            };
            self.settled.insert(*key, released);
            shard.settled_writes.fetch_add(1, Ordering::Release);
        }
    }
}

impl Store for MemoryStore {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        Box::pin(std::future::ready(Ok(self.acquire_now(&request))))
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        owner: OwnerToken,
        lease: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(self.renew_now(key, owner, lease))))
    }

    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(self.complete_now(&request))))
    }

    fn release<'a>(&'a self, key: &'a RecordKey, owner: OwnerToken) -> StoreFuture<'a, ()> {
        self.release_now(key, owner);
        Box::pin(std::future::ready(Ok::<(), StoreError>(())))
    }

    fn cached(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Acquired> {
        self.cached_now(key, fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordedResult;
    use crate::store::RECORD_OVERHEAD;
    use crate::store::testing::{complete, key, print};

    async fn acquire_with(
        store: &MemoryStore,
        key: &RecordKey,
        owner: OwnerToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Acquired {
        let request = AcquireRequest {
            key,
            owner,
            fingerprint,
            lease,
            retention: Duration::from_mins(1),
        };
        store.acquire(request).await.unwrap()
    }

    /// `cached` answers for completed records only: not for records in flight or released.
    #[tokio::test]
    async fn cached_answers_only_for_completed_records() {
        let store = MemoryStore::default();
        let (k, fp) = (key("k"), print("a"));
        let lease = Duration::from_secs(30);
        assert!(store.cached(&k, &fp).is_none(), "unknown");
        let owner = OwnerToken::generate();
        acquire_with(&store, &k, owner, &fp, lease).await;
        assert!(store.cached(&k, &fp).is_none(), "in flight");
        store.release(&k, owner).await.unwrap();
        assert!(store.cached(&k, &fp).is_none(), "released");
        assert!(store.cached(&k, &print("b")).is_none(), "released");

        let owner = OwnerToken::generate();
        acquire_with(&store, &k, owner, &fp, lease).await;
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(complete(&store, &k, owner, &fp, &result, Duration::from_secs(60)).await);
        match store.cached(&k, &fp) {
            Some(Acquired::Completed {
                result: cached,
                ttl_left,
            }) => {
                assert!(Arc::ptr_eq(&cached, &result));
                assert!(ttl_left <= Duration::from_secs(60));
            }
            other => panic!("expected the completed record, got {other:?}"),
        }
        assert!(matches!(
            store.cached(&k, &print("b")),
            Some(Acquired::Mismatch)
        ));
    }

    #[tokio::test]
    async fn the_state_machine() {
        let store = MemoryStore::default();
        let (k, fp) = (key("k"), print("a"));
        let lease = Duration::from_secs(30);
        let (first, second) = (OwnerToken::generate(), OwnerToken::generate());

        assert!(matches!(
            acquire_with(&store, &k, first, &fp, lease).await,
            Acquired::Execute { epoch: 1 }
        ));
        // The same owner again (a retried command) converges instead of conflicting with itself.
        assert!(matches!(
            acquire_with(&store, &k, first, &fp, lease).await,
            Acquired::Execute { epoch: 1 }
        ));
        assert!(
            matches!(acquire_with(&store, &k, second, &fp, lease).await, Acquired::InFlight { lease_left } if lease_left > Duration::from_secs(29))
        );
        assert!(matches!(
            acquire_with(&store, &k, second, &print("b"), lease).await,
            Acquired::Mismatch
        ));
        assert!(store.renew(&k, first, lease).await.unwrap());
        assert!(!store.renew(&k, second, lease).await.unwrap());

        let result = Arc::new(RecordedResult::TooLarge);
        assert!(!complete(&store, &k, second, &fp, &result, Duration::from_secs(60)).await);
        assert!(complete(&store, &k, first, &fp, &result, Duration::from_secs(60)).await);
        assert!(
            complete(&store, &k, first, &fp, &result, Duration::from_secs(60)).await,
            "repeatable"
        );
        match acquire_with(&store, &k, second, &fp, lease).await {
            Acquired::Completed {
                result: stored,
                ttl_left,
            } => {
                assert_eq!(*stored, RecordedResult::TooLarge);
                assert!(ttl_left <= Duration::from_secs(60) && ttl_left > Duration::from_secs(50));
            }
            other => panic!("expected completed, got {other:?}"),
        }
        assert!(matches!(
            acquire_with(&store, &k, second, &print("b"), lease).await,
            Acquired::Mismatch
        ));
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_with_a_new_epoch() {
        let store = MemoryStore::default();
        let (k, fp) = (key("k"), print("a"));
        let (first, second) = (OwnerToken::generate(), OwnerToken::generate());
        let short = Duration::from_millis(30);
        assert!(matches!(
            acquire_with(&store, &k, first, &fp, short).await,
            Acquired::Execute { epoch: 1 }
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(matches!(
            acquire_with(&store, &k, second, &fp, short).await,
            Acquired::Execute { epoch: 2 }
        ));
        // The lost owner can neither renew nor complete.
        assert!(!store.renew(&k, first, short).await.unwrap());
        assert!(
            !complete(
                &store,
                &k,
                first,
                &fp,
                &Arc::new(RecordedResult::TooLarge),
                short
            )
            .await
        );
    }

    #[tokio::test]
    async fn release_keeps_the_epoch() {
        let store = MemoryStore::default();
        let (k, fp) = (key("k"), print("a"));
        let lease = Duration::from_secs(30);
        let (first, second) = (OwnerToken::generate(), OwnerToken::generate());
        assert!(matches!(
            acquire_with(&store, &k, first, &fp, lease).await,
            Acquired::Execute { epoch: 1 }
        ));
        store.release(&k, first).await.unwrap();
        assert!(matches!(
            acquire_with(&store, &k, second, &fp, lease).await,
            Acquired::Execute { epoch: 2 }
        ));
        // A stale release by the first owner changes nothing.
        store.release(&k, first).await.unwrap();
        assert!(matches!(
            acquire_with(&store, &k, first, &fp, lease).await,
            Acquired::InFlight { .. }
        ));
    }

    #[tokio::test]
    async fn completed_records_expire_after_their_ttl() {
        let store = MemoryStore::default();
        let (k, fp) = (key("k"), print("a"));
        let owner = OwnerToken::generate();
        acquire_with(&store, &k, owner, &fp, Duration::from_secs(5)).await;
        complete(
            &store,
            &k,
            owner,
            &fp,
            &Arc::new(RecordedResult::TooLarge),
            Duration::from_millis(40),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        let next = OwnerToken::generate();
        assert!(matches!(
            acquire_with(&store, &k, next, &print("b"), Duration::from_secs(5)).await,
            Acquired::Execute { epoch: 1 }
        ));
    }

    /// A retry comes soon after its first attempt, so a full store must drop its oldest records, not
    /// refuse its newest: moka's default admission policy (`TinyLFU`) rejects a new record whose key
    /// was never seen before, which here would make a retry run the handler again.
    #[tokio::test]
    async fn a_full_store_keeps_its_newest_records() {
        // Room for about 100 records.
        let store = MemoryStore::new(100 * u64::from(RECORD_OVERHEAD + 64));
        let (fp, result) = (print("a"), Arc::new(RecordedResult::TooLarge));
        let keys: Vec<RecordKey> = (0..3000).map(|i| key(&format!("flood-{i}"))).collect();
        for k in &keys {
            let owner = OwnerToken::generate();
            acquire_with(&store, k, owner, &fp, Duration::from_secs(30)).await;
            assert!(complete(&store, k, owner, &fp, &result, Duration::from_mins(1)).await);
        }
        let held = store.len();
        assert!((50..=110).contains(&held), "held {held} records");
        for k in &keys[keys.len() - 40..] {
            assert!(
                matches!(
                    acquire_with(
                        &store,
                        k,
                        OwnerToken::generate(),
                        &fp,
                        Duration::from_secs(30)
                    )
                    .await,
                    Acquired::Completed { .. }
                ),
                "a recent record was dropped"
            );
        }
        // The oldest went first.
        assert!(matches!(
            acquire_with(
                &store,
                &keys[0],
                OwnerToken::generate(),
                &fp,
                Duration::from_secs(30)
            )
            .await,
            Acquired::Execute { epoch: 1 }
        ));
    }

    #[test]
    fn owner_tokens_are_unique() {
        let tokens: std::collections::HashSet<_> =
            (0..1000).map(|_| OwnerToken::generate()).collect();
        assert_eq!(tokens.len(), 1000);
    }

    #[test]
    fn an_acquire_racing_the_completion_never_runs_the_key_again() {
        use futures_util::FutureExt as _;

        let store = MemoryStore::default();
        let fp = print("a");
        let result = Arc::new(RecordedResult::TooLarge);
        let keys: Vec<RecordKey> = (0..2000).map(|i| key(&format!("race-{i}"))).collect();
        let lease = Duration::from_secs(30);
        let request = |key, owner| AcquireRequest {
            key,
            owner,
            fingerprint: &fp,
            lease,
            retention: Duration::from_mins(1),
        };
        for chunk in keys.chunks(100) {
            let owners: Vec<OwnerToken> = chunk.iter().map(|_| OwnerToken::generate()).collect();
            for (key, owner) in chunk.iter().zip(&owners) {
                let first = store.acquire(request(key, *owner)).now_or_never().unwrap();
                assert!(matches!(first, Ok(Acquired::Execute { epoch: 1 })));
            }
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    for (key, owner) in chunk.iter().zip(&owners) {
                        let done = CompleteRequest {
                            key,
                            owner: *owner,
                            fingerprint: &fp,
                            result: &result,
                            ttl: Duration::from_mins(1),
                        };
                        assert!(store.complete(done).now_or_never().unwrap().unwrap());
                    }
                });
                scope.spawn(|| {
                    for _ in 0..3 {
                        for key in chunk {
                            let duplicate = store
                                .acquire(request(key, OwnerToken::generate()))
                                .now_or_never()
                                .unwrap();
                            assert!(
                                matches!(
                                    duplicate,
                                    Ok(Acquired::InFlight { .. } | Acquired::Completed { .. })
                                ),
                                "{duplicate:?}"
                            );
                        }
                    }
                });
            });
        }
    }
}
