use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::{Idempotency, idempotent};

#[idempotent(scope = usr)]
async fn create(Path(user_id): Path<u64>, State(db): State<u64>, Json(req): Json<u64>) -> String {
    format!("{user_id} {db} {req}")
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/{user_id}", post(create))
        .with_state(0)
        .layer(idem.layer());
}
