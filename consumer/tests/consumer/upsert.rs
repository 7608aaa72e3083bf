//! Writing by key (`--upsert-key`) on a real Postgres (and, end to end, a real broker): each
//! key's row is what applying its records one by one, in Kafka order, leaves; a batch written
//! again changes no row.

use super::*;
use spillway_consumer::pg::{self, TableName, Target, Targets};
use spillway_core::batcher::{Batch, BatchId, Entry, Record};
use spillway_core::{FlushResult, Mapping, Position, Upsert};

fn upsert_mapping(on_conflict: &str) -> Mapping {
    let columns = ["id:bigint=/id", "name:text=/name"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    Mapping::new(columns, true)
        .unwrap()
        .with_upsert(Upsert {
            key: vec!["id".into()],
            on_conflict: on_conflict.parse().unwrap(),
            delete_when: Some("/op=delete".parse().unwrap()),
        })
        .unwrap()
}

/// A batch of partition 0 from `start` to `end` (message offsets), `messages[i]` the records
/// of message `start + i`.
fn batch(start: i64, messages: &[&[&str]]) -> Batch {
    let mut entries = vec![];
    for (i, records) in messages.iter().enumerate() {
        for (index, r) in records.iter().enumerate() {
            entries.push(Entry {
                record: Record {
                    partition: 0,
                    offset: start + i as i64,
                    index: index as u32,
                    last_in_message: index + 1 == records.len(),
                    received_at_micros: 1_764_000_000_000_000,
                    request_id: RequestId::from_u128(1),
                    sequenced: false,
                    idempotency_key: None,
                    kafka: None,
                    payload: r.as_bytes().to_vec(),
                },
                dead_reason: None,
                copy: false,
            });
        }
    }
    Batch {
        id: BatchId(start as u64),
        partition: 0,
        start: Position::new(start, 0),
        end: Position::new(start + messages.len() as i64, 0),
        entries,
        attempt: 1,
        oldest_pushed_at: std::time::Instant::now(),
        check_start: true,
        position_with_rows: true,
    }
}

/// Every row as (id, name, the row version's xmin): a write that changes nothing visible
/// still makes a new version.
async fn table_state(
    c: &tokio_postgres::Client,
    table: &str,
) -> Result<Vec<(i64, String, String)>> {
    Ok(c.query(
        &format!("SELECT id, name, xmin::text FROM {table} ORDER BY id"),
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect())
}

/// Writes `b` as the consumer named after the table would.
async fn write(
    c: &mut tokio_postgres::Client,
    targets: &Targets,
    b: &Batch,
) -> (FlushResult, Option<spillway_consumer::upsert::Merged>) {
    let rows = pg::encode_rows(b, targets).unwrap();
    let name = targets.tables[0].table.plain.clone();
    let flushed = pg::flush(c, targets, &name, b, rows).await;
    (flushed.result, flushed.merged)
}

/// Fault: a batch committed in Postgres is written again (as after a crash between the
/// Postgres commit and the Kafka commit), after a later batch changed and deleted keys.
/// Invariant: within a batch each key ends as its records applied one by one leave it (the
/// last record for `update`, the first after the last delete for `ignore`); the replay is
/// fenced and leaves every row, values and row versions, as it was. No randomness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_changes_no_row_and_each_key_is_its_records_applied_in_order() -> Result<()>
{
    let pg = blocking(spillway_harness::postgres_from_env).await?;
    let mut c = connect(&pg.url()).await?;
    let b1 = batch(
        0,
        &[
            &[
                r#"{"id":1,"name":"a"}"#,
                r#"{"id":2,"name":"b"}"#,
                r#"{"id":1,"name":"c"}"#,
                r#"{"id":3,"name":"x"}"#,
                r#"{"id":3,"op":"delete"}"#,
            ],
            &[
                r#"{"id":4,"name":"d"}"#,
                r#"{"id":4,"op":"delete"}"#,
                r#"{"id":4,"name":"e"}"#,
                r#"{"id":4,"name":"g"}"#,
            ],
        ],
    );
    let b2 = batch(
        2,
        &[&[r#"{"id":2,"op":"delete"}"#, r#"{"id":1,"name":"f"}"#]],
    );
    let s = |id: i64, name: &str| (id, name.to_string());
    for (table, on_conflict, after_b1, after_b2) in [
        (
            "latest",
            "update",
            vec![s(1, "c"), s(2, "b"), s(4, "g")],
            vec![s(1, "f"), s(4, "g")],
        ),
        (
            "first",
            "ignore",
            vec![s(1, "a"), s(2, "b"), s(4, "e")],
            vec![s(1, "a"), s(4, "e")],
        ),
    ] {
        let mapping = upsert_mapping(on_conflict);
        let name = TableName::parse(table).unwrap();
        let target = Targets::single(Target::new(name, &mapping), TOPIC);
        pg::migrate(&mut c, &target)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        pg::position(&c, table, TOPIC, 0)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let options: Option<Vec<String>> = c
            .query_one(
                "SELECT reloptions FROM pg_class WHERE oid = $1::text::regclass",
                &[&table],
            )
            .await?
            .get(0);
        assert_eq!(
            options,
            Some(vec![format!(
                "fillfactor={}",
                spillway_consumer::upsert::FILLFACTOR
            )]),
            "{table}: a table created to be written by key keeps room on its pages for updates"
        );
        let names = |rows: &[(i64, String, String)]| -> Vec<(i64, String)> {
            rows.iter().map(|(i, n, _)| (*i, n.clone())).collect()
        };
        let (result, merged) = write(&mut c, &target, &b1).await;
        assert!(
            matches!(result, FlushResult::Written),
            "{table}: {result:?}"
        );
        assert_eq!(names(&table_state(&c, table).await?), after_b1, "{table}");
        let merged = merged.unwrap();
        assert_eq!(
            (
                merged.inserted,
                merged.updated,
                merged.deleted,
                merged.unchanged
            ),
            (3, 0, 0, 6),
            "{table}: one record per key decided its row, on an empty table"
        );
        let (result, merged) = write(&mut c, &target, &b2).await;
        assert!(
            matches!(result, FlushResult::Written),
            "{table}: {result:?}"
        );
        let before = table_state(&c, table).await?;
        assert_eq!(names(&before), after_b2, "{table}");
        let merged = merged.unwrap();
        assert_eq!(merged.deleted, 1, "{table}");
        let changed = if on_conflict == "update" { 1 } else { 0 };
        assert_eq!(
            (merged.updated, merged.unchanged),
            (changed, 1 - changed),
            "{table}"
        );

        let (replayed, merged) = write(&mut c, &target, &b1).await;
        assert!(
            matches!(replayed, FlushResult::Fenced),
            "{table}: {replayed:?}"
        );
        assert!(merged.is_none());
        assert_eq!(
            table_state(&c, table).await?,
            before,
            "{table}: the replay changed a row"
        );
    }
    Ok(())
}

/// One idempotent producer for a whole test: a new one per round asked Tansu 0.6.0 for a
/// producer id each time, and once its broker stopped answering every client for minutes.
fn keyed_producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?)
}

/// Produces messages keyed so that every record of one id goes to the same partition (its
/// Kafka order is then the order they were sent in): `messages[i]` is one message's records,
/// all of the id `keys[i]`.
async fn produce_by_key(p: &FutureProducer, keys: &[u64], messages: &[Vec<String>]) -> Result<()> {
    let mut pending = vec![];
    for (key, records) in keys.iter().zip(messages) {
        let env = Envelope {
            received_at_micros: 1_764_000_000_000_000,
            request_id: RequestId::from_u128(u128::from(*key)),
            sequenced: false,
            idempotency_key: None,
            source: None,
            records: records.iter().map(|r| r.as_bytes()).collect(),
        };
        let payload = env.encode();
        let kafka_key = format!("user-{key}");
        pending.push(
            p.send_result(FutureRecord::to(TOPIC).key(&kafka_key).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Waits until the stored positions, summed over partitions, reach `messages`.
pub(super) async fn wait_positions(url: &str, messages: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = -1;
    loop {
        if let Ok(c) = connect(url).await {
            if let Ok(row) = c
                .query_one(
                    "SELECT coalesce(sum(next_offset), 0)::bigint FROM spillway_offsets",
                    &[],
                )
                .await
            {
                last = row.get(0);
                if last >= messages {
                    return Ok(());
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the positions are at {last} of {messages} messages after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const KEYS: u64 = 50;

/// Round `round` of the traffic: one message per id holding two values in turn,
/// `{"id":k,"v":2*round}` then `2*round+1`, so every batch has a key written twice. In the
/// last round every fifth id is written then deleted, and the next one deleted then written.
/// A record without an id, in one message per round, is a dead letter.
fn round(round: u64, last: bool) -> (Vec<u64>, Vec<Vec<String>>) {
    (0..KEYS)
        .map(|k| {
            let put = |v: u64| format!(r#"{{"id":{k},"v":{v}}}"#);
            let delete = format!(r#"{{"id":{k},"op":"delete"}}"#);
            let mut records = match (last, k % 5) {
                (true, 0) => vec![put(2 * round), delete],
                (true, 1) => vec![delete, put(2 * round + 1)],
                _ => vec![put(2 * round), put(2 * round + 1)],
            };
            if k == 7 {
                records.push(format!(r#"{{"v":{round},"no":"id"}}"#));
            }
            (k, records)
        })
        .unzip()
}

/// Each id's row holds the last value sent, the ids deleted last are gone, and each
/// record without an id is a dead letter naming the key column.
async fn assert_latest_per_key(url: &str, rounds: u64) -> Result<()> {
    let c = connect(url).await?;
    let rows: BTreeMap<i64, i64> = c
        .query("SELECT id, v FROM records", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: BTreeMap<i64, i64> = (0..KEYS as i64)
        .filter(|k| k % 5 != 0)
        .map(|k| (k, 2 * rounds as i64 - 1))
        .collect();
    ensure!(rows == want, "rows per key {rows:?}, expected {want:?}");
    let dead: Vec<String> = c
        .query("SELECT error FROM records_dead_letters", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        dead.len() as u64 == rounds,
        "{} dead letters, expected one per round: {dead:?}",
        dead.len()
    );
    ensure!(
        dead.iter()
            .all(|e| e.contains("column id") && e.contains("missing")),
        "dead letters should name the missing key: {dead:?}"
    );
    Ok(())
}

fn by_key(brokers: &str, url: &str) -> Settings {
    let mut s = typed(brokers, url, &["id:bigint=/id", "v:bigint=/v"], true);
    s.mapping = s
        .mapping
        .with_upsert(Upsert {
            key: vec!["id".into()],
            on_conflict: Default::default(),
            delete_when: Some("/op=delete".parse().unwrap()),
        })
        .unwrap();
    s
}

/// Fault: a second consumer joins mid-stream (rebalance: both may hold a batch of the same
/// partition at once; the compare-and-set lets one through), then the first stops, while ids
/// are updated round after round. Invariant: every id ends at its last value (or deleted), and
/// each record without an id is one dead letter. No randomness (the broker's partitioner
/// places the ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_racing_on_a_rebalance_leave_each_key_at_its_last_value() -> Result<()> {
    let s = stack(4).await?;
    let bootstrap = s.broker.bootstrap();
    const ROUNDS: u64 = 40;
    let a = start(by_key(&bootstrap, &s.pg.url())).await?;
    let p = keyed_producer(&bootstrap)?;
    for r in 0..ROUNDS / 2 {
        let (keys, messages) = round(r, false);
        produce_by_key(&p, &keys, &messages).await?;
    }
    let b = start(by_key(&bootstrap, &s.pg.url())).await?;
    let producing = {
        let p = p.clone();
        tokio::spawn(async move {
            for r in ROUNDS / 2..ROUNDS {
                let (keys, messages) = round(r, r == ROUNDS - 1);
                produce_by_key(&p, &keys, &messages).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    wait_until_it_writes(&b).await?;
    stop(a).await?;
    producing.await??;
    wait_positions(&s.pg.url(), (ROUNDS * KEYS) as i64).await?;
    assert_latest_per_key(&s.pg.url(), ROUNDS).await?;
    ensure!(
        metric(&b, "spillway_consumer_upsert_records_total")? > 0.0,
        "the merges are counted"
    );
    stop(b).await
}

/// Fault: the consumer process is SIGKILLed right after its second Postgres commit, before
/// the Kafka commit, then a new consumer starts. Invariant: the committed batches are not
/// merged again (their positions moved with them), and every id ends at its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_the_commits_leaves_each_key_at_its_last_value() -> Result<()> {
    let s = stack(1).await?;
    const ROUNDS: u64 = 30;
    let p = keyed_producer(&s.broker.bootstrap())?;
    for r in 0..ROUNDS {
        let (keys, messages) = round(r, r == ROUNDS - 1);
        produce_by_key(&p, &keys, &messages).await?;
    }
    let args = [
        "--batch-max-records",
        "100",
        "--column",
        "id:bigint=/id",
        "--column",
        "v:bigint=/v",
        "--upsert-key",
        "id",
        "--delete-when",
        "/op=delete",
    ];
    killed_between_the_commits(&s, &args).await?;
    let c = connect(&s.pg.url()).await?;
    let at: i64 = c
        .query_one("SELECT next_offset FROM spillway_offsets", &[])
        .await?
        .get(0);
    ensure!(
        at > 0 && at < (ROUNDS * KEYS) as i64,
        "the crash should leave a partial write, the position is at {at}"
    );
    let consumer = start(by_key(&s.broker.bootstrap(), &s.pg.url())).await?;
    wait_positions(&s.pg.url(), (ROUNDS * KEYS) as i64).await?;
    assert_latest_per_key(&s.pg.url(), ROUNDS).await?;
    stop(consumer).await
}

/// A table that already holds two rows with one key cannot get the unique index the key
/// needs: the consumer refuses to start, says why and what to do, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_duplicate_keys_refuses_to_start_and_says_what_to_do() -> Result<()> {
    let s = stack(1).await?;
    let c = connect(&s.pg.url()).await?;
    c.batch_execute(
        "CREATE TABLE records (kafka_partition int NOT NULL, kafka_offset bigint NOT NULL,
             record_index int NOT NULL, received_at timestamptz NOT NULL, data jsonb NOT NULL,
             id bigint, v bigint);
         INSERT INTO records VALUES (0, 0, 0, now(), '{}', 1, 1), (0, 1, 0, now(), '{}', 1, 2);",
    )
    .await?;
    let err = start(by_key(&s.broker.bootstrap(), &s.pg.url()))
        .await
        .err()
        .context("a consumer started on a table it cannot write by key")?;
    let text = err.to_string();
    ensure!(
        text.contains("unique index on (\"id\")") && text.contains("remove the duplicates"),
        "{text}"
    );
    Ok(())
}
