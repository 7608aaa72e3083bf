//! The verdict on a table written by key (`--upsert-key`), for keyed traffic
//! ([`crate::payload::PayloadSpec::keys`]): after the pipeline is quiet, each key's row must be
//! its last state in Kafka's order, or absent when that last state deletes it.
//!
//! Only Kafka knows the order: two requests of one key in flight at once land in either order,
//! and a request answered 503 may still have landed. So the verdict reads the whole topic
//! (every envelope of the run), finds each key's last state by (offset, record index) in its
//! partition, and compares with the table. A key found in two partitions fails the verdict:
//! its order is undefined (the producer did not partition by `X-Spillway-Key`).

use std::collections::{hash_map, BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use spillway_core::{Envelope, RequestId};
use spillway_harness::postgres::connect;
use spillway_harness::HarnessError;

/// What the table holds against what Kafka's order says it should.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyedVerdict {
    /// Keys with at least one state of the run in Kafka.
    pub keys: u64,
    /// States of the run in Kafka (acknowledged or not: a 503'd request may have landed).
    pub states: u64,
    /// Keys whose last state deletes their row.
    pub deleted: u64,
    /// Keys whose row is not their last state (or is there though deleted, or missing).
    pub wrong: u64,
    /// Up to 20 of them, described.
    pub wrong_sample: Vec<String>,
    /// Keys found in more than one partition.
    pub split: u64,
}

impl KeyedVerdict {
    /// Every key's row is its last state, and each key kept to one partition.
    pub fn passed(&self) -> bool {
        self.keys > 0 && self.wrong == 0 && self.split == 0
    }
}

/// The one-line summary loadgen prints and the chaos suite notes.
impl std::fmt::Display for KeyedVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} keys, {} states in Kafka, {} deleted last; {} rows wrong, {} keys across partitions",
            self.keys, self.states, self.deleted, self.wrong, self.split
        )
    }
}

/// The messages of a topic that are copies of an earlier one, as a reader of the whole topic
/// tells them: a sequenced envelope whose request id an earlier message of its partition
/// already carried (the producer's Kafka client stored it twice). Feed each partition's
/// messages in offset order.
#[derive(Debug, Default)]
pub struct RequestsSeen(HashMap<(i32, RequestId), i64>);

impl RequestsSeen {
    /// If `env`, at `offset` of `partition`, copies an earlier message: that message's offset.
    /// Otherwise it is remembered as an original.
    pub fn original_of(&mut self, partition: i32, offset: i64, env: &Envelope) -> Option<i64> {
        if !env.sequenced {
            return None;
        }
        match self.0.entry((partition, env.request_id)) {
            hash_map::Entry::Occupied(original) => Some(*original.get()),
            hash_map::Entry::Vacant(new) => {
                new.insert(offset);
                None
            }
        }
    }
}

/// One state as Kafka holds it.
#[derive(Clone, Copy, Debug)]
struct State {
    partition: i32,
    offset: i64,
    index: usize,
    seq: i64,
    delete: bool,
}

/// Reads every message of `topic` up to its high watermarks (at most `within`), and returns
/// the states of run `run_id` (records with `"kind":"state"` whose `id_field` is
/// `<run_id>-<seq>`) by key. A second copy of a sequenced message (its request id seen before
/// in the partition: the producer's Kafka client stored it twice) is the consumer's to skip,
/// so it is no state here either.
fn read_states(
    brokers: &str,
    topic: &str,
    run_id: &str,
    id_field: &str,
    within: Duration,
) -> Result<BTreeMap<i64, Vec<State>>, HarnessError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("spillway-keyed-verdict-{run_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let mut ends = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
        if high > 0 {
            ends.insert(p.id(), high);
            list.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&list)?;
    let prefix = format!("{run_id}-");
    let mut by_key: BTreeMap<i64, Vec<State>> = BTreeMap::new();
    let mut read: BTreeMap<i32, i64> = BTreeMap::new();
    let mut seen = RequestsSeen::default();
    let deadline = Instant::now() + within;
    while ends
        .iter()
        .any(|(p, high)| read.get(p).is_none_or(|r| r < high))
    {
        if Instant::now() > deadline {
            return Err(HarnessError::Unsupported(format!(
                "read only {read:?} of the topic's {ends:?} messages within {within:?}"
            )));
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        read.insert(m.partition(), m.offset() + 1);
        let Some(env) = m.payload().and_then(|p| Envelope::decode(p).ok()) else {
            continue;
        };
        if seen.original_of(m.partition(), m.offset(), &env).is_some() {
            continue;
        }
        for (index, raw) in env.records.iter().enumerate() {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
                continue;
            };
            let ours = v[id_field]
                .as_str()
                .is_some_and(|id| id.starts_with(&prefix));
            if !ours || v["kind"] != "state" {
                continue;
            }
            let (Some(key), Some(seq)) = (v["key"].as_i64(), v["seq"].as_i64()) else {
                continue;
            };
            by_key.entry(key).or_default().push(State {
                partition: m.partition(),
                offset: m.offset(),
                index,
                seq,
                delete: v["op"] == "delete",
            });
        }
    }
    Ok(by_key)
}

/// Compares `table`'s `key` and `seq` columns with each key's last state in `topic`. Call it
/// once the pipeline is quiet (for example after [`crate::verify::verify`]).
pub async fn verify_latest_per_key(
    brokers: &str,
    topic: &str,
    database_url: &str,
    table: &str,
    run_id: &str,
    id_field: &str,
) -> Result<KeyedVerdict, HarnessError> {
    let (b, t, r, f) = (
        brokers.to_string(),
        topic.to_string(),
        run_id.to_string(),
        id_field.to_string(),
    );
    let states =
        tokio::task::spawn_blocking(move || read_states(&b, &t, &r, &f, Duration::from_secs(60)))
            .await
            .map_err(|e| HarnessError::Unsupported(format!("reading the topic: {e}")))??;
    let c = connect(database_url).await?;
    let rows: BTreeMap<i64, i64> = c
        .query(&format!("SELECT key, seq FROM {table}"), &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut v = KeyedVerdict::default();
    let wrong = |v: &mut KeyedVerdict, what: String| {
        v.wrong += 1;
        if v.wrong_sample.len() < 20 {
            v.wrong_sample.push(what);
        }
    };
    for (key, all) in &states {
        v.keys += 1;
        v.states += all.len() as u64;
        if all.iter().any(|s| s.partition != all[0].partition) {
            v.split += 1;
        }
        let Some(last) = all.iter().max_by_key(|s| (s.offset, s.index)) else {
            continue;
        };
        let row = rows.get(key).copied();
        if last.delete {
            v.deleted += 1;
            if let Some(seq) = row {
                wrong(
                    &mut v,
                    format!(
                        "key {key}: row of state {seq}, but state {} deleted it",
                        last.seq
                    ),
                );
            }
        } else if row != Some(last.seq) {
            wrong(
                &mut v,
                format!("key {key}: row {row:?}, last state {}", last.seq),
            );
        }
    }
    for (key, seq) in &rows {
        if !states.contains_key(key) {
            wrong(
                &mut v,
                format!("key {key}: row of state {seq}, but no state of it in Kafka"),
            );
        }
    }
    Ok(v)
}
