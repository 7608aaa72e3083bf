//! Known bugs a test can switch on, to show that the chaos suite catches each one
//! (`cargo test -p spillway-integration --features mutations --test chaos_mutations`).
//!
//! Only with the cargo feature `mutations`, which refuses release builds: then
//! `SPILLWAY_MUTATE=<name>` is read once, when the consumer starts, and an unknown name stops
//! it. Without the feature, [`active`] is `false` and every hook is dead code. Each hook in the
//! consumer is marked `MUTATION <name>` and is a line or three.

use std::collections::HashMap;

use spillway_core::{Batch, FlushOutcome, Partition, Position};

/// The environment variable naming the mutation.
pub const ENV: &str = "SPILLWAY_MUTATE";

/// A known bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// `no-compare-and-set`: a flush moves the partition's stored position without checking
    /// that it still holds the batch's start, so a zombie's or stale owner's batch lands.
    NoCompareAndSet,
    /// `commit-kafka-first`: on assignment the consumer starts where Kafka's committed group
    /// offsets say, not where Postgres's positions say, and it commits to Kafka before the
    /// Postgres flush instead of after it.
    CommitKafkaFirst,
    /// `drop-failed-batch`: a batch whose flush failed (retriable) is treated as written and
    /// dropped, as the original Python consumer did; the next flush moves the position past it.
    DropFailedBatch,
}

impl Mutation {
    /// Every mutation of the consumer.
    pub const ALL: [Mutation; 3] = [
        Mutation::NoCompareAndSet,
        Mutation::CommitKafkaFirst,
        Mutation::DropFailedBatch,
    ];

    /// Its `SPILLWAY_MUTATE` name.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::NoCompareAndSet => "no-compare-and-set",
            Mutation::CommitKafkaFirst => "commit-kafka-first",
            Mutation::DropFailedBatch => "drop-failed-batch",
        }
    }

    /// The mutation called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "mutations")]
static ACTIVE: std::sync::OnceLock<Option<Mutation>> = std::sync::OnceLock::new();

/// Reads `SPILLWAY_MUTATE` (with the feature only; without it, nothing is read and `Ok(None)`
/// is returned). Call once at start-up.
pub fn init() -> Result<Option<Mutation>, spillway_core::ConfigError> {
    #[cfg(feature = "mutations")]
    {
        let chosen = match std::env::var(ENV) {
            Ok(name) if !name.is_empty() => Some(Mutation::parse(&name).ok_or_else(|| {
                spillway_core::ConfigError::new(
                    ENV,
                    format!(
                        "unknown mutation {name:?}; the consumer's are: {}",
                        Mutation::ALL.map(Mutation::name).join(", ")
                    ),
                )
            })?),
            _ => None,
        };
        let active = *ACTIVE.get_or_init(|| chosen);
        if let Some(m) = active {
            tracing::warn!(
                mutation = m.name(),
                "{ENV}: running with a known bug switched on, for a test"
            );
        }
        Ok(active)
    }
    #[cfg(not(feature = "mutations"))]
    Ok(None)
}

/// Whether `m` is switched on.
pub fn active(m: Mutation) -> bool {
    #[cfg(feature = "mutations")]
    {
        ACTIVE.get().copied().flatten() == Some(m)
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = m;
        false
    }
}

/// `drop-failed-batch`'s memory: per partition, where the stored position stood before the
/// first batch this consumer dropped (Postgres still holds it, since nothing was committed).
#[derive(Debug, Default)]
pub(crate) struct DroppedBatches(HashMap<Partition, Position>);

impl DroppedBatches {
    /// Under the mutation, a retriable failure is reported as written (the batch is dropped)
    /// and its start remembered; a real write forgets it. Otherwise `outcome` unchanged.
    pub(crate) fn outcome(&mut self, batch: &Batch, outcome: FlushOutcome) -> FlushOutcome {
        if !active(Mutation::DropFailedBatch) {
            return outcome;
        }
        match outcome {
            FlushOutcome::Retriable { reason } => {
                tracing::warn!(partition = batch.partition, %reason, "drop-failed-batch: dropping a batch whose flush failed");
                self.0.entry(batch.partition).or_insert(batch.start);
                FlushOutcome::Written
            }
            FlushOutcome::Written => {
                self.0.remove(&batch.partition);
                FlushOutcome::Written
            }
            other => other,
        }
    }

    /// The start the next flush's compare-and-set expects: the dropped batch's start, so the
    /// position jumps past the dropped records.
    pub(crate) fn expected_start(&self, batch: &Batch) -> Position {
        self.0.get(&batch.partition).copied().unwrap_or(batch.start)
    }

    /// The partition starts afresh from its stored position.
    pub(crate) fn forget(&mut self, p: Partition) {
        self.0.remove(&p);
    }
}

/// `commit-kafka-first`: commits `offset` as `partition`'s next offset to the group now, and
/// waits for the broker's answer (so a crash right after finds it committed), before the
/// batch's flush.
pub(crate) fn commit_to_kafka_now(
    consumer: &rdkafka::consumer::BaseConsumer<crate::source::Context>,
    topic: &str,
    partition: Partition,
    offset: i64,
) {
    use rdkafka::consumer::{CommitMode, Consumer};
    let mut tpl = rdkafka::TopicPartitionList::new();
    let added = tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset));
    if let Err(e) = added.and_then(|()| consumer.commit(&tpl, CommitMode::Sync)) {
        tracing::warn!(partition, offset, error = %e, "commit-kafka-first: the commit failed");
    }
}
