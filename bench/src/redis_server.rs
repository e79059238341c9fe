//! A private `redis-server` for one benchmark run, and its `INFO commandstats` counters.
//!
//! The server runs on a free loopback port without persistence (`--save "" --appendonly no`). It
//! is killed when its [`RedisServer`] is dropped (normal end, error, panic) and by the signal
//! handler of `main` (Ctrl-C, SIGTERM).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Children to kill on a signal, by pid.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A running `redis-server`.
pub(crate) struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts `binary` on a free loopback port and waits until it answers `PING`.
    pub(crate) fn start(binary: &str) -> Result<Self, String> {
        let mut last_error = String::new();
        // A port found free may be taken before redis-server binds it: try a few.
        for _ in 0..3 {
            let port = free_port().map_err(|e| format!("no free port: {e}"))?;
            let child = Command::new(binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no", "--loglevel", "warning"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start `{binary}` (install redis-server): {e}"))?;
            if let Ok(mut running) = RUNNING.lock() {
                running.push(child.id());
            }
            let mut server = Self { child, port };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(error) => last_error = error,
            }
        }
        Err(format!("redis-server did not start: {last_error}"))
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis://127.0.0.1:<port>/`
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("redis-server exited: {status}"));
            }
            if let Ok(reply) = self.command("PING")
                && reply.starts_with("+PONG")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("redis-server did not answer PING within 10 s".into())
    }

    /// Sends one inline command on a fresh connection and returns the raw reply.
    fn command(&self, command: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\r\n").as_bytes())?;
        let mut reply = Vec::new();
        let mut chunk = [0_u8; 16 << 10];
        loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&chunk[..n]);
            if is_complete(&reply) {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// `INFO commandstats` as `command name → calls` (names as Redis prints them: `evalsha`,
    /// `get`, `script|load`, …).
    pub(crate) fn command_stats(&self) -> Result<CommandStats, String> {
        let reply = self
            .command("INFO commandstats")
            .map_err(|e| format!("INFO commandstats: {e}"))?;
        let mut calls = BTreeMap::new();
        for line in reply.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let count = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            calls.insert(name.to_owned(), count);
        }
        Ok(CommandStats(calls))
    }

    /// Memory used by Redis's data set, from `INFO memory`.
    pub(crate) fn used_memory(&self) -> Option<u64> {
        let reply = self.command("INFO memory").ok()?;
        reply
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|n| n.trim().parse().ok())
    }
}

/// Whether a RESP reply (a simple string or one bulk string) has been read whole.
fn is_complete(reply: &[u8]) -> bool {
    let Some(line_end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if reply.first() != Some(&b'$') {
        return true;
    }
    let Some(len) = std::str::from_utf8(&reply[1..line_end])
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return true; // `$-1`
    };
    reply.len() >= line_end + 2 + len + 2
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(mut running) = RUNNING.lock() {
            running.retain(|pid| *pid != self.child.id());
        }
    }
}

/// Kills every `redis-server` this process started (from a signal handler, before exiting).
pub(crate) fn kill_all() {
    let pids = RUNNING.lock().map(|p| p.clone()).unwrap_or_default();
    for pid in pids {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A snapshot of `INFO commandstats`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandStats(BTreeMap<String, u64>);

impl CommandStats {
    /// The calls made between `earlier` and `self`: `(script calls, all commands)`. Script calls
    /// (`EVALSHA`, `EVAL`, `FCALL`) are the round trips; all commands include the ones the scripts
    /// run inside Redis. The `INFO` calls of the benchmark itself are left out.
    pub(crate) fn since(&self, earlier: &Self) -> (u64, u64) {
        let mut scripts = 0;
        let mut all = 0;
        for (name, calls) in &self.0 {
            let delta = calls.saturating_sub(earlier.0.get(name).copied().unwrap_or(0));
            if name == "info" {
                continue;
            }
            if matches!(
                name.as_str(),
                "evalsha" | "eval" | "evalsha_ro" | "eval_ro" | "fcall"
            ) {
                scripts += delta;
            }
            all += delta;
        }
        (scripts, all)
    }

    /// The commands seen between `earlier` and `self`, with their counts (for `--verbose`).
    pub(crate) fn breakdown(&self, earlier: &Self) -> Vec<(String, u64)> {
        self.0
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, calls)| {
                let before = earlier.0.get(name).copied().unwrap_or(0);
                (name.clone(), calls.saturating_sub(before))
            })
            .filter(|(_, delta)| *delta > 0)
            .collect()
    }
}
