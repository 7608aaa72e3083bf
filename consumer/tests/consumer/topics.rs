//! Several topics in one consumer (`--topic a,b:table`) on a real Postgres and broker: each
//! topic's records land in its own table exactly once, through a crash, with positions kept
//! per (consumer, topic, partition) and Kafka's own partition numbers in the rows.

use super::*;
use spillway_consumer::config::TableSpec;
use spillway_consumer::pg::TableName;
use spillway_core::{Mapping, Topics};

const ORDERS: &str = "orders";

/// Fault: the consumer process, started from the command line with
/// `--topic events,orders:order_rows`, SIGKILLs itself between the Postgres and the Kafka commit
/// of its second batch (failpoint); a new consumer then reads both topics. Invariant: every
/// record of `events` is in `events` and every record of `orders` in `order_rows`, each exactly
/// once and in no other table; each table's `kafka_partition` is Kafka's number (0 or 1 for
/// both topics); the positions are one per (consumer, topic, partition), under `--name`; the
/// lag is reported per topic. No randomness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_topic_lands_in_its_own_table_exactly_once_through_a_crash() -> Result<()> {
    let s = stack(2).await?;
    s.broker.create_topic(ORDERS, 2).await?;
    let (events, orders) = (0..1500, 100_000..101_200);
    produce_to(&s.broker.bootstrap(), TOPIC, events.clone(), 3, &[]).await?;
    produce_to(&s.broker.bootstrap(), ORDERS, orders.clone(), 4, &[]).await?;
    let topics = format!("{TOPIC},{ORDERS}:order_rows");
    killed_between_the_commits(
        &s,
        &[
            "--topic",
            &topics,
            "--name",
            "both",
            "--batch-max-records",
            "200",
        ],
    )
    .await?;
    let c = connect(&s.pg.url()).await?;
    let count = |table: &'static str| {
        let c = &c;
        async move {
            let n: i64 = c
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
            Ok::<_, anyhow::Error>(n)
        }
    };
    let written = count("events").await? + count("order_rows").await?;
    ensure!(
        written > 0 && written < 2700,
        "the crash should leave partial tables, got {written} rows"
    );

    let mut cfg = settings(&s.broker.bootstrap(), &s.pg.url());
    cfg.topics = Topics::new(vec![TOPIC.into(), ORDERS.into()])?;
    cfg.table = TableName::parse("events").unwrap();
    cfg.topic_tables = vec!["events".into(), "order_rows".into()];
    cfg.routed = vec![TableSpec {
        table: TableName::parse("order_rows").unwrap(),
        mapping: Mapping::default(),
        partitioning: None,
    }];
    cfg.name = Some("both".into());
    let consumer = start(cfg).await?;
    // Messages: 500 of events, 300 of orders.
    upsert::wait_positions(&s.pg.url(), 800).await?;
    assert_exactly_once_in(&s.pg.url(), "events", events).await?;
    assert_exactly_once_in(&s.pg.url(), "order_rows", orders).await?;
    for table in ["events", "order_rows"] {
        let partitions: Vec<i32> = c
            .query(
                &format!("SELECT DISTINCT kafka_partition FROM {table} ORDER BY 1"),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            partitions == [0, 1],
            "{table} holds Kafka's partition numbers: {partitions:?}"
        );
    }
    let positions: Vec<(String, String, i32)> = c
        .query(
            "SELECT consumer, topic, kafka_partition FROM spillway_offsets ORDER BY 2, 3",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want: Vec<(String, String, i32)> = [(TOPIC, 0), (TOPIC, 1), (ORDERS, 0), (ORDERS, 1)]
        .iter()
        .map(|(t, p)| ("both".to_string(), t.to_string(), *p))
        .collect();
    let mut want = want;
    want.sort();
    ensure!(positions == want, "positions: {positions:?}");
    // The lag is read every 2 s; wait for a reading of both topics.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = consumer.metrics().registry.render()?;
        let has = |t: &str, p: i32| {
            page.contains(&format!(
                "spillway_consumer_lag_records{{topic=\"{t}\",partition=\"{p}\"}} 0"
            ))
        };
        if has(TOPIC, 1) && has(ORDERS, 1) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no lag of 0 for partition 1 of each topic:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(consumer).await
}
