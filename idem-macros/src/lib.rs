//! The `#[idempotent]` attribute of idem. Use it through `idem-runtime`, which re-exports it.

mod args;
mod bindings;
mod duration;
mod errors;
mod expand;
mod validate;

use proc_macro::TokenStream;

/// Makes an axum handler idempotent: a request carrying an `Idempotency-Key` header runs the handler
/// at most once per key, and every retry with the same key gets the first response back.
///
/// ```rust,ignore
/// use axum::{Json, Router, http::StatusCode, routing::post};
/// use idem_runtime::{Idempotency, idempotent};
///
/// #[idempotent(required = true, ttl = "24h", scope = user_id)]
/// async fn create_payment(
///     AuthUser(user_id): AuthUser,
///     State(db): State<Db>,
///     Json(req): Json<NewPayment>,
/// ) -> Result<(StatusCode, Json<Payment>), ApiError> {
///     let payment = db.charge(user_id, req).await?;
///     Ok((StatusCode::CREATED, Json(payment)))
/// }
///
/// let idem = Idempotency::builder().build(); // in-process store; see the runtime for Redis
/// let app = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(idem.layer()); // required: see "Wiring"
/// ```
///
/// Use it as `idem_runtime::idempotent` (the `idem-macros` crate is an implementation detail). It
/// keeps your function as written and wraps it in a route function of the same name that: reads the
/// key, fingerprints the request (method, route, path, query and body), claims the key in the store,
/// runs your function to the end even if the client disconnects (what is left of it then moves to a
/// task of its own), and records the response for replay. All of that lives in the runtime; the generated code is a thin shim (see
/// "Equivalent code").
///
/// Every argument is optional, and `#[idempotent]` alone is valid. Arguments are checked at compile
/// time, with the error on the offending token.
///
/// # Arguments
///
/// ## `required = <bool>`
///
/// Whether a request without an `Idempotency-Key` header is rejected with `400
/// idempotency-key-missing`. With `false`, such a request runs normally, without idempotency.
///
/// Default: `false`.
///
/// ## `ttl = "<duration>"`
///
/// How long a completed record is kept and replayed. After that the key is forgotten and a retry runs
/// the handler again.
///
/// Durations are one or more `<integer><unit>` groups with units `d`, `h`, `m` and `s`, largest
/// first, each at most once: `"90s"`, `"15m"`, `"24h"`, `"7d"`, `"1h30m"`. They must be greater than
/// zero and at most `"365d"`. This applies to every duration argument.
///
/// Default: `"24h"`.
///
/// ## `scope = <binding>`
///
/// Scopes the key to a value the handler's own parameters bind, such as the authenticated user:
/// `scope = user_id` with a parameter `AuthUser(user_id): AuthUser`. Two principals sending the same
/// key then never see each other's records. The binding may come from any parameter and from any
/// depth of its pattern (`Path((org, id))`, `Json(Order { customer, .. })`, through `&`, `mut`,
/// `ref` and `@`); or-patterns (`A(x) | B(x)`) and macros in patterns are not searched. The value
/// must implement `Display`; its text is hashed, never stored or logged.
///
/// Default: none, one global key space. That is only safe when keys are unguessable and never
/// shared between users: on a multi-user API, without a scope, a client that learns another user's
/// key gets that user's stored response. Always scope keys on such APIs.
///
/// ## `lease = "<duration>"`
///
/// How long a running first request holds the key before another attempt may take it over (the
/// lease is renewed while the handler runs, so it only expires when the instance died or stalled).
///
/// Default: the runtime's lease (`IdempotencyBuilder::lease`, 30 seconds unless configured).
///
/// ## `wait = "<duration>"`
///
/// A duplicate arriving while the first request still runs waits up to this long for the first
/// result and replays it, instead of getting `409 request-in-progress` at once. If the first request
/// is still running when the wait ends, the duplicate gets the `409`.
///
/// Default: no waiting.
///
/// ## `store = "non-5xx" | "2xx" | "all"`
///
/// Which of the handler's responses are recorded and replayed. A response that is not recorded
/// releases the key, so a retry runs the handler again.
///
/// * `"non-5xx"`: every response except server errors (and the transient `408`, `425`, `429`), so
///   a deterministic refusal such as a declined payment is replayed while a failure is retried;
/// * `"2xx"`: successes only;
/// * `"all"`: every response, `5xx` included (what Stripe does).
///
/// Default: `"non-5xx"`.
///
/// ## `store_body = <bool>`
///
/// With `false`, only the status and headers are recorded and replays carry an empty body: for
/// responses that contain secrets (a one-time token, a card number) that must not rest in the store.
///
/// Default: `true`.
///
/// ## `report_only = <bool>`
///
/// With `true`, the route never changes a response: every request runs its handler, and idem
/// records results and logs (at `INFO`, with the outcome) what it would have done instead: a
/// replay, a `409`, a `422`, a `400` for a missing or malformed key. For turning idempotency on
/// over live traffic and watching what it would do before enforcing it. Results are recorded as
/// usual, so the first enforced request after the switch is already protected.
///
/// Default: `false`.
///
/// ## `crate = "<path>"`
///
/// The path to the runtime crate, for code that reaches it under another name (a re-export, a renamed
/// dependency): `crate = "my_app::deps::idem"`.
///
/// Default: `"::idem_runtime"`.
///
/// # Responses
///
/// For requests with an unsafe method (safe methods such as `GET` are never affected), problems
/// are RFC 9457 `application/problem+json` documents whose `type` is
/// `https://idem.rs/problems/<slug>` (the base is configurable in the runtime), with
/// `Cache-Control: no-store`:
///
/// | situation | response | handler runs? |
/// |---|---|---|
/// | no key, `required = true` | `400` `idempotency-key-missing` | no |
/// | malformed key (not an sf-string `"…"` or a token, empty, over 255 bytes, control or non-ASCII characters, two `Idempotency-Key` fields) | `400` `idempotency-key-invalid` | no |
/// | no key, `required = false` | the handler's response, nothing recorded | yes |
/// | first request with a key | the handler's response, recorded per `store` | yes, once |
/// | same key and request, first one finished | the recorded response (same status, body and stored headers) plus `Idempotent-Replayed: true` | no |
/// | same key and request, first one still running | `409` `request-in-progress` with `Retry-After` (or, with `wait`, the first result) | no |
/// | same key, different request (method, route, path, query or body) | `422` `idempotency-key-reused` | no |
/// | same key, first response too large to record | `409` `result-unavailable` with `Retry-After` (when the record expires and the key runs again) | no |
/// | rejected before the handler starts (bad JSON, authentication, body too large) | that rejection, nothing recorded: a corrected retry with the same key runs | no |
/// | handler returned a response `store` does not record, or panicked | that response / `500` `handler-panicked`; the key is released and a retry runs again | yes |
/// | store unreachable | `503` `store-unavailable` with `Retry-After` | no |
/// | router not wired (see below) | `500` `idempotency-not-configured`, and an error log naming the fix | no |
///
/// # Wiring
///
/// The runtime reaches the handler through a layer on the router. Build the runtime once and layer
/// it over every `#[idempotent]` route:
///
/// ```rust,ignore
/// let idem = idem_runtime::Idempotency::builder().build();
/// let app = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(idem.layer()); // `Router::layer` only wraps routes added before it
/// ```
///
/// A route without it does not run unprotected: it answers `500 idempotency-not-configured` and
/// logs an error saying which layer to add.
///
/// # Equivalent code
///
/// The example at the top expands to the following (names the macro introduces are hygienic, so they
/// never clash with yours; `__private` is the runtime's hidden, unstable interface to the macro):
///
/// ```rust,ignore
/// pub async fn create_payment(
///     idem_arg0: AuthUser,
///     idem_arg1: State<Db>,
///     idem_arg2: ::idem_runtime::__private::Idempotent<Json<NewPayment>>,
/// ) -> ::idem_runtime::__private::Response {
///     // Your function, unchanged: its patterns, return type, `?` and `return` work as written.
///     // (It is async by contract; called directly, clippy would flag a body without `.await`.)
///     #[allow(clippy::unused_async)]
///     async fn create_payment(
///         AuthUser(user_id): AuthUser,
///         State(db): State<Db>,
///         Json(req): Json<NewPayment>,
///     ) -> Result<(StatusCode, Json<Payment>), ApiError> {
///         let payment = db.charge(user_id, req).await?;
///         Ok((StatusCode::CREATED, Json(payment)))
///     }
///     // Only the arguments you wrote become setters; the defaults live in the runtime.
///     static IDEM_ROUTE: ::idem_runtime::__private::RouteConfig =
///         ::idem_runtime::__private::RouteConfig::new("create_payment")
///             .required(true)
///             .ttl(::idem_runtime::__private::Duration::from_secs(86400));
///     // With the runtime's `utoipa` feature, publishes the settings at link time for
///     // `IdempotencyLayer::document`; without it, expands to nothing.
///     ::idem_runtime::__private::register!(IDEM_ROUTE);
///     // `scope = user_id`: your pattern, keeping only `user_id`, matched by reference.
///     let idem_scope = {
///         let AuthUser(user_id) = &idem_arg0;
///         ::idem_runtime::__private::scope(user_id)
///     };
///     // The wrapper around the last extractor read the key and fingerprinted the request; `Json`
///     // itself is extracted, and your function called, only if the request is not a replay
///     // answered from memory.
///     ::idem_runtime::__private::execute(
///         idem_arg2,
///         &IDEM_ROUTE,
///         idem_scope,
///         move |idem_arg2| create_payment(idem_arg0, idem_arg1, idem_arg2),
///     )
///     .await
/// }
/// ```
///
/// Without `scope`, `idem_scope` is `Scope::NONE`. A handler without parameters gets one,
/// `idem_arg0: Idempotent<()>`, which is not passed on. When the scope is bound by the last
/// parameter itself, that extractor runs first (`Idempotent::extract`) and the handler's future is
/// passed to `execute_extracted` instead; see `docs/EXPANSION.md`.
///
/// # Limitations
///
/// * **The last parameter is wrapped.** Its type `T` becomes `Idempotent<T>`, which extracts
///   wherever `T` would: the last parameter may be a body extractor (`Json`, `Form`, `Bytes`,
///   `Multipart`, …) or any other extractor. The wrapper reads the body once into memory to
///   fingerprint it, within axum's `DefaultBodyLimit` (an oversized body is still a `413`), then hands
///   `T` the same bytes; there is no separate body limit to configure.
/// * **`T` runs only when it has to.** A replay answered from process memory (the embedded store,
///   or a `TieredStore`'s cache) does not extract `T`: the body is not parsed again, and a retry
///   identical to the first request in method, path, query and body gets the recorded answer even
///   if a header `T` checks (such as `Content-Type`) changed. Otherwise `T` runs before the store
///   is asked, so a request it rejects never creates a record. When `scope` names a binding of the
///   last parameter, `T` runs first on every request.
/// * **No extractor slot is used.** The wrapper replaces the last parameter's type instead of adding
///   a hidden parameter, so a handler keeps all 16 of the parameters axum allows.
/// * **The function becomes a route function.** Its parameters are the positional ones shown above and
///   it returns `Response`, so it is meant to be routed, not called directly; call the logic through
///   another function if you also need it directly.
/// * **The scope value must implement `Display`.** Use a field or a newtype that does.
/// * **Generic handlers are not supported** (type or lifetime parameters, `where` clauses), nor `self`
///   receivers, `const`, `unsafe`, `extern` or variadic functions, nor `#[cfg]` on parameters.
///   Because your function is nested inside the route function, its body cannot refer to `Self` when
///   the handler is an associated function.
/// * **Attributes are split.** `doc`, `cfg`, `cfg_attr`, lint levels (`allow`, `warn`, `deny`,
///   `forbid`, `expect`), `must_use`, `deprecated` and `utoipa::path` stay on the route function;
///   every other attribute (for example `#[tracing::instrument]`) moves to your nested function,
///   where it sees your parameters and body. `#[utoipa::path]` works above or below
///   `#[idempotent]`: below, it stays on the route function, so the `__path_<name>` item it
///   generates stays beside it, where `#[derive(OpenApi)]` finds it (it then sees the route
///   function's positional parameters; with utoipa's `axum_extras`, which reads parameters, put it
///   above). With the runtime's `utoipa` feature, one call adds the key header and idem's
///   responses to the document: see `idem_runtime::openapi`.
/// * **Patterns around `scope`.** The scope binding is found through tuple, tuple-struct, struct,
///   slice, reference and `@` patterns, but not inside or-patterns or macros.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    match idempotent_impl(attr.into(), item.clone()) {
        Ok(expanded) => expanded.into(),
        // On any error, keep the user's function as written so the rest of the crate still type-checks.
        Err(error) => {
            let mut output = error.to_compile_error();
            output.extend(item);
            output.into()
        }
    }
}

fn idempotent_impl(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let mut errors = errors::Errors::default();
    let args = args::parse(attr, &mut errors);
    let func: syn::ItemFn = match syn::parse2(item) {
        Ok(func) => func,
        Err(error) => {
            errors.push(syn::Error::new(
                error.span(),
                "`#[idempotent]` applies to `async fn` axum handlers only",
            ));
            return errors.finish().map(|()| proc_macro2::TokenStream::new());
        }
    };
    let spec = validate::validate(args, func, &mut errors);
    errors.finish()?;
    Ok(expand::expand(&spec))
}
