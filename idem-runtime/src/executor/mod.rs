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
//! * this module: what can be answered at once (a missing key, a replay from process memory), for
//!   the attribute ([`execute`]) and the router-wide layer alike;
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
use std::sync::Arc;

use axum::extract::MatchedPath;
use axum::response::{IntoResponse, Response};
use tracing::{Instrument as _, field};

pub use self::respond::{IDEMPOTENT_REPLAYED, IDEMPOTENT_UNPROTECTED, ORIGINAL_REQUEST};
use crate::config::{Idempotency, RouteConfig, RouteRef};
use crate::extract::{Idempotent, IdempotentRequest, Keyed, LayerClaim, Mode, Participants};
use crate::fingerprint::{RecordKey, Scope};
use crate::problem::{Problem, ProblemKind};
use crate::store::{Cached, ReleaseRequest, TransactionHandle};

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
///
/// Under a router-wide layer that already claimed the request's record, the attribute's settings
/// win: the claim is adopted when the attribute names the same record, and given back otherwise.
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
    let settled = settle(request, RouteRef::Static(route), route.handler, &scope);
    async move {
        let pending = match settled {
            Settled::Answered(response) => return response,
            Settled::Pending(pending) => pending,
        };
        match extraction().await {
            Ok(argument) => pending.finish(Work::Ready(boxed(handler(argument)))).await,
            // The extractor's rejection: nothing ran, no record was asked for.
            Err(rejection) => {
                pending.give_back().await;
                rejection
            }
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
    let settled = settle(request, RouteRef::Static(route), route.handler, &scope);
    async move {
        match settled {
            Settled::Answered(response) => response,
            Settled::Pending(pending) => pending.finish(Work::Ready(boxed(handler))).await,
        }
    }
}

/// The router-wide layer's entry: like [`execute`], where the handler is the rest of the service
/// stack, called with the claim the layer made (if it made one) so that the route's own
/// idempotency can take it.
pub(crate) fn execute_layered(
    request: IdempotentRequest,
    route: RouteRef,
    label: &str,
    scope: &Scope,
    participants: Arc<Participants>,
    call: LayerCall,
) -> impl Future<Output = Response> + Send + use<> {
    let settled = settle(request, route, label, scope);
    async move {
        match settled {
            Settled::Answered(response) => response,
            Settled::Pending(pending) => {
                pending.finish(Work::Deferred { call, participants }).await
            }
        }
    }
}

/// The rest of a router-wide layer's stack, to be called with the layer's claim (none when the
/// request runs without a record).
pub(crate) type LayerCall = Box<dyn FnOnce(Option<Arc<LayerClaim>>) -> Running + Send>;

/// The handler, its argument extracted: boxed, so that everything past this point is compiled
/// once and holds no handler types.
pub(crate) type Running = Pin<Box<dyn Future<Output = Response> + Send>>;

fn boxed<F, R>(handler: F) -> Running
where
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    Box::pin(async move { handler.await.into_response() })
}

/// What runs once the record is owned.
enum Work {
    /// The handler, ready.
    Ready(Running),
    /// The rest of a router-wide layer's stack, told of the layer's claim; `participants` is where
    /// the route's own idempotency registers when it takes the claim.
    Deferred {
        call: LayerCall,
        participants: Arc<Participants>,
    },
}

/// What can be decided about a request without waiting.
enum Settled {
    Answered(Response),
    Pending(Pending),
}

/// A request that has to run its handler's extractor, then (for a keyed one) ask the store. It
/// lives once per request, inside the request's future: boxing the keyed variant would only add
/// an allocation.
#[allow(clippy::large_enum_variant)]
enum Pending {
    /// Idempotency does not apply: a safe method, or no key on a route that does not need one.
    /// A transaction the handler opens is committed when the route would record the response.
    Plain {
        runtime: Idempotency,
        transaction: Option<TransactionHandle>,
        route: RouteRef,
    },
    Keyed {
        keyed: Keyed,
        record: RecordKey,
        route: RouteRef,
        span: tracing::Span,
        /// An outer layer's claim on this very record, adopted instead of acquiring.
        adopted: Option<Arc<LayerClaim>>,
        /// The store's transaction the claim is made in (transactional mode).
        transaction: Option<TransactionHandle>,
    },
}

/// Answers what needs no waiting: a missing key, and a completed record held in process memory
/// (the handler's extractor never runs for it, so such a replay does not parse the body). An outer
/// layer's claim is taken here: adopted if it names this request's record, given back otherwise.
fn settle(request: IdempotentRequest, route: RouteRef, label: &str, scope: &Scope) -> Settled {
    let transaction = request.transaction;
    let plain = |runtime, route, transaction| {
        Settled::Pending(Pending::Plain {
            runtime,
            transaction,
            route,
        })
    };
    match request.mode {
        Mode::NoKey(runtime) if route.required => {
            if route.report_only {
                report(label, "rejected", "idempotency key missing");
                return plain(runtime, route, transaction);
            }
            tracing::debug!(
                route = label,
                outcome = "rejected",
                "idempotency key missing"
            );
            let problem = Problem::of(ProblemKind::KeyMissing);
            Settled::Answered(runtime.problem_response(&problem))
        }
        Mode::InvalidKey(runtime, error) => {
            if route.report_only {
                report(label, "rejected", "invalid Idempotency-Key");
                return plain(runtime, route, transaction);
            }
            Settled::Answered(crate::extract::key_invalid(&runtime, error))
        }
        Mode::Bypass(runtime) | Mode::NoKey(runtime) => plain(runtime, route, transaction),
        Mode::Keyed(mut keyed) => {
            let record = RecordKey::new(scope, &keyed.key);
            let span = tracing::debug_span!(
                "idempotency",
                route = label,
                key = %record.short(),
                outcome = field::Empty,
                epoch = field::Empty,
            );
            let adopted = take_layer_claim(&mut keyed, &record, transaction.is_some());
            if adopted.is_none()
                && let Some(answer) = keyed.runtime.store().cached(&record, &keyed.fingerprint)
            {
                if route.report_only {
                    let would = match answer {
                        Cached::Completed { .. } => "replayed",
                        Cached::Mismatch => "mismatch",
                    };
                    report(label, would, "answered from memory");
                    return plain(keyed.runtime, route, transaction);
                }
                let response = span.in_scope(|| respond::cached(&keyed.runtime, answer));
                return Settled::Answered(response);
            }
            Settled::Pending(Pending::Keyed {
                keyed,
                record,
                route,
                span,
                adopted,
                transaction,
            })
        }
    }
}

/// Takes an outer router-wide layer's claim, if there is one: adopted when it names this request's
/// record and fingerprint (and the claim is not to be made in the handler's transaction), otherwise
/// given back (released) so that this request claims its own record as usual.
fn take_layer_claim(
    keyed: &mut Keyed,
    record: &RecordKey,
    transactional: bool,
) -> Option<Arc<LayerClaim>> {
    let claim = keyed.claim.take()?;
    claim.take(
        &keyed.method,
        keyed.matched.as_ref().map(MatchedPath::as_str),
    );
    if !transactional && claim.record == *record && claim.fingerprint == keyed.fingerprint {
        return Some(claim);
    }
    let store = Arc::clone(keyed.runtime.store());
    keyed.runtime.spawn(async move {
        let release = ReleaseRequest::new(&claim.record, claim.owner);
        if let Err(error) = store.release(release).await {
            tracing::debug!(%error, "giving back a router-wide claim failed; its lease will expire");
        }
    });
    None
}

impl Pending {
    /// The rest of the request once the handler's argument is extracted: the handler alone for a
    /// plain request, the store and the handler for a keyed one.
    async fn finish(self, work: Work) -> Response {
        match self {
            Self::Plain {
                runtime,
                transaction,
                route,
            } => {
                let response = match work {
                    Work::Ready(handler) => handler.await,
                    Work::Deferred { call, .. } => call(None).await,
                };
                match transaction {
                    None => response,
                    Some(transaction) => {
                        claim::settle_plain(&runtime, &transaction, &route, response).await
                    }
                }
            }
            Self::Keyed {
                keyed,
                record,
                route,
                span,
                adopted,
                transaction,
            } => {
                claim::run(keyed, record, route, work, adopted, transaction)
                    .instrument(span)
                    .await
            }
        }
    }

    /// The handler's extractor rejected the request: an adopted claim is released (nothing ran),
    /// so that a corrected retry runs normally.
    async fn give_back(self) {
        if let Self::Keyed {
            keyed,
            adopted: Some(claim),
            ..
        } = self
        {
            let release = ReleaseRequest::new(&claim.record, claim.owner);
            if let Err(error) = keyed.runtime.store().release(release).await {
                tracing::debug!(%error, "releasing a rejected request's claim failed; its lease will expire");
            }
        }
    }
}

/// Records the request's outcome on its span.
fn outcome(outcome: &'static str) {
    tracing::Span::current().record("outcome", outcome);
}

/// A report-only route's note of what idem would have answered (`would`: an outcome) instead of
/// running the handler.
fn report(label: &str, would: &'static str, why: &str) {
    tracing::info!(
        route = label,
        outcome = "report_only",
        would,
        "report-only: the request runs, but idempotency would have answered it ({why})"
    );
}

#[cfg(test)]
mod tests;
