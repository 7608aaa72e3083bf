//! The chaos suite: `cargo test --test chaos`. Sixteen faults on real processes; after each,
//! the fault's evidence and loadgen's verdict (no acknowledged record lost, none duplicated).
//! The scenarios live in `spillway_integration::scenarios`; each prints its seed, and
//! `SPILLWAY_CHAOS_SEED=<seed> cargo test --test chaos <name>` replays it.

use anyhow::Result;
use spillway_integration::scenarios;
use spillway_integration::Run::Proof;

/// Not a test: the entry point of the producer and consumer processes the scenarios start
/// (this binary, re-executed). Run by hand, it does nothing.
#[test]
#[ignore = "the entry point of the chaos suite's child processes"]
fn child_process() {
    spillway_integration::child_process();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_copy() -> Result<()> {
    scenarios::postgres_killed_mid_copy(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_flush() -> Result<()> {
    scenarios::backend_killed_mid_flush(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_frozen_past_the_statement_timeout() -> Result<()> {
    scenarios::postgres_frozen_past_the_statement_timeout(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_copy_then_a_slow_link() -> Result<()> {
    scenarios::connection_cut_mid_copy_then_a_slow_link(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_a_minute_under_a_spike() -> Result<()> {
    scenarios::postgres_down_for_a_minute_under_a_spike(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_ten_times() -> Result<()> {
    scenarios::postgres_restarted_ten_times(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_under_load() -> Result<()> {
    scenarios::broker_killed_under_load(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_between_its_two_commits() -> Result<()> {
    scenarios::consumer_killed_between_its_two_commits(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_consumer_in_the_group() -> Result<()> {
    scenarios::a_zombie_consumer_in_the_group(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_postgres_rejects_go_to_the_dead_letter_table() -> Result<()> {
    scenarios::records_postgres_rejects_go_to_the_dead_letter_table(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_killed_under_load() -> Result<()> {
    scenarios::producer_killed_under_load(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_alert_fires_and_resolves() -> Result<()> {
    scenarios::postgres_unreachable_alert_fires_and_resolves(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_columns_through_a_backend_crash() -> Result<()> {
    scenarios::typed_columns_through_a_backend_crash(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_and_routing_through_a_consumer_crash() -> Result<()> {
    scenarios::upsert_and_routing_through_a_consumer_crash(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_answers_lost_under_load() -> Result<()> {
    scenarios::broker_answers_lost_under_load(Proof).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_under_load_with_idempotency_keys() -> Result<()> {
    scenarios::broker_killed_under_load_with_idempotency_keys(Proof).await
}
