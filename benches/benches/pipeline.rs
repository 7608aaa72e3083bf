//! End to end: a backlog already in Kafka drained by the consumer into Postgres, as a ratio
//! to a raw COPY BINARY of the same rows from memory into the same server, in the same run.
//! The drain is timed from the first row written to the last (group join excluded).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use spillway_benches::{create_table, drain_time, print_ratios, produce_backlog, raw_copy, rows};
use spillway_harness::postgres::connect;
use spillway_harness::{kafka, LocalPostgres, PostgresServer};

const RECORDS: u64 = 200_000;
const GROUP: &str = "pipeline";

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres");
    let broker = kafka::from_env().expect("broker");
    rt.block_on(broker.create_topic("backlog", 4))
        .expect("topic");
    rt.block_on(produce_backlog(
        &broker.bootstrap(),
        "backlog",
        None,
        RECORDS,
        10,
    ))
    .expect("backlog");
    let rows = rows(RECORDS);
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(RECORDS));
    let url = pg.url();
    let mut run = 0u32;
    g.bench_function("raw_copy_binary", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                total += rt.block_on(async {
                    let table = format!("raw_{run}");
                    let mut client = connect(&url).await.expect("connect");
                    client
                        .batch_execute(&create_table(&table))
                        .await
                        .expect("create");
                    let t = Instant::now();
                    raw_copy(&mut client, &table, &rows, 10_000)
                        .await
                        .expect("copy");
                    t.elapsed()
                });
            }
            total
        })
    });
    g.bench_function("consumer_drain_backlog", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                total += rt.block_on(async {
                    let mut s = spillway_consumer::Settings::new(
                        broker.bootstrap(),
                        "backlog",
                        url.clone(),
                    );
                    s.listen = "127.0.0.1:0".parse().expect("addr");
                    s.group = format!("bench-{run}");
                    s.table = spillway_consumer::pg::TableName::parse(&format!("drained_{run}"))
                        .expect("name");
                    let consumer = spillway_consumer::start(s).await.expect("consumer");
                    let metrics = consumer.metrics().clone();
                    let elapsed = drain_time(RECORDS, move || {
                        let n = metrics.rows_written();
                        Box::pin(async move { n })
                    })
                    .await;
                    consumer.shutdown().await.expect("shutdown");
                    elapsed
                });
            }
            total
        })
    });
    g.finish();
    print_ratios(
        GROUP,
        &[
            ("raw_copy_binary".into(), RECORDS),
            ("consumer_drain_backlog".into(), RECORDS),
        ],
        "raw_copy_binary",
    );
    drop(broker);
    drop(pg);
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
