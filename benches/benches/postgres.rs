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
//!
//! `postgres_upsert` (issue 17): batches of 10,000 typed records keyed by `id`, a tenth of
//! them repeating a key used earlier in the batch, into a table that already holds a row for
//! half of the batch's keys. `upsert` is the consumer's flush by key (`pg::flush`: the
//! position's compare-and-set, COPY BINARY into the staging table, the merge); `append_flush`
//! the same flush into a table without the key; `copy_binary` one plain COPY BINARY of the
//! same encoded rows into that table (the baseline). Rows are encoded before the clock starts,
//! and each iteration starts from the same table. `data` is kept (the consumer's default);
//! `postgres_upsert_typed` is the same without it (the typed columns only, as
//! `postgres_typed`). Ratios are to `copy_binary/10000` of the same group.
//!
//! `postgres_routing` (issue 17): the cost of routing a batch to three tables rather than one.
//! Batches of 10,000 ~215-byte jsonb records (the consumer's default mapping) whose `type` is
//! `click`, `order` or `view` in equal shares. `flush_one_table` is the consumer's flush into
//! one table, no `--route` rule; `flush_three_tables` the same batch routed by
//! `--route /type=click:..` and `--route /type=order:..` into two tables, views to the records
//! table, all three with the same mapping: three COPYs in the one transaction. Each starts
//! from empty tables, encoded before the clock starts. `encode_one_table` and
//! `encode_three_tables` time that encoding (`pg::encode_rows`, CPU in the consumer before a
//! connection is taken), where routing reads each record once more for its `type`. Ratios are
//! to the one-table case of the same step.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::SinkExt;
use spillway_benches::{
    by_id, copy_encoded, create_table, create_typed_table, drop_tables, encode_and_copy,
    encode_batches, keyed_mapping, print_ratios, raw_copy, routed_rows, rows, typed_mapping,
    typed_rows, upsert_batch, ROUTED_TYPES,
};
use spillway_consumer::pg::{self, TableName, Target, Targets};
use spillway_consumer::upsert::Merged;
use spillway_consumer::{Args, Settings};
use spillway_core::{Batch, BatchId, Entry, FlushResult, Mapping, Position, Record};
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

/// The topic the upsert bench's positions are kept for.
const TOPIC: &str = "bench";

/// One consumer's tables in the upsert and routing benches, created as the consumer creates
/// them; its positions are kept under its records table's name (no `--name`).
struct Written {
    targets: Targets,
    /// The records table (the first of `targets`).
    table: TableName,
}

impl Written {
    async fn create(client: &mut Client, name: &str, mapping: &Mapping) -> Self {
        let table = TableName::parse(name).expect("a table name");
        let targets = Targets::single(Target::new(table.clone(), mapping), TOPIC);
        Self::migrated(client, targets, table).await
    }

    /// The tables and rules of `settings`, as the consumer builds them.
    async fn configured(client: &mut Client, settings: &Settings) -> Self {
        assert_eq!(
            settings.name(),
            settings.table.plain,
            "positions under the table's name"
        );
        Self::migrated(client, Targets::new(settings), settings.table.clone()).await
    }

    async fn migrated(client: &mut Client, targets: Targets, table: TableName) -> Self {
        pg::migrate(client, &targets).await.expect("migrate");
        pg::position(client, &table.plain, TOPIC, 0)
            .await
            .expect("a position");
        Written { targets, table }
    }

    /// Every table emptied and the position at the batch's start.
    async fn empty(&self, client: &Client) {
        let tables: Vec<&str> = self
            .targets
            .tables
            .iter()
            .map(|t| t.table.records())
            .collect();
        client
            .batch_execute(&format!(
                "TRUNCATE {}; UPDATE spillway_offsets SET next_offset = 0, next_index = 0",
                tables.join(", ")
            ))
            .await
            .expect("truncate");
    }

    /// Rows in each table of `targets`, in its order.
    async fn rows_per_table(&self, client: &Client) -> Vec<i64> {
        let mut rows = vec![];
        for t in &self.targets.tables {
            let sql = format!("SELECT count(*) FROM {}", t.table.records());
            rows.push(client.query_one(&sql, &[]).await.expect("count").get(0));
        }
        rows
    }

    /// Every table and dead-letter table of `targets`.
    fn all_tables(&self) -> Vec<&str> {
        let tables = self.targets.tables.iter();
        tables
            .flat_map(|t| [t.table.records(), t.table.dead_letters()])
            .collect()
    }

    /// Back to the state every iteration starts from: the preloaded rows only, vacuumed and
    /// analysed as a settled table is, and the position at the batch's start (the batch is
    /// written again each time, so it must not be fenced).
    async fn reset(&self, client: &mut Client, preload: &Bytes, columns: &str) {
        let t = self.table.records();
        client
            .batch_execute(&format!(
                "TRUNCATE {t}; UPDATE spillway_offsets SET next_offset = 0, next_index = 0"
            ))
            .await
            .expect("truncate");
        copy_encoded(client, t, columns, preload.clone())
            .await
            .expect("preload");
        client
            .batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .expect("vacuum");
    }

    /// The consumer's flush of `batch`, timed; encoding comes first, untimed.
    async fn flush(&self, client: &mut Client, batch: &Batch) -> (Duration, Option<Merged>) {
        let encoded = pg::encode_rows(batch, &self.targets).expect("the bench rows fit");
        let t = Instant::now();
        let pg::Flushed { result, merged, .. } =
            pg::flush(client, &self.targets, &self.table.plain, batch, encoded).await;
        let took = t.elapsed();
        assert!(matches!(result, FlushResult::Written), "{result:?}");
        (took, merged)
    }

    async fn rows(&self, client: &Client) -> i64 {
        client
            .query_one(
                &format!("SELECT count(*) FROM {}", self.table.records()),
                &[],
            )
            .await
            .expect("count")
            .get(0)
    }
}

/// `records` as one batch of partition 0 from offset 0.
fn whole_batch(records: &[Record]) -> Batch {
    Batch {
        id: BatchId(0),
        partition: 0,
        start: Position::new(0, 0),
        end: Position::new(records.len() as i64, 0),
        entries: records
            .iter()
            .map(|r| Entry {
                record: r.clone(),
                dead_reason: None,
                copy: false,
            })
            .collect(),
        attempt: 1,
        oldest_pushed_at: Instant::now(),
        check_start: true,
        position_with_rows: true,
    }
}

fn upsert(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres (run ci/test.sh to install it)");
    let mut client = rt.block_on(connect(&pg.url())).expect("connect");
    let keyed = upsert_batch(ROWS);
    let batch = whole_batch(&keyed.records);
    let preloaded = keyed.preload.len() as i64;
    let keys = (keyed.new_keys + keyed.old_keys) as i64;
    let expected = Merged {
        inserted: keyed.new_keys,
        updated: keyed.old_keys,
        deleted: 0,
        unchanged: ROWS - keyed.new_keys - keyed.old_keys,
    };
    for (group, keep_data) in [("postgres_upsert", true), ("postgres_upsert_typed", false)] {
        let mapping = by_id(keyed_mapping(keep_data));
        let columns = mapping.copy_columns();
        let [data, preload] = [&keyed.records, &keyed.preload].map(|rows| {
            encode_batches(rows, rows.len(), &mapping)
                .pop()
                .expect("one batch")
        });
        let (upserted, appended) = rt.block_on(async {
            (
                Written::create(&mut client, &format!("{group}_upserted"), &mapping).await,
                Written::create(
                    &mut client,
                    &format!("{group}_appended"),
                    &keyed_mapping(keep_data),
                )
                .await,
            )
        });
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .measurement_time(Duration::from_secs(4))
            .warm_up_time(Duration::from_secs(1))
            .throughput(Throughput::Elements(ROWS));
        let mut ids: Vec<(String, u64)> = vec![];
        for name in ["copy_binary", "append_flush", "upsert"] {
            let id = format!("{name}/{ROWS}");
            let written = if name == "upsert" {
                &upserted
            } else {
                &appended
            };
            g.bench_function(&id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        rt.block_on(async {
                            written.reset(&mut client, &preload, &columns).await;
                            let (took, merged) = match name {
                                "copy_binary" => {
                                    let t = Instant::now();
                                    let table = written.table.records();
                                    copy_encoded(&mut client, table, &columns, data.clone())
                                        .await
                                        .expect("copy");
                                    (t.elapsed(), None)
                                }
                                _ => written.flush(&mut client, &batch).await,
                            };
                            total += took;
                            // Each iteration did the whole write: no fencing, no partial merge.
                            let (rows, merged_as) = match name {
                                "upsert" => (keys, Some(expected)),
                                _ => (preloaded + ROWS as i64, None),
                            };
                            assert_eq!(merged, merged_as, "{group}/{id}");
                            assert_eq!(written.rows(&client).await, rows, "{group}/{id}");
                        });
                    }
                    total
                })
            });
            ids.push((id, ROWS));
        }
        g.finish();
        print_ratios(group, &ids, &format!("copy_binary/{ROWS}"));
        rt.block_on(drop_tables(
            &client,
            &[
                upserted.table.records(),
                upserted.table.dead_letters(),
                appended.table.records(),
                appended.table.dead_letters(),
            ],
        ));
    }
    drop(pg);
}

/// The consumer's settings for a records table `table` and `--route` rules `routes`, with the
/// default (jsonb) mapping for every table.
fn routing_settings(url: &str, table: &str, routes: &[String]) -> Settings {
    Settings::from_args(Args {
        brokers: Some("unused:9092".into()),
        topic: Some(TOPIC.into()),
        database_url: Some(url.into()),
        table: Some(table.into()),
        route: routes.to_vec(),
        ..Args::default()
    })
    .expect("valid settings")
}

fn routing(c: &mut Criterion) {
    const GROUP: &str = "postgres_routing";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = LocalPostgres::start().expect("postgres (run ci/test.sh to install it)");
    let mut client = rt.block_on(connect(&pg.url())).expect("connect");
    let records = routed_rows(ROWS);
    let batch = whole_batch(&records);
    // Record i is a ROUTED_TYPES[i % 3]: the type at index k has (ROWS + 2 - k) / 3 records.
    let share = |kind: &str| {
        let k = ROUTED_TYPES
            .iter()
            .position(|t| *t == kind)
            .expect("a type") as u64;
        ((ROWS + 2 - k) / 3) as i64
    };
    // Clicks and orders by a rule each, views to the records table.
    let routes = ["click", "order"].map(|k| format!("/type={k}:routing_{k}s"));
    let (one, three) = rt.block_on(async {
        let one = routing_settings(&pg.url(), "routing_one", &[]);
        let three = routing_settings(&pg.url(), "routing_views", &routes);
        (
            Written::configured(&mut client, &one).await,
            Written::configured(&mut client, &three).await,
        )
    });
    // The rows each table gets, in the order of its targets (the records table first).
    let cases = [
        ("one_table", &one, vec![ROWS as i64]),
        (
            "three_tables",
            &three,
            vec![share("view"), share("click"), share("order")],
        ),
    ];
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(ROWS));
    let mut encodes: Vec<(String, u64)> = vec![];
    let mut flushes: Vec<(String, u64)> = vec![];
    for (tables, written, expected) in &cases {
        let encoded = pg::encode_rows(&batch, &written.targets).expect("the bench rows fit");
        let records: Vec<i64> = encoded.iter().map(|e| e.records() as i64).collect();
        assert_eq!(&records, expected, "{tables}: records per table");
        let id = format!("encode_{tables}/{ROWS}");
        g.bench_function(&id, |b| {
            b.iter(|| pg::encode_rows(&batch, &written.targets).expect("the bench rows fit"))
        });
        encodes.push((id, ROWS));
    }
    for (tables, written, expected) in &cases {
        let id = format!("flush_{tables}/{ROWS}");
        g.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    rt.block_on(async {
                        written.empty(&client).await;
                        let (took, merged) = written.flush(&mut client, &batch).await;
                        total += took;
                        // Each iteration wrote the whole batch, each record to its table.
                        assert_eq!(merged, None, "{id}");
                        let rows = written.rows_per_table(&client).await;
                        assert_eq!(&rows, expected, "{id}: rows per table");
                    });
                }
                total
            })
        });
        flushes.push((id, ROWS));
    }
    g.finish();
    print_ratios(GROUP, &flushes, &format!("flush_one_table/{ROWS}"));
    print_ratios(GROUP, &encodes, &format!("encode_one_table/{ROWS}"));
    let tables = [one.all_tables(), three.all_tables()].concat();
    rt.block_on(drop_tables(&client, &tables));
    drop(pg);
}

criterion_group!(benches, strategies, typed, upsert, routing);
criterion_main!(benches);
