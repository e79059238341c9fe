//! idem's load benchmark. `cargo run --release -p idem-bench -- --help`, or `scripts/bench`.
//!
//! In one run it starts its own `redis-server` on a free loopback port, serves the same app three
//! times (three `Idempotency` runtimes, i.e. three instances, in one server process):
//!
//! * **A**, the embedded store ([`MemoryStore`](idem_runtime::MemoryStore), the default);
//! * **B**, moka in front of Redis ([`TieredStore`] over [`RedisStore`]);
//! * **C**, Redis without a local cache (a second instance behind the same Redis as B);
//!
//! and drives them over real HTTP/1.1 keep-alive connections at a fixed concurrency, one scenario
//! after the other, printing requests/s, p50/p99 latency, Redis round trips and commands per
//! request (from `INFO commandstats` deltas) and the ratio to the bare route in the same run.
//!
//! `idem-bench memory` drives a million distinct keys through one instance whose local cache is
//! bounded to 64 MiB and reports resident memory before and after.
//!
//! See docs/BENCHMARKS.md for what each figure means and the measured tables.

mod cpu;
mod loadgen;
mod memory;
mod redis_server;
mod server;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use idem_runtime::Idempotency;
use idem_runtime::store::{RedisConfig, RedisStore, TieredConfig, TieredStore};

use crate::loadgen::{Keys, Load, Outcome, Target};
use crate::redis_server::RedisServer;

const USAGE: &str = "\
idem-bench: bare vs #[idempotent] over real HTTP/1.1, embedded store and moka + Redis

USAGE:
    idem-bench [OPTIONS]            the load benchmark (every scenario, one table)
    idem-bench memory [OPTIONS]     the memory check (one million distinct keys)

LOAD OPTIONS (environment variable in brackets):
    --duration SECS       measured seconds per scenario       [IDEM_BENCH_DURATION, default 5]
    --warmup SECS         unmeasured seconds before each one  [IDEM_BENCH_WARMUP, default 1]
    --connections N       keep-alive connections (= concurrency) [IDEM_BENCH_CONNECTIONS, default 16]
    --max-requests N      request cap per scenario            [IDEM_BENCH_MAX_REQUESTS, default 2000000]
    --rounds N            rounds of every scenario; each row is the median round [IDEM_BENCH_ROUNDS, default 3]
    --max-other-cpu PCT   a run during which other processes took more than PCT% of the machine
                          is measured again, after waiting for a quiet machine
                          [IDEM_BENCH_MAX_OTHER_CPU, default 10; 100 disables]
    --retries N           how many times a disturbed run is measured again [IDEM_BENCH_RETRIES, default 10]
    --latency-rate RPS    the rate offered to both sides of the equal-load latency comparison
                          [default: half the first execution's closed-loop req/s]
    --pool N              keys replayed by the replay scenarios [default 1000]
    --server-threads N    server tokio worker threads         [IDEM_BENCH_SERVER_THREADS, default 2]
    --only LIST           comma-separated scenario ids (bare is always run): embedded,
                          embedded-policy, redis, floor2, replay-moka, replay-moka-policy,
                          floor-replay, floor1, replay-redis
    --verbose             print each scenario's Redis command breakdown

MEMORY OPTIONS:
    --store tiered|memory   TieredStore over Redis (default) or the embedded MemoryStore
    --keys N                distinct keys [default 1000000]
    --cache-mib N           the local cache's bound in MiB [default 64]
    --concurrency N         requests in flight [default 64]
    --allowance-mib N       the fixed overhead allowed on top of the bound [default 48]

COMMON:
    --redis-server PATH   the redis-server binary [IDEM_BENCH_REDIS_SERVER, default redis-server]
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    install_signal_handler();
    let result = match args.first().map(String::as_str) {
        Some("memory") => Options::parse(&args[1..]).and_then(|o| memory::run(&o)),
        _ => Options::parse(&args).and_then(|o| load(&o)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("idem-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Kills the private redis-server on Ctrl-C or SIGTERM, then exits.
fn install_signal_handler() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            redis_server::kill_all();
            eprintln!("idem-bench: interrupted");
            std::process::exit(130);
        });
    });
}

/// Command-line options of both modes.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    duration: Duration,
    warmup: Duration,
    connections: usize,
    max_requests: u64,
    rounds: usize,
    max_other_cpu: f64,
    retries: u32,
    latency_rate: Option<f64>,
    pool: u64,
    server_threads: usize,
    only: Option<Vec<String>>,
    verbose: bool,
    redis_server: String,
    store: String,
    keys: u64,
    cache_mib: u64,
    concurrency: usize,
    allowance_mib: u64,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let env = |name: &str| std::env::var(name).ok();
        let mut options = Self {
            duration: secs(env("IDEM_BENCH_DURATION").as_deref().unwrap_or("5"))?,
            warmup: secs(env("IDEM_BENCH_WARMUP").as_deref().unwrap_or("1"))?,
            connections: number(env("IDEM_BENCH_CONNECTIONS").as_deref().unwrap_or("16"))?,
            max_requests: number(
                env("IDEM_BENCH_MAX_REQUESTS")
                    .as_deref()
                    .unwrap_or("2000000"),
            )?,
            rounds: number(env("IDEM_BENCH_ROUNDS").as_deref().unwrap_or("3"))?,
            max_other_cpu: number(env("IDEM_BENCH_MAX_OTHER_CPU").as_deref().unwrap_or("10"))?,
            retries: number(env("IDEM_BENCH_RETRIES").as_deref().unwrap_or("10"))?,
            latency_rate: None,
            pool: 1000,
            server_threads: number(env("IDEM_BENCH_SERVER_THREADS").as_deref().unwrap_or("2"))?,
            only: None,
            verbose: false,
            redis_server: env("IDEM_BENCH_REDIS_SERVER").unwrap_or_else(|| "redis-server".into()),
            store: "tiered".into(),
            keys: 1_000_000,
            cache_mib: 64,
            concurrency: 64,
            allowance_mib: 48,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            if flag == "--verbose" {
                options.verbose = true;
                continue;
            }
            let value = args
                .next()
                .ok_or_else(|| format!("{flag} needs a value (see --help)"))?;
            match flag.as_str() {
                "--duration" => options.duration = secs(value)?,
                "--warmup" => options.warmup = secs(value)?,
                "--connections" => options.connections = number(value)?,
                "--max-requests" => options.max_requests = number(value)?,
                "--rounds" => options.rounds = number(value)?,
                "--max-other-cpu" => options.max_other_cpu = number(value)?,
                "--retries" => options.retries = number(value)?,
                "--latency-rate" => options.latency_rate = Some(number(value)?),
                "--pool" => options.pool = number(value)?,
                "--server-threads" => options.server_threads = number(value)?,
                "--only" => options.only = Some(value.split(',').map(str::to_owned).collect()),
                "--redis-server" => options.redis_server.clone_from(value),
                "--store" => options.store.clone_from(value),
                "--keys" => options.keys = number(value)?,
                "--cache-mib" => options.cache_mib = number(value)?,
                "--concurrency" => options.concurrency = number(value)?,
                "--allowance-mib" => options.allowance_mib = number(value)?,
                _ => return Err(format!("unknown option {flag} (see --help)")),
            }
        }
        if options.connections == 0
            || options.rounds == 0
            || options.pool == 0
            || options.server_threads == 0
        {
            return Err(
                "--connections, --rounds, --pool and --server-threads must be positive".into(),
            );
        }
        Ok(options)
    }

    fn wants(&self, id: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == id))
    }
}

fn secs(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("not a number of seconds: {value}"))
}

fn number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value
        .replace('_', "")
        .parse()
        .map_err(|_| format!("not a number: {value}"))
}

/// A scenario: what to drive, and where.
struct Scenario {
    id: &'static str,
    name: &'static str,
    addr: SocketAddr,
    path: &'static str,
    keys: fn(round: usize, pool: u64) -> Keys,
    expect_replayed: bool,
}

/// One run of one scenario.
struct Measurement {
    outcome: Outcome,
    /// (script calls, all commands) from the end of the warm-up to the end of the run.
    redis: (u64, u64),
    cpu: cpu::Usage,
}

impl Measurement {
    /// Script calls and all commands per request answered in the measured window (the warm-up
    /// is where a cache refills what an earlier scenario evicted; it is not the steady state).
    fn redis_per_request(&self) -> (f64, f64) {
        let answered = self.outcome.latencies.len() as u64;
        (
            per_request(self.redis.0, answered),
            per_request(self.redis.1, answered),
        )
    }
}

/// One row of the table: the run with the median throughput of a scenario's rounds.
struct Row {
    id: &'static str,
    name: &'static str,
    runs: Vec<Measurement>,
}

impl Row {
    /// The run with the median throughput.
    fn median(&self) -> &Measurement {
        let mut order: Vec<&Measurement> = self.runs.iter().collect();
        order.sort_by(|a, b| a.outcome.rate().total_cmp(&b.outcome.rate()));
        order[order.len() / 2]
    }

    /// The median over rounds of this row's req/s divided by `bare`'s req/s in the same round:
    /// each scenario is compared with the baseline measured minutes, not rounds, apart.
    fn ratio_to(&self, bare: &Row) -> f64 {
        let mut ratios: Vec<f64> = self
            .runs
            .iter()
            .zip(&bare.runs)
            .map(|(run, base)| run.outcome.rate() / base.outcome.rate().max(1e-9))
            .collect();
        if ratios.is_empty() {
            return 0.0;
        }
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    }

    /// The run with the median p99 latency (for runs at the same offered rate).
    fn median_p99(&self) -> &Measurement {
        let mut order: Vec<&Measurement> = self.runs.iter().collect();
        order.sort_by_key(|run| run.outcome.quantile(0.99));
        order[order.len() / 2]
    }
}

/// Latency at equal load: the bare route, the two-round-trip floor and a first execution with
/// moka + Redis, all offered the same request rate (open loop), so that the p99 difference is what
/// idempotency adds to a request rather than the queueing a lower throughput causes at a fixed
/// concurrency. The rate is
/// `--latency-rate`, or half the first execution's closed-loop throughput (a load it sustains).
fn equal_load(
    options: &Options,
    instances: &Instances,
    redis: &RedisServer,
    rows: &[Row],
    load: Load,
) -> Result<Option<(f64, Vec<Row>)>, String> {
    let Some(first) = rows.iter().find(|row| row.id == "redis") else {
        return Ok(None);
    };
    let rate = options
        .latency_rate
        .unwrap_or_else(|| (first.median().outcome.rate() / 2.0).round());
    let load = Load {
        rate: Some(rate),
        ..load
    };
    let scenarios: Vec<Scenario> = scenarios(instances)
        .into_iter()
        .filter(|s| {
            ["bare", "embedded", "floor2", "redis"].contains(&s.id)
                && rows.iter().any(|row| row.id == s.id)
        })
        .collect();
    let mut equal: Vec<Row> = scenarios
        .iter()
        .map(|s| Row {
            id: s.id,
            name: s.name,
            runs: Vec::new(),
        })
        .collect();
    eprintln!("latency at equal load: {rate:.0} req/s offered");
    for round in 0..options.rounds {
        for (scenario, row) in scenarios.iter().zip(&mut equal) {
            let target = Target {
                addr: scenario.addr,
                path: scenario.path,
                // Fresh keys of their own, apart from the closed-loop rounds' keys.
                keys: (scenario.keys)(round + options.rounds, options.pool),
                expect_replayed: scenario.expect_replayed,
            };
            row.runs.push(measure(redis, &target, load, options)?);
        }
    }
    Ok(Some((rate, equal)))
}

fn print_equal_load(rate: f64, rows: &[Row]) {
    println!();
    println!(
        "Latency at equal load: {rate:.0} req/s offered to each (open loop), run with the median p99 of {} rounds",
        rows.first().map_or(0, |row| row.runs.len())
    );
    println!();
    println!("| scenario | req/s achieved | p50 ms | p99 ms | p99 − bare ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    let bare_p99 = rows.first().map_or(Duration::ZERO, |row| {
        row.median_p99().outcome.quantile(0.99)
    });
    for row in rows {
        let outcome = &row.median_p99().outcome;
        let p99 = outcome.quantile(0.99);
        let errors: u64 = row.runs.iter().map(|r| r.outcome.errors()).sum();
        println!(
            "| {} | {:.0} | {} | {} | {:+.3} | {errors} |",
            row.name,
            outcome.rate(),
            millis(outcome.quantile(0.5)),
            millis(p99),
            (p99.as_secs_f64() - bare_p99.as_secs_f64()) * 1e3,
        );
    }
}

fn load(options: &Options) -> Result<(), String> {
    let redis = RedisServer::start(&options.redis_server)?;
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.server_threads)
        .thread_name("idem-bench-server")
        .enable_all()
        .build()
        .map_err(|e| format!("server runtime: {e}"))?;
    let instances = start_instances(&server, &redis)?;
    let scenarios: Vec<Scenario> = scenarios(&instances)
        .into_iter()
        .filter(|s| s.id == "bare" || options.wants(s.id))
        .collect();
    if scenarios
        .iter()
        .any(|s| s.id == "replay-moka" || s.id == "replay-redis")
    {
        prime_pool(instances.tiered, "/idem", options)?;
        // B learns each record from Redis on its first replay; do that now, so that its cache, like
        // the floor's map, is filled before any scenario runs rather than amid the first round's
        // first executions.
        if scenarios.iter().any(|s| s.id == "replay-moka") {
            replay_pool(instances.tiered, "/idem", options)?;
        }
    }
    if scenarios.iter().any(|s| s.id == "replay-moka-policy") {
        prime_pool(instances.tiered, "/policy", options)?;
        replay_pool(instances.tiered, "/policy", options)?;
    }
    if scenarios.iter().any(|s| s.id == "floor-replay") {
        prime_pool(instances.floor, "/floor-replay", options)?;
    }

    print_setup(options);
    let load = Load {
        connections: options.connections,
        warmup: options.warmup,
        duration: options.duration,
        max_requests: options.max_requests,
        rate: None,
    };
    let mut rows: Vec<Row> = scenarios
        .iter()
        .map(|s| Row {
            id: s.id,
            name: s.name,
            runs: Vec::new(),
        })
        .collect();
    for round in 0..options.rounds {
        eprintln!("round {} of {}", round + 1, options.rounds);
        for (scenario, row) in scenarios.iter().zip(&mut rows) {
            let target = Target {
                addr: scenario.addr,
                path: scenario.path,
                keys: (scenario.keys)(round, options.pool),
                expect_replayed: scenario.expect_replayed,
            };
            row.runs.push(measure(&redis, &target, load, options)?);
            let run = row.runs.last().map_or(0.0, |m| m.outcome.rate());
            eprintln!("  {:<42} {run:>9.0} req/s", scenario.name);
        }
    }
    let equal = equal_load(options, &instances, &redis, &rows, load)?;
    server.shutdown_timeout(Duration::from_secs(1));
    drop(redis);

    print_table(&rows);
    if let Some((rate, equal)) = &equal {
        print_equal_load(*rate, equal);
    }
    print_targets(&rows, equal.as_ref().map(|(_, rows)| rows.as_slice()));
    if rows
        .iter()
        .chain(equal.iter().flat_map(|(_, rows)| rows))
        .flat_map(|row| &row.runs)
        .any(|run| run.outcome.errors() > 0)
    {
        return Err("some requests failed (see the errors column)".into());
    }
    Ok(())
}

/// Every scenario, in the order they run in each round.
fn scenarios(instances: &Instances) -> Vec<Scenario> {
    let Instances {
        embedded,
        tiered,
        uncached,
        floor,
    } = *instances;
    vec![
        Scenario {
            id: "bare",
            name: "bare handler (baseline)",
            addr: embedded,
            path: "/bare",
            keys: |_, _| Keys::None,
            expect_replayed: false,
        },
        Scenario {
            id: "embedded",
            name: "first execution, embedded store",
            addr: embedded,
            path: "/idem",
            keys: |round, _| Keys::Fresh(format!("embedded-{round}")),
            expect_replayed: false,
        },
        Scenario {
            id: "embedded-policy",
            name: "first execution, embedded, router-wide",
            addr: embedded,
            path: "/policy",
            keys: |round, _| Keys::Fresh(format!("embedded-policy-{round}")),
            expect_replayed: false,
        },
        Scenario {
            id: "redis",
            name: "first execution, moka + Redis",
            addr: tiered,
            path: "/idem",
            keys: |round, _| Keys::Fresh(format!("redis-{round}")),
            expect_replayed: false,
        },
        Scenario {
            id: "floor2",
            name: "floor: bare + 2 minimal Redis round trips",
            addr: floor,
            path: "/floor2",
            keys: |_, _| Keys::None,
            expect_replayed: false,
        },
        Scenario {
            id: "replay-moka",
            name: "replay from moka (instance B)",
            addr: tiered,
            path: "/idem",
            keys: |_, pool| Keys::Pool("pool".into(), pool),
            expect_replayed: true,
        },
        Scenario {
            id: "replay-moka-policy",
            name: "replay from moka, router-wide (B)",
            addr: tiered,
            path: "/policy",
            keys: |_, pool| Keys::Pool("policy-pool".into(), pool),
            expect_replayed: true,
        },
        Scenario {
            id: "floor-replay",
            name: "floor: bare + a minimal in-memory replay",
            addr: floor,
            path: "/floor-replay",
            keys: |_, pool| Keys::Pool("pool".into(), pool),
            expect_replayed: true,
        },
        Scenario {
            id: "floor1",
            name: "floor: bare + 1 minimal Redis round trip",
            addr: floor,
            path: "/floor1",
            keys: |_, _| Keys::None,
            expect_replayed: false,
        },
        Scenario {
            id: "replay-redis",
            name: "replay from Redis (instance C, no cache)",
            addr: uncached,
            path: "/idem",
            keys: |_, pool| Keys::Pool("pool".into(), pool),
            expect_replayed: true,
        },
    ]
}

/// Runs one scenario, measured again when other processes took more than `--max-other-cpu` of
/// the machine during the run (up to `--retries` times, waiting for a quiet machine first).
fn measure(
    redis: &RedisServer,
    target: &Target,
    load: Load,
    options: &Options,
) -> Result<Measurement, String> {
    let mut attempt = 0;
    loop {
        cpu::wait_quiet(options.max_other_cpu, Duration::from_secs(60));
        let mut target = target.clone();
        if let Keys::Fresh(prefix) = &mut target.keys {
            // A new run must not meet the keys an earlier, discarded run recorded.
            *prefix = format!("{prefix}-a{attempt}");
        }
        let run = measure_once(redis, &target, load, options.verbose)?;
        let other = run.cpu.other_share() * 100.0;
        if other <= options.max_other_cpu {
            return Ok(run);
        }
        if attempt >= options.retries {
            eprintln!(
                "    kept although disturbed: {other:.0}% of the CPU went to other processes"
            );
            return Ok(run);
        }
        attempt += 1;
        eprintln!(
            "    disturbed: {other:.0}% of the CPU went to other processes; again ({attempt}/{})",
            options.retries
        );
    }
}

/// Runs one scenario once, with Redis and CPU counters around it.
fn measure_once(
    redis: &RedisServer,
    target: &Target,
    load: Load,
    verbose: bool,
) -> Result<Measurement, String> {
    let cpu_before = cpu::Sample::now(Some(redis.pid()));
    let (before, outcome) = std::thread::scope(|scope| {
        // Redis is counted from the end of the warm-up, as latency is.
        let before = scope.spawn(|| {
            std::thread::sleep(load.warmup);
            redis.command_stats()
        });
        let outcome = loadgen::run(target, load);
        let before = before
            .join()
            .unwrap_or_else(|_| Err("INFO thread panicked".into()));
        before.map(|before| (before, outcome))
    })?;
    let cpu_after = cpu::Sample::now(Some(redis.pid()));
    let after = redis.command_stats()?;
    if verbose {
        eprintln!("      redis commands: {:?}", after.breakdown(&before));
    }
    Ok(Measurement {
        cpu: cpu_after.since(&cpu_before, outcome.client_cpu),
        redis: after.since(&before),
        outcome,
    })
}

/// Records the replay pool's keys once through `path` at `addr`: through instance B they land in
/// Redis; through the floor app, in its map.
fn prime_pool(addr: SocketAddr, path: &'static str, options: &Options) -> Result<(), String> {
    drive_pool(addr, path, pool_prefix(path), false, options)
        .map_err(|e| format!("recording the replay pool: {e}"))
}

/// Replays the pool's keys once through `path` at `addr`; every answer must be a replay.
fn replay_pool(addr: SocketAddr, path: &'static str, options: &Options) -> Result<(), String> {
    drive_pool(addr, path, pool_prefix(path), true, options)
        .map_err(|e| format!("replaying the pool: {e}"))
}

/// The keys of a route's replay pool: the router-wide route has its own (the same key on another
/// route is a different request, `422`).
fn pool_prefix(path: &str) -> &'static str {
    if path == "/policy" {
        "policy-pool"
    } else {
        "pool"
    }
}

/// Sends each of the pool's keys once, expecting replays or first executions.
fn drive_pool(
    addr: SocketAddr,
    path: &'static str,
    prefix: &str,
    replayed: bool,
    options: &Options,
) -> Result<(), String> {
    let once = Load {
        connections: options.connections,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(600),
        max_requests: options.pool,
        rate: None,
    };
    let keys = if replayed {
        Keys::Pool(prefix.into(), options.pool)
    } else {
        Keys::Fresh(prefix.into())
    };
    let target = Target {
        addr,
        path,
        keys,
        expect_replayed: replayed,
    };
    let outcome = loadgen::run(&target, once);
    if outcome.total != options.pool || outcome.errors() != 0 {
        return Err(format!(
            "{} of {} answered, {} errors",
            outcome.total,
            options.pool,
            outcome.errors()
        ));
    }
    Ok(())
}

/// The addresses of the app instances.
#[derive(Clone, Copy)]
struct Instances {
    /// A: the embedded store.
    embedded: SocketAddr,
    /// B: moka in front of Redis.
    tiered: SocketAddr,
    /// C: Redis without a local cache (a second instance behind B's Redis).
    uncached: SocketAddr,
    /// The floor routes (no idem; plain script calls).
    floor: SocketAddr,
}

/// Serves the app instances on the server runtime, each with its own idem runtime.
fn start_instances(
    server: &tokio::runtime::Runtime,
    redis: &RedisServer,
) -> Result<Instances, String> {
    server.block_on(async {
        let connect = || async {
            RedisStore::connect(redis.url(), RedisConfig::new())
                .await
                .map_err(|e| format!("connecting to redis-server: {e}"))
        };
        // Cached replays live an hour (default 10 s), so that none expires during the run.
        let cache = TieredConfig::new().max_entry_ttl(Duration::from_secs(3600));
        let embedded = Idempotency::builder().build();
        let tiered = Idempotency::builder()
            .store(TieredStore::with_config(connect().await?, cache))
            .build();
        let uncached = Idempotency::builder().store(connect().await?).build();
        let floor = redis::Client::open(redis.url())
            .map_err(|e| e.to_string())?
            .get_connection_manager()
            .await
            .map_err(|e| format!("connecting to redis-server: {e}"))?;
        let bind = |e: std::io::Error| format!("cannot bind a loopback port: {e}");
        Ok(Instances {
            embedded: server::serve(server::app(&embedded)).await.map_err(bind)?,
            tiered: server::serve(server::app(&tiered)).await.map_err(bind)?,
            uncached: server::serve(server::app(&uncached)).await.map_err(bind)?,
            floor: server::serve(server::floor_app(floor))
                .await
                .map_err(bind)?,
        })
    })
}

fn print_setup(options: &Options) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!(
        "idem-bench: {cores} cores ({cpu}); {} connections; {:?} warm-up + {:?} measured per scenario; \
         server: {} tokio workers; client: 1 thread",
        options.connections, options.warmup, options.duration, options.server_threads
    );
}

fn millis(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1e3)
}

#[allow(clippy::cast_precision_loss)]
fn per_request(count: u64, requests: u64) -> f64 {
    count as f64 / requests.max(1) as f64
}

fn print_table(rows: &[Row]) {
    let Some(bare_row) = rows.iter().find(|r| r.id == "bare") else {
        return;
    };
    let bare = bare_row.median();
    let bare_p99 = bare.outcome.quantile(0.99);
    println!();
    println!(
        "| scenario | req/s | × bare | p50 ms | p99 ms | p99 − bare ms | Redis round trips/req | \
         Redis commands/req | CPU µs/req server | CPU µs/req Redis | CPU µs/req client | other CPU | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let run = row.median();
        let outcome = &run.outcome;
        let p99 = outcome.quantile(0.99);
        let delta = p99.as_secs_f64() - bare_p99.as_secs_f64();
        let micros = |cpu: Duration| 1e6 * cpu.as_secs_f64() * per_request(1, outcome.total);
        let errors: u64 = row.runs.iter().map(|r| r.outcome.errors()).sum();
        println!(
            "| {} | {:.0} | {:.2} | {} | {} | {:+.3} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0}% | {} |",
            row.name,
            outcome.rate(),
            row.ratio_to(bare_row),
            millis(outcome.quantile(0.5)),
            millis(p99),
            delta * 1e3,
            run.redis_per_request().0,
            run.redis_per_request().1,
            micros(run.cpu.server),
            micros(run.cpu.redis),
            micros(run.cpu.client),
            100.0 * run.cpu.other_share(),
            errors,
        );
    }
    if rows.first().is_some_and(|row| row.runs.len() > 1) {
        println!();
        println!(
            "(each row: the round with the median req/s; × bare: the median of the rounds' ratios to bare in the same round; errors: all rounds; req/s of each round:)"
        );
        for row in rows {
            let rates: Vec<String> = row
                .runs
                .iter()
                .map(|r| {
                    format!(
                        "{:.0} ({:.0}% other)",
                        r.outcome.rate(),
                        100.0 * r.cpu.other_share()
                    )
                })
                .collect();
            println!("  {:<42} rounds: {}", row.name, rates.join(", "));
        }
    }
}

fn print_targets(rows: &[Row], equal: Option<&[Row]>) {
    let find = |id| rows.iter().find(|r| r.id == id);
    let Some(bare) = find("bare") else {
        return;
    };
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for (id, want) in [("redis", 2.0), ("replay-moka", 0.0), ("replay-redis", 1.0)] {
        if let Some(row) = find(id) {
            let (name, run) = (row.name, row.median());
            let got = run.redis_per_request().0;
            println!(
                "target: {name:<42} round trips/req = {want:.0}: {got:.3} ({})",
                verdict((got - want).abs() < 0.005)
            );
        }
    }
    if let Some(row) = find("replay-moka") {
        let ratio = row.ratio_to(bare);
        println!(
            "target: replay from moka ≥ 0.9× bare: {ratio:.2}× ({})",
            verdict(ratio >= 0.9)
        );
    }
    if let Some(row) = find("redis") {
        let ratio = row.ratio_to(bare);
        let (run, bare) = (row.median(), bare.median());
        println!(
            "target: first execution moka + Redis ≥ 0.5× bare: {ratio:.2}× ({})",
            verdict(ratio >= 0.5)
        );
        let delta =
            run.outcome.quantile(0.99).as_secs_f64() - bare.outcome.quantile(0.99).as_secs_f64();
        println!(
            "target: first execution moka + Redis p99 ≤ bare p99 + 1 ms, closed loop: {:+.3} ms ({})",
            delta * 1e3,
            verdict(delta <= 1e-3)
        );
        let find = |id| equal?.iter().find(|row: &&Row| row.id == id);
        if let (Some(bare), Some(idem)) = (find("bare"), find("redis")) {
            let p99 = |row: &Row| row.median_p99().outcome.quantile(0.99).as_secs_f64();
            let delta = p99(idem) - p99(bare);
            println!(
                "target: first execution moka + Redis p99 ≤ bare p99 + 1 ms, equal load: {:+.3} ms ({})",
                delta * 1e3,
                verdict(delta <= 1e-3)
            );
        }
    }
}
