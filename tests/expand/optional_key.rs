use axum::extract::Path;
use idem_runtime::idempotent;

/// The key is optional: without one the request runs normally.
#[idempotent]
pub async fn update(Path(id): Path<u64>, body: String) -> String {
    id.to_string() + &body
}

#[idempotent(lease = "45s", wait = "5s", store = "2xx", store_body = false)]
async fn ping() -> &'static str {
    "pong"
}

fn main() {}
