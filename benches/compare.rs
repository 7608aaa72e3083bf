//! Spillway beside the original Python pipeline (`../shared/baselines/python-original`), in one
//! run, on one private Postgres and one Tansu broker:
//!
//! - producer: the Python producer, Spillway's producer, and the ceiling (a plain rdkafka
//!   producer sending the same messages straight to the broker), under `wrk -c 50` with the
//!   same bodies, 1 and 10 records per request;
//! - consumer: the Python consumer, Spillway's consumer, and a raw COPY BINARY of the same rows
//!   from memory, each draining the same backlog.
//!
//! Usage: `cargo run --release -p spillway-benches --bin compare-baseline -- [PYTHON] [BASELINE_DIR]`
//! (PYTHON needs aiohttp aiokafka aiopg psycopg2-binary; wrk must be on PATH).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use spillway_benches::{create_table, drain_time, produce_backlog, raw_copy, record, rows};
use spillway_core::{Envelope, RequestId};
use spillway_harness::postgres::connect;
use spillway_harness::{free_port, KafkaBroker, LocalPostgres, PostgresServer, Tansu};

const WRK_SECONDS: u64 = 10;
const BACKLOG: u64 = 200_000;
const PER_MESSAGE: u64 = 10;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn body(per: u64) -> String {
    let recs: Vec<String> = (0..per)
        .map(|i| String::from_utf8_lossy(&record(i)).into_owned())
        .collect();
    format!("[{}]", recs.join(","))
}

/// (requests/s, p99 ms) from wrk.
fn wrk(url: &str, body: &str) -> Result<(f64, f64)> {
    let script = std::env::temp_dir().join(format!("spillway-wrk-{}.lua", free_port()));
    std::fs::write(&script, format!("wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"))?;
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c50",
            &format!("-d{WRK_SECONDS}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .map(str::trim)
        .context(text.to_string())?
        .parse()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| {
            let v = v.trim();
            let (num, unit) =
                v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
            let n: f64 = num.parse().unwrap_or(f64::NAN);
            match unit {
                "us" => n / 1000.0,
                "s" => n * 1000.0,
                _ => n,
            }
        })
        .unwrap_or(f64::NAN);
    let non2xx = text
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .map(str::to_string);
    if let Some(l) = non2xx {
        eprintln!("  wrk: {}", l.trim());
    }
    Ok((rps, p99))
}

async fn wait_http(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn ceiling(bootstrap: &str, topic: &str, per: u64) -> Result<f64> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()?;
    let recs: Vec<Vec<u8>> = (0..per).map(record).collect();
    let payload = Envelope {
        received_at_micros: 1,
        request_id: RequestId::from_u128(1),
        sequenced: false,
        idempotency_key: None,
        source: None,
        records: recs.iter().map(|r| r.as_slice()).collect(),
    }
    .encode();
    let end = Instant::now() + Duration::from_secs(WRK_SECONDS);
    let started = Instant::now();
    let sent = stream::iter(0..)
        .take_while(|_| futures::future::ready(Instant::now() < end))
        .map(|_| {
            let (p, payload) = (p.clone(), payload.clone());
            async move {
                p.send(
                    FutureRecord::<(), _>::to(topic).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .is_ok()
            }
        })
        .buffer_unordered(50)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    Ok(sent as f64 / started.elapsed().as_secs_f64())
}

async fn count(url: &str, table: &str) -> i64 {
    match connect(url).await {
        Ok(c) => c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let python = args.get(1).cloned().unwrap_or_else(|| "python3".into());
    let baseline = PathBuf::from(
        args.get(2)
            .cloned()
            .unwrap_or_else(|| "../shared/baselines/python-original".into()),
    );
    let pg = LocalPostgres::start()?;
    let broker = Tansu::start()?;
    let bootstrap = broker.bootstrap();
    for t in [
        "baseline",
        "spillway",
        "ceiling",
        "baseline_backlog",
        "spillway_backlog",
    ] {
        broker.create_topic(t, 4).await?;
    }
    println!("== producer: wrk -t2 -c50 -d{WRK_SECONDS}s, same bodies, same Tansu broker");
    let py_port = free_port();
    let _py = Killed(
        Command::new(&python)
            .arg(baseline.join("producer.py"))
            .env("KAFKA_BROKERS", &bootstrap)
            .env("TOPIC", "baseline")
            .env("PORT", py_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the Python producer")?,
    );
    wait_http(py_port).await?;
    let mut s = spillway_producer::Settings::new(&bootstrap, "spillway");
    s.listen = "127.0.0.1:0".parse()?;
    let producer = spillway_producer::start(s).await?;
    println!(
        "{:<34}{:>14}{:>12}{:>14}",
        "records per request", "requests/s", "p99 ms", "vs Python"
    );
    for per in [1, 10] {
        let b = body(per);
        let (py_rps, py_p99) = wrk(&format!("http://127.0.0.1:{py_port}/store"), &b)?;
        let (sp_rps, sp_p99) = wrk(&producer.store_url(), &b)?;
        let ceil = ceiling(&bootstrap, "ceiling", per).await?;
        println!(
            "{:<34}{:>14.0}{:>12.1}{:>14}",
            format!("{per}: Python original"),
            py_rps,
            py_p99,
            "1.00x"
        );
        println!(
            "{:<34}{:>14.0}{:>12.1}{:>13.2}x",
            format!("{per}: Spillway producer"),
            sp_rps,
            sp_p99,
            sp_rps / py_rps
        );
        println!(
            "{:<34}{:>14.0}{:>12}{:>13.2}x   (Spillway = {:.2} of the ceiling)",
            format!("{per}: ceiling (rdkafka, no HTTP)"),
            ceil,
            "-",
            ceil / py_rps,
            sp_rps / ceil
        );
    }
    producer.shutdown().await;
    drop(_py);

    println!("\n== consumer: draining a backlog of {BACKLOG} records ({PER_MESSAGE} per message) into the same Postgres");
    produce_backlog(
        &bootstrap,
        "spillway_backlog",
        Some("baseline_backlog"),
        BACKLOG,
        PER_MESSAGE,
    )
    .await?;
    let url = pg.url();
    connect(&url)
        .await?
        .batch_execute("CREATE TABLE data (timestamp timestamptz, data jsonb)")
        .await?;
    let dsn = format!(
        "dbname=postgres user=postgres host=127.0.0.1 port={}",
        pg.port()
    );
    let py = Killed(
        Command::new(&python)
            .arg(baseline.join("consumer.py"))
            .env("KAFKA_BROKERS", &bootstrap)
            .env("TOPIC", "baseline_backlog")
            .env("GROUP", "baseline-compare")
            .env("DATABASE_URL", &dsn)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // Both consumers are timed from their first row to the last (joining the group excluded).
    let py_url = url.clone();
    let py_time = tokio::time::timeout(
        Duration::from_secs(600),
        drain_time(BACKLOG, move || {
            let url = py_url.clone();
            Box::pin(async move { count(&url, "data").await as u64 })
        }),
    )
    .await
    .context("the Python consumer did not drain the backlog in 10 minutes")?;
    let py_rate = BACKLOG as f64 / py_time.as_secs_f64();
    drop(py);
    let mut s = spillway_consumer::Settings::new(&bootstrap, "spillway_backlog", &url);
    s.listen = "127.0.0.1:0".parse()?;
    s.group = "spillway-compare".into();
    let consumer = spillway_consumer::start(s).await?;
    let metrics = consumer.metrics().clone();
    let sp_time = drain_time(BACKLOG, move || {
        let n = metrics.rows_written();
        Box::pin(async move { n })
    })
    .await;
    let sp_rate = BACKLOG as f64 / sp_time.as_secs_f64();
    consumer.shutdown().await?;
    let rows = rows(BACKLOG);
    let mut c = connect(&url).await?;
    c.batch_execute(&create_table("raw")).await?;
    let started = Instant::now();
    raw_copy(&mut c, "raw", &rows, 10_000).await?;
    let raw_rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    println!("{:<34}{:>14}{:>14}", "", "rows/s", "ratio");
    println!(
        "{:<34}{:>14.0}{:>14}",
        "Python original consumer",
        py_rate,
        format!("{:.2}x Python", 1.0)
    );
    println!(
        "{:<34}{:>14.0}{:>14}",
        "Spillway consumer",
        sp_rate,
        format!("{:.2}x Python", sp_rate / py_rate)
    );
    println!(
        "{:<34}{:>14.0}{:>14}",
        "raw COPY BINARY (the limit)",
        raw_rate,
        format!("Spillway {:.2}", sp_rate / raw_rate)
    );
    Ok(())
}
