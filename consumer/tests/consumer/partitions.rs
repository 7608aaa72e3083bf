//! Time partitions (`--partition-by`) on a real Postgres and broker, with the real clock: the
//! expectations are computed from the core's own functions at the time of each check, so the
//! tests hold at any time of day (an hour or a day may turn while one runs).

use std::collections::BTreeSet;

use super::*;
use spillway_consumer::partitions::now_micros;
use spillway_consumer::pg::TableName;
use spillway_core::partitions::Range;
use spillway_core::{Interval, Mapping, Partitioning, Retention, Upsert};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;

/// Sends each `(received_at, records)` as one envelope whose request the producer received at
/// that instant (µs since the Unix epoch).
async fn produce_at(bootstrap: &str, messages: &[(i64, Vec<String>)]) -> Result<()> {
    let messages = messages.iter().enumerate().map(|(n, (at, records))| {
        let env = Envelope {
            received_at_micros: *at,
            request_id: RequestId::from_u128(n as u128 + 1),
            sequenced: false,
            idempotency_key: None,
            source: None,
            records: records.iter().map(|r| r.as_bytes()).collect(),
        };
        (format!("{n}-{}", fastrand_key()), env.encode())
    });
    send_all(bootstrap, TOPIC, messages).await
}

/// The partitions of `table` by name.
async fn partition_names(c: &tokio_postgres::Client, table: &str) -> Result<BTreeSet<String>> {
    let rows = c
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = $1::text::regclass",
            &[&table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Waits until `table` has the partitions `p` wants now (`now` read at each try: a turn of the
/// interval moves them, and the next round creates the new one).
async fn wait_wanted(c: &tokio_postgres::Client, table: &str, p: &Partitioning) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names = partition_names(c, table).await?;
        let missing: Vec<String> = p
            .wanted(now_micros())
            .into_iter()
            .map(|r| p.partition_name(table, r))
            .filter(|n| !names.contains(n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{table} lacks the wanted partitions {missing:?}; it has {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` holds of the partition names, within 20 s.
async fn wait_names(
    c: &tokio_postgres::Client,
    what: &str,
    check: impl Fn(&BTreeSet<String>) -> bool,
) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names = partition_names(c, "records").await?;
        if check(&names) {
            return Ok(names);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: the partitions are {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn range_of(p: &Partitioning, at: i64) -> Range {
    p.interval().containing(at).unwrap()
}

/// Fault: none; the clock and the catalog move under the traffic. A consumer partitioning
/// `records` by `received_at`, hourly, keeping 6 h, checking every 500 ms, gets 200 messages
/// (600 records) over a few seconds: most received now, some 2 h ago (a backlog: an hour
/// with no partition, inside the retention), some 30 h ahead (past the day of partitions
/// made ahead: a clock jump) and some 10 h ago (past the retention). Meanwhile an old
/// partition with rows is attached (far past the retention) and a partition made ahead is
/// dropped by hand. Invariant: the old partition is dropped and the other one made again
/// while the traffic flows; the hour of now and a day ahead exist; every record is in the
/// table exactly once, each in the partition of its hour (created before the flush that
/// needed it), except the ones older than the retention, which are in the default
/// partition. No randomness (Kafka keys only spread the messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_created_ahead_and_dropped_past_the_retention_while_traffic_flows(
) -> Result<()> {
    let s = stack(2).await?;
    let (brokers, url) = (s.broker.bootstrap(), s.pg.url());
    let hourly = || {
        Partitioning::new(
            "received_at",
            Interval::Hour,
            Some(Retention::parse("6h").unwrap()),
            &Mapping::default(),
        )
        .unwrap()
    };
    let p = hourly();
    let mut cfg = settings(&brokers, &url);
    cfg.partitioning = Some(hourly());
    cfg.partition_check_every = Duration::from_millis(500);
    let consumer = start(cfg).await?;
    let c = connect(&url).await?;
    wait_wanted(&c, "records", &p).await?;
    ensure!(
        partition_names(&c, "records")
            .await?
            .contains("records_default"),
        "the default partition is there"
    );

    // The traffic: message m holds records 3m..3m+3.
    const MESSAGES: u64 = 200;
    let offset_of = |m: u64| match m % 20 {
        5 => -2 * HOUR,
        10 => 30 * HOUR,
        15 => -10 * HOUR,
        _ => 0,
    };
    let traffic = {
        let brokers = brokers.clone();
        tokio::spawn(async move {
            for chunk in 0..MESSAGES / 10 {
                let messages: Vec<(i64, Vec<String>)> = (chunk * 10..(chunk + 1) * 10)
                    .map(|m| {
                        let records = (3 * m..3 * m + 3)
                            .map(|id| format!(r#"{{"id":{id}}}"#))
                            .collect();
                        (now_micros() + offset_of(m), records)
                    })
                    .collect();
                produce_at(&brokers, &messages).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    };

    // An old partition with rows, past the retention, is dropped while the traffic flows.
    let old = range_of(&p, now_micros() - 30 * DAY);
    let old_name = p.partition_name("records", old);
    c.batch_execute(&format!(
        "CREATE TABLE {old_name} (LIKE records INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         INSERT INTO {old_name} SELECT 0, g, 0, {lo}::timestamptz + g * interval '1 s', '{{\"old\":true}}'
             FROM generate_series(0, 4) g;
         ALTER TABLE records ATTACH PARTITION {old_name} FOR VALUES FROM ({lo}) TO ({hi});",
        lo = p.bound_literal(old.from),
        hi = p.bound_literal(old.to),
    ))
    .await?;
    wait_names(&c, "the old partition is dropped", |n| {
        !n.contains(&old_name)
    })
    .await?;
    // A partition made ahead, dropped by hand, is made again on the timer.
    let far = p.partition_name("records", p.wanted(now_micros())[2]);
    c.batch_execute(&format!("DROP TABLE {far}")).await?;
    wait_names(&c, "the partition dropped by hand is made again", |n| {
        n.contains(&far)
    })
    .await?;
    ensure!(
        !traffic.is_finished(),
        "the traffic should still flow while the partitions change"
    );
    traffic.await??;

    wait_rows(&url, 3 * MESSAGES as i64, Duration::from_secs(60)).await?;
    assert_exactly_once(&url, 0..3 * MESSAGES).await?;
    wait_wanted(&c, "records", &p).await?;
    let rows = c
        .query(
            "SELECT tableoid::regclass::text, (extract(epoch FROM received_at) * 1000000)::bigint,
                    (data->>'id')::bigint
             FROM records",
            &[],
        )
        .await?;
    let now = now_micros();
    let mut misplaced = vec![];
    for r in &rows {
        let (partition, at, id): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let range = range_of(&p, at);
        // The 10 h old records were past the retention when written (and still are).
        let want = if p.expired(range, now) {
            "records_default".to_string()
        } else {
            p.partition_name("records", range)
        };
        if partition != want {
            misplaced.push((id, partition, want));
        }
    }
    ensure!(
        misplaced.is_empty(),
        "rows outside their partition (id, in, want), first 10: {:?}",
        &misplaced[..misplaced.len().min(10)]
    );
    let in_default = rows
        .iter()
        .filter(|r| r.get::<_, String>(0) == "records_default")
        .count();
    ensure!(
        in_default == 30,
        "the 10 messages 10 h old, 30 records, are in the default partition: {in_default}"
    );
    let created = metric(&consumer, "spillway_consumer_partitions_created_total")?;
    let dropped = metric(&consumer, "spillway_consumer_partitions_dropped_total")?;
    // The hour of now and the day ahead (24 or 25), 2 h ago, 30 h ahead, the one dropped by
    // hand again.
    ensure!(created >= 27.0, "{created} partitions created");
    ensure!(dropped >= 1.0, "{dropped} partitions dropped");
    ensure!(
        metric(
            &consumer,
            "spillway_consumer_partition_change_seconds_count"
        )? >= 7.0,
        "each change is timed"
    );
    stop(consumer).await
}

/// Fault: rows Postgres routes to the default partition, and a partition whose range the
/// default partition already holds rows of. A table written by key `(id, at)` and
/// partitioned by its event time `at` (daily) gets each key twice: at now, tomorrow, three
/// days ago and in forty days. Invariant: the key's last record wins; rows of now and
/// tomorrow are in their partitions, the rest (no partition made for them) in the default
/// one, which the gauge counts; the unique index lives on the partitioned table. Then the
/// farthest partition made ahead is dropped by hand and a row of its range written: the
/// consumer cannot make it again (it says so and counts it), keeps the row where it is and
/// keeps writing. No randomness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_time_table_written_by_key_keeps_rows_outside_its_partitions_in_the_default(
) -> Result<()> {
    let s = stack(1).await?;
    let (brokers, url) = (s.broker.bootstrap(), s.pg.url());
    let mapping = Mapping::new(
        vec![
            "id:bigint=/id".parse().unwrap(),
            "at:timestamptz(ms)=/at".parse().unwrap(),
            "v:text=/v".parse().unwrap(),
        ],
        true,
    )
    .unwrap()
    .with_upsert(Upsert {
        key: vec!["id".into(), "at".into()],
        on_conflict: Default::default(),
        delete_when: None,
    })
    .unwrap();
    let p = Partitioning::new("at", Interval::Day, None, &mapping).unwrap();
    let mut cfg = settings(&brokers, &url);
    cfg.mapping = mapping;
    cfg.partitioning = Some(p.clone());
    cfg.partition_check_every = Duration::from_millis(500);
    let consumer = start(cfg).await?;
    let c = connect(&url).await?;
    wait_wanted(&c, "records", &p).await?;

    let now = now_micros();
    let at_of = |id: i64| {
        now + match id % 4 {
            0 => 0,
            1 => DAY,
            2 => -3 * DAY,
            _ => 40 * DAY,
        }
    };
    let message = |v: &str| -> Vec<String> {
        (0..40)
            .map(|id| format!(r#"{{"id":{id},"at":{},"v":"{v}"}}"#, at_of(id) / 1000))
            .collect()
    };
    produce_at(&brokers, &[(now, message("a")), (now, message("b"))]).await?;
    wait_written(&url, 2).await?;
    let rows = c
        .query(
            "SELECT tableoid::regclass::text, id, (extract(epoch FROM at) * 1000000)::bigint, v
             FROM records",
            &[],
        )
        .await?;
    ensure!(rows.len() == 40, "one row per key: {} rows", rows.len());
    for r in &rows {
        let (partition, id, at, v): (String, i64, i64, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        ensure!(at == at_of(id) / 1000 * 1000, "id {id}: at {at}");
        ensure!(v == "b", "id {id}: the key's last record wins, got {v}");
        let want = match id % 4 {
            0 | 1 => p.partition_name("records", range_of(&p, at)),
            _ => "records_default".into(),
        };
        ensure!(partition == want, "id {id} is in {partition}, not {want}");
    }
    let unique_on_parent: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index
             WHERE indrelid = 'records'::regclass AND indisunique)",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        unique_on_parent,
        "the key's unique index is the partitioned table's"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&consumer, "spillway_consumer_default_partition_rows")? != 20.0 {
        ensure!(
            Instant::now() < deadline,
            "the default partition's rows are never counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A row of the farthest partition's range in the default partition blocks that partition.
    let failures = metric(&consumer, "spillway_consumer_partition_failures_total")?;
    let far = p.wanted(now_micros())[2];
    let far_name = p.partition_name("records", far);
    c.batch_execute(&format!(
        "DROP TABLE {far_name};
         INSERT INTO records (kafka_partition, kafka_offset, record_index, received_at, data, id, at, v)
         VALUES (-1, 0, 0, now(), '{{}}', -1, {}, 'by hand')",
        p.bound_literal(far.from)
    ))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&consumer, "spillway_consumer_partition_failures_total")? < failures + 2.0 {
        ensure!(
            Instant::now() < deadline,
            "the refused partition is never counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        !partition_names(&c, "records").await?.contains(&far_name),
        "{far_name} cannot be made while the default partition holds rows of its range"
    );
    let where_: String = c
        .query_one(
            "SELECT tableoid::regclass::text FROM records WHERE id = -1",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        where_ == "records_default",
        "the row stays in the default partition: {where_}"
    );
    // The consumer keeps writing.
    let more: Vec<String> = (100..110)
        .map(|id| format!(r#"{{"id":{id},"at":{},"v":"c"}}"#, now_micros() / 1000))
        .collect();
    produce_at(&brokers, &[(now_micros(), more)]).await?;
    wait_written(&url, 3).await?;
    let n: i64 = c
        .query_one("SELECT count(*) FROM records WHERE id >= 100", &[])
        .await?
        .get(0);
    ensure!(n == 10, "{n} of the 10 later records written");
    stop(consumer).await
}

/// Fault: the records table exists and is not partitioned by the column: a plain table, a
/// table partitioned by list, and one partitioned by range on another column. Invariant: the
/// consumer refuses to start, says what it found and what to do, and writes nothing (not
/// even its own tables: the migration is one transaction). No broker is needed: the check
/// comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_not_partitioned_by_the_column_refuses_to_start_and_nothing_is_written(
) -> Result<()> {
    let pg = blocking(spillway_harness::postgres_from_env).await?;
    let c = connect(&pg.url()).await?;
    let columns = "kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, \
                   record_index int NOT NULL, received_at timestamptz NOT NULL, data jsonb";
    c.batch_execute(&format!(
        "CREATE TABLE plain ({columns});
         CREATE TABLE by_list ({columns}) PARTITION BY LIST (kafka_partition);
         CREATE TABLE by_other ({columns}, at timestamptz) PARTITION BY RANGE (at);"
    ))
    .await?;
    for (table, found) in [
        ("plain", "exists and is not partitioned"),
        ("by_list", "is partitioned by list on (kafka_partition)"),
        ("by_other", "is partitioned by range on (at)"),
    ] {
        let mut cfg = settings("127.0.0.1:1", &pg.url());
        cfg.table = TableName::parse(table).unwrap();
        cfg.partitioning = Some(
            Partitioning::new("received_at", Interval::Day, None, &Mapping::default()).unwrap(),
        );
        let refused = start(cfg)
            .await
            .err()
            .with_context(|| format!("{table}: a consumer must not start"))?
            .to_string();
        for part in [
            found,
            "--partition-by received_at",
            "never converts a table and has written nothing",
            "write to a new --table",
        ] {
            ensure!(refused.contains(part), "{table}: {part:?} in {refused}");
        }
    }
    let ours: Vec<String> = c
        .query(
            "SELECT relname::text FROM pg_class
             WHERE relname LIKE 'spillway%' OR relname LIKE '%dead_letters' OR relname LIKE '%default'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(ours.is_empty(), "nothing may be created: {ours:?}");
    Ok(())
}

/// A histogram's cumulative buckets, `(le, count)`.
type Buckets = Vec<(String, f64)>;

/// The cumulative buckets of a histogram on a /metrics page.
fn buckets(page: &str, name: &str) -> Buckets {
    let prefix = format!("{name}_bucket{{le=\"");
    page.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_string(), count.trim().parse().ok()?))
        })
        .collect()
}

/// What one phase of the measurement saw.
#[derive(Default)]
struct Phase {
    /// Each probe's wait for the table's ROW EXCLUSIVE lock (what a flush takes), in ms.
    waits: Vec<f64>,
    /// The flush-latency histogram's cumulative buckets at the phase's start and end.
    flushes: (Buckets, Buckets),
    /// (count, sum in s) of the changes the phase's rotation timed.
    changes: (f64, f64),
    /// Changes that failed (a lock timeout).
    failed: f64,
    /// Samples (every 10 ms) that saw the consumer's flushes (their COPY) waiting for a lock:
    /// how many samples, and the most flushes waiting at once.
    flushes_waiting: (usize, i64),
}

impl Phase {
    fn report(&mut self, name: &str) -> String {
        self.waits.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let i = ((self.waits.len() as f64 - 1.0) * p).round() as usize;
            self.waits.get(i).copied().unwrap_or(f64::NAN)
        };
        let (start, end) = &self.flushes;
        let delta: Buckets = end
            .iter()
            .map(|(le, n)| {
                let before = start.iter().find(|(l, _)| l == le).map_or(0.0, |b| b.1);
                (le.clone(), n - before)
            })
            .collect();
        let total = delta.last().map_or(0.0, |d| d.1);
        // The smallest bucket holding every flush of the phase, and the one holding 99%.
        let le_of = |share: f64| {
            delta
                .iter()
                .find(|(_, n)| *n >= total * share)
                .map_or("-".to_string(), |d| d.0.clone())
        };
        let (n, sum) = self.changes;
        let long: Vec<&f64> = self.waits.iter().filter(|w| **w > 20.0).collect();
        format!(
            "{name}: lock probe waits (ms, {} probes): p50 {:.2}, p99 {:.2}, max {:.2}, \
             {} over 20 ms ({:.0} ms in all); flushes: {total}, 99% within {} s, all within {} s; \
             flushes seen waiting for a lock in {} samples of 10 ms (at most {} at once); \
             partition changes: {n} done (mean {:.1} ms), {} failed",
            self.waits.len(),
            q(0.5),
            q(0.99),
            self.waits.last().copied().unwrap_or(f64::NAN),
            long.len(),
            long.iter().fold(0.0, |a, b| a + **b),
            le_of(0.99),
            le_of(1.0),
            self.flushes_waiting.0,
            self.flushes_waiting.1,
            if n > 0.0 { sum / n * 1000.0 } else { 0.0 },
            self.failed,
        )
    }
}

/// Measurement, not a check (no timing is asserted): how long partition changes hold up
/// flushes. A consumer writes a steady stream (4 Kafka partitions, 4 pooled connections) into
/// `records`, partitioned hourly by `received_at`; every record is received in one hour of
/// 2031, so the table's other partitions can change freely. Every 10 ms a probe writes a row
/// as a flush would (into that hour's partition, rolled back) and times it, and a sampler
/// counts the consumer's COPYs waiting for a lock. Phases of 8 s each: (A) no change; (B) a
/// second `Rotation` of the same table, driven by a simulated clock stepping an hour every
/// 250 ms, creates a partition each step (CREATE .. LIKE, then ATTACH); (C) the same with a
/// 3 h retention also drops one each step; (D) for comparison, the test itself creates
/// partitions with `CREATE TABLE .. PARTITION OF` (ACCESS EXCLUSIVE on the table), which the
/// rotation does not use; (E) as C while a read holds every partition for 5 s (as pg_dump
/// does); (F) as C while a read holds the table but not its partitions. All of it twice: with the
/// consumer's link to Postgres as it is, and slowed to 4 MB/s so that flushes last long (a
/// change that needs the table to itself waits for the flushes in flight, and the flushes
/// after it wait for it). Prints one line per phase. Run: `SPILLWAY_TANSU_BIN=... cargo test -p spillway-consumer --test consumer
/// partitions::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (prints figures, asserts no timing): run with --ignored --nocapture"]
async fn measure_how_long_partition_changes_hold_up_flushes() -> Result<()> {
    let mut lines = vec![];
    for bandwidth in [None, Some(4 << 20)] {
        lines.push(match bandwidth {
            None => "The consumer's link to Postgres as it is:".to_string(),
            Some(b) => format!(
                "The consumer's link to Postgres at {} MB/s (long flushes):",
                b >> 20
            ),
        });
        lines.extend(measure_partition_changes(bandwidth).await?);
    }
    for l in &lines {
        println!("{l}");
    }
    Ok(())
}

/// One run of the measurement above, the consumer's flushes through a link of `bandwidth`
/// bytes per second (`None`: direct).
async fn measure_partition_changes(bandwidth: Option<u64>) -> Result<Vec<String>> {
    use spillway_consumer::pg::{Pool, Targets};
    use spillway_consumer::Metrics;
    use spillway_core::BatcherConfig;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let s = stack(4).await?;
    let (brokers, url) = (s.broker.bootstrap(), s.pg.url());
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], s.pg.port())), 7).await?;
    proxy.set(Faults {
        bandwidth,
        ..Faults::default()
    });
    let consumer_url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let hourly = |retention: Option<&str>| {
        Partitioning::new(
            "received_at",
            Interval::Hour,
            retention.map(|r| Retention::parse(r).unwrap()),
            &Mapping::default(),
        )
        .unwrap()
    };
    let mut cfg = settings(&brokers, &consumer_url);
    // The service's batch sizes (up to 20,000 records, a 250 ms latency target), not the
    // small ones of the other tests: flushes as long as a backlog makes them.
    cfg.batcher = Settings::new(&brokers, TOPIC, &url).batcher;
    cfg.partitioning = Some(hourly(None));
    cfg.partition_check_every = Duration::from_secs(3600);
    let consumer = start(cfg.clone()).await?;
    // 2031-01-01 00:00 UTC.
    let received = 1_924_992_000_000_000_i64;

    let done = Arc::new(AtomicBool::new(false));
    let producing = {
        let (brokers, done) = (brokers.clone(), done.clone());
        tokio::spawn(async move {
            let mut id = 0u64;
            while !done.load(Ordering::Relaxed) {
                let messages: Vec<(i64, Vec<String>)> = (0..40)
                    .map(|_| {
                        let records = (id..id + 100)
                            .map(|i| format!(r#"{{"id":{i},"pad":"{}"}}"#, "x".repeat(120)))
                            .collect();
                        id += 100;
                        (received + id as i64, records)
                    })
                    .collect();
                produce_at(&brokers, &messages).await?;
            }
            Ok::<_, anyhow::Error>(id)
        })
    };
    let waits: Arc<Mutex<Vec<f64>>> = Arc::default();
    let probing = {
        let (url, done, waits) = (url.clone(), done.clone(), waits.clone());
        tokio::spawn(async move {
            let mut c = connect(&url).await?;
            while !done.load(Ordering::Relaxed) {
                // What a flush does: a row routed to the traffic's partition, rolled back.
                let tx = c.transaction().await?;
                let t = Instant::now();
                tx.batch_execute(
                    "INSERT INTO records VALUES (-1, 0, 0, '2031-01-01 00:30:00+00', '{}')",
                )
                .await?;
                let waited = t.elapsed().as_secs_f64() * 1000.0;
                tx.rollback().await?;
                waits.lock().unwrap().push(waited);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    // Whether the consumer's flushes wait for a lock, seen from Postgres.
    let waiting: Arc<Mutex<Vec<i64>>> = Arc::default();
    let sampling = {
        let (url, done, waiting) = (url.clone(), done.clone(), waiting.clone());
        tokio::spawn(async move {
            let c = connect(&url).await?;
            while !done.load(Ordering::Relaxed) {
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE wait_event_type = 'Lock' AND query LIKE 'COPY%'",
                        &[],
                    )
                    .await?
                    .get(0);
                waiting.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    // Flushes under way before the first phase.
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumer.metrics().rows_written() < 50_000 {
        ensure!(
            Instant::now() < deadline,
            "the traffic never reached the table"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flush_buckets = || -> Result<Buckets> {
        Ok(buckets(
            &consumer.metrics().registry.render()?,
            "spillway_consumer_flush_latency_seconds",
        ))
    };
    let rotation_of = |p: Partitioning, metrics: Arc<Metrics>| -> Result<_> {
        let mut cfg = cfg.clone();
        cfg.partitioning = Some(p);
        let pool = Pool::new(&url, 1, cfg.statement_timeout, cfg.connect_timeout)
            .map_err(anyhow::Error::msg)?;
        spillway_consumer::partitions::Rotation::new(
            &Targets::new(&cfg),
            Arc::new(pool),
            metrics,
            Duration::from_secs(10),
        )
        .context("a rotation")
    };
    let changes = |m: &Metrics| -> Result<(f64, f64)> {
        let page = m.registry.render()?;
        Ok((
            sample_sum(&page, "spillway_consumer_partition_change_seconds_count").unwrap_or(0.0),
            sample_sum(&page, "spillway_consumer_partition_change_seconds_sum").unwrap_or(0.0),
        ))
    };
    const PHASE: Duration = Duration::from_secs(8);
    const STEP: Duration = Duration::from_millis(250);
    let mut lines = vec![];
    // 2030-01-01 00:00 UTC: the simulated clock's start.
    let mut fake_now = 1_893_456_000_000_000_i64;
    for phase in [
        "A (no change)",
        "B (create each step)",
        "C (create and drop each step)",
        "D (CREATE .. PARTITION OF, for comparison)",
        "E (create and drop each step, a 5 s read holding every partition, as pg_dump)",
        "F (create and drop each step, a 5 s read holding the table and other partitions)",
    ] {
        let metrics = Arc::new(Metrics::new(&BatcherConfig::default()));
        let rotation = match &phase[..1] {
            "B" => Some(rotation_of(hourly(None), metrics.clone())?),
            "C" | "E" | "F" => Some(rotation_of(hourly(Some("3h")), metrics.clone())?),
            _ => None,
        };
        if phase.starts_with('D') {
            // Past the partitions the rotations made ahead.
            fake_now += 2 * DAY;
        }
        if let Some(r) = &rotation {
            // The burst of a first round (the first partitions, or every expired one) is
            // not measured.
            r.round(fake_now).await;
        }
        // A long read holds ACCESS SHARE: on the table and every partition (a pg_dump, a
        // full scan), or on the table and the partitions it reads (here: none).
        let lock = match &phase[..1] {
            "E" => Some("LOCK TABLE records IN ACCESS SHARE MODE"),
            "F" => Some("LOCK TABLE ONLY records IN ACCESS SHARE MODE"),
            _ => None,
        };
        let reader = if let Some(lock) = lock {
            let mut c = connect(&url).await?;
            let (held, holding) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                let tx = c.transaction().await?;
                tx.batch_execute(lock).await?;
                let _ = held.send(());
                tokio::time::sleep(Duration::from_secs(5)).await;
                tx.commit().await?;
                Ok::<_, anyhow::Error>(())
            });
            holding.await?;
            Some(task)
        } else {
            None
        };
        let before = changes(&metrics)?;
        let mut p = Phase::default();
        p.flushes.0 = flush_buckets()?;
        waits.lock().unwrap().clear();
        waiting.lock().unwrap().clear();
        let phase_end = Instant::now() + PHASE;
        let mut changed_by_hand = (0.0, 0.0);
        while Instant::now() < phase_end {
            fake_now += HOUR;
            match (&phase[..1], &rotation) {
                (_, Some(r)) => r.round(fake_now).await,
                ("D", None) => {
                    let r = hourly(None).interval().containing(fake_now).unwrap();
                    let name = format!("by_hand_{}", hourly(None).partition_name("records", r));
                    let c = connect(&url).await?;
                    let t = Instant::now();
                    c.batch_execute(&format!(
                        "SET lock_timeout = '2s'; CREATE TABLE {name} PARTITION OF records \
                         FOR VALUES FROM ({}) TO ({})",
                        hourly(None).bound_literal(r.from),
                        hourly(None).bound_literal(r.to)
                    ))
                    .await?;
                    changed_by_hand.0 += 1.0;
                    changed_by_hand.1 += t.elapsed().as_secs_f64();
                }
                _ => {}
            }
            tokio::time::sleep(STEP).await;
        }
        p.flushes.1 = flush_buckets()?;
        p.waits = waits.lock().unwrap().clone();
        p.flushes_waiting = {
            let seen = waiting.lock().unwrap();
            (
                seen.iter().filter(|n| **n > 0).count(),
                seen.iter().copied().max().unwrap_or(0),
            )
        };
        let after = changes(&metrics)?;
        p.changes = match rotation {
            Some(_) => (after.0 - before.0, after.1 - before.1),
            None => changed_by_hand,
        };
        p.failed = sample_sum(
            &metrics.registry.render()?,
            "spillway_consumer_partition_failures_total",
        )
        .unwrap_or(0.0);
        if let Some(r) = reader {
            r.await??;
        }
        lines.push(p.report(phase));
    }
    done.store(true, Ordering::Relaxed);
    let produced = producing.await??;
    probing.await??;
    sampling.await??;
    lines.push(format!(
        "records produced: {produced}; written: {}",
        consumer.metrics().rows_written()
    ));
    stop(consumer).await?;
    Ok(lines)
}
