//! What a sqlx error means for idem: a [`StoreError`] (the table in [`PostgresStore`]'s docs),
//! and whether the connection it came from is broken, so that the call may run again on another.
//!
//! [`PostgresStore`]: super::PostgresStore

use std::borrow::Cow;

use crate::record::DecodeError;
use crate::store::StoreError;

/// SQLSTATE `57014` `query_canceled`: the statement timeout (or a cancel request).
pub(super) const QUERY_CANCELED: &str = "57014";
/// SQLSTATE `55P03` `lock_not_available`: the lock timeout, or `NOWAIT`.
pub(super) const LOCK_NOT_AVAILABLE: &str = "55P03";

/// What a sqlx error means for the caller (see the table in [`PostgresStore`]'s docs).
///
/// [`PostgresStore`]: super::PostgresStore
pub(super) fn map_error(error: &sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::PoolTimedOut => StoreError::Timeout,
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => StoreError::Timeout,
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or(Cow::Borrowed("?????"));
            if code == QUERY_CANCELED || code == LOCK_NOT_AVAILABLE {
                return StoreError::Timeout;
            }
            StoreError::Unavailable(format!(
                "PostgreSQL error {code} ({}): {}",
                sqlstate_class(&code),
                database.message()
            ))
        }
        sqlx::Error::RowNotFound
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(DecodeError::new(
            "a row of idem_records does not have the record's columns and types",
        )),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// [`map_error`] for `map_err`.
#[allow(clippy::needless_pass_by_value)]
pub(super) fn into_store(error: sqlx::Error) -> StoreError {
    map_error(&error)
}

/// Whether `error` says the connection itself is gone (the server closed it, crashed, or is
/// shutting down), rather than the statement failing: the same call may then run again on
/// another connection. A timeout is not a broken connection: the server may still be running the
/// statement, and the call's budget is spent anyway.
pub(super) fn is_broken(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(io) => io.kind() != std::io::ErrorKind::TimedOut,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown, cannot
            // connect now (starting up or shutting down).
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// A few words on what a SQLSTATE's class means for idem, for [`StoreError::Unavailable`]'s
/// message.
fn sqlstate_class(code: &str) -> &'static str {
    match code.get(..2) {
        Some("08") => "connection failure",
        Some("40") => "transaction rolled back, safe to retry",
        Some("53") => "server out of resources",
        Some("57") => "server shutting down or not accepting connections",
        Some("42") => "missing or wrong schema: run PostgresStore::migrate",
        _ => "database error",
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with a given SQLSTATE, as PostgreSQL would report it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &'static str {
            "something happened"
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn database(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    fn io(kind: std::io::ErrorKind) -> sqlx::Error {
        sqlx::Error::Io(kind.into())
    }

    fn unavailable(error: &sqlx::Error) -> String {
        match map_error(error) {
            StoreError::Unavailable(message) => message,
            other => panic!("{error:?} mapped to {other:?}"),
        }
    }

    #[test]
    fn timeouts_map_to_timeout() {
        for error in [
            sqlx::Error::PoolTimedOut,
            database(QUERY_CANCELED),
            database(LOCK_NOT_AVAILABLE),
            io(std::io::ErrorKind::TimedOut),
        ] {
            assert!(
                matches!(map_error(&error), StoreError::Timeout),
                "{error:?}"
            );
            assert!(!is_broken(&error), "{error:?}");
        }
    }

    #[test]
    fn connection_and_transient_failures_map_to_unavailable() {
        let serialization = unavailable(&database("40001"));
        assert!(serialization.contains("40001"), "{serialization}");
        assert!(serialization.contains("safe to retry"), "{serialization}");
        assert!(unavailable(&database("40P01")).contains("safe to retry"));
        assert!(unavailable(&database("57P01")).contains("shutting down"));
        assert!(unavailable(&database("08006")).contains("connection failure"));
        assert!(unavailable(&database("53300")).contains("out of resources"));
        assert!(unavailable(&database("42P01")).contains("migrate"));
        assert!(unavailable(&database("XX000")).contains("XX000"));
        let refused = io(std::io::ErrorKind::ConnectionRefused);
        assert!(unavailable(&refused).contains("refused"));
        for error in [
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Protocol("unexpected message".into()),
            io(std::io::ErrorKind::UnexpectedEof),
            sqlx::Error::Configuration("invalid port".into()),
        ] {
            unavailable(&error);
        }
    }

    #[test]
    fn only_a_lost_connection_is_broken() {
        for error in [
            io(std::io::ErrorKind::UnexpectedEof),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::BrokenPipe),
            io(std::io::ErrorKind::ConnectionRefused),
            database("08006"),
            database("57P01"),
            database("57P02"),
            database("57P03"),
        ] {
            assert!(is_broken(&error), "{error:?}");
        }
        for error in [
            database("40001"),
            database("42P01"),
            database("23505"),
            database("57014"),
            sqlx::Error::RowNotFound,
            sqlx::Error::PoolClosed,
        ] {
            assert!(!is_broken(&error), "{error:?}");
        }
    }

    #[test]
    fn undecodable_rows_map_to_corrupt() {
        for error in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("state".into()),
            sqlx::Error::ColumnIndexOutOfBounds { index: 9, len: 3 },
            sqlx::Error::Decode("not a bytea".into()),
            sqlx::Error::ColumnDecode {
                index: "epoch".into(),
                source: "out of range".into(),
            },
        ] {
            assert!(
                matches!(map_error(&error), StoreError::Corrupt(_)),
                "{error:?}"
            );
        }
    }
}
