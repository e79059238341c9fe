//! The transactional claim: the record claimed inside a transaction the handler then writes in,
//! and the result recorded in it at commit.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Postgres, Transaction};

use super::error::into_store;
use super::{PostgresStore, sql, within};
use crate::record::RecordedResult;
use crate::store::{AcquireRequest, Acquired, CompleteRequest, StoreError};

/// The answer of [`PostgresStore::claim_in_transaction`]: the open transaction to run the
/// handler in, or what to answer instead (the same answers as [`Acquired`]'s).
///
/// # What commits together
///
/// The claim inserts the record (or takes it over) inside a transaction that stays open while
/// the handler runs and writes in it; [`PostgresStore::complete_in_transaction`] records the
/// result in the same transaction and commits. So the record, the handler's writes and the
/// recorded response commit together, or none of them does:
///
/// * a rollback, a `5xx` the executor does not record, a panic (the transaction is dropped), a
///   crash of the process or a lost connection (PostgreSQL rolls the transaction back) leave the
///   record as it was before the claim (absent, or released) and nothing of the handler's writes:
///   the key is free with no lease to wait out, and a retry runs cleanly. Free at once after
///   `transaction.rollback().await` returns; a dropped transaction is rolled back when the pool
///   takes its connection back, which sqlx does in a task of its own a round trip later (a
///   duplicate arriving in between gets [`TransactionalClaim::InFlight`]), so roll back
///   explicitly where you can;
/// * once the commit succeeded, every duplicate gets the recorded response and nothing runs
///   twice;
/// * while the transaction is open, a duplicate's claim (or a plain acquire of the key) answers
///   [`TransactionalClaim::InFlight`] at once: the record's lock is held by the open transaction
///   and idem never waits for it.
///
/// What it cannot cover is anything outside this database: an HTTP call to a card network, a
/// message sent to a broker, a file written. Those happen whether or not the transaction later
/// commits, and a retry after a rollback makes them again. Make such a call idempotent itself
/// (pass the idempotency key, or a key derived from it, to the service that supports one), or
/// fence it with the epoch. The epoch of a claim whose transaction rolled back is not kept: a
/// retry after a rollback runs with the same epoch as the attempt that left nothing behind.
///
/// The transaction's isolation level is `READ COMMITTED`, and the claim puts
/// `lock_timeout` back as it found it, so the handler's own statements see the session's
/// settings. Its connection is one of the store's pool for as long as the handler runs: size
/// [`PostgresConfig::max_connections`](super::PostgresConfig::max_connections) for the
/// transactional handlers running at once, and consider PostgreSQL's
/// `idle_in_transaction_session_timeout` to bound a handler that never finishes.
pub enum TransactionalClaim {
    /// The caller owns the record: run the handler in `transaction`, then
    /// [`PostgresStore::complete_in_transaction`] to record its result and commit, or roll the
    /// transaction back (or drop it) to give the key up with everything the handler wrote.
    Execute {
        /// The attempt number, the fencing number handlers can use (1 for the first).
        epoch: u64,
        /// The open transaction holding the claim.
        transaction: Transaction<'static, Postgres>,
    },
    /// The record is completed: replay this result. The claim's transaction is closed.
    Completed {
        /// The recorded result.
        result: Arc<RecordedResult>,
        /// How long the record still lives.
        ttl_left: Duration,
    },
    /// The key was first used with a different fingerprint. The claim's transaction is closed.
    Mismatch,
    /// Another attempt holds the record (a live lease, or a claim whose transaction is still
    /// open). The claim's transaction is closed.
    InFlight {
        /// Time left on that lease: for a record held by another open transaction, which has
        /// no lease to read, the caller's own lease.
        lease_left: Duration,
    },
}

impl fmt::Debug for TransactionalClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Execute { epoch, .. } => f
                .debug_struct("Execute")
                .field("epoch", epoch)
                .finish_non_exhaustive(),
            Self::Completed { result, ttl_left } => f
                .debug_struct("Completed")
                .field("result", result)
                .field("ttl_left", ttl_left)
                .finish(),
            Self::Mismatch => f.write_str("Mismatch"),
            Self::InFlight { lease_left } => f
                .debug_struct("InFlight")
                .field("lease_left", lease_left)
                .finish(),
        }
    }
}

impl PostgresStore {
    /// Opens a transaction and claims the record in it: the [acquire](super::Store::acquire)
    /// transition run as the transaction's first statement, so that whatever it writes commits
    /// only with the handler's writes and its result (see [`TransactionalClaim`]).
    ///
    /// Costs two round trips (the `BEGIN` and the claim). Every answer but
    /// [`TransactionalClaim::Execute`] closes the transaction without waiting (the rollback goes
    /// out with the connection's return to the pool). A duplicate of a claim whose transaction
    /// is still open gets [`TransactionalClaim::InFlight`] at once: the claim never waits for a
    /// record's lock. Bounded, like a transition, by [`PostgresConfig::acquire_timeout`] plus
    /// [`PostgresConfig::statement_timeout`]; a connection found broken is replaced, and a
    /// database refusing connections fails it at once.
    ///
    /// [`PostgresConfig::acquire_timeout`]: super::PostgresConfig::acquire_timeout
    /// [`PostgresConfig::statement_timeout`]: super::PostgresConfig::statement_timeout
    pub async fn claim_in_transaction(
        &self,
        request: AcquireRequest<'_>,
    ) -> Result<TransactionalClaim, StoreError> {
        let lock_timeout = self.config.lock_timeout;
        let (transaction, row) = self
            .retrying(|| {
                let claim = sql::acquire(&request, lock_timeout);
                async move {
                    let mut transaction = self.pool.begin_with(sql::BEGIN_CLAIM).await?;
                    let row = claim.fetch_one(&mut *transaction).await?;
                    Ok((transaction, row))
                }
            })
            .await?;
        Ok(match sql::parse_acquired(&row)? {
            Acquired::Execute { epoch } => TransactionalClaim::Execute { epoch, transaction },
            Acquired::Completed { result, ttl_left } => {
                TransactionalClaim::Completed { result, ttl_left }
            }
            Acquired::Mismatch => TransactionalClaim::Mismatch,
            Acquired::InFlight { lease_left } => TransactionalClaim::InFlight { lease_left },
        })
    }

    /// Records the result in `transaction` (a [`TransactionalClaim::Execute`]'s, after the
    /// handler's writes) and commits it: the [complete](super::Store::complete) transition, then
    /// `COMMIT`, two round trips.
    ///
    /// * `Ok(true)`: committed, the handler's writes with the result; duplicates now replay it.
    /// * `Ok(false)`: `request.owner` does not own the record in this transaction (another
    ///   owner's claim, or a record that expired while the handler ran); the transaction is
    ///   rolled back, the handler's writes with it.
    /// * `Err(_)`: nothing was recorded and the handler's writes are rolled back too, including
    ///   when a statement of the handler had already failed and aborted the transaction: the
    ///   handler's response must not be sent as a success. With one exception:
    ///   [`StoreError::Timeout`] while committing means the outcome is unknown (the `COMMIT` may
    ///   have reached the database). Either way a retry with the same key settles it: it gets
    ///   the recorded result if the commit happened, or runs cleanly if it did not.
    ///
    /// Whenever it does not commit, it rolls the transaction back before returning (a third
    /// round trip, on that path only), so the key is free when it returns. Each statement is
    /// bounded by
    /// [`PostgresConfig::statement_timeout`](super::PostgresConfig::statement_timeout); a broken
    /// connection is not retried, since the transaction died with it.
    pub async fn complete_in_transaction(
        &self,
        mut transaction: Transaction<'_, Postgres>,
        request: CompleteRequest<'_>,
    ) -> Result<bool, StoreError> {
        let encoded = request.result.encode();
        let complete = sql::complete(&request, &encoded, self.config.lock_timeout);
        let budget = self.config.statement_timeout;
        let recorded = within(budget, async {
            let row = complete
                .fetch_one(&mut *transaction)
                .await
                .map_err(into_store)?;
            sql::parse_flag(&row)
        })
        .await;
        if !matches!(recorded, Ok(true)) {
            // Rolled back now rather than when the pool takes the connection back, so the key
            // is free when this returns. Its own failure changes nothing: a transaction that
            // cannot be rolled back here is rolled back by the server with its connection.
            let rollback = async { transaction.rollback().await.map_err(into_store) };
            let _ = within(budget, rollback).await;
            return recorded;
        }
        within(budget, async {
            transaction.commit().await.map_err(into_store)
        })
        .await?;
        Ok(true)
    }
}
