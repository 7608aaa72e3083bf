//! The whole pipeline under a short spiky load on the local stack, and the verdict proven able
//! to fail: a deleted row is reported lost, a copied row duplicated, also when the copy lands
//! after the pipeline looked drained.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use spillway_harness::postgres::connect;
use spillway_loadgen::payload::{PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::runner::{self, Live, RunConfig};
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
