//! End to end: a backlog already in Kafka drained by the consumer into Postgres, as a ratio
//! to a raw COPY BINARY of the same rows from memory into the same server, in the same run:
//! pre-encoded batches of 10,000 rows, one transaction each, over one connection and over as
//! many as the consumer's pool (`_pool`), as the consumer flushes partitions in parallel.
//! The drain is timed from the first row written to the last (group join excluded). Each
//! case drops its table once measured, so autovacuum on earlier rows does not count later.
//!
//! Typed (issue 16): the same drain of ~200-byte records mapped into six typed columns
//! (`--keep-data false`) beside a raw COPY BINARY of the same typed rows, and the CPU per
//! record while it drains, typed vs jsonb only: the consumer's (this process's) and Postgres's
//! (the postmaster and its backends).
//!
//! Idempotency keys: the same jsonb backlog with a distinct idempotency key on every message
//! (as the producer writes requests sent with an `Idempotency-Key`), drained beside the keyless
//! one in the same run: what writing each key's records once costs the drain.
//!
//! The broker is `kafka::from_env`'s: Tansu on SQLite by default, whose fetch rate bounds the
//! drains; `SPILLWAY_TEST_KAFKA=mock` drains from librdkafka's in-process mock cluster instead
//! (memory, no disk), which shows the consumer's own ceiling.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use spillway_benches::{
    backlog_intact, copy_encoded_parallel, create_table, create_typed_table, drain_time,
    drop_tables, encode_batches, print_ratios, process_cpu, process_tree_cpu, produce_backlog,
    produce_backlog_of, rows, typed_mapping, typed_record, typed_rows,
};
use spillway_harness::postgres::connect;
use spillway_harness::{kafka, LocalPostgres, PostgresServer};

const RECORDS: u64 = 200_000;
const GROUP: &str = "pipeline";

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres");
    let broker = kafka::from_env().expect("broker");
    // librdkafka's mock cluster (`SPILLWAY_TEST_KAFKA=mock`, an in-memory source far faster
    // than Tansu on SQLite) keeps only the newest 5 MiB of a partition: 16 partitions hold the
    // typed backlog whole.
    let partitions = if broker.kind() == "mock" { 16 } else { 4 };
    rt.block_on(broker.create_topic("backlog", partitions))
        .expect("topic");
    rt.block_on(produce_backlog(
        &broker.bootstrap(),
        "backlog",
        None,
        RECORDS,
        10,
    ))
    .expect("backlog");
    rt.block_on(broker.create_topic("typed_backlog", partitions))
        .expect("topic");
    rt.block_on(produce_backlog_of(
        &broker.bootstrap(),
        "typed_backlog",
        None,
        RECORDS,
        10,
        typed_record,
        true,
        false,
    ))
    .expect("typed backlog");
    // The same records as `backlog` without sequenced request ids (an older producer's): the
    // consumer then stores no producer sequences, which is what they cost.
    rt.block_on(broker.create_topic("unsequenced_backlog", partitions))
        .expect("topic");
    rt.block_on(produce_backlog_of(
        &broker.bootstrap(),
        "unsequenced_backlog",
        None,
        RECORDS,
        10,
        spillway_benches::record,
        false,
        false,
    ))
    .expect("unsequenced backlog");
    // The same records as `backlog`, each message with a distinct idempotency key.
    rt.block_on(broker.create_topic("keyed_backlog", partitions))
        .expect("topic");
    rt.block_on(produce_backlog_of(
        &broker.bootstrap(),
        "keyed_backlog",
        None,
        RECORDS,
        10,
        spillway_benches::record,
        true,
        true,
    ))
    .expect("keyed backlog");
    for topic in [
        "backlog",
        "typed_backlog",
        "unsequenced_backlog",
        "keyed_backlog",
    ] {
        if let Err(e) = backlog_intact(&broker.bootstrap(), topic, RECORDS / 10) {
            panic!("the backlog is not whole, the drains would never end: {e}");
        }
    }
    eprintln!(
        "backlogs of {RECORDS} records on {} ({partitions} partitions each)",
        broker.kind()
    );
    let jsonb = encode_batches(&rows(RECORDS), 10_000, &spillway_core::Mapping::default());
    let jsonb_columns = spillway_core::Mapping::default().copy_columns();
    let typed = encode_batches(&typed_rows(RECORDS), 10_000, &typed_mapping());
    let typed_columns = typed_mapping().copy_columns();
    // CPU time (this process's, Postgres's) and records drained, per consumer case.
    type Cpu = (Duration, Duration, u64);
    let cpu = std::cell::RefCell::new(std::collections::BTreeMap::<&str, Cpu>::new());
    let postmaster = pg.pid().expect("postgres pid");
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(RECORDS));
    let url = pg.url();
    let mut run = 0u32;
    // The raw COPYs: pre-encoded batches of 10,000 rows, over one connection and over as
    // many as the consumer's pool (its partitions flush in parallel over them).
    let pool = spillway_consumer::Settings::new(String::new(), "", url.clone()).pool_size;
    // (case, CREATE TABLE for a name, batches, columns, connections)
    type RawCase<'a> = (
        &'a str,
        fn(&str) -> String,
        &'a [bytes::Bytes],
        &'a str,
        usize,
    );
    let raw_cases: [RawCase; 4] = [
        ("raw_copy_binary", create_table, &jsonb, &jsonb_columns, 1),
        (
            "raw_copy_binary_pool",
            create_table,
            &jsonb,
            &jsonb_columns,
            pool,
        ),
        (
            "raw_copy_binary_typed",
            create_typed_table,
            &typed,
            &typed_columns,
            1,
        ),
        (
            "raw_copy_binary_typed_pool",
            create_typed_table,
            &typed,
            &typed_columns,
            pool,
        ),
    ];
    for (name, create, batches, columns, connections) in raw_cases {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    run += 1;
                    total += rt.block_on(async {
                        let table = format!("raw_{run}");
                        let mut clients = Vec::with_capacity(connections);
                        for _ in 0..connections {
                            clients.push(connect(&url).await.expect("connect"));
                        }
                        clients[0]
                            .batch_execute(&create(&table))
                            .await
                            .expect("create");
                        let t = Instant::now();
                        copy_encoded_parallel(&mut clients, &table, columns, batches)
                            .await
                            .expect("copy");
                        let elapsed = t.elapsed();
                        drop_tables(&clients[0], &[&table]).await;
                        elapsed
                    });
                }
                total
            })
        });
    }
    for (name, topic, mapping) in [
        (
            "consumer_drain_backlog",
            "backlog",
            spillway_core::Mapping::default(),
        ),
        ("consumer_drain_typed", "typed_backlog", typed_mapping()),
        (
            "consumer_drain_unsequenced",
            "unsequenced_backlog",
            spillway_core::Mapping::default(),
        ),
        (
            "consumer_drain_keyed",
            "keyed_backlog",
            spillway_core::Mapping::default(),
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    run += 1;
                    let (elapsed, used) = rt.block_on(async {
                        let mut s = spillway_consumer::Settings::new(
                            broker.bootstrap(),
                            topic,
                            url.clone(),
                        );
                        s.listen = "127.0.0.1:0".parse().expect("addr");
                        s.group = format!("bench-{run}");
                        s.table =
                            spillway_consumer::pg::TableName::parse(&format!("drained_{run}"))
                                .expect("name");
                        s.mapping = mapping.clone();
                        let consumer = spillway_consumer::start(s).await.expect("consumer");
                        let metrics = consumer.metrics().clone();
                        let cpu_before = process_cpu();
                        let pg_before = process_tree_cpu(postmaster);
                        let elapsed = drain_time(RECORDS, move || {
                            let n = metrics.rows_written();
                            Box::pin(async move { n })
                        })
                        .await;
                        let used = process_cpu().saturating_sub(cpu_before);
                        let pg_used = process_tree_cpu(postmaster).saturating_sub(pg_before);
                        consumer.shutdown().await.expect("shutdown");
                        let client = connect(&url).await.expect("connect");
                        let table = format!("drained_{run}");
                        // The consumer keeps the idempotency keys it wrote beside the table.
                        let (dead, keys) = (
                            format!("{table}_dead_letters"),
                            format!("{table}_request_keys"),
                        );
                        drop_tables(&client, &[&table, &dead, &keys]).await;
                        (elapsed, (used, pg_used))
                    });
                    total += elapsed;
                    let mut cpu = cpu.borrow_mut();
                    let entry = cpu.entry(name).or_default();
                    entry.0 += used.0;
                    entry.1 += used.1;
                    entry.2 += RECORDS;
                }
                total
            })
        });
    }
    g.finish();
    for (raw, drain) in [
        ("raw_copy_binary", "consumer_drain_backlog"),
        ("raw_copy_binary_typed", "consumer_drain_typed"),
    ] {
        let pooled = format!("{raw}_pool");
        for baseline in [raw, pooled.as_str()] {
            print_ratios(
                GROUP,
                &[
                    (raw.into(), RECORDS),
                    (pooled.clone(), RECORDS),
                    (drain.into(), RECORDS),
                ],
                baseline,
            );
        }
    }
    // What storing the producers' sequences with each batch costs a drain.
    print_ratios(
        GROUP,
        &[
            ("consumer_drain_unsequenced".into(), RECORDS),
            ("consumer_drain_backlog".into(), RECORDS),
        ],
        "consumer_drain_unsequenced",
    );
    // What writing each idempotency key's records once costs a drain.
    print_ratios(
        GROUP,
        &[
            ("consumer_drain_backlog".into(), RECORDS),
            ("consumer_drain_keyed".into(), RECORDS),
        ],
        "consumer_drain_backlog",
    );
    // µs per record: this process's, and Postgres's (the postmaster and its backends).
    let per_record = |name: &str| {
        cpu.borrow()
            .get(name)
            .filter(|(_, _, n)| *n > 0)
            .map(|(own, pg, n)| {
                let per = |t: &Duration| t.as_secs_f64() * 1e6 / *n as f64;
                (per(own), per(pg))
            })
    };
    if let (Some((jsonb, jsonb_pg)), Some((typed, typed_pg))) = (
        per_record("consumer_drain_backlog"),
        per_record("consumer_drain_typed"),
    ) {
        println!(
            "\nconsumer CPU per record while draining (this process): jsonb only {jsonb:.2} µs, \
             typed {typed:.2} µs, typed/jsonb {:.3}",
            typed / jsonb
        );
        println!(
            "Postgres CPU per record meanwhile: jsonb only {jsonb_pg:.2} µs, typed {typed_pg:.2} µs; \
             consumer + Postgres: jsonb only {:.2} µs, typed {:.2} µs, typed/jsonb {:.3}",
            jsonb + jsonb_pg,
            typed + typed_pg,
            (typed + typed_pg) / (jsonb + jsonb_pg)
        );
    }
    drop(broker);
    drop(pg);
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
