//! The consumer's event loop: Kafka messages in, batches out to Postgres, flush results back
//! into the core, Kafka paused when the buffer is full and rewound when there is room again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use spillway_core::metrics::{Counter, Gauge, Histogram, Registry};
use spillway_core::{
    AfterFlush, Batch, Batcher, Envelope, ErrorClass, FlushOutcome, Partition, Position, Push,
    Record, RetryPolicy,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::Settings;
use crate::mutation::{self, DroppedBatches, Mutation};
use crate::pg::{self, Flushed, PgFailure, Pool};
use crate::source::{Source, SourceCommand, SourceEvent};
use crate::ConsumerError;

/// Environment variable naming a test failpoint: after this many Postgres commits, the process
/// SIGKILLs itself, before the Kafka commit (for the "killed between the two commits" tests).
/// Under the `commit-kafka-first` mutation the order is the other way round, and so is the kill.
pub const FAILPOINT_EXIT_AFTER_COMMITS: &str = "SPILLWAY_FAILPOINT_EXIT_AFTER_COMMITS";

/// The consumer's metrics.
pub struct Metrics {
    /// Registry rendered at /metrics.
    pub registry: Registry,
    rows: Arc<Counter>,
    batches: Arc<Counter>,
    dead_letters: Arc<Counter>,
    retries: Arc<Counter>,
    fenced: Arc<Counter>,
    dropped: Arc<Counter>,
    batch_size: Arc<Histogram>,
    flush_latency: Arc<Histogram>,
    db_up: Arc<Gauge>,
    buffered_records: Arc<Gauge>,
    buffered_bytes: Arc<Gauge>,
    target_batch: Arc<Gauge>,
    paused: Arc<Gauge>,
    lag: Mutex<BTreeMap<Partition, Arc<Gauge>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("rows", &self.rows.get())
            .finish()
    }
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        Metrics {
            rows: r.counter(
                "spillway_consumer_rows_written_total",
                "Rows committed to the records table.",
                &[],
            ),
            batches: r.counter("spillway_consumer_batches_total", "Batches committed.", &[]),
            dead_letters: r.counter(
                "spillway_consumer_dead_letters_total",
                "Records committed to the dead-letter table.",
                &[],
            ),
            retries: r.counter(
                "spillway_consumer_flush_retries_total",
                "Flushes that failed and will be retried.",
                &[],
            ),
            fenced: r.counter(
                "spillway_consumer_fenced_total",
                "Flushes refused because another consumer moved the position.",
                &[],
            ),
            dropped: r.counter(
                "spillway_consumer_rewound_messages_total",
                "Messages dropped while paused (buffer full) and read again later.",
                &[],
            ),
            batch_size: r.histogram(
                "spillway_consumer_batch_records",
                "Records per committed batch.",
                &[],
                Histogram::sizes(),
            ),
            flush_latency: r.histogram(
                "spillway_consumer_flush_latency_seconds",
                "Duration of a committed flush transaction.",
                &[],
                Histogram::latency_seconds(),
            ),
            db_up: r.gauge(
                "spillway_consumer_database_up",
                "1 while Postgres accepts flushes.",
                &[],
            ),
            buffered_records: r.gauge(
                "spillway_consumer_buffered_records",
                "Records held in memory.",
                &[],
            ),
            buffered_bytes: r.gauge(
                "spillway_consumer_buffered_bytes",
                "Bytes held in memory.",
                &[],
            ),
            target_batch: r.gauge(
                "spillway_consumer_target_batch_records",
                "Current adaptive batch size.",
                &[],
            ),
            paused: r.gauge(
                "spillway_consumer_kafka_paused",
                "1 while Kafka is paused for lack of buffer room.",
                &[],
            ),
            lag: Mutex::new(BTreeMap::new()),
            registry: r,
        }
    }

    fn lag_gauge(&self, p: Partition) -> Arc<Gauge> {
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.entry(p)
            .or_insert_with(|| {
                self.registry.gauge(
                    "spillway_consumer_lag_records",
                    "Messages in Kafka after the durable position, per partition.",
                    &[("partition", &p.to_string())],
                )
            })
            .clone()
    }

    /// Rows written so far.
    pub fn rows_written(&self) -> u64 {
        self.rows.get()
    }

    /// Consumer lag summed over partitions (messages after the durable positions).
    pub fn total_lag(&self) -> i64 {
        self.lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|g| g.get())
            .sum()
    }

    /// Records held in memory now.
    pub fn buffered_records(&self) -> i64 {
        self.buffered_records.get()
    }
}

/// Logs Postgres going down and coming back once each, not at every attempt.
struct DbHealth {
    down_since: Option<Instant>,
    failures: u64,
}

impl DbHealth {
    fn observe(&mut self, ok: bool, error: Option<&str>, metrics: &Metrics, buffered: usize) {
        match (ok, self.down_since) {
            (true, Some(since)) => {
                tracing::info!(after = ?since.elapsed(), failed_attempts = self.failures, "Postgres accepts writes again; catching up");
                self.down_since = None;
                self.failures = 0;
                metrics.db_up.set(1);
            }
            (false, None) => {
                tracing::warn!(
                    error = error.unwrap_or("unknown"),
                    buffered,
                    "Postgres unavailable: nothing is lost; records stay buffered (Kafka pauses when the buffer is full) and flushes are retried with backoff"
                );
                self.down_since = Some(Instant::now());
                self.failures = 1;
                metrics.db_up.set(0);
            }
            (false, Some(_)) => self.failures += 1,
            (true, None) => {}
        }
    }
}

type FlushResult = (Batch, Result<Flushed, PgFailure>, Duration);

pub(crate) struct Pipeline {
    settings: Settings,
    batcher: Batcher,
    pool: Arc<Pool>,
    source: Source,
    events: mpsc::Receiver<SourceEvent>,
    results_tx: mpsc::UnboundedSender<FlushResult>,
    results: mpsc::UnboundedReceiver<FlushResult>,
    in_flight: usize,
    epochs: HashMap<Partition, u64>,
    next_epoch: u64,
    rewinding: BTreeSet<Partition>,
    paused: bool,
    draining: bool,
    db: DbHealth,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    positions: Arc<Mutex<BTreeMap<Partition, i64>>>,
    commits: u64,
    exit_after_commits: Option<u64>,
    /// MUTATION drop-failed-batch.
    dropped: DroppedBatches,
}

impl Pipeline {
    pub(crate) fn new(
        settings: Settings,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConsumerError> {
        let batcher = Batcher::new(settings.batcher.clone()).map_err(ConsumerError::Config)?;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &settings.brokers)
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("queued.max.messages.kbytes", "16384")
            .set("allow.auto.create.topics", "false");
        for (k, v) in &settings.rdkafka {
            cfg.set(k, v);
        }
        let (source, events) =
            Source::start(&cfg, &settings.topic, 256).map_err(ConsumerError::Kafka)?;
        let (results_tx, results) = mpsc::unbounded_channel();
        let exit_after_commits = std::env::var(FAILPOINT_EXIT_AFTER_COMMITS)
            .ok()
            .and_then(|v| v.parse().ok());
        Ok(Pipeline {
            retry: RetryPolicy::new(settings.batcher.retry.clone()),
            settings,
            batcher,
            pool,
            source,
            events,
            results_tx,
            results,
            in_flight: 0,
            epochs: HashMap::new(),
            next_epoch: 1,
            rewinding: BTreeSet::new(),
            paused: false,
            draining: false,
            db: DbHealth {
                down_since: None,
                failures: 0,
            },
            metrics,
            positions: Arc::new(Mutex::new(BTreeMap::new())),
            commits: 0,
            exit_after_commits,
            dropped: DroppedBatches::default(),
        })
    }

    /// The group consumer's client, for readiness checks with the user's own settings.
    pub(crate) fn kafka_client(
        &self,
    ) -> Arc<rdkafka::consumer::BaseConsumer<crate::source::Context>> {
        self.source.consumer().clone()
    }

    pub(crate) async fn run(
        mut self,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<(), ConsumerError> {
        self.metrics.db_up.set(1);
        let lag_task = self.spawn_lag_reporter();
        let mut draining_since: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let result = loop {
            let timer = self.batcher.poll_timeout();
            let step = tokio::select! {
                biased;
                Some((batch, result, elapsed)) = self.results.recv() => self.on_flushed(batch, result, elapsed).await,
                event = self.events.recv() => match event {
                    Some(e) => self.on_event(e).await,
                    None => Err(ConsumerError::Stopped("the Kafka thread stopped".into())),
                },
                _ = sleep_until(timer) => Ok(()),
                _ = &mut stop, if draining_since.is_none() => {
                    draining_since = Some(Instant::now());
                    self.begin_drain();
                    Ok(())
                }
                _ = tick.tick() => Ok(()),
            };
            if let Err(e) = step {
                break Err(e);
            }
            self.flush_due();
            self.relieve_backpressure();
            self.update_gauges();
            if let Some(since) = draining_since {
                if self.batcher.is_empty() && self.in_flight == 0 {
                    tracing::info!("everything buffered is written; leaving the consumer group");
                    break Ok(());
                }
                if since.elapsed() > self.settings.shutdown_timeout {
                    tracing::warn!(
                        buffered = self.batcher.stats().buffered_records,
                        "shutdown timeout: these records were not written; they stay in Kafka after the stored positions and are written on the next start"
                    );
                    break Ok(());
                }
            }
        };
        lag_task.abort();
        let source = self.source;
        let _ = tokio::task::spawn_blocking(move || source.close()).await;
        result
    }

    fn begin_drain(&mut self) {
        tracing::info!("stopping: no new messages; flushing what is buffered");
        self.batcher.set_draining(true);
        self.draining = true;
        let all: Vec<Partition> = self.batcher.partitions().collect();
        self.source.command(SourceCommand::Pause(all));
        self.paused = true;
        // Nothing buffered is lost by not reading further: it stays in Kafka.
        self.rewinding.extend(self.batcher.partitions());
    }

    async fn on_event(&mut self, event: SourceEvent) -> Result<(), ConsumerError> {
        match event {
            SourceEvent::Message {
                partition,
                offset,
                epoch,
                payload,
            } => {
                self.on_message(partition, offset, epoch, payload);
                Ok(())
            }
            SourceEvent::Assigned { partitions, reply } => {
                let positions = self.read_positions(&partitions).await?;
                let mut answer = Vec::with_capacity(positions.len());
                for (p, pos) in positions {
                    let epoch = self.take_partition(p, pos);
                    answer.push((p, pos, epoch));
                }
                tracing::info!(
                    ?answer,
                    "partitions assigned; starting at the positions stored in Postgres"
                );
                let _ = reply.send(answer);
                Ok(())
            }
            SourceEvent::Revoked { partitions, reply } => {
                for p in &partitions {
                    let dropped = self.batcher.revoke(*p);
                    self.epochs.remove(p);
                    self.rewinding.remove(p);
                    self.positions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(p);
                    if dropped > 0 {
                        tracing::info!(
                            partition = p,
                            dropped,
                            "partition revoked; its unwritten records go to the next owner"
                        );
                    }
                }
                let _ = reply.send(());
                Ok(())
            }
            SourceEvent::Error(e) => {
                tracing::debug!(error = %e, "Kafka client event");
                Ok(())
            }
        }
    }

    fn on_message(
        &mut self,
        partition: Partition,
        offset: i64,
        epoch: u64,
        payload: Option<Vec<u8>>,
    ) {
        if self.epochs.get(&partition) != Some(&epoch) || self.rewinding.contains(&partition) {
            self.metrics.dropped.inc();
            return;
        }
        let now = Instant::now();
        let single = |payload: Vec<u8>| Record {
            partition,
            offset,
            index: 0,
            last_in_message: true,
            received_at_micros: 0,
            payload,
        };
        let pushed = match payload.as_deref().map(Envelope::decode) {
            Some(Ok(env)) => {
                let n = env.records.len();
                let mut last = Push::Accepted;
                for (i, r) in env.records.iter().enumerate() {
                    let record = Record {
                        partition,
                        offset,
                        index: i as u32,
                        last_in_message: i + 1 == n,
                        received_at_micros: env.received_at_micros,
                        payload: r.to_vec(),
                    };
                    last = self.batcher.push(record, now);
                    if matches!(last, Push::Full(_) | Push::Unassigned(_)) {
                        break;
                    }
                }
                last
            }
            Some(Err(e)) => {
                let reason = format!("undecodable message: {}", e.kind);
                self.batcher.push_dead_letter(single(e.raw), reason, now)
            }
            None => self.batcher.push_dead_letter(
                single(vec![]),
                "empty (null) Kafka message".into(),
                now,
            ),
        };
        if let Push::Full(_) = pushed {
            // Drop this and every later message of the partition until a seek re-reads them.
            self.rewinding.insert(partition);
            if !self.paused {
                let stats = self.batcher.stats();
                tracing::info!(
                    buffered = stats.buffered_records,
                    bytes = stats.buffered_bytes,
                    "buffer full: pausing Kafka"
                );
                let all: Vec<Partition> = self.batcher.partitions().collect();
                self.source.command(SourceCommand::Pause(all));
                self.paused = true;
            }
        }
    }

    /// Resumes Kafka once the buffer is half empty, re-reading every partition that dropped
    /// records from the exact record it dropped.
    fn relieve_backpressure(&mut self) {
        if !self.paused {
            return;
        }
        let s = self.batcher.stats();
        let cfg = self.batcher.config();
        if s.buffered_records > cfg.capacity_records / 2
            || s.buffered_bytes > cfg.capacity_bytes / 2
        {
            return;
        }
        if self.draining {
            return;
        }
        for p in std::mem::take(&mut self.rewinding) {
            if let Some(pos) = self.batcher.next_position(p) {
                let epoch = self.bump_epoch(p);
                self.source.command(SourceCommand::Seek {
                    partition: p,
                    offset: pos.kafka_offset(),
                    epoch,
                });
            }
        }
        let all: Vec<Partition> = self.batcher.partitions().collect();
        self.source.command(SourceCommand::Resume(all));
        self.paused = false;
        tracing::info!(
            buffered = s.buffered_records,
            "buffer has room again: resuming Kafka"
        );
    }

    /// Starts (or restarts) `p` at its stored position `pos`; returns the epoch messages read
    /// from there will carry.
    fn take_partition(&mut self, p: Partition, pos: Position) -> u64 {
        self.dropped.forget(p); // MUTATION drop-failed-batch
        self.batcher.assign(p, pos);
        self.rewinding.remove(&p);
        self.set_position(p, pos);
        self.bump_epoch(p)
    }

    fn bump_epoch(&mut self, p: Partition) -> u64 {
        let e = self.next_epoch;
        self.next_epoch += 1;
        self.epochs.insert(p, e);
        e
    }

    fn flush_due(&mut self) {
        let now = Instant::now();
        while let Some(batch) = self.batcher.poll_batch(now) {
            if mutation::active(Mutation::CommitKafkaFirst) {
                self.commit_kafka_first(&batch); // MUTATION commit-kafka-first
            }
            // MUTATION drop-failed-batch: the position is expected where a dropped batch started.
            let expected_start = self.dropped.expected_start(&batch);
            self.in_flight += 1;
            let pool = self.pool.clone();
            let table = self.settings.table.clone();
            let topic = self.settings.topic.clone();
            let tx = self.results_tx.clone();
            // A stopped (SIGSTOP) or unreachable server never fires its own statement timeout,
            // and TCP keepalives do not notice a live kernel: give up on our side too. If the
            // commit did land, the retry finds the position moved (compare-and-set) and skips.
            let deadline = self.settings.statement_timeout + self.settings.connect_timeout;
            tokio::spawn(async move {
                let mut batch = batch;
                let start = std::mem::replace(&mut batch.start, expected_start); // MUTATION drop-failed-batch
                let started = Instant::now();
                let attempt = async {
                    let mut conn = pool.get().await?;
                    let r = pg::flush(conn.client_mut(), &table, &topic, &batch).await;
                    if r.is_ok() {
                        conn.release();
                    }
                    r
                };
                let result = tokio::time::timeout(deadline, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(PgFailure {
                            class: ErrorClass::Retriable,
                            message: format!("no answer from Postgres within {deadline:?}"),
                            row: None,
                        })
                    });
                batch.start = start; // MUTATION drop-failed-batch
                let _ = tx.send((batch, result, started.elapsed()));
            });
        }
    }

    async fn on_flushed(
        &mut self,
        batch: Batch,
        result: Result<Flushed, PgFailure>,
        elapsed: Duration,
    ) -> Result<(), ConsumerError> {
        self.in_flight -= 1;
        let buffered = self.batcher.stats().buffered_records;
        let outcome = match result {
            Ok(Flushed::Outcome(o)) => {
                self.db.observe(true, None, &self.metrics, buffered);
                o
            }
            Ok(Flushed::Fatal(message)) => return Err(ConsumerError::Fatal(message)),
            Err(f) => match f.class {
                ErrorClass::Fatal => return Err(ConsumerError::Fatal(f.message)),
                ErrorClass::Poison => FlushOutcome::Poison {
                    reason: f.message,
                    culprit: None,
                },
                ErrorClass::Retriable => {
                    self.db
                        .observe(false, Some(&f.message), &self.metrics, buffered);
                    FlushOutcome::Retriable { reason: f.message }
                }
            },
        };
        let outcome = self.dropped.outcome(&batch, outcome); // MUTATION drop-failed-batch
        if outcome == FlushOutcome::Fenced {
            // Counted here, not after the batcher: a flush the database refused is fenced even
            // when its partition was revoked meanwhile (a zombie's late flush).
            self.metrics.fenced.inc();
        }
        match self.batcher.on_flush_result(batch, outcome, Instant::now()) {
            AfterFlush::Committed {
                partition,
                position,
                rows,
                dead_letters,
            } => {
                self.metrics.rows.add(rows as u64);
                self.metrics.dead_letters.add(dead_letters as u64);
                self.metrics.batches.inc();
                self.metrics.batch_size.observe(rows as f64);
                self.metrics.flush_latency.observe(elapsed.as_secs_f64());
                self.set_position(partition, position);
                // MUTATION commit-kafka-first: Kafka was committed before the flush instead.
                if !mutation::active(Mutation::CommitKafkaFirst) {
                    self.between_the_two_commits("the Postgres commit, before the Kafka commit");
                    self.source.command(SourceCommand::Commit(vec![(
                        partition,
                        position.kafka_offset(),
                    )]));
                }
            }
            AfterFlush::RetryAt { .. } => self.metrics.retries.inc(),
            AfterFlush::Isolating => {
                tracing::debug!("a batch was rejected for a record; isolating it")
            }
            AfterFlush::Fenced { partition } => {
                tracing::warn!(
                    partition,
                    "another consumer moved this partition's position: re-reading it"
                );
                let pos = self.read_positions(&[partition]).await?;
                for (p, pos) in pos {
                    let epoch = self.take_partition(p, pos);
                    self.source.command(SourceCommand::Seek {
                        partition: p,
                        offset: pos.kafka_offset(),
                        epoch,
                    });
                }
            }
            AfterFlush::Stale => {}
        }
        Ok(())
    }

    /// Counts a first commit of a batch; the test failpoint SIGKILLs the process here, once the
    /// n-th is done and before the second.
    fn between_the_two_commits(&mut self, after: &str) {
        self.commits += 1;
        if self.exit_after_commits.is_some_and(|n| self.commits >= n) {
            eprintln!("{FAILPOINT_EXIT_AFTER_COMMITS}: SIGKILLing this process after {after}");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort();
        }
    }

    /// MUTATION commit-kafka-first: the batch's end is committed to Kafka before its flush, and
    /// the failpoint between the two commits fires after it.
    fn commit_kafka_first(&mut self, batch: &Batch) {
        mutation::commit_to_kafka_now(
            self.source.consumer(),
            &self.settings.topic,
            batch.partition,
            batch.end.kafka_offset(),
        );
        self.between_the_two_commits("the Kafka commit, before the Postgres commit");
    }

    fn set_position(&self, p: Partition, pos: Position) {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, pos.kafka_offset());
    }

    /// Reads stored positions, retrying with backoff while Postgres is unavailable.
    async fn read_positions(
        &mut self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, Position)>, ConsumerError> {
        let mut attempt = 0;
        loop {
            let result = async {
                let conn = self.pool.get().await?;
                let mut out = Vec::with_capacity(partitions.len());
                for p in partitions {
                    out.push((
                        *p,
                        pg::position(
                            conn.client(),
                            &self.settings.table,
                            &self.settings.topic,
                            *p,
                        )
                        .await?,
                    ));
                }
                conn.release();
                Ok::<_, PgFailure>(out)
            }
            .await;
            let buffered = self.batcher.stats().buffered_records;
            match result {
                Ok(v) => {
                    self.db.observe(true, None, &self.metrics, buffered);
                    return Ok(v);
                }
                Err(f) if f.class == ErrorClass::Fatal => {
                    return Err(ConsumerError::Fatal(f.message))
                }
                Err(f) => {
                    self.db
                        .observe(false, Some(&f.message), &self.metrics, buffered);
                    attempt += 1;
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                }
            }
        }
    }

    fn update_gauges(&self) {
        let s = self.batcher.stats();
        self.metrics.buffered_records.set(s.buffered_records as i64);
        self.metrics.buffered_bytes.set(s.buffered_bytes as i64);
        self.metrics.target_batch.set(s.target_batch_records as i64);
        self.metrics.paused.set(self.paused as i64);
    }

    fn spawn_lag_reporter(&self) -> tokio::task::JoinHandle<()> {
        let consumer = self.source.consumer().clone();
        let topic = self.source.topic().to_string();
        let positions = self.positions.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let snapshot: Vec<(Partition, i64)> = positions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(p, o)| (*p, *o))
                    .collect();
                let (consumer, topic) = (consumer.clone(), topic.clone());
                let highs = tokio::task::spawn_blocking(move || {
                    snapshot
                        .into_iter()
                        .filter_map(|(p, at)| {
                            let (_, high) = consumer
                                .fetch_watermarks(&topic, p, Duration::from_secs(1))
                                .ok()?;
                            Some((p, high - at))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                for (p, lag) in highs {
                    metrics.lag_gauge(p).set(lag.max(0));
                }
            }
        })
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn new_metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new())
}
