//! How fast a plain librdkafka consumer reads a backlog from the broker (no Postgres): the
//! fetch side's bound for the consumer. `cargo run --release -p spillway-benches --example fetch_rate`
use std::time::{Duration, Instant};

use spillway_benches::produce_backlog;
use spillway_harness::kafka;
use spillway_harness::kafka::read_all;

#[tokio::main]
async fn main() {
    let broker = kafka::from_env().expect("broker");
    broker.create_topic("backlog", 4).await.expect("topic");
    produce_backlog(&broker.bootstrap(), "backlog", None, 200_000, 10)
        .await
        .expect("backlog");
    let bootstrap = broker.bootstrap();
    let t = Instant::now();
    let n = tokio::task::spawn_blocking(move || {
        read_all(&bootstrap, "backlog", Duration::from_secs(300))
            .expect("read")
            .len()
    })
    .await
    .expect("join");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{n} messages ({} records) read in {secs:.2} s: {:.0} messages/s, {:.0} records/s",
        n * 10,
        n as f64 / secs,
        n as f64 * 10.0 / secs
    );
}
