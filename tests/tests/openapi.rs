//! The key in the OpenAPI document (`idem_runtime::openapi`, feature `utoipa`): the payments
//! example's `GET /openapi.json` fetched in process, and `IdempotencyLayer::document` on a
//! hand-built document (an attributed handler, a policy, an exempt route, a response the
//! operation already documents).

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::{HeaderName, StatusCode};
use idem_examples::payments::{self, Settings};
use idem_runtime::{Idempotency, Policy, idempotent};
use idem_tests::support::{request, send};
use serde_json::Value;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder};

const PROBLEM_STATUSES: [&str; 4] = ["400", "409", "422", "503"];

/// The operation `method path` of `document`.
#[track_caller]
fn operation<'a>(document: &'a Value, method: &str, path: &str) -> &'a Value {
    let operation = &document["paths"][path][method];
    assert!(operation.is_object(), "no {method} {path} in {document:#}");
    operation
}

/// The operation's header parameter `name`, if any.
fn header_parameter<'a>(operation: &'a Value, name: &str) -> Option<&'a Value> {
    operation["parameters"]
        .as_array()?
        .iter()
        .find(|parameter| parameter["in"] == "header" && parameter["name"].as_str() == Some(name))
}

/// Asserts that `operation` publishes the key as idem does: the parameter with its `required`
/// flag and syntax, the replay marker on `replayed` responses, the problem responses.
#[track_caller]
fn assert_idempotent(operation: &Value, key: &str, required: bool, replayed: &[&str]) {
    let parameter = header_parameter(operation, key)
        .unwrap_or_else(|| panic!("no `{key}` parameter: {operation:#}"));
    assert_eq!(parameter["required"], required, "{parameter:#}");
    let description = parameter["description"].as_str().unwrap();
    assert!(
        description.contains("Structured Field string") && description.contains("1 to 255"),
        "{description}"
    );
    assert_eq!(parameter["schema"]["type"], "string");
    let responses = &operation["responses"];
    for status in replayed {
        assert!(
            responses[status]["headers"]["Idempotent-Replayed"].is_object(),
            "no replay marker on {status}: {responses:#}"
        );
    }
    for status in PROBLEM_STATUSES {
        // idem's own response, or the operation's with idem's problems named in it.
        let description = responses[status]["description"]
            .as_str()
            .unwrap_or_default();
        if description.starts_with("Answered by idem") {
            let problem = &responses[status]["content"]["application/problem+json"];
            assert_eq!(
                problem["schema"]["$ref"], "#/components/schemas/Problem",
                "{status}: {responses:#}"
            );
        } else {
            assert!(
                description.contains("Also answered by idem"),
                "{status}: {responses:#}"
            );
        }
    }
    for status in ["409", "503"] {
        assert!(
            responses[status]["headers"]["Retry-After"].is_object(),
            "{status}"
        );
    }
}

#[track_caller]
fn assert_untouched(operation: &Value, key: &str) {
    assert!(header_parameter(operation, key).is_none(), "{operation:#}");
    let responses = operation["responses"].as_object().unwrap();
    for (status, response) in responses {
        assert!(
            response["headers"]["Idempotent-Replayed"].is_null(),
            "{status}"
        );
    }
    for status in ["409", "503"] {
        assert!(!responses.contains_key(status), "{status}: {operation:#}");
    }
}

#[tokio::test]
async fn the_payments_example_publishes_its_key_per_route() {
    let idem = Idempotency::builder().build();
    let app = payments::app(&idem, Settings::default());
    // No authentication: the document is public.
    let reply = send(
        &app,
        request("GET", "/openapi.json")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.header(http::header::CONTENT_TYPE),
        Some("application/json")
    );
    let document = reply.json();

    // The attribute's `required = true`, `ttl = "24h"`.
    let create = operation(&document, "post", "/payments");
    assert_idempotent(create, "Idempotency-Key", true, &["201", "402", "422"]);
    let description = header_parameter(create, "Idempotency-Key").unwrap()["description"]
        .as_str()
        .unwrap();
    assert!(description.contains("24 hours"), "{description}");
    assert!(description.contains("Required"), "{description}");
    let responses = &create["responses"];
    // The handler's own 503 is not recorded (non-5xx), so it is never a replay.
    assert!(responses["503"]["headers"]["Idempotent-Replayed"].is_null());
    // The example's own 422 and 503 are kept; idem's problems are added to their descriptions.
    let invalid = responses["422"]["description"].as_str().unwrap();
    assert!(
        invalid.starts_with("The body is not a valid payment"),
        "{invalid}"
    );
    assert!(invalid.contains("idempotency-key-reused"), "{invalid}");
    let unavailable = responses["503"]["description"].as_str().unwrap();
    assert!(
        unavailable.starts_with("The processor is unavailable"),
        "{unavailable}"
    );
    assert!(unavailable.contains("store-unavailable"), "{unavailable}");
    // A required key: its absence is a documented `400`.
    assert!(
        responses["400"]["description"]
            .as_str()
            .unwrap()
            .contains("idempotency-key-missing")
    );
    // idem's own 409 carries the runtime's rendered problems as examples.
    let in_progress = &responses["409"]["content"]["application/problem+json"]["examples"]["request-in-progress"]
        ["value"];
    assert_eq!(
        in_progress["type"],
        "https://idem.rs/problems/request-in-progress"
    );
    assert_eq!(in_progress["status"], 409);

    // `#[idempotent(scope = user_id)]`: the key optional.
    let update = operation(&document, "patch", "/payments/{id}");
    assert_idempotent(update, "Idempotency-Key", false, &["200", "404"]);
    // No 400 of its own: idem's, without `idempotency-key-missing`.
    let malformed = update["responses"]["400"]["description"].as_str().unwrap();
    assert!(malformed.contains("idempotency-key-invalid"), "{malformed}");
    assert!(
        !malformed.contains("idempotency-key-missing"),
        "{malformed}"
    );

    // No attribute: the router-wide policy's settings (key optional).
    let refund = operation(&document, "post", "/payments/{id}/refunds");
    assert_idempotent(refund, "Idempotency-Key", false, &["201", "400", "404"]);

    // Safe methods get nothing.
    for (method, path) in [
        ("get", "/payments"),
        ("get", "/payments/{id}"),
        ("get", "/payments/{id}/refunds"),
    ] {
        assert_untouched(operation(&document, method, path), "Idempotency-Key");
    }

    // The example names its own problem schema `Problem`: idem reuses it.
    let problem = &document["components"]["schemas"]["Problem"];
    assert!(problem["properties"]["type"].is_object(), "{problem:#}");
    assert!(problem["properties"]["detail"].is_object(), "{problem:#}");
}

/// A handler known to the document by its name (utoipa's default operation id).
#[idempotent(ttl = "90s", store = "2xx")]
async fn open_ticket(body: String) -> String {
    body
}

fn response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description)
}

/// A document as utoipa would derive it, built by hand.
fn hand_built() -> OpenApi {
    let ticket = OperationBuilder::new()
        .operation_id(Some("open_ticket"))
        .response("201", response("Opened"))
        .response("404", response("No such queue"))
        .response("409", response("Ticket locked by an agent"));
    let comment = OperationBuilder::new()
        .operation_id(Some("add_comment"))
        .response("201", response("Commented"))
        .response("5XX", response("Server error"));
    let webhook = OperationBuilder::new()
        .operation_id(Some("receive_webhook"))
        .response("204", response("Received"));
    let list = OperationBuilder::new()
        .operation_id(Some("list_tickets"))
        .response("200", response("Tickets"));
    let replace = OperationBuilder::new()
        .operation_id(Some("replace_ticket"))
        .response("200", response("Replaced"));
    OpenApiBuilder::new()
        .info(InfoBuilder::new().title("tickets").version("1").build())
        .paths(
            PathsBuilder::new()
                .path("/tickets", {
                    let mut item = PathItem::new(HttpMethod::Post, ticket);
                    item.get = Some(list.build());
                    item
                })
                .path(
                    "/tickets/{ticket}/comments",
                    PathItem::new(HttpMethod::Post, comment),
                )
                .path("/tickets/{id}", PathItem::new(HttpMethod::Put, replace))
                .path(
                    "/webhooks/{provider}",
                    PathItem::new(HttpMethod::Post, webhook),
                ),
        )
        .build()
}

fn to_json(document: &OpenApi) -> Value {
    serde_json::to_value(document).unwrap()
}

#[test]
fn the_walker_documents_attribute_and_policy_and_keeps_what_is_there() {
    let idem = Idempotency::builder()
        .key_header(HeaderName::from_static("x-idempotency-key"))
        .problem_base("https://tickets.example/idem/")
        .build();
    let layer = idem.layer().policy(
        Policy::new()
            .required(true)
            .ttl(Duration::from_secs(3_600))
            // Named differently from the document's path: the same route.
            .exempt("/webhooks/{name}"),
    );
    let mut document = hand_built();
    layer.document(&mut document);
    let json = to_json(&document);
    let key = "X-Idempotency-Key";

    // The attributed handler: its own ttl and store, the policy's `required` (checked at the
    // layer first).
    let ticket = operation(&json, "post", "/tickets");
    assert_idempotent(ticket, key, true, &["201"]);
    let description = header_parameter(ticket, key).unwrap()["description"]
        .as_str()
        .unwrap();
    assert!(description.contains("1 minute 30 seconds"), "{description}");
    // `store = "2xx"`: a 404 is not recorded, so never replayed.
    assert!(ticket["responses"]["404"]["headers"]["Idempotent-Replayed"].is_null());
    // The operation's own 409 is kept, idem's problems named beside it, `Retry-After` added.
    let locked = &ticket["responses"]["409"];
    let text = locked["description"].as_str().unwrap();
    assert!(text.starts_with("Ticket locked by an agent\n\n"), "{text}");
    assert!(text.contains("request-in-progress"), "{text}");
    assert!(locked["content"].is_null(), "{locked:#}");
    assert!(locked["headers"]["Retry-After"].is_object());
    // Problem examples as the runtime renders them, with its problem base.
    assert_eq!(
        ticket["responses"]["422"]["content"]["application/problem+json"]["examples"]["idempotency-key-reused"]
            ["value"]["type"],
        "https://tickets.example/idem/idempotency-key-reused"
    );

    // No attribute: the policy's settings.
    let comment = operation(&json, "post", "/tickets/{ticket}/comments");
    assert_idempotent(comment, key, true, &["201"]);
    let description = header_parameter(comment, key).unwrap()["description"]
        .as_str()
        .unwrap();
    assert!(description.contains("1 hour"), "{description}");
    // A range of server errors is not recorded under the policy's `non-5xx`.
    assert!(comment["responses"]["5XX"]["headers"]["Idempotent-Replayed"].is_null());

    // Exempt, a safe method, a method the policy does not cover: nothing.
    assert_untouched(operation(&json, "post", "/webhooks/{provider}"), key);
    assert_untouched(operation(&json, "get", "/tickets"), key);
    assert_untouched(operation(&json, "put", "/tickets/{id}"), key);

    // The problem schema, added once; a second call changes nothing.
    let problem = &json["components"]["schemas"]["Problem"];
    for member in ["type", "title", "status", "detail"] {
        assert!(problem["properties"][member].is_object(), "{member}");
    }
    layer.document(&mut document);
    assert_eq!(to_json(&document), json);

    // Without a policy, only the attribute: its handler with its own (optional) key.
    let mut document = hand_built();
    idem.layer().document(&mut document);
    let json = to_json(&document);
    assert_idempotent(operation(&json, "post", "/tickets"), key, false, &["201"]);
    assert_untouched(operation(&json, "post", "/tickets/{ticket}/comments"), key);

    let _app: Router = Router::new()
        .route("/tickets", post(open_ticket))
        .layer(idem.layer());
}

#[test]
fn a_report_only_policy_documents_an_optional_key_and_nothing_else() {
    let idem = Idempotency::builder().build();
    let layer = idem
        .layer()
        .policy(Policy::new().required(true).report_only(true));
    let mut document = hand_built();
    layer.document(&mut document);
    let json = to_json(&document);
    let comment = operation(&json, "post", "/tickets/{ticket}/comments");
    let parameter = header_parameter(comment, "Idempotency-Key").unwrap();
    assert_eq!(parameter["required"], false);
    assert!(
        parameter["description"]
            .as_str()
            .unwrap()
            .contains("report-only")
    );
    let responses = comment["responses"].as_object().unwrap();
    assert!(!responses.contains_key("409"), "{comment:#}");
    assert!(responses["201"]["headers"]["Idempotent-Replayed"].is_null());
}
