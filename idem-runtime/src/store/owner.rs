//! Owner tokens: the identity of one attempt at running a handler.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Identifies one attempt at running a handler: the owner of an in-flight record.
///
/// 128 bits: a random per-process prefix and a counter, so tokens never repeat across processes or
/// within one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OwnerToken(pub u128);

/// Counts each thread reserves at once, so that two cores generating tokens do not pass the
/// counter's cache line back and forth on every request.
const BLOCK: u64 = 1024;

static COUNTER: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's reserved counts: the next one and the end of the block.
    static RESERVED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

impl OwnerToken {
    /// A token no other attempt, in this process or another, holds.
    pub fn generate() -> Self {
        let count = RESERVED.with(|reserved| {
            let (mut next, mut end) = reserved.get();
            if next == end {
                next = COUNTER.fetch_add(BLOCK, Ordering::Relaxed);
                end = next + BLOCK;
            }
            reserved.set((next + 1, end));
            next
        });
        Self((u128::from(process_prefix()) << 64) | u128::from(count))
    }

    /// The token as 16 big-endian bytes, as stores keep it.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

/// This process's random prefix, drawn once.
fn process_prefix() -> u64 {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    *PREFIX.get_or_init(|| {
        let mut seed = [0_u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            // No OS randomness: fall back to time and pid, still distinct between processes.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos());
            #[allow(clippy::cast_possible_truncation)]
            let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
            seed = mixed.to_be_bytes();
        }
        u64::from_be_bytes(seed)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::OwnerToken;

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
        let distinct: HashSet<_> = tokens.iter().flatten().collect();
        assert_eq!(distinct.len(), 4 * per_thread);
        // One process prefix for all of them.
        let prefixes: HashSet<_> = tokens.iter().flatten().map(|t| t.0 >> 64).collect();
        assert_eq!(prefixes.len(), 1);
    }

    #[test]
    fn tokens_are_sixteen_big_endian_bytes() {
        let mut one = [0; 16];
        one[15] = 1;
        assert_eq!(OwnerToken(1).to_bytes(), one);
    }
}
