use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use idem_runtime::idempotent;

#[idempotent(required = true, ttl = "24h")]
pub async fn create_payment(
    State(ledger): State<u64>,
    Json(amount): Json<u64>,
) -> (StatusCode, String) {
    (StatusCode::CREATED, (ledger + amount).to_string())
}

fn main() {}
