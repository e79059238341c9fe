//! App instances over a shared Redis, as the Redis and fault tests run them side by side: each
//! [`RedisInstance`] is a runtime over its own [`TieredStore`] in front of a [`RedisStore`]
//! connection, and a router behind that runtime's layer (with a router-wide [`Policy`] or without),
//! so two of them over one `redis-server` are two replicas of one service. Plus what those tests
//! read back from Redis: [`record_key`], [`record_exists`].
//!
//! ```no_run
//! # async fn demo(redis: &idem_tests::redis::RedisServer, routes: axum::Router<idem_tests::support::Ledger>) {
//! use idem_runtime::Idempotency;
//! use idem_tests::instances::{RedisInstance, record_exists, record_key};
//! use idem_tests::support::{Ledger, keyed};
//!
//! let ledger = Ledger::new();
//! let runtime = || Idempotency::builder().lease(std::time::Duration::from_millis(800));
//! let a = RedisInstance::start(&redis.url(), runtime(), routes.clone(), ledger.clone()).await;
//! let b = RedisInstance::start(&redis.url(), runtime(), routes, ledger.clone()).await;
//! let first = a.send(keyed("POST", "/pay", "k", "pay 1")).await;
//! let again = b.send(keyed("POST", "/pay", "k", "pay 1")).await;
//! assert!(again.replayed() && again.body == first.body);
//! assert!(record_exists(redis, &record_key("k")));
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::Request;
use idem_runtime::fingerprint::{RecordKey, Scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::store::{RedisConfig, RedisStore, Store, TieredStore};
use idem_runtime::{Idempotency, IdempotencyBuilder, Policy};
use tokio::task::JoinHandle;

use crate::redis::RedisServer;
use crate::support::{self, Ledger, Reply};

/// Each Redis command's budget, and each connection's, in the tests (the defaults are 1 s): short,
/// so that a fault shows well within a test's patience.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);

/// A [`RedisStore`] connected to `url` (a server, or a [`Proxy`](crate::proxy::Proxy) in front of
/// one) with [`COMMAND_TIMEOUT`] budgets for commands and connections.
pub async fn connect_redis(url: &str) -> RedisStore {
    let config = RedisConfig::new()
        .response_timeout(COMMAND_TIMEOUT)
        .connect_timeout(COMMAND_TIMEOUT);
    RedisStore::connect(url, config)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {url}: {error}"))
}

/// The record key of client key `key` on an unscoped route.
pub fn record_key(key: &str) -> RecordKey {
    let key = IdempotencyKey::parse_bytes(key.as_bytes()).expect("a valid key");
    RecordKey::new(&Scope::NONE, &key)
}

/// Whether `server` holds the record of `key` (by the name [`RedisStore::key_name`] gives it).
pub fn record_exists(server: &RedisServer, key: &RecordKey) -> bool {
    server.query(redis::cmd("EXISTS").arg(RedisStore::key_name(key)))
}

/// One app instance over a shared Redis: its runtime, the [`TieredStore`] under it (to inspect or
/// clear its cache), its router, and the state its handlers share.
#[derive(Clone)]
pub struct RedisInstance<S> {
    /// The runtime, for [`Idempotency::running`] and [`Idempotency::shutdown`].
    pub idem: Idempotency,
    /// The runtime's store.
    pub store: Arc<TieredStore<RedisStore>>,
    /// The routes behind the runtime's layer.
    pub router: Router,
    /// The routes' state (a clone: an `Arc` or a [`Ledger`] shares it with the test).
    pub state: S,
}

impl<S: Clone + Send + Sync + 'static> RedisInstance<S> {
    /// Connects to the Redis at `url` ([`connect_redis`]), puts a [`TieredStore`] in front, builds
    /// `runtime` over it, and puts `routes`, given `state`, behind its layer.
    pub async fn start(
        url: &str,
        runtime: IdempotencyBuilder,
        routes: Router<S>,
        state: S,
    ) -> Self {
        let app = |idem: &Idempotency| support::idempotent_app(idem, routes, state.clone());
        Self::start_behind(url, runtime, app, state.clone()).await
    }

    /// [`RedisInstance::start`] with `policy` on the layer: the router-wide form, where every
    /// route the policy covers is idempotent without the attribute.
    pub async fn start_router_wide(
        url: &str,
        runtime: IdempotencyBuilder,
        policy: Policy,
        routes: Router<S>,
        state: S,
    ) -> Self {
        let app =
            |idem: &Idempotency| support::router_wide_app(idem, policy, routes, state.clone());
        Self::start_behind(url, runtime, app, state.clone()).await
    }

    /// Builds the runtime over a tiered store on `url`, and the router `app` makes behind it.
    async fn start_behind(
        url: &str,
        runtime: IdempotencyBuilder,
        app: impl FnOnce(&Idempotency) -> Router,
        state: S,
    ) -> Self {
        let store = Arc::new(TieredStore::new(connect_redis(url).await));
        let idem = runtime
            .shared_store(Arc::clone(&store) as Arc<dyn Store>)
            .build();
        Self {
            router: app(&idem),
            idem,
            store,
            state,
        }
    }

    /// [`support::send`] to this instance.
    pub async fn send(&self, request: Request<Body>) -> Reply {
        support::send(&self.router, request).await
    }

    /// [`support::spawn_send`] to this instance.
    pub fn spawn_send(&self, request: Request<Body>) -> JoinHandle<Reply> {
        support::spawn_send(&self.router, request)
    }

    /// [`support::send_until_not_in_progress`] to this instance.
    pub async fn send_until_not_in_progress(
        &self,
        request: impl Fn() -> Request<Body>,
        budget: Duration,
    ) -> (Reply, usize) {
        support::send_until_not_in_progress(&self.router, request, budget).await
    }
}

impl RedisInstance<Ledger> {
    /// [`support::start_send`] to this instance, counted by its ledger.
    pub async fn start_send(&self, request: Request<Body>) -> JoinHandle<Reply> {
        support::start_send(&self.router, &self.state, request).await
    }
}
