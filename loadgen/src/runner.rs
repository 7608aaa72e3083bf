//! The open-model sender: each request leaves at its planned time, whatever the answers to
//! the previous ones (no coordinated omission). Latency counts from the planned time; service
//! time from the actual send. Sends that left late, or could not leave because too many were
//! in flight, are counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::payload::PayloadGen;
use crate::retry::{parse_retry_after, Attempt, Next, Retrier, RetrySettings, Transport};

/// Acknowledged sequence numbers, as a growable bitset.
#[derive(Clone, Debug, Default)]
pub struct AckSet {
    bits: Vec<u64>,
    count: u64,
}

impl AckSet {
    /// Marks `first..first+n` acknowledged.
    pub fn insert_range(&mut self, first: u64, n: u64) {
        for s in first..first + n {
            let (w, b) = ((s / 64) as usize, s % 64);
            if self.bits.len() <= w {
                self.bits.resize(w + 1, 0);
            }
            if self.bits[w] & (1 << b) == 0 {
                self.bits[w] |= 1 << b;
                self.count += 1;
            }
        }
    }
    /// Whether `seq` was acknowledged.
    pub fn contains(&self, seq: u64) -> bool {
        self.bits
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }
    /// How many.
    pub fn len(&self) -> u64 {
        self.count
    }
    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// All acknowledged sequence numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }
}

/// One second of the run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Second {
    /// Seconds since start.
    pub second: u64,
    /// Requests planned to leave in this second.
    pub offered: u64,
    /// Requests that left in this second.
    pub sent: u64,
    /// Answers received in this second.
    pub completed: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Non-2xx answers and transport errors.
    pub errors: u64,
    /// Latency percentiles of the answers in this second, ms (from the planned send time).
    pub p50_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// Max.
    pub max_ms: f64,
    /// Rows of this run in Postgres, when known.
    pub rows: Option<i64>,
    /// Consumer lag (messages), when known.
    pub lag: Option<i64>,
}

/// What the run measured.
#[derive(Debug)]
pub struct RunResult {
    /// Latency from the planned send time, µs.
    pub latency: Histogram<u64>,
    /// Latency from the actual send, µs.
    pub service: Histogram<u64>,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that failed without an HTTP answer.
    pub transport_errors: u64,
    /// Sends that left later than the lateness threshold.
    pub late_sends: u64,
    /// Sends dropped because `max_in_flight` requests were outstanding.
    pub skipped_sends: u64,
    /// Requests planned.
    pub planned: u64,
    /// Records in requests that were sent.
    pub records_sent: u64,
    /// Records acknowledged with 2xx.
    pub acked: AckSet,
    /// Per-second series.
    pub seconds: Vec<Second>,
    /// Wall time of the traffic phase.
    pub elapsed: Duration,
    /// Sample of error answers (status, body) for the report.
    pub error_samples: Vec<(u16, String)>,
    /// With `--idempotency-keys`: the retries, and the requests given up.
    pub retries: Retries,
}

/// With `--idempotency-keys`: what the retries did. A request's final outcome is what
/// [`RunResult::statuses`] and [`RunResult::transport_errors`] count; the outcomes that were
/// retried are counted here.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Retries {
    /// Whether requests carried idempotency keys and were retried.
    pub enabled: bool,
    /// Retries sent (attempts after a request's first).
    pub sent: u64,
    /// The outcomes that were retried: by HTTP status, and `transport` for no answer.
    pub after: BTreeMap<String, u64>,
    /// Requests answered 2xx after at least one retry.
    pub succeeded_after_retrying: u64,
    /// Requests given up: still refused, or unanswered, after the last retry allowed.
    pub given_up_requests: u64,
    /// The records of the requests given up (their writes may still land: the verdict counts
    /// them apart).
    #[serde(skip)]
    pub given_up: AckSet,
}

/// Traffic settings.
#[derive(Debug)]
pub struct RunConfig {
    /// `http://host:port/store`.
    pub target: String,
    /// Planned send offsets, seconds.
    pub schedule: Vec<f64>,
    /// Most requests outstanding at once (queued for a connection or on the wire).
    pub max_in_flight: usize,
    /// Connections, each sending one request at a time. The scheduler hands each planned send
    /// to the next connection and never waits: a send queued behind a busy connection still
    /// has its latency counted from its planned time.
    pub connections: usize,
    /// A send later than this is counted late.
    pub late_threshold: Duration,
    /// Extra headers (authorization).
    pub headers: Vec<(String, String)>,
    /// Content-Encoding of the bodies, if any.
    pub content_encoding: Option<String>,
    /// `--idempotency-keys`: every request carries an `Idempotency-Key` (the run's id and the
    /// request's number) and is retried with it. `None`: no keys, no retries.
    pub idempotency_keys: Option<KeyedRetries>,
}

/// How requests with idempotency keys are retried.
#[derive(Clone, Debug)]
pub struct KeyedRetries {
    /// When and how often.
    pub settings: RetrySettings,
    /// Seeds each connection's jitter (with its index).
    pub seed: u64,
}

impl KeyedRetries {
    /// The key of request number `n` of run `run_id`: unique per logical request within the
    /// run, the same on each of its retries.
    pub fn key(run_id: &str, n: u64) -> String {
        format!("{run_id}-req-{n}")
    }
}

impl RunConfig {
    /// `schedule` against `target`, with the defaults the CLI uses: 64 connections, at most
    /// 8,192 in flight, late past 10 ms, no extra headers, no compression.
    pub fn new(target: String, schedule: Vec<f64>) -> Self {
        RunConfig {
            target,
            schedule,
            max_in_flight: 8192,
            connections: 64,
            late_threshold: Duration::from_millis(10),
            headers: vec![],
            content_encoding: None,
            idempotency_keys: None,
        }
    }
}

/// Numbers the progress line shows, shared with the sampler.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests outstanding.
    pub in_flight: AtomicI64,
    /// Rows of this run in Postgres (-1: unknown).
    pub rows: AtomicI64,
    /// Consumer lag (-1: unknown).
    pub lag: AtomicI64,
    /// Answers so far.
    pub completed: AtomicU64,
    /// Errors so far.
    pub errors: AtomicU64,
    /// Records acknowledged (2xx) so far.
    pub acked_records: AtomicU64,
}

struct Job {
    body: bytes::Bytes,
    /// The request's `X-Spillway-Key`, if any.
    key: Option<u64>,
    /// The request's `Idempotency-Key`, with `--idempotency-keys`.
    idempotency_key: Option<Arc<str>>,
    /// Retries so far.
    retries: u32,
    /// With `--idempotency-keys`: where a retry goes. Each job holds it while it lives, so the
    /// connections' queues stay open until the last retry is answered (and close once the
    /// schedule is done and no job is left).
    pool: Option<Arc<Pool>>,
    planned: f64,
    first_seq: u64,
    records: u64,
}

/// The connection workers' queues; each job goes to the next in turn.
struct Pool {
    workers: Vec<mpsc::UnboundedSender<Job>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Pool {
    fn send(&self, job: Job) {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let _ = self.workers[n].send(job);
    }
}

struct Outcome {
    /// False for a send that never left (too many in flight): no latency to record.
    left: bool,
    /// An attempt that is retried: counted as a retry, not as the request's outcome.
    retried: bool,
    /// The request's last outcome was still retriable when its retries ran out.
    given_up: bool,
    /// Retries before this outcome.
    retries: u32,
    planned_at: f64,
    sent_at: f64,
    done_at: f64,
    status: Option<u16>,
    first_seq: u64,
    records: u64,
    body: Option<String>,
}

/// Runs the schedule against the target. `live` is updated as it goes; `progress` is called
/// once a second with the seconds so far.
pub async fn run(
    cfg: RunConfig,
    mut payloads: PayloadGen,
    live: Arc<Live>,
    mut progress: impl FnMut(&Second, &Live, f64) + Send + 'static,
) -> RunResult {
    let target = Arc::new(Target::new(&cfg));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let start = Instant::now() + Duration::from_millis(50);
    let planned = cfg.schedule.len() as u64;
    let total_secs = cfg.schedule.last().map_or(0, |t| *t as usize + 1);
    let mut seconds: Vec<Second> = (0..total_secs)
        .map(|s| Second {
            second: s as u64,
            ..Second::default()
        })
        .collect();
    for t in &cfg.schedule {
        seconds[*t as usize].offered += 1;
    }
    let seconds = Arc::new(Mutex::new(seconds));
    let p99_so_far = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
    ));

    // Aggregator: folds outcomes into histograms and per-second stats.
    let agg_seconds = seconds.clone();
    let agg_live = live.clone();
    let agg_p99 = p99_so_far.clone();
    let aggregator = tokio::spawn(async move {
        let mut latency =
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let mut service = latency.clone();
        let mut per_second: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let (mut transport_errors, mut records_sent) = (0, 0);
        let mut acked = AckSet::default();
        let mut retries = Retries::default();
        let mut samples = Vec::new();
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            // One lock of each shared structure per batch, not per answer.
            let mut p99 = agg_p99.lock().unwrap_or_else(|e| e.into_inner());
            let mut secs = agg_seconds.lock().unwrap_or_else(|e| e.into_inner());
            for o in batch.drain(..) {
                if !o.left {
                    agg_live.errors.fetch_add(1, Ordering::Relaxed);
                    if samples.len() < 10 {
                        samples.push((0, o.body.unwrap_or_default()));
                    }
                    continue;
                }
                if o.retried {
                    retries.sent += 1;
                    let after = o.status.map_or("transport".to_string(), |s| s.to_string());
                    *retries.after.entry(after).or_insert(0) += 1;
                    continue;
                }
                let lat = ((o.done_at - o.planned_at) * 1e6).max(1.0) as u64;
                let svc = ((o.done_at - o.sent_at) * 1e6).max(1.0) as u64;
                latency.saturating_record(lat);
                service.saturating_record(svc);
                p99.saturating_record(lat);
                records_sent += o.records;
                let done_sec = o.done_at.max(0.0) as u64;
                per_second
                    .entry(done_sec)
                    .or_insert_with(|| Histogram::new_from(&latency))
                    .saturating_record(lat);
                let ok = o.status.is_some_and(|s| (200..300).contains(&s));
                match o.status {
                    Some(s) => *statuses.entry(s).or_insert(0) += 1,
                    None => transport_errors += 1,
                }
                if ok && o.retries > 0 {
                    retries.succeeded_after_retrying += 1;
                }
                if o.given_up {
                    retries.given_up_requests += 1;
                    retries.given_up.insert_range(o.first_seq, o.records);
                }
                if ok {
                    acked.insert_range(o.first_seq, o.records);
                    agg_live
                        .acked_records
                        .fetch_add(o.records, Ordering::Relaxed);
                } else {
                    agg_live.errors.fetch_add(1, Ordering::Relaxed);
                    if samples.len() < 10 {
                        samples.push((o.status.unwrap_or(0), o.body.unwrap_or_default()));
                    }
                }
                agg_live.completed.fetch_add(1, Ordering::Relaxed);
                let sent_sec = o.sent_at.max(0.0) as usize;
                if let Some(s) = secs.get_mut(sent_sec) {
                    s.sent += 1;
                }
                while secs.len() <= done_sec as usize {
                    let n = secs.len() as u64;
                    secs.push(Second {
                        second: n,
                        ..Second::default()
                    });
                }
                let s = &mut secs[done_sec as usize];
                s.completed += 1;
                if ok {
                    s.ok += 1;
                } else {
                    s.errors += 1;
                }
            }
        }
        let mut secs = agg_seconds.lock().unwrap_or_else(|e| e.into_inner());
        for (sec, h) in per_second {
            if let Some(s) = secs.get_mut(sec as usize) {
                s.p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
                s.p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
                s.max_ms = h.max() as f64 / 1000.0;
            }
        }
        (
            latency,
            service,
            statuses,
            transport_errors,
            records_sent,
            acked,
            samples,
            retries,
        )
    });

    // Progress: once a second.
    let prog_seconds = seconds.clone();
    let prog_live = live.clone();
    let prog_p99 = p99_so_far.clone();
    let ticker = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            tokio::time::sleep_until(tokio::time::Instant::from_std(
                start + Duration::from_secs(n + 1),
            ))
            .await;
            let p99 = prog_p99
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .value_at_quantile(0.99) as f64
                / 1000.0;
            let mut secs = prog_seconds.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = secs.get_mut(n as usize) {
                let rows = prog_live.rows.load(Ordering::Relaxed);
                let lag = prog_live.lag.load(Ordering::Relaxed);
                s.rows = (rows >= 0).then_some(rows);
                s.lag = (lag >= 0).then_some(lag);
                progress(s, &prog_live, p99);
            }
            n += 1;
        }
    });

    // Connection workers: each sends its jobs one after another over its own kept-alive
    // connection (reconnecting after an error), as wrk's connections do. With idempotency
    // keys, a job to retry waits its backoff off the connection and then goes back to the
    // pool, so a retry never holds up the requests behind it.
    let mut workers = Vec::new();
    let mut worker_tasks = Vec::new();
    for n in 0..cfg.connections.max(1) {
        let (job_tx, mut jobs) = mpsc::unbounded_channel::<Job>();
        let (target, tx, live) = (target.clone(), tx.clone(), live.clone());
        let mut retrier = cfg
            .idempotency_keys
            .as_ref()
            .map(|k| Retrier::new(k.settings.clone(), k.seed ^ (n as u64).rotate_left(32)));
        workers.push(job_tx);
        worker_tasks.push(tokio::spawn(async move {
            let mut conn: Option<Conn> = None;
            while let Some(mut job) = jobs.recv().await {
                let sent = Instant::now();
                let exchange = target.exchange(
                    &mut conn,
                    job.body.clone(),
                    job.key,
                    job.idempotency_key.as_deref(),
                );
                let result = match &retrier {
                    None => exchange.await,
                    Some(r) => tokio::time::timeout(r.settings().answer_timeout, exchange)
                        .await
                        .unwrap_or_else(|_| {
                            Err(TransportError::new(
                                Transport::NoAnswer,
                                format!("no answer within {:?}", r.settings().answer_timeout),
                            ))
                        }),
                };
                let (status, body, attempt) = match result {
                    Ok(a) => {
                        let text = (!(200..300).contains(&a.status))
                            .then(|| String::from_utf8_lossy(&a.body).into_owned());
                        let attempt = Attempt::Answered {
                            status: a.status,
                            retry_after: a.retry_after,
                        };
                        (Some(a.status), text, attempt)
                    }
                    Err(e) => {
                        conn = None;
                        (None, Some(e.detail), Attempt::Failed(e.kind))
                    }
                };
                let done = Instant::now();
                let next = retrier
                    .as_mut()
                    .map_or(Next::Done, |r| r.next(&attempt, job.retries));
                let outcome = Outcome {
                    left: true,
                    retried: matches!(next, Next::RetryIn(_)),
                    given_up: next == Next::GiveUp,
                    retries: job.retries,
                    planned_at: job.planned,
                    sent_at: secs_since(start, sent),
                    done_at: secs_since(start, done),
                    status,
                    first_seq: job.first_seq,
                    records: job.records,
                    body,
                };
                match (next, job.pool.clone()) {
                    (Next::RetryIn(wait), Some(pool)) => {
                        let _ = tx.send(outcome);
                        job.retries += 1;
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            pool.send(job);
                        });
                    }
                    _ => {
                        live.in_flight.fetch_sub(1, Ordering::Relaxed);
                        let _ = tx.send(Outcome {
                            retried: false,
                            ..outcome
                        });
                    }
                }
            }
        }));
    }
    let pool = Arc::new(Pool {
        workers,
        next: std::sync::atomic::AtomicUsize::new(1),
    });
    let run_id = payloads.run_id().to_string();

    // The scheduler: never waits for answers.
    let mut late = 0;
    let mut skipped = 0;
    for (n, t) in cfg.schedule.iter().enumerate() {
        let planned_at = start + Duration::from_secs_f64(*t);
        let now = Instant::now();
        if planned_at > now {
            tokio::time::sleep_until(tokio::time::Instant::from_std(planned_at)).await;
        }
        let sent = Instant::now();
        if sent.duration_since(planned_at) > cfg.late_threshold {
            late += 1;
        }
        if live.in_flight.load(Ordering::Relaxed) >= cfg.max_in_flight as i64 {
            skipped += 1;
            let _ = tx.send(Outcome {
                left: false,
                retried: false,
                given_up: false,
                retries: 0,
                planned_at: *t,
                sent_at: secs_since(start, sent),
                done_at: secs_since(start, sent),
                status: None,
                first_seq: 0,
                records: 0,
                body: Some(format!(
                    "not sent: {} requests already in flight",
                    cfg.max_in_flight
                )),
            });
            continue;
        }
        let p = payloads.next_payload();
        live.in_flight.fetch_add(1, Ordering::Relaxed);
        let keyed = cfg.idempotency_keys.is_some();
        let job = Job {
            body: p.body,
            key: p.key,
            idempotency_key: keyed.then(|| KeyedRetries::key(&run_id, n as u64).into()),
            retries: 0,
            pool: keyed.then(|| pool.clone()),
            planned: *t,
            first_seq: p.first_seq,
            records: p.records,
        };
        pool.send(job);
    }
    // The queues close once no job (a retry waiting its turn included) holds the pool.
    drop(pool);
    for w in worker_tasks {
        let _ = w.await;
    }
    drop(tx);
    let (
        latency,
        service,
        statuses,
        transport_errors,
        records_sent,
        acked,
        error_samples,
        mut retries,
    ) = aggregator
        .await
        .unwrap_or_else(|_| panic!("aggregator panicked"));
    retries.enabled = cfg.idempotency_keys.is_some();
    ticker.abort();
    let elapsed = start.elapsed();
    let seconds = seconds.lock().unwrap_or_else(|e| e.into_inner()).clone();
    RunResult {
        latency,
        service,
        statuses,
        transport_errors,
        late_sends: late,
        skipped_sends: skipped,
        planned,
        records_sent,
        acked,
        seconds,
        elapsed,
        error_samples,
        retries,
    }
}

/// An HTTP answer.
struct Answer {
    status: u16,
    body: bytes::Bytes,
    retry_after: Option<Duration>,
}

/// An exchange that got no HTTP answer: why (for the retry decision) and what happened.
#[derive(Debug)]
struct TransportError {
    kind: Transport,
    detail: String,
}

impl TransportError {
    fn new(kind: Transport, detail: impl std::fmt::Display) -> Self {
        TransportError {
            kind,
            detail: detail.to_string(),
        }
    }
}

/// Where requests go, parsed once: the address to connect to, and the request line and headers
/// every request carries, already serialised.
struct Target {
    authority: String,
    head: Vec<u8>,
    problem: Option<String>,
}

impl Target {
    fn new(cfg: &RunConfig) -> Self {
        let mut problem = None;
        let uri: hyper::Uri = match cfg.target.parse() {
            Ok(u) => u,
            Err(e) => {
                problem = Some(format!("invalid target URL {}: {e}", cfg.target));
                hyper::Uri::default()
            }
        };
        if uri.scheme_str().is_some_and(|s| s != "http") {
            problem = Some(format!(
                "only http:// targets are supported, not {}",
                cfg.target
            ));
        }
        let host = uri.host().unwrap_or("localhost");
        let authority = match uri.port_u16() {
            Some(port) => format!("{host}:{port}"),
            None => format!("{host}:80"),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!("POST {path} HTTP/1.1\r\n").into_bytes();
        let mut add = |k: &str, v: &str| {
            let valid = hyper::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && hyper::header::HeaderValue::from_str(v).is_ok();
            if valid {
                head.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            } else {
                problem = Some(format!("invalid header {k}: {v}"));
            }
        };
        add("host", uri.authority().map_or(host, |a| a.as_str()));
        add("content-type", "application/json");
        if let Some(enc) = &cfg.content_encoding {
            add("content-encoding", enc);
        }
        for (k, v) in &cfg.headers {
            add(k, v);
        }
        Target {
            authority,
            head,
            problem,
        }
    }

    /// Sends one request over `conn` (connecting first if there is none) and reads the whole
    /// answer. HTTP/1.1 is spoken directly, as wrk does: one write of the prebuilt head and the
    /// body, and the answer parsed from a reused buffer. An exchange never sends its request
    /// twice: if the connection fails after the write, that is the exchange's error (with
    /// `--idempotency-keys` the runner may then send it again, as a retry with the same key).
    async fn exchange(
        &self,
        conn: &mut Option<Conn>,
        body: bytes::Bytes,
        key: Option<u64>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, TransportError> {
        if let Some(p) = &self.problem {
            return Err(TransportError::new(Transport::Setup, p));
        }
        if conn.as_ref().is_some_and(Conn::closed_by_peer) {
            *conn = None;
        }
        if conn.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| {
                    TransportError::new(
                        Transport::Connect,
                        format!("connecting to {}: {e}", self.authority),
                    )
                })?;
            let _ = stream.set_nodelay(true);
            *conn = Some(Conn {
                stream,
                buf: bytes::BytesMut::with_capacity(8192),
            });
        }
        let Some(c) = conn.as_mut() else {
            return Err(TransportError::new(Transport::Connect, "no connection"));
        };
        let mut req = Vec::with_capacity(self.head.len() + 32 + body.len());
        req.extend_from_slice(&self.head);
        if let Some(key) = key {
            req.extend_from_slice(format!("x-spillway-key: {key}\r\n").as_bytes());
        }
        if let Some(key) = idempotency_key {
            req.extend_from_slice(format!("idempotency-key: {key}\r\n").as_bytes());
        }
        req.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        req.extend_from_slice(&body);
        let answer = async {
            c.stream
                .write_all(&req)
                .await
                .map_err(|e| TransportError::new(Transport::Lost, e))?;
            c.read_response().await
        };
        match answer.await {
            Ok((answer, keep)) => {
                if !keep {
                    *conn = None;
                }
                Ok(answer)
            }
            Err(e) => {
                *conn = None;
                Err(e)
            }
        }
    }
}

/// One kept-alive HTTP/1.1 connection and its read buffer.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl Conn {
    /// Whether the server closed the connection (or sent something unasked, such as a 408
    /// before closing) while it was idle: then it is replaced before a request is written.
    fn closed_by_peer(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    async fn fill(&mut self) -> Result<usize, TransportError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| TransportError::new(Transport::Lost, e))?;
        Ok(n)
    }

    /// Reads one response: the answer, and whether the connection stays open.
    async fn read_response(&mut self) -> Result<(Answer, bool), TransportError> {
        let closed = || {
            TransportError::new(
                Transport::Lost,
                "the server closed the connection before answering",
            )
        };
        let (status, head_len, length, chunked, keep, retry_after) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&self.buf).map_err(|e| {
                TransportError::new(Transport::BadAnswer, format!("bad response: {e}"))
            })? {
                httparse::Status::Complete(n) => {
                    let status = r.code.unwrap_or(0);
                    let (mut length, mut chunked, mut keep) = (None, false, true);
                    let mut retry_after = None;
                    for h in r.headers.iter() {
                        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = v.parse::<usize>().ok();
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = v.to_ascii_lowercase().contains("chunked");
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            keep = !v.eq_ignore_ascii_case("close");
                        } else if h.name.eq_ignore_ascii_case("retry-after") {
                            retry_after = parse_retry_after(v);
                        }
                    }
                    if r.version == Some(0) {
                        keep = false;
                    }
                    break (status, n, length, chunked, keep, retry_after);
                }
                httparse::Status::Partial => {
                    if self.fill().await? == 0 {
                        return Err(closed());
                    }
                }
            }
        };
        let _ = self.buf.split_to(head_len);
        let answer = |body| Answer {
            status,
            body,
            retry_after,
        };
        let no_body = status == 204 || status == 304 || (100..200).contains(&status);
        let body = if no_body {
            bytes::Bytes::new()
        } else if chunked {
            self.read_chunked().await?
        } else if let Some(n) = length {
            while self.buf.len() < n {
                if self.fill().await? == 0 {
                    return Err(closed());
                }
            }
            self.buf.split_to(n).freeze()
        } else {
            // No length: the body runs to the end of the connection.
            while self.fill().await? > 0 {}
            return Ok((answer(self.buf.split().freeze()), false));
        };
        Ok((answer(body), keep))
    }

    async fn read_chunked(&mut self) -> Result<bytes::Bytes, TransportError> {
        let mut body = bytes::BytesMut::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if self.fill().await? == 0 {
                    return Err(TransportError::new(
                        Transport::Lost,
                        "the connection closed inside a chunked body",
                    ));
                }
            };
            let line = std::str::from_utf8(&self.buf[..line_end]).unwrap_or("");
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                TransportError::new(Transport::BadAnswer, format!("bad chunk size {size_hex:?}"))
            })?;
            let _ = self.buf.split_to(line_end + 2);
            if size == 0 {
                // Trailers, if any, end with an empty line.
                loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        let empty = i == 0;
                        let _ = self.buf.split_to(i + 2);
                        if empty {
                            return Ok(body.freeze());
                        }
                    } else if self.fill().await? == 0 {
                        return Ok(body.freeze());
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err(TransportError::new(
                        Transport::Lost,
                        "the connection closed inside a chunk",
                    ));
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            let _ = self.buf.split_to(size + 2);
        }
    }
}

fn secs_since(start: Instant, t: Instant) -> f64 {
    if t >= start {
        t.duration_since(start).as_secs_f64()
    } else {
        -(start.duration_since(t).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_set_counts_each_sequence_once() {
        let mut a = AckSet::default();
        a.insert_range(0, 3);
        a.insert_range(2, 3);
        a.insert_range(130, 1);
        assert_eq!(a.len(), 6);
        assert!(a.contains(130) && !a.contains(5) && !a.contains(10_000));
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 130]);
    }

    /// A server that answers the n-th request it gets (over any connection) with
    /// `answers[n]`, closing the connection after answers that mention `close`.
    async fn canned_server(answers: Vec<&'static str>) -> String {
        canned_server_recording(answers).await.0
    }

    /// [`canned_server`], which also keeps each request it got (head and body, the head in
    /// lower case).
    async fn canned_server_recording(
        answers: Vec<&'static str>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut next = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = Vec::new();
                loop {
                    // One request: head, then content-length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 0,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    if head_end == 0 {
                        break;
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
                    record.lock().unwrap().push(format!("{head}{body}"));
                    buf.drain(..head_end + len);
                    let answer = answers[next % answers.len()];
                    next += 1;
                    let _ = s.write_all(answer.as_bytes()).await;
                    if answer.contains("close") {
                        break;
                    }
                }
            }
        });
        (format!("http://{addr}/store"), seen)
    }

    const REFUSED: &str =
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\ncontent-length: 4\r\n\r\nbusy";
    const SHED: &str =
        "HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\ncontent-length: 0\r\n\r\n";
    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";

    /// One request against `answers`, with idempotency keys and at most `max_retries` retries
    /// (`None`: without keys); what the run measured and the requests the server got.
    async fn one_request(
        answers: Vec<&'static str>,
        max_retries: Option<u32>,
    ) -> (RunResult, Vec<String>, u64) {
        let (url, seen) = canned_server_recording(answers).await;
        let cfg = RunConfig {
            connections: 1,
            idempotency_keys: max_retries.map(|max_retries| KeyedRetries {
                settings: RetrySettings {
                    max_retries,
                    initial: Duration::from_millis(1),
                    max: Duration::from_millis(1),
                    ..RetrySettings::default()
                },
                seed: 1,
            }),
            ..RunConfig::new(url, vec![0.0])
        };
        let payloads = PayloadGen::new(
            crate::payload::PayloadSpec::generated((3, 3), (50, 50)),
            "t",
            1,
        );
        let r = run(cfg, payloads, Arc::new(Live::default()), |_, _, _| {}).await;
        let requests = seen.lock().unwrap().clone();
        (r, requests, 3)
    }

    #[tokio::test]
    async fn with_keys_a_refused_request_is_sent_again_with_the_same_key_and_body_until_acknowledged(
    ) {
        let (r, requests, records) = one_request(vec![REFUSED, SHED, OK], Some(10)).await;
        assert_eq!(r.statuses, BTreeMap::from([(200, 1)]), "the final answer");
        assert_eq!(r.acked.len(), records);
        assert_eq!(r.retries.sent, 2);
        let after: Vec<(&str, u64)> = r
            .retries
            .after
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(after, vec![("429", 1), ("503", 1)]);
        assert_eq!(
            (
                r.retries.succeeded_after_retrying,
                r.retries.given_up_requests
            ),
            (1, 0)
        );
        assert_eq!(requests.len(), 3);
        assert!(
            requests[0].contains("idempotency-key: t-req-0\r\n"),
            "{}",
            requests[0]
        );
        assert!(
            requests.iter().all(|q| q == &requests[0]),
            "every attempt is the same request: {requests:#?}"
        );
    }

    #[tokio::test]
    async fn with_keys_a_request_still_refused_after_its_last_retry_is_given_up_with_its_records() {
        let (r, requests, records) = one_request(vec![REFUSED], Some(2)).await;
        assert_eq!(requests.len(), 3, "the request and its 2 retries");
        assert_eq!(r.statuses, BTreeMap::from([(503, 1)]));
        assert!(r.acked.is_empty());
        assert_eq!(r.retries.given_up_requests, 1);
        assert_eq!(
            r.retries.given_up.iter().collect::<Vec<_>>(),
            (0..records).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn without_keys_nothing_is_retried_and_no_key_is_sent() {
        let (r, requests, _) = one_request(vec![REFUSED, OK], None).await;
        assert_eq!(requests.len(), 1);
        assert!(!requests[0].contains("idempotency-key"));
        assert_eq!(r.statuses, BTreeMap::from([(503, 1)]));
        assert_eq!((r.retries.enabled, r.retries.sent), (false, 0));
        assert!(r.retries.given_up.is_empty());
    }

    #[tokio::test]
    async fn the_client_reads_sized_chunked_empty_and_close_delimited_answers() {
        let url = canned_server(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nbusy\r\n3;x=y\r\n!!!\r\n0\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbye",
        ])
        .await;
        let target = Target::new(&RunConfig::new(url, vec![]));
        let mut conn = None;
        let body = bytes::Bytes::from_static(b"[{\"id\":1}]");
        let a = target
            .exchange(&mut conn, body.clone(), None, None)
            .await
            .unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"{}"[..]));
        let a = target
            .exchange(&mut conn, body.clone(), None, None)
            .await
            .unwrap();
        assert_eq!((a.status, &a.body[..]), (503, &b"busy!!!"[..]));
        let a = target
            .exchange(&mut conn, body.clone(), None, None)
            .await
            .unwrap();
        assert_eq!((a.status, a.body.len()), (204, 0));
        assert!(conn.is_some(), "one connection kept alive so far");
        let a = target
            .exchange(&mut conn, body.clone(), None, None)
            .await
            .unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"bye"[..]));
        assert!(
            conn.is_none(),
            "a close-delimited answer ends the connection"
        );
        // The next request opens a new connection.
        let a = target.exchange(&mut conn, body, None, None).await.unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"{}"[..]));
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced_before_sending() {
        // Every answer closes its connection, but says so only by closing (an idle timeout).
        let url = canned_server(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-then: close\r\n\r\n{}",
        ])
        .await;
        let target = Target::new(&RunConfig::new(url, vec![]));
        let mut conn = None;
        for _ in 0..3 {
            let a = target
                .exchange(&mut conn, bytes::Bytes::from_static(b"{}"), None, None)
                .await
                .unwrap();
            assert_eq!(a.status, 200);
            assert!(conn.is_some(), "the answer did not say it closes");
            // Idle long enough for the server's close to arrive: that is the case under test.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let bad = Target::new(&RunConfig::new("https://example.invalid/".into(), vec![]));
        let e = bad
            .exchange(&mut None, bytes::Bytes::new(), None, None)
            .await;
        let e = e.err().expect("a bad target fails");
        assert_eq!(e.kind, Transport::Setup);
        assert!(e.detail.contains("only http://"));
    }
}
