//! The tower layer that hands the runtime to `#[idempotent]` handlers.
//!
//! ```
//! use axum::{Router, routing::post};
//! use idem_runtime::Idempotency;
//!
//! let idem = Idempotency::builder().build();
//! let app: Router = Router::new()
//!     .route("/orders", post(|| async { "created" }))
//!     .layer(idem.layer()); // covers every route added above
//! # drop(app);
//! ```
//!
//! A route carrying `#[idempotent]` without this layer answers `500 idempotency-not-configured` and
//! logs an error naming the fix: it never runs unprotected.

use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::config::Idempotency;

impl Idempotency {
    /// The layer that makes this runtime available to `#[idempotent]` handlers. Add it with
    /// `Router::layer` after the routes it covers (axum applies a layer to the routes added before
    /// it).
    pub fn layer(&self) -> IdempotencyLayer {
        IdempotencyLayer::new(self.clone())
    }
}

/// Inserts the [`Idempotency`] runtime into each request's extensions. Made by
/// [`Idempotency::layer`].
#[derive(Clone, Debug)]
pub struct IdempotencyLayer {
    runtime: Idempotency,
}

impl IdempotencyLayer {
    /// A layer carrying `runtime`.
    pub fn new(runtime: Idempotency) -> Self {
        Self { runtime }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            runtime: self.runtime.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone, Debug)]
pub struct IdempotencyService<S> {
    inner: S,
    runtime: Idempotency,
}

impl<S, B> Service<Request<B>> for IdempotencyService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.runtime.clone());
        self.inner.call(request)
    }
}
