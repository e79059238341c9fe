// The expansion names nothing from the caller's prelude or scope: these shadows do not affect it.

#![allow(dead_code)]

use ::idem_runtime::idempotent;
use axum::Router;
use axum::extract::Path;
use axum::routing::post;

struct Ok;
struct Err;
struct Option;
struct Result;
struct Some;
struct None;
struct Box;
struct Vec;
struct String;
struct Send;
struct Sync;
struct Future;
struct Duration;
struct Response;

mod idem_runtime {}
mod __private {}

#[idempotent(required = true, ttl = "1h", scope = id, store = "2xx")]
async fn create(Path(id): Path<u64>, body: axum::body::Bytes) -> &'static str {
    if id == 0 || body.is_empty() {
        "empty"
    } else {
        "created"
    }
}

fn main() {
    let idem = ::idem_runtime::Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/{id}", post(create))
        .layer(idem.layer());
}
