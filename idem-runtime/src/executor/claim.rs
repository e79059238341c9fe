//! Claiming the record: the acquire, and what each answer leads to.

use std::time::{Duration, Instant};

use axum::response::Response;

use super::attempt::Attempt;
use super::lease::{Lease, abandon};
use super::{Running, outcome, respond};
use crate::config::RouteConfig;
use crate::extract::Keyed;
use crate::fingerprint::RecordKey;
use crate::outage::Failure;
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
    route: &'static RouteConfig,
    handler: Running,
) -> Response {
    let runtime = keyed.runtime;
    if runtime.detached_at_bound() {
        return respond::too_many_detached(&runtime);
    }
    let owner = OwnerToken::generate();
    let lease = runtime.lease_for(route);
    let wait_until = route.wait.map(|wait| Instant::now() + wait);
    let mut pause = FIRST_WAIT_PAUSE;
    let (epoch, leased_at) = loop {
        let request = AcquireRequest::new(&record, owner, &keyed.fingerprint, lease, route.ttl)
            .after_memory_miss();
        // The lease runs from no earlier than the moment it was asked for.
        let asked_at = tokio::time::Instant::now();
        let answer = runtime.store().acquire(request).await;
        if answer.is_ok() {
            runtime.outage().success();
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
                return respond::unprotected(handler.await);
            }
        }
    };

    outcome("executed");
    tracing::Span::current().record("epoch", epoch);
    if let Some(context) = &keyed.context {
        context.enter(&keyed.key, epoch);
    }
    let lease = Lease {
        runtime,
        route,
        record,
        owner,
        fingerprint: keyed.fingerprint,
        duration: lease,
        leased_at,
        context: keyed.context,
    };
    Attempt::new(lease, handler).run_to_completion().await
}
