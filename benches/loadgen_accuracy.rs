//! loadgen's accuracy, against a trivial local HTTP server run as a separate process (so loadgen
//! and wrk meet it on equal terms), in the same run:
//! 1. with a known server delay, the measured latency matches the delay;
//! 2. a 10 s constant profile at 5,000 requests/s sends within 1% of the plan;
//! 3. one loadgen process reaches at least 0.8x the request rate `wrk` gets from the same server.
//!
//! `cargo run --release -p spillway-benches --bin loadgen-accuracy` (wrk on PATH for 3).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Response, Server};
use spillway_loadgen::payload::{PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::runner::{self, Live, RunConfig, RunResult};

/// Starts this program again as the test server (`--serve PORT DELAY_MS`) and waits until it
/// listens.
async fn spawn_server(delay: Duration) -> (std::process::Child, SocketAddr) {
    let port = spillway_harness::free_port();
    let child = Command::new(std::env::current_exe().expect("own path"))
        .args(["--serve", &port.to_string(), &delay.as_millis().to_string()])
        .spawn()
        .expect("server process");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, addr)
}

async fn run(addr: SocketAddr, rate: f64, secs: u64) -> RunResult {
    let schedule = RateProfile::Constant { rate }.schedule(Duration::from_secs(secs));
    let mut cfg = RunConfig::new(format!("http://{addr}/store"), schedule);
    // The same number of connections as wrk gets (-c50).
    cfg.connections = 50;
    let spec = PayloadSpec::generated((1, 1), (100, 100));
    runner::run(
        cfg,
        PayloadGen::new(spec, "acc", 1),
        Arc::new(Live::default()),
        |_, _, _| {},
    )
    .await
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `--serve PORT DELAY_MS`: only run the test server (a separate process, so loadgen and wrk
/// both meet it on equal terms).
async fn serve_only(port: u16, delay: Duration) {
    let make = make_service_fn(move |_| async move {
        Ok::<_, Infallible>(service_fn(move |req: hyper::Request<Body>| async move {
            let _ = hyper::body::to_bytes(req.into_body()).await;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Infallible>(Response::new(Body::from("{}")))
        }))
    });
    let _ = Server::bind(&([127, 0, 0, 1], port).into())
        .serve(make)
        .await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let port = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
        let delay = Duration::from_millis(args.get(3).and_then(|d| d.parse().ok()).unwrap_or(0));
        serve_only(port, delay).await;
        return;
    }
    let delay = Duration::from_millis(20);
    let (mut slow_server, slow) = spawn_server(delay).await;
    let r = run(slow, 200.0, 5).await;
    println!(
        "1. server delay {:?}: loadgen latency p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms (overhead over the delay at p50: {:.2} ms)",
        delay,
        ms(r.latency.value_at_quantile(0.5)),
        ms(r.latency.value_at_quantile(0.99)),
        ms(r.latency.min()),
        ms(r.latency.value_at_quantile(0.5)) - delay.as_secs_f64() * 1000.0
    );

    let _ = slow_server.kill();
    let _ = slow_server.wait();
    let (mut server, fast) = spawn_server(Duration::ZERO).await;
    let r = run(fast, 5000.0, 10).await;
    let sent = r.planned - r.skipped_sends;
    let in_time = r.planned - r.skipped_sends - r.late_sends;
    println!(
        "2. constant 5,000 req/s for 10 s: planned {}, sent {} ({:+.3}% of plan), {} late (> 10 ms), answered {} in {:.2} s",
        r.planned,
        sent,
        (sent as f64 / r.planned as f64 - 1.0) * 100.0,
        r.late_sends,
        r.latency.len(),
        r.elapsed.as_secs_f64()
    );
    println!(
        "   sent on time: {:.3}% of plan",
        in_time as f64 / r.planned as f64 * 100.0
    );

    let script = std::env::temp_dir().join("spillway-accuracy.lua");
    let _ = std::fs::write(&script, "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '[{\"id\":\"x\",\"pad\":\"0123456789\"}]'\n");
    let out = Command::new("wrk")
        .args(["-t2", "-c50", "-d10s", "-s"])
        .arg(&script)
        .arg(format!("http://{fast}/store"))
        .output();
    let wrk_rps: Option<f64> = out.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            l.strip_prefix("Requests/sec:")
                .and_then(|v| v.trim().parse().ok())
        })
    });
    match wrk_rps {
        Some(w) => {
            let r = run(fast, w, 10).await;
            let ok = r.statuses.get(&200).copied().unwrap_or(0);
            let achieved = ok as f64 / r.elapsed.as_secs_f64();
            println!(
                "3. wrk -t2 -c50: {w:.0} req/s; loadgen asked for the same rate: {achieved:.0} req/s answered 200 ({ok} ok, {} not sent, {} late) = {:.2}x wrk",
                r.skipped_sends,
                r.late_sends,
                achieved / w
            );
        }
        None => println!("3. wrk not found (apt-get install wrk): skipped"),
    }
    let _ = server.kill();
    let _ = server.wait();
}
