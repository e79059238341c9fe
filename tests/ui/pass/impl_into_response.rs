// `-> impl IntoResponse` stays on the user's function; the route function returns `Response`.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn create(body: String) -> impl IntoResponse {
    (StatusCode::CREATED, body)
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new().route("/", post(create)).layer(idem.layer());
}
