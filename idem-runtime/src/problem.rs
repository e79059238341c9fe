//! RFC 9457 problem documents for every response idem produces itself.
//!
//! Each [`ProblemKind`] has a stable `type` URI under [`DEFAULT_PROBLEM_BASE`] (configurable with
//! [`IdempotencyBuilder::problem_base`](crate::IdempotencyBuilder::problem_base)), a title and a
//! status. Responses are `application/problem+json` and carry `Cache-Control: no-store`; `409` and
//! `503` also carry `Retry-After`.
//!
//! The bodies can be replaced with [`IdempotencyBuilder::problem_renderer`](crate::IdempotencyBuilder::problem_renderer):
//!
//! ```
//! use axum::response::{IntoResponse, Response};
//! use idem_runtime::{problem::Problem, Idempotency};
//!
//! let idem = Idempotency::builder()
//!     .problem_renderer(|problem: &Problem| -> Response {
//!         (problem.status(), format!("idempotency error: {}", problem.kind().slug())).into_response()
//!     })
//!     .build();
//! # drop(idem);
//! ```
//! idem still adds `Retry-After` and `Cache-Control: no-store` to whatever the renderer returns.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// The default base of problem `type` URIs: `https://idem.rs/problems/` followed by the slug.
pub const DEFAULT_PROBLEM_BASE: &str = "https://idem.rs/problems/";

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What went wrong, one variant per problem `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: the route requires an `Idempotency-Key` and the request has none.
    KeyMissing,
    /// 400: the `Idempotency-Key` header is malformed, empty, too long or repeated.
    KeyInvalid,
    /// 422: the key was first used for a different request (method, route, path, query or body).
    KeyReused,
    /// 409: a request with this key is still being processed.
    RequestInProgress,
    /// 409: the first request finished but its response was too large to record, so it cannot be
    /// replayed (and must not run again).
    ResultUnavailable,
    /// 503: the idempotency store could not be reached; the handler did not run.
    StoreUnavailable,
    /// 500: the handler panicked; the key is released so a retry runs again.
    HandlerPanicked,
    /// 500: the route uses `#[idempotent]` but the router does not carry the idem runtime.
    NotConfigured,
    /// 413: the request body is larger than the route's body limit (axum's
    /// [`DefaultBodyLimit`](axum::extract::DefaultBodyLimit)), so it cannot be fingerprinted.
    PayloadTooLarge,
    /// 400: the request body could not be read (the client sent a malformed or truncated body).
    BodyUnreadable,
    /// 500: a router-wide policy could not produce the request's scope (see
    /// [`Policy::scope_with`](crate::Policy::scope_with)); nothing ran.
    ScopeUnavailable,
    /// 503: too many handlers are still running for clients that went away; the handler did not
    /// run (see [`IdempotencyBuilder::max_detached`](crate::IdempotencyBuilder::max_detached)).
    TooManyDetached,
}

impl ProblemKind {
    /// The last segment of the `type` URI, e.g. `idempotency-key-missing`.
    pub const fn slug(self) -> &'static str {
        match self {
            Self::KeyMissing => "idempotency-key-missing",
            Self::KeyInvalid => "idempotency-key-invalid",
            Self::KeyReused => "idempotency-key-reused",
            Self::RequestInProgress => "request-in-progress",
            Self::ResultUnavailable => "result-unavailable",
            Self::StoreUnavailable => "store-unavailable",
            Self::HandlerPanicked => "handler-panicked",
            Self::NotConfigured => "idempotency-not-configured",
            Self::PayloadTooLarge => "payload-too-large",
            Self::BodyUnreadable => "request-body-unreadable",
            Self::TooManyDetached => "too-many-detached-handlers",
            Self::ScopeUnavailable => "idempotency-scope-unavailable",
        }
    }

    /// The HTTP status (also the document's `status` member).
    pub const fn status(self) -> StatusCode {
        match self {
            Self::KeyMissing | Self::KeyInvalid | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RequestInProgress | Self::ResultUnavailable => StatusCode::CONFLICT,
            Self::StoreUnavailable | Self::TooManyDetached => StatusCode::SERVICE_UNAVAILABLE,
            Self::HandlerPanicked | Self::NotConfigured | Self::ScopeUnavailable => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// A short, human-readable summary that does not change between occurrences.
    pub const fn title(self) -> &'static str {
        match self {
            Self::KeyMissing => "Idempotency-Key header missing",
            Self::KeyInvalid => "Idempotency-Key header invalid",
            Self::KeyReused => "Idempotency-Key reused for a different request",
            Self::RequestInProgress => "A request with this Idempotency-Key is in progress",
            Self::ResultUnavailable => "The result of this Idempotency-Key cannot be replayed",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::HandlerPanicked => "Internal server error",
            Self::NotConfigured => "Idempotency is not configured",
            Self::PayloadTooLarge => "Request body too large",
            Self::BodyUnreadable => "Request body unreadable",
            Self::TooManyDetached => "Too many requests still running",
            Self::ScopeUnavailable => "Idempotency scope unavailable",
        }
    }
}

impl ProblemKind {
    /// The detail sentence a problem of this kind carries unless its occurrence has a more
    /// specific one.
    pub const fn detail(self) -> &'static str {
        match self {
            Self::KeyMissing => "this request must carry an `Idempotency-Key` header",
            Self::KeyInvalid => "the `Idempotency-Key` header is not a valid key",
            Self::KeyReused => {
                "this Idempotency-Key was already used for a different request (method, path, query or body)"
            }
            Self::RequestInProgress => {
                "a request with this Idempotency-Key is still being processed; retry later"
            }
            Self::ResultUnavailable => {
                "the first request with this Idempotency-Key completed, but its response was too large to be replayed"
            }
            Self::StoreUnavailable => {
                "the idempotency store is temporarily unavailable; the request was not processed"
            }
            Self::HandlerPanicked => "the request failed unexpectedly; it may be retried",
            Self::NotConfigured => {
                "the server is missing its idempotency configuration; the request was not processed"
            }
            Self::PayloadTooLarge => {
                "the request body is larger than this route accepts; the request was not processed"
            }
            Self::BodyUnreadable => {
                "the request body could not be read to its end; the request was not processed"
            }
            Self::TooManyDetached => {
                "the server is finishing too many requests whose clients went away; the request was not processed, retry later"
            }
            Self::ScopeUnavailable => {
                "the server could not tell whose key this is; the request was not processed"
            }
        }
    }
}

/// One problem occurrence: its kind, a detail sentence and, for 409/503, when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    kind: ProblemKind,
    detail: String,
    retry_after: Option<Duration>,
}

impl Problem {
    /// A problem of `kind` with a `detail` explaining this occurrence.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// A problem of `kind` with the kind's own [detail](ProblemKind::detail).
    pub fn of(kind: ProblemKind) -> Self {
        Self::new(kind, kind.detail())
    }

    /// Sets the `Retry-After` hint (rounded up to whole seconds, at least 1).
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The kind of problem.
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The detail sentence.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `Retry-After` hint, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|after| after.as_secs() + u64::from(after.subsec_nanos() > 0))
            .map(|secs| secs.max(1))
    }
}

/// Turns a [`Problem`] into a response. Implemented for every `Fn(&Problem) -> Response`.
pub trait RenderProblem: Send + Sync + 'static {
    /// Renders the problem. idem adds `Retry-After` and `Cache-Control: no-store` afterwards.
    fn render(&self, problem: &Problem) -> Response;
}

impl<F> RenderProblem for F
where
    F: Fn(&Problem) -> Response + Send + Sync + 'static,
{
    fn render(&self, problem: &Problem) -> Response {
        self(problem)
    }
}

/// The default renderer: an RFC 9457 JSON document with `type`, `title`, `status` and `detail`.
#[derive(Debug, Clone)]
pub struct JsonProblems {
    base: String,
}

impl JsonProblems {
    /// Renders `type` as `base` followed by the kind's slug.
    pub fn new(base: impl Into<String>) -> Self {
        Self { base: base.into() }
    }
}

impl Default for JsonProblems {
    fn default() -> Self {
        Self::new(DEFAULT_PROBLEM_BASE)
    }
}

#[derive(Serialize)]
struct ProblemDocument<'a> {
    #[serde(rename = "type")]
    type_uri: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl RenderProblem for JsonProblems {
    fn render(&self, problem: &Problem) -> Response {
        let document = ProblemDocument {
            type_uri: format!("{}{}", self.base, problem.kind.slug()),
            title: problem.kind.title(),
            status: problem.status().as_u16(),
            detail: &problem.detail,
        };
        // Serialising a struct of strings and integers cannot fail; fall back to an empty object.
        let body = serde_json::to_vec(&document).unwrap_or_else(|_| b"{}".to_vec());
        (
            problem.status(),
            [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
            body,
        )
            .into_response()
    }
}

/// Renders `problem` with `renderer` and adds the headers every problem response carries: the one
/// way a problem becomes a response.
pub(crate) fn render(renderer: &dyn RenderProblem, problem: &Problem) -> Response {
    let mut response = renderer.render(problem);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = problem.retry_after_secs() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

impl IntoResponse for Problem {
    /// Renders with the default JSON renderer (used where no runtime is at hand).
    fn into_response(self) -> Response {
        render(&JsonProblems::default(), &self)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn json_document_has_the_rfc_9457_members() {
        let problem = Problem::new(ProblemKind::RequestInProgress, "still running")
            .with_retry_after(Duration::from_millis(1500));
        let response = render(&JsonProblems::default(), &problem);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "https://idem.rs/problems/request-in-progress");
        assert_eq!(json["status"], 409);
        assert_eq!(json["title"], ProblemKind::RequestInProgress.title());
        assert_eq!(json["detail"], "still running");
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let p = Problem::new(ProblemKind::StoreUnavailable, "").with_retry_after(Duration::ZERO);
        assert_eq!(p.retry_after_secs(), Some(1));
        let p = p.with_retry_after(Duration::from_secs(3));
        assert_eq!(p.retry_after_secs(), Some(3));
    }
}
