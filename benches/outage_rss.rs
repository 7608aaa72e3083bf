//! The consumer's memory through a 60 s Postgres outage under a 20x spike: the consumer runs
//! as its own process (the release `spillway-consumer` binary next to this one) so its RSS is
//! its own; loadgen drives spiky traffic through the producer; Postgres is SIGKILLed at 5 s and
//! restarted 60 s later. Prints the RSS peak (sampled every 100 ms from /proc) and the no-loss
//! verdict.
//!
//! `cargo build --release -p spillway-consumer -p spillway-benches && target/release/outage-rss`

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use spillway_harness::{kafka, LocalPostgres, PostgresServer};
use spillway_loadgen::payload::{PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::runner::{self, Live, RunConfig};
use spillway_loadgen::verify::{verify, VerifyConfig};

/// The consumer's resident memory, or `None` when /proc cannot tell (then the run fails: a
/// peak is never computed from samples that were not taken).
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let consumer_bin = std::env::current_exe()?.with_file_name("spillway-consumer");
    anyhow::ensure!(
        consumer_bin.exists(),
        "build it first: cargo build --release -p spillway-consumer"
    );
    let mut pg = LocalPostgres::start()?;
    let broker = kafka::from_env()?;
    broker.create_topic("outage", 4).await?;
    let mut ps = spillway_producer::Settings::new(broker.bootstrap(), "outage");
    ps.listen = "127.0.0.1:0".parse()?;
    ps.max_in_flight_requests = 8192;
    let producer = spillway_producer::start(ps).await?;
    let mut consumer = Command::new(&consumer_bin)
        .args([
            "--brokers",
            &broker.bootstrap(),
            "--topic",
            "outage",
            "--group",
            "outage",
            "--database-url",
            &pg.url(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .env("SPILLWAY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let pid = consumer.id();
    let peak = Arc::new(AtomicU64::new(0));
    let missed = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, missed) = (peak.clone(), missed.clone());
        tokio::spawn(async move {
            loop {
                match rss_kib(pid) {
                    Some(kib) => peak.fetch_max(kib, Ordering::Relaxed),
                    None => missed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline_rss = rss_kib(pid).context("the consumer's RSS could not be read from /proc")?;
    // 75 s of traffic: 150 req/s with 20x bursts (3,000 req/s) of 4 s about every 12 s.
    let profile = RateProfile::Spiky {
        base: 150.0,
        multiplier: 20.0,
        burst: Duration::from_secs(4),
        gap: Duration::from_secs(12),
        seed: 5,
    };
    let schedule = profile.schedule(Duration::from_secs(75));
    let cfg = RunConfig::new(producer.store_url(), schedule);
    let spec = PayloadSpec::generated((1, 10), (150, 250));
    let traffic = tokio::spawn(runner::run(
        cfg,
        PayloadGen::new(spec, "outage", 5),
        Arc::new(Live::default()),
        |_, _, _| {},
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg = tokio::task::spawn_blocking(move || pg.kill().map(|_| pg)).await??;
    let down = Instant::now();
    println!("Postgres SIGKILLed; down for 60 s while traffic continues");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let peak_during_outage = peak.load(Ordering::Relaxed);
    pg = tokio::task::spawn_blocking(move || pg.restart().map(|_| pg)).await??;
    println!(
        "Postgres restarted after {:.0} s",
        down.elapsed().as_secs_f64()
    );
    let result = traffic.await?;
    let cfg = VerifyConfig::new(
        pg.url(),
        "records",
        "outage",
        broker.bootstrap(),
        "outage",
        Duration::from_secs(300),
    );
    let v = verify(&cfg, &result.acked, |_| {}).await?;
    sampler.abort();
    let missed = missed.load(Ordering::Relaxed);
    anyhow::ensure!(
        missed == 0,
        "the consumer's RSS could not be read {missed} times: no peak is claimed"
    );
    println!(
        "consumer RSS: {:.1} MiB before, peak {:.1} MiB during the outage, peak {:.1} MiB overall (bound checked: 256 MiB)",
        baseline_rss as f64 / 1024.0,
        peak_during_outage as f64 / 1024.0,
        peak.load(Ordering::Relaxed) as f64 / 1024.0
    );
    println!(
        "traffic: {} requests, {} records acknowledged; verdict: {} (lost {}, duplicated {}, quiet {:.1} s after traffic)",
        result.planned,
        result.acked.len(),
        if v.passed() { "PASS" } else { "FAIL" },
        v.lost,
        v.duplicated,
        v.waited_seconds
    );
    let _ = consumer.kill();
    let _ = consumer.wait();
    producer.shutdown().await;
    Ok(())
}
