// `crate = "..."` reaches the runtime through a re-export.

use axum::Router;
use axum::routing::post;

mod deps {
    pub use idem_runtime as idem;
}

mod handlers {
    use crate::deps::idem::idempotent;

    #[idempotent(crate = "crate::deps::idem", required = true)]
    pub async fn create(body: String) -> String {
        body
    }
}

fn main() {
    let idem = deps::idem::Idempotency::builder().build();
    let _app: Router = Router::new()
        .route("/", post(handlers::create))
        .layer(idem.layer());
}
