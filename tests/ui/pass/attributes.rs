// Docs, lint levels and `must_use` stay on the route function; other attributes move to the user's
// function, where `#[tracing::instrument]` sees its parameters.

#![deny(missing_docs)]
//! Attributes around `#[idempotent]`.

use axum::Router;
use axum::extract::Path;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};

/// Documented route function.
#[idempotent(scope = id)]
#[tracing::instrument(skip(body))]
#[allow(clippy::needless_pass_by_value)]
#[must_use]
#[inline]
pub async fn create(Path(id): Path<u64>, body: String) -> String {
    tracing::info!(len = body.len(), "creating");
    format!("{id}")
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/{id}", post(create))
        .layer(idem.layer());
}
