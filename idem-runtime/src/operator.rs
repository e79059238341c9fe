//! An operator's view of one key: inspect it, purge it, release it from an owner that died.
//!
//! An operator names a key as the client sent it (the `Idempotency-Key` value, quoted or bare,
//! parsed with the same rules as a request's) and the scope it was used in ([`Scope::NONE`], or
//! [`scope`](crate::scope)`(value)` with the value the route scopes by, such as the user id), and
//! reaches the record through the runtime's store, whichever it is.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use idem_runtime::operator::{KeyState, ResultView};
//! use idem_runtime::store::Purged;
//! use idem_runtime::{Idempotency, scope};
//!
//! let idem = Idempotency::builder().build();
//! # {
//! #     // What a request does: alice's `POST` with the key `order-42` runs and is recorded.
//! #     use std::{sync::Arc, time::Duration};
//! #     use idem_runtime::fingerprint::{Fingerprint, RecordKey};
//! #     use idem_runtime::key::IdempotencyKey;
//! #     use idem_runtime::record::{RecordedResult, StoredResponse};
//! #     use idem_runtime::store::{AcquireRequest, CompleteRequest, OwnerToken};
//! #     let key = RecordKey::new(&scope("alice"), &IdempotencyKey::parse_bytes(b"order-42").unwrap());
//! #     let print = Fingerprint::of(&http::Method::POST, "/payments", "/payments", "", b"{}");
//! #     let (owner, ttl) = (OwnerToken::generate(), Duration::from_secs(60));
//! #     idem.store().acquire(AcquireRequest::new(&key, owner, &print, ttl, ttl)).await.unwrap();
//! #     let result = Arc::new(RecordedResult::Response(StoredResponse {
//! #         status: http::StatusCode::CREATED, headers: vec![], body: "{}".into(),
//! #     }));
//! #     idem.store().complete(CompleteRequest::new(&key, owner, &print, &result, ttl)).await.unwrap();
//! # }
//! let operator = idem.operator();
//! // The key as the client sent it, in the scope the route gives it (here, the user id).
//! let view = operator.inspect(&scope("alice"), "order-42", false).await?.unwrap();
//! assert_eq!((view.state, view.epoch), (KeyState::Completed, 1));
//! let Some(ResultView::Response(response)) = &view.result else { unreachable!() };
//! assert_eq!((response.status, response.body_len, &response.body), (201, 2, &None));
//!
//! // Drop it: the next request with the key runs again.
//! assert_eq!(operator.purge(&scope("alice"), "order-42").await?, Purged::Deleted);
//! assert!(operator.inspect(&scope("alice"), "order-42", false).await?.is_none());
//! # Ok::<(), idem_runtime::operator::OperatorError>(())
//! # }).unwrap();
//! ```
//!
//! * [`Operator::inspect`] reports the state (in flight, released, completed), the epoch, the
//!   owner, the fingerprint, the lease and the time left, and the recorded status and headers,
//!   as a [`KeyView`] that serializes for logs and tools. The body only when asked.
//! * [`Operator::purge`] deletes a completed or released record: the key runs again as new
//!   (epoch 1). It never deletes a record in flight.
//! * [`Operator::release_stale`] frees a key whose owner died mid-request, before its lease runs
//!   out, with the view inspected: the release is refused if the owner renewed its lease since.
//!
//! # Releasing a stuck key
//!
//! A key stays in flight while its owner renews its lease, every third of the lease. An owner that
//! died stops renewing and the key frees itself when the lease runs out; with a long lease an
//! operator may not want to wait. The safe sequence:
//!
//! 1. inspect the key: state `in_flight`, with the owner and the lease deadline;
//! 2. wait at least a third of the route's lease (a live owner renews within that time, which
//!    moves the deadline), optionally inspecting again to see that the deadline did not move;
//! 3. release with the view of step 1 (or 2). The store releases the record only if its owner
//!    **and** its lease deadline are still those of the view, atomically: an owner that renewed
//!    keeps its key (the answer is `false`) and completes as usual. A released key keeps its epoch:
//!    the next attempt runs with epoch + 1, so a handler that fences its side effects with the
//!    epoch stays safe even if the owner was only paused.
//!
//! # What each store reports
//!
//! | | [`MemoryStore`](crate::store::MemoryStore) | `RedisStore` (and Cluster) | [`TieredStore`](crate::store::TieredStore) |
//! |---|---|---|---|
//! | state, epoch, owner, fingerprint | yes | yes | the inner store's |
//! | lease deadline | microseconds of the process's monotonic clock | milliseconds of the Redis server's clock (Unix time) | the inner store's |
//! | time left | yes | yes (`PTTL`) | the inner store's |
//! | created at | no (not kept) | no (not in the record layout) | the inner store's |
//! | purge | under the shard lock | one script: `DEL` unless in flight | the inner store's, then this instance's cached copy is dropped; **other instances may replay the purged record from their caches for up to [`TieredConfig::max_entry_ttl`](crate::store::TieredConfig::max_entry_ttl)** (10 s by default) |
//!
//! A store that predates these operations answers them with
//! [`StoreError::Unsupported`].

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::fingerprint::{RecordKey, Scope};
use crate::key::{IdempotencyKey, KeyError};
use crate::record::RecordedResult;
use crate::store::{
    InspectRequest, LeaseDeadline, OwnerToken, PurgeRequest, Purged, RecordSnapshot, RecordState,
    ReleaseStaleRequest, Store, StoreError,
};

/// Inspects, purges and releases single keys through a runtime's store. Get one with
/// [`Idempotency::operator`](crate::Idempotency::operator); cheap to clone.
///
/// ```
/// use idem_runtime::Idempotency;
///
/// let operator = Idempotency::builder().build().operator();
/// # drop(operator);
/// ```
#[derive(Clone)]
pub struct Operator {
    store: Arc<dyn Store>,
}

/// Why an operator's call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// The client key is not a valid `Idempotency-Key` value, so no request could have used it.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] KeyError),
    /// [`Operator::release_stale`] was given the view of a record that is not in flight: there is
    /// no lease to release.
    #[error("the inspected record is not in flight: there is no lease to release")]
    NotInFlight,
    /// The store failed, or does not support the operation ([`StoreError::Unsupported`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Operator {
    /// An operator over `store` (usually [`Idempotency::operator`](crate::Idempotency::operator),
    /// over the runtime's own store).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use idem_runtime::operator::Operator;
    /// use idem_runtime::store::MemoryStore;
    ///
    /// let operator = Operator::new(Arc::new(MemoryStore::default()));
    /// # drop(operator);
    /// ```
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The record of `client_key` in `scope`, as it is now: `None` when there is none (never
    /// used, expired or purged). `include_body`: whether [`ResponseView::body`] carries the
    /// recorded body (status, headers and the body's length always come).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::{Idempotency, Scope};
    ///
    /// let operator = Idempotency::builder().build().operator();
    /// // `"k1"` and `k1` are the same key, as in a request.
    /// assert!(operator.inspect(&Scope::NONE, "\"k1\"", true).await?.is_none());
    /// assert!(operator.inspect(&Scope::NONE, "two words", false).await.is_err());
    /// # Ok::<(), idem_runtime::operator::OperatorError>(())
    /// # }).unwrap();
    /// ```
    pub async fn inspect(
        &self,
        scope: &Scope,
        client_key: impl AsRef<[u8]>,
        include_body: bool,
    ) -> Result<Option<KeyView>, OperatorError> {
        let key = record_key(scope, client_key.as_ref())?;
        let snapshot = self.store.inspect(InspectRequest::new(&key)).await?;
        Ok(snapshot.map(|snapshot| KeyView::new(&key, &snapshot, include_body)))
    }

    /// Deletes the record of `client_key` in `scope` if it is completed or released, so that
    /// the next request with the key runs as new (epoch 1). A record in flight is left alone
    /// ([`Purged::InFlight`]): release it first if its owner is dead.
    ///
    /// With a [`TieredStore`](crate::store::TieredStore), this instance's cached copy goes too;
    /// other instances may replay the record from their own caches for up to
    /// [`TieredConfig::max_entry_ttl`](crate::store::TieredConfig::max_entry_ttl).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::store::Purged;
    /// use idem_runtime::{Idempotency, scope};
    ///
    /// let operator = Idempotency::builder().build().operator();
    /// assert_eq!(operator.purge(&scope("alice"), "order-42").await?, Purged::Absent);
    /// # Ok::<(), idem_runtime::operator::OperatorError>(())
    /// # }).unwrap();
    /// ```
    pub async fn purge(
        &self,
        scope: &Scope,
        client_key: impl AsRef<[u8]>,
    ) -> Result<Purged, OperatorError> {
        let key = record_key(scope, client_key.as_ref())?;
        let purged = self.store.purge(PurgeRequest::new(&key)).await?;
        tracing::info!(record = %key.short(), outcome = ?purged, "an operator purged an idempotency record");
        Ok(purged)
    }

    /// Releases the in-flight record of `client_key` in `scope` from the owner `seen` shows,
    /// if that owner has not renewed its lease since `seen` was inspected (see the
    /// [module docs](self) for the safe sequence). `Ok(true)`: released, the next request runs
    /// with the next epoch. `Ok(false)`: refused (the owner renewed, so it is alive; or the record
    /// completed, was taken over, expired or purged meanwhile). [`OperatorError::NotInFlight`]:
    /// `seen` has no lease.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use idem_runtime::{Idempotency, Scope};
    ///
    /// let operator = Idempotency::builder().build().operator();
    /// if let Some(view) = operator.inspect(&Scope::NONE, "k1", false).await? {
    ///     if view.lease.is_some() {
    ///         tokio::time::sleep(Duration::from_secs(10)).await; // a third of the lease
    ///         let released = operator.release_stale(&Scope::NONE, "k1", &view).await?;
    ///         println!("released: {released}");
    ///     }
    /// }
    /// # Ok::<(), idem_runtime::operator::OperatorError>(())
    /// # }).unwrap();
    /// ```
    pub async fn release_stale(
        &self,
        scope: &Scope,
        client_key: impl AsRef<[u8]>,
        seen: &KeyView,
    ) -> Result<bool, OperatorError> {
        let lease = seen.stale_lease().ok_or(OperatorError::NotInFlight)?;
        self.release_stale_lease(scope, client_key, lease).await
    }

    /// [`Operator::release_stale`] with only what it compares: the owner and lease deadline an
    /// inspection saw (what the admin router's release takes, feature `admin`).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::operator::StaleLease;
    /// use idem_runtime::{Idempotency, Scope};
    ///
    /// let operator = Idempotency::builder().build().operator();
    /// let lease: StaleLease = serde_json::from_str(
    ///     r#"{"owner": "0000000000000000000000000000002a", "lease_deadline": 1700000030000}"#,
    /// )?;
    /// assert!(!operator.release_stale_lease(&Scope::NONE, "k1", lease).await?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn release_stale_lease(
        &self,
        scope: &Scope,
        client_key: impl AsRef<[u8]>,
        lease: StaleLease,
    ) -> Result<bool, OperatorError> {
        let key = record_key(scope, client_key.as_ref())?;
        let request = ReleaseStaleRequest::new(&key, lease.owner, lease.lease_deadline);
        let released = self.store.release_stale(request).await?;
        tracing::info!(
            record = %key.short(),
            released,
            "an operator released an idempotency record from an owner believed dead"
        );
        Ok(released)
    }
}

impl fmt::Debug for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operator").finish_non_exhaustive()
    }
}

/// The record key of a client key, parsed like a request's `Idempotency-Key`.
fn record_key(scope: &Scope, client_key: &[u8]) -> Result<RecordKey, KeyError> {
    Ok(RecordKey::new(
        scope,
        &IdempotencyKey::parse_bytes(client_key)?,
    ))
}

/// One key's record as an operator sees it; serializes to JSON for logs and tools.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use idem_runtime::fingerprint::{Fingerprint, RecordKey};
/// use idem_runtime::key::IdempotencyKey;
/// use idem_runtime::store::{AcquireRequest, OwnerToken, Store};
/// use idem_runtime::{Idempotency, Scope};
///
/// let idem = Idempotency::builder().build();
/// let key = RecordKey::new(&Scope::NONE, &IdempotencyKey::parse_bytes(b"k1").unwrap());
/// let fingerprint = Fingerprint::of(&http::Method::POST, "/", "/", "", b"");
/// let lease = Duration::from_secs(30);
/// let acquire = AcquireRequest::new(&key, OwnerToken(42), &fingerprint, lease, lease);
/// idem.store().acquire(acquire).await?;
///
/// let view = idem.operator().inspect(&Scope::NONE, "k1", false).await.unwrap().unwrap();
/// let json = serde_json::to_value(&view).unwrap();
/// assert_eq!(json["state"], "in_flight");
/// assert_eq!(json["epoch"], 1);
/// assert_eq!(json["owner"], "0000000000000000000000000000002a");
/// assert!(json["lease"]["left_ms"].as_u64().unwrap() > 29_000);
/// # Ok::<(), idem_runtime::store::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KeyView {
    /// The record key: lower-case hex of SHA-256 over the scope and the client key (the record is
    /// `idem:v2:{record_key}` in Redis). Not reversible to the client key.
    pub record_key: String,
    /// In flight, released or completed.
    pub state: KeyState,
    /// The attempt that holds (or last held) the record: 1 for the first.
    pub epoch: u64,
    /// That attempt's owner token (32 hex digits), where the store keeps it.
    #[serde(with = "owner_hex")]
    pub owner: Option<OwnerToken>,
    /// Lower-case hex of the fingerprint (SHA-256 of the method, route, path, query and body) of
    /// the request that first used the key.
    pub fingerprint: String,
    /// The lease, while in flight.
    pub lease: Option<LeaseView>,
    /// Milliseconds until the record is forgotten; `None` when it has no expiry.
    pub expires_in_ms: Option<u64>,
    /// When the key was first used, in milliseconds since the Unix epoch, where the store keeps
    /// it (not [`MemoryStore`](crate::store::MemoryStore) or `RedisStore`).
    pub created_at_ms: Option<u64>,
    /// The recorded result, once completed.
    pub result: Option<ResultView>,
}

impl KeyView {
    fn new(key: &RecordKey, snapshot: &RecordSnapshot, include_body: bool) -> Self {
        let (state, lease, result) = match &snapshot.state {
            RecordState::InFlight { lease } => {
                let view = LeaseView {
                    deadline: lease.deadline,
                    left_ms: millis(lease.left),
                };
                (KeyState::InFlight, Some(view), None)
            }
            RecordState::Completed { result } => (
                KeyState::Completed,
                None,
                Some(ResultView::new(result, include_body)),
            ),
            RecordState::Released => (KeyState::Released, None, None),
        };
        Self {
            record_key: key.to_hex(),
            state,
            epoch: snapshot.epoch,
            owner: snapshot.owner,
            fingerprint: hex(&snapshot.fingerprint.0),
            lease,
            expires_in_ms: snapshot.ttl_left.map(millis),
            created_at_ms: snapshot
                .created_at
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .map(millis),
            result,
        }
    }

    /// The owner and lease deadline to hand [`Operator::release_stale_lease`]: `None` unless the
    /// record was in flight with a known owner.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::{Idempotency, Scope};
    ///
    /// let operator = Idempotency::builder().build().operator();
    /// if let Some(view) = operator.inspect(&Scope::NONE, "k1", false).await? {
    ///     println!("{}", serde_json::to_string(&view.stale_lease()).unwrap());
    /// }
    /// # Ok::<(), idem_runtime::operator::OperatorError>(())
    /// # }).unwrap();
    /// ```
    pub fn stale_lease(&self) -> Option<StaleLease> {
        Some(StaleLease {
            owner: self.owner?,
            lease_deadline: self.lease?.deadline,
        })
    }
}

/// The state of an inspected key.
///
/// ```
/// use idem_runtime::operator::KeyState;
///
/// assert_eq!(serde_json::to_string(&KeyState::InFlight).unwrap(), "\"in_flight\"");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyState {
    /// An attempt holds the key (its lease may have run out: see [`LeaseView::left_ms`]).
    InFlight,
    /// The last attempt gave the key up (its response was not recorded): the next request runs.
    Released,
    /// The result is recorded: requests with the key get it replayed.
    Completed,
}

/// The lease of an in-flight key.
///
/// ```
/// use idem_runtime::operator::LeaseView;
///
/// let lease: LeaseView = serde_json::from_str(r#"{"deadline": 1700000030000, "left_ms": 0}"#).unwrap();
/// assert_eq!(lease.left_ms, 0); // ran out: the owner stopped renewing
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LeaseView {
    /// When the lease ends, in the store's clock (see [`LeaseDeadline`]): what
    /// [`Operator::release_stale`] compares. Every renewal moves it.
    pub deadline: LeaseDeadline,
    /// Milliseconds the lease had left when inspected; 0 once it ran out (the owner stopped
    /// renewing, and the next request takes the key over).
    pub left_ms: u64,
}

/// What [`Operator::release_stale_lease`] compares: the owner and lease deadline an inspection
/// saw. Serialized as `{"owner": "<32 hex digits>", "lease_deadline": <number>}`.
///
/// ```
/// use idem_runtime::operator::StaleLease;
/// use idem_runtime::store::{LeaseDeadline, OwnerToken};
///
/// let lease = StaleLease::new(OwnerToken(42), LeaseDeadline(1_700_000_030_000));
/// let json = serde_json::to_string(&lease).unwrap();
/// assert_eq!(json, r#"{"owner":"0000000000000000000000000000002a","lease_deadline":1700000030000}"#);
/// assert_eq!(serde_json::from_str::<StaleLease>(&json).unwrap(), lease);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StaleLease {
    /// The owner the inspection saw.
    #[serde(with = "owner_hex::required")]
    pub owner: OwnerToken,
    /// The lease deadline the inspection saw.
    pub lease_deadline: LeaseDeadline,
}

impl StaleLease {
    /// The lease `owner` held until `lease_deadline`.
    pub fn new(owner: OwnerToken, lease_deadline: LeaseDeadline) -> Self {
        Self {
            owner,
            lease_deadline,
        }
    }
}

/// A recorded result as an operator sees it. Serialized with a `kind` tag: `"response"` or
/// `"too_large"`.
///
/// ```
/// use idem_runtime::operator::ResultView;
///
/// assert_eq!(serde_json::to_string(&ResultView::TooLarge).unwrap(), r#"{"kind":"too_large"}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResultView {
    /// The recorded response, replayed to every request with the key.
    Response(ResponseView),
    /// The response was larger than the recording limit: requests with the key get
    /// `409 result-unavailable` until the record expires.
    TooLarge,
}

impl ResultView {
    fn new(result: &RecordedResult, include_body: bool) -> Self {
        match result {
            RecordedResult::Response(response) => Self::Response(ResponseView {
                status: response.status.as_u16(),
                headers: response
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                        (name.as_str().to_owned(), value)
                    })
                    .collect(),
                body_len: response.body.len(),
                body: include_body.then(|| BodyView::of(&response.body)),
            }),
            RecordedResult::TooLarge => Self::TooLarge,
        }
    }
}

/// A recorded response: status, headers, and the body when asked.
///
/// ```
/// use idem_runtime::operator::{BodyView, ResponseView};
///
/// let json = r#"{"status": 201, "headers": [["location", "/p/1"]], "body_len": 2, "body": {"text": "{}"}}"#;
/// let response: ResponseView = serde_json::from_str(json).unwrap();
/// assert_eq!(response.body, Some(BodyView::Text("{}".into())));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResponseView {
    /// The status code.
    pub status: u16,
    /// The recorded headers as `[name, value]` pairs, in order (values that are not UTF-8 are
    /// shown lossily).
    pub headers: Vec<(String, String)>,
    /// The body's length in bytes.
    pub body_len: usize,
    /// The body, only when the inspection asked for it.
    pub body: Option<BodyView>,
}

/// A recorded body: as text when it is UTF-8, else as hex. Serialized as `{"text": "…"}` or
/// `{"hex": "…"}`.
///
/// ```
/// use idem_runtime::operator::BodyView;
///
/// assert_eq!(serde_json::to_string(&BodyView::Hex("ff00".into())).unwrap(), r#"{"hex":"ff00"}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BodyView {
    /// A UTF-8 body.
    Text(String),
    /// Any other body, in lower-case hex.
    Hex(String),
}

impl BodyView {
    fn of(body: &[u8]) -> Self {
        match std::str::from_utf8(body) {
            Ok(text) => Self::Text(text.to_owned()),
            Err(_) => Self::Hex(hex(body)),
        }
    }
}

/// Whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Owner tokens as 32 lower-case hex digits (a `u128` is no JSON number).
mod owner_hex {
    use serde::{Deserialize, Deserializer, Serializer, de};

    use crate::store::OwnerToken;

    // An `Option` field, as serde's `with` hands it over.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(
        owner: &Option<OwnerToken>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match owner {
            Some(owner) => required::serialize(owner, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<OwnerToken>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| parse(&text))
            .transpose()
    }

    fn parse<E: de::Error>(text: &str) -> Result<OwnerToken, E> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(E::custom("an owner token is 32 hex digits"));
        }
        u128::from_str_radix(text, 16)
            .map(OwnerToken)
            .map_err(E::custom)
    }

    pub(super) mod required {
        use serde::{Deserialize, Deserializer, Serializer};

        use crate::store::OwnerToken;

        pub(in super::super) fn serialize<S: Serializer>(
            owner: &OwnerToken,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.serialize_str(&format!("{:032x}", owner.0))
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<OwnerToken, D::Error> {
            super::parse(&String::deserialize(deserializer)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderValue, StatusCode, header};

    use super::*;
    use crate::record::StoredResponse;

    #[test]
    fn bodies_show_only_when_asked_and_as_text_or_hex() {
        let result = RecordedResult::Response(StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![(header::LOCATION, HeaderValue::from_static("/p/1"))],
            body: Bytes::from_static(b"{\"id\":1}"),
        });
        let hidden = ResultView::new(&result, false);
        let ResultView::Response(response) = &hidden else {
            panic!("{hidden:?}");
        };
        assert_eq!(response.status, 201);
        assert_eq!(response.headers, [("location".into(), "/p/1".into())]);
        assert_eq!((response.body_len, &response.body), (8, &None));
        let shown = ResultView::new(&result, true);
        let json = serde_json::to_value(&shown).unwrap();
        assert_eq!(json["kind"], "response");
        assert_eq!(json["body"]["text"], "{\"id\":1}");
        assert_eq!(BodyView::of(&[0xff, 0]), BodyView::Hex("ff00".into()));
        assert_eq!(
            ResultView::new(&RecordedResult::TooLarge, true),
            ResultView::TooLarge
        );
    }

    #[test]
    fn owner_tokens_round_trip_as_hex_and_bad_ones_are_refused() {
        let lease = StaleLease::new(OwnerToken(u128::MAX - 1), LeaseDeadline(7));
        let json = serde_json::to_string(&lease).unwrap();
        assert_eq!(serde_json::from_str::<StaleLease>(&json).unwrap(), lease);
        for owner in [
            "\"2a\"",
            "\"zz000000000000000000000000000000\"",
            "42",
            "null",
        ] {
            let json = format!("{{\"owner\": {owner}, \"lease_deadline\": 1}}");
            assert!(serde_json::from_str::<StaleLease>(&json).is_err(), "{json}");
        }
    }
}
