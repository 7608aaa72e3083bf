//! Profiles of Spillway's producer and consumer at saturation, as the released binaries run:
//! on the fast broker (SPILLWAY_TEST_KAFKA=fast's in-memory Tansu) and a private Postgres,
//!
//! 1. `spillway-producer` under `wrk -t2 -c400` with 10-record bodies, `perf record` attached
//!    to it for SECS seconds (after a second of warm-up);
//! 2. `spillway-consumer` draining the backlog that run left in Kafka, `perf record` attached
//!    1.5 s after its start for SECS seconds.
//!
//! Writes `DIR/producer.perf.data` and `DIR/consumer.perf.data`; `benches/profile.sh` builds
//! what this needs and turns them into flame graphs (`benches/profiles/*.svg`).
//!
//! `cargo run --release -p spillway-benches --bin profile -- DIR [SECS]` (the two service binaries
//! built beside it: `cargo build --release -p spillway-producer -p spillway-consumer`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spillway_benches::record;
use spillway_harness::{free_port, KafkaBroker, LocalPostgres, PostgresServer, Tansu};

const TOPIC: &str = "events";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary built beside this one (`target/release/NAME`).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("this binary's directory")?.join(name);
    ensure!(
        p.is_file(),
        "{} is missing: cargo build --release -p spillway-producer -p spillway-consumer",
        p.display()
    );
    Ok(p)
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `perf record` of `pid` for `secs`, DWARF call graphs (the release profile keeps line
/// tables; librdkafka's C frames unwind through .eh_frame too).
fn perf(pid: u32, secs: u64, out: &Path) -> Result<Child> {
    Command::new("perf")
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(out)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("running perf (apt-get install linux-perf)")
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "profiles".into()));
    let secs: u64 = args.next().map_or(Ok(10), |s| s.parse())?;
    std::fs::create_dir_all(&dir)?;
    let pg = LocalPostgres::start()?;
    let broker = Tansu::start_in_memory()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(broker.create_topic(TOPIC, 4))?;

    // 1. The producer at saturation.
    let port = free_port();
    let producer = Killed(
        Command::new(sibling("spillway-producer")?)
            .args(["--brokers", &broker.bootstrap(), "--topic", TOPIC])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_port(port)?;
    let body: Vec<String> = (0..10)
        .map(|i| String::from_utf8_lossy(&record(i)).into_owned())
        .collect();
    let script = dir.join("wrk.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[[{}]]==]\n",
            body.join(",")
        ),
    )?;
    let wrk = Command::new("wrk")
        .args([
            "-t2",
            "-c400",
            &format!("-d{}s", secs + 2),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/store"))
        .stdout(Stdio::piped())
        .spawn()
        .context("running wrk")?;
    std::thread::sleep(Duration::from_secs(1));
    let mut rec = perf(producer.0.id(), secs, &dir.join("producer.perf.data"))?;
    let out = wrk.wait_with_output()?;
    rec.wait()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("producer under wrk -c400, 10 records per request:\n{text}");
    drop(producer);

    // 2. The consumer draining what that left in Kafka.
    let metrics = free_port();
    let started = Instant::now();
    let consumer = Killed(
        Command::new(sibling("spillway-consumer")?)
            .args(["--brokers", &broker.bootstrap(), "--topic", TOPIC])
            .args(["--database-url", &pg.url()])
            .args(["--listen", &format!("127.0.0.1:{metrics}")])
            .stdout(Stdio::null())
            .spawn()?,
    );
    // Once its threads exist (perf follows the threads there are when it attaches); the
    // backlog outlasts the recording.
    std::thread::sleep(Duration::from_millis(1500));
    let mut rec = perf(consumer.0.id(), secs, &dir.join("consumer.perf.data"))?;
    rec.wait()?;
    let rows: i64 = rt.block_on(async {
        let c = spillway_harness::postgres::connect(&pg.url()).await?;
        let n: i64 = c
            .query_one("SELECT count(*) FROM records", &[])
            .await?
            .get(0);
        Ok::<_, anyhow::Error>(n)
    })?;
    println!(
        "consumer: {rows} rows written in its first {:.1} s (profiled from 1.5 s)",
        started.elapsed().as_secs_f64()
    );
    drop(consumer);
    Ok(())
}
