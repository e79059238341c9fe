//! The cache of settled records both in-process stores keep: [`MemoryStore`](super::MemoryStore)'s
//! completed and released records, and [`TieredStore`](super::TieredStore)'s copies of completed
//! ones.
//!
//! [`RecordCache`] is bounded in bytes (each record weighs its response plus [`RECORD_OVERHEAD`]),
//! expires each record at its own deadline, and evicts the oldest-cached records first when full.
//! moka does the weighing, expiring and evicting; lookups read a plain sharded index of the same
//! records, which moka's eviction listener keeps in step, so that a lookup takes one shard's read
//! lock and nothing else. (A moka read also logs itself for moka's bookkeeping in a buffer every
//! thread shares, which costs more than the rest of the lookup once two cores read at once.)
//!
//! Evicting oldest-cached first, rather than moka's default admission policy (`TinyLFU`), matters:
//! `TinyLFU` refuses a new entry whose key it has seen less often than the entries it would evict,
//! which at the bound is every new key, so a retry of a recent key would miss its record (and, in
//! the embedded store, run the handler again). A retry follows its first attempt closely: the
//! newest records are the ones worth keeping.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache;

use super::{Cached, OwnerToken};
use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;

/// Bytes charged per cached record on top of its recorded response: the key, fingerprint and
/// deadline, moka's entry with its deque and timer nodes, the index's slot, the `Arc` and the
/// allocator's headers. Measured with `idem-bench memory` (`docs/BENCHMARKS.md`), so that the
/// byte bound is what the process really spends.
pub(crate) const RECORD_OVERHEAD: u32 = 1024;

/// Shards of the index: two cores reading different keys rarely touch the same lock.
const INDEX_SHARDS: usize = 16;

/// A record nobody owns, as the in-process stores keep it.
#[derive(Clone, Debug)]
pub(crate) struct SettledRecord {
    /// The fingerprint of the request that first used the key.
    pub(crate) fingerprint: Fingerprint,
    /// When the record is forgotten.
    pub(crate) expires_at: Instant,
    pub(crate) state: Settled,
}

/// How a record was settled.
#[derive(Clone, Debug)]
pub(crate) enum Settled {
    /// Completed: replay `result`. `by` is the attempt that completed it, where known (a
    /// [`MemoryStore`](super::MemoryStore) always knows; a [`TieredStore`](super::TieredStore)'s
    /// copy does not), so that a repeated `complete` converges and an operator sees its epoch.
    Completed {
        result: Arc<RecordedResult>,
        by: Option<Attempt>,
    },
    /// Released: the next acquire takes over with the epoch after `by`'s.
    Released { by: Attempt },
}

/// One attempt at a record: its owner and its epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub(crate) owner: OwnerToken,
    pub(crate) epoch: u64,
}

impl SettledRecord {
    /// The memory-only answer for a request with `fingerprint`: a completed record is replayed or
    /// refused as a mismatch; a released one is no answer (an acquire takes it over).
    pub(crate) fn answer(&self, fingerprint: &Fingerprint, now: Instant) -> Option<Cached> {
        let Settled::Completed { result, .. } = &self.state else {
            return None;
        };
        if self.fingerprint != *fingerprint {
            return Some(Cached::Mismatch);
        }
        Some(Cached::Completed {
            result: Arc::clone(result),
            ttl_left: self.expires_at.saturating_duration_since(now),
        })
    }

    fn weight(&self) -> u32 {
        let response = match &self.state {
            Settled::Completed { result, .. } => result.weight(),
            Settled::Released { .. } => 0,
        };
        u32::try_from(response)
            .unwrap_or(u32::MAX)
            .saturating_add(RECORD_OVERHEAD)
    }
}

/// One caching of a record: `id` tells it from an earlier caching of the same key whose eviction
/// is reported late.
#[derive(Clone)]
struct Entry {
    id: u64,
    record: SettledRecord,
}

/// Settled records by key, bounded in bytes; see the [module docs](self).
pub(crate) struct RecordCache {
    /// Weighs, expires and evicts; its eviction listener removes records from `index`.
    bound: Cache<RecordKey, Entry, KeyHasher>,
    /// What `bound` holds, for reading.
    index: Arc<Index>,
    next_id: AtomicU64,
}

impl RecordCache {
    /// A cache holding about `capacity_bytes` of records.
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        let index = Arc::new(Index::new());
        let evicted = Arc::clone(&index);
        let bound = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &RecordKey, entry: &Entry| entry.record.weight())
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(Deadline)
            .eviction_listener(move |key: Arc<RecordKey>, entry: Entry, cause| {
                // A replaced record's successor is already in the index.
                if cause != RemovalCause::Replaced {
                    evicted.remove(&key, entry.id);
                }
            })
            .build_with_hasher(KeyHasher::builder());
        Self {
            bound,
            index,
            next_id: AtomicU64::new(0),
        }
    }

    /// The record of `key`, if it has not reached its deadline at `now`.
    pub(crate) fn get(&self, key: &RecordKey, now: Instant) -> Option<SettledRecord> {
        let entry = self.index.get(key)?;
        if entry.record.expires_at <= now {
            // Past its deadline, and moka has not expired it yet.
            self.index.remove(key, entry.id);
            self.bound.invalidate(key);
            return None;
        }
        Some(entry.record)
    }

    /// The memory-only answer for `key` ([`SettledRecord::answer`]).
    pub(crate) fn answer(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Cached> {
        let now = Instant::now();
        self.get(key, now)?.answer(fingerprint, now)
    }

    /// Caches `record` under `key`, replacing what was there. A record already past its deadline
    /// is not cached.
    pub(crate) fn insert(&self, key: RecordKey, record: SettledRecord) {
        if record.expires_at <= Instant::now() {
            return;
        }
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            record,
        };
        // Indexed first: should moka refuse or evict it at once, its listener finds it there.
        self.index.insert(key, entry.clone());
        self.bound.insert(key, entry);
    }

    /// Drops the record of `key`; whether one was there and had not reached its deadline at
    /// `now`.
    pub(crate) fn remove(&self, key: &RecordKey, now: Instant) -> bool {
        let removed = self.index.take(key);
        self.bound.invalidate(key);
        removed.is_some_and(|entry| entry.record.expires_at > now)
    }

    /// Drops every record.
    pub(crate) fn clear(&self) {
        self.bound.invalidate_all();
        self.bound.run_pending_tasks();
        self.index.clear();
    }

    /// The records cached, after running moka's pending maintenance.
    pub(crate) fn entry_count(&self) -> u64 {
        self.bound.run_pending_tasks();
        self.bound.entry_count()
    }

    /// The bytes charged against the bound, after running moka's pending maintenance.
    pub(crate) fn weighted_size(&self) -> u64 {
        self.bound.run_pending_tasks();
        self.bound.weighted_size()
    }
}

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCache")
            .field("entries", &self.bound.entry_count())
            .field("weighted_size", &self.bound.weighted_size())
            .finish_non_exhaustive()
    }
}

/// moka expires each record at its own deadline.
struct Deadline;

impl moka::Expiry<RecordKey, Entry> for Deadline {
    fn expire_after_create(&self, _: &RecordKey, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.record.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &RecordKey,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.record.expires_at.saturating_duration_since(now))
    }
}

type Shard = RwLock<HashMap<RecordKey, Entry, KeyHasher>>;

/// The cached records by key, sharded; a lookup takes one shard's read lock.
struct Index {
    shards: [Shard; INDEX_SHARDS],
}

impl Index {
    fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| {
                RwLock::new(HashMap::with_hasher(KeyHasher::builder()))
            }),
        }
    }

    fn shard(&self, key: &RecordKey) -> &Shard {
        &self.shards[usize::from(key.0[1]) % INDEX_SHARDS]
    }

    fn get(&self, key: &RecordKey) -> Option<Entry> {
        read(self.shard(key)).get(key).cloned()
    }

    fn insert(&self, key: RecordKey, entry: Entry) {
        write(self.shard(&key)).insert(key, entry);
    }

    /// Removes the key's record if it is still the caching `id`.
    fn remove(&self, key: &RecordKey, id: u64) {
        let mut shard = write(self.shard(key));
        if shard.get(key).is_some_and(|entry| entry.id == id) {
            shard.remove(key);
        }
    }

    /// Removes the key's record, whichever caching it is.
    fn take(&self, key: &RecordKey) -> Option<Entry> {
        write(self.shard(key)).remove(key)
    }

    fn clear(&self) {
        for shard in &self.shards {
            write(shard).clear();
        }
    }
}

/// Every change to the index is a single map operation, so a lock poisoned by a panic elsewhere
/// still guards a consistent map.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The hasher of the in-process stores' tables, keyed by [`RecordKey`].
///
/// Record keys are SHA-256 digests, so hashing them again with `SipHash` (the standard library's
/// default, a visible share of an in-process first execution) buys nothing. This mixes the 8 bytes
/// a [`RecordKey`] hashes to with a per-process random seed through the `splitmix64` finaliser: a
/// few multiplications, and a client that grinds keys for colliding digests still cannot aim at one
/// bucket without knowing the seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasher {
    seed: u64,
    state: u64,
}

impl KeyHasher {
    /// A hasher builder with this process's seed.
    pub(crate) fn builder() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        let seed = *SEED
            .get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x1de4_u64));
        Self { seed, state: 0 }
    }

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = Self;

    fn build_hasher(&self) -> Self {
        *self
    }
}

impl Hasher for KeyHasher {
    fn write_u64(&mut self, value: u64) {
        self.state = Self::mix(self.state.rotate_left(5) ^ value ^ self.seed);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{key, print};

    fn completed(fingerprint: Fingerprint, ttl: Duration) -> SettledRecord {
        SettledRecord {
            fingerprint,
            expires_at: Instant::now() + ttl,
            state: Settled::Completed {
                result: Arc::new(RecordedResult::TooLarge),
                by: None,
            },
        }
    }

    #[test]
    fn answers_completed_records_only() {
        let cache = RecordCache::new(1 << 20);
        let (k, fp) = (key("k"), print("a"));
        assert!(cache.answer(&k, &fp).is_none());
        let released = SettledRecord {
            fingerprint: fp,
            expires_at: Instant::now() + Duration::from_secs(60),
            state: Settled::Released {
                by: Attempt {
                    owner: OwnerToken(1),
                    epoch: 1,
                },
            },
        };
        cache.insert(k, released);
        assert!(cache.get(&k, Instant::now()).is_some());
        assert!(cache.answer(&k, &fp).is_none(), "released");
        cache.insert(k, completed(fp, Duration::from_secs(60)));
        assert!(matches!(
            cache.answer(&k, &fp),
            Some(Cached::Completed { ttl_left, .. }) if ttl_left <= Duration::from_secs(60)
        ));
        assert!(matches!(
            cache.answer(&k, &print("b")),
            Some(Cached::Mismatch)
        ));
    }

    #[test]
    fn a_removed_record_is_gone_from_both_tiers() {
        let cache = RecordCache::new(1 << 20);
        let (k, fp) = (key("k"), print("a"));
        assert!(!cache.remove(&k, Instant::now()), "nothing to remove");
        cache.insert(k, completed(fp, Duration::from_secs(60)));
        assert!(cache.remove(&k, Instant::now()));
        assert!(cache.answer(&k, &fp).is_none());
        assert_eq!(cache.entry_count(), 0);
        cache.insert(k, completed(fp, Duration::from_millis(10)));
        let later = Instant::now() + Duration::from_millis(20);
        assert!(
            !cache.remove(&k, later),
            "past its deadline: nothing live was removed"
        );
    }

    #[test]
    fn records_expire_at_their_deadline() {
        let cache = RecordCache::new(1 << 20);
        let (k, fp) = (key("k"), print("a"));
        cache.insert(k, completed(fp, Duration::from_millis(30)));
        assert!(cache.answer(&k, &fp).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(cache.answer(&k, &fp).is_none());
        assert_eq!(cache.entry_count(), 0);
        cache.insert(k, completed(fp, Duration::ZERO));
        assert!(cache.answer(&k, &fp).is_none(), "dead on arrival");
    }

    /// At the bound the oldest-cached records go first, never the newest.
    #[test]
    fn a_full_cache_keeps_its_newest_records() {
        let cache = RecordCache::new(100 * u64::from(RECORD_OVERHEAD + 16));
        let fp = print("a");
        let keys: Vec<RecordKey> = (0..3000).map(|i| key(&format!("flood-{i}"))).collect();
        for k in &keys {
            cache.insert(*k, completed(fp, Duration::from_mins(1)));
            // Reading the oldest one does not save it: eviction follows insertion.
            let _ = cache.answer(&keys[0], &fp);
        }
        let held = cache.entry_count();
        assert!((50..=110).contains(&held), "held {held} records");
        for k in &keys[keys.len() - 40..] {
            assert!(
                cache.answer(k, &fp).is_some(),
                "a recent record was dropped"
            );
        }
        assert!(cache.answer(&keys[0], &fp).is_none());
    }

    #[test]
    fn the_key_hasher_is_deterministic_and_spreads_keys() {
        let hasher = KeyHasher::builder();
        let key = |byte: u8| RecordKey([byte; 32]);
        assert_eq!(
            hasher.hash_one(key(1)),
            KeyHasher::builder().hash_one(key(1))
        );
        // Keys that differ in one bit of the hashed prefix land far apart, also in the low bits
        // a table uses as its bucket index.
        let mut low_bits = std::collections::HashSet::new();
        for bit in 0..64 {
            let mut digest = [0; 32];
            digest[bit / 8] = 1 << (bit % 8);
            low_bits.insert(hasher.hash_one(RecordKey(digest)) & 0xffff);
        }
        assert!(low_bits.len() >= 60, "{} distinct of 64", low_bits.len());
        assert_ne!(hasher.hash_one(key(1)), hasher.hash_one(key(2)));
    }
}
