//! PostgreSQL servers for tests: each test binary starts its own `postgres` on a free loopback
//! port, in a fresh data directory, and the server stops and its directory goes with the handle.
//!
//! ```no_run
//! use idem_tests::postgres::PostgresServer;
//!
//! let mut postgres = PostgresServer::start();
//! let url = postgres.url(); // postgres://postgres@127.0.0.1:<port>/postgres
//! let other = postgres.create_database("scratch"); // .../scratch
//! postgres.kill(); // a crash: SIGKILL, nothing is shut down cleanly
//! postgres.restart(); // the same port and data directory: crash recovery, then it answers
//! # drop((url, other));
//! # async fn store(postgres: &PostgresServer) {
//! // A `PostgresStore` on the `postgres` database, its schema migrated.
//! let store = postgres.store(idem_runtime::store::PostgresConfig::new()).await;
//! # drop(store);
//! # }
//! ```
//!
//! The server runs Debian's binaries (the newest `/usr/lib/postgresql/<version>/bin`;
//! `scripts/test` installs the `postgresql` package). `initdb` creates the cluster in a temporary
//! directory with trust authentication for the `postgres` superuser; the server listens on
//! 127.0.0.1 only, keeps its Unix socket and its log (`postgres.log`) in that directory, and runs
//! with `fsync` and `full_page_writes` off: fast, and still durable across
//! [`PostgresServer::kill`] (the operating system keeps what the processes wrote), not across a
//! power cut. `synchronous_commit` stays on, as on a production server: with it off, a commit
//! returns before its WAL record leaves the server's shared memory, so a kill within the next
//! fraction of a second would lose transactions that reported success (a crash test would then
//! see committed records vanish), and with `fsync` off keeping it on costs only a `write` per
//! commit.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the directory is handed to the
//! `postgres` system user (created by the Debian package) and `initdb` and the server run as that
//! user through `setpriv`, which execs the server in place, so the handle's process is the
//! postmaster itself. As any other user they run directly.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::store::{PostgresConfig, PostgresStore};

use crate::support::within;

/// How long a server may take to accept connections after it was spawned, crash recovery
/// included.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The superuser `initdb` creates, and the system user the server runs as under root.
const SUPERUSER: &str = "postgres";

/// A `postgres` server on a free port of 127.0.0.1 with its own data directory, stopped and
/// removed on drop.
pub struct PostgresServer {
    port: u16,
    /// The temporary directory: `data/` (the cluster), the socket and `postgres.log`.
    dir: PathBuf,
    /// Where `initdb`, `postgres`, `pg_isready` and `psql` are.
    bin: PathBuf,
    /// The `postgres` system user's uid and gid, when the tests run as root.
    run_as: Option<(u32, u32)>,
    /// The postmaster.
    child: Option<Child>,
}

impl PostgresServer {
    /// Creates a cluster with `initdb` and starts a server on a free port, waiting until it
    /// accepts connections.
    ///
    /// # Panics
    ///
    /// If the PostgreSQL binaries are missing, `initdb` fails, or the server never accepts
    /// connections.
    pub fn start() -> Self {
        let bin = bin_dir();
        let run_as = run_as();
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
        }
        let mut server = Self {
            port: 0,
            dir,
            bin,
            run_as,
            child: None,
        };
        server.init_db();
        let mut last_error = String::new();
        // A port found free may be taken before the server binds it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start postgres: {last_error}");
    }

    /// A command running `program` from the binaries' directory, as the `postgres` user when
    /// the tests run as root.
    fn command_as_owner(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.run_as.is_none() {
            return Command::new(program);
        }
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={SUPERUSER}"))
            .arg(format!("--regid={SUPERUSER}"))
            .arg("--init-groups")
            .arg("--")
            .arg(program);
        command
    }

    fn init_db(&self) {
        let log = self.dir.join("initdb.log");
        let output = self
            .command_as_owner("initdb")
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--username", SUPERUSER, "--auth", "trust"])
            .args(["--encoding", "UTF8", "--locale", "C", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run initdb: {error}"));
        let _ = std::fs::write(&log, [&output.stdout[..], &output.stderr[..]].concat());
        assert!(
            output.status.success(),
            "initdb failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Spawns the postmaster on `self.port` and waits until it accepts connections.
    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let child = self
            .command_as_owner("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|error| format!("cannot run postgres ({error})"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.is_ready() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read(&log_path).unwrap_or_default();
                let tail = log
                    .get(usize::try_from(log_start).unwrap_or(0)..)
                    .unwrap_or(&[]);
                return Err(format!(
                    "postgres exited with {status}: {}",
                    String::from_utf8_lossy(tail)
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "postgres on port {} did not accept connections within {START_TIMEOUT:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server accepts connections now (`pg_isready`).
    pub fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["--quiet", "--host", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .args(["--username", SUPERUSER, "--dbname", "postgres"])
            .args(["--timeout", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// The temporary directory holding the cluster (`data/`), the socket and `postgres.log`;
    /// removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of another database of this server (see [`PostgresServer::create_database`]).
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database named `name` (letters, digits and `_`) and returns its URL, so
    /// that tests sharing one server each start from an empty schema.
    ///
    /// # Panics
    ///
    /// If the name is not a plain identifier or the database cannot be created.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name:?}: use lower-case letters, digits and `_`"
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.database_url(name)
    }

    /// Runs `sql` with `psql` in `database` and returns what it printed (unaligned, tuples
    /// only: one row per line, columns separated by `|`), trimmed. Each statement may take at
    /// most ten seconds.
    ///
    /// # Panics
    ///
    /// If `psql` cannot connect or a statement fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["--no-psqlrc", "--quiet", "--no-align", "--tuples-only"])
            .args(["--set", "ON_ERROR_STOP=1"])
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--username", SUPERUSER, "--dbname", database])
            .args(["--command", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGOPTIONS", "-c statement_timeout=10000")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run psql: {error}"));
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A [`PostgresStore`] on the `postgres` database with `config`, its schema migrated.
    ///
    /// # Panics
    ///
    /// If it cannot connect or migrate within [`PATIENCE`](crate::support::PATIENCE).
    pub async fn store(&self, config: PostgresConfig) -> PostgresStore {
        let store = within("connecting", PostgresStore::connect(&self.url(), config))
            .await
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", self.url()));
        within("migrating", store.migrate())
            .await
            .unwrap_or_else(|error| panic!("cannot migrate: {error}"));
        store
    }

    /// Whether the postmaster is running (it may still be starting or recovering).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's log so far: startup, crash recovery, errors.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server with a fast shutdown (`SIGINT`: open transactions are rolled back,
    /// connections closed, a checkpoint written) and waits for it to exit; kills it if that takes
    /// longer than ten seconds.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&[child.id()], "-INT");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    self.child = Some(child);
                    self.kill();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Kills the postmaster and every process it started with `SIGKILL` (a crash: no shutdown,
    /// no checkpoint) and waits for the postmaster to exit. Open connections break; the next
    /// [`PostgresServer::restart`] runs crash recovery.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let mut pids = vec![child.id()];
            pids.extend(children_of(child.id()));
            signal(&pids, "-KILL");
            let _ = child.wait();
            // Its processes go too: none may hold the shared memory a restart needs.
            let deadline = Instant::now() + STOP_TIMEOUT;
            while pids[1..].iter().any(|pid| is_alive(*pid)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Freezes the postmaster and every process it started (`SIGSTOP`): connections stay open
    /// and new ones are accepted by the kernel, but nothing is answered, like a database stalled
    /// beyond every timeout. [`PostgresServer::resume`] continues them.
    ///
    /// # Panics
    ///
    /// If the server is not running.
    pub fn pause(&self) {
        signal(&self.processes(), "-STOP");
    }

    /// Continues a server frozen by [`PostgresServer::pause`] (`SIGCONT`).
    ///
    /// # Panics
    ///
    /// If the server is not running.
    pub fn resume(&self) {
        signal(&self.processes(), "-CONT");
    }

    fn processes(&self) -> Vec<u32> {
        let child = self.child.as_ref().expect("the server is not running");
        let mut pids = vec![child.id()];
        pids.extend(children_of(child.id()));
        pids
    }

    /// Starts the server again on the same port with the same data directory (after a
    /// [`PostgresServer::kill`], crash recovery runs first). Stops it first if it is running.
    ///
    /// # Panics
    ///
    /// If it does not accept connections again within twenty seconds.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port or the old server's shared memory may linger for a moment.
                Err(error) if Instant::now() > deadline => panic!("restart failed: {error}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A server left frozen by a failed test must be able to shut down.
            signal(&[child.id()], "-CONT");
            signal(&children_of(child.id()), "-CONT");
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `postgres`.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server under {}: install Debian's postgresql package \
             (apt-get install postgresql; scripts/test does)",
            root.display()
        ),
    }
}

/// The `postgres` user's uid and gid when this process runs as root (PostgreSQL refuses root),
/// `None` otherwise.
fn run_as() -> Option<(u32, u32)> {
    let euid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    if euid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ids = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next() != Some(SUPERUSER) {
            return None;
        }
        let uid = fields.nth(1)?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    });
    Some(ids.unwrap_or_else(|| {
        panic!(
            "running as root and there is no `{SUPERUSER}` user to run PostgreSQL as: install \
             Debian's postgresql package, which creates it"
        )
    }))
}

/// The processes whose parent is `pid` (the postmaster's checkpointer, backends, …).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            (parent_pid(&stat)? == pid).then_some(child)
        })
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line: `pid (comm) state ppid …`, where `comm` may hold
/// spaces and parentheses.
fn parent_pid(stat: &str) -> Option<u32> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Sends `signal` (as `kill` spells it: `-INT`, `-KILL`, …) to each of `pids`; processes that
/// are already gone are skipped.
fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(signal)
        .args(pids.iter().map(ToString::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A port of 127.0.0.1 nothing listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn temp_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("idem-postgres-{}-{unique}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::parent_pid;

    #[test]
    fn parses_the_parent_pid_of_a_stat_line() {
        assert_eq!(
            parent_pid("4605 (postgres) S 4601 4605 4605 0 -1"),
            Some(4601)
        );
        // A command name with spaces and parentheses.
        assert_eq!(parent_pid("77 (a) b (c)) R 12 77 77 0"), Some(12));
        assert_eq!(parent_pid("garbage"), None);
    }
}
