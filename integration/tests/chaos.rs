//! The chaos suite: `cargo test --test chaos`. Real processes, real faults, and one invariant
//! checked after every one of them: no acknowledged record is lost and none is duplicated.
//!
//! Each scenario starts a private Postgres, a Tansu broker, and the producer and consumer as
//! child processes (this test binary re-executed in a service role, so a SIGKILL or SIGSTOP is
//! real), drives traffic with unique ids through loadgen's open-model runner, injects its fault
//! at a precise moment, heals, waits for the drain and asks loadgen's verdict: lost = 0,
//! duplicated = 0, plus the scenario's own assertion.
//!
//! Every scenario prints its seed; `SPILLWAY_CHAOS_SEED=<seed> cargo test --test chaos <name>`
//! replays it (burst times, payloads, fault timings and sizes). A failure prints the seed, the
//! fault timeline, the lost or duplicated ids and the tails of the child processes' logs,
//! whose full text is kept on disk (also after a pass with `SPILLWAY_CHAOS_KEEP_LOGS=1`). Each scenario has a time bound; every process it started
//! is killed when it ends, passes or fails.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use spillway_integration::http::HttpClient;
use spillway_integration::postgres::{self, connect, copy_backends};
use spillway_integration::{
    free_port, ChildProcess, FaultProxy, Faults, KafkaBroker, PostgresServer, Tansu,
};
use spillway_loadgen::payload::{PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::runner::{self, Live, RunConfig, RunResult};
use spillway_loadgen::verify::{verify, Verdict};

const TOPIC: &str = "events";
const TABLE: &str = "records";
const ROLE_ENV: &str = "SPILLWAY_CHAOS_ROLE";
const ARGS_ENV: &str = "SPILLWAY_CHAOS_ARGS";
/// How long the verdict waits for the pipeline to drain after the traffic.
const DRAIN: Duration = Duration::from_secs(90);
/// The consumer's statement timeout in every scenario (scenario 3 freezes Postgres past it).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The consumer group's session timeout (scenario 9 freezes a member past it).
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

// ---------------------------------------------------------------------------------------------
// Child processes: this binary, re-executed as a producer or a consumer.

/// Not a test: the entry point of the producer and consumer processes the scenarios start
/// (`<this binary> child_process --exact --ignored` with the role in `SPILLWAY_CHAOS_ROLE` and
/// the service's command-line arguments in `SPILLWAY_CHAOS_ARGS`). It runs the same code as
/// the `spillway-producer` and `spillway-consumer` binaries. Run by hand, it does nothing.
#[test]
#[ignore = "the entry point of the chaos suite's child processes"]
fn child_process() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let args: Vec<String> =
        serde_json::from_str(&std::env::var(ARGS_ENV).unwrap_or_default()).unwrap_or_default();
    spillway_consumer::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome = rt.block_on(async {
        use clap::Parser;
        let argv = std::iter::once(format!("spillway-{role}")).chain(args);
        match role.as_str() {
            "producer" => {
                let s = spillway_producer::Settings::from_args(
                    spillway_producer::Args::parse_from(argv),
                )?;
                Ok(spillway_producer::serve(s).await?)
            }
            "consumer" => {
                let s = spillway_consumer::Settings::from_args(
                    spillway_consumer::Args::parse_from(argv),
                )?;
                Ok(spillway_consumer::serve(s).await?)
            }
            other => Err(anyhow!("unknown role {other}")),
        }
    });
    let code = match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("spillway-{role}: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// A producer or consumer child process, restartable with the same arguments and port.
struct Service {
    role: &'static str,
    port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    process: ChildProcess,
}

impl Service {
    /// Starts `role` with `args` plus `--listen` on a free port of 127.0.0.1 (kept across
    /// restarts).
    fn spawn(
        role: &'static str,
        mut args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Result<Self> {
        let port = free_port();
        args.extend(strings(&["--listen", &format!("127.0.0.1:{port}")]));
        let process = Self::launch(role, &args, &env, &log)?;
        Ok(Service {
            role,
            port,
            args,
            env,
            log,
            process,
        })
    }

    fn launch(
        role: &str,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<ChildProcess> {
        // /proc/self/exe, not the path: the child runs this very binary even if cargo replaces
        // the file meanwhile (a rebuild during a run).
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.args(["child_process", "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(ROLE_ENV, role)
            .env(ARGS_ENV, serde_json::to_string(args)?)
            .env(
                "SPILLWAY_LOG",
                std::env::var("SPILLWAY_CHAOS_LOG").unwrap_or("info".into()),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(ChildProcess::spawn(role, cmd, log)?)
    }

    /// SIGKILLs the process if it runs and starts it again (without the extra environment when
    /// `env` is false, to drop a failpoint).
    fn restart(&mut self, env: bool) -> Result<()> {
        self.process.kill();
        if !env {
            self.env.clear();
        }
        self.process = Self::launch(self.role, &self.args, &self.env, &self.log)?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `path` answers 200, failing at once if the process exits.
    async fn ready(&mut self, path: &str) -> Result<()> {
        let client = HttpClient::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.process.exited() {
                bail!(
                    "the {} exited ({status}) before it was ready:\n{}",
                    self.role,
                    self.process.log_tail(30)
                );
            }
            if let Ok(a) = client.get(&self.url(path)).await {
                if a.status == 200 {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the {} was not ready within 60 s:\n{}",
                self.role,
                self.process.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sum of a metric's samples on /metrics (None if the process does not answer).
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = HttpClient::new()
            .get(&self.url("/metrics"))
            .await
            .ok()?
            .body;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// A scenario's world.

/// What happened when, printed with every result and with every failure.
#[derive(Clone)]
struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Timeline {
    fn new() -> Self {
        Timeline {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let at = self.start.elapsed();
        println!("  +{:>7.3}s {what}", at.as_secs_f64());
        self.events.lock().unwrap().push((at, what));
    }

    fn render(&self) -> String {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(at, what)| format!("  +{:>7.3}s {what}\n", at.as_secs_f64()))
            .collect()
    }
}

/// The seed, the timeline and where the logs go.
struct Ctx {
    seed: u64,
    rng: fastrand::Rng,
    tl: Timeline,
    logs: PathBuf,
}

fn seed() -> u64 {
    std::env::var("SPILLWAY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..1 << 48))
}

/// Runs one scenario under its time bound, and turns a failure into a report: the seed and
/// how to replay it, the error, the fault timeline, and where the child logs were kept.
async fn chaos<F, Fut>(name: &'static str, bound: Duration, body: F) -> Result<()>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let seed = seed();
    let replay = format!("SPILLWAY_CHAOS_SEED={seed} cargo test --test chaos {name}");
    println!("chaos {name}: seed {seed} (replay: {replay})");
    let logs = tempfile::Builder::new()
        .prefix(&format!("spillway-chaos-{name}-"))
        .tempdir()?;
    let tl = Timeline::new();
    let ctx = Ctx {
        seed,
        rng: fastrand::Rng::with_seed(seed),
        tl: tl.clone(),
        logs: logs.path().to_path_buf(),
    };
    let error = match tokio::time::timeout(bound, body(ctx)).await {
        Ok(Ok(())) => {
            tl.note("passed");
            if std::env::var_os("SPILLWAY_CHAOS_KEEP_LOGS").is_some() {
                println!("child process logs kept in {}", logs.keep().display());
            }
            return Ok(());
        }
        Ok(Err(e)) => e,
        Err(_) => anyhow!("the scenario did not finish within its bound of {bound:?}"),
    };
    let kept = logs.keep();
    bail!(
        "chaos {name} FAILED (seed {seed}; replay: {replay})\n{error:#}\n\nfault timeline:\n{}\nchild process logs kept in {}",
        tl.render(),
        kept.display()
    )
}

/// How a scenario's cluster is set up.
struct Opts {
    partitions: i32,
    consumers: usize,
    /// A FaultProxy between the consumers and Postgres, with these faults from the start.
    pg_proxy: Option<Faults>,
    /// Extra consumer arguments.
    consumer_args: Vec<String>,
    /// Extra consumer environment (failpoints).
    consumer_env: Vec<(String, String)>,
    /// A FaultProxy in front of the broker, advertised to every client.
    broker_proxy: bool,
}

/// 512 KB/s each way: long enough COPYs to catch one in progress.
fn slow_link() -> Faults {
    Faults {
        bandwidth: Some(512 << 10),
        ..Faults::default()
    }
}

impl Opts {
    /// One consumer, to Postgres over a [`slow_link`] through a proxy.
    fn slow_link() -> Self {
        Opts {
            pg_proxy: Some(slow_link()),
            ..Opts::default()
        }
    }
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            partitions: 3,
            consumers: 1,
            pg_proxy: None,
            consumer_args: vec![],
            consumer_env: vec![],
            broker_proxy: false,
        }
    }
}

/// Postgres, Tansu, the producer and the consumers, all torn down when dropped.
struct Cluster {
    pg: Box<dyn PostgresServer>,
    broker: Tansu,
    pg_proxy: Option<FaultProxy>,
    broker_proxy: Option<FaultProxy>,
    producer: Service,
    consumers: Vec<Service>,
    tl: Timeline,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Cluster {
    async fn start(ctx: &Ctx, opts: Opts) -> Result<Self> {
        let pg = tokio::task::spawn_blocking(postgres::from_env).await??;
        let (broker, broker_proxy) = if opts.broker_proxy {
            let port = free_port();
            let broker =
                tokio::task::spawn_blocking(move || Tansu::start_advertising(Some(port))).await??;
            let upstream = ([127, 0, 0, 1], broker.port()).into();
            let proxy = FaultProxy::start_on(port, upstream, ctx.seed).await?;
            (broker, Some(proxy))
        } else {
            (tokio::task::spawn_blocking(Tansu::start).await??, None)
        };
        broker.create_topic(TOPIC, opts.partitions).await?;
        let pg_proxy = match opts.pg_proxy {
            Some(faults) => {
                let upstream = ([127, 0, 0, 1], pg.port()).into();
                let proxy = FaultProxy::start(upstream, ctx.seed).await?;
                proxy.set(faults);
                Some(proxy)
            }
            None => None,
        };
        let db_port = pg_proxy.as_ref().map_or(pg.port(), FaultProxy::port);
        let db_url = format!("postgres://postgres@127.0.0.1:{db_port}/postgres");
        let bootstrap = broker.bootstrap();

        ctx.tl.note("postgres and broker up");
        let args = strings(&[
            "--brokers",
            &bootstrap,
            "--topic",
            TOPIC,
            "--produce-timeout-ms",
            "3000",
            "-X",
            "reconnect.backoff.max.ms=500",
        ]);
        let log = ctx.logs.join("producer.log");
        let mut producer = Service::spawn("producer", args, vec![], log)?;
        producer.ready("/readyz").await?;
        ctx.tl.note("producer ready");

        let mut consumers = Vec::new();
        for n in 0..opts.consumers {
            let mut args = strings(&[
                "--brokers",
                &bootstrap,
                "--topic",
                TOPIC,
                "--group",
                "chaos",
                "--database-url",
                &db_url,
                "--batch-max-age-ms",
                "100",
                "--statement-timeout-ms",
                &STATEMENT_TIMEOUT.as_millis().to_string(),
                "--connect-timeout-ms",
                "2000",
                "--retry-initial-ms",
                "50",
                "--retry-max-ms",
                "1000",
                "--retry-seed",
                &ctx.seed.to_string(),
                "-X",
                &format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis()),
                "-X",
                "heartbeat.interval.ms=500",
                "-X",
                "reconnect.backoff.max.ms=500",
            ]);
            args.extend(opts.consumer_args.iter().cloned());
            let log = ctx.logs.join(format!("consumer-{n}.log"));
            let mut c = Service::spawn("consumer", args, opts.consumer_env.clone(), log)?;
            c.ready("/healthz").await?;
            consumers.push(c);
        }
        ctx.tl.note(format!(
            "cluster up: postgres :{} ({}), tansu :{}, producer :{}, {} consumer(s){}",
            pg.port(),
            pg.kind(),
            broker.port(),
            producer.port,
            consumers.len(),
            if pg_proxy.is_some() {
                format!(" (to Postgres through a proxy on :{db_port})")
            } else {
                String::new()
            }
        ));
        Ok(Cluster {
            pg,
            broker,
            pg_proxy,
            broker_proxy,
            producer,
            consumers,
            tl: ctx.tl.clone(),
        })
    }

    /// Starts traffic in the background: `profile` for `duration`, 1 to 5 records of 100 to
    /// 300 bytes per request (unless `spec` says otherwise).
    fn traffic(
        &self,
        ctx: &Ctx,
        profile: RateProfile,
        duration: Duration,
        spec: Option<PayloadSpec>,
    ) -> Traffic {
        let run_id = format!("c{:x}", ctx.seed);
        let schedule = profile.schedule(duration);
        let spec = spec.unwrap_or_else(|| PayloadSpec::generated((1, 5), (100, 300)));
        let cfg = RunConfig::new(self.producer.url("/store"), schedule);
        let payloads = PayloadGen::new(spec.clone(), &run_id, ctx.seed);
        let shape = match &profile {
            RateProfile::Replay { .. } => "a replayed schedule".to_string(),
            other => format!("{other:?}"),
        };
        self.tl.note(format!(
            "traffic starts: {} requests over {duration:?} ({shape})",
            cfg.schedule.len()
        ));
        let tl = self.tl.clone();
        let live = Arc::new(Live::default());
        let progress = live.clone();
        let handle = tokio::spawn(async move {
            let r = runner::run(cfg, payloads, progress, |_, _, _| {}).await;
            tl.note(format!(
                "traffic done: {} records acknowledged; answers {:?}, transport errors {}",
                r.acked.len(),
                r.statuses,
                r.transport_errors
            ));
            r
        });
        Traffic {
            run_id,
            spec,
            live,
            handle,
        }
    }

    /// Waits for the drain and checks: nothing acknowledged lost, nothing duplicated.
    async fn verdict(&self, run: &str, result: &RunResult) -> Result<Verdict> {
        ensure!(
            !result.acked.is_empty(),
            "no request was acknowledged at all: {:?}\n{:?}",
            result.statuses,
            result.error_samples
        );
        let v = verify(
            &self.pg.url(),
            TABLE,
            "id",
            run,
            &result.acked,
            DRAIN,
            |_| {},
        )
        .await?;
        self.tl.note(format!(
            "verdict: acknowledged {}, found {}, dead-lettered {}, lost {}, duplicated {}, unexpected {} (allowed); drained in {:.1} s",
            v.acknowledged, v.found, v.dead_lettered, v.lost, v.duplicated, v.unexpected, v.drain_seconds
        ));
        if !v.passed() || !v.drained {
            bail!(
                "lost {} acknowledged records (first: {:?}) and duplicated {} (first: {:?}); drained: {}\n{}",
                v.lost,
                ids(run, &v.lost_sample),
                v.duplicated,
                ids(run, &v.duplicated_sample),
                v.drained,
                self.log_tails()
            );
        }
        Ok(v)
    }

    fn log_tails(&self) -> String {
        let mut s = format!(
            "--- producer log ---\n{}\n",
            self.producer.process.log_tail(15)
        );
        for (n, c) in self.consumers.iter().enumerate() {
            s += &format!("--- consumer {n} log ---\n{}\n", c.process.log_tail(25));
        }
        s + &format!("--- broker log ---\n{}\n", self.broker.log_tail(10))
    }

    /// Waits until a consumer's COPY is in progress on the server; its backend's pid.
    async fn copy_in_progress(&self) -> Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = copy_backends(&self.pg.url())
                .await
                .unwrap_or_default()
                .first()
            {
                return Ok(*pid);
            }
            ensure!(
                Instant::now() < deadline,
                "no COPY was seen in progress within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn rows(&self) -> Result<i64> {
        let c = connect(&self.pg.url()).await?;
        Ok(c.query_one("SELECT count(*) FROM records", &[])
            .await?
            .get(0))
    }

    /// A consumer's counter, failing with its log if it does not answer.
    async fn consumer_metric(&self, n: usize, name: &str) -> Result<f64> {
        let c = &self.consumers[n];
        c.metric(name)
            .await
            .with_context(|| format!("consumer {n} /metrics:\n{}", c.process.log_tail(20)))
    }

    /// Consumer 0 neither crashed nor restarted, and it retried the interrupted flush.
    async fn consumer_rode_it_out(&mut self, pid: Option<i32>) -> Result<()> {
        self.consumer_survived(0, pid)?;
        let retries = self
            .consumer_metric(0, "spillway_consumer_flush_retries_total")
            .await?;
        ensure!(retries >= 1.0, "the interrupted flush was never retried");
        Ok(())
    }

    /// The consumer neither crashed nor was restarted: it rode the fault out.
    fn consumer_survived(&mut self, n: usize, pid: Option<i32>) -> Result<()> {
        let c = &mut self.consumers[n];
        ensure!(
            c.process.running() && c.process.pid() == pid,
            "the consumer did not survive the fault:\n{}",
            c.process.log_tail(30)
        );
        Ok(())
    }
}

struct Traffic {
    run_id: String,
    spec: PayloadSpec,
    live: Arc<Live>,
    handle: tokio::task::JoinHandle<RunResult>,
}

impl Traffic {
    async fn done(self) -> Result<(String, PayloadSpec, RunResult)> {
        Ok((self.run_id, self.spec, self.handle.await?))
    }
}

fn ids(run: &str, seqs: &[u64]) -> Vec<String> {
    seqs.iter().map(|s| PayloadGen::id(run, *s)).collect()
}

/// The suite's usual load: a base rate with seeded bursts of 20x.
fn spiky(ctx: &Ctx, base: f64) -> RateProfile {
    RateProfile::Spiky {
        base,
        multiplier: 20.0,
        burst: Duration::from_secs(1),
        gap: Duration::from_secs(4),
        seed: ctx.seed,
    }
}

/// A harness call that blocks (killing, restarting a server) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

/// 1. Fault: the Postgres postmaster SIGKILLed while a flush's COPY is in progress (a 512 KB/s
///    link makes each COPY last), restarted 2 s later. Invariant: no loss, no duplicate; the
///    consumer rides it out (same process) and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_copy() -> Result<()> {
    chaos(
        "postgres_killed_mid_copy",
        Duration::from_secs(150),
        |ctx| async move {
            let mut c = Cluster::start(&ctx, Opts::slow_link()).await?;
            let pid = c.consumers[0].process.pid();
            let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(12), None);
            pause(Duration::from_secs(2)).await;
            let backend = c.copy_in_progress().await?;
            blocking(|| c.pg.kill())?;
            c.tl.note(format!(
                "postmaster SIGKILLed while backend {backend} was in a COPY"
            ));
            pause(Duration::from_secs(2)).await;
            blocking(|| c.pg.restart())?;
            c.tl.note("postgres restarted");
            let (run, _, result) = traffic.done().await?;
            c.verdict(&run, &result).await?;
            c.consumer_rode_it_out(pid).await
        },
    )
    .await
}

/// 2. Fault: the backend running a flush's COPY SIGKILLed (Postgres then drops every connection
///    and recovers). Invariant: no loss, no duplicate; the consumer rides it out and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_flush() -> Result<()> {
    chaos(
        "backend_killed_mid_flush",
        Duration::from_secs(120),
        |ctx| async move {
            let mut c = Cluster::start(&ctx, Opts::slow_link()).await?;
            let pid = c.consumers[0].process.pid();
            let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(10), None);
            pause(Duration::from_secs(2)).await;
            let backend = c.copy_in_progress().await?;
            blocking(|| c.pg.crash_backend(backend))?;
            c.tl.note(format!(
                "backend {backend} SIGKILLed in the middle of its COPY"
            ));
            let (run, _, result) = traffic.done().await?;
            c.verdict(&run, &result).await?;
            c.consumer_rode_it_out(pid).await
        },
    )
    .await
}

/// 3. Fault: Postgres (postmaster and backends) SIGSTOPped during a COPY for 2.5x the
///    consumer's statement timeout, then resumed. Invariant: no loss, no duplicate; the
///    consumer gave up on the frozen flush (its own deadline) and retried, without crashing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_frozen_past_the_statement_timeout() -> Result<()> {
    chaos("postgres_frozen_past_the_statement_timeout", Duration::from_secs(150), |ctx| async move {
        let mut c = Cluster::start(&ctx, Opts::slow_link()).await?;
        let pid = c.consumers[0].process.pid();
        let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(14), None);
        pause(Duration::from_secs(2)).await;
        let backend = c.copy_in_progress().await?;
        blocking(|| c.pg.pause())?;
        c.tl.note(format!("postgres SIGSTOPped while backend {backend} was in a COPY"));
        pause(STATEMENT_TIMEOUT * 5 / 2).await;
        let retries_frozen = c.consumer_metric(0, "spillway_consumer_flush_retries_total").await?;
        blocking(|| c.pg.resume())?;
        c.tl.note(format!("postgres resumed (the consumer had counted {retries_frozen} retries while it was frozen)"));
        let (run, _, result) = traffic.done().await?;
        c.verdict(&run, &result).await?;
        c.consumer_survived(0, pid)?;
        ensure!(
            retries_frozen >= 1.0,
            "the consumer did not give up on the frozen flush within 2.5x its statement timeout"
        );
        Ok(())
    })
    .await
}

/// 4. Faults: the consumer's connection cut in the middle of a COPY (the proxy resets it after
///    a seeded number of bytes, for 1 s), then 200 ms of latency with 100 ms of jitter on the
///    link for the rest of a spiky load. Invariant: no loss, no duplicate; the consumer
///    reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_copy_then_a_slow_link() -> Result<()> {
    chaos(
        "connection_cut_mid_copy_then_a_slow_link",
        Duration::from_secs(180),
        |mut ctx| async move {
            let c = Cluster::start(&ctx, Opts::slow_link()).await?;
            let proxy = c.pg_proxy.as_ref().unwrap();
            let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(15), None);
            pause(Duration::from_secs(2)).await;
            c.copy_in_progress().await?;
            let accepted = proxy.accepted();
            let cut = ctx.rng.u64(0..4096);
            proxy.set(Faults {
                cut_after_upstream_bytes: Some(cut),
                ..slow_link()
            });
            c.tl.note(format!(
                "COPY in progress: every connection to Postgres cut after {cut} bytes"
            ));
            pause(Duration::from_secs(1)).await;
            proxy.set(Faults {
                latency: Duration::from_millis(200),
                jitter: Duration::from_millis(100),
                ..Faults::default()
            });
            c.tl.note("cuts healed; 200 ms latency + 100 ms jitter on the link to Postgres");
            let (run, _, result) = traffic.done().await?;
            proxy.heal();
            c.tl.note("link healed");
            c.verdict(&run, &result).await?;
            ensure!(
                proxy.accepted() > accepted,
                "the consumer never reconnected after the cut"
            );
            Ok(())
        },
    )
    .await
}

/// 5. Fault: Postgres down (SIGKILL) for 60 s under traffic with 20x bursts, then restarted.
///    Invariant: no loss, no duplicate; consumption paused (the buffer filled to its bound and
///    Kafka was paused); the consumer's buffer never exceeded its bound and its memory stayed
///    under the bound stated below; everything drained after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_a_minute_under_a_spike() -> Result<()> {
    const BUFFER: u64 = 3 << 20;
    const OUTAGE: Duration = Duration::from_secs(60);
    chaos("postgres_down_for_a_minute_under_a_spike", Duration::from_secs(300), |ctx| async move {
        let opts = Opts {
            consumer_args: strings(&[
                "--batch-max-bytes",
                &(BUFFER / 4).to_string(),
                "--buffer-max-bytes",
                &BUFFER.to_string(),
            ]),
            ..Opts::default()
        };
        let mut c = Cluster::start(&ctx, opts).await?;
        let profile = RateProfile::Spiky {
            base: 15.0,
            multiplier: 20.0,
            burst: Duration::from_secs(2),
            gap: Duration::from_secs(6),
            seed: ctx.seed,
        };
        let traffic = c.traffic(&ctx, profile, OUTAGE + Duration::from_secs(6), None);
        pause(Duration::from_secs(3)).await;
        let baseline = c.consumers[0].process.rss_bytes().unwrap_or(0);
        // The consumer's own bound: the record buffer, librdkafka's fetch queue (16 MiB, set
        // by the consumer), the process as it was before the outage, and 64 MiB of slack.
        let rss_bound = baseline + BUFFER + (16 << 20) + (64 << 20);
        blocking(|| c.pg.kill())?;
        c.tl.note(format!("postgres SIGKILLed for {OUTAGE:?}; consumer RSS {} MiB", baseline >> 20));
        let (mut peak_rss, mut peak_buffered, mut paused) = (0u64, 0f64, false);
        let until = Instant::now() + OUTAGE;
        while Instant::now() < until {
            peak_rss = peak_rss.max(c.consumers[0].process.rss_bytes().unwrap_or(0));
            let m = &c.consumers[0];
            peak_buffered = peak_buffered.max(m.metric("spillway_consumer_buffered_bytes").await.unwrap_or(0.0));
            paused |= m.metric("spillway_consumer_kafka_paused").await.unwrap_or(0.0) > 0.0;
            pause(Duration::from_millis(200)).await;
        }
        blocking(|| c.pg.restart())?;
        c.tl.note(format!(
            "postgres restarted; during the outage: peak RSS {} MiB (bound {} MiB), peak buffer {:.0} bytes (bound {BUFFER}), Kafka paused: {paused}",
            peak_rss >> 20, rss_bound >> 20, peak_buffered
        ));
        let (run, _, result) = traffic.done().await?;
        c.verdict(&run, &result).await?;
        ensure!(paused, "consumption never paused although Postgres was down for a minute");
        // One Kafka message may land on top of a nearly full buffer: allow one message.
        ensure!(
            peak_buffered <= (BUFFER + (1 << 20)) as f64,
            "the buffer grew past its bound: {peak_buffered} bytes"
        );
        ensure!(
            peak_rss <= rss_bound,
            "the consumer's memory grew past its bound: {} MiB > {} MiB",
            peak_rss >> 20,
            rss_bound >> 20
        );
        Ok(())
    })
    .await
}

/// 6. Fault: Postgres restarted ten times, every 1.5 to 3 s (seeded), each time either a clean
///    fast shutdown or a SIGKILL (seeded), during spiky load. Invariant: no loss, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_ten_times() -> Result<()> {
    chaos(
        "postgres_restarted_ten_times",
        Duration::from_secs(200),
        |mut ctx| async move {
            let mut c = Cluster::start(&ctx, Opts::default()).await?;
            let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(30), None);
            for n in 1..=10 {
                pause(Duration::from_millis(ctx.rng.u64(1500..=3000))).await;
                if ctx.rng.bool() {
                    blocking(|| -> Result<()> {
                        c.pg.kill()?;
                        Ok(c.pg.restart()?)
                    })?;
                    c.tl.note(format!("restart {n}/10: SIGKILL, then start"));
                } else {
                    blocking(|| c.pg.restart())?;
                    c.tl.note(format!("restart {n}/10: fast shutdown, then start"));
                }
            }
            let (run, _, result) = traffic.done().await?;
            c.verdict(&run, &result).await?;
            Ok(())
        },
    )
    .await
}

/// 7. Faults, under load: first the broker cut off from every client for 3 s (a proxy resets
///    every connection and refuses new ones, with produce requests in flight), then healed; 2 s
///    later the broker SIGKILLed and restarted 3 s later on its data. Invariant: no 2xx'd record
///    lost; what the producer could not persist was answered 503 (never 2xx, never a dropped
///    connection, never another status); the producer acknowledges again once the broker is
///    back, and its process stayed up throughout.
///
///    Tansu 0.6.0 stops serving after a client's connection is reset in the middle of a produce
///    request (its storage answers `UnableToSend` to every request) until it is restarted, so
///    the producer's recovery is checked after the restart, not after the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_under_load() -> Result<()> {
    chaos(
        "broker_killed_under_load",
        Duration::from_secs(180),
        |mut ctx| async move {
            let mut c = Cluster::start(
                &ctx,
                Opts {
                    broker_proxy: true,
                    ..Opts::default()
                },
            )
            .await?;
            let producer_pid = c.producer.process.pid();
            let traffic = c.traffic(
                &ctx,
                RateProfile::Constant { rate: 100.0 },
                Duration::from_secs(25),
                None,
            );
            let proxy = c.broker_proxy.as_ref().unwrap();
            pause(Duration::from_millis(ctx.rng.u64(2000..3000))).await;
            proxy.set(Faults {
                refuse: true,
                ..Faults::default()
            });
            proxy.reset_all();
            c.tl.note("broker cut off: every connection reset, new ones refused");
            pause(Duration::from_secs(3)).await;
            proxy.heal();
            c.tl.note("broker reachable again");
            pause(Duration::from_millis(ctx.rng.u64(1500..2500))).await;
            blocking(|| c.broker.kill())?;
            c.tl.note("broker SIGKILLed");
            pause(Duration::from_secs(3)).await;
            blocking(|| c.broker.restart())?;
            c.tl.note("broker restarted on its data");
            acknowledging_again(&c, &traffic).await?;
            let (run, _, result) = traffic.done().await?;
            c.verdict(&run, &result).await?;
            let refused = result.statuses.get(&503).copied().unwrap_or(0);
            ensure!(
                refused > 0,
                "no 503 while the broker was unreachable: {:?}",
                result.statuses
            );
            let unclear: Vec<_> = result
                .statuses
                .keys()
                .filter(|s| ![200, 429, 503].contains(*s))
                .collect();
            ensure!(
                unclear.is_empty(),
                "answers other than 200, 429 and 503: {:?}",
                result.statuses
            );
            ensure!(
                result.transport_errors == 0,
                "{} requests lost their connection",
                result.transport_errors
            );
            ensure!(
                c.producer.process.running() && c.producer.process.pid() == producer_pid,
                "the producer did not survive the broker's faults:\n{}",
                c.producer.process.log_tail(30)
            );
            Ok(())
        },
    )
    .await
}

/// Waits (at most 20 s) until the producer acknowledges a request it had not before.
async fn acknowledging_again(c: &Cluster, traffic: &Traffic) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let since = Instant::now();
    let before = traffic.live.acked_records.load(Relaxed);
    while traffic.live.acked_records.load(Relaxed) == before {
        ensure!(
            since.elapsed() < Duration::from_secs(20),
            "the producer acknowledged nothing for 20 s after the broker was back:\n{}",
            c.producer.process.log_tail(20)
        );
        pause(Duration::from_millis(20)).await;
    }
    c.tl.note(format!(
        "the producer acknowledges again ({:.1} s later)",
        since.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// 8. Fault: the consumer SIGKILLs itself right after its n-th Postgres commit and before the
///    matching Kafka commit (failpoint, n seeded in 2..=5), under load; a new consumer process
///    takes over. Invariant: no loss, and the restarted consumer adds no duplicate although
///    Kafka's committed offsets are behind Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_between_its_two_commits() -> Result<()> {
    chaos("consumer_killed_between_its_two_commits", Duration::from_secs(150), |mut ctx| async move {
        let n = ctx.rng.u32(2..=5);
        let opts = Opts {
            consumer_env: vec![(
                spillway_consumer::FAILPOINT_EXIT_AFTER_COMMITS.into(),
                n.to_string(),
            )],
            ..Opts::default()
        };
        let mut c = Cluster::start(&ctx, opts).await?;
        let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(12), None);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = c.consumers[0].process.exited() {
                break status;
            }
            ensure!(Instant::now() < deadline, "the failpoint never fired");
            pause(Duration::from_millis(10)).await;
        };
        use std::os::unix::process::ExitStatusExt;
        ensure!(status.signal() == Some(9), "the consumer ended with {status}, not SIGKILL:\n{}", c.consumers[0].process.log_tail(20));
        let written = c.rows().await?;
        c.tl.note(format!("consumer SIGKILLed after Postgres commit {n} (table: {written} rows), before its Kafka commit"));
        ensure!(written > 0, "nothing was committed before the kill");
        c.consumers[0].restart(false)?;
        c.consumers[0].ready("/healthz").await?;
        c.tl.note("a new consumer process started");
        let (run, _, result) = traffic.done().await?;
        c.verdict(&run, &result).await?;
        Ok(())
    })
    .await
}

/// 9. Fault: two consumers in one group; one SIGSTOPped for longer than the session timeout (a
///    zombie: the group gives its partitions to the other), then resumed while it may still
///    hold a batch. Invariant: no duplicate, no loss; rows kept landing while it was frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_consumer_in_the_group() -> Result<()> {
    chaos("a_zombie_consumer_in_the_group", Duration::from_secs(180), |mut ctx| async move {
        let opts = Opts {
            partitions: 4,
            consumers: 2,
            ..Opts::default()
        };
        let c = Cluster::start(&ctx, opts).await?;
        let traffic = c.traffic(&ctx, RateProfile::Constant { rate: 100.0 }, Duration::from_secs(24), None);
        pause(Duration::from_millis(ctx.rng.u64(3000..5000))).await;
        let zombie = ctx.rng.usize(0..2);
        c.consumers[zombie].process.pause();
        c.tl.note(format!("consumer {zombie} SIGSTOPped"));
        pause(SESSION_TIMEOUT + Duration::from_secs(2)).await;
        let before = c.rows().await?;
        pause(Duration::from_secs(3)).await;
        let after = c.rows().await?;
        c.consumers[zombie].process.resume();
        c.tl.note(format!(
            "consumer {zombie} resumed after {:?} (rows while it was out of the group: {before} -> {after})",
            SESSION_TIMEOUT + Duration::from_secs(5)
        ));
        let (run, _, result) = traffic.done().await?;
        c.verdict(&run, &result).await?;
        ensure!(after > before, "no row landed while consumer {zombie} was frozen: its partitions were never taken over");
        Ok(())
    })
    .await
}

/// 10. Fault: 3% of the records are valid JSON that Postgres refuses (a `\u0000` in a string),
///     mixed into spiky traffic. Invariant: each of them is in the dead-letter table with its
///     reason, every other acknowledged record is in the table exactly once, nothing stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_postgres_rejects_go_to_the_dead_letter_table() -> Result<()> {
    chaos("records_postgres_rejects_go_to_the_dead_letter_table", Duration::from_secs(150), |ctx| async move {
        let c = Cluster::start(&ctx, Opts::default()).await?;
        let mut spec = PayloadSpec::generated((1, 5), (100, 300));
        spec.poison_rate = 0.03;
        let traffic = c.traffic(&ctx, spiky(&ctx, 30.0), Duration::from_secs(10), Some(spec));
        let (run, spec, result) = traffic.done().await?;
        let v = c.verdict(&run, &result).await?;
        let poison: Vec<u64> = result.acked.iter().filter(|s| spec.is_poison(*s)).collect();
        ensure!(!poison.is_empty(), "no poison record was acknowledged");
        if v.dead_lettered_seqs != poison {
            let wrong: Vec<_> = v.dead_lettered_seqs.iter().filter(|s| !spec.is_poison(**s)).collect();
            let missing: Vec<_> = poison.iter().filter(|s| !v.dead_lettered_seqs.contains(s)).collect();
            bail!("dead letters differ from the poison records: good records dead-lettered {wrong:?}, poison records not there {missing:?}");
        }
        let db = connect(&c.pg.url()).await?;
        let reasons: Vec<String> = db
            .query("SELECT DISTINCT error FROM records_dead_letters", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            !reasons.is_empty() && reasons.iter().all(|r| r.contains("\\u0000")),
            "each dead letter must carry Postgres's reason: {reasons:?}"
        );
        c.tl.note(format!("{} poison records dead-lettered, reason: {}", poison.len(), reasons[0]));
        Ok(())
    })
    .await
}

/// 11. Fault: the producer SIGKILLed under load, restarted 1 s later on the same port.
///     Invariant: every 2xx'd record is in Postgres exactly once; the clients saw the kill as
///     failed requests, never as a 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_killed_under_load() -> Result<()> {
    chaos(
        "producer_killed_under_load",
        Duration::from_secs(150),
        |mut ctx| async move {
            let mut c = Cluster::start(&ctx, Opts::default()).await?;
            let traffic = c.traffic(&ctx, spiky(&ctx, 40.0), Duration::from_secs(12), None);
            pause(Duration::from_millis(ctx.rng.u64(3000..5000))).await;
            c.producer.process.kill();
            c.tl.note("producer SIGKILLed");
            pause(Duration::from_secs(1)).await;
            c.producer.restart(true)?;
            c.producer.ready("/readyz").await?;
            c.tl.note("producer restarted");
            let (run, _, result) = traffic.done().await?;
            c.verdict(&run, &result).await?;
            let failed = result.transport_errors
                + result
                    .statuses
                    .iter()
                    .filter(|(s, _)| **s >= 300)
                    .map(|(_, n)| n)
                    .sum::<u64>();
            ensure!(
                failed > 0,
                "no request failed although the producer was killed: {:?}",
                result.statuses
            );
            Ok(())
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The alert rules, live.

/// Debian's `prometheus` (or `SPILLWAY_PROMETHEUS_BIN`) scraping the scenario's producer and
/// consumers every second and evaluating `deploy/prometheus/alerts.yml`, with every `for:`
/// shortened to 5 s so that an alert fires within seconds (promtool's unit tests check the
/// real durations). Killed when dropped.
struct Prometheus {
    port: u16,
    process: ChildProcess,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(ctx: &Ctx, producer: &Service, consumers: &[Service]) -> Result<Self> {
        let bin = std::env::var("SPILLWAY_PROMETHEUS_BIN").unwrap_or("prometheus".into());
        let dir = tempfile::Builder::new()
            .prefix("spillway-prometheus-")
            .tempdir()?;
        let rules_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
        let rules: String = std::fs::read_to_string(&rules_path)
            .with_context(|| rules_path.display().to_string())?
            .lines()
            .map(|l| match l.trim_start().strip_prefix("for: ") {
                Some(_) => format!("{}for: 5s\n", &l[..l.len() - l.trim_start().len()]),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(dir.path().join("alerts.yml"), rules)?;
        let target = |s: &Service| format!("'127.0.0.1:{}'", s.port);
        let consumers: Vec<String> = consumers.iter().map(target).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [alerts.yml]\n\
                 scrape_configs:\n\
                 - job_name: spillway-producer\n  static_configs: [{{targets: [{}]}}]\n\
                 - job_name: spillway-consumer\n  static_configs: [{{targets: [{}]}}]\n",
                target(producer),
                consumers.join(", ")
            ),
        )?;
        let port = free_port();
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let mut process = ChildProcess::spawn("prometheus", cmd, &ctx.logs.join("prometheus.log"))
            .with_context(|| {
                format!("starting {bin} (Debian's prometheus package; ci/test.sh installs it)")
            })?;
        let client = HttpClient::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = process.exited() {
                bail!("prometheus exited ({status}):\n{}", process.log_tail(20));
            }
            if let Ok(a) = client
                .get(&format!("http://127.0.0.1:{port}/-/ready"))
                .await
            {
                if a.status == 200 {
                    break;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus was not ready within 60 s:\n{}",
                process.log_tail(20)
            );
            pause(Duration::from_millis(100)).await;
        }
        Ok(Prometheus {
            port,
            process,
            _dir: dir,
        })
    }

    async fn api(&self, path: &str) -> Result<serde_json::Value> {
        let a = HttpClient::new()
            .get(&format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .await?;
        ensure!(
            a.status == 200,
            "prometheus {path}: {} {}",
            a.status,
            a.body
        );
        Ok(a.json()["data"].clone())
    }

    /// The state of `alert` per the API (`pending`, `firing`), or None when it is inactive.
    async fn alert_state(&self, alert: &str) -> Result<Option<String>> {
        let data = self.api("alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == alert)
            .and_then(|a| a["state"].as_str().map(str::to_string)))
    }

    /// Polls until `check` holds (at most `within`), noting each change of what it saw.
    async fn await_until<F, Fut>(
        &self,
        tl: &Timeline,
        what: &str,
        within: Duration,
        check: F,
    ) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(bool, String)>>,
    {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            let (done, seen) = check().await?;
            if seen != last {
                tl.note(format!("prometheus: {seen}"));
                last = seen;
            }
            if done {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what} not seen within {within:?}; last: {last}\n{}",
                self.process.log_tail(10)
            );
            pause(Duration::from_millis(250)).await;
        }
    }
}

/// 12. Fault: Postgres SIGKILLed under traffic until Prometheus fires SpillwayPostgresUnreachable,
///     then restarted. Observed only through Prometheus's API, as an operator would: both
///     services scraped, the alert inactive, then pending and firing while Postgres is down,
///     and inactive again after the restart. Invariant: no loss, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_alert_fires_and_resolves() -> Result<()> {
    const ALERT: &str = "SpillwayPostgresUnreachable";
    chaos(
        "postgres_unreachable_alert_fires_and_resolves",
        Duration::from_secs(180),
        |ctx| async move {
            let mut c = Cluster::start(&ctx, Opts::default()).await?;
            let prom = Prometheus::start(&ctx, &c.producer, &c.consumers).await?;
            let traffic = c.traffic(
                &ctx,
                RateProfile::Constant { rate: 40.0 },
                Duration::from_secs(30),
                None,
            );
            prom.await_until(
                &c.tl,
                "both targets up and Postgres up",
                Duration::from_secs(30),
                || async {
                    let up = prom.api("query?query=sum(up)").await?;
                    let db = prom
                        .api("query?query=spillway_consumer_database_up")
                        .await?;
                    let value = |d: &serde_json::Value| {
                        d["result"][0]["value"][1]
                            .as_str()
                            .unwrap_or("none")
                            .to_string()
                    };
                    let state = prom.alert_state(ALERT).await?;
                    let (up, db) = (value(&up), value(&db));
                    Ok((
                        up == "2" && db == "1" && state.is_none(),
                        format!("targets up {up}, database_up {db}, {ALERT} {state:?}"),
                    ))
                },
            )
            .await?;
            blocking(|| c.pg.kill())?;
            c.tl.note("postgres SIGKILLed");
            prom.await_until(
                &c.tl,
                "the alert firing",
                Duration::from_secs(60),
                || async {
                    let state = prom.alert_state(ALERT).await?;
                    Ok((
                        state.as_deref() == Some("firing"),
                        format!("{ALERT} {state:?}"),
                    ))
                },
            )
            .await?;
            blocking(|| c.pg.restart())?;
            c.tl.note("postgres restarted");
            prom.await_until(
                &c.tl,
                "the alert resolved",
                Duration::from_secs(60),
                || async {
                    let state = prom.alert_state(ALERT).await?;
                    Ok((state.is_none(), format!("{ALERT} {state:?}")))
                },
            )
            .await?;
            let (run, _, result) = traffic.done().await?;
            c.verdict(&run, &result).await?;
            Ok(())
        },
    )
    .await
}
