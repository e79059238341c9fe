//! The record store: the idempotency state machine behind one trait.
//!
//! A record moves through two states, and only through the four transitions of [`Store`]:
//!
//! ```text
//!              acquire (absent)                 complete (owner)
//!   absent ───────────────────────▶ in-flight ───────────────────▶ completed ──▶ expires after ttl
//!                                    │  ▲  │
//!            renew (owner): extend   │  │  │ release (owner): lease ends now, record kept
//!                                    ▼  │  ▼
//!                         lease expired: the next acquire takes over with epoch + 1
//! ```
//!
//! * **acquire**(owner, fingerprint): absent → in-flight with epoch 1; a different fingerprint →
//!   [`Acquired::Mismatch`]; completed → [`Acquired::Completed`] with the recorded result; a live lease
//!   of another owner → [`Acquired::InFlight`]; the same owner → [`Acquired::Execute`] again (a
//!   retried command converges); an expired lease → taken over with epoch + 1.
//! * **renew**(owner): extends the lease if the caller still owns it.
//! * **complete**(owner, result): records the result if the caller still owns the record; repeating
//!   it is harmless.
//! * **release**(owner): ends the lease now without deleting the record, so epochs stay monotonic.
//!
//! Every transition must be atomic and safe to run twice, because a command that timed out may still
//! have executed. [`MemoryStore`] is the embedded implementation; `RedisStore` (feature `redis`)
//! shares records across a fleet, and [`TieredStore`] answers replays from process memory in front
//! of it.
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
//! let request = |owner| AcquireRequest {
//!     key: &key, owner, fingerprint: &fingerprint,
//!     lease: Duration::from_secs(30), retention: Duration::from_secs(3600),
//! };
//! let (first, second) = (OwnerToken::generate(), OwnerToken::generate());
//! assert!(matches!(store.acquire(request(first)).await?, Acquired::Execute { epoch: 1 }));
//! assert!(matches!(store.acquire(request(second)).await?, Acquired::InFlight { .. }));
//! # Ok::<(), idem_runtime::store::StoreError>(())
//! # }).unwrap();
//! ```

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod tiered;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[cfg(feature = "postgres")]
pub use self::postgres::{PostgresConfig, PostgresStore};
#[cfg(feature = "redis-cluster")]
pub use self::redis::RedisClusterStore;
#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisStore};
pub use memory::MemoryStore;
pub use tiered::{TieredConfig, TieredStats, TieredStore};

use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;

/// Bytes charged per cached record on top of its recorded response: the key, fingerprint and
/// deadline, moka's entry with its deque and timer nodes, the hash table's slot, the `Arc` and
/// the allocator's headers. Measured with `idem-bench memory` (docs/BENCHMARKS.md), so that the
/// byte bound is what the process really spends.
pub(crate) const RECORD_OVERHEAD: u32 = 1024;

/// The cache of records both in-process stores keep ([`MemoryStore`]'s settled records,
/// [`TieredStore`]'s completed ones), up to its expiry settings: bounded to `capacity_bytes`, each
/// entry weighing its response (`response_bytes`) plus [`RECORD_OVERHEAD`], least recently used
/// evicted first (for [`TieredStore`], whose replays read an index beside moka, that is oldest
/// cached first). moka's default policy (`TinyLFU`) would instead refuse a new entry whose key it
/// has seen less often than the entries it would evict, which at the bound is every new key: a
/// retry of a recent key would miss its record (and, in the embedded store, run again).
pub(crate) fn record_cache<V>(
    capacity_bytes: u64,
    response_bytes: fn(&V) -> usize,
) -> moka::sync::CacheBuilder<RecordKey, V, moka::sync::Cache<RecordKey, V>>
where
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(capacity_bytes)
        .weigher(move |_: &RecordKey, value: &V| {
            u32::try_from(response_bytes(value))
                .unwrap_or(u32::MAX)
                .saturating_add(RECORD_OVERHEAD)
        })
        .eviction_policy(moka::policy::EvictionPolicy::lru())
}

/// The hasher of the in-process stores' tables, keyed by [`RecordKey`].
///
/// Record keys are SHA-256 digests, so hashing them again with `SipHash` (the standard library's
/// default, ~18 % of an in-process first execution when measured) buys nothing. This mixes the
/// 8 bytes a [`RecordKey`] hashes to with a per-process random seed through the `splitmix64`
/// finaliser: a few multiplications, and a client that grinds keys for colliding digests still
/// cannot aim at one bucket without knowing the seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasher {
    seed: u64,
    state: u64,
}

impl KeyHasher {
    /// A hasher builder with this process's seed.
    pub(crate) fn builder() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            use std::hash::BuildHasher as _;
            std::collections::hash_map::RandomState::new().hash_one(0x1de4_u64)
        });
        Self { seed, state: 0 }
    }

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl std::hash::BuildHasher for KeyHasher {
    type Hasher = Self;

    fn build_hasher(&self) -> Self {
        *self
    }
}

impl std::hash::Hasher for KeyHasher {
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

/// The future every [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Identifies one attempt at running a handler: the owner of an in-flight record.
///
/// 128 bits: a random per-process prefix and a counter, so tokens never repeat across processes or
/// within one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OwnerToken(pub u128);

impl OwnerToken {
    /// A token no other attempt, in this process or another, holds.
    pub fn generate() -> Self {
        static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // Each thread takes counts in blocks, so that two cores generating tokens do not pass the
        // counter's cache line back and forth on every request.
        const BLOCK: u64 = 1024;
        thread_local! {
            static RESERVED: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
        }
        let prefix = *PROCESS.get_or_init(|| {
            let mut seed = [0_u8; 8];
            if getrandom::fill(&mut seed).is_err() {
                // No OS randomness: fall back to time and pid, still distinct between processes.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                #[allow(clippy::cast_possible_truncation)]
                let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
                seed = mixed.to_be_bytes();
            }
            u64::from_be_bytes(seed)
        });
        let count = RESERVED.with(|reserved| {
            let (mut next, mut end) = reserved.get();
            if next == end {
                next = COUNTER.fetch_add(BLOCK, Ordering::Relaxed);
                end = next + BLOCK;
            }
            reserved.set((next + 1, end));
            next
        });
        Self((u128::from(prefix) << 64) | u128::from(count))
    }
}

/// The arguments of [`Store::acquire`].
#[derive(Debug, Clone, Copy)]
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
}

/// The arguments of [`Store::complete`].
#[derive(Debug, Clone, Copy)]
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
}

/// The idempotency state machine. See the [module docs](self) for the transitions.
///
/// Implementations must make each method atomic and idempotent for the same owner. Futures are
/// boxed so a runtime can hold any store as `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    /// Tries to take ownership of the record for `request.owner`.
    fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired>;

    /// Extends the lease; `Ok(false)` when `owner` no longer owns the record.
    fn renew<'a>(
        &'a self,
        key: &'a RecordKey,
        owner: OwnerToken,
        lease: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Records the result and keeps it for `request.ttl`; `Ok(false)` when `request.owner` no
    /// longer owns the record (the result is then discarded).
    fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool>;

    /// Ends `owner`'s lease now, keeping the record (and its epoch) so the next acquire takes over.
    fn release<'a>(&'a self, key: &'a RecordKey, owner: OwnerToken) -> StoreFuture<'a, ()>;

    /// Answers from process memory, without waiting, for a record this store holds **completed**
    /// there: [`Acquired::Completed`] for the same fingerprint, [`Acquired::Mismatch`] for another.
    /// `None` (the default) in every other case, and then [`acquire`](Store::acquire) decides.
    ///
    /// The executor asks this before anything else, so a replay from memory skips the handler's
    /// extractor (no parsing of the body) and the acquire. Completed records never change until
    /// they expire, so answering from a copy is safe; a store must never answer for a record
    /// that is in flight or released.
    fn cached(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Acquired> {
        let _ = (key, fingerprint);
        None
    }
}

/// What the stores' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{CompleteRequest, OwnerToken, Store};
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

    /// Completes the record and unwraps the store's answer.
    pub(crate) async fn complete(
        store: &impl Store,
        key: &RecordKey,
        owner: OwnerToken,
        fingerprint: &Fingerprint,
        result: &Arc<RecordedResult>,
        ttl: Duration,
    ) -> bool {
        let request = CompleteRequest {
            key,
            owner,
            fingerprint,
            result,
            ttl,
        };
        store.complete(request).await.unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;

    use super::{KeyHasher, OwnerToken};
    use crate::fingerprint::RecordKey;

    #[test]
    fn owner_tokens_never_repeat_across_threads() {
        // More tokens per thread than one reserved block, so every thread takes several.
        let per_thread = 3000;
        let tokens: Vec<Vec<OwnerToken>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..per_thread).map(|_| OwnerToken::generate()).collect()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let distinct: std::collections::HashSet<_> = tokens.iter().flatten().collect();
        assert_eq!(distinct.len(), 4 * per_thread);
        // One process prefix for all of them.
        let prefixes: std::collections::HashSet<_> =
            tokens.iter().flatten().map(|t| t.0 >> 64).collect();
        assert_eq!(prefixes.len(), 1);
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
