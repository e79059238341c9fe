//! The schema's migrations, embedded from `migrations/*.sql`, and the runner that applies the
//! missing ones under an advisory lock (see [Migrations](super::PostgresStore#migrations)).

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sqlx::postgres::{PgConnection, PgPool};

use super::error::into_store;
use super::sql::statement_timeout;
use crate::store::StoreError;

/// One embedded schema migration.
#[derive(Debug)]
pub(super) struct Migration {
    /// Its number, from the file name; applied in ascending order.
    pub(super) version: i64,
    /// The rest of the file name.
    pub(super) description: &'static str,
    /// The file's SQL.
    pub(super) sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL, with carriage returns left out so that a checkout with CRLF line
    /// endings has the same checksum.
    fn checksum(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for line in self.sql.split('\r') {
            hasher.update(line.as_bytes());
        }
        hasher.finalize().into()
    }
}

/// The migrations this version ships, oldest first: `migrations/<version>_<description>.sql`.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "idem_records",
        sql: include_str!("../../../migrations/0001_idem_records.sql"),
    },
    Migration {
        version: 2,
        description: "idem_transitions",
        sql: include_str!("../../../migrations/0002_idem_transitions.sql"),
    },
];

/// The version table, created (under the migration lock) before anything reads it.
const CREATE_VERSION_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS idem_schema_migrations (
    version     bigint      PRIMARY KEY,
    description text        NOT NULL,
    checksum    bytea       NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)";

/// Applies the migrations the database lacks, in one `READ COMMITTED` transaction holding the
/// advisory lock `lock_key`, each statement bounded by `timeout`.
pub(super) async fn run(pool: &PgPool, lock_key: i64, timeout: Duration) -> Result<(), StoreError> {
    let mut transaction = pool
        .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await
        .map_err(into_store)?;
    let connection: &mut PgConnection = &mut transaction;
    statement_timeout(timeout)
        .execute(&mut *connection)
        .await
        .map_err(into_store)?;
    // Under this lock, and with READ COMMITTED (every statement sees what committed before it
    // started), the version table shows every migration applied by whoever held it before.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key)
        .execute(&mut *connection)
        .await
        .map_err(into_store)?;
    sqlx::raw_sql(CREATE_VERSION_TABLE)
        .execute(&mut *connection)
        .await
        .map_err(into_store)?;
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM idem_schema_migrations")
            .fetch_all(&mut *connection)
            .await
            .map_err(into_store)?;
    for migration in pending(&applied)? {
        sqlx::raw_sql(migration.sql)
            .execute(&mut *connection)
            .await
            .map_err(into_store)?;
        sqlx::query(
            "INSERT INTO idem_schema_migrations (version, description, checksum) \
             VALUES ($1, $2, $3)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(migration.checksum().as_slice())
        .execute(&mut *connection)
        .await
        .map_err(into_store)?;
    }
    transaction.commit().await.map_err(into_store)
}

/// The migrations of [`MIGRATIONS`] missing from `applied` (the version table's `version` and
/// `checksum` columns), oldest first. An applied migration whose checksum differs from the
/// embedded one is an error; applied versions this build does not know are ignored (a newer
/// build migrated the database).
fn pending(applied: &[(i64, Vec<u8>)]) -> Result<Vec<&'static Migration>, StoreError> {
    let mut pending = Vec::new();
    for migration in MIGRATIONS {
        match applied
            .iter()
            .find(|(version, _)| *version == migration.version)
        {
            None => pending.push(migration),
            Some((_, checksum)) if checksum.as_slice() == migration.checksum() => {}
            Some(_) => {
                return Err(StoreError::Unavailable(format!(
                    "idem schema migration {} ({}) was applied with different SQL than this \
                     build ships; restore the original migrations/{:04}_{}.sql",
                    migration.version,
                    migration.description,
                    migration.version,
                    migration.description
                )));
            }
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PostgresStore;

    #[test]
    fn the_embedded_migrations_are_the_migrations_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| std::path::Path::new(name).extension() == Some("sql".as_ref()))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.description))
            .collect();
        assert_eq!(files, embedded);
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i64::try_from(index).unwrap() + 1);
            let on_disk = std::fs::read_to_string(dir.join(&embedded[index])).unwrap();
            assert_eq!(on_disk, migration.sql);
        }
        assert_eq!(
            PostgresStore::SCHEMA_VERSION,
            MIGRATIONS.last().unwrap().version
        );
    }

    #[test]
    fn checksums_ignore_carriage_returns() {
        let lf = Migration {
            version: 1,
            description: "x",
            sql: "CREATE TABLE t ();\nSELECT 1;\n",
        };
        let crlf = Migration {
            sql: "CREATE TABLE t ();\r\nSELECT 1;\r\n",
            ..lf
        };
        let other = Migration {
            sql: "CREATE TABLE u ();\nSELECT 1;\n",
            ..lf
        };
        assert_eq!(lf.checksum(), crlf.checksum());
        assert_ne!(lf.checksum(), other.checksum());
    }

    #[test]
    fn pending_migrations() {
        let first = &MIGRATIONS[0];
        assert_eq!(pending(&[]).unwrap().len(), MIGRATIONS.len());
        let applied = vec![(first.version, first.checksum().to_vec())];
        let left = pending(&applied).unwrap();
        assert!(left.iter().all(|m| m.version != 1));
        assert_eq!(left.len(), MIGRATIONS.len() - 1);
        // A newer build's migration is left alone.
        let newer = vec![
            (first.version, first.checksum().to_vec()),
            (i64::MAX, vec![0; 32]),
        ];
        assert!(pending(&newer).is_ok());
        // An edited migration is refused.
        let edited = vec![(first.version, vec![0; 32])];
        match pending(&edited) {
            Err(StoreError::Unavailable(message)) => {
                assert!(message.contains("0001_idem_records.sql"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
