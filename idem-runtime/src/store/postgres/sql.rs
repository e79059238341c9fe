//! Every statement the store sends, and the parsing of what the transitions answer.
//!
//! The transitions are functions of the schema (`migrations/0002_idem_transitions.sql`), each
//! called by one prepared statement with bound parameters: the record key, the owner token and
//! the fingerprint as `bytea`, durations as whole milliseconds (`bigint`), the encoded result as
//! `bytea`. No value is ever spliced into SQL text.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row as _;
use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::query::Query;

use super::error::into_store;
use crate::record::{DecodeError, RecordedResult};
use crate::store::{
    AcquireRequest, Acquired, CompleteRequest, ReleaseRequest, RenewRequest, StoreError,
};

/// A statement with its arguments bound, ready to run on a connection.
pub(super) type Statement = Query<'static, Postgres, PgArguments>;

/// `idem_acquire`: one row, `(outcome, epoch, left_ms, result)`.
const ACQUIRE: &str =
    "SELECT outcome, epoch, left_ms, result FROM idem_acquire($1, $2, $3, $4, $5, $6)";
/// `idem_renew`: one boolean.
const RENEW: &str = "SELECT idem_renew($1, $2, $3, $4)";
/// `idem_complete`: one boolean.
const COMPLETE: &str = "SELECT idem_complete($1, $2, $3, $4, $5)";
/// `idem_release`: one boolean.
const RELEASE: &str = "SELECT idem_release($1, $2, $3)";

/// The `BEGIN` of a transactional claim. `READ COMMITTED` whatever the database's default: each
/// statement of `idem_acquire` then reads what committed before it started, so a row that
/// changed under it is read again rather than failing the transaction.
pub(super) const BEGIN_CLAIM: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// One batch of the purge: the oldest expired rows no other transaction holds, then delete
/// those.
pub(super) const PURGE_BATCH: &str = "\
DELETE FROM idem_records
WHERE key IN (
    SELECT key FROM idem_records
    WHERE expires_at < now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)";

/// Durations sent to the database are capped at about 31 years (as the Redis store's), far
/// inside what `timestamptz` arithmetic handles.
const MAX_MILLIS: i64 = 1_000_000_000_000;

/// The call of `idem_acquire` for `request`.
pub(super) fn acquire(request: &AcquireRequest<'_>, lock_timeout: Duration) -> Statement {
    sqlx::query(ACQUIRE)
        .bind(&request.key.0[..])
        .bind(&request.owner.to_bytes()[..])
        .bind(&request.fingerprint.0[..])
        .bind(millis(request.lease))
        .bind(millis(request.retention))
        .bind(setting_millis(lock_timeout))
}

/// The call of `idem_renew` for `request`.
pub(super) fn renew(request: &RenewRequest<'_>, lock_timeout: Duration) -> Statement {
    sqlx::query(RENEW)
        .bind(&request.key.0[..])
        .bind(&request.owner.to_bytes()[..])
        .bind(millis(request.lease))
        .bind(setting_millis(lock_timeout))
}

/// The call of `idem_complete` for `request`, whose result is `encoded`.
pub(super) fn complete(
    request: &CompleteRequest<'_>,
    encoded: &[u8],
    lock_timeout: Duration,
) -> Statement {
    sqlx::query(COMPLETE)
        .bind(&request.key.0[..])
        .bind(&request.owner.to_bytes()[..])
        .bind(encoded)
        .bind(millis(request.ttl))
        .bind(setting_millis(lock_timeout))
}

/// The call of `idem_release` for `request`.
pub(super) fn release(request: &ReleaseRequest<'_>, lock_timeout: Duration) -> Statement {
    sqlx::query(RELEASE)
        .bind(&request.key.0[..])
        .bind(&request.owner.to_bytes()[..])
        .bind(setting_millis(lock_timeout))
}

fn corrupt(reason: &'static str) -> StoreError {
    StoreError::Corrupt(DecodeError::new(reason))
}

/// A duration the database reported, in milliseconds (never negative).
fn reported(ms: Option<i64>) -> Result<Duration, StoreError> {
    let ms = ms.ok_or_else(|| corrupt("idem_acquire answered without a duration"))?;
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// `idem_acquire`'s row. The result is decoded straight from the row's buffer.
pub(super) fn parse_acquired(row: &PgRow) -> Result<Acquired, StoreError> {
    let outcome: &str = row.try_get(0).map_err(into_store)?;
    let epoch: Option<i64> = row.try_get(1).map_err(into_store)?;
    let left: Option<i64> = row.try_get(2).map_err(into_store)?;
    match outcome {
        "execute" => match epoch.map(u64::try_from) {
            Some(Ok(epoch)) if epoch >= 1 => Ok(Acquired::Execute { epoch }),
            _ => Err(corrupt("idem_acquire answered an invalid epoch")),
        },
        "completed" => {
            let result: Option<&[u8]> = row.try_get(3).map_err(into_store)?;
            let result = result.ok_or_else(|| corrupt("a completed record without a result"))?;
            Ok(Acquired::Completed {
                result: Arc::new(RecordedResult::decode(result)?),
                ttl_left: reported(left)?,
            })
        }
        "mismatch" => Ok(Acquired::Mismatch),
        "in_flight" => Ok(Acquired::InFlight {
            lease_left: reported(left)?,
        }),
        _ => Err(corrupt("idem_acquire answered an unknown outcome")),
    }
}

/// The answer of renew, complete and release: whether the caller owned the record.
pub(super) fn parse_flag(row: &PgRow) -> Result<bool, StoreError> {
    row.try_get::<Option<bool>, _>(0)
        .map_err(into_store)?
        .ok_or_else(|| corrupt("a transition answered NULL"))
}

/// The statement that sets `statement_timeout` to `timeout` for the rest of the current
/// transaction only.
pub(super) fn statement_timeout(timeout: Duration) -> Statement {
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(setting_millis(timeout).to_string())
}

/// Whole milliseconds, at least 1 (a zero lease or ttl would end at once) and at most
/// [`MAX_MILLIS`].
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, MAX_MILLIS)
}

/// A duration as a PostgreSQL time setting in milliseconds: at least 1 (0 would disable the
/// timeout) and at most `i32::MAX`, the largest the server accepts.
pub(super) fn setting_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, i32::MAX.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
        assert_eq!(setting_millis(Duration::ZERO), 1);
        assert_eq!(setting_millis(Duration::from_micros(1500)), 1);
        assert_eq!(setting_millis(Duration::from_secs(2)), 2000);
        assert_eq!(setting_millis(Duration::MAX), i64::from(i32::MAX));
        assert_eq!(reported(Some(-5)).unwrap(), Duration::ZERO);
        assert_eq!(reported(Some(1500)).unwrap(), Duration::from_millis(1500));
        assert!(matches!(reported(None), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn every_transition_is_one_call_of_its_function() {
        for (sql, function, arguments) in [
            (ACQUIRE, "idem_acquire(", 6),
            (RENEW, "idem_renew(", 4),
            (COMPLETE, "idem_complete(", 5),
            (RELEASE, "idem_release(", 3),
        ] {
            assert!(sql.starts_with("SELECT "), "{sql}");
            assert!(sql.contains(function), "{sql}");
            assert_eq!(sql.matches('$').count(), arguments, "{sql}");
            assert!(!sql.contains(';'), "{sql}");
        }
    }
}
