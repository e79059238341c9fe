use axum::Router;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};

#[idempotent(crate = "idem runtime")]
async fn create(body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new().route("/", post(create)).layer(idem.layer());
}
