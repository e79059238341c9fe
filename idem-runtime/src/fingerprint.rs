//! Request fingerprints and record keys.
//!
//! A [`Fingerprint`] says *which request* a key was first used for: SHA-256 over a domain-separated,
//! length-prefixed encoding of the method, the matched route, the path, the query and the body. Every
//! field carries its length, so no two different requests encode to the same bytes (`/a` + `b=1` and
//! `/a?b` + `=1` differ).
//!
//! A [`RecordKey`] says *where* the record lives: SHA-256 over the [`Scope`] and the client's key, so
//! records of two principals never meet and no client byte reaches a store key name.
//!
//! ```
//! use idem_runtime::fingerprint::{scope, Fingerprint, RecordKey, Scope};
//! use idem_runtime::key::IdempotencyKey;
//!
//! let a = Fingerprint::of(&http::Method::POST, "/payments", "/payments", "", b"{\"amount\":1}");
//! let b = Fingerprint::of(&http::Method::POST, "/payments", "/payments", "", b"{\"amount\":2}");
//! assert_ne!(a, b);
//!
//! let key = IdempotencyKey::parse_bytes(b"k1").unwrap();
//! assert_ne!(RecordKey::new(&scope("alice"), &key), RecordKey::new(&scope("bob"), &key));
//! assert_ne!(RecordKey::new(&Scope::NONE, &key), RecordKey::new(&scope(""), &key));
//! ```

use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};

use crate::key::IdempotencyKey;

/// SHA-256 of a request's method, matched route, path, query and body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprints one request. `route` is the matched route template (`/payments/{id}`), `path`
    /// the full original path, `query` the raw query string without `?`.
    pub fn of(method: &http::Method, route: &str, path: &str, query: &str, body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem/fingerprint/v1\0");
        for field in [
            method.as_str().as_bytes(),
            route.as_bytes(),
            path.as_bytes(),
            query.as_bytes(),
            body,
        ] {
            length_prefixed(&mut hasher, field);
        }
        Self(hasher.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex(&self.0[..8]))
    }
}

/// The principal a key belongs to, reduced to a digest.
///
/// Built by the `scope = …` argument of `#[idempotent]` from a value the handler's own extractors
/// bound (a user id, a tenant). [`Scope::NONE`] is the global scope: every client shares one key
/// space, which is only safe when keys are unguessable and never shared between users.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Scope(Option<[u8; 32]>);

impl Scope {
    /// The global scope (no `scope` argument).
    pub const NONE: Scope = Scope(None);
}

/// Builds a [`Scope`] from any value that implements `Display` (the text is hashed; it is never
/// stored or logged).
pub fn scope<T: fmt::Display + ?Sized>(value: &T) -> Scope {
    struct HashWriter(Sha256);
    impl fmt::Write for HashWriter {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }
    let mut writer = HashWriter(Sha256::new());
    writer.0.update(b"idem/scope/v1\0");
    // Writing into a hasher cannot fail; a `Display` impl that reports an error still yields a
    // deterministic digest of what it wrote.
    let _ = write!(writer, "{value}");
    Scope(Some(writer.0.finalize().into()))
}

/// Where a record lives: SHA-256 of (scope, key). Fixed length, no client bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecordKey(pub [u8; 32]);

/// A SHA-256 digest is already uniform: its first 8 bytes are all a hash table needs (the
/// stores' tables still mix them with a per-process secret, see `store::KeyHasher`).
impl Hash for RecordKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

impl RecordKey {
    /// Derives the record key of a client key within a scope.
    pub fn new(scope: &Scope, key: &IdempotencyKey) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem/record/v1\0");
        match &scope.0 {
            None => hasher.update([0]),
            Some(digest) => {
                hasher.update([1]);
                hasher.update(digest);
            }
        }
        length_prefixed(&mut hasher, key.as_str().as_bytes());
        Self(hasher.finalize().into())
    }

    /// Lower-case hex of the whole digest (64 characters): used in store key names.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A short, non-reversible label for logs and traces (the first 8 bytes in hex).
    pub fn short(&self) -> String {
        hex(&self.0[..8])
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({})", self.short())
    }
}

fn length_prefixed(hasher: &mut Sha256, field: &[u8]) {
    hasher.update((field.len() as u64).to_be_bytes());
    hasher.update(field);
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    fn fp(method: &Method, route: &str, path: &str, query: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::of(method, route, path, query, body)
    }

    #[test]
    fn every_field_counts() {
        let base = fp(&Method::POST, "/p/{id}", "/p/1", "a=1", b"{}");
        assert_eq!(base, fp(&Method::POST, "/p/{id}", "/p/1", "a=1", b"{}"));
        assert_ne!(base, fp(&Method::PUT, "/p/{id}", "/p/1", "a=1", b"{}"));
        assert_ne!(base, fp(&Method::POST, "/q/{id}", "/p/1", "a=1", b"{}"));
        assert_ne!(base, fp(&Method::POST, "/p/{id}", "/p/2", "a=1", b"{}"));
        assert_ne!(base, fp(&Method::POST, "/p/{id}", "/p/1", "a=2", b"{}"));
        assert_ne!(base, fp(&Method::POST, "/p/{id}", "/p/1", "a=1", b"{ }"));
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_fingerprint() {
        // Without length prefixes these would all hash the same concatenation.
        let cases = [
            ("/a", "b=1", ""),
            ("/ab", "=1", ""),
            ("/a", "", "b=1"),
            ("/a", "b", "=1"),
            ("", "/ab=1", ""),
        ];
        let prints: Vec<_> = cases
            .iter()
            .map(|(path, query, body)| fp(&Method::POST, "/r", path, query, body.as_bytes()))
            .collect();
        for (i, a) in prints.iter().enumerate() {
            for b in &prints[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_ne!(
            fp(&Method::POST, "ab", "", "", b""),
            fp(&Method::POST, "a", "b", "", b"")
        );
    }

    #[test]
    fn scopes_separate_keys() {
        let key = IdempotencyKey::parse_bytes(b"same").unwrap();
        let alice = RecordKey::new(&scope("alice"), &key);
        assert_eq!(alice, RecordKey::new(&scope(&String::from("alice")), &key));
        assert_ne!(alice, RecordKey::new(&scope("bob"), &key));
        assert_ne!(alice, RecordKey::new(&Scope::NONE, &key));
        assert_ne!(
            RecordKey::new(&scope(""), &key),
            RecordKey::new(&Scope::NONE, &key)
        );
        assert_eq!(scope(&42_u64), scope("42"), "scope is the Display text");
    }

    #[test]
    fn record_key_has_no_client_bytes() {
        let key = IdempotencyKey::parse_bytes(b"{tag}:x")
            .unwrap_or_else(|_| IdempotencyKey::parse_bytes(b"\"{tag}:x\"").unwrap());
        let hex = RecordKey::new(&Scope::NONE, &key).to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
