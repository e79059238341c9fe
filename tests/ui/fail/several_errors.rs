// Every mistake is reported in one run, and nothing else: the handler is still emitted as written.

use axum::Router;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};

#[idempotent(required = 1, ttl = "1h", ttl = "2h", wait = "0m", scope = nobody)]
async fn create(body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::builder().build();
    let _app: Router = Router::new().route("/", post(create)).layer(idem.layer());
}
