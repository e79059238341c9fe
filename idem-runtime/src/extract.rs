//! Extractors: the wrapper `#[idempotent]` puts around a handler's last extractor, and
//! [`IdempotencyContext`], through which a handler sees its own key and epoch.
//!
//! [`Idempotent<T>`] runs wherever `T` would: it reads the `Idempotency-Key` header, buffers the body
//! once (honouring axum's [`DefaultBodyLimit`](axum::extract::DefaultBodyLimit): an oversized body
//! is a `413 payload-too-large` problem, a body that fails mid-read a `400 request-body-unreadable`
//! one) and fingerprints the request. `T` itself runs later:
//! [`execute`](crate::execute) skips it for a replay answered from process memory (the body is not
//! parsed again), and otherwise extracts it from the same bytes (no copy) before the store is
//! asked, so `T`'s rejection is returned unchanged before any record exists and a corrected retry
//! with the same key runs normally.
//!
//! ```
//! use axum::Json;
//! use idem_runtime::IdempotencyContext;
//!
//! #[idem_runtime::idempotent(required = true)]
//! async fn transfer(context: IdempotencyContext, Json(amount): Json<u64>) -> String {
//!     // The epoch grows each time a crashed attempt is taken over: a fencing token for side effects.
//!     format!("transfer {amount} at epoch {}", context.epoch().unwrap_or(0))
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::RequestExt;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, OriginalUri, Request};
use axum::response::{IntoResponse, Response};
use http::Method;
use http::request::Parts;
use http_body_util::BodyExt;

use crate::config::Idempotency;
use crate::fingerprint::{Fingerprint, RecordKey};
use crate::key::{IdempotencyKey, KeyError};
use crate::problem::{Problem, ProblemKind};
use crate::store::{OwnerToken, TransactionHandle};

/// The wrapper `#[idempotent]` puts around a handler's last extractor `T`.
///
/// Implements [`FromRequest`] for every `T` that does (body extractors and parts extractors
/// alike), through its own marker type so it never overlaps axum's impls. It reads the key and
/// fingerprints the request; `T` is extracted later, by [`execute`](crate::execute) unless the
/// request is answered from memory, or at once by [`Idempotent::extract`].
pub struct Idempotent<T> {
    request: IdempotentRequest,
    extraction: Extraction<T>,
}

/// `T`'s extractor, ready to run on the request (or on its buffered parts and body).
pub(crate) type Extraction<T> = Box<dyn FnOnce() -> Extracting<T> + Send>;

/// `T`'s extractor running: `T`, or its rejection as a response.
pub(crate) type Extracting<T> = Pin<Box<dyn Future<Output = Result<T, Response>> + Send>>;

impl<T> Idempotent<T> {
    /// Runs `T`'s extractor now and splits into the request's idempotency data (for
    /// [`execute_extracted`](crate::execute_extracted)) and `T`, or returns `T`'s rejection.
    ///
    /// Needed only when something the idempotency check depends on (the scope) comes out of `T`
    /// itself; otherwise hand the wrapper to [`execute`](crate::execute), which does not extract
    /// `T` for a replay answered from memory.
    ///
    /// # Errors
    ///
    /// `T`'s rejection, as a response.
    pub async fn extract(self) -> Result<(IdempotentRequest, T), Response> {
        let inner = (self.extraction)().await?;
        Ok((self.request, inner))
    }

    pub(crate) fn into_deferred(self) -> (IdempotentRequest, Extraction<T>) {
        (self.request, self.extraction)
    }
}

impl<T> fmt::Debug for Idempotent<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

/// What [`Idempotent`] learned about a request, consumed by [`execute`](crate::execute).
#[derive(Debug)]
pub struct IdempotentRequest {
    pub(crate) mode: Mode,
    /// The store's transaction for this request, when the handler asked for one.
    pub(crate) transaction: Option<TransactionHandle>,
}

#[derive(Debug)]
pub(crate) enum Mode {
    /// A safe method: idempotency does not apply.
    Bypass(Idempotency),
    /// No `Idempotency-Key` header.
    NoKey(Idempotency),
    /// A malformed key: `400`, unless the route only reports.
    InvalidKey(Idempotency, KeyError),
    /// A valid key: the request takes part.
    Keyed(Keyed),
}

#[derive(Debug)]
pub(crate) struct Keyed {
    pub(crate) runtime: Idempotency,
    pub(crate) key: IdempotencyKey,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) context: Option<Arc<ContextState>>,
    /// The claim an outer router-wide layer made for this request, if any.
    pub(crate) claim: Option<Arc<LayerClaim>>,
    pub(crate) method: Method,
    pub(crate) matched: Option<MatchedPath>,
    /// The value of the runtime's request-id header, recorded with the result.
    pub(crate) request_id: Option<http::HeaderValue>,
}

/// A record an outer router-wide layer acquired for this request before routing it on, offered to
/// the route's own idempotency (the attribute, or an inner layer's policy). That participant takes
/// it: it adopts the claim when its own record key and fingerprint are the claim's, and otherwise
/// releases it and claims its own record; either way the layer then only passes the response on.
/// The participant also tells the layer that the route has idempotency of its own, so that the
/// layer leaves the route's later requests to it.
#[derive(Debug)]
pub(crate) struct LayerClaim {
    pub(crate) record: RecordKey,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) owner: OwnerToken,
    pub(crate) epoch: u64,
    /// When the lease was asked for, and how long it lasts from each renewal.
    pub(crate) leased_at: tokio::time::Instant,
    pub(crate) lease: Duration,
    taken: AtomicBool,
    /// The routes (method, matched path) that the layer leaves to their own idempotency.
    participants: Arc<Participants>,
}

impl LayerClaim {
    pub(crate) fn new(
        record: RecordKey,
        fingerprint: Fingerprint,
        owner: OwnerToken,
        epoch: u64,
        leased_at: tokio::time::Instant,
        lease: Duration,
        participants: Arc<Participants>,
    ) -> Self {
        Self {
            record,
            fingerprint,
            owner,
            epoch,
            leased_at,
            lease,
            taken: AtomicBool::new(false),
            participants,
        }
    }

    /// Marks the claim as taken by the route's own idempotency, which registers `route`.
    pub(crate) fn take(&self, method: &Method, route: Option<&str>) {
        self.taken.store(true, Ordering::Release);
        if let Some(route) = route {
            self.participants.insert(method, route);
        }
    }

    /// Whether the route's own idempotency took the claim (the layer then records nothing).
    pub(crate) fn is_taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }
}

/// The routes a router-wide layer has seen handled by idempotency of their own.
#[derive(Debug, Default)]
/// Keyed by route, so that a lookup (on every covered request) hashes the borrowed path and
/// allocates nothing; a route has at most a few methods.
pub(crate) struct Participants(std::sync::RwLock<std::collections::HashMap<Box<str>, Vec<Method>>>);

impl Participants {
    pub(crate) fn contains(&self, method: &Method, route: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(route)
            .is_some_and(|methods| methods.contains(method))
    }

    fn insert(&self, method: &Method, route: &str) {
        if self.contains(method, route) {
            return;
        }
        let mut routes = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let methods = routes.entry(route.into()).or_default();
        if !methods.contains(method) {
            methods.push(method.clone());
        }
    }
}

/// The marker that keeps [`Idempotent`]'s `FromRequest` impl apart from axum's.
#[doc(hidden)]
#[derive(Debug)]
pub struct Marker<M>(PhantomData<fn() -> M>);

impl<S, T, M> FromRequest<S, Marker<M>> for Idempotent<T>
where
    S: Clone + Send + Sync + 'static,
    T: FromRequest<S, M> + Send + 'static,
    M: 'static,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut request = request;
        // Taken, not cloned: the layer put it there for this request only.
        let Some(runtime) = request.extensions_mut().remove::<Idempotency>() else {
            return Err(not_configured(&request));
        };
        let transaction = request.extensions_mut().remove::<TransactionHandle>();
        let state = state.clone();
        let (mode, extraction): (Mode, Extraction<T>) = match read(runtime, request).await? {
            Read::Bypass(runtime, request) => (
                Mode::Bypass(runtime),
                Box::new(move || Box::pin(whole(request, state))),
            ),
            Read::NoKey(runtime, request) => (
                Mode::NoKey(runtime),
                Box::new(move || Box::pin(whole(request, state))),
            ),
            Read::InvalidKey(runtime, error, request) => (
                Mode::InvalidKey(runtime, error),
                Box::new(move || Box::pin(whole(request, state))),
            ),
            // The request is rebuilt only if `T` runs: a replay never needs it.
            Read::Keyed(keyed, parts, bytes) => (
                Mode::Keyed(keyed),
                Box::new(move || Box::pin(buffered(parts, bytes, state))),
            ),
        };
        Ok(Self {
            request: IdempotentRequest { mode, transaction },
            extraction,
        })
    }
}

/// A request as idem reads it, before anything runs.
pub(crate) enum Read {
    /// A safe method: idempotency does not apply; the request is untouched.
    Bypass(Idempotency, Request),
    /// No key; the request is untouched.
    NoKey(Idempotency, Request),
    /// A malformed key; the request is untouched.
    InvalidKey(Idempotency, KeyError, Request),
    /// A valid key: the body was buffered and the request fingerprinted. The parts and the bytes
    /// rebuild the request.
    Keyed(Keyed, Parts, Bytes),
}

/// Reads the key, then, for a keyed request, buffers the body within axum's body limit (`413` or
/// `400` problems) and fingerprints the request. The route decides what a missing or malformed key
/// means. Used by the attribute's wrapper; the router-wide layer uses the same pieces.
pub(crate) async fn read(runtime: Idempotency, request: Request) -> Result<Read, Response> {
    if is_safe(request.method()) {
        return Ok(Read::Bypass(runtime, request));
    }
    match read_key(&runtime, &request) {
        Err(error) => Ok(Read::InvalidKey(runtime, error, request)),
        Ok(None) => Ok(Read::NoKey(runtime, request)),
        Ok(Some(key)) => {
            let (keyed, parts, bytes) = read_body(runtime, key, request).await?;
            Ok(Read::Keyed(keyed, parts, bytes))
        }
    }
}

/// The request's key, `None` without one.
pub(crate) fn read_key(
    runtime: &Idempotency,
    request: &Request,
) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::from_header(request.headers(), runtime.key_header())
}

/// The `400 idempotency-key-invalid` answer to a malformed key.
pub(crate) fn key_invalid(runtime: &Idempotency, error: KeyError) -> Response {
    tracing::debug!(%error, outcome = "rejected", "invalid Idempotency-Key");
    let problem = Problem::new(ProblemKind::KeyInvalid, error.to_string());
    runtime.problem_response(&problem)
}

/// Buffers the body of a keyed request and fingerprints it.
pub(crate) async fn read_body(
    runtime: Idempotency,
    key: IdempotencyKey,
    request: Request,
) -> Result<(Keyed, Parts, Bytes), Response> {
    let declared = http_body::Body::size_hint(request.body()).lower();
    let (mut parts, body) = request.with_limited_body().into_parts();
    // A declared length over the limit is refused now, not after waiting for bytes that a
    // hostile client may never send.
    if http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|limit| declared > limit)
    {
        return Err(runtime.problem_response(&Problem::of(ProblemKind::PayloadTooLarge)));
    }
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => return Err(runtime.problem_response(&body_error(&error))),
    };
    let context = parts.extensions.remove::<Arc<ContextState>>();
    let claim = parts.extensions.remove::<Arc<LayerClaim>>();
    let fingerprint = fingerprint(&parts, &bytes);
    let request_id = runtime
        .request_id_header()
        .and_then(|name| parts.headers.get(name))
        .cloned();
    let keyed = Keyed {
        method: parts.method.clone(),
        matched: parts.extensions.get::<MatchedPath>().cloned(),
        request_id,
        runtime,
        key,
        fingerprint,
        context,
        claim,
    };
    Ok((keyed, parts, bytes))
}

/// Extracts `T` from a request as it came.
async fn whole<S, T, M>(request: Request, state: S) -> Result<T, Response>
where
    S: Send + Sync,
    T: FromRequest<S, M>,
{
    extract(request, &state).await
}

/// Extracts `T` from a request whose body was buffered: `T` gets the same bytes.
async fn buffered<S, T, M>(parts: Parts, bytes: Bytes, state: S) -> Result<T, Response>
where
    S: Send + Sync,
    T: FromRequest<S, M>,
{
    whole(Request::from_parts(parts, Body::from(bytes)), state).await
}

async fn extract<S, T, M>(request: Request, state: &S) -> Result<T, Response>
where
    S: Send + Sync,
    T: FromRequest<S, M>,
{
    T::from_request(request, state)
        .await
        .map_err(IntoResponse::into_response)
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

fn fingerprint(parts: &Parts, body: &[u8]) -> Fingerprint {
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    // Under `Router::nest` the request URI has lost its prefix; the original one has not.
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |original| &original.0);
    Fingerprint::of(
        &parts.method,
        route,
        uri.path(),
        uri.query().unwrap_or(""),
        body,
    )
}

/// Why the body could not be buffered, as a problem: `413` past the body limit, else `400` (the
/// statuses axum's own `Bytes` extractor gives).
fn body_error(error: &axum::Error) -> Problem {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<http_body_util::LengthLimitError>() {
            return Problem::of(ProblemKind::PayloadTooLarge);
        }
        source = current.source();
    }
    Problem::of(ProblemKind::BodyUnreadable)
}

fn not_configured(request: &Request) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("?", MatchedPath::as_str);
    tracing::error!(
        route,
        "an #[idempotent] handler ran without the idem runtime: add `.layer(idempotency.layer())` to \
         the Router after this route (see idem_runtime::Idempotency::layer)"
    );
    // No runtime, so no configured renderer: the default one.
    Problem::of(ProblemKind::NotConfigured).into_response()
}

/// A handler's view of its own idempotency: the key, the epoch, whether the lease was lost.
///
/// Extract it anywhere before the handler's last parameter. Outside an idempotent execution (no
/// key, a safe method) every accessor returns `None`/`false`.
#[derive(Debug, Clone)]
pub struct IdempotencyContext {
    state: Arc<ContextState>,
}

#[derive(Debug, Default)]
pub(crate) struct ContextState {
    key: std::sync::OnceLock<IdempotencyKey>,
    epoch: AtomicU64,
    lease_lost: AtomicBool,
}

impl ContextState {
    /// A context for an execution the router-wide layer runs: the handler's
    /// [`IdempotencyContext`] finds it in the request's extensions.
    pub(crate) fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub(crate) fn enter(&self, key: &IdempotencyKey, epoch: u64) {
        let _ = self.key.set(key.clone());
        self.epoch.store(epoch, Ordering::Release);
    }

    pub(crate) fn lose_lease(&self) {
        self.lease_lost.store(true, Ordering::Release);
    }
}

impl IdempotencyContext {
    /// The client's key, when this execution is idempotent.
    pub fn key(&self) -> Option<&str> {
        self.state.key.get().map(IdempotencyKey::as_str)
    }

    /// The attempt number for this key (1 for the first; higher after a crashed attempt's lease
    /// expired and this one took over). Use it as a fencing token: a side effect tagged with an
    /// epoch lower than one already seen comes from a stale attempt.
    pub fn epoch(&self) -> Option<u64> {
        match self.state.epoch.load(Ordering::Acquire) {
            0 => None,
            epoch => Some(epoch),
        }
    }

    /// Whether this attempt may have lost its lease: a renewal was refused (another attempt took
    /// over), renewals failed until the lease ran out, or the handler ran past `max_run_time` and
    /// one more lease. Another attempt may then run; act only with a fence (the
    /// [`epoch`](Self::epoch)). The result is still recorded if no other attempt took over before
    /// this one finished.
    pub fn lease_lost(&self) -> bool {
        self.state.lease_lost.load(Ordering::Acquire)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // A router-wide layer put one there for its own execution; otherwise the wrapper finds
        // this one.
        if let Some(state) = parts.extensions.get::<Arc<ContextState>>() {
            return Ok(Self {
                state: Arc::clone(state),
            });
        }
        let state = Arc::new(ContextState::default());
        parts.extensions.insert(Arc::clone(&state));
        Ok(Self { state })
    }
}
