//! Postgres write strategies on the same rows into the same private server (fsync on):
//! one INSERT per row (the original endpoint), one multi-row INSERT per batch (the original
//! consumer), UNNEST arrays, COPY text, COPY BINARY (Spillway). Batches of 100, 1,000 and
//! 10,000 rows, each batch one transaction. Prints each strategy's ratio to COPY BINARY.
//!
//! `postgres_typed`: ~200-byte records into the six typed columns of issue 16 (bigint, text,
//! timestamptz, double precision, boolean, jsonb; no `data`). `consumer_path` converts and
//! encodes each batch as the consumer does, then COPYs it; `raw_copy_binary` COPYs the same
//! typed rows already encoded in memory (the bound); `jsonb_only` is the same records through
//! the untyped path (`data jsonb`). Ratios are to `raw_copy_binary/10000`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::SinkExt;
use spillway_benches::{
    copy_encoded, create_table, create_typed_table, encode_and_copy, encode_batches, print_ratios,
    raw_copy, rows, typed_mapping, typed_rows,
};
use spillway_core::Record;
use spillway_harness::postgres::connect;
use spillway_harness::{LocalPostgres, PostgresServer};
use tokio_postgres::Client;

const ROWS: u64 = 10_000;
const GROUP: &str = "postgres_write";

async fn reset(c: &Client) {
    c.batch_execute(&format!("DROP TABLE IF EXISTS t; {}", create_table("t")))
        .await
        .expect("create table");
}

fn literal(s: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(s).replace('\'', "''"))
}

async fn insert_per_row(c: &Client, rows: &[Record]) {
    let st = c
        .prepare("INSERT INTO t VALUES ($1, $2, $3, to_timestamp(1764000000), $4::text::jsonb)")
        .await
        .expect("prepare");
    for r in rows {
        let data = String::from_utf8_lossy(&r.payload).into_owned();
        c.execute(&st, &[&r.partition, &r.offset, &(r.index as i32), &data])
            .await
            .expect("insert");
    }
}

async fn multi_row_insert(c: &mut Client, rows: &[Record], batch: usize) {
    for chunk in rows.chunks(batch) {
        let values: Vec<String> = chunk
            .iter()
            .map(|r| {
                format!(
                    "({},{},{},to_timestamp(1764000000),{}::jsonb)",
                    r.partition,
                    r.offset,
                    r.index,
                    literal(&r.payload)
                )
            })
            .collect();
        let tx = c.transaction().await.expect("begin");
        tx.batch_execute(&format!("INSERT INTO t VALUES {}", values.join(",")))
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
    }
}

async fn unnest(c: &mut Client, rows: &[Record], batch: usize) {
    for chunk in rows.chunks(batch) {
        let p: Vec<i32> = chunk.iter().map(|r| r.partition).collect();
        let o: Vec<i64> = chunk.iter().map(|r| r.offset).collect();
        let i: Vec<i32> = chunk.iter().map(|r| r.index as i32).collect();
        let d: Vec<String> = chunk
            .iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect();
        let tx = c.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO t SELECT a, b, c, to_timestamp(1764000000), e::jsonb FROM unnest($1::int[], $2::bigint[], $3::int[], $4::text[]) AS u(a, b, c, e)",
            &[&p, &o, &i, &d],
        )
        .await
        .expect("insert");
        tx.commit().await.expect("commit");
    }
}

async fn copy_text(c: &mut Client, rows: &[Record], batch: usize) {
    for chunk in rows.chunks(batch) {
        let tx = c.transaction().await.expect("begin");
        let mut text = String::with_capacity(chunk.len() * 260);
        for r in chunk {
            let json = String::from_utf8_lossy(&r.payload)
                .replace('\\', "\\\\")
                .replace('\t', "\\t")
                .replace('\n', "\\n");
            text.push_str(&format!(
                "{}\t{}\t{}\t2025-11-24 16:00:00+00\t{json}\n",
                r.partition, r.offset, r.index
            ));
        }
        let sink = tx
            .copy_in::<_, Bytes>(&format!(
                "COPY t ({}) FROM STDIN",
                spillway_core::Mapping::default().copy_columns()
            ))
            .await
            .expect("copy");
        futures::pin_mut!(sink);
        sink.send(Bytes::from(text)).await.expect("send");
        sink.as_mut().finish().await.expect("finish");
        tx.commit().await.expect("commit");
    }
}

fn strategies(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres (run ci/test.sh to install it)");
    let mut client = rt.block_on(connect(&pg.url())).expect("connect");
    let rows = rows(ROWS);
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    let mut ids: Vec<(String, u64)> = vec![];
    // One INSERT (one transaction) per row: 500 rows per iteration, it is slow.
    g.throughput(Throughput::Elements(500));
    g.bench_function("insert_per_row", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(reset(&client));
                let t = Instant::now();
                rt.block_on(insert_per_row(&client, &rows[..500]));
                total += t.elapsed();
            }
            total
        })
    });
    ids.push(("insert_per_row".into(), 500));
    g.throughput(Throughput::Elements(ROWS));
    for batch in [100usize, 1_000, 10_000] {
        for name in ["multi_row_insert", "unnest", "copy_text", "copy_binary"] {
            let id = format!("{name}/{batch}");
            g.bench_function(&id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        rt.block_on(reset(&client));
                        let t = Instant::now();
                        rt.block_on(async {
                            match name {
                                "multi_row_insert" => {
                                    multi_row_insert(&mut client, &rows, batch).await
                                }
                                "unnest" => unnest(&mut client, &rows, batch).await,
                                "copy_text" => copy_text(&mut client, &rows, batch).await,
                                _ => raw_copy(&mut client, "t", &rows, batch)
                                    .await
                                    .expect("copy"),
                            }
                        });
                        total += t.elapsed();
                    }
                    total
                })
            });
            ids.push((id, ROWS));
        }
    }
    g.finish();
    print_ratios(GROUP, &ids, "copy_binary/10000");
    drop(pg);
}

async fn reset_typed(c: &Client) {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS t; DROP TABLE IF EXISTS tt; {}; {}",
        create_table("t"),
        create_typed_table("tt")
    ))
    .await
    .expect("create tables");
}

fn typed(c: &mut Criterion) {
    const GROUP: &str = "postgres_typed";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres (run ci/test.sh to install it)");
    let mut client = rt.block_on(connect(&pg.url())).expect("connect");
    let rows = typed_rows(ROWS);
    let mapping = typed_mapping();
    let columns = mapping.copy_columns();
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(ROWS));
    let mut ids: Vec<(String, u64)> = vec![];
    for batch in [1_000usize, 10_000] {
        let encoded = encode_batches(&rows, batch, &mapping);
        for name in ["raw_copy_binary", "consumer_path", "jsonb_only"] {
            let id = format!("{name}/{batch}");
            g.bench_function(&id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        rt.block_on(reset_typed(&client));
                        let t = Instant::now();
                        rt.block_on(async {
                            match name {
                                "raw_copy_binary" => {
                                    for data in &encoded {
                                        copy_encoded(&mut client, "tt", &columns, data.clone())
                                            .await
                                            .expect("copy");
                                    }
                                }
                                "consumer_path" => {
                                    encode_and_copy(&mut client, "tt", &rows, batch, &mapping)
                                        .await
                                        .expect("copy")
                                }
                                _ => raw_copy(&mut client, "t", &rows, batch)
                                    .await
                                    .expect("copy"),
                            }
                        });
                        total += t.elapsed();
                    }
                    total
                })
            });
            ids.push((id, ROWS));
        }
    }
    g.finish();
    print_ratios(GROUP, &ids, "raw_copy_binary/10000");
    drop(pg);
}

criterion_group!(benches, strategies, typed);
criterion_main!(benches);
