//! CPU accounting from `/proc`: where the two cores went during a scenario.
//!
//! Per scenario the benchmark reads the CPU time of the server's threads (named
//! `idem-bench-server`), of the client thread (which measures itself), of the `redis-server`
//! process, and of the whole machine (`/proc/stat`). Divided by the requests answered, the first
//! three say what one request costs each party; the machine's busy time minus all three is CPU
//! used by *other* processes during the run (a compiler, another benchmark), which disturbs the
//! figures and is printed so a disturbed run can be recognised.

use std::time::Duration;

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on Linux on every architecture
/// that matters here).
const TICKS_PER_SECOND: u64 = 100;

/// CPU times at one instant, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    server: u64,
    redis: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// CPU used between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// The server runtime's threads.
    pub(crate) server: Duration,
    /// The load generator's thread.
    pub(crate) client: Duration,
    /// `redis-server`.
    pub(crate) redis: Duration,
    /// Everything else on the machine.
    pub(crate) other: Duration,
    /// Wall time × cores.
    pub(crate) capacity: Duration,
}

impl Sample {
    /// Reads the current CPU times (zeros where `/proc` is unavailable).
    pub(crate) fn now(redis_pid: Option<u32>) -> Self {
        let (machine_busy, machine_total) = machine().unwrap_or((0, 0));
        Self {
            server: server_threads(),
            redis: redis_pid
                .and_then(|pid| process_ticks(&format!("/proc/{pid}/stat")))
                .unwrap_or(0),
            machine_busy,
            machine_total,
        }
    }

    /// The usage from `earlier` to `self`, given the client thread's own CPU time.
    pub(crate) fn since(&self, earlier: &Self, client: Duration) -> Usage {
        let server = ticks(self.server.saturating_sub(earlier.server));
        let redis = ticks(self.redis.saturating_sub(earlier.redis));
        let busy = ticks(self.machine_busy.saturating_sub(earlier.machine_busy));
        Usage {
            server,
            client,
            redis,
            other: busy.saturating_sub(server + client + redis),
            capacity: ticks(self.machine_total.saturating_sub(earlier.machine_total)),
        }
    }
}

impl Usage {
    /// The share of the machine (0.0 to 1.0) other processes used.
    pub(crate) fn other_share(&self) -> f64 {
        self.other.as_secs_f64() / self.capacity.as_secs_f64().max(1e-9)
    }
}

/// Waits (at most `limit`) until the machine, idle on our side, is busy less than `max_percent`
/// over one second: other processes have stopped taking the CPU.
pub(crate) fn wait_quiet(max_percent: f64, limit: Duration) {
    if max_percent >= 100.0 {
        return;
    }
    let give_up = std::time::Instant::now() + limit;
    let mut announced = false;
    while std::time::Instant::now() < give_up {
        let Some((busy, total)) = machine() else {
            return;
        };
        std::thread::sleep(Duration::from_secs(1));
        let Some((busy_after, total_after)) = machine() else {
            return;
        };
        #[allow(clippy::cast_precision_loss)]
        let percent = 100.0 * busy_after.saturating_sub(busy) as f64
            / total_after.saturating_sub(total).max(1) as f64;
        if percent < max_percent {
            return;
        }
        if !announced {
            eprintln!("    waiting for a quiet machine ({percent:.0}% busy)");
            announced = true;
        }
    }
}

/// The calling thread's CPU time so far.
pub(crate) fn this_thread() -> Duration {
    process_ticks("/proc/thread-self/stat").map_or(Duration::ZERO, ticks)
}

fn ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// `utime + stime` of a `/proc/…/stat` file.
fn process_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The summed CPU time of this process's threads named `idem-bench-serv…`.
fn server_threads() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            stat.contains("(idem-bench-serv")
                .then(|| process_ticks(&task.path().join("stat").to_string_lossy()))?
        })
        .sum()
}

/// `(busy, total)` ticks of the whole machine from the first line of `/proc/stat`.
fn machine() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let field = |i: usize| values.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    Some((busy, busy + field(3) + field(4)))
}
