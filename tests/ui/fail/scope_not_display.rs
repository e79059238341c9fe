use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::{Idempotency, idempotent};

#[idempotent(scope = tags)]
async fn create(Json(tags): Json<Vec<String>>) -> String {
    tags.join(",")
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new().route("/", post(create)).layer(idem.layer());
}
