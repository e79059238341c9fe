//! The application under test: two routes doing the same trivial work, one bare and one
//! `#[idempotent]`.
//!
//! Both parse a small JSON payment, take an id from a counter and answer `201 Created` with a JSON
//! body and a `Location` header (what a create endpoint does, minus the database).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderValue, StatusCode};
use idem_runtime::{Idempotency, Policy, idempotent};
use redis::Script;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The request body.
#[derive(Deserialize)]
pub(crate) struct NewPayment {
    amount: u64,
    currency: String,
}

/// The response body.
#[derive(Serialize)]
pub(crate) struct Payment {
    id: u64,
    amount: u64,
    currency: String,
    status: &'static str,
}

type Created = (StatusCode, [(http::HeaderName, String); 1], Json<Payment>);

fn charge(payment: NewPayment) -> Created {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        [(LOCATION, format!("/payments/{id}"))],
        Json(Payment {
            id,
            amount: payment.amount,
            currency: payment.currency,
            status: "succeeded",
        }),
    )
}

/// The baseline: the same work without idempotency.
pub(crate) async fn bare(Json(payment): Json<NewPayment>) -> Created {
    charge(payment)
}

/// The same work, idempotent: a key is required.
#[idempotent(required = true)]
pub(crate) async fn idem(Json(payment): Json<NewPayment>) -> Created {
    charge(payment)
}

/// The floor: the bare handler's work plus `N` minimal script calls (`EVALSHA` of `return 1`) over
/// the same kind of Redis connection the store uses. What `N` round trips cost on this machine with
/// no idempotency logic at all.
async fn floor<const N: usize>(
    State(connection): State<ConnectionManager>,
    Json(payment): Json<NewPayment>,
) -> Result<Created, StatusCode> {
    static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new("return 1"));
    for _ in 0..N {
        let mut connection = connection.clone();
        SCRIPT
            .key("idem:v2:{floor}")
            .arg("0123456789abcdef0123456789abcdef")
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    }
    Ok(charge(payment))
}

/// A response kept by [`floor_replay`]: the fingerprint and what is sent again.
struct Kept {
    fingerprint: [u8; 32],
    location: HeaderValue,
    body: Bytes,
}

/// The floor of a replay from process memory, with no idem code: the bare route's own work on the
/// request (buffering and parsing the JSON body), then only what any replay must do: read the key,
/// hash the request (SHA-256 of method, path and body) and the key (SHA-256), look the key's digest
/// up in a shared map, compare the fingerprints and answer the kept response marked
/// `Idempotent-Replayed: true`. A key not seen yet runs the handler and keeps its answer.
/// Nothing here is bounded, leased or fenced: it is a measuring stick, not an idempotency layer.
async fn floor_replay(request: Request) -> Result<Response, StatusCode> {
    static KEPT: LazyLock<RwLock<HashMap<[u8; 32], Kept>>> = LazyLock::new(RwLock::default);
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let payment: NewPayment =
        serde_json::from_slice(&body).map_err(|_| StatusCode::UNPROCESSABLE_ENTITY)?;
    let key = parts
        .headers
        .get("idempotency-key")
        .ok_or(StatusCode::BAD_REQUEST)?;
    let fingerprint: [u8; 32] = Sha256::new()
        .chain_update(parts.method.as_str())
        .chain_update(parts.uri.path())
        .chain_update(&body)
        .finalize()
        .into();
    let record: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let kept = KEPT.read().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    if let Some(kept) = kept.get(&record) {
        if kept.fingerprint != fingerprint {
            return Err(StatusCode::UNPROCESSABLE_ENTITY);
        }
        let mut response = (StatusCode::CREATED, kept.body.clone()).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(LOCATION, kept.location.clone());
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(response);
    }
    drop(kept);
    let (status, [(_, location)], Json(payment)) = charge(payment);
    let body =
        Bytes::from(serde_json::to_vec(&payment).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?);
    let location =
        HeaderValue::try_from(location).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let mut response = (status, body.clone()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(LOCATION, location.clone());
    KEPT.write()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
        .insert(
            record,
            Kept {
                fingerprint,
                location,
                body,
            },
        );
    Ok(response)
}

/// `POST /floor1` and `POST /floor2` (see [`floor`]), and `POST /floor-replay` (see
/// [`floor_replay`]).
pub(crate) fn floor_app(connection: ConnectionManager) -> Router {
    Router::new()
        .route("/floor1", post(floor::<1>))
        .route("/floor2", post(floor::<2>))
        .route("/floor-replay", post(floor_replay))
        .with_state(connection)
}

/// `POST /bare` and `POST /idem` over `runtime`, and `POST /policy`: the bare handler made
/// idempotent by a router-wide policy (key required, as `/idem`'s attribute says).
pub(crate) fn app(runtime: &Idempotency) -> Router {
    let router_wide = Router::new()
        .route("/policy", post(bare))
        .layer(runtime.layer().policy(Policy::new().required(true)));
    Router::new()
        .route("/bare", post(bare))
        .route("/idem", post(idem))
        .layer(runtime.layer())
        .merge(router_wide)
}

/// Serves `app` on a free loopback port (HTTP/1.1, keep-alive, `TCP_NODELAY`) on the current tokio
/// runtime, and returns the address.
pub(crate) async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("server stopped: {error}");
        }
    });
    Ok(addr)
}
