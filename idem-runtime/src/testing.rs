//! For an application's own tests: requests that carry a fresh key without writing one each time.
//!
//! Routes that require a key (`#[idempotent(required = true)]`, or a policy that
//! [requires](crate::Policy::required) one) refuse requests without it, which makes every test
//! that exercises them spell out a header. Put [`FreshKeys`] outside the application under test and
//! every unsafe request that has no key gets a new one; a test that is about keys sets its own,
//! which is left alone.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use axum::{Router, body::Body, http::Request, routing::post};
//! use idem_runtime::{Idempotency, idempotent, testing::FreshKeys};
//! use tower::ServiceExt as _;
//!
//! #[idempotent(required = true)]
//! async fn create() -> &'static str { "created" }
//!
//! let idem = Idempotency::builder().build();
//! let app = Router::new().route("/", post(create)).layer(idem.layer()).layer(FreshKeys::new());
//! let response = app.oneshot(Request::post("/").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(response.status(), 200); // not 400 idempotency-key-missing
//! # });
//! ```

use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Method, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::key::IDEMPOTENCY_KEY;
use crate::store::OwnerToken;

/// A layer that gives every unsafe request without a key a fresh one (`test-` and 32 hex digits,
/// never repeated in the process). For tests only: a real client chooses its keys so that its
/// retries can reuse them.
#[derive(Debug, Clone)]
pub struct FreshKeys {
    header: HeaderName,
}

impl FreshKeys {
    /// Adds `Idempotency-Key`.
    pub fn new() -> Self {
        Self {
            header: IDEMPOTENCY_KEY.clone(),
        }
    }

    /// Adds the header `name` instead (for a runtime built with
    /// [`IdempotencyBuilder::key_header`](crate::IdempotencyBuilder::key_header)).
    pub fn header(name: HeaderName) -> Self {
        Self { header: name }
    }
}

impl Default for FreshKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for FreshKeys {
    type Service = FreshKeysService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FreshKeysService {
            inner,
            header: self.header.clone(),
        }
    }
}

/// The service made by [`FreshKeys`].
#[derive(Debug, Clone)]
pub struct FreshKeysService<S> {
    inner: S,
    header: HeaderName,
}

impl<S, B> Service<Request<B>> for FreshKeysService<S>
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
        let safe = matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        if !safe && !request.headers().contains_key(&self.header) {
            let key = format!("test-{:032x}", OwnerToken::generate().0);
            if let Ok(value) = HeaderValue::try_from(key) {
                request.headers_mut().insert(self.header.clone(), value);
            }
        }
        self.inner.call(request)
    }
}
