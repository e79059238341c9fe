// `#[utoipa::path]` below `#[idempotent]` stays on the route function (other attributes move to
// the user's function), so its `__path_<name>` item stays beside it, where `#[derive(OpenApi)]`
// finds it; above, it expands first, on the function as written. Either way the handler's
// settings reach the document.

use axum::Router;
use axum::routing::post;
use idem_runtime::{Idempotency, idempotent};
use utoipa::OpenApi;

/// Below the attribute.
#[idempotent(required = true)]
#[utoipa::path(post, path = "/below", responses((status = 201, description = "Created")))]
async fn below(body: String) -> String {
    body
}

/// Above the attribute.
#[utoipa::path(post, path = "/above", responses((status = 201, description = "Created")))]
#[idempotent]
async fn above(body: String) -> String {
    body
}

#[derive(OpenApi)]
#[openapi(paths(below, above))]
struct ApiDoc;

fn main() {
    let idem = Idempotency::builder().build();
    let layer = idem.layer();
    let mut document = ApiDoc::openapi();
    layer.document(&mut document);
    let json = serde_json::to_value(&document).unwrap();
    for (path, required) in [("/below", true), ("/above", false)] {
        let key = &json["paths"][path]["post"]["parameters"][0];
        assert_eq!(key["name"], "Idempotency-Key", "{path}");
        assert_eq!(key["required"], required, "{path}");
    }
    let _app: Router = Router::new()
        .route("/below", post(below))
        .route("/above", post(above))
        .layer(layer);
}
