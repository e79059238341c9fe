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

use axum::RequestExt;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, OriginalUri, Request};
use axum::response::{IntoResponse, Response};
use http::Method;
use http::request::Parts;
use http_body_util::BodyExt;

use crate::config::Idempotency;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::problem::{Problem, ProblemKind};

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
}

#[derive(Debug)]
pub(crate) enum Mode {
    /// A safe method: idempotency does not apply.
    Bypass,
    /// No `Idempotency-Key` header.
    NoKey(Idempotency),
    /// A valid key: the request takes part.
    Keyed(Keyed),
}

#[derive(Debug)]
pub(crate) struct Keyed {
    pub(crate) runtime: Idempotency,
    pub(crate) key: IdempotencyKey,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) context: Option<Arc<ContextState>>,
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
        let deferred = |request: Request| -> Extraction<T> {
            let state = state.clone();
            Box::new(move || Box::pin(whole(request, state)))
        };
        if is_safe(request.method()) {
            return Ok(Self {
                request: IdempotentRequest { mode: Mode::Bypass },
                extraction: deferred(request),
            });
        }
        let key = match IdempotencyKey::from_headers(request.headers()) {
            Ok(Some(key)) => key,
            Ok(None) => {
                return Ok(Self {
                    request: IdempotentRequest {
                        mode: Mode::NoKey(runtime),
                    },
                    extraction: deferred(request),
                });
            }
            Err(error) => {
                tracing::debug!(%error, outcome = "rejected", "invalid Idempotency-Key");
                let problem = Problem::new(ProblemKind::KeyInvalid, error.to_string());
                return Err(runtime.problem_response(&problem));
            }
        };

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
        let fingerprint = fingerprint(&parts, &bytes);
        let keyed = Keyed {
            runtime,
            key,
            fingerprint,
            context,
        };
        let state = state.clone();
        Ok(Self {
            request: IdempotentRequest {
                mode: Mode::Keyed(keyed),
            },
            // The request is rebuilt only if `T` runs: a replay never needs it.
            extraction: Box::new(move || Box::pin(buffered(parts, bytes, state))),
        })
    }
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
        let state = Arc::new(ContextState::default());
        parts.extensions.insert(Arc::clone(&state));
        Ok(Self { state })
    }
}
