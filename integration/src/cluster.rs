//! A scenario's world: its seed and timeline, the services as child processes, the servers,
//! the traffic, the evidence checks and the verdict.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use spillway_core::{Envelope, RequestId};
use spillway_harness::http::HttpClient;
use spillway_harness::postgres::{connect, copies_in_progress, CopyInProgress};
use spillway_harness::{
    free_port, postgres_from_env, ChildProcess, FaultProxy, Faults, KafkaBroker, PostgresServer,
    Tansu,
};
use spillway_loadgen::keyed::{verify_latest_per_key, KeyedVerdict, RequestsSeen};
use spillway_loadgen::payload::{PayloadGen, PayloadSpec};
use spillway_loadgen::profile::RateProfile;
use spillway_loadgen::report::retries_line;
use spillway_loadgen::retry::RetrySettings;
use spillway_loadgen::runner::{self, KeyedRetries, Live, RunConfig, RunResult};
use spillway_loadgen::verify::{verify, Verdict, VerifyConfig};

use crate::child::{ARGS_ENV, ENTRY_TEST, ROLE_ENV};

pub(crate) const TOPIC: &str = "events";
pub(crate) const TABLE: &str = "records";
/// How long the verdict waits for the pipeline to go quiet after the traffic.
const QUIET_WITHIN: Duration = Duration::from_secs(90);
/// The consumer's statement timeout in every scenario (scenario 3 freezes Postgres past it).
pub(crate) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The consumer group's session timeout (scenario 9 freezes a member past it).
pub(crate) const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// Fewer acknowledged records than this prove nothing: every scenario's traffic carries more.
pub(crate) const MIN_ACKED: u64 = 2_000;

// ---------------------------------------------------------------------------------------------
// How a scenario runs.

/// How a scenario runs.
#[derive(Clone, Copy, Debug)]
pub enum Run {
    /// The suite's proof: the verdict must pass and every check hold.
    Proof,
    /// With a known bug switched on in one service: the fault's evidence must still hold, and
    /// the verdict must report the harm the bug does.
    Mutant(Mutant),
}

/// A known bug switched on in one service (`SPILLWAY_MUTATE`; the services must be built with
/// the `mutations` feature).
#[derive(Clone, Copy, Debug)]
pub struct Mutant {
    /// The bug's name, as `SPILLWAY_MUTATE` takes it (`no-compare-and-set`, ...).
    pub name: &'static str,
    /// The service that runs with it.
    pub role: Role,
    /// What the verdict must report.
    pub harm: Harm,
}

/// A service of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `spillway-producer`.
    Producer,
    /// `spillway-consumer` (every consumer process of the scenario).
    Consumer,
}

/// What a bug does to acknowledged records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Harm {
    /// Some are missing once the pipeline is quiet.
    Loss,
    /// Some are in Postgres more than once.
    Duplicates,
}

impl Run {
    /// A run with `name` switched on in `role`, which must cause `harm`.
    pub fn mutant(name: &'static str, role: Role, harm: Harm) -> Self {
        Run::Mutant(Mutant { name, role, harm })
    }

    fn replay(&self, seed: u64, scenario: &str) -> String {
        match self {
            Run::Proof => format!("SPILLWAY_CHAOS_SEED={seed} cargo test --test chaos {scenario}"),
            Run::Mutant(m) => format!(
                "SPILLWAY_CHAOS_SEED={seed} cargo test -p spillway-integration --features mutations --test chaos_mutations {}",
                m.name.replace('-', "_")
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A producer or consumer child process, restartable with the same arguments and port.
pub(crate) struct Service {
    role: &'static str,
    pub(crate) port: u16,
    args: Vec<String>,
    /// Kept across restarts (a mutation).
    env: Vec<(String, String)>,
    /// Dropped by [`Service::restart_without_failpoints`].
    failpoints: Vec<(String, String)>,
    log: PathBuf,
    pub(crate) process: ChildProcess,
}

impl Service {
    /// Starts `role` with `args` plus `--listen` on a free port of 127.0.0.1 (kept across
    /// restarts).
    fn spawn(
        role: &'static str,
        mut args: Vec<String>,
        env: Vec<(String, String)>,
        failpoints: Vec<(String, String)>,
        log: PathBuf,
    ) -> Result<Self> {
        let port = free_port();
        args.extend(strings(&["--listen", &format!("127.0.0.1:{port}")]));
        let all: Vec<_> = env.iter().chain(&failpoints).cloned().collect();
        let process = Self::launch(role, &args, &all, &log)?;
        Ok(Service {
            role,
            port,
            args,
            env,
            failpoints,
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
        cmd.args([ENTRY_TEST, "--exact", "--ignored", "--nocapture"])
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

    /// SIGKILLs the process if it still runs and starts it again, without its failpoints.
    pub(crate) fn restart_without_failpoints(&mut self) -> Result<()> {
        if self.process.running() {
            self.process.kill()?;
        }
        self.failpoints.clear();
        self.process = Self::launch(self.role, &self.args, &self.env, &self.log)?;
        Ok(())
    }

    /// Starts the process again after it was killed (with the same environment).
    pub(crate) fn start_again(&mut self) -> Result<()> {
        ensure!(!self.process.running(), "the {} still runs", self.role);
        let all: Vec<_> = self.env.iter().chain(&self.failpoints).cloned().collect();
        self.process = Self::launch(self.role, &self.args, &all, &self.log)?;
        Ok(())
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `path` answers 200, failing at once if the process exits.
    pub(crate) async fn ready(&mut self, path: &str) -> Result<()> {
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

    /// The sum of a metric's samples on /metrics. An error when the process does not answer or
    /// the page has no such metric: a measurement that was not taken never reads as 0.
    pub(crate) async fn metric(&self, name: &str) -> Result<f64> {
        let page = HttpClient::new()
            .get(&self.url("/metrics"))
            .await
            .with_context(|| format!("the {} did not answer /metrics", self.role))?
            .body;
        spillway_harness::metrics::sample_sum(&page, name)
            .with_context(|| format!("the {}'s /metrics has no {name}", self.role))
    }
}

pub(crate) fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The seed, the timeline and the checks.

/// What happened when, printed as it happens and with every failure.
#[derive(Clone)]
pub(crate) struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Timeline {
    fn new() -> Self {
        Timeline {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    pub(crate) fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let at = self.start.elapsed();
        println!("  +{:>7.3}s {what}", at.as_secs_f64());
        locked(&self.events).push((at, what));
    }

    fn render(&self) -> String {
        locked(&self.events)
            .iter()
            .map(|(at, what)| format!("  +{:>7.3}s {what}\n", at.as_secs_f64()))
            .collect()
    }
}

/// A scenario's seed, timeline, log directory and way of running.
pub(crate) struct Ctx {
    pub(crate) seed: u64,
    pub(crate) rng: fastrand::Rng,
    pub(crate) tl: Timeline,
    pub(crate) logs: PathBuf,
    run: Run,
    /// The verdict, with the child logs' tails as they were then (for a mutant run's report).
    verdict: Arc<Mutex<Option<(Verdict, String)>>>,
}

impl Ctx {
    /// A check of the pipeline's behaviour under the fault (it survived, it retried, it was
    /// fenced). The proof fails on it; a mutant run only notes it, since the bug may be what
    /// breaks it, and lets the verdict speak.
    pub(crate) fn check(&self, holds: bool, what: impl FnOnce() -> String) -> Result<()> {
        if holds {
            return Ok(());
        }
        match self.run {
            Run::Proof => Err(anyhow!(what())),
            Run::Mutant(m) => {
                self.tl
                    .note(format!("(with {} this check fails: {})", m.name, what()));
                Ok(())
            }
        }
    }

    fn mutant(&self) -> Option<Mutant> {
        match self.run {
            Run::Proof => None,
            Run::Mutant(m) => Some(m),
        }
    }
}

fn seed() -> u64 {
    std::env::var("SPILLWAY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..1 << 48))
}

/// Runs one scenario under its time bound, then (for a mutant run) checks that the verdict
/// reported the bug's harm. A failure becomes a report: the seed and how to replay it, the
/// error, the fault timeline, and where the child logs were kept.
pub(crate) async fn chaos<F, Fut>(
    name: &'static str,
    run: Run,
    bound: Duration,
    body: F,
) -> Result<()>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let seed = seed();
    let replay = run.replay(seed, name);
    match run {
        Run::Proof => println!("chaos {name}: seed {seed} (replay: {replay})"),
        Run::Mutant(m) => println!(
            "chaos {name} with the {:?} mutation {} (must report {:?}): seed {seed} (replay: {replay})",
            m.role, m.name, m.harm
        ),
    }
    let logs = tempfile::Builder::new()
        .prefix(&format!("spillway-chaos-{name}-"))
        .tempdir()?;
    let tl = Timeline::new();
    let verdict = Arc::new(Mutex::new(None));
    let ctx = Ctx {
        seed,
        rng: fastrand::Rng::with_seed(seed),
        tl: tl.clone(),
        logs: logs.path().to_path_buf(),
        run,
        verdict: verdict.clone(),
    };
    let outcome = match tokio::time::timeout(bound, body(ctx)).await {
        Ok(Ok(())) => match run {
            Run::Proof => Ok(()),
            Run::Mutant(m) => caught(m, locked(&verdict).as_ref()),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!(
            "the scenario did not finish within its bound of {bound:?}"
        )),
    };
    let error = match outcome {
        Ok(()) => {
            tl.note("passed");
            if std::env::var_os("SPILLWAY_CHAOS_KEEP_LOGS").is_some() {
                println!("child process logs kept in {}", logs.keep().display());
            }
            return Ok(());
        }
        Err(e) => e,
    };
    let kept = logs.keep();
    bail!(
        "chaos {name} FAILED (seed {seed}; replay: {replay})\n{error:#}\n\nfault timeline:\n{}\nchild process logs kept in {}",
        tl.render(),
        kept.display()
    )
}

/// Whether the verdict reported what `m` does.
fn caught(m: Mutant, verdict: Option<&(Verdict, String)>) -> Result<()> {
    let (v, tails) = verdict.context("the scenario reached no verdict")?;
    let caught = match m.harm {
        // A record still on its way is not lost: only a quiet pipeline's verdict counts.
        Harm::Loss => v.quiet && v.lost > 0,
        Harm::Duplicates => v.duplicated > 0,
    };
    ensure!(
        caught,
        "the {} mutation was NOT caught: the verdict should report {:?}, and found lost {}, duplicated {}, quiet {} ({})\n{tails}",
        m.name,
        m.harm,
        v.lost,
        v.duplicated,
        v.quiet,
        v.not_quiet.as_deref().unwrap_or("quiet")
    );
    println!(
        "mutation {} caught: lost {}, duplicated {} of {} acknowledged",
        m.name, v.lost, v.duplicated, v.acknowledged
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The cluster.

/// How a scenario's cluster is set up.
pub(crate) struct Opts {
    pub(crate) partitions: i32,
    pub(crate) consumers: usize,
    /// A FaultProxy between the consumers and Postgres, with these faults from the start.
    pub(crate) pg_proxy: Option<Faults>,
    /// Each consumer to Postgres through a proxy of its own (no faults until a scenario sets
    /// some), to act on one consumer's link.
    pub(crate) link_per_consumer: bool,
    /// The consumers' `--batch-max-age-ms`.
    pub(crate) batch_max_age: Duration,
    /// The consumers' `--statement-timeout-ms` (their flush deadline is this plus the 2 s
    /// connect timeout).
    pub(crate) statement_timeout: Duration,
    /// Extra consumer arguments.
    pub(crate) consumer_args: Vec<String>,
    /// Consumer failpoints (dropped when a consumer restarts without them).
    pub(crate) consumer_failpoints: Vec<(String, String)>,
    /// A FaultProxy in front of the broker, advertised to every client.
    pub(crate) broker_proxy: bool,
}

/// 512 KB/s each way: long enough COPYs to catch one in progress.
pub(crate) fn slow_link() -> Faults {
    Faults {
        bandwidth: Some(512 << 10),
        ..Faults::default()
    }
}

impl Opts {
    /// One consumer, to Postgres over a [`slow_link`] through a proxy.
    pub(crate) fn slow_link() -> Self {
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
            link_per_consumer: false,
            batch_max_age: Duration::from_millis(100),
            statement_timeout: STATEMENT_TIMEOUT,
            consumer_args: vec![],
            consumer_failpoints: vec![],
            broker_proxy: false,
        }
    }
}

/// Postgres, Tansu, the producer and the consumers, all torn down when dropped.
pub(crate) struct Cluster {
    pub(crate) pg: Box<dyn PostgresServer>,
    pub(crate) broker: Tansu,
    pub(crate) pg_proxy: Option<FaultProxy>,
    /// Consumer n's own link to Postgres, with [`Opts::link_per_consumer`].
    pub(crate) consumer_links: Vec<FaultProxy>,
    pub(crate) broker_proxy: Option<FaultProxy>,
    pub(crate) producer: Service,
    pub(crate) consumers: Vec<Service>,
    recipe: ConsumerRecipe,
    pub(crate) tl: Timeline,
}

/// How the scenario's consumers are started, kept to start one more later.
struct ConsumerRecipe {
    /// Every argument but `--database-url` and `--listen`.
    args: Vec<String>,
    /// Postgres, directly or through the scenario's proxy.
    db_url: String,
    /// With a link of its own to Postgres (a proxy to this port) instead of `db_url`.
    own_link: Option<u16>,
    env: Vec<(String, String)>,
    failpoints: Vec<(String, String)>,
    seed: u64,
    pub(crate) logs: PathBuf,
}

impl Cluster {
    pub(crate) async fn start(ctx: &Ctx, opts: Opts) -> Result<Self> {
        let pg = tokio::task::spawn_blocking(postgres_from_env).await??;
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
        let mutate = |role| match ctx.mutant() {
            Some(m) if m.role == role => vec![("SPILLWAY_MUTATE".to_string(), m.name.to_string())],
            _ => vec![],
        };

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
        let mut producer = Service::spawn("producer", args, mutate(Role::Producer), vec![], log)?;
        producer.ready("/readyz").await?;
        ctx.tl.note("producer ready");

        let mut args = strings(&[
            "--brokers",
            &bootstrap,
            "--topic",
            TOPIC,
            "--group",
            "chaos",
            "--batch-max-age-ms",
            &opts.batch_max_age.as_millis().to_string(),
            "--statement-timeout-ms",
            &opts.statement_timeout.as_millis().to_string(),
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
        let recipe = ConsumerRecipe {
            args,
            db_url,
            own_link: opts.link_per_consumer.then_some(pg.port()),
            env: mutate(Role::Consumer),
            failpoints: opts.consumer_failpoints.clone(),
            seed: ctx.seed,
            logs: ctx.logs.clone(),
        };
        let mut cluster = Cluster {
            pg,
            broker,
            pg_proxy,
            consumer_links: vec![],
            broker_proxy,
            producer,
            consumers: vec![],
            recipe,
            tl: ctx.tl.clone(),
        };
        for _ in 0..opts.consumers {
            cluster.add_consumer().await?;
        }
        let (pg, broker, producer, consumers, pg_proxy) = (
            &cluster.pg,
            &cluster.broker,
            &cluster.producer,
            &cluster.consumers,
            &cluster.pg_proxy,
        );
        ctx.tl.note(format!(
            "cluster up: postgres :{} ({}), tansu :{}, producer :{}, {} consumer(s){}{}",
            pg.port(),
            pg.kind(),
            broker.port(),
            producer.port,
            consumers.len(),
            if pg_proxy.is_some() {
                format!(" (to Postgres through a proxy on :{db_port})")
            } else {
                String::new()
            },
            match ctx.mutant() {
                Some(m) => format!(
                    "; {} runs with SPILLWAY_MUTATE={}",
                    role_name(m.role),
                    m.name
                ),
                None => String::new(),
            }
        ));
        Ok(cluster)
    }

    /// Starts one more consumer in the group, as the others were started, and waits until it
    /// is up. Returns its index.
    pub(crate) async fn add_consumer(&mut self) -> Result<usize> {
        let n = self.consumers.len();
        let r = &self.recipe;
        let db_url = match r.own_link {
            Some(pg_port) => {
                let link = FaultProxy::start(([127, 0, 0, 1], pg_port).into(), r.seed).await?;
                let url = format!("postgres://postgres@127.0.0.1:{}/postgres", link.port());
                self.consumer_links.push(link);
                url
            }
            None => r.db_url.clone(),
        };
        let mut args = r.args.clone();
        args.extend(strings(&["--database-url", &db_url]));
        let log = r.logs.join(format!("consumer-{n}.log"));
        let mut c = Service::spawn("consumer", args, r.env.clone(), r.failpoints.clone(), log)?;
        c.ready("/healthz").await?;
        self.consumers.push(c);
        Ok(n)
    }

    /// Starts traffic in the background: `profile` for `duration`, 1 to 5 records of 100 to
    /// 300 bytes per request (unless `spec` says otherwise).
    pub(crate) fn traffic(
        &self,
        ctx: &Ctx,
        profile: RateProfile,
        duration: Duration,
        spec: Option<PayloadSpec>,
    ) -> Traffic {
        self.traffic_over(
            ctx,
            profile,
            duration,
            spec,
            RunConfig::new(String::new(), vec![]).connections,
        )
    }

    /// [`Cluster::traffic`] over `connections` client connections (each sends one request at
    /// a time): enough of them keep the requests arriving at the profile's rate while the
    /// producer holds every answer.
    pub(crate) fn traffic_over(
        &self,
        ctx: &Ctx,
        profile: RateProfile,
        duration: Duration,
        spec: Option<PayloadSpec>,
        connections: usize,
    ) -> Traffic {
        self.start_traffic(ctx, profile, duration, spec, connections, None)
    }

    /// [`Cluster::traffic`] with idempotency keys (`loadgen --idempotency-keys`): every request
    /// carries one, and a request answered 503 or 429, or left without an answer, is retried
    /// with it (loadgen's default retry settings, jitter seeded by the scenario's seed).
    pub(crate) fn traffic_with_idempotency_keys(
        &self,
        ctx: &Ctx,
        profile: RateProfile,
        duration: Duration,
    ) -> Traffic {
        let keys = KeyedRetries {
            settings: RetrySettings::default(),
            seed: ctx.seed,
        };
        let connections = RunConfig::new(String::new(), vec![]).connections;
        self.start_traffic(ctx, profile, duration, None, connections, Some(keys))
    }

    fn start_traffic(
        &self,
        ctx: &Ctx,
        profile: RateProfile,
        duration: Duration,
        spec: Option<PayloadSpec>,
        connections: usize,
        idempotency_keys: Option<KeyedRetries>,
    ) -> Traffic {
        let run_id = format!("c{:x}", ctx.seed);
        let schedule = profile.schedule(duration);
        let spec = spec.unwrap_or_else(|| PayloadSpec::generated((1, 5), (100, 300)));
        let keyed = idempotency_keys.is_some();
        let cfg = RunConfig {
            connections,
            idempotency_keys,
            ..RunConfig::new(self.producer.url("/store"), schedule)
        };
        let payloads = PayloadGen::new(spec.clone(), &run_id, ctx.seed);
        let shape = match &profile {
            RateProfile::Replay { .. } => "a replayed schedule".to_string(),
            other => format!("{other:?}"),
        };
        self.tl.note(format!(
            "traffic starts: {} requests over {duration:?} ({shape}){}",
            cfg.schedule.len(),
            if keyed {
                ", each with an Idempotency-Key, retried on 503, 429 or no answer"
            } else {
                ""
            }
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
            if r.retries.enabled {
                tl.note(retries_line(&r.retries));
            }
            r
        });
        Traffic {
            run_id,
            spec,
            live,
            handle,
        }
    }

    /// Waits until the pipeline is quiet, then judges: nothing acknowledged lost, nothing
    /// duplicated. The traffic must have carried at least [`MIN_ACKED`] acknowledged records,
    /// or it proved nothing. The proof fails on a bad verdict; a mutant run keeps it for
    /// [`chaos`] to check that the bug was caught.
    pub(crate) async fn verdict(&self, ctx: &Ctx, done: &Done) -> Result<Verdict> {
        let acked = done.result.acked.len();
        ensure!(
            acked >= MIN_ACKED,
            "only {acked} records were acknowledged, fewer than the {MIN_ACKED} a scenario needs to prove anything: {:?}\n{:?}",
            done.result.statuses,
            done.result.error_samples
        );
        let cfg = VerifyConfig {
            // Typed traffic runs against a consumer that maps the id to a column.
            id_column: done.spec.typed.then(|| "id".to_string()),
            // With idempotency keys an unexpected record fails; a given-up one is apart.
            given_up: done
                .result
                .retries
                .enabled
                .then(|| done.spec.without_states(&done.result.retries.given_up)),
            ..VerifyConfig::new(
                self.pg.url(),
                TABLE,
                &done.run_id,
                self.broker.bootstrap(),
                TOPIC,
                QUIET_WITHIN,
            )
        };
        // Keyed traffic's states go to a table written by key: the records table holds the
        // rest, exactly once ([`Cluster::keyed_verdict`] judges the states).
        let acked = done.spec.without_states(&done.result.acked);
        let v = verify(&cfg, &acked, |_| {}).await?;
        let unexpected = if v.idempotency_keys {
            format!(
                "unexpected {} (must be 0 with idempotency keys; first: {:?}), given up {} records of which {} landed",
                v.unexpected,
                ids(&done.run_id, &v.unexpected_sample),
                v.given_up,
                v.given_up_landed
            )
        } else {
            format!("unexpected {} (allowed)", v.unexpected)
        };
        self.tl.note(format!(
            "verdict: acknowledged {}, found {}, dead-lettered {}, lost {}, duplicated {}, {unexpected}; quiet {} after {:.1} s",
            v.acknowledged, v.found, v.dead_lettered, v.lost, v.duplicated,
            if v.quiet { "yes" } else { "NO" }, v.waited_seconds
        ));
        *locked(&ctx.verdict) = Some((v.clone(), self.log_tails()));
        if !v.passed() {
            let detail = format!(
                "lost {} acknowledged records (first: {:?}) and duplicated {} (first: {:?}); {}; {}",
                v.lost,
                ids(&done.run_id, &v.lost_sample),
                v.duplicated,
                ids(&done.run_id, &v.duplicated_sample),
                unexpected,
                v.not_quiet.as_deref().unwrap_or("the pipeline was quiet")
            );
            match ctx.mutant() {
                None => bail!("{detail}\n{}", self.log_tails()),
                Some(_) => self.tl.note(detail),
            }
        }
        Ok(v)
    }

    /// After [`Cluster::verdict`] (the pipeline is quiet): each key's row in `table`, written by
    /// key, is its last state in Kafka, or gone when that state deletes it. The proof fails on a
    /// wrong row (a mutant run only notes it: no mutant runs a keyed scenario yet).
    pub(crate) async fn keyed_verdict(
        &self,
        ctx: &Ctx,
        done: &Done,
        table: &str,
    ) -> Result<KeyedVerdict> {
        let v = verify_latest_per_key(
            &self.broker.bootstrap(),
            TOPIC,
            &self.pg.url(),
            table,
            &done.run_id,
            &done.spec.id_field,
        )
        .await?;
        self.tl.note(format!("keyed verdict on {table}: {v}"));
        if !v.passed() {
            let detail = format!(
                "{table} does not hold each key's last state: {} wrong (first: {:?}), {} keys across partitions, {} keys",
                v.wrong, v.wrong_sample, v.split, v.keys
            );
            match ctx.mutant() {
                None => bail!("{detail}\n{}", self.log_tails()),
                Some(_) => self.tl.note(detail),
            }
        }
        Ok(v)
    }

    /// Reads the topic back from Kafka (every message, through the broker's proxy if it has
    /// one) and counts the copies in it: messages whose envelope carries a request id that an
    /// earlier message of the same partition already carried, which only a retry of the
    /// producer's writes can leave. Call it once every request has its answer.
    pub(crate) async fn copies_in_kafka(&self) -> Result<KafkaCopies> {
        let bootstrap = self.broker.bootstrap();
        let messages = tokio::task::spawn_blocking(move || {
            spillway_harness::kafka::read_all(&bootstrap, TOPIC, Duration::from_secs(60))
        })
        .await??;
        Ok(KafkaCopies::count(&messages))
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

    /// Catches a consumer's COPY in progress and stalls it there: the proxy holds the link to
    /// Postgres (nothing is dropped), and the same backend shows the same COPY with the same
    /// byte count twice, 100 ms apart. A fault injected now lands in the middle of that COPY,
    /// which is the evidence scenarios 1 to 4 record. Release with
    /// [`Cluster::release_link`].
    pub(crate) async fn stall_a_copy(&self) -> Result<StalledCopy> {
        let proxy = self.pg_proxy()?;
        let db = connect(&self.pg.url()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            ensure!(
                Instant::now() < deadline,
                "no COPY could be caught in progress within 30 s"
            );
            let Some(seen) = copies_in_progress(&db).await?.into_iter().next() else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            proxy.set(Faults {
                hold: true,
                ..proxy.faults()
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            let first = copies_in_progress(&db).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let second = copies_in_progress(&db).await?;
            let stalled = first
                .into_iter()
                .find(|c| second.contains(c) && c.pid == seen.pid);
            match stalled {
                Some(copy) => {
                    let stalled = StalledCopy {
                        copy,
                        confirmed: Instant::now(),
                    };
                    self.tl.note(format!(
                        "backend {} is in a COPY ({} bytes received), stalled by the held link",
                        stalled.copy.pid, stalled.copy.bytes
                    ));
                    return Ok(stalled);
                }
                // It finished before the hold: release and catch another.
                None => self.release_link(),
            }
        }
    }

    /// Holds consumer `n`'s own link to Postgres until a flush of it is held there before it
    /// opened a transaction: its START TRANSACTION is held (seen in the held bytes) and none of its
    /// transactions is open, so no row lock is held. The flush's compare-and-set
    /// will run when the link is released and the consumer answers. Returns the number of
    /// messages held. Lift with `consumer_links[n].heal()`.
    pub(crate) async fn hold_a_flush(&self, n: usize) -> Result<usize> {
        // The simple-query message that opens tokio-postgres's transactions: tag, length
        // (4 + 18), text, NUL.
        const START: &[u8] = b"Q\0\0\0\x16START TRANSACTION\0";
        let link = self
            .consumer_links
            .get(n)
            .with_context(|| format!("consumer {n} has no link of its own"))?;
        let db = connect(&self.pg.url()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Why each attempt was let go: nothing held, no transaction's start among what was
        // held, a transaction of the consumer open.
        let (mut nothing, mut no_begin, mut open_tx) = (0, 0, 0);
        loop {
            ensure!(
                Instant::now() < deadline,
                "no flush of consumer {n} could be held before its transaction within 30 s \
                 (attempts: {nothing} held nothing, {no_begin} held no transaction's start, \
                 {open_tx} found a transaction of it open)"
            );
            link.set(Faults {
                hold: true,
                ..Faults::default()
            });
            // A flush starts with its START TRANSACTION; anything else held (the group watch's
            // query of the positions, an answer on its way back) leaves no stale flush to fence.
            let a_begin = || {
                link.held_towards_server()
                    .iter()
                    .any(|head| head.windows(START.len()).any(|w| w == START))
            };
            let waiting = Instant::now() + Duration::from_secs(2);
            while !a_begin() && Instant::now() < waiting {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let ports: Vec<i32> = link.upstream_ports().into_iter().map(i32::from).collect();
            let open: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE client_port = ANY($1) AND xact_start IS NOT NULL",
                    &[&ports],
                )
                .await?
                .get(0);
            match (link.held(), a_begin(), open) {
                (0, _, _) => nothing += 1,
                (_, false, _) => no_begin += 1,
                (held, true, 0) => return Ok(held),
                _ => open_tx += 1,
            }
            // No flush was caught, or a transaction of it was open when the hold began (it
            // would keep its row lock while frozen): let it finish and try again.
            link.heal();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lifts a hold on the link to Postgres (the slow link stays).
    pub(crate) fn release_link(&self) {
        if let Some(proxy) = &self.pg_proxy {
            proxy.set(Faults {
                hold: false,
                ..proxy.faults()
            });
        }
    }

    pub(crate) fn pg_proxy(&self) -> Result<&FaultProxy> {
        self.pg_proxy
            .as_ref()
            .context("this scenario has no proxy in front of Postgres")
    }

    /// The next offset stored for each partition.
    pub(crate) async fn positions(&self) -> Result<std::collections::BTreeMap<i32, i64>> {
        let c = connect(&self.pg.url()).await?;
        Ok(c.query(
            "SELECT kafka_partition, next_offset FROM spillway_offsets WHERE consumer = $1",
            &[&TABLE],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    pub(crate) async fn rows(&self) -> Result<i64> {
        let c = connect(&self.pg.url()).await?;
        Ok(c.query_one("SELECT count(*) FROM records", &[])
            .await?
            .get(0))
    }

    /// A consumer's metric, failing with its log if it does not answer or has no such metric.
    pub(crate) async fn consumer_metric(&self, n: usize, name: &str) -> Result<f64> {
        let c = &self.consumers[n];
        c.metric(name)
            .await
            .with_context(|| format!("consumer {n}:\n{}", c.process.log_tail(20)))
    }

    /// Consumer 0 neither crashed nor restarted, and it retried the interrupted flush (its
    /// retry counter moved: the evidence that a flush failed under the fault).
    pub(crate) async fn consumer_rode_it_out(&mut self, ctx: &Ctx, pid: Option<i32>) -> Result<()> {
        self.consumer_survived(0, pid)?;
        let retries = self
            .consumer_metric(0, "spillway_consumer_flush_retries_total")
            .await?;
        self.tl
            .note(format!("consumer 0 counted {retries} flush retries"));
        ctx.check(retries >= 1.0, || {
            "the interrupted flush was never retried (spillway_consumer_flush_retries_total is 0)"
                .into()
        })
    }

    /// The consumer neither crashed nor was restarted: it rode the fault out.
    pub(crate) fn consumer_survived(&mut self, n: usize, pid: Option<i32>) -> Result<()> {
        let c = &mut self.consumers[n];
        ensure!(
            c.process.running() && c.process.pid() == pid,
            "the consumer did not survive the fault:\n{}",
            c.process.log_tail(30)
        );
        Ok(())
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Producer => "the producer",
        Role::Consumer => "every consumer",
    }
}

/// The same request stored more than once in Kafka ([`Cluster::copies_in_kafka`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KafkaCopies {
    /// Messages read (the whole topic).
    pub(crate) messages: usize,
    /// Messages that repeat the request id of an earlier message of their partition.
    pub(crate) copies: u64,
    /// The first copy: its request id, its partition, the first offset and its own.
    pub(crate) first: Option<(RequestId, i32, i64, i64)>,
}

impl KafkaCopies {
    /// Counts the copies among messages keyed by (partition, offset), in that order; a message
    /// that is not an envelope is nobody's copy.
    fn count(messages: &BTreeMap<(i32, i64), Vec<u8>>) -> Self {
        let mut seen = RequestsSeen::default();
        let mut c = KafkaCopies {
            messages: messages.len(),
            ..KafkaCopies::default()
        };
        for (&(partition, offset), payload) in messages {
            let Ok(envelope) = Envelope::decode(payload) else {
                continue;
            };
            if let Some(original) = seen.original_of(partition, offset, &envelope) {
                c.copies += 1;
                c.first
                    .get_or_insert((envelope.request_id, partition, original, offset));
            }
        }
        c
    }
}

impl std::fmt::Display for KafkaCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "copies in Kafka left by the producer's retries: {} (of {} messages",
            self.copies, self.messages
        )?;
        if let Some((id, partition, original, copy)) = &self.first {
            write!(
                f,
                "; the first: request {id} in partition {partition} at offsets {original} and {copy}"
            )?;
        }
        write!(f, ")")
    }
}

/// A COPY caught in progress and stalled by the held link.
pub(crate) struct StalledCopy {
    pub(crate) copy: CopyInProgress,
    confirmed: Instant,
}

impl StalledCopy {
    /// How it reads in the timeline, at the moment of the fault.
    pub(crate) fn at_the_fault(&self) -> String {
        format!(
            "backend {} in a COPY stalled at {} bytes (confirmed in pg_stat_activity {:.1} ms earlier)",
            self.copy.pid,
            self.copy.bytes,
            self.confirmed.elapsed().as_secs_f64() * 1000.0
        )
    }
}

/// Traffic running in the background.
pub(crate) struct Traffic {
    run_id: String,
    spec: PayloadSpec,
    pub(crate) live: Arc<Live>,
    handle: tokio::task::JoinHandle<RunResult>,
}

/// Traffic that has ended.
pub(crate) struct Done {
    pub(crate) run_id: String,
    pub(crate) spec: PayloadSpec,
    pub(crate) result: RunResult,
}

impl Traffic {
    pub(crate) async fn done(self) -> Result<Done> {
        Ok(Done {
            run_id: self.run_id,
            spec: self.spec,
            result: self.handle.await?,
        })
    }

    /// Records acknowledged so far.
    pub(crate) fn acked(&self) -> u64 {
        self.live.acked_records.load(Relaxed)
    }

    /// Starts counting the records acknowledged during a fault.
    pub(crate) fn window(&self) -> FaultWindow {
        FaultWindow {
            acked_before: self.acked(),
        }
    }
}

/// The records acknowledged while a fault lasted: a fault that saw none was not a fault under
/// load.
pub(crate) struct FaultWindow {
    acked_before: u64,
}

impl FaultWindow {
    /// Ends the window; fails when no record was acknowledged during it.
    pub(crate) fn end(self, traffic: &Traffic, tl: &Timeline, fault: &str) -> Result<u64> {
        let during = traffic.acked().saturating_sub(self.acked_before);
        tl.note(format!("{during} records acknowledged while {fault}"));
        ensure!(
            during > 0,
            "no record was acknowledged while {fault}: the fault did not happen under load"
        );
        Ok(during)
    }
}

pub(crate) fn ids(run: &str, seqs: &[u64]) -> Vec<String> {
    seqs.iter().map(|s| PayloadGen::id(run, *s)).collect()
}

/// The suite's usual load: a base rate with seeded bursts of 20x.
pub(crate) fn spiky(ctx: &Ctx, base: f64) -> RateProfile {
    RateProfile::Spiky {
        base,
        multiplier: 20.0,
        burst: Duration::from_secs(1),
        gap: Duration::from_secs(4),
        seed: ctx.seed,
    }
}

/// A harness call that blocks (killing, restarting a server) without stalling the runtime.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub(crate) async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: u128) -> Vec<u8> {
        Envelope {
            received_at_micros: 0,
            request_id: RequestId::from_u128(id),
            sequenced: true,
            idempotency_key: None,
            source: None,
            records: vec![b"{}"],
        }
        .encode()
    }

    #[test]
    fn a_copy_repeats_a_request_id_of_its_own_partition() {
        let messages = BTreeMap::from([
            ((0, 0), envelope(1)),
            ((0, 1), envelope(2)),
            ((0, 2), b"not an envelope".to_vec()),
            ((0, 3), envelope(1)),
            ((0, 4), envelope(1)),
            // Another partition's request 2 is another request's.
            ((1, 0), envelope(2)),
        ]);
        let c = KafkaCopies::count(&messages);
        assert_eq!(
            c,
            KafkaCopies {
                messages: 6,
                copies: 2,
                first: Some((RequestId::from_u128(1), 0, 0, 3)),
            }
        );
        assert!(c.to_string().contains(": 2 (of 6 messages"), "{c}");
    }
}
