//! Failing fast while the database refuses connections.
//!
//! sqlx's pool treats a refused connection as a server still starting up: it tries again, with
//! backoff, until the acquire timeout. While PostgreSQL is down, every call would then wait out
//! that whole budget before its `503`. So the store remembers when the database was last seen
//! refusing (a connection found broken, or a pool that could open a connection and did not within
//! the acquire timeout), and from then on opens one connection of its own before using the pool:
//! refused, the call fails at once; accepted, the database is back, the connection is closed and
//! the pool is used again. Calls take turns at that check, so while the database is down they
//! fail one after the other at the speed of a refused connection, and once it is back the first
//! check to succeed lets all the others through.

use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::Connection as _;
use sqlx::postgres::{PgConnection, PgPool};

use super::error::into_store;
use crate::store::StoreError;

/// Whether the database was last seen refusing connections.
#[derive(Debug, Default)]
pub(super) struct Reachability {
    /// Set when the database looked down; cleared by a connection that succeeds.
    down: AtomicBool,
    /// The turn to check: one connection attempt at a time.
    check: tokio::sync::Mutex<()>,
}

impl Reachability {
    /// Notes that the database may be down: the next call checks before using the pool.
    pub(super) fn suspect(&self) {
        self.down.store(true, Ordering::Relaxed);
    }

    /// Whether the database is believed reachable.
    pub(super) fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// `Ok` when the pool may be used: the database was not seen down, or it accepts a
    /// connection now. Otherwise the error of that connection attempt (refused: at once).
    pub(super) async fn check(&self, pool: &PgPool) -> Result<(), StoreError> {
        if self.is_up() {
            return Ok(());
        }
        let _turn = self.check.lock().await;
        // Another call's check may have succeeded while this one waited.
        if self.is_up() {
            return Ok(());
        }
        let connection = PgConnection::connect_with(&pool.connect_options())
            .await
            .map_err(into_store)?;
        self.down.store(false, Ordering::Relaxed);
        // A clean goodbye (`Terminate`), so the server does not log a lost client.
        let _ = connection.close().await;
        Ok(())
    }
}
