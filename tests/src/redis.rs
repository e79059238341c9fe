//! Redis servers for tests: each test starts its own `redis-server` on a free loopback port (and
//! a local 3-master cluster when it needs one) and the process dies with the handle.
//!
//! ```no_run
//! use idem_tests::redis::RedisServer;
//!
//! let mut redis = RedisServer::start();
//! let url = redis.url(); // redis://127.0.0.1:<port>/
//! redis.kill(); // a crash: SIGKILL
//! redis.restart(); // the same port, empty
//! # drop(url);
//! ```
//!
//! The servers keep nothing on disk (`--save "" --appendonly no`), listen on 127.0.0.1 only, and
//! write their log and (for cluster nodes) `nodes.conf` into a temporary directory removed on
//! drop. `redis-server` and `redis-cli` must be on `PATH` (`scripts/test` installs them).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on a free port of 127.0.0.1, killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    /// The connection [`RedisServer::query`] reuses, so that inspecting the server adds no
    /// command but the inspection itself to its statistics.
    inspector: Mutex<Option<redis::Connection>>,
}

impl RedisServer {
    /// Starts a standalone server and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing or never answers.
    pub fn start() -> Self {
        Self::start_with(&[], false)
    }

    /// Starts a server with extra `redis-server` arguments. `cluster_bus` asks for a port whose
    /// cluster bus port (`port + 10000`) is free too.
    fn start_with(extra_args: &[&str], cluster_bus: bool) -> Self {
        let mut last_error = String::new();
        // A port found free may be taken before redis binds it: try a few.
        for _ in 0..5 {
            let port = free_port(cluster_bus);
            let mut server = Self {
                port,
                dir: temp_dir(port),
                extra_args: extra_args.iter().map(ToString::to_string).collect(),
                child: None,
                inspector: Mutex::new(None),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--logfile", &log.to_string_lossy()])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| {
                format!(
                    "cannot run redis-server ({error}); install it (apt-get install redis-server)"
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("redis-server exited with {status}: {log}"));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("redis-server on port {} never answered", self.port));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A new synchronous connection, for inspecting the server from a test.
    ///
    /// # Panics
    ///
    /// If the server does not accept it.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", self.url()))
    }

    /// Runs one command on a connection kept for inspection and returns its reply.
    ///
    /// # Panics
    ///
    /// If the command fails.
    pub fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> T {
        self.try_query(command)
            .unwrap_or_else(|error| panic!("{command:?} failed: {error}"))
    }

    /// Runs one command on the inspection connection (opened on first use, and again after an
    /// error).
    ///
    /// # Errors
    ///
    /// When the server cannot be reached or the command fails.
    pub fn try_query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut inspector = self
            .inspector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let connection = match &mut *inspector {
            Some(connection) => connection,
            None => inspector.insert(
                redis::Client::open(self.url())?
                    .get_connection_with_timeout(Duration::from_secs(2))?,
            ),
        };
        let reply = command.query(connection);
        if reply.is_err() {
            *inspector = None;
        }
        reply
    }

    /// Calls per command since the server started (`INFO commandstats`), keyed by lower-case
    /// command name (`evalsha`, `get`, …).
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let info: String = self.query(redis::cmd("INFO").arg("commandstats"));
        parse_command_stats(&info)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server with `SIGKILL` (a crash: nothing is flushed) and waits for it to exit.
    pub fn kill(&mut self) {
        *self
            .inspector
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open but nothing is answered, like a
    /// Redis stalled beyond every timeout. [`RedisServer::resume`] continues it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Continues a server frozen by [`RedisServer::pause`] (`SIGCONT`); it then answers the
    /// commands queued meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is not running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts the server again on the same port, empty (nothing is persisted). Kills it first if it
    /// is still running.
    ///
    /// # Panics
    ///
    /// If it does not come back.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger for a moment after the kill.
                Err(error) if Instant::now() > deadline => panic!("restart failed: {error}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A local Redis Cluster of three masters (no replicas), each a [`RedisServer`] started with
/// `--cluster-enabled yes`, joined with `redis-cli --cluster create … --cluster-yes`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters, creates the cluster and waits until every node reports
    /// `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// If `redis-server`/`redis-cli` are missing or the cluster does not form.
    pub fn start() -> Self {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            // A master down takes only its own slots offline.
            "--cluster-require-full-coverage",
            "no",
        ];
        let nodes: Vec<_> = (0..3)
            .map(|_| RedisServer::start_with(&args, true))
            .collect();
        let addresses: Vec<_> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run redis-cli: {error}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    fn is_ok(&self) -> bool {
        self.nodes
            .iter()
            .filter(|node| node.is_running())
            .all(|node| {
                let info = node.try_query::<String>(redis::cmd("CLUSTER").arg("INFO"));
                info.is_ok_and(|info| info.contains("cluster_state:ok"))
            })
    }

    /// The nodes' URLs, to seed a cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The three master processes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One master, to kill or restart. A restarted master comes back empty on the same port with
    /// its cluster identity (`nodes.conf`) and slots.
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }

    /// Waits until every running node reports `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// If that takes longer than ten seconds.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the cluster never reached cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Calls per command summed over every running node (see [`RedisServer::command_calls`]).
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let mut total = HashMap::new();
        for node in self.nodes.iter().filter(|node| node.is_running()) {
            for (command, calls) in node.command_calls() {
                *total.entry(command).or_default() += calls;
            }
        }
        total
    }
}

/// Parses `INFO commandstats`: lines like `cmdstat_evalsha:calls=3,usec=…`.
fn parse_command_stats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_ascii_lowercase(), calls))
        })
        .collect()
}

/// A port of 127.0.0.1 nothing listens on now (and, with `cluster_bus`, `port + 10000` too).
fn free_port(cluster_bus: bool) -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
        let port = listener.local_addr().expect("local address").port();
        if !cluster_bus {
            return port;
        }
        if let Some(bus) = port.checked_add(10_000)
            && TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok()
        {
            return port;
        }
    }
}

fn temp_dir(port: u16) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("idem-redis-{}-{port}-{unique}", std::process::id()))
}

/// Whether a server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_millis(200),
        )?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0_u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::parse_command_stats;

    #[test]
    fn parses_command_stats() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=3,usec=10,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=1,usec=5\r\n";
        let stats = parse_command_stats(info);
        assert_eq!(stats["evalsha"], 3);
        assert_eq!(stats["info"], 1);
        assert_eq!(stats.len(), 2);
    }
}
