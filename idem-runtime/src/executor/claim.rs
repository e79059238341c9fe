//! Claiming the record: the acquire, and what each answer leads to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::Response;

use super::attempt::Attempt;
use super::lease::{Lease, abandon};
use super::{Work, outcome, respond};
use crate::config::{Idempotency, RouteRef};
use crate::extract::{Keyed, LayerClaim};
use crate::fingerprint::RecordKey;
use crate::key::IdempotencyKey;
use crate::outage::Failure;
use crate::store::TransactionHandle;
use crate::store::{AcquireRequest, Acquired, OwnerToken};

/// The first pause of a request waiting for a duplicate in flight (`wait`); it doubles up to
/// [`MAX_WAIT_PAUSE`].
const FIRST_WAIT_PAUSE: Duration = Duration::from_millis(5);
const MAX_WAIT_PAUSE: Duration = Duration::from_millis(100);

/// Acquires the record for a keyed request whose handler's argument is extracted, then replays,
/// refuses, or runs the handler as the record's owner. The process-memory answer was already
/// asked for (and missed).
pub(super) async fn run(
    keyed: Keyed,
    record: RecordKey,
    route: RouteRef,
    work: Work,
    adopted: Option<Arc<LayerClaim>>,
    transaction: Option<TransactionHandle>,
) -> Response {
    let runtime = keyed.runtime;
    if let Some(claim) = adopted {
        // An outer layer holds this very record for this request: carry on with its lease.
        let lease = Lease {
            runtime,
            route,
            record,
            owner: claim.owner,
            fingerprint: keyed.fingerprint,
            duration: claim.lease,
            leased_at: claim.leased_at,
            context: keyed.context,
            request_id: keyed.request_id,
            handed_off: None,
            transaction: None,
        };
        return own(lease, &keyed.key, claim.epoch, work).await;
    }
    if runtime.detached_at_bound() {
        if route.report_only {
            return run_plain(work).await;
        }
        return respond::too_many_detached(&runtime);
    }
    let owner = OwnerToken::generate();
    let lease = runtime.lease_for(&route);
    let wait_until = route.wait.map(|wait| Instant::now() + wait);
    let mut pause = FIRST_WAIT_PAUSE;
    let (epoch, leased_at) = loop {
        let request = AcquireRequest::new(&record, owner, &keyed.fingerprint, lease, route.ttl)
            .after_memory_miss();
        // The lease runs from no earlier than the moment it was asked for.
        let asked_at = tokio::time::Instant::now();
        let answer = match &transaction {
            Some(transaction) => transaction.0.claim(request).await,
            None => runtime.store().acquire(request).await,
        };
        if answer.is_ok() {
            runtime.outage().success();
        }
        if route.report_only {
            let would = match &answer {
                Ok(Acquired::Execute { .. }) => None,
                Ok(Acquired::Completed { .. }) => Some("replayed"),
                Ok(Acquired::Mismatch) => Some("mismatch"),
                Ok(Acquired::InFlight { .. }) => Some("conflict"),
                Err(_) => Some("store_error"),
            };
            if let Some(would) = would {
                super::report(route.handler, would, "from the store");
                return run_plain(work).await;
            }
        }
        match answer {
            Ok(Acquired::Execute { epoch }) => break (epoch, asked_at),
            Ok(Acquired::Completed { result, ttl_left }) => {
                return respond::replay(&runtime, &result, ttl_left);
            }
            Ok(Acquired::Mismatch) => return respond::key_reused(&runtime),
            Ok(Acquired::InFlight { lease_left }) => {
                let now = Instant::now();
                match wait_until {
                    Some(until) if until > now => {
                        tokio::time::sleep(pause.min(until - now).min(lease_left)).await;
                        pause = (pause * 2).min(MAX_WAIT_PAUSE);
                    }
                    _ => return respond::in_progress(&runtime, lease_left),
                }
            }
            Err(error) => {
                abandon(&runtime, record, owner, &error);
                if !runtime.fails_open() {
                    return respond::store_unavailable(&runtime, &error);
                }
                outcome("unprotected");
                runtime.outage().failure(Failure::Unprotected, &error);
                let handler = match work {
                    Work::Ready(handler) => handler,
                    Work::Deferred { call, .. } => call(None),
                };
                return respond::unprotected(handler.await);
            }
        }
    };

    let lease = Lease {
        runtime,
        route,
        record,
        owner,
        fingerprint: keyed.fingerprint,
        duration: lease,
        leased_at,
        context: keyed.context,
        request_id: keyed.request_id,
        handed_off: None,
        transaction,
    };
    own(lease, &keyed.key, epoch, work).await
}

/// A request that ran without a record, in the store's transaction: committed when the route
/// would have recorded the response, rolled back otherwise. A commit that fails answers `503`
/// (the handler's writes are gone, so the request was not processed).
pub(super) async fn settle_plain(
    runtime: &Idempotency,
    transaction: &TransactionHandle,
    route: &RouteRef,
    response: Response,
) -> Response {
    if !route.store.records(response.status()) {
        if let Err(error) = transaction.0.rollback().await {
            tracing::warn!(%error, "rolling back the handler's transaction failed");
        }
        return response;
    }
    match transaction.0.commit(None).await {
        Ok(_) => response,
        Err(error) => respond::transaction_failed(runtime, &error),
    }
}

/// Runs the work without a record (a report-only route that idem would have answered).
async fn run_plain(work: Work) -> Response {
    match work {
        Work::Ready(handler) => handler.await,
        Work::Deferred { call, .. } => call(None).await,
    }
}

/// Runs the work as the record's owner: to the end whatever happens to the request, then records
/// or releases its response. A layer's stack is handed the claim, for the route's own
/// idempotency to take.
async fn own(mut lease: Lease, key: &IdempotencyKey, epoch: u64, work: Work) -> Response {
    outcome("executed");
    tracing::Span::current().record("epoch", epoch);
    if let Some(context) = &lease.context {
        context.enter(key, epoch);
    }
    let handler = match work {
        Work::Ready(handler) => handler,
        Work::Deferred { call, participants } => {
            let claim = Arc::new(LayerClaim::new(
                lease.record,
                lease.fingerprint,
                lease.owner,
                epoch,
                lease.leased_at,
                lease.duration,
                participants,
            ));
            lease.handed_off = Some(Arc::clone(&claim));
            call(Some(claim))
        }
    };
    Attempt::new(lease, handler).run_to_completion().await
}
