//! # idem: Idempotency-Key support for axum
//!
//! A client that times out on `POST /payments` cannot know whether the payment happened. With idem
//! it retries with the same `Idempotency-Key`, and the server runs the handler at most once per key
//! while the record lives: every retry gets the first answer.
//!
//! ```
//! use axum::{Json, Router, http::StatusCode, routing::post};
//! use idem_runtime::{idempotent, Idempotency};
//!
//! #[idempotent(required = true, ttl = "24h")]
//! async fn create_payment(Json(amount): Json<u64>) -> (StatusCode, String) {
//!     (StatusCode::CREATED, format!("charged {amount}"))
//! }
//!
//! let idem = Idempotency::builder().build(); // embedded in-memory store
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(idem.layer());
//! # drop(app);
//! ```
//!
//! The attribute's manual is [`idempotent`]. The pieces it is made of:
//!
//! * [`key`]: parsing the `Idempotency-Key` header;
//! * [`fingerprint`]: what identifies a request and where its record lives;
//! * [`store`]: the state machine ([`Store`]), the embedded [`MemoryStore`] and the other
//!   backends;
//! * [`record`]: recorded responses and their encoding;
//! * [`problem`]: the RFC 9457 problem responses;
//! * [`config`]: the runtime ([`Idempotency`]), its builder and per-route settings;
//! * [`extract`] and [`executor`]: what the macro's expansion calls;
//! * [`layer`]: the tower layer that wires the runtime into a router, and the router-wide
//!   [`Policy`] that makes every unsafe route under it idempotent;
//! * [`operator`]: an operator's view of one key (inspect, purge, release a stuck one), from
//!   [`Idempotency::operator`];
//! * `admin` (feature `admin`): an optional axum router exposing the operator's view, with no
//!   authentication of its own;
//! * [`testing`]: [`FreshKeys`](testing::FreshKeys), for an application's own tests;
//! * `openapi` (feature `utoipa`): the key header, the replay marker and the problem responses
//!   in the service's OpenAPI document, in one call.
//!
//! ## The guarantee
//!
//! Within the retention window (the route's `ttl`), for one scoped key: a request with a different
//! payload never runs; while the first attempt is alive (holding its lease), duplicates never run
//! beside it; once the response is recorded, duplicates get it and never run. A crash, or a pause
//! longer than the lease, before the response is recorded can let a retry run again; so can losing
//! the store's data. The [`IdempotencyContext::epoch`] lets a handler fence its side effects
//! against that.

#[cfg(feature = "admin")]
pub mod admin;
pub mod config;
pub mod executor;
pub mod extract;
pub mod fingerprint;
pub mod key;
pub mod layer;
#[cfg(feature = "utoipa")]
pub mod openapi;
pub mod operator;
mod outage;
pub mod problem;
pub mod record;
pub mod store;
pub mod testing;

pub use config::{Idempotency, IdempotencyBuilder, RouteConfig, StorePolicy};
pub use executor::{execute, execute_extracted};
pub use extract::{IdempotencyContext, Idempotent, IdempotentRequest};
pub use fingerprint::{Scope, scope};
pub use layer::{IdempotencyLayer, Policy};
pub use store::{MemoryStore, Store};

#[cfg(feature = "macros")]
pub use idem_macros::idempotent;

/// The `redis` crate, re-exported so that clients and connections given to
/// [`RedisStore`](store::RedisStore) come from the same version.
#[cfg(feature = "redis")]
pub use ::redis;

/// The `sqlx` crate, re-exported so that pools given to
/// [`PostgresStore`](store::PostgresStore) come from the same version.
#[cfg(feature = "postgres")]
pub use ::sqlx;

/// The paths `#[idempotent]`'s expansion uses. Not a public API: it changes with the macro.
#[doc(hidden)]
pub mod __private {
    pub use axum::response::Response;
    pub use core::time::Duration;

    pub use crate::config::{RouteConfig, StorePolicy};
    pub use crate::executor::{execute, execute_extracted};
    pub use crate::extract::{Idempotent, IdempotentRequest};
    pub use crate::fingerprint::{Scope, scope};

    /// `register!(IDEM_ROUTE)` publishes a route's settings for [`crate::openapi`]: an
    /// `inventory::submit!` with the feature `utoipa`, nothing without it.
    pub use crate::__idem_register as register;
    #[cfg(feature = "utoipa")]
    pub use crate::openapi::Registration;
    #[cfg(feature = "utoipa")]
    pub use inventory;
}

/// `__private::register!`: see there.
#[cfg(feature = "utoipa")]
#[doc(hidden)]
#[macro_export]
macro_rules! __idem_register {
    ($route:ident) => {
        $crate::__private::inventory::submit! {
            $crate::__private::Registration::new(&$route)
        }
    };
}

/// `__private::register!`: see there.
#[cfg(not(feature = "utoipa"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __idem_register {
    ($route:ident) => {};
}
