use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use idem_runtime::idempotent;

pub struct AuthUser(String);

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

#[idempotent(required = true, ttl = "24h", scope = user_id)]
pub async fn create_payment(
    AuthUser(user_id): AuthUser,
    State(ledger): State<u64>,
    Json(amount): Json<u64>,
) -> Result<(StatusCode, String), StatusCode> {
    if amount == 0 {
        return Err(StatusCode::UNPROCESSABLE_ENTITY);
    }
    Ok((
        StatusCode::CREATED,
        user_id + &(ledger + amount).to_string(),
    ))
}

/// `mut` and `ref` are dropped and other bindings become `_` in the scope pattern.
#[idempotent(scope = org, store = "all")]
pub async fn rename(
    Path((org, mut id)): Path<(String, u64)>,
    Json(ref name): Json<String>,
) -> String {
    id += 1;
    org + &id.to_string() + name
}

/// The scope comes out of the wrapped (last) extractor, so that one runs before the lookup.
#[idempotent(scope = tenant)]
pub async fn import(Json((tenant, rows)): Json<(String, u64)>) -> String {
    tenant + &rows.to_string()
}

fn main() {}
