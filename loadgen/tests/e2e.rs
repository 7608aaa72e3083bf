//! The whole pipeline under a short spiky load on the local stack, and the verdict proven able
//! to fail: a deleted row is reported lost, a copied row duplicated, also when the copy lands
//! after the pipeline looked drained.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use spillway_harness::postgres::connect;
use spillway_loadgen::payload::{typed_columns, PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::retry::RetrySettings;
use spillway_loadgen::runner::{self, AckSet, KeyedRetries, Live, RunConfig};
use spillway_loadgen::stack::{LocalStack, TABLE, TOPIC};
use spillway_loadgen::verify::{verify, VerifyConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiky_run_on_the_local_stack_loses_and_duplicates_nothing_and_the_checker_can_fail(
) -> Result<()> {
    let seed = 11;
    let stack = LocalStack::start(3).await?;
    let profile = RateProfile::Spiky {
        base: 40.0,
        multiplier: 20.0,
        burst: Duration::from_secs(1),
        gap: Duration::from_secs(3),
        seed,
    };
    let schedule = profile.schedule(Duration::from_secs(6));
    let planned = schedule.len() as u64;
    let cfg = RunConfig::new(stack.producer.store_url(), schedule);
    let spec = PayloadSpec::generated((1, 5), (100, 200));
    let result = runner::run(
        cfg,
        PayloadGen::new(spec, "e2e", seed),
        Arc::new(Live::default()),
        |_, _, _| {},
    )
    .await;
    assert_eq!(
        result.latency.len(),
        planned,
        "every planned request was answered"
    );
    assert_eq!(
        result.statuses.get(&200).copied(),
        Some(planned),
        "all 200: {:?}",
        result.statuses
    );
    assert_eq!(result.acked.len(), result.records_sent);
    let url = stack.database_url();
    let cfg = VerifyConfig::new(
        &url,
        TABLE,
        "e2e",
        stack.broker.bootstrap(),
        TOPIC,
        Duration::from_secs(60),
    );
    let v = verify(&cfg, &result.acked, |_| {}).await?;
    ensure!(v.passed() && v.quiet && v.found == v.acknowledged, "{v:?}");

    // The checker is not a rubber stamp. A copy that lands after every acknowledged record is
    // in, as a zombie's late write would, is still counted: the verdict waits for quiet.
    let c = connect(&url).await?;
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.batch_execute("INSERT INTO records SELECT * FROM records WHERE data->>'id' = 'e2e-5'")
            .await
    });
    let v = verify(&cfg, &result.acked, |_| {}).await?;
    late.await??;
    assert_eq!(
        (v.quiet, v.duplicated, v.duplicated_sample.clone()),
        (true, 1, vec![5]),
        "{v:?}"
    );
    assert!(!v.passed());
    // A deleted row is lost.
    connect(&url)
        .await?
        .batch_execute("DELETE FROM records WHERE data->>'id' = 'e2e-3'")
        .await?;
    let v = verify(&cfg, &result.acked, |_| {}).await?;
    assert_eq!((v.lost, v.lost_sample.clone()), (1, vec![3]), "{v:?}");
    assert!(!v.passed());
    stack.shutdown().await;
    Ok(())
}

/// Typed records on a consumer that maps them (and drops `data`): the verdict reads the ids
/// from the id column and passes; the poison records (a string for the bigint) are
/// dead-lettered, not lost; the rows hold typed values. A deleted row is still reported lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_run_lands_in_typed_columns_and_the_verdict_reads_the_id_column() -> Result<()> {
    let seed = 12;
    let columns = typed_columns("id")
        .iter()
        .map(|c| c.parse())
        .collect::<Result<Vec<_>, _>>()?;
    let stack = LocalStack::start_with(2, spillway_core::Mapping::new(columns, false)?).await?;
    let schedule = RateProfile::Constant { rate: 100.0 }.schedule(Duration::from_secs(3));
    let mut spec = PayloadSpec::generated((1, 5), (180, 220));
    spec.typed = true;
    spec.poison_rate = 0.02;
    let result = runner::run(
        RunConfig::new(stack.producer.store_url(), schedule),
        PayloadGen::new(spec, "typed", seed),
        Arc::new(Live::default()),
        |_, _, _| {},
    )
    .await;
    ensure!(
        result.acked.len() > 300,
        "{} acknowledged",
        result.acked.len()
    );
    let url = stack.database_url();
    let cfg = VerifyConfig {
        id_column: Some("id".into()),
        ..VerifyConfig::new(
            &url,
            TABLE,
            "typed",
            stack.broker.bootstrap(),
            TOPIC,
            Duration::from_secs(60),
        )
    };
    let v = verify(&cfg, &result.acked, |_| {}).await?;
    ensure!(v.passed() && v.dead_lettered > 0, "{v:?}");
    assert_eq!(v.found + v.dead_lettered, v.acknowledged, "{v:?}");
    let c = connect(&url).await?;
    let typed: i64 = c
        .query_one(
            "SELECT count(*) FROM records WHERE n IS NOT NULL AND at >= '2026-11-27' \
             AND score IS NOT NULL AND ok IS NOT NULL AND doc ? 'k' AND name IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(typed as u64, v.found);
    let reason: String = c
        .query_one("SELECT error FROM records_dead_letters LIMIT 1", &[])
        .await?
        .get(0);
    assert!(reason.contains("column n (bigint from /n)"), "{reason}");
    c.batch_execute("DELETE FROM records WHERE id = 'typed-0' OR id = 'typed-1'")
        .await?;
    let v = verify(&cfg, &result.acked, |_| {}).await?;
    assert!(v.lost >= 1 && !v.passed(), "{v:?}");
    stack.shutdown().await;
    Ok(())
}

/// `loadgen --keys` end to end, as a user runs it: keyed traffic on the local stack, whose
/// consumer routes the states to `states`, written by key. The run passes both verdicts and
/// says so: the records exactly once in `records`, and each key's row its last state in Kafka
/// (the keyed verdict is shown able to fail by chaos scenario 14's wrong-order mutation run).
#[test]
fn loadgen_with_keys_checks_each_keys_last_state_and_says_so() -> Result<()> {
    let out = tempfile::tempdir()?;
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--rate-profile",
            "constant",
            "--rate",
            "60",
            "--duration",
            "3s",
            "--keys",
            "25",
            "--partitions",
            "2",
            "--seed",
            "13",
            "--out",
        ])
        .arg(out.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(
        run.status.success(),
        "loadgen --keys failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    ensure!(
        stdout.contains("verdict: PASS") && stdout.contains("keyed verdict on states: PASS"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json"))?)?;
    let keyed = &summary["keyed_verdict"];
    assert_eq!(keyed["table"], "states", "{summary}");
    let keys = keyed["verdict"]["keys"].as_u64().unwrap_or(0);
    ensure!(
        keys > 0 && keys <= 25 && keyed["verdict"]["wrong"] == 0 && keyed["verdict"]["split"] == 0,
        "{keyed}"
    );
    Ok(())
}

/// With idempotency keys the verdict wants no unexpected record: a row of the run that no
/// acknowledged request carried fails it (without keys it is allowed), unless its request was
/// given up after its last retry (then it is counted apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_idempotency_keys_a_record_that_landed_without_an_acknowledgement_fails_the_verdict(
) -> Result<()> {
    let stack = LocalStack::start(2).await?;
    let schedule = RateProfile::Constant { rate: 50.0 }.schedule(Duration::from_secs(2));
    let cfg = RunConfig {
        idempotency_keys: Some(KeyedRetries {
            settings: RetrySettings::default(),
            seed: 5,
        }),
        ..RunConfig::new(stack.producer.store_url(), schedule)
    };
    let spec = PayloadSpec::generated((1, 3), (100, 150));
    let result = runner::run(
        cfg,
        PayloadGen::new(spec, "idem", 5),
        Arc::new(Live::default()),
        |_, _, _| {},
    )
    .await;
    assert!(result.retries.enabled && result.retries.given_up.is_empty());
    let url = stack.database_url();
    let keyed = VerifyConfig {
        given_up: Some(result.retries.given_up.clone()),
        ..VerifyConfig::new(
            &url,
            TABLE,
            "idem",
            stack.broker.bootstrap(),
            TOPIC,
            Duration::from_secs(60),
        )
    };
    let v = verify(&keyed, &result.acked, |_| {}).await?;
    ensure!(
        v.passed() && v.unexpected == 0 && v.idempotency_keys,
        "{v:?}"
    );

    // A copy of an acknowledged row under the id of a record nobody acknowledged: what a
    // refused request's write that landed anyway looks like.
    let never = result.records_sent + 1_000;
    connect(&url)
        .await?
        .execute(
            "INSERT INTO records SELECT kafka_partition, kafka_offset, record_index + 1000, \
             received_at, jsonb_set(data, '{id}', to_jsonb($1::text)) \
             FROM records WHERE data->>'id' = 'idem-0'",
            &[&format!("idem-{never}")],
        )
        .await?;
    let v = verify(&keyed, &result.acked, |_| {}).await?;
    assert_eq!(
        (v.unexpected, v.unexpected_sample.clone()),
        (1, vec![never])
    );
    assert!(!v.passed(), "with keys an unexpected record fails: {v:?}");
    let plain = VerifyConfig {
        given_up: None,
        ..keyed.clone()
    };
    let v = verify(&plain, &result.acked, |_| {}).await?;
    assert!(
        v.passed() && v.unexpected == 1,
        "without keys it is allowed: {v:?}"
    );
    let mut given_up = AckSet::default();
    given_up.insert_range(never, 1);
    let apart = VerifyConfig {
        given_up: Some(given_up),
        ..keyed
    };
    let v = verify(&apart, &result.acked, |_| {}).await?;
    assert!(
        v.passed() && (v.unexpected, v.given_up, v.given_up_landed) == (0, 1, 1),
        "a given-up request's record is counted apart: {v:?}"
    );
    stack.shutdown().await;
    Ok(())
}
