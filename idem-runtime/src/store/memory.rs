//! The embedded store: the state machine in process memory, for one instance.
//!
//! Records in flight and settled records live apart. An in-flight record is the only thing that
//! keeps a duplicate from running beside the first attempt, so it sits in a plain map that never
//! evicts (its size is bounded by the handlers running at once: each entry leaves when its owner
//! completes or releases it). Completed and released records sit in a [`RecordCache`] bounded in
//! bytes, from which they may be evicted early; a replay is one lookup there.
//!
//! The operator's transitions take the same shard lock as the others: an inspection sees a record
//! in one place or the other, and a stale release or a purge cannot interleave with an acquire,
//! renewal or completion of the same key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::cache::{Attempt, KeyHasher, RecordCache, Settled, SettledRecord};
use super::{
    AcquireRequest, Acquired, Cached, CompleteRequest, InspectRequest, LeaseDeadline,
    LeaseSnapshot, OwnerToken, PurgeRequest, Purged, RecordSnapshot, RecordState, ReleaseRequest,
    ReleaseStaleRequest, RenewRequest, Store, StoreFuture,
};
use crate::fingerprint::{Fingerprint, RecordKey};

/// Shards of the in-flight map: requests on different keys rarely wait for the same lock.
const SHARDS: usize = 16;

/// The in-process store: the default when no other store is configured.
///
/// Completed records are kept in memory bounded in bytes (the recorded responses plus a fixed
/// overhead per record) and expire on their own deadline, the route's ttl. When the bound is
/// reached the oldest completed records are evicted early (never the newest, which are the ones a
/// retry is about to ask for), and an evicted key behaves as new; size the bound for your traffic
/// (`records per ttl × (average response size + 1 KiB)`). Records in flight are never evicted. It
/// serves one instance; a fleet needs a shared store.
///
/// ```
/// use idem_runtime::{Idempotency, store::MemoryStore};
///
/// let idem = Idempotency::builder().store(MemoryStore::new(256 << 20)).build();
/// # drop(idem);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shards: Arc<[Mutex<InFlightMap>; SHARDS]>,
    settled: Arc<RecordCache>,
    /// The origin of the lease deadlines [`Store::inspect`] reports.
    origin: Instant,
}

/// The records in flight of one slice of the key space.
type InFlightMap = HashMap<RecordKey, InFlight, KeyHasher>;

/// A record some attempt owns (or owned, until its lease is taken over).
struct InFlight {
    fingerprint: Fingerprint,
    epoch: u64,
    owner: OwnerToken,
    lease_until: Instant,
    /// When the record is forgotten even if its owner never returns (the route's ttl).
    expires_at: Instant,
}

impl MemoryStore {
    /// The default bound: 64 MiB.
    pub const DEFAULT_CAPACITY_BYTES: u64 = 64 << 20;

    /// A store holding at most about `capacity_bytes` of settled records.
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            shards: Arc::new(std::array::from_fn(|_| {
                Mutex::new(HashMap::with_hasher(KeyHasher::builder()))
            })),
            settled: Arc::new(RecordCache::new(capacity_bytes)),
            origin: Instant::now(),
        }
    }

    /// The number of records held, in flight or settled.
    pub fn len(&self) -> u64 {
        let in_flight: usize = self.shards.iter().map(|shard| lock(shard).len()).sum();
        self.settled.entry_count() + in_flight as u64
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes charged against the bound by settled records.
    pub fn weighted_size(&self) -> u64 {
        self.settled.weighted_size()
    }

    /// The in-flight records of `key`'s shard, locked. Completing and releasing move a record from
    /// there to the settled cache while holding this lock, so an acquire holding it sees one or
    /// the other.
    fn in_flight(&self, key: &RecordKey) -> MutexGuard<'_, InFlightMap> {
        lock(&self.shards[usize::from(key.0[0]) % SHARDS])
    }

    /// Ends the lease of `key`'s in-flight record, whose owner the caller checked, keeping the
    /// record and its epoch among the settled ones until its deadline.
    fn settle_released(&self, in_flight: &mut InFlightMap, key: &RecordKey, now: Instant) {
        if let Some(record) = in_flight.remove(key)
            && record.expires_at > now
        {
            let released = SettledRecord {
                fingerprint: record.fingerprint,
                expires_at: record.expires_at,
                state: Settled::Released {
                    by: Attempt {
                        owner: record.owner,
                        epoch: record.epoch,
                    },
                },
            };
            self.settled.insert(*key, released);
        }
    }

    /// A lease deadline as [`Store::inspect`] reports it: microseconds since the store was
    /// created. Every renewal moves it (two renewals within one microsecond aside).
    fn deadline(&self, lease_until: Instant) -> LeaseDeadline {
        let micros = lease_until
            .saturating_duration_since(self.origin)
            .as_micros();
        LeaseDeadline(u64::try_from(micros).unwrap_or(u64::MAX))
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
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        // A completed record never changes until it expires: replays need no lock.
        if !request.memory_checked
            && let Some(answer) = self.settled.answer(request.key, request.fingerprint)
        {
            return StoreFuture::ready(Ok(answer.into()));
        }
        let now = Instant::now();
        let mut in_flight = self.in_flight(request.key);
        if let Some(record) = in_flight
            .get_mut(request.key)
            .filter(|record| record.expires_at > now)
        {
            if record.fingerprint != *request.fingerprint {
                return StoreFuture::ready(Ok(Acquired::Mismatch));
            }
            if record.owner != request.owner {
                if record.lease_until > now {
                    let lease_left = record.lease_until - now;
                    return StoreFuture::ready(Ok(Acquired::InFlight { lease_left }));
                }
                // The owner stalled or died: take over with the next epoch.
                record.epoch += 1;
                record.owner = request.owner;
                record.lease_until = now + request.lease;
                record.expires_at = record.expires_at.max(record.lease_until);
            }
            let epoch = record.epoch;
            return StoreFuture::ready(Ok(Acquired::Execute { epoch }));
        }
        // Not in flight: the settled record, if any, decides.
        let settled = self.settled.get(request.key, now);
        if let Some(answer) = settled
            .as_ref()
            .and_then(|record| record.answer(request.fingerprint, now))
        {
            return StoreFuture::ready(Ok(answer.into()));
        }
        let (epoch, expires_at) = match settled {
            // Released: the next attempt, keeping the record's deadline.
            Some(SettledRecord {
                state: Settled::Released { by },
                expires_at,
                ..
            }) => (by.epoch + 1, expires_at.max(now + request.lease)),
            _ => (1, now + request.retention.max(request.lease)),
        };
        let record = InFlight {
            fingerprint: *request.fingerprint,
            epoch,
            owner: request.owner,
            lease_until: now + request.lease,
            expires_at,
        };
        in_flight.insert(*request.key, record);
        StoreFuture::ready(Ok(Acquired::Execute { epoch }))
    }

    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut in_flight = self.in_flight(request.key);
        let renewed = match in_flight.get_mut(request.key) {
            Some(record) if record.owner == request.owner && record.expires_at > now => {
                record.lease_until = now + request.lease;
                record.expires_at = record.expires_at.max(record.lease_until);
                true
            }
            _ => false,
        };
        StoreFuture::ready(Ok(renewed))
    }

    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut in_flight = self.in_flight(request.key);
        let completed = match in_flight.get(request.key) {
            Some(record) if record.owner == request.owner => {
                let owned = record.expires_at > now;
                if owned {
                    let completed = SettledRecord {
                        fingerprint: record.fingerprint,
                        expires_at: now + request.ttl,
                        state: Settled::Completed {
                            result: Arc::clone(request.result),
                            by: Some(Attempt {
                                owner: request.owner,
                                epoch: record.epoch,
                            }),
                        },
                    };
                    self.settled.insert(*request.key, completed);
                }
                // An expired record is forgotten either way, as it would have been by its ttl.
                in_flight.remove(request.key);
                owned
            }
            Some(_) => false,
            // Completing twice (a retried command) converges; a record completed by another
            // owner was not ours.
            None => self
                .settled
                .get(request.key, now)
                .is_some_and(|record| {
                    matches!(record.state, Settled::Completed { by: Some(by), .. } if by.owner == request.owner)
                }),
        };
        StoreFuture::ready(Ok(completed))
    }

    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        let now = Instant::now();
        let mut in_flight = self.in_flight(request.key);
        if in_flight
            .get(request.key)
            .is_some_and(|record| record.owner == request.owner)
        {
            self.settle_released(&mut in_flight, request.key, now);
        }
        StoreFuture::ready(Ok(()))
    }

    fn cached(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Cached> {
        self.settled.answer(key, fingerprint)
    }

    fn inspect<'a>(
        &'a self,
        request: InspectRequest<'a>,
    ) -> StoreFuture<'a, Option<RecordSnapshot>> {
        let now = Instant::now();
        let in_flight = self.in_flight(request.key);
        if let Some(record) = in_flight
            .get(request.key)
            .filter(|record| record.expires_at > now)
        {
            let lease = LeaseSnapshot::new(
                self.deadline(record.lease_until),
                record.lease_until.saturating_duration_since(now),
            );
            let snapshot = RecordSnapshot::new(
                RecordState::InFlight { lease },
                record.fingerprint,
                record.epoch,
            )
            .with_owner(record.owner)
            .with_ttl_left(record.expires_at - now);
            return StoreFuture::ready(Ok(Some(snapshot)));
        }
        let snapshot = self.settled.get(request.key, now).map(|record| {
            let (state, by) = match record.state {
                Settled::Completed { result, by } => (RecordState::Completed { result }, by),
                Settled::Released { by } => (RecordState::Released, Some(by)),
            };
            // This store completes its records itself, so it always knows the attempt (only a
            // `TieredStore`'s copies do not, and they never come here).
            let epoch = by.map_or(0, |by| by.epoch);
            let snapshot = RecordSnapshot::new(state, record.fingerprint, epoch)
                .with_ttl_left(record.expires_at.saturating_duration_since(now));
            match by {
                Some(by) => snapshot.with_owner(by.owner),
                None => snapshot,
            }
        });
        StoreFuture::ready(Ok(snapshot))
    }

    fn purge<'a>(&'a self, request: PurgeRequest<'a>) -> StoreFuture<'a, Purged> {
        let now = Instant::now();
        let mut in_flight = self.in_flight(request.key);
        if let Some(record) = in_flight.get(request.key) {
            if record.expires_at > now {
                return StoreFuture::ready(Ok(Purged::InFlight));
            }
            // Past its deadline: already forgotten as far as acquire is concerned.
            in_flight.remove(request.key);
        }
        let purged = if self.settled.remove(request.key, now) {
            Purged::Deleted
        } else {
            Purged::Absent
        };
        StoreFuture::ready(Ok(purged))
    }

    fn release_stale<'a>(&'a self, request: ReleaseStaleRequest<'a>) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut in_flight = self.in_flight(request.key);
        let released = match in_flight.get(request.key) {
            Some(record) => {
                let stale = record.owner == request.owner
                    && record.expires_at > now
                    && self.deadline(record.lease_until) == request.lease_deadline;
                if stale {
                    self.settle_released(&mut in_flight, request.key, now);
                }
                stale
            }
            // Released from that owner already: a repeated call converges.
            None => self.settled.get(request.key, now).is_some_and(|record| {
                matches!(record.state, Settled::Released { by } if by.owner == request.owner)
            }),
        };
        StoreFuture::ready(Ok(released))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::record::RecordedResult;
    use crate::store::cache::RECORD_OVERHEAD;
    use crate::store::testing::{acquire as acquire_with, complete, key, print};

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
        store.release(ReleaseRequest::new(&k, owner)).await.unwrap();
        assert!(store.cached(&k, &fp).is_none(), "released");
        assert!(store.cached(&k, &print("b")).is_none(), "released");

        let owner = OwnerToken::generate();
        acquire_with(&store, &k, owner, &fp, lease).await;
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(complete(&store, &k, owner, &fp, &result, Duration::from_secs(60)).await);
        match store.cached(&k, &fp) {
            Some(Cached::Completed {
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
            Some(Cached::Mismatch)
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
        assert!(
            store
                .renew(RenewRequest::new(&k, first, lease))
                .await
                .unwrap()
        );
        assert!(
            !store
                .renew(RenewRequest::new(&k, second, lease))
                .await
                .unwrap()
        );

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
        assert!(
            !store
                .renew(RenewRequest::new(&k, first, short))
                .await
                .unwrap()
        );
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
        store.release(ReleaseRequest::new(&k, first)).await.unwrap();
        assert!(matches!(
            acquire_with(&store, &k, second, &fp, lease).await,
            Acquired::Execute { epoch: 2 }
        ));
        // A stale release by the first owner changes nothing.
        store.release(ReleaseRequest::new(&k, first)).await.unwrap();
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
    fn an_acquire_racing_the_completion_never_runs_the_key_again() {
        use futures_util::FutureExt as _;

        let store = MemoryStore::default();
        let fp = print("a");
        let result = Arc::new(RecordedResult::TooLarge);
        let keys: Vec<RecordKey> = (0..2000).map(|i| key(&format!("race-{i}"))).collect();
        let lease = Duration::from_secs(30);
        let request =
            |key, owner| AcquireRequest::new(key, owner, &fp, lease, Duration::from_mins(1));
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
