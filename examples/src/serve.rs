//! The `payments` binary's start-up: settings from the environment, the store, the listener and
//! graceful shutdown.
//!
//! Environment:
//! * `IDEM_LISTEN` — address to listen on (default `127.0.0.1:3000`);
//! * `REDIS_URL` — unset or empty: the embedded in-memory store; set: a local cache
//!   ([`TieredStore`]) in front of the Redis at that URL;
//! * `PAYMENTS_PROCESSING_MS` — simulated processor latency inside `POST /payments` (default 0);
//! * `IDEM_LEASE_MS` — the in-flight lease (default the runtime's, 30 s);
//! * `DATABASE_URL` — a `postgres://` URL: the idempotency records live in PostgreSQL (the schema
//!   is created or migrated at start-up; a database that does not answer stops the service with a
//!   message), behind a local cache. Together with `REDIS_URL` it is a start-up error naming both.
//!   Not yet done (DESIGN.md section 8): the payments themselves still live in this process's
//!   memory, not in the database, and are not written in the record's transaction.
//!
//! Prints `listening on http://ADDR` on stdout once it accepts connections; stops cleanly on
//! SIGTERM or Ctrl-C, letting running handlers finish and record their results.
//!
//! The server is [`server::serve`] with its default timeouts (header read 10 s, request body 30 s,
//! idle 60 s) and a connection cap of 1024, lowered to fit the process's descriptor limit when
//! that is smaller (on Linux, read from `/proc/self/limits`).

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use idem_runtime::store::{PostgresConfig, PostgresStore, RedisConfig, RedisStore, TieredStore};
use idem_runtime::{Idempotency, IdempotencyBuilder};

use crate::payments::{self, Settings};
use crate::server::{self, ServerConfig};

/// The whole `payments` program: logs to stderr (filter `RUST_LOG`, default `warn`), serves until
/// stopped ([`serve_from_env`]) and turns a start-up error into a message and a failure exit code.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let served = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))
        .and_then(|runtime| runtime.block_on(serve_from_env()));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("payments: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the payments API as configured by the environment until SIGTERM or Ctrl-C, then lets
/// running handlers finish. The error is a message for the operator.
pub async fn serve_from_env() -> Result<(), String> {
    let listen = std::env::var("IDEM_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let settings = Settings {
        processing: Duration::from_millis(env_u64("PAYMENTS_PROCESSING_MS")?.unwrap_or(0)),
        ..Settings::default()
    };
    let mut builder = Idempotency::builder();
    if let Some(lease) = env_u64("IDEM_LEASE_MS")? {
        builder = builder.lease(Duration::from_millis(lease));
    }
    match (env_url("DATABASE_URL"), env_url("REDIS_URL")) {
        (Some(_), Some(_)) => {
            return Err(
                "DATABASE_URL and REDIS_URL are both set: set one of them (DATABASE_URL keeps the \
                 records in PostgreSQL, REDIS_URL in Redis)"
                    .to_owned(),
            );
        }
        (Some(url), None) => builder = with_postgres(builder, &url).await?,
        (None, Some(url)) => builder = with_redis(builder, &url).await?,
        (None, None) => {}
    }
    let idem = builder.build();

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|error| format!("cannot listen on {listen}: {error}"))?;
    let address = listener.local_addr().map_err(|error| error.to_string())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{address}")
        .and_then(|()| stdout.flush())
        .map_err(|error| error.to_string())?;
    drop(stdout);

    let config = ServerConfig::new().max_connections(connection_cap());
    server::serve(
        listener,
        payments::app(&idem, settings),
        config,
        shutdown_signal(),
    )
    .await;
    // Handlers whose clients went away are still running: let them finish and record.
    idem.shutdown().await;
    Ok(())
}

/// Puts a local cache in front of the Redis at `url`. Connecting checks that Redis answers, so a
/// wrong URL stops the service at start-up instead of failing every request.
async fn with_redis(builder: IdempotencyBuilder, url: &str) -> Result<IdempotencyBuilder, String> {
    let redis = RedisStore::connect(url, RedisConfig::new())
        .await
        .map_err(|error| format!("cannot use REDIS_URL: {error}"))?;
    Ok(builder.store(TieredStore::new(redis)))
}

/// Puts a local cache in front of the PostgreSQL database at `url`, after creating or migrating
/// idem's schema there. A database that does not answer stops the service at start-up.
async fn with_postgres(
    builder: IdempotencyBuilder,
    url: &str,
) -> Result<IdempotencyBuilder, String> {
    let store = PostgresStore::connect(url, PostgresConfig::new())
        .await
        .map_err(|error| format!("cannot use DATABASE_URL: {error}"))?;
    store
        .migrate()
        .await
        .map_err(|error| format!("cannot migrate the database at DATABASE_URL: {error}"))?;
    Ok(builder.store(TieredStore::new(store)))
}

/// The variable `name`, when it is set and not empty.
fn env_url(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|url| !url.is_empty())
}

/// Descriptors kept for everything but client connections: the listener, standard streams, the
/// runtime's own, Redis connections, files.
const RESERVED_DESCRIPTORS: u64 = 32;

/// The connection cap: [`ServerConfig::DEFAULT_MAX_CONNECTIONS`], or fewer when the process may
/// not open that many descriptors, so that idle clients can never exhaust them.
fn connection_cap() -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| open_files_soft_limit(&limits));
    cap_for_descriptor_limit(limit)
}

fn cap_for_descriptor_limit(limit: Option<u64>) -> usize {
    let default = ServerConfig::DEFAULT_MAX_CONNECTIONS;
    match limit {
        None => default,
        Some(limit) => usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS))
            .unwrap_or(default)
            .clamp(1, default),
    }
}

/// The soft limit on open files in the text of `/proc/self/limits` (`None`: unlimited or absent).
fn open_files_soft_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

fn env_u64(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(value) => {
            value.trim().parse().map(Some).map_err(|_| {
                format!("{name} must be a whole number of milliseconds, got `{value}`")
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_the_descriptor_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95833                95833                processes \n\
                      Max open files            256                  524288               files     \n";
        assert_eq!(open_files_soft_limit(limits), Some(256));
        assert_eq!(
            open_files_soft_limit(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(open_files_soft_limit(""), None);
        assert_eq!(cap_for_descriptor_limit(Some(256)), 224);
        assert_eq!(cap_for_descriptor_limit(Some(10)), 1);
        assert_eq!(cap_for_descriptor_limit(Some(1 << 20)), 1024);
        assert_eq!(cap_for_descriptor_limit(None), 1024);
    }
}
