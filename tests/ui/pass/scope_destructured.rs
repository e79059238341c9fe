// `scope` names bindings from destructuring patterns, in any parameter, the wrapped last one included.

use axum::extract::{Extension, FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::{Idempotency, idempotent};
use serde::Deserialize;

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

#[derive(Deserialize)]
struct Order {
    customer: String,
    amount: u64,
}

#[idempotent(scope = user_id)]
async fn tuple_struct(AuthUser(user_id): AuthUser, Json(amount): Json<u64>) -> String {
    format!("{user_id} paid {amount}")
}

#[idempotent(scope = org)]
async fn nested_tuple(Path((org, id)): Path<(String, u64)>, body: String) -> String {
    format!("{org}/{id}: {body}")
}

// The scope binding is in the last parameter, the one the macro wraps.
#[idempotent(scope = customer)]
async fn in_last_parameter(Json(Order { customer, amount }): Json<Order>) -> String {
    format!("{customer} paid {amount}")
}

// `mut`, `ref` and `@` bindings around and beside the scope.
#[idempotent(scope = id)]
async fn modifiers(Path(mut id): Path<u64>, Json(ref note): Json<String>) -> String {
    id += 1;
    format!("{id}: {note}")
}

#[idempotent(scope = id)]
async fn at_binding(path @ Path(id): Path<u64>, AuthUser(user_id): AuthUser) -> String {
    format!("{} {id} {user_id}", path.0)
}

// A reference pattern inside an extractor.
#[idempotent(scope = tenant)]
async fn reference_pattern(
    Extension(&tenant): Extension<&'static u32>,
    Path(id): Path<u64>,
) -> String {
    format!("{tenant}/{id}")
}

#[idempotent(scope = body)]
async fn plain_binding(AuthUser(_): AuthUser, body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/a", post(tuple_struct))
        .route("/b/{org}/{id}", post(nested_tuple))
        .route("/c", post(in_last_parameter))
        .route("/d/{id}", post(modifiers))
        .route("/g/{id}", post(at_binding))
        .route("/e/{id}", post(reference_pattern))
        .route("/f", post(plain_binding))
        .layer(idem.layer());
}
