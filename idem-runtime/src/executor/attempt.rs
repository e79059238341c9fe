//! One execution of a handler that owns its record: run it to the end, whatever happens to the
//! request, then record or release its response.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::Response;
use futures_util::FutureExt as _;
use tracing::Instrument as _;

use super::Running;
use super::lease::Lease;
use super::respond::{self, Captured};
use crate::config::Idempotency;

/// The handler and the lease of the record it owns.
pub(super) struct Attempt {
    lease: Lease,
    handler: Running,
}

impl Attempt {
    pub(super) fn new(lease: Lease, handler: Running) -> Self {
        Self { lease, handler }
    }

    /// Runs the attempt in the request's own task; if the request is dropped first (the client
    /// went away, or the server timed it out), what is left moves to a task of its own, so that the
    /// handler still runs to the end and its result is recorded. Running it in place spares every
    /// first execution a spawned task and the wake-ups between the two tasks.
    pub(super) fn run_to_completion(self) -> impl Future<Output = Response> + Send {
        let runtime = self.lease.runtime.clone();
        let attempt = runtime.track(self.run().in_current_span());
        RunToCompletion {
            attempt: Some(Box::pin(attempt)),
            runtime,
        }
    }

    /// Runs the handler (renewing the lease while it runs), then records or releases the result.
    async fn run(self) -> Response {
        let Self { lease, handler } = self;
        let handler = AssertUnwindSafe(handler).catch_unwind();
        let outcome = lease.hold_while(handler).await;
        if lease.is_handed_off() {
            // The route's own idempotency took the record over and answered for it.
            return match outcome {
                Ok(response) => response,
                Err(_) => respond::handler_panicked(&lease.runtime),
            };
        }
        let Ok(response) = outcome else {
            tracing::error!("the idempotent handler panicked; its key is released");
            lease.release().await;
            return respond::handler_panicked(&lease.runtime);
        };
        if !lease.route.store.records(response.status()) {
            tracing::debug!(
                status = response.status().as_u16(),
                "response not recorded; key released"
            );
            lease.release().await;
            return response;
        }
        match respond::capture(&lease, response).await {
            Captured::Recordable(result, response) => {
                let runtime = lease.runtime.clone();
                match lease.complete(result).await {
                    Ok(()) => response,
                    Err(error) => respond::transaction_failed(&runtime, &error),
                }
            }
            Captured::Failed(response) => {
                tracing::warn!("the response body failed while being recorded; key released");
                lease.release().await;
                response
            }
        }
    }
}

/// An attempt polled in place that, dropped before it finished, finishes in a task of its own,
/// counted as detached ([`Idempotency::detached`]) until it ends.
struct RunToCompletion<F: Future<Output = Response> + Send + 'static> {
    attempt: Option<Pin<Box<F>>>,
    runtime: Idempotency,
}

impl<F: Future<Output = Response> + Send + 'static> Future for RunToCompletion<F> {
    type Output = Response;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let attempt = self
            .attempt
            .as_mut()
            .expect("`RunToCompletion` polled after completion");
        let response = std::task::ready!(attempt.as_mut().poll(cx));
        self.attempt = None;
        Poll::Ready(response)
    }
}

impl<F: Future<Output = Response> + Send + 'static> Drop for RunToCompletion<F> {
    fn drop(&mut self) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let detached = self.runtime.detach();
            drop(handle.spawn(async move {
                let response = attempt.await;
                drop(detached);
                response
            }));
        } else {
            // Dropped outside any runtime: there is nowhere to finish it. Its record stays in
            // flight until the lease runs out, as after a crash.
            tracing::warn!("an idempotent request was dropped outside a tokio runtime mid-handler");
        }
    }
}
