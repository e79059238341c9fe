//! The tower layer: it hands the runtime to `#[idempotent]` handlers and, with a [`Policy`], makes
//! every unsafe route under it idempotent, as router-wide idempotency middleware does elsewhere.
//!
//! ```
//! use axum::{Router, routing::post};
//! use idem_runtime::{Idempotency, Policy};
//!
//! let idem = Idempotency::builder().build();
//! let app: Router = Router::new()
//!     .route("/orders", post(|| async { "created" }))
//!     .route("/orders/{id}/cancel", post(|| async { "cancelled" }))
//!     // Every POST and PATCH above that carries an `Idempotency-Key` runs once per key.
//!     .layer(idem.layer().policy(Policy::new()));
//! # drop(app);
//! ```
//!
//! # The two forms
//!
//! `idem.layer()` alone only hands the runtime to `#[idempotent]` handlers: a route without the
//! attribute is not protected. With [`IdempotencyLayer::policy`], the layer itself runs every
//! request the policy covers through the same executor as the attribute: the same fingerprint
//! (method, matched route, path, query, body), problems, replay headers, lease and takeover,
//! disconnect handling, graceful shutdown and round trips (0 for a replay from memory, 1 for a
//! replay from the store, 2 for a first execution). A record written by one form is replayed by
//! the other.
//!
//! * **Which requests:** the policy's methods (`POST` and `PATCH` by default), on every route
//!   added to the router before the layer, except the routes it [exempts](Policy::exempt). A
//!   request without a key runs without idempotency unless the policy
//!   [requires](Policy::required) one.
//! * **Scope:** from the request's parts, before its body is read: [`Policy::scope_by`] (an
//!   extractor such as the application's authentication, whose rejection is the response) or
//!   [`Policy::scope_with`] (a closure over the parts). When neither can produce it, the request
//!   is refused with `500 idempotency-scope-unavailable`; the layer never falls back to a global
//!   key space.
//! * **The attribute overrides the policy.** A route whose handler carries `#[idempotent]` keeps
//!   its own settings (scope, ttl, lease, wait, store). The layer cannot see inside a handler
//!   before calling it, so on the first request to such a route it claims the record as the
//!   policy says and hands the claim to the attribute, which adopts it when it names the same
//!   record (same scope and fingerprint) and gives it back otherwise; from then on the layer
//!   leaves that route's keyed requests to the attribute. The policy's `required` is checked at
//!   the layer for every route it covers, before and after: exempt a route to let its attribute
//!   make the key optional.
//! * **Nested routers** carry their own policy by layering the nested router; a request covered by
//!   two policies is run by the inner one, which takes the outer layer's claim as the attribute
//!   does.
//!
//! # What the layer cannot tell
//!
//! The layer runs before the route's handler and its extractors, so it cannot tell an
//! extractor's rejection (axum's `400` for malformed JSON) from the handler's own answer: both are
//! recorded like any response the policy records, and a corrected retry needs a new key (with the
//! same key it is `422 idempotency-key-reused`). Put authentication in a layer before idem's, or
//! scope by the authentication extractor ([`Policy::scope_by`]), so that a `401` is answered before
//! any record exists. The attribute, which wraps the handler's last extractor, has neither limit.
//!
//! A route carrying `#[idempotent]` without this layer answers `500 idempotency-not-configured` and
//! logs an error naming the fix: it never runs unprotected.

mod policy;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::{Either, Map};
use http::request::Parts;
use http::{HeaderName, Method};
use tower_layer::Layer;
use tower_service::Service;

pub use self::policy::{Policy, PolicyError};
use self::policy::{ScopeHook, ScopeRejection};
use crate::config::{Idempotency, RouteRef};
use crate::executor::{Running, execute_layered};
use crate::extract::{self, ContextState, IdempotentRequest, LayerClaim, Mode, Participants};
use crate::fingerprint::Scope;
use crate::problem::{Problem, ProblemKind};

impl Idempotency {
    /// The layer that makes this runtime available to `#[idempotent]` handlers; add a [`Policy`]
    /// with [`IdempotencyLayer::policy`] to make every route under it idempotent. Add it with
    /// `Router::layer` after the routes it covers (axum applies a layer to the routes added before
    /// it).
    pub fn layer(&self) -> IdempotencyLayer {
        IdempotencyLayer::new(self.clone())
    }
}

/// Inserts the [`Idempotency`] runtime into each request's extensions and, with a [`Policy`],
/// runs the requests it covers idempotently. Made by [`Idempotency::layer`]; see the
/// [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct IdempotencyLayer {
    runtime: Idempotency,
    policy: Option<Arc<Covered>>,
}

/// A validated policy, as the layer's services share it.
struct Covered {
    methods: Vec<Method>,
    route: RouteRef,
    scope: Option<Arc<dyn ScopeHook>>,
    exempt: Vec<String>,
    participants: Arc<Participants>,
}

impl std::fmt::Debug for Covered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("methods", &self.methods)
            .field("route", &*self.route)
            .field("scoped", &self.scope.is_some())
            .field("exempt", &self.exempt)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer carrying `runtime`, with no policy.
    pub fn new(runtime: Idempotency) -> Self {
        Self {
            runtime,
            policy: None,
        }
    }

    /// Makes every request the policy covers idempotent (see the [module docs](self)).
    ///
    /// # Panics
    ///
    /// If the policy is invalid ([`Policy::validate`]), with the reason: a router is built at
    /// start-up, where a misconfiguration should stop the service. [`IdempotencyLayer::try_policy`]
    /// returns the error instead.
    pub fn policy(self, policy: Policy) -> Self {
        match self.try_policy(policy) {
            Ok(layer) => layer,
            Err(error) => panic!("idem: invalid router-wide policy: {error}"),
        }
    }

    /// The runtime the layer carries.
    #[cfg(feature = "utoipa")]
    pub(crate) fn runtime(&self) -> &Idempotency {
        &self.runtime
    }

    /// The settings the layer's policy applies to `method` on `route`, if it has a policy that
    /// covers them (see `Covered::applies`).
    #[cfg(feature = "utoipa")]
    pub(crate) fn policy_for(
        &self,
        method: &Method,
        route: &str,
        same_route: impl Fn(&str, &str) -> bool,
    ) -> Option<&crate::config::RouteConfig> {
        self.policy
            .as_deref()
            .filter(|policy| policy.applies(method, route, same_route))
            .map(|policy| &*policy.route)
    }

    /// [`IdempotencyLayer::policy`], returning the error of an invalid policy.
    pub fn try_policy(mut self, policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        self.policy = Some(Arc::new(Covered {
            methods: policy.methods,
            route: RouteRef::Shared(Arc::new(policy.route)),
            scope: policy.scope,
            exempt: policy.exempt,
            participants: Arc::default(),
        }));
        Ok(self)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            runtime: self.runtime.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone, Debug)]
pub struct IdempotencyService<S> {
    inner: S,
    runtime: Idempotency,
    policy: Option<Arc<Covered>>,
}

impl<S> Service<Request> for IdempotencyService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = LayerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        request.extensions_mut().insert(self.runtime.clone());
        let key_header = self.runtime.key_header();
        let Some(policy) = self
            .policy
            .as_ref()
            .filter(|policy| policy.covers(&request, key_header))
        else {
            return Either::Left(self.inner.call(request));
        };
        // The service driven to readiness serves this request; its clone serves the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let covered = Arc::clone(policy);
        let runtime = self.runtime.clone();
        let covered: CoveredFuture = Box::pin(covered.run(runtime, inner, request));
        Either::Right(covered.map(Ok))
    }
}

/// The future of [`IdempotencyService`]: the inner service's for a request the policy does not
/// cover (nothing is boxed on that path), a boxed one for a request it does.
pub type LayerFuture<F> =
    Either<F, Map<CoveredFuture, fn(Response) -> Result<Response, Infallible>>>;

/// The future of a request a policy covers.
pub type CoveredFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

impl Covered {
    /// Whether the policy runs this request: a covered method (never a safe one, even if listed),
    /// on a route that is not exempt. A route known to have idempotency of its own is left to it,
    /// except for a request without a key (`key_header`), which still meets the policy's
    /// `required`.
    fn covers(&self, request: &Request, key_header: &HeaderName) -> bool {
        let method = request.method();
        if method.is_safe() || !self.methods.contains(method) {
            return false;
        }
        let Some(route) = request.extensions().get::<MatchedPath>() else {
            return true;
        };
        let route = route.as_str();
        let left_to_the_route =
            self.participants.contains(method, route) && request.headers().contains_key(key_header);
        self.applies(method, route, |exempt, route| exempt == route) && !left_to_the_route
    }

    /// Whether the policy's settings are meant for `method` on `route`: a covered method, on a
    /// route no exemption names. `same_route` tells whether an exemption (as written in the
    /// router) names `route`.
    fn applies(
        &self,
        method: &Method,
        route: &str,
        same_route: impl Fn(&str, &str) -> bool,
    ) -> bool {
        self.methods.contains(method) && !self.exempt.iter().any(|exempt| same_route(exempt, route))
    }

    async fn run<S>(self: Arc<Self>, runtime: Idempotency, inner: S, request: Request) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        // The matched route shares its text (an `Arc`): labelling the request allocates nothing.
        let matched = request.extensions().get::<MatchedPath>().cloned();
        let label = matched.as_ref().map_or("?", MatchedPath::as_str);
        // No key or a malformed one: the executor decides as for the attribute (the policy's
        // `required`, report-only); a request that runs goes on as it came.
        let key = match extract::read_key(&runtime, &request) {
            Ok(Some(key)) => key,
            unkeyed => {
                let mode = match unkeyed {
                    Err(error) => Mode::InvalidKey(runtime, error),
                    Ok(_) => Mode::NoKey(runtime),
                };
                let call: LayerCallOnce = Box::new(move |_| call(inner, request));
                let request_mode = IdempotentRequest {
                    mode,
                    transaction: None,
                };
                return execute_layered(
                    request_mode,
                    self.route.clone(),
                    label,
                    &Scope::NONE,
                    Arc::clone(&self.participants),
                    call,
                )
                .await;
            }
        };
        let (mut parts, body) = request.into_parts();
        let scope = match self.scope(&runtime, &mut parts, label).await {
            Ok(scope) => scope,
            Err(_) if self.route.report_only => {
                return call(inner, Request::from_parts(parts, body)).await;
            }
            Err(response) => return response,
        };
        let request = Request::from_parts(parts, body);
        let (mut keyed, mut parts, bytes) = match extract::read_body(runtime, key, request).await {
            Ok(read) => read,
            Err(problem) => return problem,
        };
        // The handler's `IdempotencyContext` finds this one and sees the key and epoch.
        let context = ContextState::shared();
        parts.extensions.insert(Arc::clone(&context));
        keyed.context = Some(context);
        let call: LayerCallOnce = Box::new(move |claim| call_rebuilt(inner, parts, bytes, claim));
        execute_layered(
            IdempotentRequest {
                mode: Mode::Keyed(keyed),
                transaction: None,
            },
            self.route.clone(),
            label,
            &scope,
            Arc::clone(&self.participants),
            call,
        )
        .await
    }

    /// The request's scope: the policy's hook, or the global scope without one.
    async fn scope(
        &self,
        runtime: &Idempotency,
        parts: &mut Parts,
        label: &str,
    ) -> Result<Scope, Response> {
        let Some(hook) = &self.scope else {
            return Ok(Scope::NONE);
        };
        match hook.scope(parts).await {
            Ok(scope) => Ok(scope),
            Err(ScopeRejection::Rejected(response)) => Err(response),
            Err(ScopeRejection::Missing) => {
                tracing::error!(
                    route = label,
                    "the router-wide policy's scope found nothing to scope this request by: \
                     refused (check what `Policy::scope_with` reads, and that the layer producing \
                     it runs before idem's)"
                );
                Err(runtime.problem_response(&Problem::of(ProblemKind::ScopeUnavailable)))
            }
        }
    }
}

type LayerCallOnce = Box<dyn FnOnce(Option<Arc<LayerClaim>>) -> Running + Send>;

/// The rest of the stack, with the request rebuilt from its buffered body (no copy) and the
/// layer's claim in its extensions for the route's own idempotency to take.
fn call_rebuilt<S>(
    inner: S,
    mut parts: Parts,
    bytes: Bytes,
    claim: Option<Arc<LayerClaim>>,
) -> Running
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    if let Some(claim) = claim {
        parts.extensions.insert(claim);
    }
    call(inner, Request::from_parts(parts, Body::from(bytes)))
}

/// Calls the rest of the stack once it is ready.
fn call<S>(mut inner: S, request: Request) -> Running
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    Box::pin(async move {
        let ready = std::future::poll_fn(|cx| inner.poll_ready(cx)).await;
        match ready {
            Ok(()) => match inner.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
            Err(never) => match never {},
        }
    })
}
