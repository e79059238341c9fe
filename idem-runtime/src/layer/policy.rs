//! The router-wide policy: which requests the layer makes idempotent, with which settings, and how
//! it scopes their keys.

use std::fmt::{self, Display};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::Method;
use http::request::Parts;

use crate::config::{RouteConfig, StorePolicy};
use crate::fingerprint::{Scope, scope};

/// What a router-wide [`IdempotencyLayer`](super::IdempotencyLayer) does with the requests it
/// covers: the same settings as `#[idempotent]`'s arguments, with the same defaults, for every
/// route under the layer. Every setter states its default.
///
/// ```
/// use std::time::Duration;
/// use axum::http::request::Parts;
/// use idem_runtime::Policy;
///
/// let policy = Policy::new()                          // POST and PATCH, key optional, ttl 24 h
///     .required(true)
///     .ttl(Duration::from_secs(3600))
///     .scope_with(|parts: &Parts| {                   // the principal, from the request's parts
///         parts.headers.get("x-user").and_then(|user| user.to_str().ok()).map(str::to_owned)
///     })
///     .exempt("/webhooks/{provider}");               // dedups its own deliveries
/// # drop(policy);
/// ```
#[must_use]
pub struct Policy {
    pub(super) methods: Vec<Method>,
    pub(super) route: RouteConfig,
    pub(super) scope: Option<Arc<dyn ScopeHook>>,
    pub(super) exempt: Vec<String>,
}

/// A [`Policy`] that cannot be used; see [`Policy::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A duration that must be positive is zero.
    #[error("`{0}` cannot be zero: give the policy a positive duration")]
    ZeroDuration(&'static str),
    /// The policy covers no method.
    #[error("the policy covers no method: give `methods` at least one, e.g. `[Method::POST]`")]
    NoMethod,
}

impl Policy {
    /// The methods a policy covers by default: `POST` and `PATCH`, as the IETF draft and every
    /// router-wide library idem is measured against.
    pub const DEFAULT_METHODS: [Method; 2] = [Method::POST, Method::PATCH];

    /// The defaults: `POST` and `PATCH`, key optional, ttl 24 h, the runtime's lease, `409` at
    /// once on a concurrent duplicate, `non-5xx` responses recorded with their bodies, no scope.
    pub fn new() -> Self {
        Self {
            methods: Self::DEFAULT_METHODS.to_vec(),
            route: RouteConfig::new("router-wide"),
            scope: None,
            exempt: Vec::new(),
        }
    }

    /// The methods the policy covers; requests with other methods pass through untouched (safe
    /// methods always do). Default: [`Policy::DEFAULT_METHODS`].
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Whether a covered request without a key is refused (`400 idempotency-key-missing`). The
    /// layer checks it before the route's handler is reached, for every route it covers. Default:
    /// `false` (a request without a key runs without idempotency).
    pub fn required(mut self, required: bool) -> Self {
        self.route = self.route.required(required);
        self
    }

    /// How long a completed record is kept and replayed. Default: 24 hours.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.route = self.route.ttl(ttl);
        self
    }

    /// The in-flight lease. Default: the runtime's
    /// ([`IdempotencyBuilder::lease`](crate::IdempotencyBuilder::lease)).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.route = self.route.lease(lease);
        self
    }

    /// A concurrent duplicate waits up to `wait` for the first result instead of `409` at once.
    /// Default: `409` at once.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.route = self.route.wait(wait);
        self
    }

    /// Which responses are recorded. Default: [`StorePolicy::NonServerError`].
    pub fn store(mut self, policy: StorePolicy) -> Self {
        self.route = self.route.store(policy);
        self
    }

    /// `false` records status and headers only: replays carry an empty body. Default: `true`.
    pub fn store_body(mut self, store_body: bool) -> Self {
        self.route = self.route.store_body(store_body);
        self
    }

    /// `true` runs every covered request and never changes a response: idem still records results
    /// and logs (at `INFO`, with the outcome) what it would have done instead (a replay, a `409`, a
    /// `422`, a `400` for a missing or malformed key), for rolling idempotency out over live
    /// traffic before enforcing it. Default: `false`.
    pub fn report_only(mut self, report_only: bool) -> Self {
        self.route = self.route.report_only(report_only);
        self
    }

    /// Scopes keys by a value taken from the request's parts (never its body), such as the
    /// authenticated user a middleware put in the extensions or a tenant header: two scopes never
    /// share a record. The value's `Display` text is hashed. When `scope` returns `None` the
    /// request is refused with `500 idempotency-scope-unavailable` and an error is logged: the
    /// layer never falls back to a global key space. Default: no scope (one global key space; see
    /// `#[idempotent]`'s `scope` for the risk).
    pub fn scope_with<F, D>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<D> + Send + Sync + 'static,
        D: Display,
    {
        self.scope = Some(Arc::new(FromParts(scope)));
        self
    }

    /// Scopes keys by an extractor of the request's parts, such as the application's
    /// authentication extractor: `T` runs first (its rejection, a `401` say, is the response, and
    /// nothing is recorded), then `scope` turns it into the scope's text. `T` runs again in the
    /// handler if the handler asks for it. `T` is extracted without the router's state.
    pub fn scope_by<T, F, D>(mut self, scope: F) -> Self
    where
        T: FromRequestParts<()> + Send + 'static,
        F: Fn(&T) -> D + Send + Sync + 'static,
        D: Display,
    {
        self.scope = Some(Arc::new(ByExtractor {
            scope,
            extractor: PhantomData::<fn() -> T>,
        }));
        self
    }

    /// Leaves the route `path` (as written in the router, e.g. `/webhooks/{provider}`, matched
    /// against axum's `MatchedPath`) out of the policy, for a route that deduplicates on its own.
    /// A route added to the router after the layer is not covered either (axum applies a layer to
    /// the routes added before it). Default: none.
    pub fn exempt(mut self, path: impl Into<String>) -> Self {
        self.exempt.push(path.into());
        self
    }

    /// Checks what cannot be told from the types: the durations are positive (as the attribute's
    /// are) and some method is covered.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let durations = [
            ("ttl", Some(self.route.ttl)),
            ("lease", self.route.lease),
            ("wait", self.route.wait),
        ];
        if let Some((name, _)) = durations
            .into_iter()
            .find(|(_, duration)| duration.is_some_and(|d| d.is_zero()))
        {
            return Err(PolicyError::ZeroDuration(name));
        }
        if self.methods.is_empty() {
            return Err(PolicyError::NoMethod);
        }
        Ok(())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("methods", &self.methods)
            .field("route", &self.route)
            .field("scoped", &self.scope.is_some())
            .field("exempt", &self.exempt)
            .finish()
    }
}

/// Why a request's scope could not be produced.
pub(super) enum ScopeRejection {
    /// The scope's extractor rejected the request: its response.
    Rejected(Response),
    /// The hook found nothing to scope by.
    Missing,
}

/// The future a [`ScopeHook`] returns.
pub(super) type ScopeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Scope, ScopeRejection>> + Send + 'a>>;

/// How a policy scopes a request, from its parts.
pub(super) trait ScopeHook: Send + Sync + 'static {
    fn scope<'a>(&'a self, parts: &'a mut Parts) -> ScopeFuture<'a>;
}

struct FromParts<F>(F);

impl<F, D> ScopeHook for FromParts<F>
where
    F: Fn(&Parts) -> Option<D> + Send + Sync + 'static,
    D: Display,
{
    fn scope<'a>(&'a self, parts: &'a mut Parts) -> ScopeFuture<'a> {
        let found = (self.0)(parts).map(|value| scope(&value));
        Box::pin(std::future::ready(found.ok_or(ScopeRejection::Missing)))
    }
}

struct ByExtractor<T, F> {
    scope: F,
    extractor: PhantomData<fn() -> T>,
}

impl<T, F, D> ScopeHook for ByExtractor<T, F>
where
    T: FromRequestParts<()> + Send + 'static,
    F: Fn(&T) -> D + Send + Sync + 'static,
    D: Display,
{
    fn scope<'a>(&'a self, parts: &'a mut Parts) -> ScopeFuture<'a> {
        Box::pin(async move {
            match T::from_request_parts(parts, &()).await {
                Ok(value) => Ok(scope(&(self.scope)(&value))),
                Err(rejection) => Err(ScopeRejection::Rejected(rejection.into_response())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_durations_and_no_methods_are_refused_with_a_message() {
        assert_eq!(Policy::new().validate(), Ok(()));
        let zero = Policy::new().ttl(Duration::ZERO).validate();
        assert_eq!(zero, Err(PolicyError::ZeroDuration("ttl")));
        assert_eq!(
            zero.unwrap_err().to_string(),
            "`ttl` cannot be zero: give the policy a positive duration"
        );
        assert_eq!(
            Policy::new().lease(Duration::ZERO).validate(),
            Err(PolicyError::ZeroDuration("lease"))
        );
        assert_eq!(
            Policy::new().wait(Duration::ZERO).validate(),
            Err(PolicyError::ZeroDuration("wait"))
        );
        assert_eq!(
            Policy::new().methods([]).validate(),
            Err(PolicyError::NoMethod)
        );
    }
}
