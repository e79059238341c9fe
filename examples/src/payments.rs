//! The payments API: idem on a realistic service.
//!
//! * `POST /payments` — `#[idempotent(required = true, ttl = "24h", scope = user_id)]`; body
//!   `{"amount": <integer > 0>, "currency": "<3 upper-case letters>"}` → `201` with the payment and
//!   `Location: /payments/{id}`. Currency `XTS` (the ISO test code) → `503` "processor unavailable"
//!   (transient, so not recorded); an amount above 1 000 000 → `402` "declined" (deterministic, so
//!   recorded and replayed).
//! * `GET /payments` — this user's payments held by this process, oldest first, a page at a time
//!   (Stripe-style; the response is a bare JSON array):
//!   * `limit` — how many payments at most: an integer from 1 to [`MAX_PAGE_SIZE`] (1000), default
//!     [`DEFAULT_PAGE_SIZE`] (100); anything else → `400 invalid-limit`;
//!   * `starting_after` — a payment id: the page starts after it. The next page of a full page is
//!     `?starting_after=<the last id>`; a page shorter than `limit` is the last one. An id that is
//!     not one of this user's payments held by this process (never created, another user's, or
//!     dropped by the ledger bound below) → `400 invalid-starting-after`;
//!   * other parameters are ignored; a query string that cannot be decoded → `400 invalid-query`.
//! * `GET /payments/{id}` — one payment, or `404`.
//! * `PATCH /payments/{id}` — `#[idempotent(scope = user_id)]` (key optional); body
//!   `{"description": "…"}` → `200` with the updated payment.
//! * `POST /payments/{id}/refunds` — **no attribute**: the router-wide [`Policy`] on the layer
//!   covers it (every `POST` and `PATCH` that carries a key runs once per key, the key optional,
//!   scoped per user by [`AuthUser`]). Body `{"amount": <integer > 0>}` → `201` with the refund
//!   and `Location: /payments/{id}/refunds/{refund_id}`; an unknown payment or another user's →
//!   `404`; refunds adding up to more than the payment → `400 refund-exceeds-payment`
//!   (deterministic, so recorded and replayed).
//! * `GET /payments/{id}/refunds` — that payment's refunds, oldest first, or `404`.
//! * `GET /openapi.json` — the API's OpenAPI document ([`openapi`]): utoipa's, from the handlers'
//!   `#[utoipa::path]`, plus what idem adds to each idempotent operation (the `Idempotency-Key`
//!   header, required on `POST /payments` and optional on the others, the `Idempotent-Replayed`
//!   header and idem's problem responses). No authentication.
//!
//! Every other request needs `Authorization: Bearer <user>`; the token is the user id.
//!
//! **The ledger is bounded.** The payments live in this process's memory, at most
//! [`Settings::ledger_capacity`] of them across all users ([`DEFAULT_LEDGER_CAPACITY`], 50 000:
//! about 22 MB, about 75 MB if every payment carries a 1 KiB description). Creating one more
//! drops the oldest, whoever owns it: it is no longer listed, `GET`/`PATCH /payments/{id}` answer
//! `404`, and a retry of its `POST` still replays the recorded `201` while idem holds the record.
//! A page is at most [`MAX_PAGE_SIZE`] payments (about 80 KB of JSON without descriptions).
//!
//! Every error the example produces is an RFC 9457 problem document
//! (`application/problem+json`, `type` `https://payments.example/problems/<slug>`), including a
//! body that [`ApiJson`] rejects: `400 malformed-json`, `415 unsupported-media-type`,
//! `422 invalid-payment`.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use idem_runtime::{Idempotency, IdempotencyLayer, Policy, idempotent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use self::ledger::{Ledger, RefundError, UnknownCursor};

mod ledger;

/// How many payments the process keeps, unless [`Settings::ledger_capacity`] says otherwise.
pub const DEFAULT_LEDGER_CAPACITY: usize = 50_000;

/// How many payments `GET /payments` returns without `?limit=`.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// The largest `?limit=` of `GET /payments`.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Settings of the service (the `payments` binary reads `processing` from the environment and
/// keeps the other defaults).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Simulated processor latency inside `POST /payments` (`PAYMENTS_PROCESSING_MS`). Default 0.
    pub processing: Duration,
    /// How many payments the process keeps, across all users; creating one more drops the oldest.
    /// Default [`DEFAULT_LEDGER_CAPACITY`]; `0` counts as 1.
    pub ledger_capacity: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            processing: Duration::ZERO,
            ledger_capacity: DEFAULT_LEDGER_CAPACITY,
        }
    }
}

/// Builds the router: the routes, wired to `idem` with the router-wide policy that covers the
/// routes without an attribute ([`policy`]), and `GET /openapi.json` ([`openapi`]).
pub fn app(idem: &Idempotency, settings: Settings) -> Router {
    let state = AppState {
        ledger: Arc::new(Mutex::new(Ledger::new(settings.ledger_capacity))),
        settings: Arc::new(settings),
    };
    let layer = idem.layer().policy(policy());
    let document = openapi(&layer);
    Router::new()
        .route("/payments", get(list_payments).post(create_payment))
        .route("/payments/{id}", get(get_payment).patch(update_payment))
        .route(
            "/payments/{id}/refunds",
            get(list_refunds).post(create_refund),
        )
        .with_state(state)
        .route(
            "/openapi.json",
            get(move || std::future::ready(Json(document.clone()))),
        )
        .layer(layer)
}

/// The API's OpenAPI document: [`ApiDoc`], which utoipa derives from the handlers'
/// `#[utoipa::path]`, with what `layer` makes idempotent added by idem in one call (the key
/// header on each idempotent operation, `required` as its route says, the `Idempotent-Replayed`
/// response header and idem's problem responses).
pub fn openapi(layer: &IdempotencyLayer) -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    layer.document(&mut document);
    document
}

/// The API's operations as utoipa derives them, before idem's additions ([`openapi`]).
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Payments",
        description = "The idem payments example. Every operation needs `Authorization: Bearer <user>`."
    ),
    paths(
        create_payment,
        list_payments,
        get_payment,
        update_payment,
        create_refund,
        list_refunds
    )
)]
pub struct ApiDoc;

/// The example's router-wide policy: every `POST` and `PATCH` that carries a key is idempotent,
/// the key optional, scoped per user. The attributed routes keep their own settings.
pub fn policy() -> Policy {
    Policy::new().scope_by(|AuthUser(user): &AuthUser| user.clone())
}

/// A payment as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Payment {
    /// `pay_` and 16 hex digits.
    pub id: String,
    /// Minor units, > 0.
    pub amount: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Always `succeeded` for stored payments.
    pub status: String,
    /// Set by `PATCH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The body of `POST /payments`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// Minor units, > 0; above 1 000 000 the payment is declined.
    amount: u64,
    /// Three upper-case letters (ISO 4217); `XTS` simulates a processor outage.
    currency: String,
}

/// A refund as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Refund {
    /// `re_` and 16 hex digits.
    pub id: String,
    /// The refunded payment.
    pub payment_id: String,
    /// Minor units, > 0.
    pub amount: u64,
}

/// The body of `POST /payments/{id}/refunds`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRefund {
    /// Minor units, > 0; all refunds of a payment add up to at most its amount.
    amount: u64,
}

/// The body of `PATCH /payments/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentUpdate {
    /// At most 1024 bytes.
    description: String,
}

/// A problem document (RFC 9457): the example's own problems and idem's have the same members,
/// and share this `Problem` schema in the OpenAPI document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDocument {
    /// The problem type: `https://payments.example/problems/<slug>` for the service's own,
    /// `https://idem.rs/problems/<slug>` for idem's.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
}

#[derive(Clone)]
struct AppState {
    ledger: Arc<Mutex<Ledger>>,
    settings: Arc<Settings>,
}

impl AppState {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Nothing panics while holding the lock (the ledger's updates are map inserts and
        // removes), so a poisoned lock is still safe to use.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The authenticated user: `Authorization: Bearer <user>`.
#[derive(Debug, Clone)]
pub struct AuthUser(pub String);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = ApiProblem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|user| !user.is_empty() && user.len() <= 128);
        match user {
            Some(user) => Ok(Self(user.to_owned())),
            None => Err(ApiProblem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                "send `Authorization: Bearer <user>`",
            )),
        }
    }
}

/// A JSON request body whose rejections are the example's problem documents.
///
/// axum's [`Json`] answers a bad body in `text/plain`; this keeps its statuses and answers with
/// [`ApiProblem`]s instead: `400 malformed-json` (not JSON), `415 unsupported-media-type` (no
/// `Content-Type: application/json`), `422 invalid-payment` (JSON of the wrong shape),
/// `413 body-too-large` and `400 body-unreadable` (the body could not be read whole).
///
/// As the last parameter of an `#[idempotent]` handler it runs after idem has read and
/// fingerprinted the body, so a rejected body records nothing and a corrected retry with the same
/// key runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiProblem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiProblem::from(rejection)),
        }
    }
}

/// Creates a payment.
///
/// Charged at most once per `Idempotency-Key`: a retry with the same key gets the first answer.
#[utoipa::path(
    post,
    path = "/payments",
    tag = "payments",
    request_body = NewPayment,
    responses(
        (status = 201, description = "The payment.", body = Payment,
            headers(("Location" = String, description = "`/payments/{id}`"))),
        (status = 400, description = "The body is not JSON (`malformed-json`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No `Authorization: Bearer <user>` (`unauthorized`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 402, description = "Declined: the amount is above 1 000 000 (`declined`; deterministic, so recorded and replayed).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "The body is not sent as `application/json` (`unsupported-media-type`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "The body is not a valid payment (`invalid-payment`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The processor is unavailable (`processor-unavailable`; transient, so not recorded: retry with the same key).",
            body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[idempotent(required = true, ttl = "24h", scope = user_id)]
async fn create_payment(
    AuthUser(user_id): AuthUser,
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewPayment>,
) -> Result<Created<Payment>, ApiProblem> {
    if new.amount == 0 {
        return Err(ApiProblem::invalid(
            "`amount` must be an integer greater than 0",
        ));
    }
    if new.currency.len() != 3 || !new.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ApiProblem::invalid(
            "`currency` must be three upper-case letters, e.g. `EUR`",
        ));
    }
    if !state.settings.processing.is_zero() {
        tokio::time::sleep(state.settings.processing).await;
    }
    if new.currency == "XTS" {
        return Err(ApiProblem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "processor-unavailable",
            "Processor unavailable",
            "the payment processor is unavailable; retry with the same Idempotency-Key",
        ));
    }
    if new.amount > 1_000_000 {
        return Err(ApiProblem::new(
            StatusCode::PAYMENT_REQUIRED,
            "declined",
            "Payment declined",
            "the amount exceeds the limit of 1000000",
        ));
    }
    let payment = Payment {
        id: new_payment_id(),
        amount: new.amount,
        currency: new.currency,
        status: "succeeded".to_owned(),
        description: None,
    };
    let location = format!("/payments/{}", payment.id);
    state.ledger().insert(&user_id, payment.clone());
    created(&location, payment)
}

/// A `201 Created` answer: `Location` and the new resource as JSON.
type Created<T> = (StatusCode, [(header::HeaderName, HeaderValue); 1], Json<T>);

fn created<T>(location: &str, resource: T) -> Result<Created<T>, ApiProblem> {
    let location = HeaderValue::try_from(location).map_err(|_| ApiProblem::internal())?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(resource),
    ))
}

/// The query of `GET /payments`, as text: the handler checks it.
#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    starting_after: Option<String>,
}

/// Lists this user's payments, oldest first, a page at a time.
#[utoipa::path(
    get,
    path = "/payments",
    tag = "payments",
    params(
        ("limit" = Option<usize>, Query, description = "How many payments at most: 1 to 1000, default 100."),
        ("starting_after" = Option<String>, Query, description = "A payment id: the page starts after it."),
    ),
    responses(
        (status = 200, description = "A page of payments (a bare array; shorter than `limit` on the last page).",
            body = Vec<Payment>),
        (status = 400, description = "`invalid-limit`, `invalid-starting-after` or `invalid-query`.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No `Authorization: Bearer <user>` (`unauthorized`).",
            body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn list_payments(
    AuthUser(user_id): AuthUser,
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Payment>>, ApiProblem> {
    let Query(query) = query.map_err(|rejection| {
        ApiProblem::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            "Invalid query",
            shortened(&rejection.body_text(), 256),
        )
    })?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_PAGE_SIZE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=MAX_PAGE_SIZE).contains(limit))
            .ok_or_else(|| {
                ApiProblem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-limit",
                    "Invalid limit",
                    format!("`limit` must be an integer from 1 to {MAX_PAGE_SIZE}"),
                )
            })?,
    };
    let page = state
        .ledger()
        .page(&user_id, query.starting_after.as_deref(), limit);
    match page {
        Ok(page) => Ok(Json(page)),
        Err(UnknownCursor) => Err(ApiProblem::new(
            StatusCode::BAD_REQUEST,
            "invalid-starting-after",
            "Invalid starting_after",
            format!(
                "`starting_after` must be the id of one of your payments held by this service, got `{}`",
                shortened(query.starting_after.as_deref().unwrap_or_default(), 64)
            ),
        )),
    }
}

/// One payment.
#[utoipa::path(
    get,
    path = "/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "The payment's id.")),
    responses(
        (status = 200, description = "The payment.", body = Payment),
        (status = 401, description = "No `Authorization: Bearer <user>` (`unauthorized`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such payment of this user (`not-found`).",
            body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn get_payment(
    AuthUser(user_id): AuthUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiProblem> {
    match state.ledger().get(&user_id, &id) {
        Some(payment) => Ok(Json(payment.clone())),
        None => Err(ApiProblem::not_found(&id)),
    }
}

/// Sets a payment's description.
#[utoipa::path(
    patch,
    path = "/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "The payment's id.")),
    request_body = PaymentUpdate,
    responses(
        (status = 200, description = "The updated payment.", body = Payment),
        (status = 401, description = "No `Authorization: Bearer <user>` (`unauthorized`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such payment of this user (`not-found`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "The description is longer than 1024 bytes (`invalid-payment`).",
            body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[idempotent(scope = user_id)]
async fn update_payment(
    AuthUser(user_id): AuthUser,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(update): ApiJson<PaymentUpdate>,
) -> Result<Json<Payment>, ApiProblem> {
    if update.description.len() > 1024 {
        return Err(ApiProblem::invalid(
            "`description` is limited to 1024 bytes",
        ));
    }
    match state.ledger().get_mut(&user_id, &id) {
        Some(payment) => {
            payment.description = Some(update.description);
            Ok(Json(payment.clone()))
        }
        None => Err(ApiProblem::not_found(&id)),
    }
}

/// Refunds part of a payment.
///
/// No `#[idempotent]`: the router-wide policy makes it idempotent (see [`policy`]), and its
/// OpenAPI operation gets the policy's settings.
#[utoipa::path(
    post,
    path = "/payments/{id}/refunds",
    tag = "refunds",
    params(("id" = String, Path, description = "The payment's id.")),
    request_body = NewRefund,
    responses(
        (status = 201, description = "The refund.", body = Refund,
            headers(("Location" = String, description = "`/payments/{id}/refunds/{refund_id}`"))),
        (status = 400, description = "Refunds would add up to more than the payment (`refund-exceeds-payment`; recorded and replayed).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No `Authorization: Bearer <user>` (`unauthorized`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such payment of this user (`not-found`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "The amount is 0 (`invalid-refund`).",
            body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn create_refund(
    AuthUser(user_id): AuthUser,
    State(state): State<AppState>,
    Path(payment_id): Path<String>,
    ApiJson(new): ApiJson<NewRefund>,
) -> Result<Created<Refund>, ApiProblem> {
    if new.amount == 0 {
        return Err(ApiProblem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-refund",
            "Invalid refund",
            "`amount` must be an integer greater than 0",
        ));
    }
    if !state.settings.processing.is_zero() {
        tokio::time::sleep(state.settings.processing).await;
    }
    let refund = state.ledger().refund(&user_id, &payment_id, || Refund {
        id: new_id("re"),
        payment_id: payment_id.clone(),
        amount: new.amount,
    });
    let refund = match refund {
        Ok(refund) => refund,
        Err(RefundError::UnknownPayment) => return Err(ApiProblem::not_found(&payment_id)),
        Err(RefundError::ExceedsPayment { left }) => {
            return Err(ApiProblem::new(
                StatusCode::BAD_REQUEST,
                "refund-exceeds-payment",
                "Refund exceeds payment",
                format!("at most {left} of this payment is left to refund"),
            ));
        }
    };
    created(
        &format!("/payments/{payment_id}/refunds/{}", refund.id),
        refund,
    )
}

/// A payment's refunds, oldest first.
#[utoipa::path(
    get,
    path = "/payments/{id}/refunds",
    tag = "refunds",
    params(("id" = String, Path, description = "The payment's id.")),
    responses(
        (status = 200, description = "The refunds.", body = Vec<Refund>),
        (status = 401, description = "No `Authorization: Bearer <user>` (`unauthorized`).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such payment of this user (`not-found`).",
            body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn list_refunds(
    AuthUser(user_id): AuthUser,
    State(state): State<AppState>,
    Path(payment_id): Path<String>,
) -> Result<Json<Vec<Refund>>, ApiProblem> {
    match state.ledger().refunds(&user_id, &payment_id) {
        Some(refunds) => Ok(Json(refunds.to_vec())),
        None => Err(ApiProblem::not_found(&payment_id)),
    }
}

fn new_payment_id() -> String {
    new_id("pay")
}

/// `prefix`, `_` and 16 hex digits: unique within the process (a counter) and unpredictable across
/// processes (random keys).
fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    static HASHER: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(Default::default);
    format!(
        "{prefix}_{:016x}",
        HASHER.hash_one(NEXT.fetch_add(1, Ordering::Relaxed))
    )
}

/// The example's own RFC 9457 problem responses.
#[derive(Debug)]
pub struct ApiProblem {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
}

impl ApiProblem {
    fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
        }
    }

    fn invalid(detail: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-payment",
            "Invalid payment",
            detail,
        )
    }

    fn not_found(id: &str) -> Self {
        let shown = shortened(id, 64);
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Payment not found",
            format!("no payment `{shown}`"),
        )
    }

    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "unexpected error",
        )
    }
}

impl From<JsonRejection> for ApiProblem {
    fn from(rejection: JsonRejection) -> Self {
        // axum's text names what was wrong (serde's message for syntax and data errors); it may
        // quote the client's input, so only its start is kept.
        let detail = shortened(&rejection.body_text(), 256);
        match rejection {
            JsonRejection::JsonSyntaxError(_) => Self::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                detail,
            ),
            JsonRejection::JsonDataError(_) => Self::invalid(&detail),
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as JSON with `Content-Type: application/json`",
            ),
            rejection if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Body too large",
                detail,
            ),
            // The body could not be read whole (the client stopped sending, or too slowly).
            rejection => Self::new(
                rejection.status(),
                "body-unreadable",
                "Body unreadable",
                detail,
            ),
        }
    }
}

/// At most `limit` characters of `text`.
fn shortened(text: &str, limit: usize) -> String {
    text.chars().take(limit).collect()
}

impl IntoResponse for ApiProblem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("https://payments.example/problems/{}", self.slug),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
