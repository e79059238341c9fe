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
//!
//! The pieces, in the order a request meets them:
//!
//! * this module: what can be answered at once (a missing key, a replay from process memory);
//! * `claim`: asking the store for the record, waiting out a duplicate in flight if the route says so;
//! * `attempt`: running the handler that owns the record to the end, even if its client goes away,
//!   and recording or releasing its response;
//! * `lease`: the owned record's lease: renewing it, completing, releasing;
//! * `respond`: the responses the executor itself builds (replays, problems) and the capture of the
//!   handler's response for recording.

mod attempt;
mod claim;
mod lease;
mod respond;

use std::future::Future;
use std::pin::Pin;

use axum::response::{IntoResponse, Response};
use tracing::{Instrument as _, field};

pub use self::respond::{IDEMPOTENT_REPLAYED, IDEMPOTENT_UNPROTECTED};
use crate::config::RouteConfig;
use crate::extract::{Idempotent, IdempotentRequest, Keyed, Mode};
use crate::fingerprint::{RecordKey, Scope};
use crate::problem::{Problem, ProblemKind};

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
    let settled = settle(request, route, &scope);
    async move {
        let pending = match settled {
            Settled::Answered(response) => return response,
            Settled::Pending(pending) => pending,
        };
        match extraction().await {
            Ok(argument) => pending.finish(route, boxed(handler(argument))).await,
            // The extractor's rejection: nothing ran, no record was asked for.
            Err(rejection) => rejection,
        }
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
    let settled = settle(request, route, &scope);
    async move {
        match settled {
            Settled::Answered(response) => response,
            Settled::Pending(pending) => pending.finish(route, boxed(handler)).await,
        }
    }
}

/// The handler, its argument extracted: boxed, so that everything past this point is compiled
/// once and holds no handler types.
type Running = Pin<Box<dyn Future<Output = Response> + Send>>;

fn boxed<F, R>(handler: F) -> Running
where
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    Box::pin(async move { handler.await.into_response() })
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
            let problem = Problem::of(ProblemKind::KeyMissing);
            Settled::Answered(runtime.problem_response(&problem))
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
            match keyed.runtime.store().cached(&record, &keyed.fingerprint) {
                Some(answer) => {
                    let response = span.in_scope(|| respond::cached(&keyed.runtime, answer));
                    Settled::Answered(response)
                }
                None => Settled::Pending(Pending::Keyed {
                    keyed,
                    record,
                    span,
                }),
            }
        }
    }
}

impl Pending {
    /// The rest of the request once the handler's argument is extracted: the handler alone for a
    /// plain request, the store and the handler for a keyed one.
    async fn finish(self, route: &'static RouteConfig, handler: Running) -> Response {
        match self {
            Self::Plain => handler.await,
            Self::Keyed {
                keyed,
                record,
                span,
            } => {
                claim::run(keyed, record, route, handler)
                    .instrument(span)
                    .await
            }
        }
    }
}

/// Records the request's outcome on its span.
fn outcome(outcome: &'static str) {
    tracing::Span::current().record("outcome", outcome);
}

#[cfg(test)]
mod tests;
