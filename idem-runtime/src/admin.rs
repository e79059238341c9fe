//! An optional admin router over the [operator's view](crate::operator) of one key (feature
//! `admin`, off by default).
//!
//! **This router has no authentication or authorization of its own.** Whoever reaches it can read
//! recorded responses (with their bodies), delete records (so that a payment runs again) and free
//! keys. Mount it only behind the service's own admin authentication (a `route_layer` that checks
//! an operator's credentials, or a listener that only the operations network reaches), never on
//! the public router as it is.
//!
//! ```
//! use axum::Router;
//! use axum::extract::Request;
//! use axum::middleware::{self, Next};
//! use axum::response::Response;
//! use http::StatusCode;
//! use idem_runtime::{Idempotency, admin};
//!
//! // Your service's own check of an operator's credentials.
//! async fn require_operator(request: Request, next: Next) -> Result<Response, StatusCode> {
//!     let authorized = request.headers().get("authorization")
//!         .is_some_and(|value| value == "Bearer the-operators-token");
//!     if !authorized {
//!         return Err(StatusCode::UNAUTHORIZED);
//!     }
//!     Ok(next.run(request).await)
//! }
//!
//! let idem = Idempotency::builder().build();
//! let app: Router = Router::new()
//!     // .route("/payments", post(create_payment))
//!     .nest(
//!         "/admin/idempotency",
//!         admin::router(&idem).route_layer(middleware::from_fn(require_operator)),
//!     )
//!     .layer(idem.layer());
//! # drop(app);
//! ```
//!
//! | request | answer |
//! |---|---|
//! | `GET /keys/{key}?scope=…&body=true` | `200` and the [`KeyView`] as JSON (the body only with `body=true`); `404` when there is no record |
//! | `DELETE /keys/{key}?scope=…` | `200 {"purged": true}`: the key runs again as new; `404` when there is no record; `409` when it is in flight (release it first) |
//! | `POST /keys/{key}/release?scope=…` with `{"owner": "…", "lease_deadline": …}` (a [`StaleLease`], from the `GET`) | `200 {"released": true}`; `409` when refused: the owner renewed its lease since (it is alive), or the record is no longer in flight |
//!
//! `{key}` is the `Idempotency-Key` value as the client sent it, percent-encoded in the path
//! (`"k1"` and `k1` are the same key; an invalid key is `400`). `scope` is the text of the value
//! the route scopes keys by (the user id, say; [`scope`]`(value)` hashes its
//! `Display` text); without it the key is looked up in the global scope ([`Scope::NONE`]), and
//! `scope=` (empty) is the scope of the empty string. Errors are `application/problem+json`
//! documents (`type` `about:blank`); a store that does not support an operation answers `501`,
//! an unreachable one `503`. Every answer carries `Cache-Control: no-store`.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::Idempotency;
use crate::fingerprint::{Scope, scope};
use crate::operator::{KeyView, Operator, OperatorError, StaleLease};
use crate::problem::PROBLEM_JSON;
use crate::store::{Purged, StoreError};

/// The admin router over `idem`'s store: see the [module docs](self) for its routes, and
/// **mount it behind your own admin authentication: it has none.**
///
/// The router is ready to be nested into an application's router of any state type.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use axum::body::Body;
/// use http::{Request, StatusCode};
/// use idem_runtime::{Idempotency, admin};
/// use tower::ServiceExt as _;
///
/// let idem = Idempotency::builder().build();
/// let admin: axum::Router = admin::router(&idem);
/// let request = Request::get("/keys/order-42?scope=alice").body(Body::empty()).unwrap();
/// let response = admin.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), StatusCode::NOT_FOUND);
/// # });
/// ```
pub fn router<S>(idem: &Idempotency) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/keys/{key}", get(inspect).delete(purge))
        .route("/keys/{key}/release", post(release))
        .with_state(idem.operator())
}

/// The query of every route.
#[derive(Debug, Deserialize)]
struct KeyQuery {
    /// The scope's text; none: the global scope.
    scope: Option<String>,
    /// Whether an inspection shows the recorded body.
    #[serde(default)]
    body: bool,
}

impl KeyQuery {
    fn scope(&self) -> Scope {
        self.scope.as_deref().map_or(Scope::NONE, scope)
    }
}

async fn inspect(
    State(operator): State<Operator>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
) -> Response {
    match operator.inspect(&query.scope(), &key, query.body).await {
        Ok(Some(view)) => json::<KeyView>(StatusCode::OK, &view),
        Ok(None) => no_record(),
        Err(error) => failure(&error),
    }
}

async fn purge(
    State(operator): State<Operator>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
) -> Response {
    match operator.purge(&query.scope(), &key).await {
        Ok(Purged::Deleted) => json(StatusCode::OK, &Purge { purged: true }),
        Ok(Purged::Absent) => no_record(),
        Ok(Purged::InFlight) => problem(
            StatusCode::CONFLICT,
            "the record is in flight and was left alone: if its owner is dead, release it first \
             (POST …/release with the owner and lease deadline from GET)",
        ),
        Err(error) => failure(&error),
    }
}

async fn release(
    State(operator): State<Operator>,
    Path(key): Path<String>,
    Query(query): Query<KeyQuery>,
    Json(lease): Json<StaleLease>,
) -> Response {
    match operator
        .release_stale_lease(&query.scope(), &key, lease)
        .await
    {
        Ok(true) => json(StatusCode::OK, &Release { released: true }),
        Ok(false) => problem(
            StatusCode::CONFLICT,
            "refused: the record is no longer in flight under this owner and lease deadline (the \
             owner renewed its lease, so it is alive; or the record completed, was taken over, \
             expired or was purged); inspect it again",
        ),
        Err(error) => failure(&error),
    }
}

#[derive(Serialize)]
struct Purge {
    purged: bool,
}

#[derive(Serialize)]
struct Release {
    released: bool,
}

fn no_record() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "no record for this key in this scope (never used, expired or purged)",
    )
}

fn failure(error: &OperatorError) -> Response {
    let status = match error {
        OperatorError::InvalidKey(_) => StatusCode::BAD_REQUEST,
        OperatorError::Store(StoreError::Unsupported(_)) => StatusCode::NOT_IMPLEMENTED,
        OperatorError::Store(StoreError::Timeout | StoreError::Unavailable(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        OperatorError::NotInFlight => StatusCode::CONFLICT,
        OperatorError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem(status, &error.to_string())
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    no_store((status, Json(value)).into_response())
}

/// An RFC 9457 problem document whose `type` is `about:blank`: the status says what it is.
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    no_store(response)
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
