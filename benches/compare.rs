//! Spillway beside the original Python pipeline (`../shared/baselines/python-original`), in one
//! run, on one private Postgres and one broker (Tansu on SQLite, or with
//! `SPILLWAY_TEST_KAFKA=fast` the in-memory fast broker):
//!
//! - producer, closed loop: the Python producer, Spillway's producer and the ceiling (a plain
//!   rdkafka producer sending the same messages straight to the broker, as many outstanding as
//!   wrk has connections) under `wrk -c N` for each `--connections`, 1 and 10 records per
//!   request, with the CPU each process used per 100,000 requests (from /proc);
//! - producer, open model: each one's *maximum sustainable rate*, the highest constant rate at
//!   which loadgen's runner gets every request answered 2xx with p99 from the planned send
//!   within `--max-p99-ms` (the rate doubles until a trial fails, then is bisected);
//! - consumer: the Python consumer and Spillway's draining the same backlog, against a plain
//!   librdkafka consumer only fetching it and a raw COPY BINARY of the same rows from memory,
//!   with CPU per million rows.
//!
//! Usage: `cargo run --release -p spillway-benches --bin compare-baseline -- [--python PYTHON]`
//! (PYTHON needs aiohttp aiokafka aiopg psycopg2-binary; wrk must be on PATH). `--help` lists
//! the rest. Every line of the result is a Markdown table row, for the README.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use spillway_benches::{create_table, drain_time, produce_backlog, raw_copy, record, rows};
use spillway_core::{Envelope, RequestId};
use spillway_harness::postgres::connect;
use spillway_harness::{free_port, KafkaBroker, LocalPostgres, PostgresServer, Tansu};
use spillway_loadgen::payload::{PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::runner::{self, Live, RunConfig};
use spillway_loadgen::verify::{count_rows, IdSource};

/// Spillway beside the original Python pipeline, same broker, same Postgres, same run.
#[derive(Parser, Debug)]
struct Args {
    /// The Python interpreter for the original (with aiohttp aiokafka aiopg psycopg2-binary).
    #[arg(long, default_value = "python3")]
    python: String,
    /// The original's directory (producer.py, consumer.py).
    #[arg(long, default_value = "../shared/baselines/python-original")]
    baseline: PathBuf,
    /// Closed-loop connections: one wrk run per count (and the ceiling with as many sends
    /// outstanding).
    #[arg(long, value_delimiter = ',', default_value = "50,400,2000")]
    connections: Vec<usize>,
    /// Records per request.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    per_request: Vec<u64>,
    /// Length of each wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Open model: the p99 (from each request's planned send) a sustainable rate stays within.
    #[arg(long, default_value_t = 100.0)]
    max_p99_ms: f64,
    /// Open model: length of each trial rate.
    #[arg(long, default_value_t = 5)]
    trial_seconds: u64,
    /// Open model: connections loadgen's runner spreads the planned sends over.
    #[arg(long, default_value_t = 400)]
    open_connections: usize,
    /// Open model: the first trial rate, requests/s (it doubles while trials pass).
    #[arg(long, default_value_t = 1000.0)]
    first_rate: f64,
    /// Records in the consumer's backlog (10 per message; each consumer is timed from its
    /// first row to its last, so keep it large enough for many batches: 100,000 or more).
    #[arg(long, default_value_t = 200_000)]
    backlog: u64,
    /// Skip the closed-loop producer runs.
    #[arg(long)]
    no_closed: bool,
    /// Skip the open-model search.
    #[arg(long)]
    no_open: bool,
    /// Skip the consumer.
    #[arg(long)]
    no_consumer: bool,
    /// Skip the whole pipeline under spikes.
    #[arg(long)]
    no_spike: bool,
    /// Spikes: the first base rate tried, requests/s (it doubles while trials pass); bursts
    /// are 20x it.
    #[arg(long, default_value_t = 50.0)]
    spike_first_rate: f64,
    /// Spikes: length of each trial (3 s bursts about every 8 s).
    #[arg(long, default_value_t = 30)]
    spike_seconds: u64,
    /// Spikes: how soon after each burst's end every record acknowledged by then must be in
    /// Postgres.
    #[arg(long, default_value_t = 10)]
    catch_up_secs: u64,
}

const PER_MESSAGE: u64 = 10;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) a process has used so far: `pid`, or this process.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return f64::NAN;
    };
    // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / clock_ticks(),
        _ => f64::NAN,
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of the measured process and of the broker over one measurement.
struct Cpu {
    pid: Option<u32>,
    broker: Option<u32>,
    start: (f64, f64),
}

impl Cpu {
    fn start(pid: Option<u32>, broker: Option<u32>) -> Self {
        Cpu {
            pid,
            broker,
            start: (cpu_secs(pid), cpu_secs(broker)),
        }
    }
    fn stop(&self) -> (f64, f64) {
        (
            cpu_secs(self.pid) - self.start.0,
            cpu_secs(self.broker) - self.start.1,
        )
    }
}

fn body(per: u64) -> String {
    let recs: Vec<String> = (0..per)
        .map(|i| String::from_utf8_lossy(&record(i)).into_owned())
        .collect();
    format!("[{}]", recs.join(","))
}

/// What one closed-loop run measured.
struct Closed {
    /// Requests answered 2xx per second.
    rps: f64,
    p99_ms: f64,
    /// Requests answered 2xx (CPU is counted per 100,000 of them).
    requests: f64,
    /// Answers other than 2xx, and connections that failed (connect, read, write, timeout).
    errors: u64,
    /// CPU seconds of the system measured, and of the broker.
    cpu: (f64, f64),
}

impl Closed {
    fn cpu_per_100k(&self) -> f64 {
        self.cpu.0 / self.requests * 100_000.0
    }
    fn broker_cpu_per_100k(&self) -> f64 {
        self.cpu.1 / self.requests * 100_000.0
    }
}

/// wrk against `url` with `connections`, the measured process's CPU taken around it.
fn wrk(url: &str, body: &str, connections: usize, secs: u64, cpu: Cpu) -> Result<Closed> {
    let script = std::env::temp_dir().join(format!("spillway-wrk-{}.lua", free_port()));
    std::fs::write(&script, format!("wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"))?;
    let out = Command::new("wrk")
        .args([
            "-t2".to_string(),
            format!("-c{connections}"),
            format!("-d{secs}s"),
            "--timeout".into(),
            "10s".into(),
            "--latency".into(),
            "-s".into(),
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let cpu = cpu.stop();
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .map(str::trim)
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?
        .parse()?;
    // "  123456 requests in 10.00s, 12.34MB read"
    let requests: f64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(rps * secs as f64);
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| {
            let v = v.trim();
            let (num, unit) =
                v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
            let n: f64 = num.parse().unwrap_or(f64::NAN);
            match unit {
                "us" => n / 1000.0,
                "s" => n * 1000.0,
                _ => n,
            }
        })
        .unwrap_or(f64::NAN);
    let number_after = |line: &str, label: &str| -> u64 {
        line.split(label)
            .nth(1)
            .and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut errors = 0;
    let mut refused = 0;
    for l in text.lines() {
        if l.contains("Non-2xx") {
            refused = number_after(l, ":");
            errors += refused;
        }
        if l.contains("Socket errors") {
            for label in ["connect", "read", "write", "timeout"] {
                errors += number_after(l, label);
            }
        }
    }
    // Only answers that acknowledged their records count (wrk's rate counts every answer).
    let acknowledged = (requests - refused as f64).max(0.0);
    Ok(Closed {
        rps: rps * acknowledged / requests.max(1.0),
        p99_ms,
        requests: acknowledged,
        errors,
        cpu,
    })
}

async fn wait_http(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The ceiling: a plain idempotent rdkafka producer sending the producer's messages for
/// `secs`, `outstanding` at a time (as many as wrk's connections), with this process's CPU.
async fn ceiling(
    bootstrap: &str,
    topic: &str,
    per: u64,
    outstanding: usize,
    secs: u64,
    broker: Option<u32>,
) -> Result<Closed> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()?;
    let recs: Vec<Vec<u8>> = (0..per).map(record).collect();
    let payload = Envelope {
        received_at_micros: 1,
        request_id: RequestId::from_u128(1),
        sequenced: false,
        idempotency_key: None,
        source: None,
        records: recs.iter().map(|r| r.as_slice()).collect(),
    }
    .encode();
    let cpu = Cpu::start(None, broker);
    let end = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let results: Vec<bool> = stream::iter(0..)
        .take_while(|_| futures::future::ready(Instant::now() < end))
        .map(|_| {
            let (p, payload) = (p.clone(), payload.clone());
            async move {
                p.send(
                    FutureRecord::<(), _>::to(topic).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .is_ok()
            }
        })
        .buffer_unordered(outstanding)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let sent = results.iter().filter(|ok| **ok).count() as f64;
    Ok(Closed {
        rps: sent / elapsed,
        p99_ms: f64::NAN,
        requests: sent,
        errors: results.len() as u64 - sent as u64,
        cpu,
    })
}

/// One open-model trial: `rate` requests/s for `secs` against `url`: (p99 ms from the planned
/// send, requests not answered 2xx).
async fn trial(url: &str, per: u64, rate: f64, secs: u64, connections: usize) -> (f64, u64) {
    let schedule = RateProfile::Constant { rate }.schedule(Duration::from_secs(secs));
    let mut cfg = RunConfig::new(url.to_string(), schedule);
    cfg.connections = connections;
    cfg.max_in_flight = connections * 4;
    let spec = PayloadSpec::generated((per as usize, per as usize), (200, 200));
    let r = runner::run(
        cfg,
        PayloadGen::new(spec, "cmp", rate as u64),
        Arc::new(Live::default()),
        |_, _, _| {},
    )
    .await;
    outcome(&r)
}

/// A runner's result as the searches judge it: (p99 ms from the planned send, requests planned
/// but not answered 2xx).
fn outcome(r: &runner::RunResult) -> (f64, u64) {
    let ok: u64 = r
        .statuses
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| *n)
        .sum();
    (
        r.latency.value_at_quantile(0.99) as f64 / 1000.0,
        r.planned.saturating_sub(ok),
    )
}

/// The highest constant rate whose trial passes (p99 within `max_p99_ms`, every request
/// answered 2xx): doubling from `--first-rate` until a trial fails, then bisecting to within
/// 10%.
/// Returns (rate, its p99 ms) and prints each trial.
async fn max_sustainable(url: &str, per: u64, args: &Args, label: &str) -> (f64, f64) {
    let found = highest_passing(args.first_rate, 1.1, 50.0, 2, |rate| async move {
        let (p99, errors) = trial(url, per, rate, args.trial_seconds, args.open_connections).await;
        let ok = errors == 0 && p99 <= args.max_p99_ms;
        eprintln!(
            "  {label}: {rate:.0} requests/s for {} s: p99 {p99:.1} ms, {errors} not 2xx: {}",
            args.trial_seconds,
            if ok { "sustained" } else { "not sustained" }
        );
        (ok, p99)
    })
    .await;
    found.unwrap_or((0.0, f64::NAN))
}

/// The highest rate whose `trial` passes: doubling from `first` while trials pass, then
/// bisecting until the lowest failing rate is within `precision` (a ratio) of the highest
/// passing one; halving while trials fail, until one passes or the rate is at most `floor`.
/// Pauses `pause_secs` after each trial (what a failed one queued drains). Returns the rate
/// and what its trial measured.
async fn highest_passing<T, Fut: std::future::Future<Output = (bool, T)>>(
    first: f64,
    precision: f64,
    floor: f64,
    pause_secs: u64,
    mut trial: impl FnMut(f64) -> Fut,
) -> Option<(f64, T)> {
    let mut pass: Option<(f64, T)> = None;
    let mut fail: Option<f64> = None;
    let mut rate = first;
    for _ in 0..16 {
        let (ok, measured) = trial(rate).await;
        if ok {
            pass = Some((rate, measured));
        } else {
            fail = Some(rate);
        }
        tokio::time::sleep(Duration::from_secs(pause_secs)).await;
        rate = match (&pass, fail) {
            (Some((p, _)), None) => p * 2.0,
            (Some((p, _)), Some(f)) if f / p > precision => (p + f) / 2.0,
            (None, Some(f)) if f > floor => f / 2.0,
            _ => break,
        };
    }
    pass
}

/// What one trial of the whole pipeline under spikes measured.
struct Spike {
    p99_ms: f64,
    errors: u64,
    /// Per burst that ended `catch_up_secs` before the trial did: seconds from its end until
    /// every record acknowledged by then was in Postgres (None: not within `catch_up_secs`).
    catch_up: Vec<Option<f64>>,
}

impl Spike {
    fn passed(&self, args: &Args) -> bool {
        self.errors == 0
            && self.p99_ms <= args.max_p99_ms
            && !self.catch_up.is_empty()
            && self.catch_up.iter().all(Option::is_some)
    }
    fn worst_catch_up(&self) -> String {
        if self.catch_up.iter().any(Option::is_none) {
            return "never".into();
        }
        let worst = self
            .catch_up
            .iter()
            .flatten()
            .fold(0.0f64, |a, b| a.max(*b));
        format!("{worst:.1}")
    }
}

/// Seconds from `end` until the rows reached the records acknowledged by `end`, from samples
/// (seconds since the start, records acknowledged so far, rows of the run in Postgres); None
/// when not within `within` seconds.
fn caught_up_after(samples: &[(f64, u64, i64)], end: f64, within: f64) -> Option<f64> {
    let target = samples.iter().find(|(t, _, _)| *t >= end)?.1 as i64;
    samples
        .iter()
        .find(|(t, _, rows)| *t >= end && *rows >= target)
        .map(|(t, _, _)| t - end)
        .filter(|d| *d <= within)
}

/// One trial of the whole pipeline: loadgen's spiky profile (base `rate`, 20x bursts of 3 s
/// about every 8 s, 1 to 10 records per request) against `url`, while the rows of the trial in
/// `table` are counted four times a second.
async fn spike_trial(url: &str, db: &str, table: &str, rate: f64, args: &Args, run: &str) -> Spike {
    let duration = Duration::from_secs(args.spike_seconds);
    let profile = RateProfile::Spiky {
        base: rate,
        multiplier: 20.0,
        burst: Duration::from_secs(3),
        gap: Duration::from_secs(8),
        seed: 7,
    };
    let bursts = profile.bursts(duration);
    let mut cfg = RunConfig::new(url.to_string(), profile.schedule(duration));
    cfg.connections = args.open_connections;
    cfg.max_in_flight = args.open_connections * 4;
    let live = Arc::new(Live::default());
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now() + Duration::from_millis(50);
    let sampler = {
        let (live, samples, db, table, run) = (
            live.clone(),
            samples.clone(),
            db.to_string(),
            table.to_string(),
            run.to_string(),
        );
        tokio::spawn(async move {
            loop {
                // Acknowledged before the count, and the time after it: a burst's records are
                // never judged in before they were counted.
                let acked = live
                    .acked_records
                    .load(std::sync::atomic::Ordering::Relaxed);
                if let Ok(rows) = count_rows(&db, &table, IdSource::Field("id"), &run).await {
                    let t = start.elapsed().as_secs_f64();
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((t, acked, rows));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let spec = PayloadSpec::generated((1, 10), (200, 200));
    let r = runner::run(cfg, PayloadGen::new(spec, run, 7), live, |_, _, _| {}).await;
    // Bursts that ended early enough to be judged, and time to judge the last of them.
    let judged: Vec<(f64, f64)> = bursts
        .into_iter()
        .filter(|(_, end)| *end + args.catch_up_secs as f64 <= duration.as_secs_f64())
        .collect();
    let horizon = judged
        .last()
        .map_or(0.0, |(_, e)| e + args.catch_up_secs as f64 + 0.5);
    while start.elapsed().as_secs_f64() < horizon {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sampler.abort();
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // The next trial starts once this one's records are all written (or a minute passed), so
    // a backlog left by a failed trial is not judged against the next.
    let acked = r.acked.len() as i64;
    let _ = settled(db, table, run, acked, Duration::from_secs(60)).await;
    let (p99_ms, errors) = outcome(&r);
    Spike {
        p99_ms,
        errors,
        catch_up: judged
            .iter()
            .map(|(_, end)| caught_up_after(&samples, *end, args.catch_up_secs as f64))
            .collect(),
    }
}

/// Waits until `run`'s rows in `table` reach `acked`, at most `limit`; whether they did.
async fn settled(db: &str, table: &str, run: &str, acked: i64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if count_rows(db, table, IdSource::Field("id"), run)
            .await
            .is_ok_and(|n| n >= acked)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Sends 20 requests of one record and waits until they are in `table`: the consumer has
/// joined its group and writes, before the first trial is timed.
async fn warm_up(url: &str, db: &str, table: &str, label: &str) -> Result<()> {
    let run = format!("{label}warm");
    let schedule = RateProfile::Constant { rate: 20.0 }.schedule(Duration::from_secs(1));
    let spec = PayloadSpec::generated((1, 1), (200, 200));
    let r = runner::run(
        RunConfig::new(url.to_string(), schedule),
        PayloadGen::new(spec, &run, 7),
        Arc::new(Live::default()),
        |_, _, _| {},
    )
    .await;
    let acked = r.acked.len() as i64;
    ensure!(
        acked > 0 && settled(db, table, &run, acked, Duration::from_secs(60)).await,
        "{label}: the warm-up's {acked} acknowledged records were not all in {table} within 60 s"
    );
    Ok(())
}

/// The highest spiky base rate whose trial passes, doubling from `--spike-first-rate` until a
/// trial fails, then bisecting to within 30%. Prints each trial; returns (rate, its trial).
async fn max_spiky(
    url: &str,
    db: &str,
    table: &str,
    args: &Args,
    label: &str,
) -> (f64, Option<Spike>) {
    let mut n = 0;
    let found = highest_passing(args.spike_first_rate, 1.3, 5.0, 3, |rate| {
        n += 1;
        let run = format!("{label}{n}").replace([' ', ','], "");
        async move {
            let t = spike_trial(url, db, table, rate, args, &run).await;
            let ok = t.passed(args);
            eprintln!(
                "  {label}: spiky base {rate:.0} requests/s (bursts {:.0}): p99 {:.1} ms, {} not 2xx, caught up after each burst in [{}] s: {}",
                rate * 20.0,
                t.p99_ms,
                t.errors,
                t.catch_up
                    .iter()
                    .map(|c| c.map_or("never".into(), |c| format!("{c:.1}")))
                    .collect::<Vec<String>>()
                    .join(", "),
                if ok { "sustained" } else { "not sustained" }
            );
            (ok, t)
        }
    })
    .await;
    match found {
        Some((rate, t)) => (rate, Some(t)),
        None => (0.0, None),
    }
}

/// A plain librdkafka consumer reading `topic`'s 4 partitions from the start until it has
/// `want` messages, keeping none (the consumer's fetch settings, no Postgres): the fetch
/// side's rate. Returns the messages read and the time from the first to the last. The clock
/// starts with the first fetch already local, so this rate is if anything high, and the
/// consumers' ratios to it low.
fn fetch_only(bootstrap: &str, topic: &str, want: u64) -> Result<(u64, Duration)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "compare-fetch-only")
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.queue.backoff.ms", "20")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut n, mut bytes, mut first) = (0u64, 0usize, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < want && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            bytes += m?.payload_len();
            n += 1;
        }
    }
    std::hint::black_box(bytes);
    Ok((n, first.map_or(Duration::ZERO, |t| t.elapsed())))
}

async fn count(url: &str, table: &str) -> i64 {
    match connect(url).await {
        Ok(c) => c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

fn python_producer(args: &Args, bootstrap: &str, topic: &str, port: u16) -> Result<Killed> {
    Ok(Killed(
        Command::new(&args.python)
            .arg(args.baseline.join("producer.py"))
            .env("KAFKA_BROKERS", bootstrap)
            .env("TOPIC", topic)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Python producer")?,
    ))
}

/// The original's consumer reading `topic` as `group` into `data`.
fn python_consumer(
    args: &Args,
    bootstrap: &str,
    topic: &str,
    group: &str,
    dsn: &str,
) -> Result<Killed> {
    Ok(Killed(
        Command::new(&args.python)
            .arg(args.baseline.join("consumer.py"))
            .env("KAFKA_BROKERS", bootstrap)
            .env("TOPIC", topic)
            .env("GROUP", group)
            .env("DATABASE_URL", dsn)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Python consumer")?,
    ))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.baseline.join("producer.py").is_file(),
        "no producer.py in {} (--baseline)",
        args.baseline.display()
    );
    let pg = LocalPostgres::start()?;
    let broker = match std::env::var("SPILLWAY_TEST_KAFKA").as_deref() {
        Ok("fast") => Tansu::start_in_memory()?,
        Ok("tansu") | Err(_) => Tansu::start()?,
        Ok(other) => bail!("SPILLWAY_TEST_KAFKA={other}: compare-baseline runs on tansu or fast"),
    };
    let bpid = broker.pid();
    let bootstrap = broker.bootstrap();
    for t in [
        "baseline",
        "spillway",
        "ceiling",
        "baseline_backlog",
        "spillway_backlog",
    ] {
        broker.create_topic(t, 4).await?;
    }
    println!(
        "# compare-baseline, broker: {}, {}",
        broker.kind(),
        String::from_utf8_lossy(&Command::new("date").arg("-Is").output()?.stdout).trim()
    );

    let py_port = free_port();
    let py = python_producer(&args, &bootstrap, "baseline", py_port)?;
    let py_pid = py.0.id();
    wait_http(py_port).await?;
    let py_url = format!("http://127.0.0.1:{py_port}/store");
    let mut s = spillway_producer::Settings::new(&bootstrap, "spillway");
    s.listen = "127.0.0.1:0".parse()?;
    let producer = spillway_producer::start(s).await?;
    let sp_url = producer.store_url();

    if !args.no_closed {
        println!(
            "\n## producer, closed loop: wrk -t2 -cN -d{}s, same bodies; CPU = the process's user+system seconds per 100k requests (broker's in brackets)\n",
            args.seconds
        );
        println!("| records/request | connections | system | requests/s answered 2xx | p99 ms | not 2xx | CPU s/100k req | vs Python | vs ceiling |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for &per in &args.per_request {
            let b = body(per);
            for &c in &args.connections {
                let py = wrk(&py_url, &b, c, args.seconds, Cpu::start(Some(py_pid), bpid))?;
                let sp = wrk(&sp_url, &b, c, args.seconds, Cpu::start(None, bpid))?;
                let ceil = ceiling(&bootstrap, "ceiling", per, c, args.seconds, bpid).await?;
                for (name, r) in [
                    ("Python original", &py),
                    ("Spillway", &sp),
                    ("ceiling (plain rdkafka)", &ceil),
                ] {
                    println!(
                        "| {per} | {c} | {name} | {:.0} | {} | {} | {:.2} ({:.2}) | {:.2}x | {:.2} |",
                        r.rps,
                        if r.p99_ms.is_nan() {
                            "-".to_string()
                        } else {
                            format!("{:.1}", r.p99_ms)
                        },
                        r.errors,
                        r.cpu_per_100k(),
                        r.broker_cpu_per_100k(),
                        r.rps / py.rps,
                        r.rps / ceil.rps
                    );
                }
                println!(
                    "| {per} | {c} | goals | | | | Spillway/Python CPU {:.2} (≤ 0.2: {}) | | Spillway/ceiling {:.2} (≥ 0.8: {}) |",
                    sp.cpu_per_100k() / py.cpu_per_100k(),
                    verdict(sp.cpu_per_100k() / py.cpu_per_100k() <= 0.2),
                    sp.rps / ceil.rps,
                    verdict(sp.rps / ceil.rps >= 0.8)
                );
            }
        }
    }

    if !args.no_open {
        println!(
            "\n## producer, open model: the highest constant rate with every request 2xx and p99 from the planned send ≤ {} ms ({} s trials, {} connections)\n",
            args.max_p99_ms, args.trial_seconds, args.open_connections
        );
        println!(
            "| records/request | system | max sustainable requests/s | its p99 ms | vs Python |"
        );
        println!("|---|---|---|---|---|");
        for &per in &args.per_request {
            let (py_rate, py_p99) =
                max_sustainable(&py_url, per, &args, &format!("Python, {per}/request")).await;
            let (sp_rate, sp_p99) =
                max_sustainable(&sp_url, per, &args, &format!("Spillway, {per}/request")).await;
            println!("| {per} | Python original | {py_rate:.0} | {py_p99:.1} | 1.00x |");
            println!(
                "| {per} | Spillway | {sp_rate:.0} | {sp_p99:.1} | {:.2}x (≥ 5x: {}) |",
                sp_rate / py_rate,
                verdict(sp_rate / py_rate >= 5.0)
            );
        }
    }
    producer.shutdown().await;
    drop(py);

    let url = pg.url();
    connect(&url)
        .await?
        .batch_execute("CREATE TABLE data (timestamp timestamptz, data jsonb)")
        .await?;
    let dsn = format!(
        "dbname=postgres user=postgres host=127.0.0.1 port={}",
        pg.port()
    );
    if !args.no_consumer {
        consumers(&args, &bootstrap, bpid, &url, &dsn).await?;
    }
    if !args.no_spike {
        spikes(&args, &broker, &url, &dsn).await?;
    }
    Ok(())
}

/// Python's consumer and Spillway's draining one backlog, beside fetch-only and raw COPY.
async fn consumers(
    args: &Args,
    bootstrap: &str,
    bpid: Option<u32>,
    url: &str,
    dsn: &str,
) -> Result<()> {
    let bootstrap = bootstrap.to_string();
    let backlog = args.backlog;
    println!(
        "\n## consumer: draining a backlog of {backlog} records ({PER_MESSAGE} per message, 4 partitions) into the same Postgres; CPU = the process's seconds per million rows\n"
    );
    produce_backlog(
        &bootstrap,
        "spillway_backlog",
        Some("baseline_backlog"),
        backlog,
        PER_MESSAGE,
    )
    .await?;
    // Fetch only: a plain librdkafka consumer reading the backlog, no Postgres.
    let cpu = Cpu::start(None, bpid);
    let boot = bootstrap.clone();
    let want = backlog / PER_MESSAGE;
    let (messages, fetch_time) =
        tokio::task::spawn_blocking(move || fetch_only(&boot, "spillway_backlog", want)).await??;
    let fetch_secs = fetch_time.as_secs_f64();
    let fetch_cpu = cpu.stop();
    ensure!(
        messages == want,
        "the fetch-only reader read {messages} messages, not {want}"
    );
    let fetch_rate = backlog as f64 / fetch_secs;

    let py = python_consumer(
        args,
        &bootstrap,
        "baseline_backlog",
        "baseline-compare",
        dsn,
    )?;
    // Both consumers are timed from their first row to the last (joining the group excluded);
    // their CPU from their start to their last row.
    let cpu = Cpu::start(Some(py.0.id()), bpid);
    let count_url = url.to_string();
    let py_time = tokio::time::timeout(
        Duration::from_secs(900),
        drain_time(backlog, move || {
            let url = count_url.clone();
            Box::pin(async move { count(&url, "data").await as u64 })
        }),
    )
    .await
    .context("the Python consumer did not drain the backlog in 15 minutes")?;
    let py_cpu = cpu.stop();
    let py_rate = backlog as f64 / py_time.as_secs_f64();
    drop(py);

    let mut s = spillway_consumer::Settings::new(&bootstrap, "spillway_backlog", url);
    s.listen = "127.0.0.1:0".parse()?;
    s.group = "spillway-compare".into();
    let cpu = Cpu::start(None, bpid);
    let consumer = spillway_consumer::start(s).await?;
    let metrics = consumer.metrics().clone();
    let sp_time = drain_time(backlog, move || {
        let n = metrics.rows_written();
        Box::pin(async move { n })
    })
    .await;
    let sp_cpu = cpu.stop();
    let sp_rate = backlog as f64 / sp_time.as_secs_f64();
    consumer.shutdown().await?;

    let rows = rows(backlog);
    let mut c = connect(url).await?;
    c.batch_execute(&create_table("raw")).await?;
    let started = Instant::now();
    raw_copy(&mut c, "raw", &rows, 10_000).await?;
    let raw_rate = backlog as f64 / started.elapsed().as_secs_f64();

    let per_m = |cpu: f64| cpu / backlog as f64 * 1e6;
    println!("| system | rows/s | vs Python | vs fetch-only | CPU s/M rows (broker's) |");
    println!("|---|---|---|---|---|");
    println!(
        "| fetch only (plain librdkafka, no Postgres) | {fetch_rate:.0} | {:.2}x | 1.00 | {:.2} ({:.2}) |",
        fetch_rate / py_rate,
        per_m(fetch_cpu.0),
        per_m(fetch_cpu.1)
    );
    println!(
        "| Python original consumer | {py_rate:.0} | 1.00x | {:.2} | {:.2} ({:.2}) |",
        py_rate / fetch_rate,
        per_m(py_cpu.0),
        per_m(py_cpu.1)
    );
    println!(
        "| Spillway consumer | {sp_rate:.0} | {:.2}x | {:.2} | {:.2} ({:.2}) |",
        sp_rate / py_rate,
        sp_rate / fetch_rate,
        per_m(sp_cpu.0),
        per_m(sp_cpu.1)
    );
    println!(
        "| raw COPY BINARY from memory, 1 connection | {raw_rate:.0} | {:.2}x | {:.2} | - |",
        raw_rate / py_rate,
        raw_rate / fetch_rate
    );
    println!(
        "| goals | Spillway/fetch-only {:.2} (≥ 0.8: {}) | Spillway/Python {:.2}x (≥ 5x: {}) | | Spillway/Python CPU {:.2} (≤ 0.2: {}) |",
        sp_rate / fetch_rate,
        verdict(sp_rate / fetch_rate >= 0.8),
        sp_rate / py_rate,
        verdict(sp_rate / py_rate >= 5.0),
        sp_cpu.0 / py_cpu.0,
        verdict(sp_cpu.0 / py_cpu.0 <= 0.2)
    );
    Ok(())
}

/// Each pipeline (Python's producer and consumer; Spillway's) under loadgen's spiky profile on
/// fresh topics: the highest base rate it sustains.
async fn spikes(args: &Args, broker: &Tansu, url: &str, dsn: &str) -> Result<()> {
    let bootstrap = broker.bootstrap();
    broker.create_topic("baseline_spike", 4).await?;
    broker.create_topic("spillway_spike", 4).await?;
    println!(
        "\n## the whole pipeline under spikes: the highest base rate (bursts 20x for 3 s, about every 8 s, 1-10 records per request, {} s trials) with every request 2xx, p99 from the planned send ≤ {} ms, and every record acknowledged by a burst's end in Postgres within {} s of it\n",
        args.spike_seconds, args.max_p99_ms, args.catch_up_secs
    );
    let py_port = free_port();
    let py = python_producer(args, &bootstrap, "baseline_spike", py_port)?;
    let py_consumer = python_consumer(args, &bootstrap, "baseline_spike", "baseline-spike", dsn)?;
    wait_http(py_port).await?;
    warm_up(
        &format!("http://127.0.0.1:{py_port}/store"),
        url,
        "data",
        "Python",
    )
    .await?;
    let (py_rate, py_trial) = max_spiky(
        &format!("http://127.0.0.1:{py_port}/store"),
        url,
        "data",
        args,
        "Python",
    )
    .await;
    drop(py);
    drop(py_consumer);

    let mut s = spillway_producer::Settings::new(&bootstrap, "spillway_spike");
    s.listen = "127.0.0.1:0".parse()?;
    let producer = spillway_producer::start(s).await?;
    let mut s = spillway_consumer::Settings::new(&bootstrap, "spillway_spike", url);
    s.listen = "127.0.0.1:0".parse()?;
    s.group = "spillway-spike".into();
    s.table = spillway_consumer::pg::TableName::parse("spike").map_err(anyhow::Error::msg)?;
    s.topic_tables = vec!["spike".into()];
    let consumer = spillway_consumer::start(s).await?;
    warm_up(&producer.store_url(), url, "spike", "Spillway").await?;
    let (sp_rate, sp_trial) =
        max_spiky(&producer.store_url(), url, "spike", args, "Spillway").await;
    producer.shutdown().await;
    consumer.shutdown().await?;

    println!("| system | highest base requests/s sustained | bursts requests/s | its p99 ms | worst catch-up s | vs Python |");
    println!("|---|---|---|---|---|---|");
    for (name, rate, t) in [
        ("Python original", py_rate, &py_trial),
        ("Spillway", sp_rate, &sp_trial),
    ] {
        println!(
            "| {name} | {rate:.0} | {:.0} | {} | {} | {:.2}x |",
            rate * 20.0,
            t.as_ref()
                .map_or("-".into(), |t| format!("{:.1}", t.p99_ms)),
            t.as_ref().map_or("-".into(), Spike::worst_catch_up),
            rate / py_rate
        );
    }
    Ok(())
}
