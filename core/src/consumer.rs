//! The consumer's whole decision-making, as a sans-IO state machine.
//!
//! The shell (`spillway-consumer`) owns the Kafka thread, the Postgres pool and the timers. It
//! feeds [`ConsumerMachine`] every event with the time it happened, and performs every
//! [`Command`] the machine emits, in order. It decides nothing itself:
//!
//! | event (shell → machine)                         | typical commands (machine → shell)            |
//! |-------------------------------------------------|-----------------------------------------------|
//! | [`on_assigned`](ConsumerMachine::on_assigned)   | [`Command::ReadPositions`], [`KafkaCommand::Pause`] |
//! | [`on_positions`](ConsumerMachine::on_positions) | [`KafkaCommand::Seek`], [`KafkaCommand::Resume`] |
//! | [`on_seek_done`](ConsumerMachine::on_seek_done) / `_failed` | (reading starts) / re-seek later  |
//! | [`on_message`](ConsumerMachine::on_message)     | [`Command::Flush`], [`KafkaCommand::Pause`] when full, a gap report |
//! | [`on_flush_result`](ConsumerMachine::on_flush_result) | [`KafkaCommand::Commit`], retries, a fence re-read |
//! | [`on_revoked`](ConsumerMachine::on_revoked)     | (buffer dropped)                              |
//! | [`on_group_view`](ConsumerMachine::on_group_view) | [`KafkaCommand::Rejoin`] when orphaned, or a partition's owner is gone |
//! | [`on_shutdown`](ConsumerMachine::on_shutdown)   | pauses, final flushes, [`Command::Exit`]      |
//! | [`handle_timeout`](ConsumerMachine::handle_timeout) at [`poll_timeout`](ConsumerMachine::poll_timeout) | due batches, retries |
//!
//! Each partition moves through [`Phase`]s. A partition reads only after a seek (or the
//! assignment's start offset) was *confirmed* by the Kafka side, and only messages tagged with
//! the epoch of that confirmed seek are accepted ([`EpochTags`] is the Kafka side's half of
//! that rule). After a seek to offset X the next accepted message must be at X: any jump forward
//! is a gap, and the partition stops there (reported, never written past).
//!
//! Flow control is per partition, as Kafka's pause is: when the shared buffer refuses a record,
//! every reading partition is paused and will be re-read from its exact next record once the
//! buffer is half empty again. A partition's desired pause state follows its phase, and the
//! machine tells Kafka whenever the two differ, including for a partition assigned while the
//! buffer is full, and on every (re)assignment (a pause can outlive a revocation in librdkafka).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batcher::{
    AfterFlush, Batch, BatchId, Batcher, BatcherConfig, FlushOutcome, KafkaMeta, Push, Record,
};
use crate::envelope::{Envelope, ProducerSequence, RequestId};
use crate::error::ConfigError;
use crate::ledger::{Partition, Position};
use crate::retry::RetryPolicy;

/// Tags the messages of one seek of one partition. A message tagged with another epoch than
/// the partition's current one was fetched before a seek and is never accepted.
pub type Epoch = u64;

/// One known bug the machine can run with, so that a test can prove it notices the bug. The
/// switch that turns one on ([`ConsumerConfig::mutation`]) exists only with the `mutations`
/// feature, which only tests enable: a release build cannot run mutated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The new epoch is published before the seek is done, and a failed seek is ignored.
    EpochBeforeSeek,
    /// A forward jump in a partition's offsets is accepted.
    AcceptGaps,
    /// One global paused flag instead of a pause state per partition.
    GlobalPause,
    /// Batches are written without checking the stored position.
    NoCompareAndSet,
    /// The position is stored in its own transaction, before the rows.
    PositionBeforeRows,
    /// A batch whose flush failed is dropped, and the partition's next flush moves the position
    /// past it, as the original Python consumer did.
    DropFailedBatch,
    /// Kafka's committed offsets are trusted as positions (the shell reads them instead of
    /// Postgres's and commits each batch's end to Kafka, synchronously, when it sends the batch
    /// to Postgres), and batches are written without the compare-and-set.
    CommitKafkaFirst,
    /// A second copy of a message in Kafka is written like any other message.
    WriteCopies,
}

impl Mutation {
    /// Every mutation, with the name `SPILLWAY_SIM_MUTATE` / `SPILLWAY_MUTATE` selects it by.
    pub const ALL: [(&'static str, Mutation); 8] = [
        ("epoch-before-seek", Mutation::EpochBeforeSeek),
        ("accept-gaps", Mutation::AcceptGaps),
        ("global-pause", Mutation::GlobalPause),
        ("no-compare-and-set", Mutation::NoCompareAndSet),
        ("position-before-rows", Mutation::PositionBeforeRows),
        ("drop-failed-batch", Mutation::DropFailedBatch),
        ("commit-kafka-first", Mutation::CommitKafkaFirst),
        ("write-copies", Mutation::WriteCopies),
    ];

    /// The mutation called `name`.
    pub fn parse(name: &str) -> Option<Mutation> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }
}

/// The longest spacing of rejoins that change nothing, in multiples of
/// [`ConsumerConfig::orphan_timeout`] (a power of two).
pub const MAX_REJOIN_BACKOFF: u32 = 8;

/// Settings of the consumer's state machine.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerConfig {
    /// Batching, buffer bounds and flush retries.
    pub batcher: BatcherConfig,
    /// How long a shutdown may spend writing what is buffered.
    pub shutdown_timeout: Duration,
    /// A consumer that owns no partition while a partition has lag and its stored position has
    /// not moved for this long rejoins the group (the broker left that partition unowned);
    /// while rejoining changes nothing, it waits twice as long before each next rejoin, up to
    /// [`MAX_REJOIN_BACKOFF`] times this.
    pub orphan_timeout: Duration,
    /// How often the shell sends a group view ([`ConsumerMachine::on_group_view`]). A gap of
    /// three or more means views were missed (Postgres unreachable): positions are then
    /// watched afresh, since not seen is not standing still.
    pub view_interval: Duration,
    /// A known bug to run with (tests only).
    #[cfg(feature = "mutations")]
    pub mutation: Option<Mutation>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            batcher: BatcherConfig::default(),
            shutdown_timeout: Duration::from_secs(30),
            orphan_timeout: Duration::from_secs(20),
            view_interval: Duration::from_secs(2),
            #[cfg(feature = "mutations")]
            mutation: None,
        }
    }
}

impl ConsumerConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.batcher.validate()?;
        if self.shutdown_timeout.is_zero() {
            return Err(ConfigError::new(
                "shutdown-timeout-ms",
                "must be greater than zero",
            ));
        }
        if self.orphan_timeout.is_zero() {
            return Err(ConfigError::new(
                "orphan-rejoin-ms",
                "must be greater than zero",
            ));
        }
        if self.view_interval.is_zero() {
            return Err(ConfigError::new(
                "view-interval",
                "must be greater than zero",
            ));
        }
        Ok(())
    }

    /// Whether the machine runs with this known bug (never without the `mutations` feature).
    pub fn mutated(&self, m: Mutation) -> bool {
        #[cfg(feature = "mutations")]
        return self.mutation == Some(m);
        #[cfg(not(feature = "mutations"))]
        {
            let _ = m;
            false
        }
    }
}

/// Where a partition stands in the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Assigned; its stored position is being read from Postgres.
    Positioning,
    /// A seek (or the assignment) to the stored or next position was asked with this epoch and
    /// is not confirmed yet.
    Seeking(Epoch),
    /// Reading messages tagged with this epoch, in offset order.
    Reading(Epoch),
    /// A record was refused for lack of room: paused, re-read from its next record when the
    /// buffer is half empty.
    Waiting,
    /// A seek failed: paused, tried again at this time.
    SeekRetry(Instant),
    /// The offsets jumped past a record that was never read: stopped (until the partition is
    /// assigned again, or another writer's commit moves its stored position past the gap).
    Stopped,
}

impl Phase {
    fn wants_fetching(self) -> bool {
        matches!(self, Phase::Seeking(_) | Phase::Reading(_))
    }
}

#[derive(Debug)]
struct PartitionState {
    phase: Phase,
    /// What Kafka was last told: `None` when unknown (just assigned).
    kafka_paused: Option<bool>,
    seek_attempts: u32,
    /// Per producer, the highest sequence among the messages before the partition's next
    /// position (stored ones, then each one pushed whole): a sequenced message at or below it
    /// is a copy.
    producers: BTreeMap<u64, u64>,
}

/// A partition's stored position, and what was stored with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPosition {
    /// Partition.
    pub partition: Partition,
    /// Where its next record is.
    pub position: Position,
    /// Per producer, the highest sequence among the messages before `position`
    /// ([`Batch::producer_sequences`], kept for as long as the store keeps it).
    pub producers: Vec<ProducerSequence>,
}

impl StoredPosition {
    /// A position with nothing else stored (no sequenced message was written before it).
    pub fn new(partition: Partition, position: Position) -> Self {
        StoredPosition {
            partition,
            position,
            producers: Vec::new(),
        }
    }
}

/// A message the Kafka side polled.
#[derive(Debug)]
pub struct Message {
    /// Partition.
    pub partition: Partition,
    /// Offset.
    pub offset: i64,
    /// The epoch [`EpochTags::tag`] gave it when it was polled.
    pub epoch: Epoch,
    /// The payload (`None` for a null message).
    pub payload: Option<Vec<u8>>,
    /// Its key, timestamp and headers, when a column maps them.
    pub kafka: Option<Arc<KafkaMeta>>,
}

/// How a flush went, as the shell classified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushResult {
    /// Rows, dead letters and the new position are committed.
    Written,
    /// The stored position was not the batch's start: nothing was written.
    Fenced,
    /// Nothing was committed (or the commit's fate is unknown); the same batch may succeed later.
    Retriable {
        /// The error.
        reason: String,
    },
    /// The COPY of the rows refused a record; nothing was committed.
    Poison {
        /// The database's message.
        reason: String,
        /// The entry the database named, if any (a hint).
        culprit: Option<usize>,
    },
    /// Some records have a value that does not convert to its column's type (checked before
    /// anything is sent, so nothing was written): each named entry is dead-lettered with its
    /// reason and the rest of the batch is flushed again at once. Unlike a database's culprit,
    /// this is a verdict: the conversion is deterministic.
    Unconvertible {
        /// Indexes into the batch's entries, each with why it does not convert.
        records: Vec<(usize, String)>,
    },
    /// The dead-letter insert failed; nothing was committed. Retried, never dead-letters a
    /// row (the rows were not at fault).
    DeadLettersRejected {
        /// The database's message.
        reason: String,
    },
    /// A configuration problem (permissions, schema): the consumer must stop.
    Fatal {
        /// The database's message.
        reason: String,
    },
}

/// What the group looks like from the outside, per partition of the topic (the shell reads it
/// periodically: stored positions from Postgres, high watermarks from Kafka).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition.
    pub partition: Partition,
    /// Its stored position.
    pub stored: Position,
    /// The offset after its last message.
    pub high_watermark: i64,
}

/// Why the consumer ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown asked and everything buffered is written.
    Drained,
    /// Shutdown asked; these records were not written within the shutdown timeout (they stay in
    /// Kafka after the stored positions).
    ShutdownTimeout {
        /// Records left.
        buffered: usize,
    },
    /// Postgres refused in a way retrying cannot fix.
    Fatal(String),
}

/// Something the shell should log or count; it changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A batch is durable.
    Committed {
        /// Partition.
        partition: Partition,
        /// Its new position.
        position: Position,
        /// Rows written.
        rows: usize,
        /// Records dead-lettered.
        dead_letters: usize,
        /// Copies of messages already written, skipped (a producer's client stored them twice).
        copies: usize,
    },
    /// A flush failed and will be retried.
    Retrying {
        /// Partition.
        partition: Partition,
        /// The failed try (1 = first).
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// The dead-letter insert keeps failing: the batch waits (error level).
    DeadLettersRejected {
        /// Partition.
        partition: Partition,
        /// The failed try.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// Another consumer moved the position: the flush wrote nothing, and the partition (if
    /// still owned) is re-read from the stored position.
    Fenced {
        /// Partition.
        partition: Partition,
    },
    /// The offsets jumped: the partition stopped (error level).
    Gap {
        /// Partition.
        partition: Partition,
        /// The offset the next message had to have.
        expected: i64,
        /// The offset it had.
        got: i64,
    },
    /// A partition stopped at a gap was written past it by someone else (a zombie's or a hung
    /// transaction's late commit held the missing records): it is read afresh from there.
    GapClosed {
        /// Partition.
        partition: Partition,
        /// Its stored position now.
        stored: Position,
    },
    /// The buffer is full: reading partitions are paused.
    BufferFull {
        /// Records buffered.
        records: usize,
        /// Bytes buffered.
        bytes: usize,
    },
    /// The buffer is half empty: waiting partitions are re-read.
    Resuming {
        /// Records buffered.
        records: usize,
    },
    /// A partition was revoked.
    Revoked {
        /// Partition.
        partition: Partition,
        /// Buffered records dropped (the next owner reads them again).
        dropped: usize,
    },
    /// A seek failed and will be tried again.
    SeekFailed {
        /// Partition.
        partition: Partition,
        /// Why.
        reason: String,
    },
    /// The stored positions could not be read; tried again.
    PositionsUnavailable {
        /// Why.
        reason: String,
    },
    /// Partitions with lag nobody writes while this consumer owns none: rejoining the group.
    Orphaned {
        /// Those partitions.
        partitions: Vec<Partition>,
    },
    /// Partitions of other members with lag nobody writes while Postgres answers: their owner
    /// is gone but still holds them (a broker that kept a dead member's assignment), so this
    /// consumer rejoins the group to have them assigned again.
    Unowned {
        /// Those partitions.
        partitions: Vec<Partition>,
    },
    /// Shutdown started.
    Draining {
        /// Records buffered.
        buffered: usize,
    },
}

/// What the Kafka side (the thread that polls the group consumer) must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KafkaCommand {
    /// Make the partition's next message the one at `offset`, tagged `epoch`; report with
    /// `on_seek_done` or `on_seek_failed`. For a partition whose assignment is pending, this is
    /// its start offset.
    Seek {
        /// Partition.
        partition: Partition,
        /// Offset.
        offset: i64,
        /// The epoch its messages carry once done.
        epoch: Epoch,
    },
    /// Stop fetching the partition.
    Pause(Partition),
    /// Fetch the partition again.
    Resume(Partition),
    /// Commit this next-offset to the group (for lag tools; Postgres holds the truth).
    Commit {
        /// Partition.
        partition: Partition,
        /// Offset.
        offset: i64,
    },
    /// Leave and join the group again.
    Rejoin,
}

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Command {
    /// Read the stored positions of these partitions and report them with
    /// [`ConsumerMachine::on_positions`] (or `on_positions_failed`).
    ReadPositions(Vec<Partition>),
    /// Tell the Kafka side.
    Kafka(KafkaCommand),
    /// Write the batch in one transaction; report with `on_flush_result`.
    Flush(Arc<Batch>),
    /// Log or count this.
    Notice(Notice),
    /// Stop; nothing more will be asked.
    Exit(Exit),
}

/// Gauges of the machine, and the one counter no notice reports (the rest the shell counts from
/// [`Notice`]s).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Records buffered (pending, queued and in flight).
    pub buffered_records: usize,
    /// Bytes buffered.
    pub buffered_bytes: usize,
    /// Current adaptive batch size.
    pub target_batch_records: usize,
    /// Partitions owned (any phase).
    pub assigned: usize,
    /// Partitions paused in Kafka.
    pub paused: usize,
    /// Partitions stopped at a gap.
    pub stopped: usize,
    /// Messages dropped: fetched before a seek, or while the partition waited for room.
    pub dropped_messages: u64,
}

/// The consumer's state machine. See the module documentation.
#[derive(Debug)]
pub struct ConsumerMachine {
    config: ConsumerConfig,
    batcher: Batcher,
    partitions: BTreeMap<Partition, PartitionState>,
    in_flight: BTreeMap<BatchId, Arc<Batch>>,
    commands: VecDeque<Command>,
    next_epoch: Epoch,
    retry: RetryPolicy,
    positions_retry: Option<(Instant, u32)>,
    full: bool,
    /// With the `global-pause` mutation: the one flag that replaces per-partition state.
    global_paused: bool,
    draining_until: Option<Instant>,
    exited: bool,
    /// Per partition of the topic: the stored position last seen and since when.
    watch: BTreeMap<Partition, (Position, Instant)>,
    orphaned: Vec<Partition>,
    next_rejoin: Option<Instant>,
    /// Rejoins since the last view with nothing stalled: each one waits
    /// twice as long as the one before (up to [`MAX_REJOIN_BACKOFF`] times `orphan_timeout`),
    /// so a rejoin never interrupts the rebalance the one before started.
    rejoins_in_a_row: u32,
    /// When the last group view came (views need Postgres: none come while it is down).
    last_view: Option<Instant>,
    stats: ConsumerStats,
    /// With the `drop-failed-batch` mutation: where each partition's dropped rows started.
    dropped_starts: BTreeMap<Partition, Position>,
    /// With the `drop-failed-batch` mutation: the real start of batches sent with another.
    mutated_starts: BTreeMap<BatchId, Position>,
}

impl ConsumerMachine {
    /// A machine that owns no partition yet.
    pub fn new(config: ConsumerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let batcher = Batcher::new(config.batcher.clone())?;
        let retry = RetryPolicy::new(config.batcher.retry.clone());
        Ok(ConsumerMachine {
            config,
            batcher,
            partitions: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            commands: VecDeque::new(),
            next_epoch: 1,
            retry,
            positions_retry: None,
            full: false,
            global_paused: false,
            draining_until: None,
            exited: false,
            watch: BTreeMap::new(),
            orphaned: Vec::new(),
            last_view: None,
            next_rejoin: None,
            rejoins_in_a_row: 0,
            stats: ConsumerStats::default(),
            dropped_starts: BTreeMap::new(),
            mutated_starts: BTreeMap::new(),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// The next command to perform, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`ConsumerMachine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.exited {
            return None;
        }
        let seeks = self.partitions.values().filter_map(|s| match s.phase {
            Phase::SeekRetry(at) => Some(at),
            _ => None,
        });
        [
            self.batcher.poll_timeout(),
            self.positions_retry.map(|(at, _)| at),
            self.draining_until,
        ]
        .into_iter()
        .flatten()
        .chain(seeks)
        .min()
    }

    /// Time passed: emits due batches, retries seeks and position reads, ends a shutdown that
    /// ran out of time.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.exited {
            return;
        }
        if let Some((at, _)) = self.positions_retry {
            if at <= now {
                self.positions_retry = None;
                let waiting: Vec<Partition> = self
                    .partitions
                    .iter()
                    .filter(|(_, s)| s.phase == Phase::Positioning)
                    .map(|(p, _)| *p)
                    .collect();
                if !waiting.is_empty() {
                    self.commands.push_back(Command::ReadPositions(waiting));
                }
            }
        }
        let due: Vec<Partition> = self
            .partitions
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::SeekRetry(at) if at <= now))
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.seek_to_next(p);
        }
        self.settle(now);
    }

    /// The group gave this consumer `partitions` (added to what it owns). Their stored
    /// positions must be read before anything is read from them.
    pub fn on_assigned(&mut self, partitions: &[Partition], now: Instant) {
        if self.exited {
            return;
        }
        let mut read = Vec::new();
        for &p in partitions {
            self.batcher.revoke(p);
            self.partitions.insert(
                p,
                PartitionState {
                    phase: Phase::Positioning,
                    kafka_paused: None,
                    seek_attempts: 0,
                    producers: BTreeMap::new(),
                },
            );
            self.sync_pause(p);
            read.push(p);
        }
        if !read.is_empty() && self.draining_until.is_none() {
            self.commands.push_back(Command::ReadPositions(read));
        }
        self.orphaned.clear();
        self.settle(now);
    }

    /// The stored positions were read.
    pub fn on_positions(&mut self, positions: &[StoredPosition], now: Instant) {
        if self.exited {
            return;
        }
        for stored in positions {
            let (p, at) = (stored.partition, stored.position);
            let Some(state) = self.partitions.get_mut(&p) else {
                continue;
            };
            if state.phase != Phase::Positioning {
                continue;
            }
            state.producers = stored
                .producers
                .iter()
                .map(|at| (at.producer, at.sequence))
                .collect();
            self.batcher.assign(p, at);
            let epoch = self.new_epoch();
            // Kafka needs a start offset now (the assignment may be waiting for it); a
            // partition with no room waits, and is sought again with a new epoch later.
            self.kafka(KafkaCommand::Seek {
                partition: p,
                offset: at.kafka_offset(),
                epoch,
            });
            let phase = if self.full || self.draining_until.is_some() {
                Phase::Waiting
            } else {
                Phase::Seeking(epoch)
            };
            self.set_phase(p, phase);
        }
        self.settle(now);
    }

    /// The stored positions could not be read.
    pub fn on_positions_failed(&mut self, reason: String, fatal: bool, now: Instant) {
        if self.exited {
            return;
        }
        if fatal {
            self.exit(Exit::Fatal(reason));
            return;
        }
        let attempt = self.positions_retry.map_or(1, |(_, a)| a + 1);
        let at = now + self.retry.delay(attempt);
        self.positions_retry = Some((at, attempt));
        self.notice(Notice::PositionsUnavailable { reason });
    }

    /// The Kafka side confirmed a seek: messages tagged `epoch` start at the sought offset.
    pub fn on_seek_done(&mut self, partition: Partition, epoch: Epoch, now: Instant) {
        if let Some(s) = self.partitions.get_mut(&partition) {
            if s.phase == Phase::Seeking(epoch) {
                s.phase = Phase::Reading(epoch);
                s.seek_attempts = 0;
            }
        }
        self.settle(now);
    }

    /// A seek failed: the partition's messages would not start at the sought offset.
    pub fn on_seek_failed(
        &mut self,
        partition: Partition,
        epoch: Epoch,
        reason: String,
        now: Instant,
    ) {
        if self.config.mutated(Mutation::EpochBeforeSeek) {
            return;
        }
        let Some(s) = self.partitions.get_mut(&partition) else {
            return;
        };
        if s.phase != Phase::Seeking(epoch) {
            return;
        }
        s.seek_attempts += 1;
        let at = now + self.retry.delay(s.seek_attempts);
        self.set_phase(partition, Phase::SeekRetry(at));
        self.notice(Notice::SeekFailed { partition, reason });
        self.settle(now);
    }

    /// The group took these partitions away. Their buffered records are dropped (the next owner
    /// reads them again); a flush in flight comes back stale.
    pub fn on_revoked(&mut self, partitions: &[Partition], now: Instant) {
        for &p in partitions {
            if self.partitions.remove(&p).is_none() {
                continue;
            }
            let dropped = self.batcher.revoke(p);
            self.notice(Notice::Revoked {
                partition: p,
                dropped,
            });
        }
        self.settle(now);
    }

    /// A message polled from Kafka.
    pub fn on_message(&mut self, message: Message, now: Instant) {
        if self.exited {
            return;
        }
        let p = message.partition;
        let epoch_ok = match self.partitions.get(&p).map(|s| s.phase) {
            Some(Phase::Reading(e)) => e == message.epoch,
            Some(Phase::Seeking(e)) => {
                e == message.epoch && self.config.mutated(Mutation::EpochBeforeSeek)
            }
            _ => false,
        };
        if !epoch_ok {
            self.stats.dropped_messages += 1;
            return;
        }
        let Some(next) = self.batcher.next_position(p) else {
            self.stats.dropped_messages += 1;
            return;
        };
        if message.offset > next.offset && !self.config.mutated(Mutation::AcceptGaps) {
            self.set_phase(p, Phase::Stopped);
            self.notice(Notice::Gap {
                partition: p,
                expected: next.offset,
                got: message.offset,
            });
            self.settle(now);
            return;
        }
        if message.offset < next.offset {
            // Already buffered or written: delivered again.
            self.stats.dropped_messages += 1;
            return;
        }
        let single = |payload: Vec<u8>| Record {
            partition: p,
            offset: message.offset,
            index: 0,
            last_in_message: true,
            received_at_micros: 0,
            request_id: RequestId::from_u128(0),
            sequenced: false,
            idempotency_key: None,
            kafka: None,
            payload,
        };
        let decoded = message.payload.as_deref().map(Envelope::decode);
        let order = match &decoded {
            Some(Ok(env)) => env.producer_sequence(),
            _ => None,
        };
        let copy = order.is_some_and(|at| {
            !self.config.mutated(Mutation::WriteCopies)
                && self.partitions.get(&p).is_some_and(|s| {
                    s.producers
                        .get(&at.producer)
                        .is_some_and(|&high| at.sequence <= high)
                })
        });
        // One entry for a whole envelope, with its id: a batch ending it stores its sequence.
        let whole = |env: &Envelope, payload: Vec<u8>| Record {
            received_at_micros: env.received_at_micros,
            request_id: env.request_id,
            sequenced: env.sequenced,
            idempotency_key: env.idempotency_key.map(Arc::from),
            ..single(payload)
        };
        let pushed = match decoded {
            Some(Ok(env)) if copy => self.batcher.push_copy(whole(&env, Vec::new()), now),
            Some(Ok(env)) if env.records.is_empty() => self.batcher.push_dead_letter(
                whole(&env, message.payload.clone().unwrap_or_default()),
                "an envelope with no records".into(),
                now,
            ),
            Some(Ok(env)) => {
                let n = env.records.len();
                let key: Option<Arc<str>> = env.idempotency_key.map(Arc::from);
                let mut last = Push::Accepted;
                for (i, r) in env.records.iter().enumerate() {
                    let record = Record {
                        partition: p,
                        offset: message.offset,
                        index: i as u32,
                        last_in_message: i + 1 == n,
                        received_at_micros: env.received_at_micros,
                        request_id: env.request_id,
                        sequenced: env.sequenced,
                        idempotency_key: key.clone(),
                        kafka: message.kafka.clone(),
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
                single(Vec::new()),
                "empty (null) Kafka message".into(),
                now,
            ),
        };
        match pushed {
            Push::Full(_) => self.buffer_full(p),
            Push::Accepted | Push::Skipped => {
                // The whole message is buffered (or was written before): later messages of
                // its producer at or below its sequence are copies.
                if let (Some(at), Some(s)) = (order, self.partitions.get_mut(&p)) {
                    at.raise(&mut s.producers);
                }
            }
            Push::Unassigned(_) => {}
        }
        self.settle(now);
    }

    /// A flush came back.
    pub fn on_flush_result(&mut self, id: BatchId, result: FlushResult, now: Instant) {
        if self.exited {
            return;
        }
        let Some(batch) = self.in_flight.remove(&id) else {
            return;
        };
        let mut batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        // What this flush's compare-and-set expected (another start only under a mutation).
        let sent_start = batch.start;
        if let Some(start) = self.mutated_starts.remove(&id) {
            batch.start = start;
        }
        let partition = batch.partition;
        if result == FlushResult::Fenced {
            // Counted here, not after the batcher: a flush the database refused is fenced even
            // when its partition was revoked meanwhile (a zombie's late flush).
            self.notice(Notice::Fenced { partition });
        }
        let outcome = match result {
            FlushResult::Written => FlushOutcome::Written,
            FlushResult::Fenced => FlushOutcome::Fenced,
            FlushResult::Retriable { reason } => {
                if self.config.mutated(Mutation::DropFailedBatch) {
                    // The rows are dropped; the partition's next flush moves the position from
                    // this batch's start, past them.
                    self.dropped_starts.entry(partition).or_insert(sent_start);
                    FlushOutcome::Written
                } else {
                    FlushOutcome::Retriable { reason }
                }
            }
            FlushResult::Poison { reason, culprit } => FlushOutcome::Poison { reason, culprit },
            FlushResult::Unconvertible { records } => FlushOutcome::Unconvertible { records },
            FlushResult::DeadLettersRejected { reason } => {
                self.notice(Notice::DeadLettersRejected {
                    partition,
                    attempt: batch.attempt,
                    reason: reason.clone(),
                });
                FlushOutcome::Retriable { reason }
            }
            FlushResult::Fatal { reason } => {
                self.exit(Exit::Fatal(reason));
                return;
            }
        };
        let reason = match &outcome {
            FlushOutcome::Retriable { reason } => Some(reason.clone()),
            _ => None,
        };
        match self.batcher.on_flush_result(batch, outcome, now) {
            AfterFlush::Committed {
                partition,
                position,
                rows,
                dead_letters,
                copies,
            } => {
                self.notice(Notice::Committed {
                    partition,
                    position,
                    rows,
                    dead_letters,
                    copies,
                });
                if !self.config.mutated(Mutation::CommitKafkaFirst) {
                    self.kafka(KafkaCommand::Commit {
                        partition,
                        offset: position.kafka_offset(),
                    });
                }
            }
            AfterFlush::RetryAt { attempt, .. } => {
                self.notice(Notice::Retrying {
                    partition,
                    attempt,
                    reason: reason.unwrap_or_default(),
                });
            }
            AfterFlush::Isolating | AfterFlush::Stale => {}
            AfterFlush::Fenced { partition } => self.reposition(partition),
        }
        self.settle(now);
    }

    /// The group seen from outside (every partition's stored position, read from Postgres, and
    /// high watermark). A partition that has lag and whose stored position did not move for
    /// `orphan_timeout` is written by nobody. A consumer that owns nothing then rejoins the
    /// group (it is orphaned, and not ready); so does a consumer that owns other partitions
    /// (their owner is gone but still holds them: a broker that kept a dead member's
    /// assignment). At most one rejoin per `orphan_timeout`, backing off to one per
    /// `MAX_REJOIN_BACKOFF` times that while partitions stay stalled (the count starts again
    /// once a view shows none). After three `view_interval`s without a view (Postgres
    /// unreachable), positions are watched afresh: not seen is not standing still.
    pub fn on_group_view(&mut self, view: &[PartitionLag], now: Instant) {
        if self.exited {
            return;
        }
        let resumed = self.last_view.is_some_and(|t| {
            now.saturating_duration_since(t) >= self.config.view_interval.saturating_mul(3)
        });
        self.last_view = Some(now);
        let mut stalled = Vec::new();
        for lag in view {
            self.reopen_if_written_past(lag.partition, lag.stored);
            let since = match self.watch.get(&lag.partition) {
                Some((pos, since)) if *pos == lag.stored && !resumed => *since,
                _ => now,
            };
            self.watch.insert(lag.partition, (lag.stored, since));
            let behind = lag.high_watermark > lag.stored.offset;
            if behind && now.saturating_duration_since(since) >= self.config.orphan_timeout {
                stalled.push(lag.partition);
            }
        }
        let draining = self.draining_until.is_some();
        let idle = self.partitions.is_empty() && !draining;
        self.orphaned = if idle { stalled.clone() } else { Vec::new() };
        let unowned: Vec<Partition> = if idle || draining {
            Vec::new()
        } else {
            stalled
                .into_iter()
                .filter(|p| !self.partitions.contains_key(p))
                .collect()
        };
        if self.orphaned.is_empty() && unowned.is_empty() {
            self.rejoins_in_a_row = 0;
        } else if self.next_rejoin.is_none_or(|t| t <= now) {
            let backoff = 1u32
                << self
                    .rejoins_in_a_row
                    .min(MAX_REJOIN_BACKOFF.trailing_zeros());
            self.rejoins_in_a_row = self.rejoins_in_a_row.saturating_add(1);
            self.next_rejoin = Some(now + self.config.orphan_timeout.saturating_mul(backoff));
            let notice = if idle {
                Notice::Orphaned {
                    partitions: self.orphaned.clone(),
                }
            } else {
                Notice::Unowned {
                    partitions: unowned,
                }
            };
            self.notice(notice);
            self.kafka(KafkaCommand::Rejoin);
        }
    }

    /// A partition stopped at a gap (Phase::Stopped) whose stored position is now past the
    /// next record this consumer holds: someone else wrote the missing records, so the gap is
    /// gone. What it buffered before the gap is stale (any flush of it would be fenced): it is
    /// dropped and the partition read afresh from its stored position, as after a fence.
    fn reopen_if_written_past(&mut self, partition: Partition, stored: Position) {
        let stopped = self
            .partitions
            .get(&partition)
            .is_some_and(|s| s.phase == Phase::Stopped);
        let passed = self
            .batcher
            .next_position(partition)
            .is_some_and(|next| stored > next);
        if !(stopped && passed) {
            return;
        }
        self.batcher.revoke(partition);
        self.reposition(partition);
        self.notice(Notice::GapClosed { partition, stored });
    }

    /// Reads the partition's stored position again (paused meanwhile): after a fence, or a gap
    /// someone else wrote past.
    fn reposition(&mut self, partition: Partition) {
        if let Some(s) = self.partitions.get_mut(&partition) {
            s.phase = Phase::Positioning;
        }
        self.sync_pause(partition);
        if self.draining_until.is_none() {
            self.commands
                .push_back(Command::ReadPositions(vec![partition]));
        }
    }

    /// Stop reading, write what is buffered, then exit (or exit at the shutdown timeout).
    pub fn on_shutdown(&mut self, now: Instant) {
        if self.exited || self.draining_until.is_some() {
            return;
        }
        self.draining_until = Some(now + self.config.shutdown_timeout);
        self.batcher.set_draining(true);
        self.notice(Notice::Draining {
            buffered: self.batcher.stats().buffered_records,
        });
        let all: Vec<Partition> = self.partitions.keys().copied().collect();
        for p in all {
            self.set_phase(p, Phase::Waiting);
        }
        self.settle(now);
    }

    /// Whether the consumer does its job: it is not stopping, and it does not sit idle while
    /// partitions nobody writes have lag.
    pub fn is_ready(&self) -> bool {
        !self.exited && self.draining_until.is_none() && self.orphaned.is_empty()
    }

    /// A partition's phase.
    pub fn phase(&self, partition: Partition) -> Option<Phase> {
        self.partitions.get(&partition).map(|s| s.phase)
    }

    /// The partitions owned, in order.
    pub fn assigned(&self) -> impl Iterator<Item = Partition> + '_ {
        self.partitions.keys().copied()
    }

    /// Whether the machine has exited.
    pub fn has_exited(&self) -> bool {
        self.exited
    }

    /// Counters and gauges.
    pub fn stats(&self) -> ConsumerStats {
        let b = self.batcher.stats();
        ConsumerStats {
            buffered_records: b.buffered_records,
            buffered_bytes: b.buffered_bytes,
            target_batch_records: b.target_batch_records,
            assigned: self.partitions.len(),
            paused: self
                .partitions
                .values()
                .filter(|s| s.kafka_paused == Some(true))
                .count(),
            stopped: self
                .partitions
                .values()
                .filter(|s| s.phase == Phase::Stopped)
                .count(),
            ..self.stats.clone()
        }
    }

    fn new_epoch(&mut self) -> Epoch {
        let e = self.next_epoch;
        self.next_epoch += 1;
        e
    }

    fn kafka(&mut self, k: KafkaCommand) {
        self.commands.push_back(Command::Kafka(k));
    }

    fn notice(&mut self, n: Notice) {
        self.commands.push_back(Command::Notice(n));
    }

    fn exit(&mut self, why: Exit) {
        if !self.exited {
            self.exited = true;
            self.commands.push_back(Command::Exit(why));
        }
    }

    /// Every reading partition waits for room; the one that was refused re-reads from its
    /// refused record.
    fn buffer_full(&mut self, refused: Partition) {
        if !self.full {
            let s = self.batcher.stats();
            self.notice(Notice::BufferFull {
                records: s.buffered_records,
                bytes: s.buffered_bytes,
            });
        }
        self.full = true;
        if self.config.mutated(Mutation::GlobalPause) {
            self.global_pause();
            self.set_phase(refused, Phase::Waiting);
            return;
        }
        let reading: Vec<Partition> = self
            .partitions
            .iter()
            .filter(|(p, s)| **p == refused || s.phase.wants_fetching())
            .map(|(p, _)| *p)
            .collect();
        for p in reading {
            self.set_phase(p, Phase::Waiting);
        }
    }

    /// The bug this machine exists to avoid: one flag, pausing what is assigned now.
    fn global_pause(&mut self) {
        if !self.global_paused {
            self.global_paused = true;
            let all: Vec<Partition> = self.partitions.keys().copied().collect();
            for p in all {
                self.kafka(KafkaCommand::Pause(p));
            }
        }
        let reading: Vec<Partition> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.phase.wants_fetching())
            .map(|(p, _)| *p)
            .collect();
        for p in reading {
            if let Some(s) = self.partitions.get_mut(&p) {
                s.phase = Phase::Waiting;
            }
        }
    }

    fn set_phase(&mut self, p: Partition, phase: Phase) {
        if let Some(s) = self.partitions.get_mut(&p) {
            s.phase = phase;
        }
        self.sync_pause(p);
    }

    /// Tells Kafka to pause or resume `p` when its phase wants otherwise than Kafka was told.
    fn sync_pause(&mut self, p: Partition) {
        if self.config.mutated(Mutation::GlobalPause) {
            return;
        }
        let Some(s) = self.partitions.get_mut(&p) else {
            return;
        };
        let paused = !s.phase.wants_fetching();
        if s.kafka_paused != Some(paused) {
            s.kafka_paused = Some(paused);
            self.kafka(if paused {
                KafkaCommand::Pause(p)
            } else {
                KafkaCommand::Resume(p)
            });
        }
    }

    /// Re-reads `p` from the next record it needs, with a new epoch.
    fn seek_to_next(&mut self, p: Partition) {
        let Some(next) = self.batcher.next_position(p) else {
            return;
        };
        let epoch = self.new_epoch();
        self.kafka(KafkaCommand::Seek {
            partition: p,
            offset: next.kafka_offset(),
            epoch,
        });
        let confirmed_at_once = self.config.mutated(Mutation::EpochBeforeSeek);
        self.set_phase(
            p,
            if confirmed_at_once {
                Phase::Reading(epoch)
            } else {
                Phase::Seeking(epoch)
            },
        );
    }

    /// After every event: resume when there is room, emit due batches, finish a drain.
    fn settle(&mut self, now: Instant) {
        if self.exited {
            return;
        }
        self.relieve();
        while let Some(batch) = self.batcher.poll_batch(now) {
            let batch = self.mutate_batch(batch);
            let batch = Arc::new(batch);
            self.in_flight.insert(batch.id, batch.clone());
            let (partition, end) = (batch.partition, batch.end);
            self.commands.push_back(Command::Flush(batch));
            if self.config.mutated(Mutation::CommitKafkaFirst) {
                self.kafka(KafkaCommand::Commit {
                    partition,
                    offset: end.kafka_offset(),
                });
            }
        }
        if let Some(until) = self.draining_until {
            if self.batcher.is_empty() && self.in_flight.is_empty() {
                self.exit(Exit::Drained);
            } else if now >= until {
                let buffered = self.batcher.stats().buffered_records;
                self.exit(Exit::ShutdownTimeout { buffered });
            }
        }
    }

    fn mutate_batch(&mut self, mut batch: Batch) -> Batch {
        if let Some(start) = self.dropped_starts.remove(&batch.partition) {
            self.mutated_starts.insert(batch.id, batch.start);
            batch.start = start;
        }
        if self.config.mutated(Mutation::NoCompareAndSet)
            || self.config.mutated(Mutation::CommitKafkaFirst)
        {
            batch.check_start = false;
        }
        if self.config.mutated(Mutation::PositionBeforeRows) {
            batch.position_with_rows = false;
        }
        batch
    }

    /// Once the buffer is half empty, every waiting partition is re-read from its next record.
    fn relieve(&mut self) {
        if !self.full || self.draining_until.is_some() {
            return;
        }
        let s = self.batcher.stats();
        let cfg = self.batcher.config();
        if s.buffered_records > cfg.capacity_records / 2
            || s.buffered_bytes > cfg.capacity_bytes / 2
        {
            return;
        }
        self.full = false;
        self.notice(Notice::Resuming {
            records: s.buffered_records,
        });
        let waiting: Vec<Partition> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.phase == Phase::Waiting)
            .map(|(p, _)| *p)
            .collect();
        for p in waiting {
            self.seek_to_next(p);
        }
        if self.config.mutated(Mutation::GlobalPause) && self.global_paused {
            self.global_paused = false;
            let all: Vec<Partition> = self.partitions.keys().copied().collect();
            for p in all {
                self.kafka(KafkaCommand::Resume(p));
            }
        }
    }
}

/// The Kafka side's half of the epoch rule: a message is tagged with the epoch of the last seek
/// that *succeeded* on its partition, so a failed seek can never make stale messages look new.
#[derive(Debug, Default)]
pub struct EpochTags {
    current: BTreeMap<Partition, Epoch>,
    publish_before_seek: bool,
}

impl EpochTags {
    /// Tags for a consumer configured with `config`.
    pub fn new(config: &ConsumerConfig) -> Self {
        EpochTags {
            current: BTreeMap::new(),
            publish_before_seek: config.mutated(Mutation::EpochBeforeSeek),
        }
    }

    /// A seek with `epoch` is about to be tried.
    pub fn seeking(&mut self, partition: Partition, epoch: Epoch) {
        if self.publish_before_seek {
            self.current.insert(partition, epoch);
        }
    }

    /// The seek with `epoch` succeeded: messages polled from now on carry it.
    pub fn sought(&mut self, partition: Partition, epoch: Epoch) {
        self.current.insert(partition, epoch);
    }

    /// The partition left the assignment.
    pub fn forget(&mut self, partition: Partition) {
        self.current.remove(&partition);
    }

    /// The tag for a message of `partition` polled now (0: no seek succeeded, never accepted).
    pub fn tag(&self, partition: Partition) -> Epoch {
        self.current.get(&partition).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RequestId;

    fn reading(m: &mut ConsumerMachine, p: Partition, now: Instant) -> Epoch {
        m.on_assigned(&[p], now);
        m.on_positions(&[StoredPosition::new(p, Position::BEGINNING)], now);
        let mut epoch = 0;
        while let Some(c) = m.poll_command() {
            if let Command::Kafka(KafkaCommand::Seek { epoch: e, .. }) = c {
                epoch = e;
            }
        }
        m.on_seek_done(p, epoch, now);
        epoch
    }

    fn envelope(records: &[&[u8]]) -> Vec<u8> {
        Envelope {
            received_at_micros: 1,
            request_id: RequestId::from_u128(1),
            sequenced: false,
            idempotency_key: None,
            source: None,
            records: records.to_vec(),
        }
        .encode()
    }

    fn sequenced(producer: u64, sequence: u64, records: &[&[u8]]) -> Vec<u8> {
        Envelope {
            received_at_micros: 1,
            request_id: RequestId::sequenced(ProducerSequence { producer, sequence }),
            sequenced: true,
            idempotency_key: None,
            source: None,
            records: records.to_vec(),
        }
        .encode()
    }

    /// Feeds partition 0's messages from `offset` on, then shuts down: the batch it flushes.
    fn flushed(
        m: &mut ConsumerMachine,
        epoch: Epoch,
        offset: i64,
        payloads: Vec<Vec<u8>>,
    ) -> Batch {
        let now = Instant::now();
        for (i, payload) in payloads.into_iter().enumerate() {
            m.on_message(
                Message {
                    partition: 0,
                    offset: offset + i as i64,
                    epoch,
                    kafka: None,
                    payload: Some(payload),
                },
                now,
            );
        }
        m.on_shutdown(now);
        let batch = std::iter::from_fn(|| m.poll_command()).find_map(|c| match c {
            Command::Flush(b) => Some(b),
            _ => None,
        });
        Arc::unwrap_or_clone(batch.expect("a batch at shutdown"))
    }

    /// A second copy of a message (same producer, a sequence the partition already passed) is
    /// one entry written nowhere that moves the position past it; another producer's lower
    /// sequence is not a copy. The batch stores each producer's highest sequence.
    #[test]
    fn a_copy_is_written_nowhere_and_the_batch_stores_each_producers_highest_sequence() {
        let mut m = ConsumerMachine::new(ConsumerConfig::default()).unwrap();
        let epoch = reading(&mut m, 0, Instant::now());
        let batch = flushed(
            &mut m,
            epoch,
            0,
            vec![
                sequenced(7, 0, &[b"1", b"2"]),
                sequenced(7, 1, &[b"3"]),
                sequenced(7, 0, &[b"1", b"2"]),
                sequenced(9, 0, &[b"4"]),
            ],
        );
        let rows: Vec<&[u8]> = batch.rows().map(|r| r.payload.as_slice()).collect();
        assert_eq!(rows, [b"1", b"2", b"3", b"4"]);
        assert_eq!(batch.copy_count(), 1);
        assert!(batch.entries[3].copy && batch.entries[3].record.offset == 2);
        assert_eq!(batch.dead_letters().count(), 0);
        assert_eq!(batch.end, Position::new(4, 0));
        let high = |producer, sequence| ProducerSequence { producer, sequence };
        assert_eq!(batch.producer_sequences(), [high(7, 1), high(9, 0)]);
    }

    /// What was stored with the position decides: a message the store has as written is a
    /// copy, one whose first record only was written is read on from its second, not skipped.
    #[test]
    fn the_stored_sequences_decide_and_a_partly_written_message_is_not_a_copy() {
        let now = Instant::now();
        let start = |position: Position, producers: Vec<ProducerSequence>| {
            let mut m = ConsumerMachine::new(ConsumerConfig::default()).unwrap();
            m.on_assigned(&[0], now);
            m.on_positions(
                &[StoredPosition {
                    partition: 0,
                    position,
                    producers,
                }],
                now,
            );
            let epoch = std::iter::from_fn(|| m.poll_command())
                .find_map(|c| match c {
                    Command::Kafka(KafkaCommand::Seek { epoch, .. }) => Some(epoch),
                    _ => None,
                })
                .unwrap();
            m.on_seek_done(0, epoch, now);
            (m, epoch)
        };
        let at = |sequence| ProducerSequence {
            producer: 7,
            sequence,
        };
        // Stored inside message 5 (its first record written, the message not ended).
        let (mut m, epoch) = start(Position::new(5, 1), vec![at(4)]);
        let batch = flushed(&mut m, epoch, 5, vec![sequenced(7, 5, &[b"1", b"2"])]);
        let rows: Vec<&[u8]> = batch.rows().map(|r| r.payload.as_slice()).collect();
        assert_eq!(rows, [b"2"]);
        assert_eq!(batch.producer_sequences(), [at(5)]);
        // Stored after message 5: a later message carrying sequence 5 again is a copy.
        let (mut m, epoch) = start(Position::new(6, 0), vec![at(5)]);
        let batch = flushed(
            &mut m,
            epoch,
            6,
            vec![sequenced(7, 5, &[b"1", b"2"]), sequenced(7, 6, &[b"3"])],
        );
        let rows: Vec<&[u8]> = batch.rows().map(|r| r.payload.as_slice()).collect();
        assert_eq!((rows, batch.copy_count()), (vec![&b"3"[..]], 1));
    }

    /// An envelope with no records is dead-lettered in its place, so the next message is not
    /// taken for a gap.
    #[test]
    fn an_envelope_with_no_records_is_a_dead_letter_not_a_gap() {
        let now = Instant::now();
        let mut m = ConsumerMachine::new(ConsumerConfig::default()).unwrap();
        let epoch = reading(&mut m, 0, now);
        for (offset, records) in [(0, vec![]), (1, vec![&b"{}"[..]])] {
            m.on_message(
                Message {
                    partition: 0,
                    offset,
                    epoch,
                    kafka: None,
                    payload: Some(envelope(&records)),
                },
                now,
            );
        }
        m.on_shutdown(now);
        let mut batch = None;
        while let Some(c) = m.poll_command() {
            match c {
                Command::Notice(Notice::Gap { .. }) => panic!("an empty envelope is not a gap"),
                Command::Flush(b) => batch = Some(b),
                _ => {}
            }
        }
        let batch = batch.expect("a batch at shutdown");
        assert_eq!(batch.entries.len(), 2);
        assert!(batch.entries[0].dead_reason.is_some());
        assert!(batch.entries[1].dead_reason.is_none());
        assert_eq!(batch.end, Position::new(2, 0));
    }

    /// A consumer that owns nothing while a partition has lag nobody writes rejoins after
    /// `orphan_timeout`, then at 2, 4, 8 and 8 times that while it stays stalled; a view with
    /// nothing stalled starts the count again. Views every `view_interval` keep the watch (a
    /// short `orphan_timeout` still rejoins); a gap of three views starts it afresh.
    #[test]
    fn rejoins_back_off_while_nothing_changes_and_start_again_once_it_does() {
        let start = Instant::now();
        let config = ConsumerConfig {
            orphan_timeout: Duration::from_secs(1),
            ..ConsumerConfig::default()
        };
        let mut m = ConsumerMachine::new(config).unwrap();
        m.on_assigned(&[], start);
        let lag = |stored: u64| {
            [PartitionLag {
                partition: 0,
                stored: Position::new(stored as i64, 0),
                high_watermark: 100,
            }]
        };
        let mut rejoins = Vec::new();
        let mut t = start;
        let view = |m: &mut ConsumerMachine, t: Instant, stored: u64| {
            m.on_group_view(&lag(stored), t);
            std::iter::from_fn(|| m.poll_command())
                .any(|c| matches!(c, Command::Kafka(KafkaCommand::Rejoin)))
        };
        // Views every 500 ms (under orphan_timeout's 1 s, over nothing): 40 s of them.
        while t < start + Duration::from_secs(40) {
            if view(&mut m, t, 0) {
                rejoins.push(t.duration_since(start).as_millis());
            }
            t += Duration::from_millis(500);
        }
        assert_eq!(rejoins, vec![1000, 2000, 4000, 8000, 16000, 24000, 32000]);
        // The partition moves: the count starts again, and the next stall rejoins after 1 s.
        assert!(!view(&mut m, t, 1));
        let moved = t;
        t += Duration::from_millis(500);
        assert!(!view(&mut m, t, 1));
        t += Duration::from_millis(500);
        assert!(view(&mut m, t, 1));
        assert_eq!(t.duration_since(moved), Duration::from_secs(1));
        // Postgres unreachable for 6 s (three view intervals of 2 s): no view, then a view of
        // the same position is a fresh start, not a stall.
        t += Duration::from_secs(6);
        assert!(!view(&mut m, t, 1));
    }

    /// A machine reading partition 0 from offset 0 that was handed offset 3: stopped at the gap.
    fn stopped_at_a_gap(now: Instant) -> ConsumerMachine {
        let mut m = ConsumerMachine::new(ConsumerConfig::default()).unwrap();
        let epoch = reading(&mut m, 0, now);
        m.on_message(
            Message {
                partition: 0,
                offset: 3,
                epoch,
                kafka: None,
                payload: Some(envelope(&[b"{}"])),
            },
            now,
        );
        assert_eq!(m.phase(0), Some(Phase::Stopped));
        m
    }

    /// A partition stopped at a gap stays stopped while its stored position stands at the gap;
    /// once another writer's late commit moves it past (the group view shows it), the partition
    /// is read afresh from there (found by the simulator, seed 10135).
    #[test]
    fn a_gap_written_past_by_another_writer_reopens_the_partition() {
        let now = Instant::now();
        let mut m = stopped_at_a_gap(now);
        while m.poll_command().is_some() {}
        let view = |stored| {
            [PartitionLag {
                partition: 0,
                stored,
                high_watermark: 10,
            }]
        };
        m.on_group_view(&view(Position::BEGINNING), now);
        assert_eq!(m.phase(0), Some(Phase::Stopped));
        m.on_group_view(&view(Position::new(3, 0)), now + Duration::from_secs(2));
        assert_eq!(m.phase(0), Some(Phase::Positioning));
        let commands: Vec<Command> = std::iter::from_fn(|| m.poll_command()).collect();
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::ReadPositions(p) if p == &vec![0])));
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::Notice(Notice::GapClosed { partition: 0, .. }))));
    }

    /// A message whose offset jumps past the next expected one stops the partition: nothing
    /// after the gap is buffered, Kafka is told to pause it, and the gap is reported.
    #[test]
    fn a_jump_in_offsets_stops_the_partition() {
        let now = Instant::now();
        let mut m = stopped_at_a_gap(now);
        assert_eq!(m.stats().buffered_records, 0);
        let commands: Vec<Command> = std::iter::from_fn(|| m.poll_command()).collect();
        assert!(commands
            .iter()
            .any(|c| matches!(c, Command::Kafka(KafkaCommand::Pause(0)))));
        assert!(commands.iter().any(|c| matches!(
            c,
            Command::Notice(Notice::Gap {
                partition: 0,
                expected: 0,
                got: 3
            })
        )));
    }
}
