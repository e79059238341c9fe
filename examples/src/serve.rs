//! The `payments` binary's start-up: settings from the environment, the store, the listener and
//! graceful shutdown.
//!
//! Environment:
//! * `IDEM_LISTEN` — address to listen on (default `127.0.0.1:3000`);
//! * `REDIS_URL` — unset or empty: the embedded in-memory store; set: a local cache
//!   ([`TieredStore`]) in front of the Redis at that URL;
//! * `PAYMENTS_PROCESSING_MS` — simulated processor latency inside `POST /payments` (default 0);
//! * `IDEM_LEASE_MS` — the in-flight lease (default the runtime's, 30 s).
//!
//! Prints `listening on http://ADDR` on stdout once it accepts connections; stops cleanly on
//! SIGTERM or Ctrl-C, letting running handlers finish and record their results.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use idem_runtime::store::{RedisConfig, RedisStore, TieredStore};
use idem_runtime::{Idempotency, IdempotencyBuilder};

use crate::payments::{self, Settings};

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
    if let Some(url) = std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
    {
        builder = with_redis(builder, &url).await?;
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

    axum::serve(listener, payments::app(&idem, settings))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|error| format!("server error: {error}"))?;
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
