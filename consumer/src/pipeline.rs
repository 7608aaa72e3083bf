//! The consumer's event loop: a thin shell around [`ConsumerMachine`]. It feeds the machine
//! every event (Kafka messages and rebalances, seek outcomes, flush and position-read results,
//! the group's lag, timers, shutdown) with `now`, and performs every command the machine emits:
//! Kafka commands go to the Kafka thread, flushes and position reads run as tasks, notices
//! become logs and metrics. It keeps no flow-control state of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use spillway_core::metrics::{
    Counter, Gauge, Histogram, Labelled, Registry, LATENCY_SECONDS, SIZES,
};
use spillway_core::{
    BatchId, BatcherConfig, Command, ConsumerMachine, EpochTags, ErrorClass, Exit, FlushResult,
    KafkaCommand, Mutation, Notice, Partition, PartitionLag, Position, StoredPosition,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::Settings;
use crate::partitions::Rotation;
use crate::pg::{self, PgFailure, Pool};
use crate::source::{self, Source, SourceEvent, StartAt};
use crate::ConsumerError;

/// Environment variable naming a test failpoint (read only with the `failpoints` feature): after
/// this many Postgres commits, the process SIGKILLs itself, before the Kafka commit.
pub const FAILPOINT_EXIT_AFTER_COMMITS: &str = "SPILLWAY_FAILPOINT_EXIT_AFTER_COMMITS";

/// Environment variable naming a test failpoint (read only with the `failpoints` feature): the
/// first this many flush tasks panic.
pub const FAILPOINT_PANIC_FLUSHES: &str = "SPILLWAY_FAILPOINT_PANIC_FLUSHES";

/// The consumer's metrics.
pub struct Metrics {
    /// Registry rendered at /metrics.
    pub registry: Registry,
    rows: Counter,
    batches: Counter,
    dead_letters: Counter,
    copies: Counter,
    repeated: Counter,
    /// Idempotency keys deleted past their retention.
    pub(crate) keys_expired: Counter,
    retries: Counter,
    fenced: Counter,
    dropped: Counter,
    gaps: Counter,
    rejoins: Counter,
    batch_size: Histogram,
    flush_latency: Histogram,
    db_up: Gauge,
    buffered_records: Gauge,
    buffered_bytes: Gauge,
    target_batch: Gauge,
    paused: Gauge,
    assigned: Gauge,
    stopped: Gauge,
    lag: Labelled<Gauge>,
    merged: Labelled<Counter>,
    routed: Labelled<Counter>,
    /// With `--partition-by`: partitions created, per table.
    pub(crate) partitions_created: Labelled<Counter>,
    /// Partitions dropped past the retention, per table.
    pub(crate) partitions_dropped: Labelled<Counter>,
    /// Partition changes (and catalog reads) that failed, per table.
    pub(crate) partition_failures: Labelled<Counter>,
    /// How long each partition creation or drop took, lock waits included.
    pub(crate) partition_change: Histogram,
    /// Rows in each table's default partition (counted up to 10,000 each round).
    pub(crate) default_rows: Labelled<Gauge>,
    /// The (topic, partition) pairs `lag` has a series for.
    lagging: Mutex<BTreeSet<(String, i32)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("rows", &self.rows.get())
            .finish()
    }
}

impl Metrics {
    /// Every family registered; the buffer's bounds are `capacity`'s.
    pub fn new(capacity: &BatcherConfig) -> Self {
        let mut r = Registry::new();
        let mut counter = |name: &str, help: &str| r.counter(name, help);
        let rows = counter(
            "spillway_consumer_rows_written_total",
            "Rows committed to the records table.",
        );
        let batches = counter("spillway_consumer_batches_total", "Batches committed.");
        let dead_letters = counter(
            "spillway_consumer_dead_letters_total",
            "Records committed to the dead-letter table.",
        );
        let copies = counter(
            "spillway_consumer_copies_skipped_total",
            "Second copies of messages already written, skipped: a producer's Kafka client stored them again after an answer was lost.",
        );
        let repeated = counter(
            "spillway_consumer_repeated_records_skipped_total",
            "Records not written because their request was sent again with an Idempotency-Key already written (rows and dead letters).",
        );
        let keys_expired = counter(
            "spillway_consumer_request_keys_expired_total",
            "Idempotency keys deleted past --idempotency-key-retention.",
        );
        let retries = counter(
            "spillway_consumer_flush_retries_total",
            "Flushes that failed and will be retried.",
        );
        let fenced = counter(
            "spillway_consumer_fenced_total",
            "Flushes refused because another consumer moved the position.",
        );
        let dropped = counter(
            "spillway_consumer_rewound_messages_total",
            "Messages dropped (fetched before a seek, or while the buffer was full) and read again later.",
        );
        let gaps = counter(
            "spillway_consumer_offset_gaps_total",
            "Partitions stopped because their offsets jumped past an unread record.",
        );
        let rejoins = counter(
            "spillway_consumer_rejoins_total",
            "Group rejoins asked because this consumer owned nothing while partitions had lag nobody wrote.",
        );
        let batch_size = r.histogram(
            "spillway_consumer_batch_records",
            "Records per committed batch.",
            SIZES,
        );
        let flush_latency = r.histogram(
            "spillway_consumer_flush_latency_seconds",
            "Duration of a committed flush transaction.",
            LATENCY_SECONDS,
        );
        let db_up = r.gauge(
            "spillway_consumer_database_up",
            "1 while Postgres accepts flushes.",
        );
        let buffered_records = r.gauge(
            "spillway_consumer_buffered_records",
            "Records held in memory.",
        );
        let buffered_bytes = r.gauge("spillway_consumer_buffered_bytes", "Bytes held in memory.");
        r.gauge(
            "spillway_consumer_buffer_capacity_records",
            "The buffer's bound in records (--buffer-max-records).",
        )
        .set(capacity.capacity_records as i64);
        r.gauge(
            "spillway_consumer_buffer_capacity_bytes",
            "The buffer's bound in bytes (--buffer-max-bytes).",
        )
        .set(capacity.capacity_bytes as i64);
        let target_batch = r.gauge(
            "spillway_consumer_target_batch_records",
            "Current adaptive batch size.",
        );
        let paused = r.gauge(
            "spillway_consumer_kafka_paused",
            "1 while some partition is paused in Kafka (buffer full, positioning, or stopped).",
        );
        let assigned = r.gauge(
            "spillway_consumer_assigned_partitions",
            "Partitions this consumer owns.",
        );
        let stopped = r.gauge(
            "spillway_consumer_stopped_partitions",
            "Partitions stopped at an offset gap (see the error log).",
        );
        let lag = r.gauges_by(
            "spillway_consumer_lag_records",
            "Messages in Kafka after the durable position, per partition of each topic.",
            &["topic", "partition"],
        );
        let merged = r.counters(
            "spillway_consumer_upsert_records_total",
            "With --upsert-key: committed records by what they did to the table (inserted, updated, deleted, unchanged).",
            "outcome",
        );
        let routed = r.counters(
            "spillway_consumer_routed_records_total",
            "With --route: committed records (rows and dead letters) per table.",
            "table",
        );
        let partitions_created = r.counters(
            "spillway_consumer_partitions_created_total",
            "With --partition-by: time partitions created, per table.",
            "table",
        );
        let partitions_dropped = r.counters(
            "spillway_consumer_partitions_dropped_total",
            "With --retention: time partitions dropped because their whole range was older than the retention, per table.",
            "table",
        );
        let partition_failures = r.counters(
            "spillway_consumer_partition_failures_total",
            "With --partition-by: partition creations, drops and catalog reads that failed (a lock timeout, rows of the range in the default partition, a refusal), per table; see the logs.",
            "table",
        );
        let partition_change = r.histogram(
            "spillway_consumer_partition_change_seconds",
            "With --partition-by: duration of each partition creation or drop transaction, lock waits included.",
            LATENCY_SECONDS,
        );
        let default_rows = r.gauges(
            "spillway_consumer_default_partition_rows",
            "With --partition-by: rows in the table's default partition (outside every partition's range), counted up to 10000 each minute.",
            "table",
        );
        Metrics {
            merged,
            routed,
            partitions_created,
            partitions_dropped,
            partition_failures,
            partition_change,
            default_rows,
            registry: r,
            rows,
            batches,
            dead_letters,
            copies,
            repeated,
            keys_expired,
            retries,
            fenced,
            dropped,
            gaps,
            rejoins,
            batch_size,
            flush_latency,
            db_up,
            buffered_records,
            buffered_bytes,
            target_batch,
            paused,
            assigned,
            stopped,
            lag,
            lagging: Mutex::new(BTreeSet::new()),
        }
    }

    fn lag_gauge(&self, topic: &str, partition: i32) -> Gauge {
        self.lagging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((topic.to_string(), partition));
        self.lag.get_all(&[topic, &partition.to_string()])
    }

    /// Rows written so far.
    pub fn rows_written(&self) -> u64 {
        self.rows.get()
    }

    /// Consumer lag summed over partitions (messages after the durable positions).
    pub fn total_lag(&self) -> i64 {
        let lagging = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        lagging
            .iter()
            .map(|(t, p)| self.lag.get_all(&[t, &p.to_string()]).get())
            .sum()
    }

    /// Records held in memory now.
    pub fn buffered_records(&self) -> i64 {
        self.buffered_records.get()
    }

    /// Partitions owned now.
    pub fn assigned_partitions(&self) -> i64 {
        self.assigned.get()
    }
}

/// What the HTTP endpoints read: whether the pipeline runs and whether it does its job.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the pipeline ended, with why.
    pub stopped: Mutex<Option<String>>,
    /// The core's readiness.
    pub ready: AtomicBool,
    /// Why not ready, when the core says so.
    pub not_ready_because: Mutex<String>,
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

/// A rebalance callback waiting, on the Kafka thread, for the start of each partition.
struct PendingAssignment {
    waiting: BTreeSet<Partition>,
    starts: Vec<StartAt>,
    reply: std_mpsc::SyncSender<Vec<StartAt>>,
}

/// A flush task's outcome: its batch, the result for the core, how long it took, and what it
/// left out as repeated requests (counted by the batch's `Committed` notice).
type FlushDone = (BatchId, FlushResult, Duration, pg::Repeated);
type PositionsRead = Result<Vec<StoredPosition>, PgFailure>;

pub(crate) struct Pipeline {
    settings: Settings,
    /// The tables and the routing between them, shared with the flush tasks.
    targets: Arc<pg::Targets>,
    machine: ConsumerMachine,
    pool: Arc<Pool>,
    source: Source,
    events: mpsc::Receiver<SourceEvent>,
    flushes: JoinSet<FlushDone>,
    flush_tasks: HashMap<tokio::task::Id, BatchId>,
    reads: JoinSet<PositionsRead>,
    pending: Option<PendingAssignment>,
    db: DbHealth,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    dropped_reported: u64,
    /// With `--partition-by`: the tables' time partitions.
    rotation: Option<Arc<Rotation>>,
    /// What the flush last joined left out as repeated requests: its `Committed` notice, which
    /// the core emits while taking that flush's result, counts it.
    repeated: pg::Repeated,
    #[cfg(feature = "failpoints")]
    exit_after_commits: Option<u64>,
    #[cfg(feature = "failpoints")]
    commits: u64,
    #[cfg(feature = "failpoints")]
    panic_flushes: Arc<std::sync::atomic::AtomicU64>,
}

impl Pipeline {
    pub(crate) fn new(
        settings: Settings,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        rotation: Option<Arc<Rotation>>,
    ) -> Result<Self, ConsumerError> {
        let config = settings.machine_config()?;
        let tags = EpochTags::new(&config);
        let machine = ConsumerMachine::new(config)?;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &settings.brokers)
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("queued.max.messages.kbytes", "16384")
            // Once that prefetch bound is reached librdkafka postpones a partition's next
            // fetch by this much (1 s by default): on a backlog the consumer then sat idle
            // for most of a second each time it had written the prefetched records.
            .set("fetch.queue.backoff.ms", "20")
            .set("allow.auto.create.topics", "false");
        for (k, v) in &settings.rdkafka {
            cfg.set(k, v);
        }
        let (source, events) = Source::start(
            &cfg,
            &settings.topics,
            256,
            tags,
            settings.mapping.needs_kafka_meta(),
        )
        .map_err(ConsumerError::Kafka)?;
        health.ready.store(machine.is_ready(), Ordering::Relaxed);
        Ok(Pipeline {
            targets: Arc::new(pg::Targets::new(&settings)),
            settings,
            machine,
            pool,
            source,
            events,
            flushes: JoinSet::new(),
            flush_tasks: HashMap::new(),
            reads: JoinSet::new(),
            pending: None,
            db: DbHealth {
                down_since: None,
                failures: 0,
            },
            metrics,
            health,
            dropped_reported: 0,
            rotation,
            repeated: pg::Repeated::default(),
            #[cfg(feature = "failpoints")]
            exit_after_commits: std::env::var(FAILPOINT_EXIT_AFTER_COMMITS)
                .ok()
                .and_then(|v| v.parse().ok()),
            #[cfg(feature = "failpoints")]
            commits: 0,
            #[cfg(feature = "failpoints")]
            panic_flushes: Arc::new(std::sync::atomic::AtomicU64::new(
                std::env::var(FAILPOINT_PANIC_FLUSHES)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
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
        let (views_tx, mut views) = mpsc::channel(1);
        let lag_task = self.spawn_group_watch(views_tx);
        let rotation_task = self
            .rotation
            .as_ref()
            .map(|r| r.spawn(self.settings.partition_check_every));
        let expiry_task = crate::keys::spawn(
            self.targets.clone(),
            self.pool.clone(),
            self.metrics.clone(),
            self.settings.key_retention,
            self.settings.key_expiry_every,
        );
        let mut stopping = false;
        let result = loop {
            let timer = self.machine.poll_timeout();
            // Results, the stop signal and timers first: a flood of Kafka messages must not
            // starve them.
            tokio::select! {
                biased;
                Some(joined) = self.flushes.join_next_with_id() => {
                    self.on_flush_joined(joined);
                }
                Some(read) = self.reads.join_next() => {
                    let read = read.unwrap_or_else(|e| Err(PgFailure {
                        class: ErrorClass::Retriable,
                        message: format!("the position read failed: {e}"),
                        row: None,
                    }));
                    self.on_positions_read(read);
                }
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    tracing::info!("stopping: no new messages; flushing what is buffered");
                    // A rebalance waiting for start offsets gets none: the group gives those
                    // partitions to others.
                    self.pending = None;
                    self.machine.on_shutdown(Instant::now());
                }
                Some(view) = views.recv() => self.machine.on_group_view(&view, Instant::now()),
                _ = sleep_until(timer) => self.machine.handle_timeout(Instant::now()),
                event = self.events.recv() => match event {
                    Some(e) => self.on_event(e),
                    None => break Err(ConsumerError::Stopped("the Kafka thread stopped".into())),
                },
            }
            if let Some(exit) = self.perform_commands() {
                break exit;
            }
            self.update_gauges();
        };
        lag_task.abort();
        expiry_task.abort();
        if let Some(task) = rotation_task {
            task.abort();
        }
        self.reads.abort_all();
        self.flushes.abort_all();
        *self
            .health
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(match &result {
            Ok(()) => "stopped".to_string(),
            Err(e) => e.to_string(),
        });
        self.health.ready.store(false, Ordering::Relaxed);
        // The Kafka thread may be blocked sending on the full channel: closing our end first
        // wakes it, so joining it cannot hang.
        let Pipeline { source, events, .. } = self;
        drop(events);
        let _ = tokio::task::spawn_blocking(move || source.close()).await;
        result
    }

    fn on_event(&mut self, event: SourceEvent) {
        let now = Instant::now();
        match event {
            SourceEvent::Message(m) => self.machine.on_message(m, now),
            SourceEvent::Assigned { partitions, reply } => {
                tracing::info!(
                    ?partitions,
                    "partitions assigned; reading their stored positions"
                );
                if partitions.is_empty() {
                    let _ = reply.send(Vec::new());
                } else {
                    self.pending = Some(PendingAssignment {
                        waiting: partitions.iter().copied().collect(),
                        starts: Vec::new(),
                        reply,
                    });
                    self.machine.on_assigned(&partitions, now);
                }
            }
            SourceEvent::Revoked { partitions, reply } => {
                self.machine.on_revoked(&partitions, now);
                let _ = reply.send(());
            }
            SourceEvent::SeekDone(p, epoch) => self.machine.on_seek_done(p, epoch, now),
            SourceEvent::SeekFailed(p, epoch, reason) => {
                self.machine.on_seek_failed(p, epoch, reason, now)
            }
            SourceEvent::Error(e) => {
                if source::needs_attention(&e) {
                    tracing::error!(error = %e, topics = %self.settings.topics, "Kafka refuses this consumer: check the topic name, the credentials and the ACLs (-X properties); nothing is read until this is fixed");
                } else {
                    tracing::debug!(error = %e, "Kafka client event");
                }
            }
        }
    }

    fn on_flush_joined(
        &mut self,
        joined: Result<(tokio::task::Id, FlushDone), tokio::task::JoinError>,
    ) {
        let now = Instant::now();
        let (id, result, repeated) = match joined {
            Ok((task, (id, result, elapsed, repeated))) => {
                self.flush_tasks.remove(&task);
                if result == FlushResult::Written {
                    self.metrics.flush_latency.observe(elapsed.as_secs_f64());
                }
                let buffered = self.machine.stats().buffered_records;
                match &result {
                    FlushResult::Retriable { reason } => {
                        self.db
                            .observe(false, Some(reason), &self.metrics, buffered)
                    }
                    FlushResult::Fatal { .. } | FlushResult::Unconvertible { .. } => {}
                    _ => self.db.observe(true, None, &self.metrics, buffered),
                }
                (id, result, repeated)
            }
            Err(e) => {
                let Some(id) = self.flush_tasks.remove(&e.id()) else {
                    return;
                };
                tracing::error!(error = %e, "a flush task panicked; its batch will be retried");
                let reason = format!("the flush task failed: {e}");
                (id, FlushResult::Retriable { reason }, Default::default())
            }
        };
        self.repeated = repeated;
        self.machine.on_flush_result(id, result, now);
    }

    fn on_positions_read(&mut self, read: PositionsRead) {
        let now = Instant::now();
        let buffered = self.machine.stats().buffered_records;
        match read {
            Ok(positions) => {
                self.db.observe(true, None, &self.metrics, buffered);
                tracing::info!(?positions, "starting at the positions stored in Postgres");
                self.machine.on_positions(&positions, now);
            }
            Err(f) => {
                let fatal = f.class == ErrorClass::Fatal;
                if !fatal {
                    self.db
                        .observe(false, Some(&f.message), &self.metrics, buffered);
                }
                self.machine.on_positions_failed(f.message, fatal, now);
            }
        }
    }

    /// Performs what the machine asked; returns how the pipeline ends, when it does.
    fn perform_commands(&mut self) -> Option<Result<(), ConsumerError>> {
        while let Some(c) = self.machine.poll_command() {
            match c {
                Command::ReadPositions(partitions) => self.read_positions(partitions),
                Command::Kafka(KafkaCommand::Seek {
                    partition,
                    offset,
                    epoch,
                }) if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.waiting.contains(&partition)) =>
                {
                    if let Some(mut pending) = self.pending.take() {
                        pending.waiting.remove(&partition);
                        pending.starts.push((partition, offset, epoch));
                        if pending.waiting.is_empty() {
                            let _ = pending.reply.send(pending.starts);
                        } else {
                            self.pending = Some(pending);
                        }
                    }
                }
                Command::Kafka(KafkaCommand::Commit { partition, offset })
                    if self.machine.config().mutated(Mutation::CommitKafkaFirst) =>
                {
                    self.commit_kafka_first(partition, offset)
                }
                Command::Kafka(k) => self.source.command(k),
                Command::Flush(batch) => {
                    let id = batch.id;
                    let pool = self.pool.clone();
                    let name = self.settings.name().to_string();
                    let targets = self.targets.clone();
                    let rotation = self.rotation.clone();
                    let routed = self.metrics.routed.clone();
                    let merges = self.metrics.merged.clone();
                    // A stopped (SIGSTOP) or unreachable server never fires its own statement
                    // timeout: give up on our side too, counting from when a pooled connection
                    // is ours (waiting for one is not an outage). If the commit did land, the
                    // retry finds the position moved (compare-and-set) and skips.
                    let deadline = self.settings.statement_timeout + self.settings.connect_timeout;
                    #[cfg(feature = "failpoints")]
                    let panics = self.panic_flushes.clone();
                    let task = self.flushes.spawn(async move {
                        #[cfg(feature = "failpoints")]
                        if panics
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                        {
                            panic!("{FAILPOINT_PANIC_FLUSHES}: this flush task panics");
                        }
                        // Converted before a connection is taken: a record that does not fit
                        // its column is known without asking Postgres.
                        let rows = match pg::encode_rows(&batch, &targets) {
                            Ok(rows) => rows,
                            Err(unconvertible) => {
                                return (id, unconvertible, Duration::ZERO, Default::default())
                            }
                        };
                        // Before taking a turn: the rotation takes one of the pool's
                        // connections to create a partition, and must not wait for ours.
                        if let Some(rotation) = &rotation {
                            let ready = tokio::time::timeout(deadline, rotation.before_flush(&rows));
                            let ready = ready.await.unwrap_or_else(|_| {
                                Err(FlushResult::Retriable {
                                    reason: format!(
                                        "the partitions this batch needs were not ready within {deadline:?}"
                                    ),
                                })
                            });
                            if let Err(not_ready) = ready {
                                return (id, not_ready, Duration::ZERO, Default::default());
                            }
                        }
                        let turn = pool.wait_turn().await;
                        let started = Instant::now();
                        let attempt = async {
                            let mut conn = pool.open(turn?).await?;
                            let pg::Flushed {
                                result,
                                merged,
                                repeated,
                                per_table,
                            } = pg::flush(conn.client_mut(), &targets, &name, &batch, rows).await;
                            if matches!(result, FlushResult::Written) && targets.tables.len() > 1 {
                                for (t, n) in targets.tables.iter().zip(per_table) {
                                    routed.get(&t.table.plain).inc_by(n as u64);
                                }
                            }
                            if let Some(m) = merged {
                                for (outcome, n) in [
                                    ("inserted", m.inserted),
                                    ("updated", m.updated),
                                    ("deleted", m.deleted),
                                    ("unchanged", m.unchanged),
                                ] {
                                    merges.get(outcome).inc_by(n);
                                }
                            }
                            if matches!(result, FlushResult::Written | FlushResult::Fenced) {
                                conn.release();
                            }
                            Ok::<_, PgFailure>((result, repeated))
                        };
                        let (result, repeated) =
                            match tokio::time::timeout(deadline, attempt).await {
                                Ok(Ok(done)) => done,
                                Ok(Err(f)) => (pg::flush_result(f), Default::default()),
                                Err(_) => (
                                    FlushResult::Retriable {
                                        reason: format!(
                                            "no answer from Postgres within {deadline:?}"
                                        ),
                                    },
                                    Default::default(),
                                ),
                            };
                        (id, result, started.elapsed(), repeated)
                    });
                    self.flush_tasks.insert(task.id(), id);
                }
                Command::Notice(n) => self.on_notice(n),
                Command::Exit(exit) => {
                    return Some(match exit {
                        Exit::Drained => {
                            tracing::info!(
                                "everything buffered is written; leaving the consumer group"
                            );
                            Ok(())
                        }
                        Exit::ShutdownTimeout { buffered } => {
                            tracing::warn!(
                                buffered,
                                "shutdown timeout: these records were not written; they stay in Kafka after the stored positions and are written on the next start"
                            );
                            Ok(())
                        }
                        Exit::Fatal(message) => Err(ConsumerError::Fatal(message)),
                    })
                }
            }
        }
        None
    }

    /// A partition as logs show it: Kafka's number, after its topic when there are several
    /// (`orders/3`).
    fn shown(&self, p: Partition) -> String {
        match self.settings.topics.split(p) {
            Some((topic, kafka)) if self.settings.topics.several() => format!("{topic}/{kafka}"),
            Some((_, kafka)) => kafka.to_string(),
            None => p.to_string(),
        }
    }

    fn shown_all(&self, ps: &[Partition]) -> Vec<String> {
        ps.iter().map(|p| self.shown(*p)).collect()
    }

    fn on_notice(&mut self, n: Notice) {
        match n {
            Notice::Committed {
                partition,
                position,
                rows,
                dead_letters,
                copies,
            } => {
                let repeated = std::mem::take(&mut self.repeated);
                let rows = rows.saturating_sub(repeated.rows);
                let dead_letters = dead_letters.saturating_sub(repeated.dead_letters);
                if repeated != pg::Repeated::default() {
                    let skipped = repeated.rows + repeated.dead_letters;
                    self.metrics.repeated.inc_by(skipped as u64);
                    tracing::info!(
                        partition = %self.shown(partition),
                        ?position,
                        skipped,
                        "skipped records of requests sent again with an Idempotency-Key already written: nothing written twice"
                    );
                }
                self.metrics.rows.inc_by(rows as u64);
                self.metrics.dead_letters.inc_by(dead_letters as u64);
                if copies > 0 {
                    self.metrics.copies.inc_by(copies as u64);
                    tracing::info!(
                        partition = %self.shown(partition),
                        ?position,
                        copies,
                        "skipped second copies of messages already written (the producer's Kafka \
                         client stored them again after an answer was lost): nothing written twice"
                    );
                }
                self.metrics.batches.inc();
                self.metrics.batch_size.observe(rows as f64);
                if !self.machine.config().mutated(Mutation::CommitKafkaFirst) {
                    self.between_the_two_commits();
                }
            }
            Notice::Retrying { .. } => {
                self.metrics.retries.inc();
            }
            Notice::DeadLettersRejected {
                partition,
                attempt,
                reason,
            } => tracing::error!(
                partition = %self.shown(partition),
                attempt,
                error = %reason,
                "Postgres refuses the dead-letter insert: the batch waits and is retried; nothing is dead-lettered in its place. Check constraints or triggers on the dead-letter table"
            ),
            Notice::Fenced { partition } => {
                self.metrics.fenced.inc();
                tracing::warn!(
                    partition = %self.shown(partition),
                    "another consumer moved this partition's position: this flush wrote nothing; if the partition is still ours it is re-read from the stored position"
                );
            }
            Notice::Gap {
                partition,
                expected,
                got,
            } => {
                self.metrics.gaps.inc();
                tracing::error!(
                    partition = %self.shown(partition),
                    expected,
                    got,
                    "Kafka's offsets jumped past records this consumer never read (retention deleted them, or the topic is compacted): the partition is stopped at its last written record and nothing after the gap is written. Restart to retry; the records in the gap are gone from Kafka"
                );
            }
            Notice::GapClosed { partition, stored } => {
                tracing::warn!(
                    partition = %self.shown(partition),
                    stored = ?stored,
                    "the partition stopped at a gap was written past it by another writer (a late commit held the missing records): reading it again from the stored position"
                );
            }
            Notice::BufferFull { records, bytes } => {
                tracing::info!(records, bytes, "buffer full: pausing Kafka")
            }
            Notice::Resuming { records } => {
                tracing::info!(
                    records,
                    "buffer has room again: re-reading the paused partitions"
                )
            }
            Notice::Revoked { partition, dropped } => {
                if dropped > 0 {
                    tracing::info!(
                        partition = %self.shown(partition),
                        dropped,
                        "partition revoked; its unwritten records go to the next owner"
                    );
                }
            }
            Notice::SeekFailed { partition, reason } => {
                tracing::warn!(partition = %self.shown(partition), error = %reason, "seek failed; the partition stays paused and the seek is tried again")
            }
            Notice::PositionsUnavailable { reason } => {
                tracing::debug!(error = %reason, "stored positions unavailable; retrying")
            }
            Notice::Unowned { partitions } => {
                let partitions = self.shown_all(&partitions);
                self.metrics.rejoins.inc();
                tracing::warn!(
                    ?partitions,
                    "these partitions have lag nobody writes while this consumer writes its own (their owner is gone): rejoining the group"
                );
            }
            Notice::Orphaned { partitions } => {
                let partitions = self.shown_all(&partitions);
                self.metrics.rejoins.inc();
                tracing::warn!(
                    ?partitions,
                    "this consumer owns no partition while these have lag nobody writes: rejoining the group"
                );
                *self
                    .health
                    .not_ready_because
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = format!(
                    "owns no partition while partitions {} have lag nobody writes (rejoining the group)", partitions.join(", ")
                );
            }
            Notice::Draining { buffered } => {
                tracing::info!(buffered, "draining: writing what is buffered")
            }
        }
    }

    /// The failpoint (`failpoints` feature): SIGKILL after the n-th first commit, before the
    /// second (Postgres then Kafka; Kafka then Postgres under `commit-kafka-first`).
    fn between_the_two_commits(&mut self) {
        #[cfg(feature = "failpoints")]
        {
            self.commits += 1;
            if self.exit_after_commits.is_some_and(|n| self.commits >= n) {
                eprintln!("{FAILPOINT_EXIT_AFTER_COMMITS}: SIGKILLing this process between its two commits");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                std::process::abort();
            }
        }
    }

    /// The `commit-kafka-first` mutation (tests only): the batch's end is committed to Kafka,
    /// synchronously, as the batch is sent to Postgres.
    fn commit_kafka_first(&mut self, partition: Partition, offset: i64) {
        let mut tpl = rdkafka::TopicPartitionList::new();
        if let Some((topic, kafka)) = self.settings.topics.split(partition) {
            let _ = tpl.add_partition_offset(topic, kafka, rdkafka::Offset::Offset(offset));
        }
        if let Err(e) = self
            .source
            .consumer()
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        {
            tracing::warn!(error = %e, "commit-kafka-first: the Kafka commit failed");
        }
        self.between_the_two_commits();
    }

    fn read_positions(&mut self, partitions: Vec<Partition>) {
        if self
            .machine
            .config()
            .mutated(spillway_core::Mutation::CommitKafkaFirst)
        {
            return self.read_kafka_positions(partitions);
        }
        let pool = self.pool.clone();
        let (name, topics) = (
            self.settings.name().to_string(),
            self.settings.topics.clone(),
        );
        let deadline = self.settings.statement_timeout + self.settings.connect_timeout;
        self.reads.spawn(async move {
            let turn = pool.wait_turn().await;
            let read = async {
                let conn = pool.open(turn?).await?;
                let mut out = Vec::with_capacity(partitions.len());
                for p in partitions {
                    out.push(pg::stored_position(conn.client(), &name, &topics, p).await?);
                }
                conn.release();
                Ok(out)
            };
            tokio::time::timeout(deadline, read)
                .await
                .unwrap_or_else(|_| {
                    Err(PgFailure {
                        class: ErrorClass::Retriable,
                        message: format!("no answer from Postgres within {deadline:?}"),
                        row: None,
                    })
                })
        });
    }

    /// The `commit-kafka-first` mutation (tests only): positions from Kafka's committed
    /// offsets, as a consumer that trusts Kafka would.
    fn read_kafka_positions(&mut self, partitions: Vec<Partition>) {
        let consumer = self.source.consumer().clone();
        let topics = self.settings.topics.clone();
        self.reads.spawn(async move {
            tokio::task::spawn_blocking(move || {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for (topic, kafka) in partitions.iter().filter_map(|p| topics.split(*p)) {
                    tpl.add_partition(topic, kafka);
                }
                let committed = consumer
                    .committed_offsets(tpl, Duration::from_secs(10))
                    .map_err(|e| PgFailure {
                        class: ErrorClass::Retriable,
                        message: e.to_string(),
                        row: None,
                    })?;
                Ok(partitions
                    .iter()
                    .map(|p| {
                        let (topic, kafka) = topics.split(*p).unwrap_or_default();
                        let offset = committed
                            .find_partition(topic, kafka)
                            .and_then(|e| e.offset().to_raw())
                            .filter(|o| *o >= 0)
                            .unwrap_or(0);
                        StoredPosition::new(*p, Position::new(offset, 0))
                    })
                    .collect())
            })
            .await
            .unwrap_or_else(|e| {
                Err(PgFailure {
                    class: ErrorClass::Retriable,
                    message: e.to_string(),
                    row: None,
                })
            })
        });
    }

    fn update_gauges(&mut self) {
        let s = self.machine.stats();
        self.metrics.buffered_records.set(s.buffered_records as i64);
        self.metrics.buffered_bytes.set(s.buffered_bytes as i64);
        self.metrics.target_batch.set(s.target_batch_records as i64);
        self.metrics.paused.set((s.paused > 0) as i64);
        self.metrics.assigned.set(s.assigned as i64);
        self.metrics.stopped.set(s.stopped as i64);
        self.metrics
            .dropped
            .inc_by(s.dropped_messages.saturating_sub(self.dropped_reported));
        self.dropped_reported = s.dropped_messages;
        let ready = self.machine.is_ready();
        self.health.ready.store(ready, Ordering::Relaxed);
    }

    /// Every 2 s: every partition's stored position (Postgres) and high watermark (Kafka), for
    /// the lag gauges and for the core's orphan check.
    fn spawn_group_watch(
        &self,
        views: mpsc::Sender<Vec<PartitionLag>>,
    ) -> tokio::task::JoinHandle<()> {
        let consumer = self.source.consumer().clone();
        let topics = self.source.topics().clone();
        let metrics = self.metrics.clone();
        let pool = self.pool.clone();
        let name = self.settings.name().to_string();
        let deadline = self.settings.statement_timeout + self.settings.connect_timeout;
        let every = self.machine.config().view_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let stored = async {
                    let turn = pool.wait_turn().await;
                    let conn = pool.open(turn?).await?;
                    let mut stored = BTreeMap::new();
                    for topic in topics.names() {
                        for (kafka, at) in pg::positions(conn.client(), &name, topic).await? {
                            if let Some(p) = topics.number(topic, kafka) {
                                stored.insert(p, at);
                            }
                        }
                    }
                    conn.release();
                    Ok::<_, PgFailure>(stored)
                };
                let Ok(Ok(stored)) = tokio::time::timeout(deadline, stored).await else {
                    continue;
                };
                let (consumer, topics) = (consumer.clone(), topics.clone());
                let view = tokio::task::spawn_blocking(move || {
                    let mut view = Vec::new();
                    for topic in topics.names() {
                        let metadata = consumer
                            .fetch_metadata(Some(topic), Duration::from_secs(2))
                            .ok()?;
                        let partitions: Vec<i32> = metadata
                            .topics()
                            .iter()
                            .filter(|t| t.name() == topic)
                            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                            .collect();
                        for kafka in partitions {
                            let Some(p) = topics.number(topic, kafka) else {
                                continue;
                            };
                            let (_, high) = consumer
                                .fetch_watermarks(topic, kafka, Duration::from_secs(1))
                                .ok()?;
                            view.push(PartitionLag {
                                partition: p,
                                stored: stored.get(&p).copied().unwrap_or(Position::BEGINNING),
                                high_watermark: high,
                            });
                        }
                    }
                    Some((view, topics))
                })
                .await
                .ok()
                .flatten();
                let Some((view, topics)) = view else { continue };
                for lag in &view {
                    let (topic, kafka) = topics.split(lag.partition).unwrap_or_default();
                    metrics
                        .lag_gauge(topic, kafka)
                        .set((lag.high_watermark - lag.stored.offset).max(0));
                }
                let _ = views.try_send(view);
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

/// The `/metrics` page of a consumer that has just started and read the lag of a one-partition
/// topic: every family it exports, each with its HELP and TYPE (what a dashboard or an alert
/// may name).
pub fn fresh_metrics_page() -> Result<String, std::fmt::Error> {
    let m = Metrics::new(&BatcherConfig::default());
    m.lag_gauge("events", 0).set(0);
    m.registry.render()
}

pub(crate) fn new_metrics(capacity: &BatcherConfig) -> Arc<Metrics> {
    Arc::new(Metrics::new(capacity))
}
