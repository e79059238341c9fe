//! The lease of an owned record: renewed while the handler runs, then completed or released.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument as _;

use http::HeaderValue;

use crate::config::{Idempotency, RouteRef};
use crate::extract::{ContextState, LayerClaim};
use crate::fingerprint::{Fingerprint, RecordKey};
use crate::record::RecordedResult;
use crate::store::{
    CompleteRequest, OwnerToken, ReleaseRequest, RenewRequest, StoreError, TransactionHandle,
};

/// The first pause before retrying a completion the store refused to take; it doubles up to
/// [`MAX_COMPLETE_PAUSE`].
const FIRST_COMPLETE_PAUSE: Duration = Duration::from_millis(50);
const MAX_COMPLETE_PAUSE: Duration = Duration::from_secs(1);

/// Everything needed to act on an owned record from any task: the settings of one attempt, held
/// once.
#[derive(Clone)]
pub(super) struct Lease {
    pub(super) runtime: Idempotency,
    pub(super) route: RouteRef,
    pub(super) record: RecordKey,
    pub(super) owner: OwnerToken,
    pub(super) fingerprint: Fingerprint,
    /// How long the lease lasts from each (re)newal.
    pub(super) duration: Duration,
    /// When the lease was asked for: it lasts `duration` from then unless renewed.
    pub(super) leased_at: tokio::time::Instant,
    pub(super) context: Option<Arc<ContextState>>,
    /// The request's id (the runtime's request-id header), recorded with the result.
    pub(super) request_id: Option<HeaderValue>,
    /// The claim this lease's holder, a router-wide layer, handed to the route's own idempotency:
    /// once that takes it, this holder neither renews, records nor releases.
    pub(super) handed_off: Option<Arc<LayerClaim>>,
    /// The store's transaction the claim was made in (transactional mode): it holds the record
    /// until it commits or rolls back, so nothing is renewed, and completing means committing.
    pub(super) transaction: Option<TransactionHandle>,
}

impl Lease {
    /// Runs `work` to the end, renewing the lease while it runs. A handler done within a third of
    /// the lease needs no renewal; a slower one gets a heartbeat in a task of its own from then on,
    /// stopped when `work` finishes.
    pub(super) async fn hold_while<F: Future>(&self, work: F) -> F::Output {
        if self.transaction.is_some() {
            return work.await;
        }
        let mut work = std::pin::pin!(work);
        tokio::select! {
            biased;
            output = &mut work => output,
            () = tokio::time::sleep_until(self.leased_at + self.duration / 3) => {
                let heartbeat = tokio::spawn(self.clone().heartbeat().in_current_span());
                let output = work.await;
                heartbeat.abort();
                output
            }
        }
    }

    /// Renews the lease at once (a third of the lease after it was taken), then every third of
    /// its length, until the runtime's `max_run_time` has passed or the lease turns out to be
    /// lost, so that a renewal that is slow or fails has two thirds of the lease to be retried
    /// in. Aborted when the handler finishes.
    ///
    /// Once the lease can lapse (renewals stopped at `max_run_time`, or failed until the last
    /// renewed lease ran out) the handler's context reports it lost: another attempt may run.
    async fn heartbeat(self) {
        let give_up_at = Instant::now() + self.runtime.max_run_time();
        let mut lease_until = self.leased_at + self.duration;
        let period = self.duration / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now(), period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.is_handed_off() {
                return;
            }
            if Instant::now() >= give_up_at {
                tracing::warn!("handler ran past max_run_time: its lease is no longer renewed");
                tokio::time::sleep_until(lease_until).await;
                return self.lose();
            }
            let asked_at = tokio::time::Instant::now();
            let renewal = RenewRequest::new(&self.record, self.owner, self.duration);
            match self.runtime.store().renew(renewal).await {
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
    /// long as the lease would last, so a retry finds the result rather than running again: the
    /// handler's effects happened, so its response goes out either way (`Ok`).
    ///
    /// In transactional mode, recording is committing the handler's transaction: when that fails
    /// nothing happened, and the error says so (the response must not go out).
    pub(super) async fn complete(self, result: Arc<RecordedResult>) -> Result<(), StoreError> {
        if let Some(transaction) = &self.transaction {
            return match transaction.0.commit(Some(self.completion(&result))).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(StoreError::Unavailable(
                    "the transaction no longer holds its claim".into(),
                )),
                Err(error) => Err(error),
            };
        }
        match self
            .runtime
            .store()
            .complete(self.completion(&result))
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
                let runtime = self.runtime.clone();
                runtime.spawn(self.complete_later(result).in_current_span());
            }
        }
        Ok(())
    }

    async fn complete_later(self, result: Arc<RecordedResult>) {
        let deadline = Instant::now() + self.duration;
        let mut pause = FIRST_COMPLETE_PAUSE;
        while Instant::now() + pause < deadline {
            tokio::time::sleep(pause).await;
            match self
                .runtime
                .store()
                .complete(self.completion(&result))
                .await
            {
                Ok(true) => return tracing::info!("result recorded after the store came back"),
                Ok(false) => return self.lose(),
                Err(_) => pause = (pause * 2).min(MAX_COMPLETE_PAUSE),
            }
        }
        tracing::warn!(
            "the store stayed unreachable for the whole lease: the result was not recorded"
        );
    }

    fn completion<'a>(&'a self, result: &'a Arc<RecordedResult>) -> CompleteRequest<'a> {
        CompleteRequest::new(
            &self.record,
            self.owner,
            &self.fingerprint,
            result,
            self.route.ttl,
        )
    }

    /// Gives the key up so a retry runs again (in transactional mode: rolls the transaction back,
    /// with the handler's writes). Failure is logged: the lease then simply expires.
    pub(super) async fn release(&self) {
        if let Some(transaction) = &self.transaction {
            if let Err(error) = transaction.0.rollback().await {
                tracing::warn!(%error, "rolling back the handler's transaction failed; the database rolls it back when its connection closes");
            }
            return;
        }
        let release = ReleaseRequest::new(&self.record, self.owner);
        if let Err(error) = self.runtime.store().release(release).await {
            tracing::warn!(%error, "releasing the key failed; it frees itself when the lease expires");
        }
    }

    /// Whether the route's own idempotency took this lease's claim.
    pub(super) fn is_handed_off(&self) -> bool {
        self.handed_off
            .as_ref()
            .is_some_and(|claim| claim.is_taken())
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
pub(super) fn abandon(
    runtime: &Idempotency,
    record: RecordKey,
    owner: OwnerToken,
    error: &StoreError,
) {
    if !matches!(error, StoreError::Timeout) {
        return;
    }
    let store = Arc::clone(runtime.store());
    runtime.spawn(
        async move {
            let release = ReleaseRequest::new(&record, owner);
            if let Err(StoreError::Unavailable(_)) = store.release(release).await
                && let Err(error) = store.release(release).await
            {
                tracing::debug!(%error, "releasing a timed-out acquire failed; its lease will expire");
            }
        }
        .in_current_span(),
    );
}
