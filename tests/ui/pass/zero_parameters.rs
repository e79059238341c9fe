// A handler without parameters still gets the wrapper (around `()`).

use axum::Router;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};

#[idempotent(required = true)]
async fn ping() -> &'static str {
    "pong"
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new().route("/", post(ping)).layer(idem.layer());
}
