use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use spillway_loadgen::keyed::verify_latest_per_key;
use spillway_loadgen::payload::{read_records_file, typed_columns, PayloadGen, PayloadSpec};
use spillway_loadgen::profile::{parse_duration, RateProfile};
use spillway_loadgen::report::Report;
use spillway_loadgen::retry::RetrySettings;
use spillway_loadgen::runner::{self, KeyedRetries, Live, RunConfig};
use spillway_loadgen::stack::{LocalStack, STATES, TABLE, TOPIC};
use spillway_loadgen::verify::{self, VerifyConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Profile {
    Constant,
    Ramp,
    Step,
    Spiky,
    Sine,
    Replay,
}

/// Reproduces variable traffic (20x spikes by default) against a Spillway ingest endpoint,
/// measures latency from each request's planned send time, and checks that every
/// acknowledged record reached Postgres exactly once. With no --target it starts a local
/// stack (Postgres, Kafka broker, producer, consumer) and tears it down after.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version)]
struct Args {
    /// Rate profile.
    #[arg(long, value_enum, default_value = "spiky")]
    rate_profile: Profile,
    /// Base rate, requests/s (constant, spiky base, sine mean, ramp start).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to send.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// ramp: final rate.
    #[arg(long, default_value_t = 1000.0)]
    ramp_to: f64,
    /// ramp: time to reach --ramp-to.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ramp_over: Duration,
    /// step: stages "LEN:RATE,LEN:RATE" (each ramps from the previous rate, like k6).
    #[arg(long, default_value = "5s:100,10s:1000,5s:100")]
    stages: String,
    /// spiky: burst rate = base * multiplier.
    #[arg(long, default_value_t = 20.0)]
    burst_multiplier: f64,
    /// spiky: burst length.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    burst_length: Duration,
    /// spiky: mean time between bursts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    burst_gap: Duration,
    /// sine: relative amplitude (0..1).
    #[arg(long, default_value_t = 0.8)]
    sine_amplitude: f64,
    /// sine: period.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    sine_period: Duration,
    /// replay: trace file (timestamps in seconds, or per-second counts with --replay-counts).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// replay: the trace holds requests per second, one line per second.
    #[arg(long)]
    replay_counts: bool,
    /// replay: speed factor (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    replay_speed: f64,
    /// Records per request, "N" or "MIN-MAX".
    #[arg(long, default_value = "1-10")]
    records_per_request: String,
    /// Record size in bytes, "N" or "MIN-MAX".
    #[arg(long, default_value = "150-250")]
    record_size: String,
    /// Records to send instead of generated ones (NDJSON or a JSON array of objects).
    #[arg(long)]
    records_file: Option<PathBuf>,
    /// JSON field that carries each record's unique id.
    #[arg(long, default_value = "id")]
    id_field: String,
    /// Generate records for typed columns (the id, and n bigint, name text, at timestamptz,
    /// score double precision, ok boolean, doc jsonb; about 200 bytes). The local stack's
    /// consumer then maps them (`--column id:text!=/id ...`) with --keep-data false and the
    /// verdict reads the id column; a poison record has a string for the bigint.
    #[arg(long)]
    typed: bool,
    /// The verdict reads each row's id from this column instead of data->>id-field (a
    /// deployment whose consumer maps the id to a column; implied by --typed on the local stack).
    #[arg(long)]
    id_column: Option<String>,
    /// Keyed traffic, for a consumer writing by key: each request carries one of N keys as
    /// its X-Spillway-Key, and about half of its records are states of that key
    /// (`"kind":"state"`, `key`, `seq`, some `"op":"delete"`). The local stack's consumer
    /// routes them (`--route /kind=state:states`) to a table written by key (`--upsert-key key
    /// --delete-when /op=delete`). The verdict checks the other records exactly once in
    /// --table, and that each key's row in --keyed-table is its last state in Kafka (or gone
    /// when that state deletes it).
    #[arg(long, conflicts_with_all = ["typed", "records_file"], value_parser = clap::value_parser!(u64).range(1..))]
    keys: Option<u64>,
    /// With --keys: the table written by key that the verdict reads.
    #[arg(long, default_value = STATES)]
    keyed_table: String,
    /// Send an Idempotency-Key with every request (the run's id and the request's number) and
    /// retry a request answered 503 or 429, or left without an answer (connection refused or
    /// lost, no answer within --answer-timeout), with the same key and body: after its
    /// Retry-After, else an exponential backoff with jitter. The verdict then wants no
    /// unexpected record either; the records of a request given up after --max-retries are
    /// counted apart (they may land).
    #[arg(long)]
    idempotency_keys: bool,
    /// With --idempotency-keys: retries per request before it is given up.
    #[arg(long, default_value_t = 10, requires = "idempotency_keys")]
    max_retries: u32,
    /// With --idempotency-keys: the first retry's backoff when the answer has no Retry-After
    /// (it doubles per retry, with jitter), and the spread added to a Retry-After.
    #[arg(long, default_value = "100ms", value_parser = parse_duration, requires = "idempotency_keys")]
    retry_initial: Duration,
    /// With --idempotency-keys: the longest backoff without a Retry-After.
    #[arg(long, default_value = "5s", value_parser = parse_duration, requires = "idempotency_keys")]
    retry_max: Duration,
    /// With --idempotency-keys: an attempt with no whole answer after this long is abandoned
    /// (its connection closed) and retried.
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "idempotency_keys")]
    answer_timeout: Duration,
    /// Gzip request bodies.
    #[arg(long)]
    gzip: bool,
    /// Fraction of records (0 to 1) made unstorable on purpose (a `"poison": "\u0000"` field
    /// Postgres's jsonb refuses), to check that they land in the dead-letter table and block
    /// nothing. The verdict counts them as dead-lettered, not lost.
    #[arg(long, default_value_t = 0.0)]
    poison_rate: f64,
    /// Seed for burst times, sizes and payloads (random if unset; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// An existing ingest endpoint (http://host:port/store). Unset: a local stack.
    #[arg(long)]
    target: Option<String>,
    /// Postgres URL to check what reached the table (implied with the local stack). With
    /// --target it needs --brokers and --topic: the verdict waits until every partition's lag
    /// is 0.
    #[arg(long, requires_all = ["brokers", "topic"])]
    verify: Option<String>,
    /// The deployment's Kafka bootstrap servers, to read the topic's high watermarks for the
    /// verdict (implied with the local stack).
    #[arg(long)]
    brokers: Option<String>,
    /// The topic the deployment's consumer reads (implied with the local stack).
    #[arg(long)]
    topic: Option<String>,
    /// Table to check.
    #[arg(long, default_value = TABLE)]
    table: String,
    /// Bearer token for the endpoint.
    #[arg(long, env = "SPILLWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Most requests outstanding; a send beyond is counted as not sent.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Connections to the target; each sends one request at a time (requests beyond wait for a
    /// connection, and that wait counts in their latency).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// A send later than this after its planned time is counted late.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    late_threshold: Duration,
    /// Longest wait for the pipeline to go quiet before the verdict (past it, the verdict fails
    /// and says which partitions still lag).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Quiet: every partition's lag 0 and no new row for this long, before the comparison (a
    /// duplicate that lands late is still counted).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    settle: Duration,
    /// Kafka partitions of the local stack's topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Directory for summary.json, seconds.csv and report.html.
    #[arg(long, default_value = "loadgen-report")]
    out: PathBuf,
}

fn range(s: &str, name: &str) -> Result<(usize, usize)> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .with_context(|| format!("--{name}: {s:?} is not N or MIN-MAX"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(s)?, parse(s)?),
    };
    if lo == 0 && name == "records-per-request" || hi < lo {
        bail!("--{name}: {s:?} must be N or MIN-MAX with 1 <= MIN <= MAX");
    }
    Ok((lo, hi))
}

fn profile(a: &Args, seed: u64) -> Result<(RateProfile, String)> {
    Ok(match a.rate_profile {
        Profile::Constant => (
            RateProfile::Constant { rate: a.rate },
            format!("constant {} req/s", a.rate),
        ),
        Profile::Ramp => (
            RateProfile::Ramp {
                from: a.rate,
                to: a.ramp_to,
                over: a.ramp_over,
            },
            format!(
                "ramp {} to {} req/s over {:?}",
                a.rate, a.ramp_to, a.ramp_over
            ),
        ),
        Profile::Step => {
            let stages = a
                .stages
                .split(',')
                .map(|st| {
                    let (len, rate) = st
                        .split_once(':')
                        .with_context(|| format!("--stages: {st:?} is not LEN:RATE"))?;
                    Ok((
                        parse_duration(len).map_err(anyhow::Error::msg)?,
                        rate.trim().parse::<f64>()?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            (RateProfile::Step { stages }, format!("step {}", a.stages))
        }
        Profile::Spiky => (
            RateProfile::Spiky {
                base: a.rate,
                multiplier: a.burst_multiplier,
                burst: a.burst_length,
                gap: a.burst_gap,
                seed,
            },
            format!(
                "spiky base {} req/s, bursts x{} for {:?} every ~{:?}",
                a.rate, a.burst_multiplier, a.burst_length, a.burst_gap
            ),
        ),
        Profile::Sine => (
            RateProfile::Sine {
                base: a.rate,
                amplitude: a.sine_amplitude,
                period: a.sine_period,
            },
            format!(
                "sine {} req/s ±{:.0}% every {:?}",
                a.rate,
                a.sine_amplitude * 100.0,
                a.sine_period
            ),
        ),
        Profile::Replay => {
            let path = a
                .replay
                .as_ref()
                .context("--rate-profile replay needs --replay FILE")?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let p = RateProfile::replay_from_text(&text, a.replay_counts, a.replay_speed)
                .map_err(anyhow::Error::msg)?;
            (
                p,
                format!("replay {} at {}x", path.display(), a.replay_speed),
            )
        }
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPILLWAY_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,librdkafka=off,rdkafka=off")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(a: Args) -> Result<bool> {
    let seed = a.seed.unwrap_or_else(|| fastrand::u64(..));
    let run_id = format!("r{:x}", fastrand::u32(..));
    let (profile, description) = profile(&a, seed)?;
    let file_records = match &a.records_file {
        Some(p) => Some(
            read_records_file(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    if !(0.0..=1.0).contains(&a.poison_rate) {
        bail!(
            "--poison-rate: {} must be a fraction between 0 and 1",
            a.poison_rate
        );
    }
    let spec = PayloadSpec {
        records_per_request: range(&a.records_per_request, "records-per-request")?,
        record_size: range(&a.record_size, "record-size")?,
        file_records,
        gzip: a.gzip,
        id_field: a.id_field.clone(),
        poison_rate: a.poison_rate,
        typed: a.typed,
        keys: a.keys,
    };
    let id_column = match (&a.id_column, a.typed && a.target.is_none()) {
        (Some(c), _) => Some(c.clone()),
        (None, true) => Some("id".to_string()),
        (None, false) => None,
    };
    let idempotency_keys = if a.idempotency_keys {
        let settings = RetrySettings {
            max_retries: a.max_retries,
            initial: a.retry_initial,
            max: a.retry_max,
            answer_timeout: a.answer_timeout,
            ..RetrySettings::default()
        };
        settings.validate().map_err(anyhow::Error::msg)?;
        Some(KeyedRetries { settings, seed })
    } else {
        None
    };
    let schedule = profile.schedule(a.duration);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    eprintln!("loadgen: run {run_id}, seed {seed} (replay with --seed {seed}), {} requests planned: {description}", schedule.len());

    let stack = match &a.target {
        Some(_) => None,
        None => {
            eprintln!("loadgen: no --target: starting a local stack (private Postgres, Kafka broker, producer, consumer)");
            let mapping = if a.typed {
                let columns = typed_columns(&a.id_field)
                    .iter()
                    .map(|c| c.parse())
                    .collect::<Result<Vec<_>, _>>()?;
                eprintln!(
                    "loadgen: typed records; the consumer maps them with --keep-data false --column {}",
                    typed_columns(&a.id_field).join(" --column ")
                );
                spillway_core::Mapping::new(columns, false)?
            } else {
                spillway_core::Mapping::default()
            };
            let stack = match a.keys {
                Some(keys) => {
                    eprintln!("loadgen: {keys} keys; the consumer routes their states (--route /kind=state:{STATES}) to {STATES}, written by key (--upsert-key key --delete-when /op=delete)");
                    LocalStack::start_keyed(a.partitions, mapping, &a.id_field).await
                }
                None => LocalStack::start_with(a.partitions, mapping).await,
            };
            Some(stack.context("starting the local stack")?)
        }
    };
    let target = match (&a.target, &stack) {
        (Some(t), _) => t.clone(),
        (None, Some(s)) => s.producer.store_url(),
        (None, None) => unreachable!("a stack exists without --target"),
    };
    let verify_url = a
        .verify
        .clone()
        .or_else(|| stack.as_ref().map(LocalStack::database_url));
    let (brokers, topic) = match &stack {
        Some(s) => (s.broker.bootstrap(), TOPIC.to_string()),
        None => (
            a.brokers.clone().unwrap_or_default(),
            a.topic.clone().unwrap_or_default(),
        ),
    };

    let live = Arc::new(Live::default());
    live.rows.store(-1, Ordering::Relaxed);
    live.lag.store(-1, Ordering::Relaxed);
    let sampler = verify_url.clone().map(|url| {
        let (live, table, id_field, id_column, run_id) = (
            live.clone(),
            a.table.clone(),
            a.id_field.clone(),
            id_column.clone(),
            run_id.clone(),
        );
        let consumer_metrics = stack.as_ref().map(|s| s.consumer.metrics().clone());
        tokio::spawn(async move {
            loop {
                let id = match &id_column {
                    Some(c) => verify::IdSource::Column(c),
                    None => verify::IdSource::Field(&id_field),
                };
                if let Ok(n) = verify::count_rows(&url, &table, id, &run_id).await {
                    live.rows.store(n, Ordering::Relaxed);
                }
                if let Some(m) = &consumer_metrics {
                    live.lag.store(m.total_lag(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        })
    });
    let tty = std::io::stderr().is_terminal();
    let cfg = RunConfig {
        target: target.clone(),
        schedule,
        max_in_flight: a.max_in_flight,
        connections: a.connections,
        late_threshold: a.late_threshold,
        headers: a
            .token
            .iter()
            .map(|t| ("authorization".to_string(), format!("Bearer {t}")))
            .collect(),
        content_encoding: a.gzip.then(|| "gzip".to_string()),
        idempotency_keys,
    };
    let payloads = PayloadGen::new(spec.clone(), &run_id, seed);
    let result = runner::run(cfg, payloads, live.clone(), move |s, live, p99| {
        let known = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
        let line = format!(
            "[{:>4}s] offered {:>6}/s achieved {:>6}/s in-flight {:>5} p99 {:>8.1} ms errors {:>6} rows {:>8} lag {:>6}",
            s.second,
            s.offered,
            s.completed,
            live.in_flight.load(Ordering::Relaxed),
            p99,
            live.errors.load(Ordering::Relaxed),
            known(s.rows),
            known(s.lag)
        );
        if tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    })
    .await;
    if tty {
        eprintln!();
    }
    let verdict = match &verify_url {
        Some(url) => {
            eprintln!("loadgen: traffic done; waiting (at most {:?}) until the pipeline is quiet (every partition's lag 0, no new row for {:?})", a.drain_timeout, a.settle);
            let live2 = live.clone();
            let cfg = VerifyConfig {
                id_field: a.id_field.clone(),
                id_column: id_column.clone(),
                settle: a.settle,
                given_up: result
                    .retries
                    .enabled
                    .then(|| spec.without_states(&result.retries.given_up)),
                ..VerifyConfig::new(url, &a.table, &run_id, &brokers, &topic, a.drain_timeout)
            };
            // With --keys the states are judged by the keyed verdict below, not found here.
            let acked = spec.without_states(&result.acked);
            Some(
                verify::verify(&cfg, &acked, move |n| {
                    live2.rows.store(n, Ordering::Relaxed)
                })
                .await?,
            )
        }
        None => None,
    };
    let keyed = match (&verify_url, a.keys, &verdict) {
        (Some(url), Some(_), Some(v)) if v.quiet => {
            eprintln!(
                "loadgen: reading the run's states back from Kafka for the keyed verdict on {}",
                a.keyed_table
            );
            Some(
                verify_latest_per_key(&brokers, &topic, url, &a.keyed_table, &run_id, &a.id_field)
                    .await?,
            )
        }
        _ => None,
    };
    if let Some(s) = sampler {
        s.abort();
    }
    let report = Report {
        run_id: &run_id,
        command,
        profile: description,
        target,
        run: &result,
        verdict: verdict.as_ref(),
        keyed: a.keys.map(|_| (a.keyed_table.as_str(), keyed.as_ref())),
    };
    println!("{}", report.table());
    report
        .write_files(&a.out)
        .with_context(|| format!("writing the report to {}", a.out.display()))?;
    println!(
        "report: {}/report.html, {}/summary.json, {}/seconds.csv",
        a.out.display(),
        a.out.display(),
        a.out.display()
    );
    if let Some(s) = stack {
        s.shutdown().await;
    }
    let keyed_passed = match (a.keys, &verdict) {
        (Some(_), Some(_)) => keyed.as_ref().is_some_and(|k| k.passed()),
        _ => true,
    };
    Ok(verdict.is_none_or(|v| v.passed()) && keyed_passed)
}
