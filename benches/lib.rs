//! Shared pieces of Spillway's benchmarks: test rows, and reading criterion's estimates back
//! to print ratios against a baseline measured in the same run.
#![warn(missing_docs)]

use std::path::PathBuf;

/// A JSON record of about 200 bytes, like the README's figures use.
pub fn record(i: u64) -> Vec<u8> {
    format!(
        r#"{{"id":"bench-{i}","user":{},"event":"page_view","path":"/products/{}","ua":"Mozilla/5.0 (X11; Linux x86_64)","pad":"{}"}}"#,
        i % 10_000,
        i % 977,
        "x".repeat(60)
    )
    .into_bytes()
}

/// The six-column mapping of the typed benches (issue 16): bigint, text, timestamptz, double
/// precision, boolean and jsonb, `data` not kept.
pub const TYPED_COLUMNS: [&str; 6] = [
    "n:bigint=/n",
    "name:text=/name",
    "at:timestamptz=/at",
    "score:double precision=/score",
    "ok:boolean=/ok",
    "doc:jsonb=/doc",
];

/// [`TYPED_COLUMNS`] as the consumer's mapping (`--keep-data false`).
pub fn typed_mapping() -> spillway_core::Mapping {
    let columns = TYPED_COLUMNS
        .iter()
        .map(|c| c.parse().expect("a valid mapping"))
        .collect();
    spillway_core::Mapping::new(columns, false).expect("a valid mapping")
}

/// A record of about 200 bytes that fits [`TYPED_COLUMNS`].
pub fn typed_record(i: u64) -> Vec<u8> {
    format!(
        r#"{{"n":{},"name":"user-{}","at":"2026-11-27T{:02}:{:02}:{:02}.{:06}Z","score":{}.25,"ok":{},"doc":{{"event":"page_view","path":"/products/{}","ua":"Mozilla/5.0 (X11; Linux x86_64)"}},"pad":"{}"}}"#,
        i * 7919,
        i % 10_000,
        i / 3600 % 24,
        i / 60 % 60,
        i % 60,
        i * 37 % 1_000_000,
        i % 1000,
        i.is_multiple_of(2),
        i % 977,
        "x".repeat(20)
    )
    .into_bytes()
}

/// `n` typed records as the consumer holds them.
pub fn typed_rows(n: u64) -> Vec<Record> {
    let mut rows = rows(n);
    for (i, r) in rows.iter_mut().enumerate() {
        r.payload = typed_record(i as u64);
    }
    rows
}

/// The typed table's DDL for `table`, as the consumer creates it for [`typed_mapping`].
pub fn create_typed_table(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, \
         record_index int NOT NULL, received_at timestamptz NOT NULL, n bigint, name text, \
         at timestamptz, score double precision, ok boolean, doc jsonb)"
    )
}

/// The key column of the upsert bench (issue 17), mapped ahead of [`TYPED_COLUMNS`].
pub const UPSERT_KEY: &str = "id:bigint=/id";

/// `id` then [`TYPED_COLUMNS`], `data` kept or not (`--keep-data`).
pub fn keyed_mapping(keep_data: bool) -> Mapping {
    let columns = std::iter::once(UPSERT_KEY)
        .chain(TYPED_COLUMNS)
        .map(|c| c.parse().expect("a valid mapping"))
        .collect();
    Mapping::new(columns, keep_data).expect("a valid mapping")
}

/// `mapping` written by `id`: `--upsert-key id --on-conflict update`, no `--delete-when`.
pub fn by_id(mapping: Mapping) -> Mapping {
    mapping
        .with_upsert(spillway_core::Upsert {
            key: vec!["id".into()],
            on_conflict: spillway_core::OnConflict::Update,
            delete_when: None,
        })
        .expect("a valid upsert")
}

/// A batch of issue 17's upsert bench and the table it meets: every tenth record repeats a
/// key used earlier in the batch, and half of the batch's keys already have a row.
#[derive(Debug)]
pub struct UpsertBatch {
    /// The batch: [`typed_record`]s with an `id`, partition 0, offsets from 0, one record per
    /// message.
    pub records: Vec<Record>,
    /// One row for every other key of the batch, with other values: the table before the batch.
    pub preload: Vec<Record>,
    /// Keys of the batch without a row: the merge inserts one row each.
    pub new_keys: u64,
    /// Keys of the batch with a row: the merge updates it.
    pub old_keys: u64,
}

/// The [`UpsertBatch`] of `n` records. The `d`-th distinct key is `d * 7919 mod 1000003`
/// (distinct, and spread over the key's index rather than appended to its end); record `i`
/// with `i % 10 == 9` repeats record `i / 2`'s key, any other takes the next distinct key.
/// Keys with an even `d` are preloaded. No randomness: every run writes the same rows.
pub fn upsert_batch(n: u64) -> UpsertBatch {
    let scrambled = |d: u64| (d * 7919 % 1_000_003) as i64;
    let mut distinct = Vec::with_capacity(n as usize);
    for i in 0..n {
        let d = if i % 10 == 9 {
            distinct[(i / 2) as usize]
        } else {
            i - i / 10
        };
        distinct.push(d);
    }
    let keyed = |row: Record, key: i64, i: u64| Record {
        payload: keyed_record(key, i),
        ..row
    };
    let records = rows(n)
        .into_iter()
        .zip(&distinct)
        .enumerate()
        .map(|(i, (r, d))| Record {
            partition: 0,
            ..keyed(r, scrambled(*d), i as u64)
        })
        .collect();
    let keys = n - n / 10;
    let preload = rows(keys.div_ceil(2))
        .into_iter()
        .enumerate()
        .map(|(j, r)| keyed(r, scrambled(2 * j as u64), n + j as u64))
        .collect();
    UpsertBatch {
        records,
        preload,
        new_keys: keys / 2,
        old_keys: keys.div_ceil(2),
    }
}

/// [`typed_record`] `i` with `"id": key` first.
fn keyed_record(key: i64, i: u64) -> Vec<u8> {
    let record = typed_record(i);
    let mut out = format!("{{\"id\":{key},").into_bytes();
    out.extend_from_slice(&record[1..]);
    out
}

/// The values of `type` in the routing bench's records (issue 17), in turn: the first two
/// have a `--route` rule each, the third goes to the records table.
pub const ROUTED_TYPES: [&str; 3] = ["click", "order", "view"];

/// `n` [`record`]s of partition 0 (offsets from 0), each with `"type"` first: record `i` is
/// a `ROUTED_TYPES[i % 3]`, so each type has a third of them.
pub fn routed_rows(n: u64) -> Vec<Record> {
    rows(n)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let kind = ROUTED_TYPES[i % ROUTED_TYPES.len()];
            let mut payload = format!("{{\"type\":\"{kind}\",").into_bytes();
            payload.extend_from_slice(&r.payload[1..]);
            Record {
                partition: 0,
                payload,
                ..r
            }
        })
        .collect()
}

/// Mean time per iteration (ns) that criterion recorded for `group/id`, if any.
pub fn criterion_mean_ns(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // criterion turns '/' in names into '_' for its directories.
    let path = dir
        .join("criterion")
        .join(group.replace('/', "_"))
        .join(id.replace('/', "_"))
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Prints each benchmark's throughput as a ratio to `baseline` (same group, same run).
/// Run alone (`cargo bench --bench NAME`) it also reprints the last run's table.
pub fn print_ratios(group: &str, ids: &[(String, u64)], baseline: &str) {
    let Some(base_ns) = ids
        .iter()
        .find(|(id, _)| id == baseline)
        .and_then(|(id, n)| criterion_mean_ns(group, id).map(|ns| ns / *n as f64))
    else {
        return;
    };
    println!("\n{group}: throughput relative to {baseline}");
    println!("{:<40}{:>16}{:>10}", "benchmark", "records/s", "ratio");
    for (id, n) in ids {
        if let Some(ns) = criterion_mean_ns(group, id) {
            let per = ns / *n as f64;
            println!("{:<40}{:>16.0}{:>10.3}", id, 1e9 / per, base_ns / per);
        }
    }
}

use spillway_core::pgcopy;
use spillway_core::Mapping;
use spillway_core::{Envelope, ProducerSequence, Record, RequestId};

/// `n` rows as the consumer would write them (one record per message, 4 partitions).
pub fn rows(n: u64) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            partition: (i % 4) as i32,
            offset: i as i64,
            index: 0,
            last_in_message: true,
            received_at_micros: 1_764_000_000_000_000,
            request_id: RequestId::from_u128(0),
            sequenced: false,
            idempotency_key: None,
            kafka: None,
            payload: record(i),
        })
        .collect()
}

/// The records table's DDL for `table`.
pub fn create_table(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, \
         record_index int NOT NULL, received_at timestamptz NOT NULL, data jsonb NOT NULL)"
    )
}

/// COPY BINARY of `rows` into `table`, `batch` rows per transaction: the limit the consumer is
/// measured against.
pub async fn raw_copy(
    client: &mut tokio_postgres::Client,
    table: &str,
    rows: &[Record],
    batch: usize,
) -> Result<(), tokio_postgres::Error> {
    let mapping = Mapping::default();
    encode_and_copy(client, table, rows, batch, &mapping).await
}

/// The consumer's write path with `mapping`: each batch of `rows` converted and encoded
/// (core's `CopyRows`), then one COPY BINARY per transaction.
pub async fn encode_and_copy(
    client: &mut tokio_postgres::Client,
    table: &str,
    rows: &[Record],
    batch: usize,
    mapping: &Mapping,
) -> Result<(), tokio_postgres::Error> {
    let columns = mapping.copy_columns();
    for chunk in rows.chunks(batch) {
        let size = chunk
            .iter()
            .map(|r| r.payload.len() + pgcopy::ROW_OVERHEAD)
            .sum();
        let data = pgcopy::encode_all(mapping, chunk, size)
            .map(bytes::Bytes::from)
            .expect("the bench rows fit the mapping");
        copy_encoded(client, table, &columns, data).await?;
    }
    Ok(())
}

/// Encodes `rows` with `mapping` in batches of `batch`, ahead of time (for [`copy_encoded`]).
pub fn encode_batches(rows: &[Record], batch: usize, mapping: &Mapping) -> Vec<bytes::Bytes> {
    rows.chunks(batch)
        .map(|chunk| {
            pgcopy::encode_all(mapping, chunk, 0)
                .map(bytes::Bytes::from)
                .expect("the bench rows fit the mapping")
        })
        .collect()
}

/// One COPY BINARY of already encoded rows into `columns` of `table`, in a transaction.
pub async fn copy_encoded(
    client: &mut tokio_postgres::Client,
    table: &str,
    columns: &str,
    data: bytes::Bytes,
) -> Result<(), tokio_postgres::Error> {
    use futures::SinkExt;
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    futures::pin_mut!(sink);
    sink.send(data).await?;
    sink.as_mut().finish().await?;
    tx.commit().await
}

/// Drops `tables` once a case has measured them, so that autovacuum working through earlier
/// iterations' rows does not count against later ones (CPU from /proc included).
pub async fn drop_tables(client: &tokio_postgres::Client, tables: &[&str]) {
    let sql = format!("DROP TABLE IF EXISTS {}", tables.join(", "));
    client
        .batch_execute(&sql)
        .await
        .expect("drop the measured tables");
}

/// [`copy_encoded`] of `batches` over all of `clients` at once (batch i on client i mod n): the
/// raw write at the consumer's parallelism (its pool of connections).
pub async fn copy_encoded_parallel(
    clients: &mut [tokio_postgres::Client],
    table: &str,
    columns: &str,
    batches: &[bytes::Bytes],
) -> Result<(), tokio_postgres::Error> {
    let n = clients.len();
    let writers = clients
        .iter_mut()
        .enumerate()
        .map(|(i, client)| async move {
            for data in batches.iter().skip(i).step_by(n) {
                copy_encoded(client, table, columns, data.clone()).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        });
    futures::future::try_join_all(writers).await.map(|_| ())
}

/// Produces a backlog of `records` records, `per_message` per envelope, to `topic`; with
/// `json_topic`, the same records also as the Python original's messages
/// (`{"data": [...], "received": ...}`).
pub async fn produce_backlog(
    bootstrap: &str,
    topic: &str,
    json_topic: Option<&str>,
    records: u64,
    per_message: u64,
) -> Result<(), rdkafka::error::KafkaError> {
    let sequenced = true;
    let idempotency_keys = false;
    produce_backlog_of(
        bootstrap,
        topic,
        json_topic,
        records,
        per_message,
        record,
        sequenced,
        idempotency_keys,
    )
    .await
}

/// [`produce_backlog`] with records made by `record` (e.g. [`typed_record`]), and sequenced
/// request ids as the producer's (or, to measure what they cost the consumer, unsequenced ones
/// as an older producer's); with `idempotency_keys`, each message carries a distinct
/// idempotency key (`<topic>-<message number>`), as the producer's messages of requests sent
/// with an `Idempotency-Key` do.
#[allow(clippy::too_many_arguments)]
pub async fn produce_backlog_of(
    bootstrap: &str,
    topic: &str,
    json_topic: Option<&str>,
    records: u64,
    per_message: u64,
    record: fn(u64) -> Vec<u8>,
    sequenced: bool,
    idempotency_keys: bool,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    // Idempotent, as the producer's: the consumer relies on sequenced messages staying in
    // order within a partition.
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .create()?;
    let mut pending = Vec::new();
    for m in 0..records / per_message {
        let recs: Vec<Vec<u8>> = (0..per_message)
            .map(|i| record(m * per_message + i))
            .collect();
        let idempotency_key = idempotency_keys.then(|| format!("{topic}-{m}"));
        let env = Envelope {
            received_at_micros: 1_764_000_000_000_000,
            // As the producer numbers its messages: the consumer stores each batch's highest.
            request_id: RequestId::sequenced(ProducerSequence {
                producer: 1,
                sequence: m,
            }),
            sequenced,
            idempotency_key: idempotency_key.as_deref(),
            source: None,
            records: recs.iter().map(|r| r.as_slice()).collect(),
        }
        .encode();
        let key = m.to_string();
        pending.push(
            p.send_result(FutureRecord::to(topic).key(&key).payload(&env))
                .map_err(|(e, _)| e)?,
        );
        if let Some(jt) = json_topic {
            let data: Vec<String> = recs
                .iter()
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .collect();
            let json = format!(
                "{{\"data\": [{}], \"received\": \"2025-11-24T16:00:00+00:00\"}}",
                data.join(",")
            );
            pending.push(
                p.send_result(FutureRecord::to(jt).key(&key).payload(&json))
                    .map_err(|(e, _)| e)?,
            );
        }
        if pending.len() >= 5_000 {
            for f in pending.drain(..) {
                f.await
                    .map_err(|_| rdkafka::error::KafkaError::Canceled)?
                    .map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending {
        f.await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)?
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (Linux; in
/// clock ticks of 10 ms). Zero where that file is not readable.
pub fn process_cpu() -> std::time::Duration {
    stat_fields("self").map_or(std::time::Duration::ZERO, |f| {
        ticks(field(&f, 11) + field(&f, 12))
    })
}

/// CPU time (user + system) of process `root` and of every process it started: its own, its
/// reaped children's (`cutime`, `cstime`) and its live children's. For a Postgres cluster,
/// `root` is the postmaster and this is the whole server's CPU so far (backends that exited
/// were reaped by it). Linux only; zero where `/proc` is not readable.
pub fn process_tree_cpu(root: i32) -> std::time::Duration {
    let own = stat_fields(&root.to_string()).map_or(0, |f| {
        field(&f, 11) + field(&f, 12) + field(&f, 13) + field(&f, 14)
    });
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| stat_fields(&pid.to_string()))
        .filter(|f| field(f, 1) == root as u64)
        .map(|f| field(&f, 11) + field(&f, 12))
        .sum();
    ticks(own + children)
}

/// The fields of `/proc/<pid>/stat` from the first after the command name (which may hold
/// spaces): 1 is the parent's pid, 11 and 12 utime and stime, 13 and 14 the reaped children's.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// A numeric field of [`stat_fields`], 0 when missing.
fn field(fields: &[String], i: usize) -> u64 {
    fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// Clock ticks of 10 ms.
fn ticks(n: u64) -> std::time::Duration {
    std::time::Duration::from_millis(n * 10)
}

/// Checks that every message of a backlog is still in `topic` (librdkafka's mock cluster
/// keeps only the newest 5 MiB of each partition): each partition starts at offset 0 and the
/// partitions hold `messages` in all.
pub fn backlog_intact(bootstrap: &str, topic: &str, messages: u64) -> Result<(), String> {
    let marks = spillway_harness::kafka::watermarks(bootstrap, topic).map_err(|e| e.to_string())?;
    let mut held = 0u64;
    for (partition, (low, high)) in marks {
        if low != 0 {
            return Err(format!(
                "{topic}[{partition}] starts at offset {low}: the broker dropped the oldest \
                 messages (use more partitions or smaller records)"
            ));
        }
        held += high as u64;
    }
    if held != messages {
        return Err(format!("{topic} holds {held} messages, not {messages}"));
    }
    Ok(())
}

/// Samples `written()` until it reaches `total`; returns the time to write `total` rows at the
/// rate observed from the first row to the last, so start-up (joining the group) is not
/// counted as write time.
pub async fn drain_time(
    total: u64,
    mut written: impl FnMut() -> futures::future::BoxFuture<'static, u64>,
) -> std::time::Duration {
    use std::time::{Duration, Instant};
    let (mut first, mut first_rows) = (None, 0);
    loop {
        let n = written().await;
        if first.is_none() && n > 0 {
            first = Some(Instant::now());
            first_rows = n;
        }
        if n >= total {
            let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
            let rows = (total - first_rows).max(1);
            return elapsed.mul_f64(total as f64 / rows as f64);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_records_are_about_200_bytes_and_fit_the_typed_mapping() {
        let rows = typed_rows(1000);
        let mean = rows.iter().map(|r| r.payload.len()).sum::<usize>() / rows.len();
        assert!((180..=230).contains(&mean), "mean record size {mean}");
        let copy = pgcopy::encode_all(&typed_mapping(), &rows, 0);
        assert!(copy.is_ok(), "{copy:?}");
    }

    #[test]
    fn routed_rows_are_a_third_of_each_type_and_valid_json() {
        let rows = routed_rows(9);
        let types: Vec<String> = rows
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("JSON");
                v["type"].as_str().expect("a type").to_string()
            })
            .collect();
        assert_eq!(types, ROUTED_TYPES.repeat(3));
        assert!(rows.iter().all(|r| r.partition == 0));
    }

    #[test]
    fn an_upsert_batch_repeats_a_tenth_of_its_keys_and_half_its_keys_are_preloaded() {
        use std::collections::HashSet;
        let key = |r: &Record| -> i64 {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("JSON");
            v["id"].as_i64().expect("an id")
        };
        let b = upsert_batch(10_000);
        let keys: Vec<i64> = b.records.iter().map(key).collect();
        let distinct: HashSet<i64> = keys.iter().copied().collect();
        let preloaded: HashSet<i64> = b.preload.iter().map(key).collect();
        assert_eq!(distinct.len(), 9_000);
        assert_eq!((b.new_keys, b.old_keys), (4_500, 4_500));
        assert_eq!(preloaded.len(), 4_500);
        assert!(preloaded.is_subset(&distinct));
        let offsets: Vec<i64> = b.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..10_000).collect::<Vec<_>>());
        for m in [by_id(keyed_mapping(true)), keyed_mapping(false)] {
            for rows in [&b.records, &b.preload] {
                let copy = pgcopy::encode_all(&m, rows, 0);
                assert!(copy.is_ok(), "{copy:?}");
            }
        }
    }
}
