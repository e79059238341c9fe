//! Logging a store outage without a line per request: the first failure at once, then a summary
//! per interval while it lasts, and one line when the store answers again.
//!
//! During an outage every request that needs the store fails the same way; a warning per request
//! would bury everything else in the log (and cost the service while it is already degraded).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::StoreError;

/// How often a continuing outage is summarised.
pub(crate) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// What a request did because the store failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Refused with `503 store-unavailable` (fail closed).
    Refused,
    /// Ran its handler without idempotency (fail open).
    Unprotected,
}

/// The outage state of one runtime. Requests that succeed look at one atomic flag; the lock is
/// taken only by failures and by the first success after them.
#[derive(Debug, Default)]
pub(crate) struct OutageLog {
    active: AtomicBool,
    state: Mutex<Outage>,
}

#[derive(Debug, Default)]
struct Outage {
    /// When the outage began (the first failure) and when its last line was logged.
    started: Option<(Instant, Instant)>,
    /// Failures since the last line, by kind: refused, unprotected.
    since_line: (u64, u64),
    /// Failures since the outage began.
    total: (u64, u64),
}

impl OutageLog {
    /// Records a request that failed because of `error`; logs the first one of an outage, and a
    /// summary once per [`SUMMARY_INTERVAL`] after it.
    pub(crate) fn failure(&self, failure: Failure, error: &StoreError) {
        let now = Instant::now();
        let mut outage = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let count = |(refused, unprotected): &mut (u64, u64)| match failure {
            Failure::Refused => *refused += 1,
            Failure::Unprotected => *unprotected += 1,
        };
        count(&mut outage.total);
        let Some((started, last_line)) = outage.started else {
            outage.started = Some((now, now));
            self.active.store(true, Ordering::Release);
            match failure {
                Failure::Refused => tracing::warn!(
                    %error,
                    "idempotency store unavailable: requests are refused (503) until it answers; \
                     further failures are summarised every {}s",
                    SUMMARY_INTERVAL.as_secs()
                ),
                Failure::Unprotected => tracing::warn!(
                    %error,
                    "idempotency store unavailable: handlers run unprotected (fail-open) until it \
                     answers; further failures are summarised every {}s",
                    SUMMARY_INTERVAL.as_secs()
                ),
            }
            return;
        };
        count(&mut outage.since_line);
        if now.duration_since(last_line) >= SUMMARY_INTERVAL {
            let (refused, unprotected) = std::mem::take(&mut outage.since_line);
            outage.started = Some((started, now));
            tracing::warn!(
                %error,
                refused,
                unprotected,
                outage_secs = now.duration_since(started).as_secs(),
                "idempotency store still unavailable"
            );
        }
    }

    /// Records a request the store answered; ends an outage in progress with one line.
    pub(crate) fn success(&self) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut outage = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((started, _)) = outage.started else {
            // Another request ended it first.
            return;
        };
        let (refused, unprotected) = outage.total;
        *outage = Outage::default();
        self.active.store(false, Ordering::Release);
        tracing::warn!(
            refused,
            unprotected,
            outage_secs = started.elapsed().as_secs(),
            "idempotency store available again"
        );
    }
}
