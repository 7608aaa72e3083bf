//! The chaos suite can fail: each known bug, switched on in the real service, is caught by the
//! scenario meant to catch it, whose verdict reports the loss or duplicate the bug causes.
//!
//! `cargo test -p spillway-integration --features mutations --test chaos_mutations`. The
//! services read `SPILLWAY_MUTATE` only when built with the `mutations` feature (never in
//! release builds). Each run prints its seed and replays with `SPILLWAY_CHAOS_SEED=<seed>`.

use anyhow::Result;
use spillway_integration::{scenarios, Harm, Role, Run};

/// Not a test: the entry point of the producer and consumer processes the scenarios start
/// (this binary, re-executed). Run by hand, it does nothing.
#[test]
#[ignore = "the entry point of the chaos suite's child processes"]
fn child_process() {
    spillway_integration::child_process();
}

/// Without the compare-and-set, the zombie's stale batch lands on top of what the partition's
/// new owner wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_compare_and_set_duplicates_when_a_zombie_wakes() -> Result<()> {
    let run = Run::mutant("no-compare-and-set", Role::Consumer, Harm::Duplicates);
    scenarios::a_zombie_consumer_in_the_group(run).await
}

/// Committing to Kafka first and trusting those offsets: the batch committed to Kafka but not
/// to Postgres when the consumer dies is skipped by its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_kafka_first_loses_the_batch_in_flight_when_the_consumer_dies() -> Result<()> {
    let run = Run::mutant("commit-kafka-first", Role::Consumer, Harm::Loss);
    scenarios::consumer_killed_between_its_two_commits(run).await
}

/// Answering before Kafka acknowledged: what the killed producer had not yet handed to the
/// (frozen) broker was answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_before_kafka_loses_what_the_killed_producer_never_delivered() -> Result<()> {
    let run = Run::mutant("ack-before-kafka", Role::Producer, Harm::Loss);
    scenarios::producer_killed_under_load(run).await
}

/// Dropping a batch whose flush failed, as the original did: the batch killed mid-COPY is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_failed_batch_loses_the_batch_killed_mid_flush() -> Result<()> {
    let run = Run::mutant("drop-failed-batch", Role::Consumer, Harm::Loss);
    scenarios::backend_killed_mid_flush(run).await
}

/// Writing every message, copies too: the messages the producer's Kafka client stored twice
/// while the broker's answers were lost are in Postgres twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_copies_duplicates_what_the_producer_stored_twice() -> Result<()> {
    let run = Run::mutant("write-copies", Role::Consumer, Harm::Duplicates);
    scenarios::broker_answers_lost_under_load(run).await
}
