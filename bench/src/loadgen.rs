//! The load generator: HTTP/1.1 keep-alive connections on a single-threaded tokio runtime.
//!
//! Deliberately minimal so it costs the machine as little as possible: each connection writes a
//! pre-formatted request (only the key changes), reads the response head, takes
//! `content-length` and reads the body. One request is outstanding per connection (no
//! pipelining), so the concurrency is exactly the number of connections (a closed loop).
//!
//! The generator runs on its own OS thread with a current-thread runtime: it never competes with
//! the server for tokio worker slots, and it can use at most one of the two cores, whatever the
//! number of connections.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The request body every scenario sends (the same bytes, so a key's fingerprint never changes).
pub(crate) const BODY: &[u8] = br#"{"amount":4200,"currency":"EUR"}"#;

/// How a scenario chooses the `Idempotency-Key` of each request.
#[derive(Debug, Clone)]
pub(crate) enum Keys {
    /// No key (the bare route).
    None,
    /// A new key for every request: `{prefix}-{n}` for n = 0, 1, 2, …
    Fresh(String),
    /// Keys cycling through a pool: `{prefix}-{n % size}`.
    Pool(String, u64),
}

/// What to drive.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The server.
    pub(crate) addr: SocketAddr,
    /// `/bare` or `/idem`.
    pub(crate) path: &'static str,
    /// The keys sent.
    pub(crate) keys: Keys,
    /// Whether every response must carry `Idempotent-Replayed: true` (and none otherwise).
    pub(crate) expect_replayed: bool,
}

/// How hard and how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    /// Open connections, each with one request outstanding.
    pub(crate) connections: usize,
    /// Requests before this much time has passed are not measured.
    pub(crate) warmup: Duration,
    /// The measured window after the warm-up.
    pub(crate) duration: Duration,
    /// At most this many requests in all (warm-up included); the run ends earlier if reached.
    pub(crate) max_requests: u64,
    /// `None`: a closed loop (each connection sends its next request as soon as the previous one
    /// is answered). `Some(rate)`: an open loop offering `rate` requests per second in all, spread
    /// evenly over the connections, so that two scenarios can be compared at the same load.
    pub(crate) rate: Option<f64>,
}

/// What a run measured.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Every request answered (warm-up included): the denominator of per-request CPU figures.
    pub(crate) total: u64,
    /// Latencies of the requests sent and answered inside the measured window, sorted, in ns.
    pub(crate) latencies: Vec<u64>,
    /// The measured window's length (shorter than asked when `max_requests` was reached).
    pub(crate) window: Duration,
    /// Responses that were not `201 Created`.
    pub(crate) bad_status: u64,
    /// Responses whose `Idempotent-Replayed` marking was not the expected one.
    pub(crate) bad_replay: u64,
    /// Connection-level failures (each ends its connection).
    pub(crate) io_errors: u64,
    /// CPU time the load generator's thread used.
    pub(crate) client_cpu: Duration,
}

impl Outcome {
    /// Requests per second in the measured window.
    #[allow(clippy::cast_precision_loss)]
    pub(crate) fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of latency (0.0..=1.0).
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        Duration::from_nanos(self.latencies[index])
    }

    /// Failed or wrong responses of any kind.
    pub(crate) fn errors(&self) -> u64 {
        self.bad_status + self.bad_replay + self.io_errors
    }
}

struct Shared {
    target: Target,
    /// Time between two requests of one connection (open loop).
    interval: Option<Duration>,
    connections: usize,
    start: Instant,
    next: AtomicU64,
    max_requests: u64,
    measure_from: Instant,
    end: Instant,
}

#[derive(Default)]
struct ConnectionOutcome {
    total: u64,
    latencies: Vec<u64>,
    last_done: Option<Instant>,
    bad_status: u64,
    bad_replay: u64,
    io_error: bool,
}

/// Drives `target` with `load` from a fresh OS thread and waits for the result.
pub(crate) fn run(target: &Target, load: Load) -> Outcome {
    let target = target.clone();
    std::thread::Builder::new()
        .name("idem-bench-client".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the client runtime starts");
            let cpu = crate::cpu::this_thread();
            let mut outcome = runtime.block_on(drive(target, load));
            outcome.client_cpu = crate::cpu::this_thread().saturating_sub(cpu);
            outcome
        })
        .expect("the client thread starts")
        .join()
        .expect("the client thread does not panic")
}

async fn drive(target: Target, load: Load) -> Outcome {
    let start = Instant::now();
    #[allow(clippy::cast_precision_loss)]
    let interval = load
        .rate
        .filter(|rate| *rate > 0.0)
        .map(|rate| Duration::from_secs_f64(load.connections as f64 / rate));
    let shared = Arc::new(Shared {
        target,
        interval,
        connections: load.connections,
        start,
        next: AtomicU64::new(0),
        max_requests: load.max_requests,
        measure_from: start + load.warmup,
        end: start + load.warmup + load.duration,
    });
    let per_connection = expected_per_connection(load);
    let tasks: Vec<_> = (0..load.connections)
        .map(|i| tokio::spawn(connection(Arc::clone(&shared), i, per_connection)))
        .collect();
    let mut outcome = Outcome::default();
    let mut last_done = shared.measure_from;
    for task in tasks {
        let connection = task.await.unwrap_or_default();
        outcome.total += connection.total;
        outcome.bad_status += connection.bad_status;
        outcome.bad_replay += connection.bad_replay;
        outcome.io_errors += u64::from(connection.io_error);
        outcome.latencies.extend_from_slice(&connection.latencies);
        if let Some(done) = connection.last_done {
            last_done = last_done.max(done);
        }
    }
    outcome.latencies.sort_unstable();
    outcome.window = last_done.min(shared.end) - shared.measure_from;
    outcome
}

/// A generous guess of how many measured requests one connection makes, to size its buffer once.
fn expected_per_connection(load: Load) -> usize {
    let bound = load.max_requests / load.connections.max(1) as u64;
    usize::try_from(bound.min(200_000)).unwrap_or(200_000)
}

async fn connection(shared: Arc<Shared>, index: usize, capacity: usize) -> ConnectionOutcome {
    let mut outcome = ConnectionOutcome {
        latencies: Vec::with_capacity(capacity),
        ..ConnectionOutcome::default()
    };
    if let Err(error) = requests(&shared, index, &mut outcome).await {
        eprintln!("client connection failed: {error}");
        outcome.io_error = true;
    }
    outcome
}

async fn requests(
    shared: &Shared,
    index: usize,
    outcome: &mut ConnectionOutcome,
) -> std::io::Result<()> {
    let target = &shared.target;
    let mut stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let mut head = Vec::with_capacity(256);
    write!(
        head,
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        target.path,
        target.addr,
        BODY.len()
    )?;
    let mut request = Vec::with_capacity(512);
    let mut response = Vec::with_capacity(4096);
    // Open loop: connections start staggered over one interval, then send one request per interval.
    let mut next_send = shared.interval.map(|interval| {
        let connections = u32::try_from(shared.connections).unwrap_or(u32::MAX);
        let offset = u32::try_from(index).unwrap_or(0);
        shared.start + interval * offset / connections.max(1)
    });
    loop {
        if let (Some(next), Some(interval)) = (&mut next_send, shared.interval) {
            let now = Instant::now();
            if *next > now {
                tokio::time::sleep_until((*next).into()).await;
            } else if now - *next > interval {
                // Behind schedule (the server is slower than the offered rate): do not burst.
                *next = now;
            }
            *next += interval;
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= shared.max_requests || Instant::now() >= shared.end {
            return Ok(());
        }
        request.clear();
        request.extend_from_slice(&head);
        match &target.keys {
            Keys::None => {}
            Keys::Fresh(prefix) => write!(request, "idempotency-key: {prefix}-{n}\r\n")?,
            Keys::Pool(prefix, size) => {
                write!(request, "idempotency-key: {prefix}-{}\r\n", n % size)?;
            }
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(BODY);

        let sent = Instant::now();
        stream.write_all(&request).await?;
        let (status, replayed) = read_response(&mut stream, &mut response).await?;
        let done = Instant::now();

        outcome.total += 1;
        outcome.last_done = Some(done);
        if status != 201 {
            outcome.bad_status += 1;
        } else if replayed != target.expect_replayed {
            outcome.bad_replay += 1;
        }
        if sent >= shared.measure_from && done <= shared.end {
            #[allow(clippy::cast_possible_truncation)]
            outcome.latencies.push((done - sent).as_nanos() as u64);
        }
    }
}

/// Reads one response; returns its status and whether it carries `idempotent-replayed`.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u16, bool)> {
    buf.clear();
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = &buf[..end];
            let status = parse_status(head)?;
            let mut length = 0;
            let mut replayed = false;
            for line in head.split(|&b| b == b'\n').skip(1) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
                if name.eq_ignore_ascii_case(b"content-length") {
                    length = parse_usize(value)?;
                } else if name.eq_ignore_ascii_case(b"idempotent-replayed") {
                    replayed = value == b"true";
                }
            }
            let whole = end + 4 + length;
            while buf.len() < whole {
                if stream.read_buf(buf).await? == 0 {
                    return Err(closed());
                }
            }
            return Ok((status, replayed));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(closed());
        }
    }
}

fn closed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_status(head: &[u8]) -> std::io::Result<u16> {
    // "HTTP/1.1 201 Created"
    head.get(9..12)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad status line"))
}

fn parse_usize(value: &[u8]) -> std::io::Result<usize> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad content-length"))
}
