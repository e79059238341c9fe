//! The embedded store: the state machine in process memory, for one instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;

use super::{AcquireRequest, Acquired, OwnerToken, Store, StoreError, StoreFuture};
use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;

/// Bytes charged per record on top of its recorded response (key, state, moka's bookkeeping).
const RECORD_OVERHEAD: u32 = 160;

/// The in-process store: the default when no other store is configured.
///
/// Records live in a [`moka`] cache bounded in bytes (the recorded bodies plus a fixed overhead per
/// record) and expire on their own deadline: the route's ttl. When the bound is reached the least
/// useful records are evicted early, and an evicted key behaves as new; size the bound for your
/// traffic (`records per ttl × average response size`). It serves one instance; a fleet needs a
/// shared store.
///
/// ```
/// use idem_runtime::{Idempotency, store::MemoryStore};
///
/// let idem = Idempotency::builder().store(MemoryStore::new(256 << 20)).build();
/// # drop(idem);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    records: Cache<RecordKey, Record>,
}

#[derive(Clone)]
struct Record {
    fingerprint: Fingerprint,
    epoch: u64,
    expires_at: Instant,
    state: State,
}

#[derive(Clone)]
enum State {
    InFlight {
        owner: Option<OwnerToken>,
        lease_until: Instant,
    },
    Completed(Arc<RecordedResult>),
}

struct RecordExpiry;

impl moka::Expiry<RecordKey, Record> for RecordExpiry {
    fn expire_after_create(
        &self,
        _: &RecordKey,
        record: &Record,
        now: Instant,
    ) -> Option<Duration> {
        Some(record.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &RecordKey,
        record: &Record,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(record.expires_at.saturating_duration_since(now))
    }
}

impl MemoryStore {
    /// The default bound: 64 MiB.
    pub const DEFAULT_CAPACITY_BYTES: u64 = 64 << 20;

    /// A store holding at most about `capacity_bytes` of records.
    pub fn new(capacity_bytes: u64) -> Self {
        let records = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &RecordKey, record: &Record| {
                let body = match &record.state {
                    State::InFlight { .. } => 0,
                    State::Completed(result) => result.weight(),
                };
                u32::try_from(body)
                    .unwrap_or(u32::MAX)
                    .saturating_add(RECORD_OVERHEAD)
            })
            .expire_after(RecordExpiry)
            .build();
        Self { records }
    }

    /// The number of records held (approximate until pending maintenance has run).
    pub fn len(&self) -> u64 {
        self.records.run_pending_tasks();
        self.records.entry_count()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes charged against the bound (approximate until pending maintenance has run).
    pub fn weighted_size(&self) -> u64 {
        self.records.run_pending_tasks();
        self.records.weighted_size()
    }

    /// Applies `transition` to the record atomically and returns what it decided.
    fn transition<T>(
        &self,
        key: &RecordKey,
        transition: impl FnOnce(Option<&Record>, Instant) -> (Option<Record>, T),
    ) -> T {
        let mut answer = None;
        self.records.entry(*key).and_compute_with(|entry| {
            let now = Instant::now();
            // An entry past its deadline may still be in the map until maintenance runs.
            let current = entry
                .as_ref()
                .map(moka::Entry::value)
                .filter(|r| r.expires_at > now);
            let (next, result) = transition(current, now);
            answer = Some(result);
            match next {
                Some(record) => Op::Put(record),
                None => Op::Nop,
            }
        });
        answer.expect("and_compute_with calls its closure exactly once")
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY_BYTES)
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.records.entry_count())
            .field("weighted_size", &self.records.weighted_size())
            .finish()
    }
}

fn acquire(
    current: Option<&Record>,
    now: Instant,
    request: &AcquireRequest<'_>,
) -> (Option<Record>, Acquired) {
    let in_flight = |epoch, expires_at| Record {
        fingerprint: *request.fingerprint,
        epoch,
        expires_at,
        state: State::InFlight {
            owner: Some(request.owner),
            lease_until: now + request.lease,
        },
    };
    let Some(record) = current else {
        let retention = request.retention.max(request.lease);
        return (
            Some(in_flight(1, now + retention)),
            Acquired::Execute { epoch: 1 },
        );
    };
    if record.fingerprint != *request.fingerprint {
        return (None, Acquired::Mismatch);
    }
    match &record.state {
        State::Completed(result) => (
            None,
            Acquired::Completed {
                result: Arc::clone(result),
                ttl_left: record.expires_at.saturating_duration_since(now),
            },
        ),
        State::InFlight { owner, .. } if *owner == Some(request.owner) => (
            None,
            Acquired::Execute {
                epoch: record.epoch,
            },
        ),
        State::InFlight { lease_until, .. } if *lease_until > now => (
            None,
            Acquired::InFlight {
                lease_left: *lease_until - now,
            },
        ),
        State::InFlight { .. } => {
            let epoch = record.epoch + 1;
            let expires_at = record.expires_at.max(now + request.lease);
            (
                Some(in_flight(epoch, expires_at)),
                Acquired::Execute { epoch },
            )
        }
    }
}

fn owned_by(record: Option<&Record>, owner: OwnerToken) -> Option<(&Record, Instant)> {
    match record?.state {
        State::InFlight {
            owner: Some(current),
            lease_until,
        } if current == owner => Some((record?, lease_until)),
        _ => None,
    }
}

impl Store for MemoryStore {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        let answer = self.transition(request.key, |current, now| acquire(current, now, &request));
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        owner: OwnerToken,
        lease: Duration,
    ) -> StoreFuture<'a, bool> {
        let renewed = self.transition(key, |current, now| match owned_by(current, owner) {
            Some((record, _)) => {
                let mut next = record.clone();
                next.state = State::InFlight {
                    owner: Some(owner),
                    lease_until: now + lease,
                };
                next.expires_at = next.expires_at.max(now + lease);
                (Some(next), true)
            }
            None => (None, false),
        });
        Box::pin(std::future::ready(Ok(renewed)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a RecordKey,
        owner: OwnerToken,
        result: Arc<RecordedResult>,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let completed = self.transition(key, |current, now| {
            match (current, owned_by(current, owner)) {
                (_, Some((record, _))) => {
                    let next = Record {
                        fingerprint: record.fingerprint,
                        epoch: record.epoch,
                        expires_at: now + ttl,
                        state: State::Completed(result),
                    };
                    (Some(next), true)
                }
                // Completing twice (a retried command) is not an error, but a record completed by a
                // different owner was not ours: report that, so the caller knows it lost.
                (
                    Some(Record {
                        state: State::Completed(stored),
                        ..
                    }),
                    None,
                ) => (None, Arc::ptr_eq(stored, &result)),
                _ => (None, false),
            }
        });
        Box::pin(std::future::ready(Ok(completed)))
    }

    fn release<'a>(&'a self, key: &'a RecordKey, owner: OwnerToken) -> StoreFuture<'a, ()> {
        self.transition(key, |current, now| match owned_by(current, owner) {
            Some((record, _)) => {
                let mut next = record.clone();
                next.state = State::InFlight {
                    owner: None,
                    lease_until: now,
                };
                (Some(next), ())
            }
            None => (None, ()),
        });
        Box::pin(std::future::ready(Ok::<(), StoreError>(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Scope;
    use crate::key::IdempotencyKey;
    use crate::record::RecordedResult;

    fn key(name: &str) -> RecordKey {
        RecordKey::new(
            &Scope::NONE,
            &IdempotencyKey::parse_bytes(name.as_bytes()).unwrap(),
        )
    }

    fn print(body: &str) -> Fingerprint {
        Fingerprint::of(&http::Method::POST, "/", "/", "", body.as_bytes())
    }

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
        assert!(
            !store
                .complete(&k, second, Arc::clone(&result), Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            store
                .complete(&k, first, Arc::clone(&result), Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            store
                .complete(&k, first, Arc::clone(&result), Duration::from_secs(60))
                .await
                .unwrap(),
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
            !store
                .complete(&k, first, Arc::new(RecordedResult::TooLarge), short)
                .await
                .unwrap()
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
        store
            .complete(
                &k,
                owner,
                Arc::new(RecordedResult::TooLarge),
                Duration::from_millis(40),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let next = OwnerToken::generate();
        assert!(matches!(
            acquire_with(&store, &k, next, &print("b"), Duration::from_secs(5)).await,
            Acquired::Execute { epoch: 1 }
        ));
    }

    #[test]
    fn owner_tokens_are_unique() {
        let tokens: std::collections::HashSet<_> =
            (0..1000).map(|_| OwnerToken::generate()).collect();
        assert_eq!(tokens.len(), 1000);
    }
}
