//! The fast broker (Tansu's successor with its in-memory engine, for benchmarks) is fit to
//! measure with: it serves a fetch from inside a stored batch (Tansu 0.6.0's in-memory engine
//! skipped that batch) and a backlog drains from it completely.
//!
//! Ignored by default: the test command does not build the fast broker. `ci/fast-broker.sh`
//! builds it and runs these with `--ignored`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use spillway_harness::kafka::read_all;
use spillway_harness::{KafkaBroker, Tansu};

const TOPIC: &str = "events";

/// Sends `n` messages to partition `partition`, as few produce requests as librdkafka makes of
/// them (a long linger: they are stored as large batches), and waits for every acknowledgement.
fn produce(bootstrap: &str, partition: i32, from: u64, n: u64) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "200")
        .set("batch.num.messages", "10000")
        .set("acks", "all")
        .create()?;
    for i in from..from + n {
        let payload = format!("record-{i}");
        let key = i.to_string();
        let mut record = BaseRecord::to(TOPIC)
            .partition(partition)
            .key(&key)
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    ensure!(
                        e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        "produce: {e}"
                    );
                    producer.poll(Duration::from_millis(10));
                    record = r;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

fn start() -> Result<(Tansu, tokio::runtime::Runtime)> {
    let broker = Tansu::start_in_memory()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(broker.create_topic(TOPIC, 2))?;
    Ok((broker, rt))
}

/// Fault avoided: Tansu 0.6.0's in-memory engine answers a fetch from an offset inside a stored
/// batch by skipping that batch. Invariant: a consumer that seeks into the middle of a batch
/// (what Spillway's consumer does after every restart or rebalance) reads the rest of it.
#[test]
#[ignore = "needs the fast broker: ci/fast-broker.sh builds it and runs this"]
fn a_fetch_from_inside_a_batch_reads_the_rest_of_it() -> Result<()> {
    let (broker, _rt) = start()?;
    produce(&broker.bootstrap(), 0, 0, 100)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "fast-broker-check")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, Offset::Offset(37))?;
    consumer.assign(&tpl)?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 63 && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            seen.push((m.offset(), m.payload().map(<[u8]>::to_vec)));
        }
    }
    let expected: Vec<(i64, Option<Vec<u8>>)> = (37..100)
        .map(|i| (i, Some(format!("record-{i}").into_bytes())))
        .collect();
    ensure!(
        seen == expected,
        "a fetch from offset 37 returned offsets {:?}, expected 37..100",
        seen.iter().map(|(o, _)| *o).collect::<Vec<_>>()
    );
    Ok(())
}

/// Invariant: a backlog of 200,000 messages over two partitions, written in large batches,
/// reads back completely: every offset once, in order, with its payload.
#[test]
#[ignore = "needs the fast broker: ci/fast-broker.sh builds it and runs this"]
fn a_backlog_drains_completely() -> Result<()> {
    let (broker, _rt) = start()?;
    const PER_PARTITION: u64 = 100_000;
    for p in 0..2 {
        produce(
            &broker.bootstrap(),
            p,
            p as u64 * PER_PARTITION,
            PER_PARTITION,
        )?;
    }
    let all = read_all(&broker.bootstrap(), TOPIC, Duration::from_secs(300))?;
    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for ((p, o), payload) in &all {
        let want = format!("record-{}", *p as u64 * PER_PARTITION + *o as u64);
        ensure!(
            payload == want.as_bytes(),
            "partition {p} offset {o}: {:?}, expected {want}",
            String::from_utf8_lossy(payload)
        );
        per_partition.entry(*p).or_default().push(*o);
    }
    for p in 0..2 {
        let offsets = per_partition.remove(&p).unwrap_or_default();
        ensure!(
            offsets == (0..PER_PARTITION as i64).collect::<Vec<_>>(),
            "partition {p}: read {} offsets, not 0..{PER_PARTITION} each once",
            offsets.len()
        );
    }
    Ok(())
}
