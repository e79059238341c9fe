// Every argument at once.

use axum::extract::Path;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::{Idempotency, idempotent};

#[idempotent(
    required = true,
    ttl = "1d12h",
    scope = account,
    lease = "45s",
    wait = "2m",
    store = "all",
    store_body = false,
    report_only = false,
    crate = "::idem_runtime",
)]
pub async fn rotate_secret(Path(account): Path<u64>, Json(reason): Json<String>) -> String {
    format!("new secret for {account} ({reason})")
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/{account}", post(rotate_secret))
        .layer(idem.layer());
}
