// The expansion is warning-free under `deny(warnings)` and clippy's pedantic group.

#![deny(warnings, clippy::pedantic)]

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::{Idempotency, idempotent};

/// Creates an order.
#[idempotent(required = true, ttl = "24h", scope = org, lease = "30s", wait = "5s")]
async fn create(
    State(prefix): State<&'static str>,
    Path(org): Path<String>,
    Json(amount): Json<u64>,
) -> String {
    format!("{prefix}{org}: {amount}")
}

#[idempotent]
async fn no_parameters() -> &'static str {
    "ok"
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/{org}", post(create))
        .route("/", post(no_parameters))
        .with_state("order ")
        .layer(idem.layer());
}
