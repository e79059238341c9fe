//! A process-local cache of completed records in front of a shared store.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use idem_runtime::fingerprint::{Fingerprint, RecordKey, Scope};
//! use idem_runtime::key::IdempotencyKey;
//! use idem_runtime::record::RecordedResult;
//! use idem_runtime::store::{
//!     AcquireRequest, Acquired, CompleteRequest, MemoryStore, OwnerToken, Store, TieredStore,
//! };
//!
//! // In production the inner store is a `RedisStore`; any store works.
//! let store = TieredStore::new(MemoryStore::default());
//! let key = RecordKey::new(&Scope::NONE, &IdempotencyKey::parse_bytes(b"k").unwrap());
//! let fingerprint = Fingerprint::of(&http::Method::POST, "/", "/", "", b"");
//! let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(3600));
//! let acquire = |owner| AcquireRequest::new(&key, owner, &fingerprint, lease, ttl);
//! let owner = OwnerToken::generate();
//! assert!(matches!(store.acquire(acquire(owner)).await?, Acquired::Execute { epoch: 1 }));
//! let result = Arc::new(RecordedResult::TooLarge);
//! assert!(store.complete(CompleteRequest::new(&key, owner, &fingerprint, &result, ttl)).await?);
//!
//! // The first replay asks the inner store once and caches its answer; the next is answered
//! // from memory, without asking the inner store.
//! for _ in 0..2 {
//!     let replay = store.acquire(acquire(OwnerToken::generate())).await?;
//!     assert!(matches!(replay, Acquired::Completed { .. }));
//! }
//! assert_eq!((store.stats().misses, store.stats().hits), (2, 1));
//! # Ok::<(), idem_runtime::store::StoreError>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::cache::{RecordCache, Settled, SettledRecord};
use super::{
    AcquireRequest, Acquired, Cached, CompleteRequest, InspectRequest, PurgeRequest, Purged,
    RecordSnapshot, ReleaseRequest, ReleaseStaleRequest, RenewRequest, Store, StoreFuture,
};
use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;

/// A store that answers replays of completed records from process memory, in front of a shared
/// `inner` store (normally a `RedisStore`).
///
/// * **cached**: a cached record with the same fingerprint is replayed without asking `inner` (0
///   round trips); with a different fingerprint the answer is [`Cached::Mismatch`].
/// * **acquire**: answers like `cached` first (unless the caller just asked it), otherwise `inner`
///   decides, and an [`Acquired::Completed`] answer is cached.
/// * **complete**: `inner` records the result. The instance's own results are not cached unless
///   [`TieredConfig::cache_own_results`] says so.
/// * **renew** and **release** go to `inner` unchanged.
/// * **inspect** and **`release_stale`** (an operator's) go to `inner` unchanged: the cache never
///   answers for an operator.
/// * **purge** (an operator's) deletes the record in `inner`, then drops this instance's cached
///   copy. Other instances hold their own copies, and may replay a purged record from them for
///   up to [`TieredConfig::max_entry_ttl`] (10 s by default).
///
/// Nothing is kept per request in flight: a first execution costs the inner store's acquire and
/// complete and nothing else.
///
/// The cache fills from replays: the first retry of a key that reaches an instance costs one round
/// trip, and every later one on that instance none. Most keys are never retried, and a retry
/// reaches the instance that ran the request only by chance behind a load balancer, so caching
/// every result on the way out would make every first execution pay a cache insert (and, at the
/// bound, an eviction) for records that are almost never read, and would push the records that
/// clients really retry out of the cache (`docs/BENCHMARKS.md` measures the cost).
///
/// Only **completed** records are cached: they never change until they expire, so a cached copy
/// is always right. In-flight state is always read from `inner`, which stays the single authority
/// on who runs. Each cached record expires no later than its record in `inner` (the deadline is
/// measured from before the request that learned it), and within
/// [`TieredConfig::max_entry_ttl`], so that a record an operator deletes from Redis stops being
/// replayed after at most that long. The cache is bounded in bytes and drops its oldest records
/// first (a retry follows its first attempt closely, so the newest records are the ones worth
/// keeping); evicted records are simply asked for again.
pub struct TieredStore<S> {
    inner: S,
    completed: RecordCache,
    max_entry_ttl: Duration,
    cache_own_results: bool,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The settings of a [`TieredStore`]. Every setter states its default.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::store::{MemoryStore, TieredConfig, TieredStore};
///
/// let config = TieredConfig::new()
///     .capacity_bytes(256 << 20)
///     .max_entry_ttl(Duration::from_secs(5))
///     .cache_own_results(false);
/// let store = TieredStore::with_config(MemoryStore::default(), config);
/// # drop(store);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct TieredConfig {
    capacity_bytes: u64,
    max_entry_ttl: Duration,
    cache_own_results: bool,
}

impl TieredConfig {
    /// Default for [`TieredConfig::capacity_bytes`]: 64 MiB.
    pub const DEFAULT_CAPACITY_BYTES: u64 = 64 << 20;
    /// Default for [`TieredConfig::max_entry_ttl`]: 10 seconds.
    pub const DEFAULT_MAX_ENTRY_TTL: Duration = Duration::from_secs(10);

    /// The defaults.
    pub const fn new() -> Self {
        Self {
            capacity_bytes: Self::DEFAULT_CAPACITY_BYTES,
            max_entry_ttl: Self::DEFAULT_MAX_ENTRY_TTL,
            cache_own_results: false,
        }
    }

    /// About how many bytes of cached records (response bodies and headers plus a fixed overhead
    /// per record) the cache holds before evicting. Default: 64 MiB.
    pub const fn capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// The longest a record stays cached, however long it lives in the inner store: how long a
    /// record deleted from Redis by an operator may still be replayed by an instance. Zero
    /// disables the cache. Default: 10 s.
    pub const fn max_entry_ttl(mut self, ttl: Duration) -> Self {
        self.max_entry_ttl = ttl;
        self
    }

    /// Whether the results this instance records itself are cached too (write-through), so that
    /// even the first retry that comes back to this instance costs no round trip. Worth it only
    /// where retries are frequent and come back to the instance that ran the request (a single
    /// instance, sticky sessions): every first execution then pays a cache insert, and at the
    /// bound an eviction. Default: `false`, the cache fills from replays only.
    pub const fn cache_own_results(mut self, cache: bool) -> Self {
        self.cache_own_results = cache;
        self
    }
}

impl Default for TieredConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters of a [`TieredStore`]'s cache, from [`TieredStore::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TieredStats {
    /// Acquires answered from the cache (replays and mismatches).
    pub hits: u64,
    /// Acquires that asked the inner store.
    pub misses: u64,
    /// Records cached now.
    pub entries: u64,
    /// The bytes charged against [`TieredConfig::capacity_bytes`].
    pub weighted_size: u64,
}

impl<S: Store> TieredStore<S> {
    /// `inner` with a cache of the default size ([`TieredConfig::new`]).
    pub fn new(inner: S) -> Self {
        Self::with_config(inner, TieredConfig::new())
    }

    /// `inner` with a cache configured by `config`.
    pub fn with_config(inner: S, config: TieredConfig) -> Self {
        Self {
            inner,
            completed: RecordCache::new(config.capacity_bytes),
            max_entry_ttl: config.max_entry_ttl,
            cache_own_results: config.cache_own_results,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The inner store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The cache's counters. Runs the cache's pending maintenance first, so the entry count and
    /// size are current.
    pub fn stats(&self) -> TieredStats {
        TieredStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.completed.entry_count(),
            weighted_size: self.completed.weighted_size(),
        }
    }

    /// Drops every cached record (the inner store is untouched): the next acquire of each key
    /// asks the inner store.
    pub fn clear_cache(&self) {
        self.completed.clear();
    }

    /// The cache's answer, counted as a hit.
    fn hit(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Cached> {
        let answer = self.completed.answer(key, fingerprint)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(answer)
    }

    /// Caches a completed record until `learned_at + ttl_left`, capped by `max_entry_ttl`.
    fn remember(
        &self,
        key: RecordKey,
        fingerprint: Fingerprint,
        result: Arc<RecordedResult>,
        learned_at: Instant,
        ttl_left: Duration,
    ) {
        let keep = ttl_left.min(self.max_entry_ttl);
        if keep.is_zero() {
            return;
        }
        let Some(expires_at) = learned_at.checked_add(keep) else {
            return;
        };
        let record = SettledRecord {
            fingerprint,
            expires_at,
            state: Settled::Completed { result, by: None },
        };
        self.completed.insert(key, record);
    }
}

impl<S: Store> Store for TieredStore<S> {
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
        if !request.memory_checked
            && let Some(answer) = self.hit(request.key, request.fingerprint)
        {
            return StoreFuture::ready(Ok(answer.into()));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        StoreFuture::new(async move {
            // Measured before asking, so the cached copy cannot outlive the inner record.
            let asked_at = Instant::now();
            let answer = self.inner.acquire(request).await?;
            if let Acquired::Completed { result, ttl_left } = &answer {
                let (key, fingerprint) = (*request.key, *request.fingerprint);
                self.remember(key, fingerprint, Arc::clone(result), asked_at, *ttl_left);
            }
            Ok(answer)
        })
    }

    fn renew<'a>(&'a self, request: RenewRequest<'a>) -> StoreFuture<'a, bool> {
        self.inner.renew(request)
    }

    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
        if !self.cache_own_results {
            return self.inner.complete(request);
        }
        StoreFuture::new(async move {
            let asked_at = Instant::now();
            let completed = self.inner.complete(request).await?;
            if completed {
                let (key, fingerprint) = (*request.key, *request.fingerprint);
                let result = Arc::clone(request.result);
                self.remember(key, fingerprint, result, asked_at, request.ttl);
            }
            Ok(completed)
        })
    }

    fn release<'a>(&'a self, request: ReleaseRequest<'a>) -> StoreFuture<'a, ()> {
        self.inner.release(request)
    }

    fn cached(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Cached> {
        self.hit(key, fingerprint)
    }

    fn inspect<'a>(
        &'a self,
        request: InspectRequest<'a>,
    ) -> StoreFuture<'a, Option<RecordSnapshot>> {
        self.inner.inspect(request)
    }

    fn purge<'a>(&'a self, request: PurgeRequest<'a>) -> StoreFuture<'a, Purged> {
        StoreFuture::new(async move {
            let purged = self.inner.purge(request).await;
            // After the inner store answered (or failed): a replay that read the record before
            // the delete has then usually cached it already, and loses its copy here (one still on
            // its way may keep it up to `max_entry_ttl`, like other instances). Dropping a copy is
            // always safe.
            self.completed.remove(request.key, Instant::now());
            purged
        })
    }

    fn release_stale<'a>(&'a self, request: ReleaseStaleRequest<'a>) -> StoreFuture<'a, bool> {
        self.inner.release_stale(request)
    }
}

impl<S: fmt::Debug> fmt::Debug for TieredStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredStore")
            .field("inner", &self.inner)
            .field("completed", &self.completed)
            .field("max_entry_ttl", &self.max_entry_ttl)
            .field("cache_own_results", &self.cache_own_results)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::OwnerToken;
    use crate::store::cache::RECORD_OVERHEAD;
    use crate::store::testing::{complete, key, print};

    async fn acquire(
        store: &TieredStore<MemoryStore>,
        key: &RecordKey,
        owner: OwnerToken,
        fingerprint: &Fingerprint,
    ) -> Acquired {
        crate::store::testing::acquire(store, key, owner, fingerprint, Duration::from_secs(30))
            .await
    }

    #[tokio::test]
    async fn completed_records_are_served_from_memory() {
        let store = TieredStore::new(MemoryStore::default());
        let (k, fp) = (key("k"), print("a"));
        let owner = OwnerToken::generate();
        assert!(matches!(
            acquire(&store, &k, owner, &fp).await,
            Acquired::Execute { epoch: 1 }
        ));
        // In flight: never cached, every duplicate asks the inner store.
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::InFlight { .. }
        ));
        assert_eq!(store.stats().entries, 0);
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(complete(&store, &k, owner, &fp, &result, Duration::from_mins(1)).await);
        // The instance's own result is not cached: its first replay asks the inner store.
        assert_eq!(store.stats().entries, 0);
        let misses = store.stats().misses;
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::Completed { .. }
        ));
        let before = store.stats();
        assert_eq!(before.misses, misses + 1);
        assert_eq!(before.entries, 1);
        assert!(before.weighted_size >= u64::from(RECORD_OVERHEAD));
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::Completed { .. }
        ));
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &print("b")).await,
            Acquired::Mismatch
        ));
        let after = store.stats();
        assert_eq!(after.hits, before.hits + 2);
        assert_eq!(after.misses, before.misses);

        // An empty cache asks the inner store once and caches its answer.
        store.clear_cache();
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::Completed { .. }
        ));
        assert_eq!(store.stats().misses, after.misses + 1);
        assert_eq!(store.stats().entries, 1);
    }

    /// `cached` answers from the cache only (never from the inner store, never for records in
    /// flight), counted as hits like the acquires it spares.
    #[tokio::test]
    async fn cached_answers_only_for_records_in_the_cache() {
        let store = TieredStore::new(MemoryStore::default());
        let (k, fp) = (key("k"), print("a"));
        let owner = OwnerToken::generate();
        assert!(matches!(
            acquire(&store, &k, owner, &fp).await,
            Acquired::Execute { .. }
        ));
        assert!(store.cached(&k, &fp).is_none(), "in flight");
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(complete(&store, &k, owner, &fp, &result, Duration::from_mins(1)).await);
        assert!(
            store.cached(&k, &fp).is_none(),
            "completed, but not cached yet"
        );
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::Completed { .. }
        ));
        let hits = store.stats().hits;
        assert!(matches!(
            store.cached(&k, &fp),
            Some(Cached::Completed { ttl_left, .. }) if ttl_left <= Duration::from_mins(1)
        ));
        assert!(matches!(
            store.cached(&k, &print("b")),
            Some(Cached::Mismatch)
        ));
        assert_eq!(store.stats().hits, hits + 2);
        store.clear_cache();
        assert!(store.cached(&k, &fp).is_none());
    }

    /// A store that caches its own results too.
    fn write_through() -> TieredStore<MemoryStore> {
        let config = TieredConfig::new().cache_own_results(true);
        TieredStore::with_config(MemoryStore::default(), config)
    }

    #[tokio::test]
    async fn own_results_are_cached_when_asked() {
        let store = write_through();
        let (k, fp) = (key("k"), print("a"));
        let owner = OwnerToken::generate();
        acquire(&store, &k, owner, &fp).await;
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(complete(&store, &k, owner, &fp, &result, Duration::from_mins(1)).await);
        let before = store.stats();
        assert_eq!(before.entries, 1);
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::Completed { .. }
        ));
        let after = store.stats();
        assert_eq!((after.hits, after.misses), (before.hits + 1, before.misses));
    }

    /// Retries follow their first attempt closely: a full cache drops its oldest records and keeps
    /// the newest (moka's default `TinyLFU` admission would refuse them, sending
    /// the first retry of every new key to the inner store).
    #[tokio::test]
    async fn a_full_cache_keeps_its_newest_records() {
        let config = TieredConfig::new()
            .capacity_bytes(100 * u64::from(RECORD_OVERHEAD + 64))
            .max_entry_ttl(Duration::from_mins(1))
            .cache_own_results(true);
        let store = TieredStore::with_config(MemoryStore::default(), config);
        let (fp, result) = (print("a"), Arc::new(RecordedResult::TooLarge));
        let keys: Vec<RecordKey> = (0..3000).map(|i| key(&format!("flood-{i}"))).collect();
        for k in &keys {
            let owner = OwnerToken::generate();
            acquire(&store, k, owner, &fp).await;
            assert!(complete(&store, k, owner, &fp, &result, Duration::from_mins(1)).await);
        }
        let before = store.stats();
        assert!((50..=110).contains(&before.entries), "{before:?}");
        for k in &keys[keys.len() - 40..] {
            assert!(matches!(
                acquire(&store, k, OwnerToken::generate(), &fp).await,
                Acquired::Completed { .. }
            ));
        }
        let after = store.stats();
        assert_eq!(
            after.hits - before.hits,
            40,
            "every recent record served from the cache"
        );
        assert_eq!(after.misses, before.misses);
        // The read index holds what moka holds: evicted records left it too.
        let served = keys
            .iter()
            .filter(|k| store.cached(k, &fp).is_some())
            .count();
        assert!(
            (40..=110).contains(&served),
            "{served} records served, moka holds {}",
            store.stats().entries
        );
    }

    /// Caching a key again replaces its record; the eviction moka reports for the old one must not
    /// take the new one out of the read index.
    #[tokio::test]
    async fn a_record_cached_again_stays_readable() {
        let store = TieredStore::new(MemoryStore::default());
        let (k, fp) = (key("k"), print("a"));
        let result = Arc::new(RecordedResult::TooLarge);
        for _ in 0..3 {
            store.remember(
                k,
                fp,
                Arc::clone(&result),
                Instant::now(),
                Duration::from_mins(1),
            );
        }
        assert_eq!(store.stats().entries, 1);
        assert!(matches!(
            store.cached(&k, &fp),
            Some(Cached::Completed { .. })
        ));
        store.clear_cache();
        assert!(store.cached(&k, &fp).is_none());
    }

    #[tokio::test]
    async fn entries_expire_with_the_record_and_within_the_cap() {
        let config = TieredConfig::new()
            .max_entry_ttl(Duration::from_millis(60))
            .cache_own_results(true);
        let store = TieredStore::with_config(MemoryStore::default(), config);
        let (short, long, fp) = (key("short"), key("long"), print("a"));
        for (k, ttl) in [(&short, 30), (&long, 60_000)] {
            let owner = OwnerToken::generate();
            acquire(&store, k, owner, &fp).await;
            let result = Arc::new(RecordedResult::TooLarge);
            assert!(complete(&store, k, owner, &fp, &result, Duration::from_millis(ttl)).await);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        // The short record is gone from both tiers: the key runs again.
        assert!(matches!(
            acquire(&store, &short, OwnerToken::generate(), &fp).await,
            Acquired::Execute { epoch: 1 }
        ));
        // Its stale copy, still within the cache's time-to-live, was dropped on the way.
        assert_eq!(store.stats().entries, 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        let misses = store.stats().misses;
        // The long record outlived the cap in memory: the inner store is asked again.
        assert!(matches!(
            acquire(&store, &long, OwnerToken::generate(), &fp).await,
            Acquired::Completed { .. }
        ));
        assert_eq!(store.stats().misses, misses + 1);
    }

    /// A purge drops this instance's copy with the inner record, so the key runs again here at
    /// once; inspect and `release_stale` are the inner store's.
    #[tokio::test]
    async fn a_purge_drops_the_cached_copy() {
        let store = write_through();
        let (k, fp) = (key("k"), print("a"));
        let owner = OwnerToken::generate();
        acquire(&store, &k, owner, &fp).await;
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(complete(&store, &k, owner, &fp, &result, Duration::from_mins(1)).await);
        assert!(store.cached(&k, &fp).is_some());
        let seen = store.inspect(InspectRequest::new(&k)).await.unwrap();
        assert_eq!(seen.map(|snapshot| snapshot.epoch), Some(1));
        assert_eq!(
            store.purge(PurgeRequest::new(&k)).await.unwrap(),
            Purged::Deleted
        );
        assert!(store.cached(&k, &fp).is_none());
        assert_eq!(store.stats().entries, 0);
        assert!(matches!(
            acquire(&store, &k, OwnerToken::generate(), &fp).await,
            Acquired::Execute { epoch: 1 }
        ));
    }

    #[tokio::test]
    async fn a_lost_completion_is_not_cached() {
        let store = write_through();
        let (k, fp) = (key("k"), print("a"));
        let owner = OwnerToken::generate();
        acquire(&store, &k, owner, &fp).await;
        store.release(ReleaseRequest::new(&k, owner)).await.unwrap();
        let result = Arc::new(RecordedResult::TooLarge);
        assert!(!complete(&store, &k, owner, &fp, &result, Duration::from_mins(1)).await);
        assert_eq!(store.stats().entries, 0);
    }
}
