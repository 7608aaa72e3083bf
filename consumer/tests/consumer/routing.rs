//! Routing (`--route`) on a real Postgres and broker: each record lands in exactly one table,
//! each table with its own columns and dead letters, and a batch that spans tables is one
//! transaction with one position per partition, kept under the consumer's name.

use super::upsert::wait_positions;
use super::*;
use spillway_consumer::config::TableSpec;
use spillway_consumer::pg::TableName;
use spillway_core::{Mapping, Upsert};

/// Record `i` of the traffic: a click, an order, a view (no rule) or no type at all, in turn;
/// every 50th order has no id, which its table's key needs.
fn record(i: u64) -> String {
    match i % 4 {
        0 => format!(r#"{{"id":{i},"type":"click"}}"#),
        1 if i % 50 == 1 => format!(r#"{{"type":"order","no_id":{i}}}"#),
        1 => format!(r#"{{"id":{i},"type":"order","total":{i}.5}}"#),
        2 => format!(r#"{{"id":{i},"type":"view"}}"#),
        _ => format!(r#"{{"id":{i}}}"#),
    }
}

async fn ids(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<i64>> {
    let mut ids: Vec<i64> = c.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Fault: none; the check is the split. Traffic with four kinds of record in every message,
/// over two partitions, routed to three tables: clicks (the records table's jsonb mapping),
/// orders (typed, written by key, without `data`) and the records table for the rest.
/// Invariant: every record is in exactly the table its first matching rule names (or the
/// records table), an order without its key is a dead letter of the orders table only, and
/// each partition has one stored position, under the consumer's name. No randomness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_writes_each_record_to_exactly_one_table_with_its_own_columns() -> Result<()> {
    let s = stack(2).await?;
    const MESSAGES: u64 = 300;
    const PER: u64 = 8;
    let messages: Vec<Vec<String>> = (0..MESSAGES)
        .map(|m| (m * PER..(m + 1) * PER).map(record).collect())
        .collect();
    produce_typed(&s.broker.bootstrap(), &messages).await?;
    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.name = Some("router".into());
    let orders = Mapping::new(
        vec![
            "id:bigint=/id".parse().unwrap(),
            "total:numeric=/total".parse().unwrap(),
        ],
        false,
    )
    .unwrap()
    .with_upsert(Upsert {
        key: vec!["id".into()],
        on_conflict: Default::default(),
        delete_when: None,
    })
    .unwrap();
    cfg.routed = vec![
        TableSpec {
            table: TableName::parse("clicks").unwrap(),
            mapping: Mapping::default(),
            partitioning: None,
        },
        TableSpec {
            table: TableName::parse("orders").unwrap(),
            mapping: orders,
            partitioning: None,
        },
    ];
    cfg.routes = vec![
        ("/type=click".parse().unwrap(), "clicks".into()),
        ("/type=order".parse().unwrap(), "orders".into()),
    ];
    let consumer = start(cfg).await?;
    wait_positions(&s.pg.url(), MESSAGES as i64).await?;

    let c = connect(&s.pg.url()).await?;
    let all = 0..MESSAGES * PER;
    let want = |f: &dyn Fn(u64) -> bool| -> Vec<i64> {
        all.clone().filter(|i| f(*i)).map(|i| i as i64).collect()
    };
    let clicks = ids(&c, "SELECT (data->>'id')::bigint FROM clicks").await?;
    ensure!(clicks == want(&|i| i % 4 == 0), "clicks: {clicks:?}");
    let orders = ids(&c, "SELECT id FROM orders").await?;
    ensure!(
        orders == want(&|i| i % 4 == 1 && i % 50 != 1),
        "orders: {orders:?}"
    );
    let rest = ids(&c, "SELECT (data->>'id')::bigint FROM records").await?;
    ensure!(rest == want(&|i| i % 4 >= 2), "records: {rest:?}");
    let dead = ids(
        &c,
        "SELECT (raw::jsonb->>'no_id')::bigint FROM orders_dead_letters WHERE error LIKE '%column id%'",
    )
    .await?;
    ensure!(
        dead == want(&|i| i % 4 == 1 && i % 50 == 1),
        "orders' dead letters: {dead:?}"
    );
    for other in ["records_dead_letters", "clicks_dead_letters"] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {other}"), &[])
            .await?
            .get(0);
        ensure!(n == 0, "{n} dead letters in {other}");
    }
    let positions: Vec<(String, i32)> = c
        .query(
            "SELECT consumer, kafka_partition FROM spillway_offsets ORDER BY 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(
        positions == [("router".to_string(), 0), ("router".to_string(), 1)],
        "one position per partition under the consumer's name: {positions:?}"
    );
    let routed = metric(&consumer, "spillway_consumer_routed_records_total")?;
    ensure!(
        routed == (MESSAGES * PER) as f64,
        "{routed} records counted per table, {} sent",
        MESSAGES * PER
    );
    stop(consumer).await
}

/// Fault: a database written before routing, whose positions are kept under the table's name
/// in a `table_name` column, halfway through the topic. Invariant: the upgraded consumer
/// (whose name defaults to the table's) renames the column, keeps the position, and writes
/// only the records after it: none again, none lost. No randomness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_stored_under_the_table_name_survive_the_upgrade() -> Result<()> {
    let s = stack(1).await?;
    let messages: Vec<Vec<String>> = (0..200).map(|i| vec![format!(r#"{{"id":{i}}}"#)]).collect();
    produce_typed(&s.broker.bootstrap(), &messages).await?;
    let c = connect(&s.pg.url()).await?;
    c.batch_execute(
        "CREATE TABLE spillway_offsets (
             table_name text NOT NULL, topic text NOT NULL, kafka_partition int NOT NULL,
             next_offset bigint NOT NULL, next_index int NOT NULL,
             updated_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (table_name, topic, kafka_partition));
         INSERT INTO spillway_offsets (table_name, topic, kafka_partition, next_offset, next_index)
             VALUES ('records', 'events', 0, 120, 0);",
    )
    .await?;
    let consumer = start(settings(&s.broker.bootstrap(), &s.pg.url())).await?;
    wait_positions(&s.pg.url(), 200).await?;
    let written = ids(&c, "SELECT (data->>'id')::bigint FROM records").await?;
    ensure!(
        written == (120..200).collect::<Vec<i64>>(),
        "expected exactly the records after the stored position: {written:?}"
    );
    stop(consumer).await
}
