//! The application under test: two routes doing the same trivial work, one bare and one
//! `#[idempotent]`.
//!
//! Both parse a small JSON payment, take an id from a counter and answer `201 Created` with a JSON
//! body and a `Location` header (what a create endpoint does, minus the database).

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::routing::post;
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use http::StatusCode;
use http::header::LOCATION;
use idem_runtime::{Idempotency, idempotent};
use redis::Script;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

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

/// `POST /floor1` and `POST /floor2`: see [`floor`].
pub(crate) fn floor_app(connection: ConnectionManager) -> Router {
    Router::new()
        .route("/floor1", post(floor::<1>))
        .route("/floor2", post(floor::<2>))
        .with_state(connection)
}

/// `POST /bare` and `POST /idem` over `runtime`.
pub(crate) fn app(runtime: &Idempotency) -> Router {
    Router::new()
        .route("/bare", post(bare))
        .route("/idem", post(idem))
        .layer(runtime.layer())
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
