//! `#[idempotent]`'s expansion is clean under `deny(warnings, clippy::pedantic)`.
//!
//! trybuild checks the `ui/pass` cases with rustc only; this file is where clippy sees expansions
//! (`cargo clippy -p idem-tests --all-targets`). It covers every argument kind, scope patterns and a
//! handler without parameters.

#![deny(warnings, clippy::pedantic)]

use axum::extract::{Extension, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::{Idempotency, idempotent};

struct AuthUser(String);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let user = parts
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        user.map(|user| AuthUser(user.to_owned()))
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// Every argument at once.
#[idempotent(
    required = true,
    ttl = "1d12h",
    scope = user_id,
    lease = "45s",
    wait = "2m",
    store = "non-5xx",
    store_body = false
)]
async fn create(
    AuthUser(user_id): AuthUser,
    State(prefix): State<&'static str>,
    Json(amount): Json<u64>,
) -> Result<(StatusCode, String), StatusCode> {
    if amount == 0 {
        return Err(StatusCode::UNPROCESSABLE_ENTITY);
    }
    Ok((StatusCode::CREATED, format!("{prefix}{user_id}: {amount}")))
}

#[idempotent(scope = org, store = "2xx")]
async fn nested(Path((org, id)): Path<(String, u64)>, body: String) -> impl IntoResponse {
    format!("{org}/{id}: {body}")
}

#[idempotent(scope = limit, store = "all")]
async fn reference(Extension(&limit): Extension<&'static u32>, Path(mut id): Path<u64>) -> String {
    id += 1;
    format!("{limit}/{id}")
}

#[idempotent(scope = body)]
async fn last(AuthUser(_): AuthUser, body: String) -> String {
    body
}

#[idempotent]
async fn no_parameters() -> &'static str {
    "ok"
}

#[test]
fn handlers_route() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/", post(create))
        .route("/nested/{org}/{id}", post(nested))
        .route("/reference/{id}", post(reference))
        .route("/last", post(last))
        .route("/none", post(no_parameters))
        .with_state("order ")
        .layer(idem.layer());
}
