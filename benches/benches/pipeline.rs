//! End to end: a backlog already in Kafka (Tansu) drained by the consumer into Postgres, as a
//! ratio to a raw COPY BINARY of the same rows from memory into the same server, same run.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use spillway_benches::{print_ratios, record};
use spillway_consumer::pgcopy;
use spillway_core::{Envelope, Record, RequestId};
use spillway_integration::postgres::connect;
use spillway_integration::{kafka, KafkaBroker, LocalPostgres, PostgresServer};

const RECORDS: u64 = 200_000;
const PER_MESSAGE: u64 = 10;
const GROUP: &str = "pipeline";

async fn produce_backlog(broker: &dyn KafkaBroker) {
    broker.create_topic("backlog", 4).await.expect("topic");
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("acks", "all")
        .set("linger.ms", "10")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for m in 0..RECORDS / PER_MESSAGE {
        let recs: Vec<Vec<u8>> = (0..PER_MESSAGE)
            .map(|i| record(m * PER_MESSAGE + i))
            .collect();
        let env = Envelope {
            received_at_micros: 1_764_000_000_000_000,
            request_id: RequestId::from_u128(m as u128),
            source: None,
            records: recs.iter().map(|r| r.as_slice()).collect(),
        };
        let key = m.to_string();
        let payload = env.encode();
        pending.push(
            p.send_result(FutureRecord::to("backlog").key(&key).payload(&payload))
                .expect("queue"),
        );
        if pending.len() >= 5_000 {
            for f in pending.drain(..) {
                f.await.expect("delivery").expect("delivered");
            }
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("delivered");
    }
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres");
    let broker = kafka::from_env().expect("broker");
    rt.block_on(produce_backlog(broker.as_ref()));
    let rows: Vec<Record> = (0..RECORDS)
        .map(|i| Record {
            partition: (i % 4) as i32,
            offset: i as i64,
            index: 0,
            last_in_message: true,
            received_at_micros: 1_764_000_000_000_000,
            payload: record(i),
        })
        .collect();
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(RECORDS));
    let url = pg.url();
    let mut run = 0u32;
    g.bench_function("raw_copy_binary", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let table = format!("raw_{run}");
                total += rt.block_on(async {
                    let mut client = connect(&url).await.expect("connect");
                    client
                        .batch_execute(&format!("CREATE TABLE {table} (kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, record_index int NOT NULL, received_at timestamptz NOT NULL, data jsonb NOT NULL)"))
                        .await
                        .expect("create");
                    let t = Instant::now();
                    for chunk in rows.chunks(10_000) {
                        let tx = client.transaction().await.expect("begin");
                        let data = pgcopy::encode(chunk.iter(), chunk.len() * 260).freeze();
                        let sink = tx.copy_in::<_, bytes::Bytes>(&format!("COPY {table} ({}) FROM STDIN (FORMAT binary)", pgcopy::COLUMNS)).await.expect("copy");
                        futures::pin_mut!(sink);
                        futures::SinkExt::send(&mut sink, data).await.expect("send");
                        sink.as_mut().finish().await.expect("finish");
                        tx.commit().await.expect("commit");
                    }
                    let elapsed = t.elapsed();
                    client.batch_execute(&format!("DROP TABLE {table}")).await.expect("drop");
                    elapsed
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
                    let t = Instant::now();
                    let consumer = spillway_consumer::start(s).await.expect("consumer");
                    while consumer.metrics().rows_written() < RECORDS {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let elapsed = t.elapsed();
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
