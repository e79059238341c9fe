//! The executor `#[idempotent]` calls: acquire, run or replay, record.
//!
//! [`execute`] is the whole per-request flow; the macro's expansion is one call to it. Written by
//! hand, an idempotent handler is:
//!
//! ```
//! use axum::{Json, response::Response};
//! use idem_runtime::{execute, Idempotent, RouteConfig, Scope};
//!
//! async fn create(Json(amount): Json<u64>) -> String {
//!     format!("charged {amount}")
//! }
//!
//! static ROUTE: RouteConfig = RouteConfig::new("create").required(true);
//!
//! async fn create_idempotent(body: Idempotent<Json<u64>>) -> Response {
//!     // `Json` is extracted only if `create` runs: a replay never parses the body.
//!     execute(body, &ROUTE, Scope::NONE, create).await
//! }
//! # let _: axum::routing::MethodRouter = axum::routing::post(create_idempotent);
//! ```
//!
//! When the scope comes out of the wrapped extractor itself, extract it first with
//! [`Idempotent::extract`](crate::Idempotent::extract) and call [`execute_extracted`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::{HeaderName, HeaderValue};
use http_body_util::BodyExt;
use tracing::{Instrument as _, field};

use crate::config::{RouteConfig, Runtime};
use crate::extract::{ContextState, Extracting, Idempotent, IdempotentRequest, Keyed, Mode};
use crate::fingerprint::{Fingerprint, RecordKey, Scope};
use crate::problem::{Problem, ProblemKind};
use crate::record::{RecordedResult, StoredResponse};
use crate::store::{AcquireRequest, Acquired, CompleteRequest, OwnerToken, StoreError};

/// The response header marking a replayed response: `Idempotent-Replayed: true`.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The response header marking a response produced without idempotency because the store was
/// unavailable and the runtime fails open: `Idempotent-Unprotected: true`.
pub static IDEMPOTENT_UNPROTECTED: HeaderName = HeaderName::from_static("idempotent-unprotected");

/// How long a client is told to wait before retrying a request still in progress.
const IN_PROGRESS_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a client is told to wait when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Runs one request of an `#[idempotent]` route: `handler` is called with the wrapped extractor's
/// `T` only if the request is to run.
///
/// * A safe method, or no key on a route that does not require one: extracts `T` and runs
///   `handler` as usual.
/// * No key on a route that requires one: `400 idempotency-key-missing`.
/// * A completed record the store holds in process memory ([`Store::cached`](crate::Store::cached))
///   is replayed at once, or is `422` for a different request: `T` is never extracted, the body
///   never parsed.
/// * Otherwise `T` is extracted (its rejection is the answer, and no record is asked for), then
///   the record for `(scope, key)` is acquired: a completed record is replayed, a different request
///   with the same key is `422`, one still in flight is `409` (or awaited, with `wait`). The request
///   that owns the record runs `handler` to the end even if its client disconnects (what is left of
///   it then moves to a task of its own), and records the response according to the route's
///   [`StorePolicy`](crate::StorePolicy).
pub fn execute<T, H, F, R>(
    request: Idempotent<T>,
    route: &'static RouteConfig,
    scope: Scope,
    handler: H,
) -> impl Future<Output = Response> + Send
where
    T: Send + 'static,
    H: FnOnce(T) -> F + Send + 'static,
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    let (request, extraction) = request.into_deferred();
    match settle(request, route, &scope) {
        Settled::Answered(response) => Execution::Answered(Some(response)),
        Settled::Pending(pending) => Execution::Extracting {
            extracting: extraction(),
            rest: Some((handler, pending)),
            route,
        },
    }
}

/// [`execute`] for a handler whose argument was already extracted with
/// [`Idempotent::extract`](crate::Idempotent::extract): `handler` is its future, run only if the
/// request is to run.
pub fn execute_extracted<F, R>(
    request: IdempotentRequest,
    route: &'static RouteConfig,
    scope: Scope,
    handler: F,
) -> impl Future<Output = Response> + Send
where
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    match settle(request, route, &scope) {
        Settled::Answered(response) => Extracted::Answered(Some(response)),
        Settled::Pending(pending) => {
            Extracted::Running(pending.finish(route, Box::pin(respond_with(handler))))
        }
    }
}

/// An [`Execution`] with no argument left to extract.
type Extracted = Execution<(), fn(()) -> std::future::Ready<()>>;

/// The handler, its argument extracted: boxed, so that the executor is compiled once and its
/// futures hold no handler types.
type Running = Pin<Box<dyn Future<Output = Response> + Send>>;

async fn respond_with<F, R>(handler: F) -> Response
where
    F: Future<Output = R>,
    R: IntoResponse,
{
    handler.await.into_response()
}

/// What [`execute`] returns. A request answered before anything had to wait (a missing key, a
/// replay from memory) builds, moves and allocates none of the executor's futures; any other
/// extracts the handler's argument (a rejection is the answer), then runs the rest boxed.
enum Execution<T, H> {
    Answered(Option<Response>),
    Extracting {
        extracting: Extracting<T>,
        /// The handler and what follows it; taken when the extraction ends.
        rest: Option<(H, Pending)>,
        route: &'static RouteConfig,
    },
    Running(Running),
}

// Nothing inside is ever pinned in place (the futures are boxed, the handler is moved out before
// it is called), so the whole may move between polls.
impl<T, H> Unpin for Execution<T, H> {}

impl<T, H, F, R> Future for Execution<T, H>
where
    H: FnOnce(T) -> F,
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let this = self.get_mut();
        loop {
            match this {
                Self::Answered(response) => {
                    // `None`: polled after it finished, a caller's bug; nothing left to answer.
                    return response.take().map_or(Poll::Pending, Poll::Ready);
                }
                Self::Extracting {
                    extracting,
                    rest,
                    route,
                } => {
                    let argument = std::task::ready!(extracting.as_mut().poll(cx));
                    let Some((handler, pending)) = rest.take() else {
                        // Never: the state moves on as soon as the rest is taken.
                        return Poll::Pending;
                    };
                    *this = match argument {
                        Ok(argument) => {
                            let running = Box::pin(respond_with(handler(argument)));
                            Self::Running(pending.finish(route, running))
                        }
                        // The extractor's rejection: nothing ran, no record was asked for.
                        Err(rejection) => Self::Answered(Some(rejection)),
                    };
                }
                Self::Running(running) => return running.as_mut().poll(cx),
            }
        }
    }
}

/// What can be decided about a request without waiting.
enum Settled {
    Answered(Response),
    Pending(Pending),
}

/// A request that has to run its handler's extractor, then (for a keyed one) ask the store.
enum Pending {
    /// Idempotency does not apply: a safe method, or no key on a route that does not need one.
    Plain,
    Keyed {
        keyed: Keyed,
        record: RecordKey,
        span: tracing::Span,
    },
}

/// Answers what needs no waiting: a missing key, and a completed record held in process memory
/// (the handler's extractor never runs for it, so such a replay does not parse the body).
fn settle(request: IdempotentRequest, route: &'static RouteConfig, scope: &Scope) -> Settled {
    match request.mode {
        Mode::NoKey(runtime) if route.required => {
            tracing::debug!(
                route = route.handler,
                outcome = "rejected",
                "idempotency key missing"
            );
            Settled::Answered(runtime.problem_response(&Problem::new(
                ProblemKind::KeyMissing,
                "this request must carry an `Idempotency-Key` header",
            )))
        }
        Mode::Bypass | Mode::NoKey(_) => Settled::Pending(Pending::Plain),
        Mode::Keyed(keyed) => {
            let record = RecordKey::new(scope, &keyed.key);
            let span = tracing::debug_span!(
                "idempotency",
                route = route.handler,
                key = %record.short(),
                outcome = field::Empty,
                epoch = field::Empty,
            );
            let problem = |problem: Problem| keyed.runtime.problem_response(&problem);
            let answer = match keyed
                .runtime
                .inner
                .store
                .cached(&record, &keyed.fingerprint)
            {
                Some(Acquired::Completed { result, ttl_left }) => {
                    span.in_scope(|| replay(&result, ttl_left, &problem))
                }
                Some(Acquired::Mismatch) => span.in_scope(|| key_reused(&problem)),
                Some(Acquired::Execute { .. } | Acquired::InFlight { .. }) | None => {
                    return Settled::Pending(Pending::Keyed {
                        keyed,
                        record,
                        span,
                    });
                }
            };
            Settled::Answered(answer)
        }
    }
}

impl Pending {
    /// The rest of the request once the handler's argument is extracted: the handler alone for a
    /// plain request, the store and the handler for a keyed one.
    fn finish(self, route: &'static RouteConfig, handler: Running) -> Running {
        match self {
            Self::Plain => handler,
            Self::Keyed {
                keyed,
                record,
                span,
            } => Box::pin(run(keyed, record, route, handler).instrument(span)),
        }
    }
}

async fn run(
    keyed: Keyed,
    record: RecordKey,
    route: &'static RouteConfig,
    handler: Running,
) -> Response {
    let runtime = &keyed.runtime.inner;
    let owner = OwnerToken::generate();
    let lease = route.lease.unwrap_or(runtime.lease);
    let wait_until = route.wait.map(|wait| Instant::now() + wait);
    let mut backoff = Duration::from_millis(5);
    let problem = |problem: Problem| keyed.runtime.problem_response(&problem);
    let (epoch, leased_at) = loop {
        let request = AcquireRequest {
            key: &record,
            owner,
            fingerprint: &keyed.fingerprint,
            lease,
            retention: route.ttl,
        };
        // The lease runs from no earlier than the moment it was asked for.
        let asked_at = tokio::time::Instant::now();
        match runtime.store.acquire(request).await {
            Ok(Acquired::Execute { epoch }) => break (epoch, asked_at),
            Ok(Acquired::Completed { result, ttl_left }) => {
                return replay(&result, ttl_left, &problem);
            }
            Ok(Acquired::Mismatch) => return key_reused(&problem),
            Ok(Acquired::InFlight { lease_left }) => {
                let now = Instant::now();
                match wait_until {
                    Some(until) if until > now => {
                        tokio::time::sleep(backoff.min(until - now).min(lease_left)).await;
                        backoff = (backoff * 2).min(Duration::from_millis(100));
                    }
                    _ => {
                        outcome("conflict");
                        return problem(
                            Problem::new(
                                ProblemKind::RequestInProgress,
                                "a request with this Idempotency-Key is still being processed; retry later",
                            )
                            .with_retry_after(IN_PROGRESS_RETRY_AFTER.min(lease_left)),
                        );
                    }
                }
            }
            Err(error) if runtime.fail_open => {
                abandon(runtime, record, owner, &error);
                outcome("unprotected");
                tracing::warn!(%error, "idempotency store unavailable: running the handler unprotected (fail-open)");
                let mut response = handler.await;
                response.headers_mut().insert(
                    IDEMPOTENT_UNPROTECTED.clone(),
                    HeaderValue::from_static("true"),
                );
                return response;
            }
            Err(error) => {
                abandon(runtime, record, owner, &error);
                return store_unavailable(&error, &problem);
            }
        }
    };

    outcome("executed");
    tracing::Span::current().record("epoch", epoch);
    if let Some(context) = &keyed.context {
        context.enter(&keyed.key, epoch);
    }
    let attempt = Attempt {
        lease: LeaseHolder {
            runtime: Arc::clone(runtime),
            record,
            owner,
            fingerprint: keyed.fingerprint,
            leased_at,
            duration: lease,
            context: keyed.context,
        },
        ttl: route.ttl,
        route,
    };
    let attempt = runtime
        .tasks
        .track_future(attempt.run(handler).in_current_span());
    RunToCompletion(Some(Box::pin(attempt))).await
}

/// Polls an attempt in the request's own task and, if the request is dropped first (the client
/// went away, or the server timed it out), hands what is left of it to a task of its own, so that
/// the handler still runs to the end and its result is recorded. Running it in place spares every
/// first execution a spawned task and the wake-ups between the two tasks.
struct RunToCompletion<F: Future<Output = Response> + Send + 'static>(Option<Pin<Box<F>>>);

impl<F: Future<Output = Response> + Send + 'static> Future for RunToCompletion<F> {
    type Output = Response;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let Some(attempt) = self.0.as_mut() else {
            // Polled after it finished: a caller's bug, and nothing left to run.
            return Poll::Pending;
        };
        let response = std::task::ready!(attempt.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(response)
    }
}

impl<F: Future<Output = Response> + Send + 'static> Drop for RunToCompletion<F> {
    fn drop(&mut self) {
        let Some(attempt) = self.0.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            drop(handle.spawn(attempt));
        } else {
            // Dropped outside any runtime: there is nowhere to finish it. Its record stays in
            // flight until the lease runs out, as after a crash.
            tracing::warn!("an idempotent request was dropped outside a tokio runtime mid-handler");
        }
    }
}

/// One execution of a handler that owns its record.
struct Attempt {
    lease: LeaseHolder,
    ttl: Duration,
    route: &'static RouteConfig,
}

impl Attempt {
    /// Runs the handler (renewing the lease while it runs), then records or releases the result.
    /// Run by [`RunToCompletion`]: everything here happens even if the client has gone.
    async fn run(self, handler: Running) -> Response {
        let runtime = Arc::clone(&self.lease.runtime);
        let handler = AssertUnwindSafe(handler).catch_unwind();
        let mut handler = std::pin::pin!(handler);
        let outcome = tokio::select! {
            biased;
            outcome = &mut handler => outcome,
            () = tokio::time::sleep(self.lease.duration / 3) => {
                // A slow handler: keep its lease alive in a task of its own until it finishes.
                let heartbeat = tokio::spawn(self.lease.clone().heartbeat().in_current_span());
                let outcome = handler.await;
                heartbeat.abort();
                outcome
            }
        };
        let Ok(response) = outcome else {
            tracing::error!("the idempotent handler panicked; its key is released");
            self.lease.release().await;
            let problem = Problem::new(
                ProblemKind::HandlerPanicked,
                "the request failed unexpectedly; it may be retried",
            );
            return crate::problem::respond(runtime.problems.as_ref(), &problem);
        };
        if !self.route.store.records(response.status()) {
            tracing::debug!(
                status = response.status().as_u16(),
                "response not recorded; key released"
            );
            self.lease.release().await;
            return response;
        }
        let (parts, body) = response.into_parts();
        let headers = || StoredResponse::filter_headers(&parts.headers, &runtime.replayed_headers);
        let (result, body) = if self.route.store_body {
            match buffer(body, runtime.max_response_bytes).await {
                Buffered::Whole(bytes) => {
                    let stored = StoredResponse {
                        status: parts.status,
                        headers: headers(),
                        body: bytes.clone(),
                    };
                    (RecordedResult::Response(stored), Body::from(bytes))
                }
                Buffered::TooLarge(body) => {
                    tracing::warn!(
                        limit = runtime.max_response_bytes,
                        "response larger than max_response_bytes: recorded as not replayable"
                    );
                    (RecordedResult::TooLarge, body)
                }
                Buffered::Failed(body) => {
                    tracing::warn!("the response body failed while being recorded; key released");
                    self.lease.release().await;
                    return Response::from_parts(parts, body);
                }
            }
        } else {
            let mut headers = headers();
            headers.retain(|(name, _)| !is_body_header(name));
            let stored = StoredResponse {
                status: parts.status,
                headers,
                body: Bytes::new(),
            };
            (RecordedResult::Response(stored), body)
        };
        self.lease.complete(Arc::new(result), self.ttl).await;
        Response::from_parts(parts, body)
    }
}

/// Everything needed to act on an owned record from any task.
#[derive(Clone)]
struct LeaseHolder {
    runtime: Arc<Runtime>,
    record: RecordKey,
    owner: OwnerToken,
    fingerprint: Fingerprint,
    /// When the lease was asked for: it lasts `duration` from then unless renewed.
    leased_at: tokio::time::Instant,
    duration: Duration,
    context: Option<Arc<ContextState>>,
}

impl LeaseHolder {
    /// Renews the lease every third of its length, until the runtime's `max_run_time` has passed
    /// or the lease turns out to be lost. Aborted when the handler finishes.
    ///
    /// Once the lease can lapse (renewals stopped at `max_run_time`, or failed until the last
    /// renewed lease ran out) the handler's context reports it lost: another attempt may run.
    async fn heartbeat(self) {
        let give_up_at = Instant::now() + self.runtime.max_run_time;
        let mut lease_until = self.leased_at + self.duration;
        let period = self.duration / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if Instant::now() >= give_up_at {
                tracing::warn!("handler ran past max_run_time: its lease is no longer renewed");
                tokio::time::sleep_until(lease_until).await;
                return self.lose();
            }
            let asked_at = tokio::time::Instant::now();
            match self
                .runtime
                .store
                .renew(&self.record, self.owner, self.duration)
                .await
            {
                Ok(true) => lease_until = asked_at + self.duration,
                Ok(false) => {
                    tracing::warn!(
                        "lease lost while the handler runs: its result will not be recorded"
                    );
                    return self.lose();
                }
                // A failed renewal is retried at the next tick; the lease is still valid until
                // `lease_until`.
                Err(error) => {
                    tracing::warn!(%error, "lease renewal failed");
                    if tokio::time::Instant::now() >= lease_until {
                        self.lose();
                    }
                }
            }
        }
    }

    /// Records the result. If the store cannot be reached, keeps trying in the background for as
    /// long as the lease would last, so a retry finds the result rather than running again.
    async fn complete(self, result: Arc<RecordedResult>, ttl: Duration) {
        match self
            .runtime
            .store
            .complete(self.completion(&result, ttl))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "lease lost before completion: another attempt owns the key; result not recorded"
                );
                self.lose();
            }
            Err(error) => {
                tracing::warn!(%error, "recording the result failed; retrying in the background");
                let runtime = Arc::clone(&self.runtime);
                runtime
                    .tasks
                    .spawn(self.complete_later(result, ttl).in_current_span());
            }
        }
    }

    async fn complete_later(self, result: Arc<RecordedResult>, ttl: Duration) {
        let deadline = Instant::now() + self.duration;
        let mut pause = Duration::from_millis(50);
        while Instant::now() + pause < deadline {
            tokio::time::sleep(pause).await;
            match self
                .runtime
                .store
                .complete(self.completion(&result, ttl))
                .await
            {
                Ok(true) => return tracing::info!("result recorded after the store came back"),
                Ok(false) => return self.lose(),
                Err(_) => pause = (pause * 2).min(Duration::from_secs(1)),
            }
        }
        tracing::warn!(
            "the store stayed unreachable for the whole lease: the result was not recorded"
        );
    }

    fn completion<'a>(
        &'a self,
        result: &'a Arc<RecordedResult>,
        ttl: Duration,
    ) -> CompleteRequest<'a> {
        CompleteRequest {
            key: &self.record,
            owner: self.owner,
            fingerprint: &self.fingerprint,
            result,
            ttl,
        }
    }

    /// Gives the key up so a retry runs again. Failure is logged: the lease then simply expires.
    async fn release(&self) {
        if let Err(error) = self.runtime.store.release(&self.record, self.owner).await {
            tracing::warn!(%error, "releasing the key failed; it frees itself when the lease expires");
        }
    }

    fn lose(&self) {
        if let Some(context) = &self.context {
            context.lose_lease();
        }
    }
}

/// After an acquire that timed out: the command may still run when the store catches up, and
/// would then hold the key for an attempt nobody runs, so the client's own retry would get `409`
/// for a whole lease. A release with the same owner, sent now, runs after it (commands on one
/// connection run in order) and frees the key; if the acquire never ran, it finds nothing to do.
/// One attempt, plus one more if the connection failed, so an outage does not multiply traffic.
fn abandon(runtime: &Arc<Runtime>, record: RecordKey, owner: OwnerToken, error: &StoreError) {
    if !matches!(error, StoreError::Timeout) {
        return;
    }
    let store = Arc::clone(&runtime.store);
    runtime.tasks.spawn(
        async move {
            if let Err(StoreError::Unavailable(_)) = store.release(&record, owner).await
                && let Err(error) = store.release(&record, owner).await
            {
                tracing::debug!(%error, "releasing a timed-out acquire failed; its lease will expire");
            }
        }
        .in_current_span(),
    );
}

fn outcome(outcome: &'static str) {
    tracing::Span::current().record("outcome", outcome);
}

/// Answers with a recorded result. A result recorded as not replayable is a `409` whose
/// `Retry-After` is when the record expires and the key runs again.
fn replay(
    result: &RecordedResult,
    ttl_left: Duration,
    problem: &impl Fn(Problem) -> Response,
) -> Response {
    let RecordedResult::Response(stored) = result else {
        outcome("unavailable");
        return problem(
            Problem::new(
                ProblemKind::ResultUnavailable,
                "the first request with this Idempotency-Key completed, but its response was too large to be replayed",
            )
            .with_retry_after(ttl_left),
        );
    };
    outcome("replayed");
    let mut response = Response::new(Body::from(stored.body.clone()));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    for (name, value) in &stored.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    response
}

fn key_reused(problem: &impl Fn(Problem) -> Response) -> Response {
    outcome("mismatch");
    problem(Problem::new(
        ProblemKind::KeyReused,
        "this Idempotency-Key was already used for a different request (method, path, query or body)",
    ))
}

fn store_unavailable(error: &StoreError, problem: &impl Fn(Problem) -> Response) -> Response {
    outcome("store_error");
    tracing::warn!(%error, "idempotency store unavailable: request refused");
    problem(
        Problem::new(
            ProblemKind::StoreUnavailable,
            "the idempotency store is temporarily unavailable; the request was not processed",
        )
        .with_retry_after(STORE_RETRY_AFTER),
    )
}

fn is_body_header(name: &HeaderName) -> bool {
    [
        http::header::CONTENT_TYPE,
        http::header::CONTENT_ENCODING,
        http::header::CONTENT_LANGUAGE,
    ]
    .contains(name)
}

enum Buffered {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// Over the limit: a body that yields everything read so far and then the rest.
    TooLarge(Body),
    /// The body failed: a body that yields what was read and then the error.
    Failed(Body),
}

/// Reads `body` up to `limit` bytes without losing anything past it.
async fn buffer(mut body: Body, limit: usize) -> Buffered {
    if http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|upper| upper <= limit as u64)
    {
        return match body.collect().await {
            Ok(collected) => Buffered::Whole(collected.to_bytes()),
            Err(error) => Buffered::Failed(Body::from_stream(futures_util::stream::iter([Err::<
                Bytes,
                _,
            >(
                error,
            )]))),
        };
    }
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Whole(read.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                    if read.len() > limit {
                        return Buffered::TooLarge(prepend(read.freeze(), body));
                    }
                }
            }
            Some(Err(error)) => {
                let failed = futures_util::stream::iter([Ok(read.freeze()), Err(error)]);
                return Buffered::Failed(Body::from_stream(failed));
            }
        }
    }
}

fn prepend(head: Bytes, rest: Body) -> Body {
    use futures_util::StreamExt as _;
    let head = futures_util::stream::once(std::future::ready(Ok::<_, axum::Error>(head)));
    Body::from_stream(head.chain(rest.into_data_stream()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::routing::post;
    use http::{Request, StatusCode};
    use tower::ServiceExt as _;

    use super::*;
    use crate::store::{MemoryStore, Store, StoreFuture};
    use crate::{Idempotency, IdempotencyContext, Idempotent};

    /// A `MemoryStore` with faults: acquires that fail with `acquire_error`, renewals that fail,
    /// and a count of the releases it receives.
    #[derive(Default)]
    struct Faulty {
        memory: MemoryStore,
        acquire_error: Option<fn() -> StoreError>,
        renewals_fail: bool,
        releases: Arc<AtomicUsize>,
    }

    fn refused() -> StoreError {
        StoreError::Unavailable("connection refused".into())
    }

    impl Store for Faulty {
        fn acquire<'a>(&'a self, request: AcquireRequest<'a>) -> StoreFuture<'a, Acquired> {
            match self.acquire_error {
                Some(error) => Box::pin(std::future::ready(Err(error()))),
                None => self.memory.acquire(request),
            }
        }
        fn renew<'a>(
            &'a self,
            key: &'a RecordKey,
            owner: OwnerToken,
            lease: Duration,
        ) -> StoreFuture<'a, bool> {
            if self.renewals_fail {
                return Box::pin(std::future::ready(Err(StoreError::Timeout)));
            }
            self.memory.renew(key, owner, lease)
        }
        fn complete<'a>(&'a self, request: CompleteRequest<'a>) -> StoreFuture<'a, bool> {
            self.memory.complete(request)
        }
        fn release<'a>(&'a self, key: &'a RecordKey, owner: OwnerToken) -> StoreFuture<'a, ()> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.memory.release(key, owner)
        }
    }

    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static ROUTE: RouteConfig = RouteConfig::new("charge").required(true);

    async fn charge(body: Idempotent<String>) -> Response {
        execute(body, &ROUTE, Scope::NONE, |body| async move {
            RUNS.fetch_add(1, Ordering::SeqCst);
            body
        })
        .await
    }

    async fn send(idem: &Idempotency) -> Response {
        let app = Router::new().route("/", post(charge)).layer(idem.layer());
        let request = Request::post("/")
            .header("idempotency-key", "k")
            .body(Body::from("x"))
            .unwrap();
        app.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_store_fails_closed_unless_told_otherwise() {
        let unreachable = || Faulty {
            acquire_error: Some(refused),
            ..Faulty::default()
        };
        let closed = Idempotency::builder().store(unreachable()).build();
        let response = send(&closed).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "1");
        assert_eq!(RUNS.load(Ordering::SeqCst), 0);

        let open = Idempotency::builder()
            .store(unreachable())
            .fail_open(true)
            .build();
        let response = send(&open).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[&IDEMPOTENT_UNPROTECTED], "true");
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    }

    static GATED: RouteConfig = RouteConfig::new("gated").required(true);
    static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
    static GATED_RUNS: AtomicUsize = AtomicUsize::new(0);

    /// Waits for `GATE`, then answers with its run count.
    async fn gated(body: Idempotent<String>) -> Response {
        execute(body, &GATED, Scope::NONE, |_| async move {
            GATE.notified().await;
            format!("run {}", GATED_RUNS.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await
    }

    /// The handler runs in the request's own task; dropping that request mid-handler (what hyper
    /// does when the client goes away) must hand the rest to a task of its own, which finishes the
    /// handler and records its answer for the retry.
    #[tokio::test]
    async fn a_request_dropped_mid_handler_still_completes_and_records() {
        let idem = Idempotency::builder().build();
        let app = Router::new().route("/", post(gated)).layer(idem.layer());
        let request = || {
            Request::post("/")
                .header("idempotency-key", "dropped")
                .body(Body::from("x"))
                .unwrap()
        };
        let mut first = Box::pin(app.clone().oneshot(request()));
        for _ in 0..100 {
            if idem.running() > 0 {
                break;
            }
            assert!(futures_util::poll!(first.as_mut()).is_pending());
            tokio::task::yield_now().await;
        }
        assert_eq!(idem.running(), 1, "the handler started");
        drop(first);
        assert_eq!(idem.running(), 1, "the attempt outlives its request");
        GATE.notify_one();
        idem.shutdown().await;
        assert_eq!(GATED_RUNS.load(Ordering::SeqCst), 1);

        let retry = app.oneshot(request()).await.unwrap();
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        let body = retry.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "run 1");
        assert_eq!(GATED_RUNS.load(Ordering::SeqCst), 1);
    }

    static LONG: RouteConfig = RouteConfig::new("long").required(true);

    /// Reports whether its lease was lost soon after it started and once the lease ran out.
    async fn long(context: IdempotencyContext, body: Idempotent<String>) -> Response {
        execute(body, &LONG, Scope::NONE, |_| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let early = context.lease_lost();
            tokio::time::sleep(Duration::from_millis(400)).await;
            format!("{early} {}", context.lease_lost())
        })
        .await
    }

    #[tokio::test]
    async fn a_lease_whose_renewals_all_fail_is_lost_once_it_runs_out() {
        let idem = Idempotency::builder()
            .store(Faulty {
                renewals_fail: true,
                ..Faulty::default()
            })
            .lease(Duration::from_millis(150))
            .build();
        let app = Router::new().route("/", post(long)).layer(idem.layer());
        let request = Request::post("/")
            .header("idempotency-key", "k")
            .body(Body::from("x"))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "false true");
    }

    #[tokio::test]
    async fn only_a_timed_out_acquire_is_released_and_only_once() {
        for (error, expected) in [
            (refused as fn() -> StoreError, 0),
            (|| StoreError::Timeout, 1),
        ] {
            let releases = Arc::new(AtomicUsize::new(0));
            let store = Faulty {
                acquire_error: Some(error),
                releases: Arc::clone(&releases),
                ..Faulty::default()
            };
            let idem = Idempotency::builder().store(store).build();
            let response = send(&idem).await;
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            idem.shutdown().await;
            assert_eq!(releases.load(Ordering::SeqCst), expected, "{:?}", error());
        }
    }
}
