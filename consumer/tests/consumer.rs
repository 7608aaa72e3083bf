//! The consumer against a real Postgres and a real broker (Tansu). Every test checks the same
//! invariant after its fault: each produced record is in the table exactly once (or, for bad
//! records, in the dead-letter table with a reason).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use spillway_consumer::{RunningConsumer, Settings};
use spillway_core::{Envelope, ProducerSequence, RequestId};
use spillway_harness::metrics::sample_sum;
use spillway_harness::postgres::{connect, copy_backends};
use spillway_harness::{FaultProxy, Faults, KafkaBroker, PostgresServer, Tansu};

#[path = "consumer/keys.rs"]
mod keys;
#[path = "consumer/partitions.rs"]
mod partitions;
#[path = "consumer/routing.rs"]
mod routing;
#[path = "consumer/topics.rs"]
mod topics;
#[path = "consumer/upsert.rs"]
mod upsert;

const TOPIC: &str = "events";

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

struct Stack {
    pg: Box<dyn PostgresServer>,
    broker: Tansu,
}

async fn stack(partitions: i32) -> Result<Stack> {
    let pg = blocking(spillway_harness::postgres_from_env).await?;
    let broker = blocking(Tansu::start).await?;
    broker.create_topic(TOPIC, partitions).await?;
    Ok(Stack { pg, broker })
}

/// Starts a consumer in this process, its logs captured with the test's output (shown when the
/// test fails; `SPILLWAY_LOG` sets the level, `info` by default).
async fn start(cfg: Settings) -> Result<RunningConsumer, spillway_consumer::ConsumerError> {
    static LOGS: std::sync::Once = std::sync::Once::new();
    LOGS.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(spillway_consumer::log_filter())
            .with_test_writer()
            .try_init();
    });
    spillway_consumer::start(cfg).await
}

fn settings(brokers: &str, url: &str) -> Settings {
    let mut s = Settings::new(brokers, TOPIC, url);
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.group = "consumers".into();
    s.batcher.max_age = Duration::from_millis(100);
    s.batcher.size.min_records = 10;
    s.batcher.size.initial_records = 200;
    s.batcher.size.max_records = 1000;
    s.batcher.retry.initial = Duration::from_millis(50);
    s.batcher.retry.max = Duration::from_millis(500);
    s.batcher.retry.seed = 42;
    s.statement_timeout = Duration::from_secs(2);
    s.connect_timeout = Duration::from_secs(2);
    s.rdkafka = vec![
        ("session.timeout.ms".into(), "6000".into()),
        ("heartbeat.interval.ms".into(), "500".into()),
        ("reconnect.backoff.max.ms".into(), "500".into()),
    ];
    s
}

/// Produces records with ids `ids`, `per_message` records per Kafka message (one request
/// each), as the producer would.
async fn produce(
    bootstrap: &str,
    ids: std::ops::Range<u64>,
    per_message: usize,
    bad: &[u64],
) -> Result<()> {
    produce_to(bootstrap, TOPIC, ids, per_message, bad).await
}

/// [`produce`] to `topic`.
async fn produce_to(
    bootstrap: &str,
    topic: &str,
    ids: std::ops::Range<u64>,
    per_message: usize,
    bad: &[u64],
) -> Result<()> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let records: Vec<String> = ids
        .map(|id| {
            if bad.contains(&id) {
                // Valid JSON that jsonb refuses: a NUL character.
                format!(r#"{{"id": {id}, "bad": "\u0000"}}"#)
            } else {
                format!(r#"{{"id": {id}, "pad": "{}"}}"#, "x".repeat(120))
            }
        })
        .collect();
    let mut pending = vec![];
    for (n, chunk) in records.chunks(per_message).enumerate() {
        let env = Envelope {
            received_at_micros: 1_764_000_000_000_000 + n as i64,
            request_id: RequestId::from_u128(n as u128),
            sequenced: false,
            idempotency_key: None,
            source: None,
            records: chunk.iter().map(|r| r.as_bytes()).collect(),
        };
        let payload = env.encode();
        let key = format!("{n}-{}", fastrand_key());
        let fut = p
            .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)?;
        pending.push(fut);
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// A key that spreads messages over partitions (the keyless sticky partitioner would not).
fn fastrand_key() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Waits until the table holds `n` rows (failing at once if it ever holds more).
async fn wait_rows(url: &str, n: i64, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = -1;
    loop {
        if let Ok(c) = connect(url).await {
            if let Ok(row) = c.query_one("SELECT count(*) FROM records", &[]).await {
                last = row.get::<_, i64>(0);
                ensure!(
                    last <= n,
                    "{last} rows, more than the {n} produced: duplicates"
                );
                if last == n {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("only {last} of {n} rows after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The records table holds each id of `expected` exactly once, and nothing else.
async fn assert_exactly_once(url: &str, expected: impl Iterator<Item = u64>) -> Result<()> {
    assert_exactly_once_in(url, "records", expected).await
}

/// [`assert_exactly_once`] for `table`.
async fn assert_exactly_once_in(
    url: &str,
    table: &str,
    expected: impl Iterator<Item = u64>,
) -> Result<()> {
    let c = connect(url).await?;
    let rows = c
        .query(
            &format!("SELECT (data->>'id')::bigint, count(*) FROM {table} GROUP BY 1"),
            &[],
        )
        .await?;
    let got: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let dups: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(dups.is_empty(), "duplicated ids in {table}: {dups:?}");
    let expected: Vec<i64> = expected.map(|i| i as i64).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|i| !got.contains_key(i))
        .take(20)
        .collect();
    ensure!(
        missing.is_empty(),
        "lost ids in {table} (first 20): {missing:?}"
    );
    ensure!(
        got.len() == expected.len(),
        "{} ids in {table}, {} expected",
        got.len(),
        expected.len()
    );
    Ok(())
}

/// Puts a 2 MB/s link between the consumer and Postgres (so a COPY lasts long enough to be
/// caught), starts a consumer over it on a 20,000-record backlog, and returns once a backend is
/// in the middle of a COPY, with its pid.
async fn consumer_mid_copy(s: &Stack, seed: u64) -> Result<(FaultProxy, RunningConsumer, i32)> {
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], s.pg.port())), seed).await?;
    proxy.set(Faults {
        bandwidth: Some(2 << 20),
        ..Faults::default()
    });
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    produce(&s.broker.bootstrap(), 0..20_000, 10, &[]).await?;
    let consumer = start(settings(&s.broker.bootstrap(), &url)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = copy_backends(&s.pg.url()).await.unwrap_or_default().first() {
            return Ok((proxy, consumer, *pid));
        }
        ensure!(Instant::now() < deadline, "never saw a COPY in progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A metric's value read off the consumer's /metrics page; an error when the page has no such
/// metric, so a renamed metric fails the test instead of passing it.
fn metric(c: &RunningConsumer, name: &str) -> Result<f64> {
    let page = c.metrics().registry.render()?;
    sample_sum(&page, name).with_context(|| format!("/metrics has no {name}:\n{page}"))
}

/// Waits (at most 60 s) until a consumer that joined a group writes rows of its own: the
/// rebalance handed it partitions.
async fn wait_until_it_writes(c: &RunningConsumer) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.metrics().rows_written() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the second consumer never got a partition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn stop(c: RunningConsumer) -> Result<()> {
    Ok(c.shutdown().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_lands_exactly_once_with_its_coordinates() -> Result<()> {
    let s = stack(3).await?;
    produce(&s.broker.bootstrap(), 0..5000, 7, &[]).await?;
    let consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    wait_rows(&s.pg.url(), 5000, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), 0..5000).await?;
    let c = connect(&s.pg.url()).await?;
    let row = c
        .query_one("SELECT count(DISTINCT kafka_partition), min(received_at) > '2025-01-01', count(*) FILTER (WHERE record_index = 6) FROM records", &[])
        .await?;
    assert_eq!(row.get::<_, i64>(0), 3, "rows carry their partition");
    assert!(row.get::<_, bool>(1), "received-at comes from the envelope");
    assert_eq!(row.get::<_, i64>(2), 5000 / 7, "index in the request");
    let positions: i64 = c
        .query_one("SELECT sum(next_offset)::bigint FROM spillway_offsets", &[])
        .await?
        .get(0);
    assert_eq!(
        positions,
        (5000 + 6) / 7,
        "stored positions are right after the last message"
    );
    assert_eq!(
        metric(&consumer, "spillway_consumer_rows_written_total")?,
        5000.0
    );
    stop(consumer).await
}

/// Fault: the postmaster is SIGKILLed while a COPY is in progress (the link to Postgres is
/// slowed to 2 MB/s so the COPY is long enough to catch), restarted 2 s later.
/// Invariant: every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_copy_and_restarted_loses_and_duplicates_nothing() -> Result<()> {
    let mut s = stack(2).await?;
    let (proxy, consumer, _) = consumer_mid_copy(&s, 1).await?;
    s.pg = blocking(move || s.pg.kill().map(|_| s.pg)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.pg = blocking(move || s.pg.restart().map(|_| s.pg)).await?;
    proxy.heal();
    wait_rows(&s.pg.url(), 20_000, Duration::from_secs(90)).await?;
    assert_exactly_once(&s.pg.url(), 0..20_000).await?;
    assert_eq!(metric(&consumer, "spillway_consumer_database_up")?, 1.0);
    stop(consumer).await
}

/// Fault: one backend is SIGKILLed during its COPY; Postgres then drops every connection and
/// recovers. Invariant: every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_crash_mid_copy_loses_and_duplicates_nothing() -> Result<()> {
    let mut s = stack(2).await?;
    let (proxy, consumer, pid) = consumer_mid_copy(&s, 2).await?;
    s.pg.crash_backend(pid)?;
    proxy.heal();
    wait_rows(&s.pg.url(), 20_000, Duration::from_secs(90)).await?;
    assert_exactly_once(&s.pg.url(), 0..20_000).await?;
    stop(consumer).await
}

/// Fault: Postgres SIGSTOPped for 4 s, twice the statement timeout, then resumed.
/// Invariant: every record exactly once; the consumer gave up on the hung flush and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_past_the_statement_timeout_loses_and_duplicates_nothing() -> Result<()> {
    let mut s = stack(2).await?;
    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.statement_timeout = Duration::from_secs(1);
    cfg.connect_timeout = Duration::from_secs(1);
    let consumer = start(cfg).await?;
    produce(&s.broker.bootstrap(), 0..2000, 10, &[]).await?;
    wait_rows(&s.pg.url(), 2000, Duration::from_secs(60)).await?;
    s.pg.pause()?;
    produce(&s.broker.bootstrap(), 2000..6000, 10, &[]).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    s.pg.resume()?;
    wait_rows(&s.pg.url(), 6000, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), 0..6000).await?;
    let retries = metric(&consumer, "spillway_consumer_flush_retries_total")?;
    ensure!(
        retries >= 1.0,
        "the hung flush should have been retried: {retries} retries"
    );
    stop(consumer).await
}

/// Runs the consumer binary on `s` with `extra` arguments until the failpoint SIGKILLs it
/// between its second Postgres commit and the Kafka commit, and checks that it did.
async fn killed_between_the_commits(s: &Stack, extra: &[&str]) -> Result<()> {
    let topic = match extra.contains(&"--topic") {
        true => &[][..],
        false => &["--topic", TOPIC][..],
    };
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_spillway-consumer"))
        .args(["--brokers", &s.broker.bootstrap()])
        .args(topic)
        .args(["--group", "consumers", "--database-url", &s.pg.url()])
        .args(["--listen", "127.0.0.1:0"])
        // The killed member leaves the group at once for the next consumer, not after 45 s.
        .args(["-X", "session.timeout.ms=6000"])
        .args(extra)
        .env(spillway_consumer::FAILPOINT_EXIT_AFTER_COMMITS, "2")
        .env("SPILLWAY_LOG", "warn")
        .status()
        .await?;
    use std::os::unix::process::ExitStatusExt;
    ensure!(
        status.signal() == Some(9),
        "the failpoint must have fired: {status}"
    );
    Ok(())
}

/// Fault: the consumer process is SIGKILLed right after a Postgres commit and before the Kafka commit
/// (failpoint), then a new consumer starts. Invariant: no duplicates, no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_the_postgres_and_kafka_commits_adds_no_duplicates() -> Result<()>
{
    let s = stack(1).await?;
    produce(&s.broker.bootstrap(), 0..3000, 5, &[]).await?;
    killed_between_the_commits(&s, &["--batch-max-records", "500"]).await?;
    let c = connect(&s.pg.url()).await?;
    let written: i64 = c
        .query_one("SELECT count(*) FROM records", &[])
        .await?
        .get(0);
    ensure!(
        written > 0 && written < 3000,
        "the crash should leave a partial table, got {written}"
    );
    let consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    wait_rows(&s.pg.url(), 3000, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), 0..3000).await?;
    stop(consumer).await
}

/// Writes one message per `(producer, sequence, ids)`, in this order, to a one-partition
/// topic, each a sequenced envelope (the producer's ids) holding the records of `ids`: the same
/// `(producer, sequence)` twice is what a producer's Kafka client leaves when it re-sends a
/// message whose answer was lost at a new epoch.
async fn produce_sequenced(
    bootstrap: &str,
    messages: &[(u64, u64, std::ops::Range<u64>)],
) -> Result<()> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?;
    for (producer, sequence, ids) in messages {
        let records: Vec<String> = ids.clone().map(|id| format!(r#"{{"id": {id}}}"#)).collect();
        let payload = Envelope {
            received_at_micros: 1_764_000_000_000_000,
            request_id: RequestId::sequenced(ProducerSequence {
                producer: *producer,
                sequence: *sequence,
            }),
            sequenced: true,
            idempotency_key: None,
            source: None,
            records: records.iter().map(|r| r.as_bytes()).collect(),
        }
        .encode();
        p.send(
            FutureRecord::<(), _>::to(TOPIC).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Fault: Kafka holds second copies of messages (a producer's client re-sent them after their
/// answers were lost), some read by the consumer that wrote the original, one by a new consumer
/// process after a restart; then an operator moves the position back to the start to write
/// everything again. Invariant: every record exactly once, after the rewind too (the stored
/// sequences, ahead of the position, do not skip what is replayed); each copy is counted as
/// skipped; another producer's lower sequence numbers are not copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_are_skipped_across_a_restart_and_a_rewind_writes_everything_again() -> Result<()> {
    const P: u64 = 0xA11CE;
    const Q: u64 = 0xB0B;
    let s = stack(1).await?;
    let bootstrap = s.broker.bootstrap();
    let mut first: Vec<(u64, u64, std::ops::Range<u64>)> =
        (0..10).map(|n| (P, n, n * 10..n * 10 + 10)).collect();
    // Copies of 3 and 7, each after later messages of its producer, then one more message so
    // that its rows show the copies were read.
    first.extend([(P, 3, 30..40), (P, 7, 70..80), (P, 10, 100..110)]);
    produce_sequenced(&bootstrap, &first).await?;
    let consumer = start(settings(&bootstrap, &s.pg.url())).await?;
    wait_rows(&s.pg.url(), 110, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), 0..110).await?;
    let skipped = metric(&consumer, "spillway_consumer_copies_skipped_total")?;
    ensure!(skipped == 2.0, "{skipped} copies skipped, 2 expected");
    stop(consumer).await?;

    // The new process knows the highest sequence only from what Postgres stored.
    produce_sequenced(
        &bootstrap,
        &[(P, 5, 50..60), (Q, 0, 200..205), (P, 11, 110..120)],
    )
    .await?;
    let consumer = start(settings(&bootstrap, &s.pg.url())).await?;
    wait_rows(&s.pg.url(), 125, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), (0..120).chain(200..205)).await?;
    let skipped = metric(&consumer, "spillway_consumer_copies_skipped_total")?;
    ensure!(
        skipped == 1.0,
        "{skipped} copies skipped after the restart, 1 expected"
    );
    stop(consumer).await?;
    let c = connect(&s.pg.url()).await?;
    let stored: BTreeMap<i64, i64> = c
        .query(
            "SELECT producer, sequence FROM spillway_producer_sequences",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        stored == BTreeMap::from([(P as i64, 11), (Q as i64, 0)]),
        "stored sequences: {stored:?}"
    );

    // An operator writes the partition again from its start.
    c.batch_execute(
        "TRUNCATE records; UPDATE spillway_offsets SET next_offset = 0, next_index = 0",
    )
    .await?;
    let consumer = start(settings(&bootstrap, &s.pg.url())).await?;
    wait_rows(&s.pg.url(), 125, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), (0..120).chain(200..205)).await?;
    let skipped = metric(&consumer, "spillway_consumer_copies_skipped_total")?;
    ensure!(
        skipped == 3.0,
        "{skipped} copies skipped on the way again, 3 expected"
    );
    stop(consumer).await
}

/// Fault: a second consumer joins the group mid-stream (rebalance), then the first stops.
/// Invariant: every record exactly once; both consumers wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_with_a_rebalance_in_the_middle_lose_and_duplicate_nothing() -> Result<()> {
    let s = stack(4).await?;
    let bootstrap = s.broker.bootstrap();
    let a = start(settings(&bootstrap, &s.pg.url())).await?;
    produce(&bootstrap, 0..4000, 4, &[]).await?;
    wait_rows(&s.pg.url(), 4000, Duration::from_secs(60)).await?;
    let b = start(settings(&bootstrap, &s.pg.url())).await?;
    let producing = {
        let bootstrap = bootstrap.clone();
        tokio::spawn(async move {
            for k in 0..8u64 {
                produce(&bootstrap, 4000 + k * 1000..5000 + k * 1000, 4, &[]).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    wait_until_it_writes(&b).await?;
    stop(a).await?;
    producing.await??;
    wait_rows(&s.pg.url(), 12_000, Duration::from_secs(90)).await?;
    assert_exactly_once(&s.pg.url(), 0..12_000).await?;
    stop(b).await
}

/// Fault: records Postgres rejects (a NUL character jsonb cannot hold) and messages that are
/// not envelopes, mixed into the stream. Invariant: they are dead letters with a reason, every
/// other record is in the table, nothing stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_undecodable_messages_become_dead_letters_while_the_rest_flows() -> Result<()> {
    let s = stack(2).await?;
    let bad = [17, 18, 500, 1999];
    produce(&s.broker.bootstrap(), 0..2000, 10, &bad).await?;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", s.broker.bootstrap())
        .create()?;
    p.send(
        FutureRecord::<(), _>::to(TOPIC).payload(r#"{"not": "an envelope"}"#),
        Duration::from_secs(5),
    )
    .await
    .map_err(|(e, _)| e)?;
    let consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    wait_rows(
        &s.pg.url(),
        2000 - bad.len() as i64,
        Duration::from_secs(60),
    )
    .await?;
    assert_exactly_once(&s.pg.url(), (0..2000).filter(|i| !bad.contains(i))).await?;
    let c = connect(&s.pg.url()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let rows = c.query("SELECT raw, error FROM records_dead_letters ORDER BY kafka_partition, kafka_offset, record_index", &[]).await?;
        if rows.len() > bad.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        dead.len(),
        bad.len() + 1,
        "each bad record and the undecodable message, once"
    );
    for r in &dead {
        let (raw, error): (String, String) = (r.get(0), r.get(1));
        if raw.contains("not") {
            assert!(error.contains("not a Spillway envelope"), "{error}");
        } else {
            assert!(
                error.contains("22P05") || error.contains("unsupported Unicode"),
                "{error}"
            );
            assert!(raw.contains("\\u0000"), "the raw record is kept: {raw}");
        }
    }
    stop(consumer).await
}

/// Fault: Postgres down while 20,000 records arrive, with a 2,000-record buffer.
/// Invariant: the buffer never exceeds its bound (Kafka is paused instead), and after the
/// restart every record lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_the_buffer_stays_bounded_and_everything_drains_after() -> Result<()>
{
    let mut s = stack(2).await?;
    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.batcher.capacity_records = 2000;
    cfg.batcher.capacity_bytes = 4 << 20;
    cfg.batcher.max_batch_bytes = 1 << 20;
    let consumer = start(cfg).await?;
    // First let the consumer join and read its positions, then take Postgres away.
    produce(&s.broker.bootstrap(), 0..1000, 10, &[]).await?;
    wait_rows(&s.pg.url(), 1000, Duration::from_secs(60)).await?;
    s.pg = blocking(move || s.pg.kill().map(|_| s.pg)).await?;
    produce(&s.broker.bootstrap(), 1000..20_000, 10, &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&consumer, "spillway_consumer_kafka_paused")? != 1.0 {
        ensure!(
            consumer.metrics().buffered_records() <= 2000,
            "buffer over its bound"
        );
        ensure!(Instant::now() < deadline, "Kafka was never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..50 {
        ensure!(
            consumer.metrics().buffered_records() <= 2000,
            "buffer over its bound while paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.pg = blocking(move || s.pg.restart().map(|_| s.pg)).await?;
    wait_rows(&s.pg.url(), 20_000, Duration::from_secs(90))
        .await
        .context("draining after the outage")?;
    assert_exactly_once(&s.pg.url(), 0..20_000).await?;
    stop(consumer).await
}

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let answer = spillway_harness::http::HttpClient::new()
        .get(&format!("http://{addr}{path}"))
        .await?;
    Ok((answer.status, answer.body))
}

/// A plain librdkafka member of the consumers' group that takes partitions and writes nothing,
/// polling on its own thread until dropped.
struct SilentMember {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    assigned: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentMember {
    fn join(bootstrap: &str) -> Result<Self> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "consumers")
            // Member ids start with the client id and the range assignor gives the partition to
            // the first member id in order: this one.
            .set("client.id", "aaa-silent-member")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()?;
        consumer.subscribe(&[TOPIC])?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let assigned = std::sync::Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), assigned.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
                let n = consumer.assignment().map(|t| t.count()).unwrap_or(0);
                a.store(n, Ordering::Relaxed);
            }
            consumer.unsubscribe();
            let _ = consumer.poll(Duration::from_millis(100));
        });
        Ok(SilentMember {
            stop,
            thread: Some(thread),
            assigned,
        })
    }

    fn assigned(&self) -> usize {
        self.assigned.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SilentMember {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Regression (bug 2): a fatal error (the records table dropped under load) ends the consumer;
/// it used to hang joining a Kafka thread blocked on the full channel, while /healthz said
/// "alive". Invariant: it stops within a bound, says why, and /healthz answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_under_load_stops_the_consumer_and_healthz_says_so() -> Result<()> {
    let s = stack(1).await?;
    produce(&s.broker.bootstrap(), 0..20_000, 10, &[]).await?;
    let mut consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&consumer, "spillway_consumer_rows_written_total")? < 1.0 {
        ensure!(Instant::now() < deadline, "nothing was written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    connect(&s.pg.url())
        .await?
        .batch_execute("DROP TABLE records")
        .await?;
    let ended = tokio::time::timeout(Duration::from_secs(30), consumer.finished())
        .await
        .context("the consumer did not stop within 30 s of a fatal error")?;
    let err = ended.expect_err("a dropped table is fatal");
    ensure!(err.to_string().contains("42P01"), "says why: {err}");
    let (status, body) = get(consumer.addr(), "/healthz").await?;
    ensure!(
        status == 503 && body.contains("42P01"),
        "/healthz: {status} {body}"
    );
    let (status, _) = get(consumer.addr(), "/readyz").await?;
    ensure!(status == 503, "/readyz: {status}");
    Ok(())
}

/// Regression (bug 4): Postgres refuses the dead-letter insert (a check constraint someone
/// added). The rows are not at fault: the batch waits and retries, and no good record is ever
/// dead-lettered in place of the bad one. Invariant: after the constraint goes, every good
/// record is in the table exactly once and only the bad one is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_insert_never_dead_letters_a_good_record() -> Result<()> {
    let s = stack(1).await?;
    let consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    produce(&s.broker.bootstrap(), 0..10, 10, &[]).await?;
    wait_rows(&s.pg.url(), 10, Duration::from_secs(60)).await?;
    let c = connect(&s.pg.url()).await?;
    c.batch_execute(
        "ALTER TABLE records_dead_letters ADD CONSTRAINT refuse_all CHECK (false) NOT VALID",
    )
    .await?;
    produce(&s.broker.bootstrap(), 10..110, 10, &[55]).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&consumer, "spillway_consumer_flush_retries_total")? < 3.0 {
        ensure!(
            Instant::now() < deadline,
            "the refused insert was never retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("ALTER TABLE records_dead_letters DROP CONSTRAINT refuse_all")
        .await?;
    wait_rows(&s.pg.url(), 109, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), (0..110).filter(|i| *i != 55)).await?;
    let dead: Vec<String> = c
        .query("SELECT raw FROM records_dead_letters", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        dead.len() == 1 && dead[0].contains("\"id\": 55"),
        "only the bad record is a dead letter: {dead:?}"
    );
    stop(consumer).await
}

/// Regression (bug 5): the first two flush tasks panic (failpoint). Their batches used to stay
/// in flight forever. Invariant: they are retried and every record lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_task_that_panics_is_retried() -> Result<()> {
    let s = stack(1).await?;
    produce(&s.broker.bootstrap(), 0..2000, 10, &[]).await?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spillway-consumer"))
        .args(["--brokers", &s.broker.bootstrap(), "--topic", TOPIC])
        .args(["--database-url", &s.pg.url(), "--listen", "127.0.0.1:0"])
        .env(spillway_consumer::FAILPOINT_PANIC_FLUSHES, "2")
        .env("SPILLWAY_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let written = wait_rows(&s.pg.url(), 2000, Duration::from_secs(60)).await;
    child.kill().await?;
    written?;
    assert_exactly_once(&s.pg.url(), 0..2000).await
}

/// Regression (bug 6): one pooled connection for four partitions, on a link slow enough that a
/// flush waits longer for the connection than the flush deadline. Waiting for a connection is
/// not an outage. Invariant: no flush times out or is retried; everything lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_pooled_connection_is_not_a_postgres_outage() -> Result<()> {
    let s = stack(4).await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], s.pg.port())), 6).await?;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    produce(&s.broker.bootstrap(), 0..8000, 10, &[]).await?;
    let mut cfg = settings(&s.broker.bootstrap(), &url);
    cfg.pool_size = 1;
    cfg.statement_timeout = Duration::from_millis(1500);
    cfg.connect_timeout = Duration::from_millis(500);
    cfg.batcher.size.min_records = 1000;
    cfg.batcher.size.initial_records = 1000;
    // ~200 KB per flush at 200 KB/s: each flush takes about 1 s of the 2 s deadline, and each
    // partition waits about 3 s for the connection.
    proxy.set(Faults {
        bandwidth: Some(200 << 10),
        ..Faults::default()
    });
    let consumer = start(cfg).await?;
    wait_rows(&s.pg.url(), 8000, Duration::from_secs(120)).await?;
    assert_exactly_once(&s.pg.url(), 0..8000).await?;
    ensure!(
        metric(&consumer, "spillway_consumer_flush_retries_total")? == 0.0,
        "a flush waiting for the pool was taken for an outage:\n{}",
        consumer.metrics().registry.render()?
    );
    stop(consumer).await
}

/// Regression (bug 7): Postgres is down while a rebalance asks for stored positions. The
/// position reads used to block the event loop, so a shutdown was never handled.
/// Invariant: the shutdown completes within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_handled_while_postgres_is_down_during_a_rebalance() -> Result<()> {
    let mut s = stack(2).await?;
    let consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    produce(&s.broker.bootstrap(), 0..100, 10, &[]).await?;
    wait_rows(&s.pg.url(), 100, Duration::from_secs(60)).await?;
    s.pg = blocking(move || s.pg.kill().map(|_| s.pg)).await?;
    let other = SilentMember::join(&s.broker.bootstrap())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while other.assigned() == 0 {
        ensure!(Instant::now() < deadline, "the rebalance never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(Duration::from_secs(20), consumer.shutdown())
        .await
        .context("the shutdown hung while Postgres was down during a rebalance")??;
    drop(other);
    Ok(())
}

/// Regression (bug 9): another member of the group holds the only partition and writes
/// nothing, so this consumer owns nothing while records wait. Invariant: it notices (metric,
/// /readyz 503, a rejoin) within a bound, and once the other member leaves, it writes
/// everything exactly once and is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_owning_nothing_while_records_wait_rejoins_and_is_not_ready() -> Result<()> {
    let s = stack(1).await?;
    let other = SilentMember::join(&s.broker.bootstrap())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while other.assigned() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the silent member never got the partition"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.orphan_timeout = Duration::from_secs(3);
    cfg.rdkafka
        .push(("client.id".into(), "zzz-spillway".into()));
    let consumer = start(cfg).await?;
    produce(&s.broker.bootstrap(), 0..100, 10, &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(consumer.addr(), "/readyz").await?;
        if status == 503 && body.contains("owns no partition") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "never reported owning nothing: /readyz {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(metric(&consumer, "spillway_consumer_rejoins_total")? >= 1.0);
    drop(other);
    wait_rows(&s.pg.url(), 100, Duration::from_secs(60)).await?;
    assert_exactly_once(&s.pg.url(), 0..100).await?;
    ensure!(metric(&consumer, "spillway_consumer_assigned_partitions")? == 1.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(consumer.addr(), "/readyz").await?.0 != 200 {
        ensure!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(consumer).await
}

/// Sends each of `messages` as one envelope (one request), with a key, a timestamp and a
/// header, as a client of the producer would have; request ids are 1, 2, ...
async fn produce_typed(bootstrap: &str, messages: &[Vec<String>]) -> Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?;
    for (n, records) in messages.iter().enumerate() {
        let env = Envelope {
            received_at_micros: 1_764_000_000_000_000 + n as i64,
            request_id: RequestId::from_u128(n as u128 + 1),
            sequenced: false,
            idempotency_key: None,
            source: None,
            records: records.iter().map(|r| r.as_bytes()).collect(),
        };
        let payload = env.encode();
        let key = format!("key-{n}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "trace",
            value: Some(format!("t{n}").as_bytes()),
        });
        p.send(
            FutureRecord::to(TOPIC)
                .key(&key)
                .payload(&payload)
                .headers(headers)
                .timestamp(1_764_000_000_000 + n as i64),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Waits until the stored positions of the (one-partition) topic reach `messages`: every
/// record before is written or dead-lettered, in the same transactions as the positions.
async fn wait_written(url: &str, messages: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = -1;
    loop {
        if let Ok(c) = connect(url).await {
            if let Ok(row) = c
                .query_one(
                    "SELECT coalesce(max(next_offset), 0) FROM spillway_offsets",
                    &[],
                )
                .await
            {
                last = row.get::<_, i64>(0);
                if last >= messages {
                    return Ok(());
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the position is at message {last} of {messages} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn typed(brokers: &str, url: &str, columns: &[&str], keep_data: bool) -> Settings {
    let mut s = settings(brokers, url);
    let specs = columns.iter().map(|c| c.parse().unwrap()).collect();
    s.mapping = spillway_core::Mapping::new(specs, keep_data).unwrap();
    s
}

/// Each type's column is created with its Postgres type and holds the converted value; the
/// metadata columns hold the envelope's and the Kafka message's; a record with a value that
/// does not convert, or without a NOT NULL field, is dead-lettered with the column and the
/// reason while the records beside it, in the same request, are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_columns_land_with_their_types_and_bad_values_become_dead_letters() -> Result<()> {
    let s = stack(1).await?;
    let columns = [
        "id:bigint!=/id",
        "name:text=/user/name",
        "at:timestamptz=/at",
        "at_ms:timestamptz(ms)=/ms",
        "score:double precision=/score",
        "amount:numeric=/amount",
        "ok:boolean=/ok",
        "day:date=/day",
        "uid:uuid=/uid",
        "doc:jsonb=/doc",
        "tags:text[]=/tags",
        "small:smallint=/small",
        "second_tag:text=/tags/1",
        "rid:text=@request_id",
        "received:timestamptz=@received_at",
        "k:text=@kafka_key",
        "kt:timestamptz=@kafka_timestamp",
        "h:jsonb=@headers",
        "p:integer=@kafka_partition",
        "o:bigint=@kafka_offset",
        "i:integer=@record_index",
    ];
    let good = |id: u64| {
        format!(
            r#"{{"id": {id}, "user": {{"name": "n{id}"}}, "at": "2026-11-27T16:03:18.123456+01:00", "ms": 1764000000123,
                "score": 1.5, "amount": 12345.678900, "ok": true, "day": "2026-02-28",
                "uid": "3F2504E0-4F89-11D3-9A0C-0305E82C3301", "doc": {{"a": [1, 2]}}, "tags": ["x", null, "z"], "small": -7}}"#
        )
    };
    let messages = vec![
        vec![good(1), r#"{"id": "2"}"#.to_string(), good(3)],
        vec![
            r#"{"user": {"name": "no id"}}"#.to_string(),
            good(5),
            r#"{"id": 6, "small": 40000}"#.to_string(),
        ],
        vec![r#"{"id": 7}"#.to_string()],
    ];
    produce_typed(&s.broker.bootstrap(), &messages).await?;
    let url = s.pg.url();
    let consumer = start(typed(&s.broker.bootstrap(), &url, &columns, true)).await?;
    wait_written(&url, messages.len() as i64).await?;
    let c = connect(&url).await?;

    let types: BTreeMap<String, String> = c
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_name = 'records'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (column, ty) in [
        ("id", "bigint"),
        ("name", "text"),
        ("at", "timestamp with time zone"),
        ("at_ms", "timestamp with time zone"),
        ("score", "double precision"),
        ("amount", "numeric"),
        ("ok", "boolean"),
        ("day", "date"),
        ("uid", "uuid"),
        ("doc", "jsonb"),
        ("tags", "ARRAY"),
        ("small", "smallint"),
        ("data", "jsonb"),
    ] {
        assert_eq!(types.get(column).map(String::as_str), Some(ty), "{column}");
    }

    c.batch_execute("SET TIME ZONE 'UTC'").await?;
    let got = c
        .query_one(
            "SELECT name, at::text, at_ms::text, score, amount::text, ok, day::text, uid::text, doc::text,
                    tags::text, small, second_tag, rid, received::text, k, kt::text, h::text, p, o, i, data->>'id'
             FROM records WHERE id = 1",
            &[],
        )
        .await?;
    assert_eq!(got.get::<_, String>(0), "n1");
    assert_eq!(got.get::<_, String>(1), "2026-11-27 15:03:18.123456+00");
    assert_eq!(got.get::<_, String>(2), "2025-11-24 16:00:00.123+00");
    assert_eq!(got.get::<_, f64>(3), 1.5);
    assert_eq!(got.get::<_, String>(4), "12345.678900");
    assert!(got.get::<_, bool>(5));
    assert_eq!(got.get::<_, String>(6), "2026-02-28");
    assert_eq!(
        got.get::<_, String>(7),
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    );
    assert_eq!(got.get::<_, String>(8), r#"{"a": [1, 2]}"#);
    assert_eq!(got.get::<_, String>(9), "{x,NULL,z}");
    assert_eq!(got.get::<_, i16>(10), -7);
    assert_eq!(got.get::<_, Option<String>>(11), None, "tags/1 is null");
    assert_eq!(got.get::<_, String>(12), format!("{:032x}", 1));
    assert_eq!(got.get::<_, String>(13), "2025-11-24 16:00:00+00");
    assert_eq!(got.get::<_, String>(14), "key-0");
    assert_eq!(got.get::<_, String>(15), "2025-11-24 16:00:00+00");
    assert_eq!(got.get::<_, String>(16), r#"{"trace": "t0"}"#);
    assert_eq!(got.get::<_, i32>(17), 0);
    assert_eq!(got.get::<_, i64>(18), 0);
    assert_eq!(got.get::<_, i32>(19), 0);
    assert_eq!(got.get::<_, String>(20), "1");

    let ids: Vec<i64> = c
        .query("SELECT id FROM records ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ids,
        [1, 3, 5, 7],
        "the neighbours of each bad record are written"
    );
    let partial = c
        .query_one("SELECT name, small, o, i FROM records WHERE id = 7", &[])
        .await?;
    assert_eq!(partial.get::<_, Option<String>>(0), None, "missing → NULL");
    assert_eq!(partial.get::<_, Option<i16>>(1), None);
    assert_eq!((partial.get::<_, i64>(2), partial.get::<_, i32>(3)), (2, 0));

    let dead: Vec<(i64, i32, String, String)> = c
        .query(
            "SELECT kafka_offset, record_index, raw, error FROM records_dead_letters ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        dead.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [(0, 1), (1, 0), (1, 2)],
        "{dead:?}"
    );
    let why = |i: usize| dead[i].3.as_str();
    for part in [
        "column id",
        "bigint",
        "/id",
        "\"2\"",
        "strings are not converted",
    ] {
        assert!(why(0).contains(part), "{part} in {}", why(0));
    }
    assert!(
        why(1).contains("column id") && why(1).contains("required (NOT NULL) but is missing"),
        "{}",
        why(1)
    );
    assert!(
        why(2).contains("column small") && why(2).contains("out of range for smallint"),
        "{}",
        why(2)
    );
    assert_eq!(dead[0].2, r#"{"id": "2"}"#, "the raw record is kept");
    assert_eq!(
        metric(&consumer, "spillway_consumer_dead_letters_total")?,
        3.0
    );
    stop(consumer).await
}

/// The table follows the mapping: a column added to it is added to the table on the next
/// start (older rows NULL), a column whose type differs stops the start with what to do, and
/// so does dropping `data` from a table whose `data` is NOT NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_table_follows_the_mapping_and_a_type_conflict_refuses_to_start() -> Result<()> {
    let s = stack(1).await?;
    let (brokers, url) = (s.broker.bootstrap(), s.pg.url());
    produce_typed(&brokers, &[vec![r#"{"id": 1, "v": "a"}"#.into()]]).await?;
    let consumer = start(typed(&brokers, &url, &["id:bigint=/id"], true)).await?;
    wait_written(&url, 1).await?;
    stop(consumer).await?;

    produce_typed(&brokers, &[vec![r#"{"id": 2, "v": "b"}"#.into()]]).await?;
    let consumer = start(typed(&brokers, &url, &["id:bigint=/id", "v:text=/v"], true)).await?;
    wait_written(&url, 2).await?;
    stop(consumer).await?;
    let c = connect(&url).await?;
    let rows: Vec<(i64, Option<String>)> = c
        .query("SELECT id, v FROM records ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [(1, None), (2, Some("b".to_string()))]);

    let refused = start(typed(&brokers, &url, &["id:text=/id"], true))
        .await
        .err()
        .context("a consumer whose mapping retypes a column must not start")?
        .to_string();
    for part in [
        "column \"id\" of \"records\" is bigint, but the mapping id:text=/id makes it text",
        "never retypes",
        "has written nothing",
    ] {
        assert!(refused.contains(part), "{part} in {refused}");
    }
    let refused = start(typed(&brokers, &url, &["id:bigint=/id"], false))
        .await
        .err()
        .context("dropping data from a NOT NULL data column must not start")?
        .to_string();
    assert!(refused.contains("DROP NOT NULL"), "{refused}");
    let columns: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'records'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(columns, 7, "nothing was added, dropped or retyped");
    Ok(())
}

/// `--keep-data false`: a new table has no `data` column, and the rows hold only their
/// coordinates and mapped columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_keep_data_false_creates_and_writes_no_data_column() -> Result<()> {
    let s = stack(1).await?;
    let (brokers, url) = (s.broker.bootstrap(), s.pg.url());
    let records: Vec<String> = (0..50).map(|i| format!(r#"{{"id": {i}}}"#)).collect();
    produce_typed(&brokers, &[records]).await?;
    let consumer = start(typed(&brokers, &url, &["id:bigint!=/id"], false)).await?;
    wait_written(&url, 1).await?;
    let c = connect(&url).await?;
    let columns: Vec<String> = c
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'records' ORDER BY ordinal_position",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "kafka_partition",
            "kafka_offset",
            "record_index",
            "received_at",
            "id"
        ]
    );
    let row = c
        .query_one("SELECT count(*), sum(id)::bigint FROM records", &[])
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (50, 49 * 50 / 2)
    );
    stop(consumer).await
}
