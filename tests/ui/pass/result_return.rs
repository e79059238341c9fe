// The user's function keeps its `Result` return type, `?` and early `return`.

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};

#[idempotent(required = true)]
async fn create(Path(id): Path<String>, body: String) -> Result<(StatusCode, String), StatusCode> {
    if body.is_empty() {
        return Err(StatusCode::BAD_REQUEST);
    }
    let id: u64 = id.parse().map_err(|_| StatusCode::NOT_FOUND)?;
    Ok((StatusCode::CREATED, format!("{id}: {body}")))
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/{id}", post(create))
        .layer(idem.layer());
}
