//! The key in the service's OpenAPI document (feature `utoipa`): one call on the document
//! [utoipa](https://docs.rs/utoipa) generated adds, to every operation idem makes idempotent, the
//! `Idempotency-Key` header parameter, the `Idempotent-Replayed` response header and idem's
//! problem responses.
//!
//! ```
//! use axum::{Json, Router, routing::post};
//! use idem_runtime::{Idempotency, Policy, idempotent};
//! use utoipa::OpenApi;
//!
//! #[utoipa::path(post, path = "/orders", responses((status = 201, description = "Created")))]
//! #[idempotent(required = true, ttl = "24h")]
//! async fn create_order(Json(amount): Json<u64>) -> String {
//!     format!("ordered {amount}")
//! }
//!
//! #[derive(OpenApi)]
//! #[openapi(paths(create_order))]
//! struct ApiDoc;
//!
//! let idem = Idempotency::builder().build();
//! let layer = idem.layer().policy(Policy::new());
//! let mut document = ApiDoc::openapi();
//! layer.document(&mut document); // the one call
//!
//! let app: Router = Router::new()
//!     .route("/orders", post(create_order))
//!     .layer(layer);
//!
//! let json = serde_json::to_value(&document).unwrap();
//! let operation = &json["paths"]["/orders"]["post"];
//! assert_eq!(operation["parameters"][0]["name"], "Idempotency-Key");
//! assert_eq!(operation["parameters"][0]["required"], true);
//! assert!(operation["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
//! assert!(operation["responses"]["422"]["content"]["application/problem+json"].is_object());
//! # drop(app);
//! ```
//!
//! # Which operations, with which settings
//!
//! [`IdempotencyLayer::document`] walks the document's operations, leaving out safe methods
//! (`GET`, `HEAD`, `OPTIONS`, `TRACE`), which idem never affects:
//!
//! * **An `#[idempotent]` handler** is found by the operation's `operationId`, which
//!   `#[utoipa::path]` sets to the function's name unless told otherwise: with this feature on, the
//!   attribute registers each handler's settings at link time (through `inventory`), so nothing
//!   has to list them. The operation gets the attribute's `required`, `ttl` and `store`; if the
//!   layer's policy also covers it, the policy's `required` applies too (the layer checks it
//!   first).
//! * **Any other operation** gets the layer's [`Policy`](crate::Policy), if the policy covers its
//!   method and its path is not [exempt](crate::Policy::exempt). Exemptions are compared with the
//!   document's paths segment by segment, a `{parameter}` matching any other (`/webhooks/{name}`
//!   exempts the document's `/webhooks/{provider}`).
//!
//! # What an operation gets
//!
//! * The key header parameter (the configured name,
//!   [`IdempotencyBuilder::key_header`](crate::IdempotencyBuilder::key_header)), `required` as the
//!   route says, described as the IETF draft asks a resource to publish it: its syntax (an
//!   sf-string `"…"` or a bare token, 1 to 255 printable ASCII characters) and how long a key is
//!   remembered (the route's `ttl`).
//! * The `Idempotent-Replayed` header on each documented response the route records (its `store`
//!   setting: by default every status but `5xx`, `408`, `425` and `429`).
//! * Problem responses `400` (key missing, when required, or malformed), `409` (request in
//!   progress, result unavailable; with `Retry-After`), `422` (key reused for another request) and
//!   `503` (store unavailable, too many detached handlers; with `Retry-After`). Their bodies are
//!   rendered by the runtime's own [problem renderer](crate::IdempotencyBuilder::problem_renderer)
//!   as examples, so the documented `type` URIs and media type are the ones clients get. An
//!   `application/problem+json` body refers to a `Problem` schema component (RFC 9457's `type`,
//!   `title`, `status` and `detail`), added unless the document already has a `Problem` schema,
//!   which is then used as it is.
//!
//! A response the operation already documents for one of those statuses is kept (its body, its
//! schema); idem adds a sentence naming its own problems to its description, and `Retry-After`
//! to its headers for `409` and `503`. A report-only route
//! ([`Policy::report_only`](crate::Policy::report_only), `#[idempotent(report_only = true)]`)
//! never changes a response: it gets the header parameter, optional, described as such, and
//! nothing else. An operation that already documents the key header is left as it is, which also
//! makes a second call change nothing.
//!
//! # Limitations
//!
//! * **A renamed operation is not found.** `#[utoipa::path(operation_id = "…")]` hides the
//!   handler's name; such an operation gets the policy's settings, if any, or nothing. Two
//!   `#[idempotent]` handlers of the same name in different modules whose settings differ are
//!   documented with the safer claim of the two (the key required if either requires it, the
//!   shorter `ttl`), and a warning is logged.
//! * **The layer cannot see the router.** An operation the policy would cover by method and path is
//!   documented as covered even if its route was added after the layer or under another one; exempt
//!   such a path, or call this on the layer that covers it.
//! * **Only inline objects are changed.** A response or parameter given as a `$ref` to a component
//!   is not edited (other operations share it).
//! * **Registration needs a linker that runs constructors** (every target `inventory` supports,
//!   which excludes WebAssembly without its start-up call).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::time::Duration;

use futures_util::FutureExt as _;
use http::{Method, StatusCode, header};
use http_body_util::BodyExt as _;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::{Components, ContentBuilder, OpenApi, Ref, RefOr, Required};

use crate::config::{RouteConfig, StorePolicy};
use crate::executor::IDEMPOTENT_REPLAYED;
use crate::layer::IdempotencyLayer;
use crate::problem::{PROBLEM_JSON, Problem, ProblemKind};

/// The name of the schema component problem bodies refer to.
pub const PROBLEM_SCHEMA: &str = "Problem";

/// One `#[idempotent]` handler's settings, submitted by the attribute's expansion. Not a public
/// API: it changes with the macro.
#[doc(hidden)]
#[derive(Debug)]
pub struct Registration {
    route: &'static RouteConfig,
}

impl Registration {
    /// A handler's settings.
    pub const fn new(route: &'static RouteConfig) -> Self {
        Self { route }
    }
}

inventory::collect!(Registration);

impl IdempotencyLayer {
    /// Adds this layer's idempotency to `openapi`: the key header parameter, the
    /// `Idempotent-Replayed` response header and idem's problem responses, on every operation of an
    /// `#[idempotent]` handler (found by its `operationId`) and every operation the layer's policy
    /// covers. See the [`openapi`](crate::openapi) module for the rules. Feature `utoipa`.
    pub fn document(&self, openapi: &mut OpenApi) {
        let attributed = registered(inventory::iter::<Registration>);
        let walker = Walker {
            key_header: display_name(self.runtime().key_header().as_str()),
            problems: Problems::render(|problem| self.runtime().problem_response(problem)),
            attributed: &attributed,
            policy: &|method: &Method, path: &str| {
                self.policy_for(method, path, same_route).map(Settings::of)
            },
        };
        walker.document(openapi);
    }
}

/// What the document says about one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    required: bool,
    ttl: Duration,
    store: StorePolicy,
    store_body: bool,
    report_only: bool,
}

impl Settings {
    fn of(route: &RouteConfig) -> Self {
        Self {
            required: route.required,
            ttl: route.ttl,
            store: route.store,
            store_body: route.store_body,
            report_only: route.report_only,
        }
    }

    /// Whether a request without a key is refused.
    fn refuses_missing_key(self) -> bool {
        self.required && !self.report_only
    }

    /// The claim safe for both of two handlers documented under one name: the key required if
    /// either requires it, the shorter retention, replays only where both replay.
    fn safer(self, other: Self) -> Self {
        Self {
            required: self.refuses_missing_key() || other.refuses_missing_key(),
            ttl: self.ttl.min(other.ttl),
            store: if self.store == other.store {
                self.store
            } else {
                StorePolicy::Success
            },
            store_body: self.store_body && other.store_body,
            report_only: self.report_only && other.report_only,
        }
    }
}

/// The registered handlers by name (the operation id utoipa gives them).
fn registered<'a>(
    registrations: impl IntoIterator<Item = &'a Registration>,
) -> BTreeMap<&'static str, Settings> {
    let mut by_name: BTreeMap<&'static str, Settings> = BTreeMap::new();
    for registration in registrations {
        let settings = Settings::of(registration.route);
        match by_name.entry(registration.route.handler()) {
            Entry::Vacant(entry) => {
                entry.insert(settings);
            }
            Entry::Occupied(mut entry) => {
                let known = *entry.get();
                if known != settings {
                    tracing::warn!(
                        handler = registration.route.handler(),
                        "two `#[idempotent]` handlers share this name with different settings: the \
                         OpenAPI document cannot tell their operations apart and describes the safer \
                         of the two (rename one)"
                    );
                    entry.insert(known.safer(settings));
                }
            }
        }
    }
    by_name
}

/// Whether the route `exempt` (as written in the router) names the document's `path`: the same
/// segments, a `{parameter}` matching any other whatever its name (axum's `{*rest}` included).
fn same_route(exempt: &str, path: &str) -> bool {
    let parameter = |segment: &str| segment.starts_with('{') && segment.ends_with('}');
    let (mut exempt, mut path) = (exempt.split('/'), path.split('/'));
    loop {
        match (exempt.next(), path.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b || (parameter(a) && parameter(b)) => {}
            _ => return false,
        }
    }
}

/// A header name as documents spell it: `idempotency-key` → `Idempotency-Key`.
fn display_name(lower: &str) -> String {
    lower
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// A retention in words: `24 hours`, `1 hour 30 minutes`, `90 seconds` → `1 minute 30 seconds`.
fn in_words(duration: Duration) -> String {
    let mut seconds = duration.as_secs();
    if seconds == 0 {
        return format!("{} milliseconds", duration.as_millis());
    }
    let mut parts = Vec::new();
    // Days from two on: `24h` reads as `24 hours`, as the attribute spells it.
    let day = if seconds >= 2 * 86_400 {
        86_400
    } else {
        u64::MAX
    };
    for (unit, name) in [(day, "day"), (3_600, "hour"), (60, "minute"), (1, "second")] {
        let count = seconds / unit;
        seconds %= unit;
        match count {
            0 => {}
            1 => parts.push(format!("1 {name}")),
            _ => parts.push(format!("{count} {name}s")),
        }
    }
    parts.join(" ")
}

/// idem's problem responses as the runtime renders them: media type and example body per kind.
struct Problems {
    rendered: Vec<(ProblemKind, String, serde_json::Value)>,
}

impl Problems {
    /// Every kind the document lists, rendered by `render`.
    fn render(render: impl Fn(&Problem) -> axum::response::Response) -> Self {
        let kinds = DOCUMENTED
            .iter()
            .flat_map(|(_, kinds, _)| kinds.iter().copied());
        let rendered = kinds
            .map(|kind| {
                let response = render(&Problem::of(kind));
                let media_type = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.split(';').next())
                    .map_or_else(|| PROBLEM_JSON.to_owned(), |value| value.trim().to_owned());
                // The renderers' bodies are in memory: collecting them never waits.
                let body = response
                    .into_body()
                    .collect()
                    .now_or_never()
                    .and_then(Result::ok)
                    .map(http_body_util::Collected::to_bytes)
                    .unwrap_or_default();
                let example = serde_json::from_slice(&body).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
                });
                (kind, media_type, example)
            })
            .collect();
        Self { rendered }
    }

    fn get(&self, kind: ProblemKind) -> Option<(&str, &serde_json::Value)> {
        self.rendered
            .iter()
            .find(|(rendered, ..)| *rendered == kind)
            .map(|(_, media_type, example)| (media_type.as_str(), example))
    }
}

/// The problem responses documented, by status: the kinds each one carries, and whether it has
/// `Retry-After`.
const DOCUMENTED: [(StatusCode, &[ProblemKind], bool); 4] = [
    (
        StatusCode::BAD_REQUEST,
        &[ProblemKind::KeyMissing, ProblemKind::KeyInvalid],
        false,
    ),
    (
        StatusCode::CONFLICT,
        &[
            ProblemKind::RequestInProgress,
            ProblemKind::ResultUnavailable,
        ],
        true,
    ),
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        &[ProblemKind::KeyReused],
        false,
    ),
    (
        StatusCode::SERVICE_UNAVAILABLE,
        &[ProblemKind::StoreUnavailable, ProblemKind::TooManyDetached],
        true,
    ),
];

/// The settings of an operation that is not an attributed handler's, from its method and path.
type PolicyLookup<'a> = dyn Fn(&Method, &str) -> Option<Settings> + 'a;

/// Walks a document with what is known about the routes.
struct Walker<'a> {
    key_header: String,
    problems: Problems,
    attributed: &'a BTreeMap<&'static str, Settings>,
    policy: &'a PolicyLookup<'a>,
}

impl Walker<'_> {
    fn document(&self, openapi: &mut OpenApi) {
        let mut uses_problem_schema = false;
        for (path, item) in &mut openapi.paths.paths {
            for (method, operation) in operations(item) {
                if method.is_safe() {
                    continue;
                }
                if let Some(settings) = self.settings(&method, path, operation) {
                    uses_problem_schema |= self.operation(operation, settings);
                }
            }
        }
        if uses_problem_schema {
            let components = openapi.components.get_or_insert_with(Components::new);
            components
                .schemas
                .entry(PROBLEM_SCHEMA.to_owned())
                .or_insert_with(problem_schema);
        }
    }

    /// The operation's settings: its handler's, with the policy's `required`; else the policy's.
    fn settings(&self, method: &Method, path: &str, operation: &Operation) -> Option<Settings> {
        let policy = (self.policy)(method, path);
        let attributed = operation
            .operation_id
            .as_deref()
            .map(|id| id.strip_prefix("r#").unwrap_or(id))
            .and_then(|id| self.attributed.get(id).copied());
        match (attributed, policy) {
            (Some(mut settings), Some(policy)) => {
                settings.required |= policy.refuses_missing_key();
                Some(settings)
            }
            (Some(settings), None) | (None, Some(settings)) => Some(settings),
            (None, None) => None,
        }
    }

    /// Documents one operation; whether it refers to the problem schema.
    fn operation(&self, operation: &mut Operation, settings: Settings) -> bool {
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        let documented = parameters.iter().any(|parameter| match parameter {
            RefOr::T(parameter) => {
                parameter.parameter_in == ParameterIn::Header
                    && parameter.name.eq_ignore_ascii_case(&self.key_header)
            }
            RefOr::Ref(_) => false,
        });
        if documented {
            return false;
        }
        parameters.push(RefOr::T(
            ParameterBuilder::new()
                .name(&self.key_header)
                .parameter_in(ParameterIn::Header)
                .required(if settings.refuses_missing_key() {
                    Required::True
                } else {
                    Required::False
                })
                .description(Some(self.key_description(settings)))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1)),
                ))
                .example(Some(serde_json::Value::String(
                    "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"".to_owned(),
                )))
                .build(),
        ));
        if settings.report_only {
            return false;
        }
        let responses = &mut operation.responses.responses;
        for (status, response) in responses.iter_mut() {
            if let RefOr::T(response) = response
                && replays(status, settings.store)
            {
                response
                    .headers
                    .entry(display_name(IDEMPOTENT_REPLAYED.as_str()))
                    .or_insert_with(|| RefOr::T(replayed_header(settings.store_body)));
            }
        }
        let mut uses_problem_schema = false;
        for (status, kinds, retry_after) in DOCUMENTED {
            let kinds: Vec<ProblemKind> = kinds
                .iter()
                .copied()
                .filter(|kind| *kind != ProblemKind::KeyMissing || settings.refuses_missing_key())
                .collect();
            match responses.entry(status.as_str().to_owned()) {
                Entry::Vacant(entry) => {
                    let (response, schema) = self.problem_response(&kinds, retry_after);
                    uses_problem_schema |= schema;
                    entry.insert(RefOr::T(response));
                }
                Entry::Occupied(mut entry) => {
                    if let RefOr::T(response) = entry.get_mut() {
                        let described = response.description.trim();
                        response.description = if described.is_empty() {
                            self.also_idem(&kinds)
                        } else {
                            format!("{described}\n\n{}", self.also_idem(&kinds))
                        };
                        if retry_after {
                            response
                                .headers
                                .entry("Retry-After".to_owned())
                                .or_insert_with(|| RefOr::T(retry_after_header()));
                        }
                    }
                }
            }
        }
        uses_problem_schema
    }

    fn key_description(&self, settings: Settings) -> String {
        let key = &self.key_header;
        let syntax = "A key the client generates for this operation, such as a UUID, as the IETF \
                      Idempotency-Key draft defines it: a Structured Field string (`\"…\"`) or a \
                      bare token, 1 to 255 printable ASCII characters.";
        if settings.report_only {
            return format!(
                "{syntax} Idempotency is being rolled out on this operation (report-only): the key \
                 is read and its result recorded, but responses do not change yet."
            );
        }
        let presence = if settings.refuses_missing_key() {
            format!(
                "Required: a request without it is refused with `400` ({}).",
                ProblemKind::KeyMissing.slug()
            )
        } else {
            "Optional: a request without it runs without idempotency, and a retry of it may run \
             again."
                .to_owned()
        };
        format!(
            "{syntax} {presence} A retry with the same {key} and the same request (method, path, \
             query and body) gets the first response back, marked `Idempotent-Replayed: true`, \
             without running again; a request still running answers `409`, and the same key on \
             another request `422` ({reused}). A key is remembered for {ttl} after its first \
             response; after that, a request with it runs again.",
            reused = ProblemKind::KeyReused.slug(),
            ttl = in_words(settings.ttl),
        )
    }

    /// A problem response listing `kinds`; whether its body refers to the schema.
    fn problem_response(&self, kinds: &[ProblemKind], retry_after: bool) -> (Response, bool) {
        let mut response = ResponseBuilder::new().description(self.describe(kinds));
        if retry_after {
            response = response.header("Retry-After", retry_after_header());
        }
        let mut uses_schema = false;
        let mut by_media_type: BTreeMap<&str, Vec<(ProblemKind, &serde_json::Value)>> =
            BTreeMap::new();
        for kind in kinds {
            if let Some((media_type, example)) = self.problems.get(*kind) {
                by_media_type
                    .entry(media_type)
                    .or_default()
                    .push((*kind, example));
            }
        }
        for (media_type, examples) in by_media_type {
            let mut content = ContentBuilder::new().examples_from_iter(examples.into_iter().map(
                |(kind, example)| {
                    (
                        kind.slug(),
                        ExampleBuilder::new()
                            .summary(kind.title())
                            .value(Some(example.clone())),
                    )
                },
            ));
            if media_type == PROBLEM_JSON {
                uses_schema = true;
                content = content.schema(Some(Ref::from_schema_name(PROBLEM_SCHEMA)));
            }
            response = response.content(media_type, content.build());
        }
        (response.build(), uses_schema)
    }

    /// The description of a response idem answers with `kinds`.
    fn describe(&self, kinds: &[ProblemKind]) -> String {
        format!(
            "Answered by idem, without running the operation: {}",
            self.list(kinds)
        )
    }

    /// The paragraph added to a response the operation documents itself.
    fn also_idem(&self, kinds: &[ProblemKind]) -> String {
        format!(
            "Also answered by idem, without running the operation: {}",
            self.list(kinds)
        )
    }

    fn list(&self, kinds: &[ProblemKind]) -> String {
        let items: Vec<String> = kinds
            .iter()
            .map(|kind| format!("`{}` ({})", kind.slug(), self.explain(*kind)))
            .collect();
        items.join("; ") + "."
    }

    fn explain(&self, kind: ProblemKind) -> String {
        let key = &self.key_header;
        match kind {
            ProblemKind::KeyMissing => format!("the request has no `{key}` header"),
            ProblemKind::KeyInvalid => format!(
                "the `{key}` header is malformed (neither an sf-string nor a token, empty, longer \
                 than 255 characters, or sent twice)"
            ),
            ProblemKind::RequestInProgress => format!(
                "the first request with this `{key}` is still running: retry after `Retry-After` \
                 seconds"
            ),
            ProblemKind::ResultUnavailable => format!(
                "the first request with this `{key}` completed, but its response was too large to \
                 replay: the key runs again after `Retry-After` seconds"
            ),
            ProblemKind::KeyReused => {
                format!("this `{key}` was first used for a different request")
            }
            ProblemKind::StoreUnavailable => {
                "the idempotency store is unreachable: retry after `Retry-After` seconds".to_owned()
            }
            ProblemKind::TooManyDetached => {
                "too many requests are still finishing for clients that went away: retry after \
                 `Retry-After` seconds"
                    .to_owned()
            }
            other => other.detail().to_owned(),
        }
    }
}

/// The operations of a path item, with their methods.
fn operations(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    let query = Method::from_bytes(b"QUERY").ok();
    let fixed = [
        (Some(Method::GET), &mut item.get),
        (Some(Method::PUT), &mut item.put),
        (Some(Method::POST), &mut item.post),
        (Some(Method::DELETE), &mut item.delete),
        (Some(Method::OPTIONS), &mut item.options),
        (Some(Method::HEAD), &mut item.head),
        (Some(Method::PATCH), &mut item.patch),
        (Some(Method::TRACE), &mut item.trace),
        (query, &mut item.query),
    ];
    let fixed = fixed
        .into_iter()
        .filter_map(|(method, operation)| Some((method?, operation.as_mut()?)));
    let additional = item
        .additional_operations
        .iter_mut()
        .filter_map(|(name, operation)| {
            let method = Method::from_bytes(name.to_ascii_uppercase().as_bytes()).ok()?;
            Some((method, operation))
        });
    fixed.chain(additional)
}

/// Whether a documented response `status` (`201`, `4XX`, `default`) is recorded under `store`
/// and so may come back as a replay.
fn replays(status: &str, store: StorePolicy) -> bool {
    let code = match status.as_bytes() {
        [digit @ b'2'..=b'5', b'X' | b'x', b'X' | b'x'] => u16::from(digit - b'0') * 100,
        _ => match status.parse::<u16>() {
            Ok(code) if (200..600).contains(&code) => code,
            _ => return false,
        },
    };
    StatusCode::from_u16(code).is_ok_and(|status| store.records(status))
}

fn replayed_header(store_body: bool) -> utoipa::openapi::header::Header {
    let body = if store_body {
        "the same status, body and recorded headers"
    } else {
        "the same status and recorded headers, and an empty body (this route does not keep bodies)"
    };
    HeaderBuilder::new()
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["true"])),
        ))
        .description(Some(format!(
            "`true` when this response is the replay of the first response to this idempotency \
             key ({body}); absent on the first response."
        )))
        .build()
}

fn retry_after_header() -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1)),
        ))
        .description(Some("Seconds to wait before retrying with the same key."))
        .build()
}

/// RFC 9457's members, as idem's default renderer writes them.
fn problem_schema() -> RefOr<Schema> {
    let string = |description: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .description(Some(description))
    };
    RefOr::T(Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("An RFC 9457 problem document."))
            .property(
                "type",
                string("A URI identifying the problem type.")
                    .format(Some(SchemaFormat::Custom("uri".to_owned()))),
            )
            .property("title", string("A short summary of the problem type."))
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("The HTTP status code.")),
            )
            .property("detail", string("What went wrong with this request."))
            .build(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_comparison_ignores_parameter_names() {
        assert!(same_route("/webhooks/{provider}", "/webhooks/{name}"));
        assert!(same_route("/files/{*rest}", "/files/{path}"));
        assert!(same_route("/a", "/a"));
        assert!(!same_route("/a/{id}", "/a/{id}/b"));
        assert!(!same_route("/a/{id}", "/b/{id}"));
        assert!(!same_route("/a/b", "/a/{b}"));
    }

    #[test]
    fn names_and_durations_read_well() {
        assert_eq!(display_name("idempotency-key"), "Idempotency-Key");
        assert_eq!(display_name("x-idempotency-key"), "X-Idempotency-Key");
        assert_eq!(in_words(Duration::from_secs(86_400)), "24 hours");
        assert_eq!(in_words(Duration::from_secs(36 * 3_600)), "36 hours");
        assert_eq!(in_words(Duration::from_secs(90)), "1 minute 30 seconds");
        assert_eq!(in_words(Duration::from_secs(5_400)), "1 hour 30 minutes");
        assert_eq!(in_words(RouteConfig::DEFAULT_TTL), "24 hours");
        assert_eq!(
            in_words(Duration::from_secs(7 * 86_400 + 2)),
            "7 days 2 seconds"
        );
        assert_eq!(in_words(Duration::from_millis(250)), "250 milliseconds");
    }

    #[test]
    fn replayed_statuses_follow_the_store_policy() {
        let non_5xx = StorePolicy::NonServerError;
        assert!(replays("201", non_5xx));
        assert!(replays("402", non_5xx));
        assert!(replays("2XX", non_5xx));
        assert!(!replays("429", non_5xx));
        assert!(!replays("503", non_5xx));
        assert!(!replays("default", non_5xx));
        assert!(!replays("101", StorePolicy::All));
        assert!(replays("5XX", StorePolicy::All));
        assert!(!replays("404", StorePolicy::Success));
    }

    #[test]
    fn handlers_sharing_a_name_get_the_safer_claim() {
        static LONG: RouteConfig = RouteConfig::new("create").ttl(Duration::from_secs(7_200));
        static SHORT_REQUIRED: RouteConfig = RouteConfig::new("create")
            .required(true)
            .ttl(Duration::from_secs(60));
        static OTHER: RouteConfig = RouteConfig::new("other");
        let registrations = [
            Registration::new(&LONG),
            Registration::new(&SHORT_REQUIRED),
            Registration::new(&OTHER),
        ];
        let by_name = registered(&registrations);
        let create = by_name["create"];
        assert!(create.required);
        assert_eq!(create.ttl, Duration::from_secs(60));
        assert_eq!(by_name["other"], Settings::of(&OTHER));
    }
}
